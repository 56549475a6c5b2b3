"""Reward functions for GRPO: plain callables, no registry.

A reward is any `f(completion: str, example: dict) -> float` (see `Task.reward` in tasks.py); the
functions below are the building blocks, and `make_reward` combines them for a task.

Answer extraction (`extract_answer`), in this order:
  1. marked answers: every `\\boxed{...}` (balanced braces), every `#### X` and every line
     starting with `Answer: X` / `The final answer is X`. If there are marked answers they alone count: all of
     them must normalise to the same value, otherwise the completion hedges ("Answer: 3 ... Answer: 5")
     and has no answer. A marked answer must be one number (or, for non-numeric answers, one short
     string): "Answer: 3, 4 or 5" has no answer.
  2. no marker, `strict=False` (default): the last number in the text ("... so it is 42.").
     `strict=True` requires a marker (a list of 100 numbers then earns nothing).
Normalisation: surrounding whitespace, `$`, a trailing period and a leading `+` are dropped;
thousands separators `1,234` are accepted (only in groups of three); numbers compare by value
(`3.0` == `3`, `-0` == `0`), other strings case-insensitively with whitespace collapsed.

`code_reward` never executes anything in this process: the program (the completion's last fenced
python block, or the raw completion) followed by the tests runs in a fresh `python -I` subprocess,
in its own session (so the whole process group can be killed), in an empty temporary directory,
with stdin closed, a wall-clock timeout and, on Linux/macOS, rlimits on CPU seconds, address space,
written file size and open files. It scores 1.0 iff the process exits 0 within the time limit.
This is isolation against accidents (infinite loops, memory blow-ups, crashes), not a security
sandbox: the code runs as the same user and can reach the filesystem and the network.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

_NUM = r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"
_NUM_RE = re.compile(_NUM)
_ONE_NUM = re.compile(rf"^\$?({_NUM})\$?\.?$")
_HASH = re.compile(r"####\s*([^\n]*)")
_ANSWER_LINE = re.compile(r"^[ \t*]*(?:the\s+)?(?:final\s+)?answer\s*(?:is|:)\s*([^\n]*)", re.IGNORECASE | re.MULTILINE)
_FORMAT = re.compile(rf"^Answer:\s*{_NUM}$")


def _boxed(text: str) -> list[str]:
    """Contents of every \\boxed{...}, with nested braces balanced; an unclosed box is ignored."""
    out, i = [], 0
    while (j := text.find("\\boxed{", i)) >= 0:
        k, depth = j + len("\\boxed{"), 1
        while k < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[k], 0)
            k += 1
        if depth == 0:
            out.append(text[j + len("\\boxed{"): k - 1])
        i = k
    return out


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
    marked = _boxed(text) + _HASH.findall(text) + _ANSWER_LINE.findall(text)
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

    @property
    def passed(self) -> bool:
        return not self.timed_out and self.returncode == 0


def _limits(cpu_s: int, memory_mb: int):
    def apply():  # runs in the child between fork and exec
        try:
            import resource
        except ImportError:  # not POSIX: the timeout still applies
            return
        for lim, val in ((resource.RLIMIT_CPU, cpu_s), (resource.RLIMIT_AS, memory_mb * 2**20),
                         (resource.RLIMIT_FSIZE, 16 * 2**20), (resource.RLIMIT_NOFILE, 64)):
            try:
                resource.setrlimit(lim, (val, val))
            except (ValueError, OSError):  # e.g. RLIMIT_AS unsupported (macOS)
                pass
    return apply


def run_code(code: str, timeout_s: float = 5.0, memory_mb: int = 1024, max_output: int = 10_000) -> CodeResult:
    """Run `code` in a separate Python process (see the module docstring); never raises on bad code."""
    with tempfile.TemporaryDirectory(prefix="dsv3-code-") as d:
        path = os.path.join(d, "prog.py")
        with open(path, "w", encoding="utf-8") as f:
            f.write(code)
        out_p, err_p = os.path.join(d, "stdout"), os.path.join(d, "stderr")
        with open(out_p, "wb") as out, open(err_p, "wb") as err:
            kw = {}
            if os.name == "posix":
                kw = {"start_new_session": True, "preexec_fn": _limits(int(timeout_s) + 1, memory_mb)}
            proc = subprocess.Popen([sys.executable, "-I", "-B", path], cwd=d, stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=err, env={"PATH": os.environ.get("PATH", "")}, **kw)
            try:
                rc, timed_out = proc.wait(timeout=timeout_s), False
            except subprocess.TimeoutExpired:
                rc, timed_out = None, True
            finally:
                if os.name == "posix":  # the whole session: also children the program forked
                    try:
                        os.killpg(proc.pid, signal.SIGKILL)
                    except (ProcessLookupError, PermissionError):
                        pass
                else:
                    proc.kill()
                proc.wait()

        def read(p):
            with open(p, "rb") as f:
                return f.read(max_output).decode("utf-8", "replace")

        return CodeResult(rc, timed_out, read(out_p), read(err_p))


def code_reward(completion: str, tests: str, timeout_s: float = 5.0, memory_mb: int = 1024) -> float:
    """1.0 iff the extracted code followed by `tests` (e.g. asserts) exits 0 within `timeout_s`."""
    return float(run_code(extract_code(completion) + "\n\n" + tests, timeout_s, memory_mb).passed)
