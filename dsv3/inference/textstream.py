"""The text side of one request's output: stop strings and streaming deltas.

Text is never built by concatenating per-token pieces (a byte-level BPE token can end inside a UTF-8
character). It is decoded incrementally as vLLM's detokenizer does: the text of the tokens up to the last point where
the text was whole stays, and each call decodes only the tokens from the point before it (a few tokens), taking the
new text as the difference of two decodes of that window. Where those points fall on character boundaries
(byte-level BPE: a window whose text ends without the decoder's U+FFFD), the result is exactly the decode of all the
tokens, at O(window) a token instead of O(output): re-decoding the whole output for every token cost ~5 s of host
time over an 8k-token stream (0.16 ms per 1k tokens, measured on 2 CPU cores). While streaming, a delta holds back an incomplete
UTF-8 character (the decoder's U+FFFD at the end) and the last len(longest stop string) - 1
characters before it, which could still turn out to be the start of a stop string; the final delta
releases the rest. A stop string ends the request at the token that completes it, and the text is cut before
the stop string (OpenAI and vLLM: the stop string is not returned)."""

from __future__ import annotations

from collections.abc import Sequence


class TextStream:
    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tok = tokenizer
        self.stop = [s for s in stop if s]
        self.text = ""  # all text so far (cut at the stop string once one is found)
        self.stopped = False  # a stop string was found: `text` is final
        self.emitted = 0  # characters already handed out by delta()
        # incremental decoding: _done is the text of tokens[:_read], which ended whole; _prefix <= _read is where
        # the next decode window starts (the window's first tokens are context, as in vLLM's detokenizer)
        self._done, self._prefix, self._read = "", 0, 0
        self._at = (-1, "")  # (number of tokens, their text): hits_stop and delta of one step decode once
        self._searched = 0  # characters of text that can no longer change, as of the last stop search

    def _decode(self, tokens: Sequence[int]) -> str:
        """The text of all of `tokens` (the request's whole output so far; it only grows)."""
        n = len(tokens)
        if n == self._at[0]:
            return self._at[1]
        dec = self.tok.decode
        context = dec(list(tokens[self._prefix:self._read]), skip_special_tokens=True) if self._read > self._prefix \
            else ""
        window = dec(list(tokens[self._prefix:]), skip_special_tokens=True)
        if not window.startswith(context):  # a decoder whose window text is not an extension: decode it all
            text = dec(list(tokens), skip_special_tokens=True)
            if not text.endswith("\ufffd"):  # (the next window with a few tokens of context, as vLLM starts)
                self._done, self._prefix, self._read = text, max(0, n - 4), n
        else:
            text = self._done + window[len(context):]
            if not window.endswith("\ufffd"):  # whole: the next window starts at these tokens
                self._done, self._prefix, self._read = text, self._read, n
        self._at = (n, text)
        return text

    def hits_stop(self, tokens: Sequence[int]) -> bool:
        """After a token was appended: True (and `text` cut before it) if a stop string now appears."""
        if not self.stop or self.tok is None:
            return False
        text = self._decode(tokens)
        # text[:_searched] held no stop string at the last search and has not changed since: an occurrence now
        # ends past it
        start = max(0, self._searched - max(len(s) for s in self.stop) + 1)
        hit = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
        self._searched = len(self._done)
        if hit:
            self.text, self.stopped = text[: min(hit)], True
        return bool(hit)

    def delta(self, tokens: Sequence[int], finished: bool) -> str:
        """The text not handed out yet that is safe to hand out now."""
        if self.tok is None:
            return ""
        if not self.stopped:
            self.text = self._decode(tokens)
        hold = 0
        if not finished:
            # the incomplete character (the decoder's trailing U+FFFD run) and, before it, the last len(stop) - 1
            # characters: a stop string ending in that character once it completes starts there (a hold of the
            # larger of the two once let "b" of the stop string "b🙂" out while 🙂 was still incomplete)
            hold = len(self.text) - len(self.text.rstrip("\ufffd"))
            if self.stop:
                hold += max(len(s) for s in self.stop) - 1
        end = max(self.emitted, len(self.text) - hold)
        out = self.text[self.emitted: end]
        self.emitted = end
        return out
