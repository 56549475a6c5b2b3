"""The text side of one request's output: stop strings and streaming deltas.

Tokens are decoded as a whole (a byte-level BPE token can end inside a UTF-8 character, so text is
never built by concatenating per-token pieces). While streaming, a delta holds back an incomplete
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

    def hits_stop(self, tokens: Sequence[int]) -> bool:
        """After a token was appended: True (and `text` cut before it) if a stop string now appears."""
        if not self.stop or self.tok is None:
            return False
        text = self.tok.decode(list(tokens), skip_special_tokens=True)
        hit = [text.find(s) for s in self.stop if s in text]
        if hit:
            self.text, self.stopped = text[: min(hit)], True
        return bool(hit)

    def delta(self, tokens: Sequence[int], finished: bool) -> str:
        """The text not handed out yet that is safe to hand out now."""
        if self.tok is None:
            return ""
        if not self.stopped:
            self.text = self.tok.decode(list(tokens), skip_special_tokens=True)
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
