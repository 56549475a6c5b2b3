"""Reward functions for GRPO: plain callables, no registry.

A reward is any `f(completion: str, example: dict) -> float` (see `Task.reward` in tasks.py); the
functions below are the building blocks, and `make_reward` combines them for a task.

Answer extraction (`extract_answer`), in this order:
  1. marked answers: every `\\boxed{...}` (balanced braces), every `#### X` whose X begins like a number (a sign,
     `$` or a digit; `#### Step 1: ...` is a markdown heading, not a marker) and every line
     starting with `Answer: X` / `The final answer is X` (a box on such a line counts as its contents: "The final
     answer is $\\boxed{42}$." is the one answer 42). If there are marked answers they alone count: all of
     them must normalise to the same value, otherwise the completion hedges ("Answer: 3 ... Answer: 5")
     and has no answer. A marked answer must be one number (or, for non-numeric answers, one short
     string): "Answer: 3, 4 or 5" has no answer.
  2. no marker, `strict=False` (default): the last number in the text ("... so it is 42.").
     `strict=True` requires a marker (a list of 100 numbers then earns nothing).
Normalisation: surrounding whitespace, `$`, a trailing period and a leading `+` are dropped;
thousands separators `1,234` are accepted (only in groups of three); numbers compare by value
(`3.0` == `3`, `-0` == `0`), other strings case-insensitively with whitespace collapsed.

`code_reward` never executes anything in this process: the program (the completion's last fenced
python block, or the raw completion) followed by the tests runs in dsv3/eval/sandbox.py's sandbox (a
fresh `python -I` subprocess in its own session and temporary directory, stdin closed, a wall-clock
timeout, rlimits, no network, no process spawning; its docstring says what it does not stop). It
scores 1.0 iff the process runs to its end and exits 0 within the time limit (an early sys.exit(0) fails).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

_NUM = r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"
_NUM_RE = re.compile(_NUM)
_ONE_NUM = re.compile(rf"^\$?({_NUM})\$?\.?$")
# GSM8K's `#### 72`: the marker's text must begin like a number (a sign, `$` or a digit), so that a markdown heading
# ("#### Step 1: add the apples") is not taken for a marked answer, which then conflicted with the real one
_HASH = re.compile(r"####[ \t]*([-+$\d][^\n]*)")
_ANSWER_LINE = re.compile(r"^[ \t*]*(?:the\s+)?(?:final\s+)?answer\s*(?:is\s*:?|:)\s*([^\n]*)",
                          re.IGNORECASE | re.MULTILINE)
_FORMAT = re.compile(rf"^Answer:\s*{_NUM}$")


def _boxes(text: str) -> list[tuple[int, int, str]]:
    """(start, end, contents) of every \\boxed{...}, with nested braces balanced; an unclosed box is ignored."""
    out, i = [], 0
    while (j := text.find("\\boxed{", i)) >= 0:
        k, depth = j + len("\\boxed{"), 1
        while k < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[k], 0)
            k += 1
        if depth == 0:
            out.append((j, k, text[j + len("\\boxed{"): k - 1]))
        i = k
    return out


def _boxed(text: str) -> list[str]:
    return [b for _, _, b in _boxes(text)]


def _unboxed(text: str) -> str:
    """`text` with every \\boxed{X} replaced by X: "The final answer is $\\boxed{42}$." marks 42 once, not the
    boxed 42 plus an answer line "$\\boxed{42}$." that is no number (and so conflicted with it)."""
    out, i = [], 0
    for j, k, b in _boxes(text):
        out += [text[i:j], b]
        i = k
    return "".join(out) + text[i:]


def normalize_answer(s: str) -> str | None:
    """Canonical form of one answer: a number as a Decimal string, else lowercased text; None if empty
    or if it holds several numbers ("3, 4 or 5")."""
    s = s.strip().strip("*").strip()
    m = _ONE_NUM.match(s.replace(" ", ""))
    if m:
        try:
            d = Decimal(m.group(1).replace(",", ""))
        except InvalidOperation:
            return None
        d = d.normalize()
        return "0" if d == 0 else format(d, "f")
    if _NUM_RE.search(s):  # numbers mixed with other text, or several numbers: not one answer
        return None
    s = " ".join(s.rstrip(".").split()).lower()
    return s or None


def extract_answer(text: str, strict: bool = False) -> str | None:
    """The completion's final answer, normalised (see the module docstring), or None."""
    marked = _boxed(text) + [_unboxed(m) for m in _HASH.findall(text) + _ANSWER_LINE.findall(text)]
    if marked:
        vals = {normalize_answer(m) for m in marked}
        return vals.pop() if len(vals) == 1 else None  # conflicting or unparsable markers: no answer
    if strict:
        return None
    nums = _NUM_RE.findall(text)
    return normalize_answer(nums[-1]) if nums else None


def exact_match_reward(completion: str, answer: str, strict: bool = False) -> float:
    """1.0 if the extracted final answer equals `answer` (after the same normalisation), else 0.0."""
    got = extract_answer(completion, strict)
    return float(got is not None and got == normalize_answer(str(answer)))


def format_reward(completion: str) -> float:
    """1.0 iff the last non-empty line is `Answer: <number>` and no other line starts with `Answer:`."""
    lines = [ln.strip() for ln in completion.strip().splitlines() if ln.strip()]
    if not lines or not _FORMAT.match(lines[-1]):
        return 0.0
    return float(sum(ln.lower().startswith("answer:") for ln in lines) == 1)


# --------------------------------------------------------------------------------------------------
# code

_FENCE = re.compile(r"```[ \t]*(python3?|py)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)


def extract_code(completion: str) -> str:
    """The last ```python (or ```py / bare ```) fenced block; the raw completion when there is none."""
    blocks = _FENCE.findall(completion)
    if not blocks:
        return completion
    py = [code for lang, code in blocks if lang]
    return (py or [code for _, code in blocks])[-1]


@dataclass
class CodeResult:
    returncode: int | None  # None when killed by the timeout
    timed_out: bool
    stdout: str
    stderr: str
    completed: bool = True  # the program ran to its end (an early sys.exit(0) / os._exit(0) did not stop it)

    @property
    def passed(self) -> bool:
        return not self.timed_out and self.returncode == 0 and self.completed


def run_code(code: str, timeout_s: float = 5.0, memory_mb: int = 1024) -> CodeResult:
    """Run `code` in the sandbox of dsv3/eval/sandbox.py (the one runner of model-written code, shared with
    HumanEval); never raises on bad code."""
    from dsv3.eval.sandbox import SandboxConfig, run_program

    r = run_program(code, SandboxConfig(timeout_s=timeout_s, memory_mb=memory_mb, cpu_s=int(timeout_s) + 1))
    return CodeResult(None if r.status == "timeout" else r.returncode, r.status == "timeout", r.stdout, r.stderr,
                      completed=r.status == "passed")


def code_reward(completion: str, tests: str, timeout_s: float = 5.0, memory_mb: int = 1024) -> float:
    """1.0 iff the extracted code followed by `tests` (e.g. asserts) runs to its end and exits 0 within
    `timeout_s` (an exit before the tests, even with status 0, scores 0)."""
    return float(run_code(extract_code(completion) + "\n\n" + tests, timeout_s, memory_mb).passed)
