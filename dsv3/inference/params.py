"""SamplingParams: how one request samples. Its own module, without torch, so that the server's
request-preparation workers (prep.py) can build them without importing the model's stack."""

from __future__ import annotations

import math
from dataclasses import dataclass

from dsv3.cliargs import setting

LOGPROBS_MAX = 20  # the most likely tokens a request may ask log-probabilities of (OpenAI's top_logprobs, vLLM's)


@dataclass
class SamplingParams:
    """How one request samples; the fields are also the flags of `dsv3 generate/sample/chat`.

    The defaults sample from the model's own distribution (temperature 1, no truncation), as the
    OpenAI API and vLLM do: GRPO's on-policy sampling relies on top_k staying off. Before the CLI
    derived its flags from these fields it defaulted to temperature 0.8 and top-k 50 (pass those
    for tamer text from a small model)."""
    max_new_tokens: int = setting(256, "most tokens to generate")
    temperature: float = setting(1.0, "sampling temperature; 0: greedy")
    top_k: int = setting(0, "sample among the k most likely tokens (0: off)")
    top_p: float = setting(1.0, "nucleus sampling: the smallest set of tokens with this much probability (1: off)")
    min_p: float = setting(0.0, "drop tokens below min_p x the most likely token's probability (0: off)")
    # > 1 discourages tokens already in prompt or output (CTRL rule)
    repetition_penalty: float = setting(1.0, "> 1 discourages tokens already in the prompt or output (1: off)")
    stop: list[str] = setting(factory=list, help="stop string, not included in the text (repeatable)")
    stop_token_ids: list[int] = setting(factory=list, help="stop token id (repeatable)", metavar="ID")
    ignore_eos: bool = setting(False, "keep generating past the end-of-sequence token")
    seed: int | None = setting(None, "random seed of this request's sampling (None: unseeded)")
    # None: none; 0: the chosen token's; n: also the n most likely
    # the model's own (raw) log-probabilities, before temperature, penalty and top-k/p/min-p (vLLM's default,
    # logprobs_mode "raw_logprobs"): a sampled or penalised choice need not be the top one
    logprobs: int | None = setting(None, "log-probabilities per token: 0, the chosen token's; n, also the n "
                                         "most likely; the model's raw ones, before temperature, penalty and "
                                         "filters (default: none)")

    def validate(self) -> "SamplingParams":
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):  # (NaN passes `< 0`)
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if not 0.01 <= self.repetition_penalty <= 100:  # beyond that logits over/underflow in fp32
            raise ValueError(f"repetition_penalty must be in [0.01, 100], got {self.repetition_penalty}")
        if self.logprobs is not None and not 0 <= self.logprobs <= LOGPROBS_MAX:
            raise ValueError(f"logprobs must be between 0 and {LOGPROBS_MAX}, got {self.logprobs}")
        return self
