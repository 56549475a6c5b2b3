"""Offline, seeded tasks for post-training demos and tests: no downloads.

A `Task` is data plus plain callables:
    train, heldout   lists of {"messages": [...system/user...], "answer": "123"} (the prompt, no reply)
    reward(completion, example) -> float   used by GRPO
    correct(completion, example) -> bool   held-out accuracy

`arithmetic_task` draws multi-digit +, -, * word problems. Train and held-out sets come from two
independent random streams of the seed (`Random(f"{seed}/train")`, `Random(f"{seed}/heldout")`), and
held-out problems whose calculation (`expr`, e.g. "23 + 45") also occurs in the train set are
dropped, so the split is disjoint in the arithmetic, not only in the wording, and the same seed
always gives the same task. `arithmetic_sft_chats` gives solved conversations (with the `Answer: N`
line the format reward asks for) for an SFT warm-up on the same distribution, and
`arithmetic_corpus` plain-text documents of worked calculations for pre-training; both take an
`exclude` set of expressions (pass `{e["expr"] for e in task.heldout}` to keep the held-out set unseen).

`load_task(spec)`: "arithmetic" or a .jsonl file of {"messages", "answer"} rows (exact-match reward);
`load_callable("pkg.module:function")` imports a user reward function for the CLI.
"""

from __future__ import annotations

import importlib
import inspect
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from dsv3.posttrain.rewards import exact_match_reward, format_reward, normalize_answer
from dsv3.training.data import jsonl_records, not_unicode

SYSTEM = "You are a careful calculator. End your reply with a line `Answer: <number>`."
_NAMES = ["Ada", "Bo", "Chen", "Dana", "Eli", "Fay", "Gus", "Hana"]
_THINGS = ["apples", "coins", "books", "marbles", "stamps", "shells"]


def arithmetic_reward(completion: str, example: dict) -> float:
    """Exact match of the final answer (1.0) plus a small bonus for the `Answer: N` format (0.1)."""
    return exact_match_reward(completion, example["answer"]) + 0.1 * format_reward(completion)


def exact_correct(completion: str, example: dict) -> bool:
    return exact_match_reward(completion, example["answer"]) == 1.0


@dataclass
class Task:
    name: str
    train: list[dict]
    heldout: list[dict]
    reward: Callable[[str, dict], float] = arithmetic_reward
    correct: Callable[[str, dict], bool] = exact_correct
    meta: dict = field(default_factory=dict)


def _problem(rng: random.Random, max_digits: int) -> tuple[str, str, int]:
    """(question, worked solution line, answer)."""
    op = rng.choice("+-*")
    d1, d2 = rng.randint(1, max_digits), rng.randint(1, max_digits if op != "*" else max(1, max_digits - 1))
    a, b = rng.randint(10 ** (d1 - 1), 10**d1 - 1), rng.randint(10 ** (d2 - 1), 10**d2 - 1)
    who, what = rng.choice(_NAMES), rng.choice(_THINGS)
    if op == "+":
        q, ans = f"{who} has {a} {what} and finds {b} more. How many {what} does {who} have now?", a + b
    elif op == "-":
        q, ans = f"{who} has {a} {what} and gives away {b}. How many {what} are left (may be negative)?", a - b
    else:
        q, ans = f"{who} buys {a} boxes with {b} {what} each. How many {what} is that?", a * b
    return q, f"{a} {op} {b} = {ans}", ans


def _expr(work: str) -> str:
    return work.partition(" = ")[0]


def _examples(rng: random.Random, n: int, max_digits: int) -> list[dict]:
    out = []
    for _ in range(n):
        q, work, ans = _problem(rng, max_digits)
        out.append({"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}],
                    "answer": str(ans), "expr": _expr(work)})
    return out


def _key(ex: dict, disjoint: str) -> str:
    return ex["expr"] if disjoint == "expr" else ex["messages"][-1]["content"]


def arithmetic_task(n_train: int = 1000, n_heldout: int = 100, seed: int = 0, max_digits: int = 3,
                    disjoint: str = "expr") -> Task:
    """disjoint="expr": no held-out calculation occurs in the train set (nor twice in the held-out set);
    "text": only the question texts are disjoint (for small digit counts, where every calculation recurs)."""
    if disjoint not in ("expr", "text"):
        raise ValueError(f"disjoint must be 'expr' or 'text', got {disjoint!r}")
    train = _examples(random.Random(f"{seed}/train"), n_train, max_digits)
    seen = {_key(ex, disjoint) for ex in train}
    heldout, rng = [], random.Random(f"{seed}/heldout")
    for _ in range(100):
        if len(heldout) >= n_heldout:
            break
        before = len(heldout)
        for ex in _examples(rng, n_heldout, max_digits):
            if _key(ex, disjoint) not in seen and len(heldout) < n_heldout:
                seen.add(_key(ex, disjoint))  # no repeat inside the held-out set either
                heldout.append(ex)
        if len(heldout) == before:  # a whole round of n_heldout draws found nothing new: exhausted
            break
    if len(heldout) < n_heldout:
        raise ValueError(f"only {len(heldout)} distinct held-out calculations outside the train set at "
                         f"max_digits={max_digits}; ask for fewer")
    return Task("arithmetic", train, heldout, meta={"seed": seed, "max_digits": max_digits, "disjoint": disjoint})


def _allowed_problem(rng: random.Random, max_digits: int, exclude) -> tuple[str, str, int]:
    """A problem whose calculation and question text are not in `exclude`; a clear error (not an endless
    loop) when `exclude` covers (nearly) the whole problem space."""
    for _ in range(100_000):
        q, work, ans = _problem(rng, max_digits)
        if _expr(work) not in exclude and q not in exclude:
            return q, work, ans
    raise ValueError(f"`exclude` ({len(exclude)} entries) leaves no problems at max_digits={max_digits}: "
                     "exclude fewer, or raise max_digits")


def arithmetic_sft_chats(n: int, seed: int = 0, max_digits: int = 3, exclude: set[str] | frozenset = frozenset()
                         ) -> list[dict]:
    """Solved conversations {"messages": [system, user, assistant]} (a disjoint stream from the task's);
    problems whose calculation or question text is in `exclude` are skipped."""
    rng = random.Random(f"{seed}/sft")
    out = []
    while len(out) < n:
        q, work, ans = _allowed_problem(rng, max_digits, exclude)
        out.append({"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q},
                                 {"role": "assistant", "content": f"{work}\nAnswer: {ans}"}]})
    return out


def arithmetic_corpus(n_docs: int, lines_per_doc: int = 32, seed: int = 0, max_digits: int = 3,
                      exclude: set[str] | frozenset = frozenset()) -> list[str]:
    """Plain-text pre-training documents of worked calculations, no chat template: each line is either
    a bare equation ("23 + 45 = 68") or a word problem followed by its equation (half each).
    Calculations or question texts in `exclude` are skipped."""
    rng = random.Random(f"{seed}/corpus")
    docs = []
    for _ in range(n_docs):
        lines: list[str] = []
        while len(lines) < lines_per_doc:
            q, work, _ = _allowed_problem(rng, max_digits, exclude)
            lines.append(work if rng.random() < 0.5 else f"{q} {work}.")
        docs.append("\n".join(lines) + "\n")
    return docs


def load_callable(spec: str) -> Callable:
    """"package.module:function" -> the function (for a user-supplied reward on the command line)."""
    mod, _, name = spec.partition(":")
    if not mod or not name:
        raise ValueError(f"expected 'module:function', got {spec!r}")
    try:
        module = importlib.import_module(mod)
    except ImportError as e:  # (a traceback before)
        raise ValueError(f"{spec!r}: cannot import module {mod!r} ({e}); is it on PYTHONPATH?") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ValueError(f"{spec!r} is not a callable")
    try:  # a reward is called as fn(completion, example): checked now, not after the first rollouts
        inspect.signature(fn).bind("", {})
    except TypeError:
        raise ValueError(f"{spec!r} cannot be called as reward(completion: str, example: dict) -> float: its signature "
                         f"is {inspect.signature(fn)}") from None
    except ValueError:  # no signature to read (some builtins): called as it is
        pass
    return fn


def _check_prompt(row: dict, where: str, exact_match: bool = True) -> None:
    """A task row's prompt and answer, checked when the file is read (not at the first rollout, without the line).
    The answer's type only for the exact-match reward: a reward of the user's (--reward) may take any JSON value
    (unit tests, a list of accepted answers, ...)."""
    msgs = row["messages"]
    if not msgs:
        raise ValueError(f"{where}: 'messages' is empty: no prompt")
    for j, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "tool"):
            role = m.get("role") if isinstance(m, dict) else None
            raise ValueError(f"{where}: message {j} has role {role!r}; expected one of system, user, assistant, tool")
        if not isinstance(m.get("content"), str):
            raise ValueError(f"{where}: message {j} ({m['role']}) needs a string 'content'")
        if why := not_unicode(m["content"]):
            raise ValueError(f"{where}: message {j} ({m['role']}) {why}")
    a = row["answer"]
    if exact_match and (isinstance(a, bool) or not isinstance(a, (str, int, float))
                        or (isinstance(a, str) and not a.strip())):
        raise ValueError(f"{where}: 'answer' must be a non-empty string or a number, got {a!r} (the exact-match "
                         "reward compares it with the completion's final answer; --reward takes any value)")
    if exact_match and normalize_answer(str(a)) is None:  # its reward would be 0 whatever the completion
        raise ValueError(f"{where}: 'answer' {a!r} is not one number or a plain text answer, so the exact-match reward "
                         "could never match it (a fraction, an expression, a number with words); give --reward")


def load_task(spec: str, seed: int = 0, heldout_frac: float = 0.05, reward: Callable | None = None) -> Task:
    """"arithmetic" (the built-in generator) or a .jsonl of {"messages", "answer"} rows, of which the
    last `heldout_frac` (at least one row) are held out."""
    if spec == "arithmetic":
        t = arithmetic_task(seed=seed)
    else:
        if not os.path.isfile(spec):
            raise FileNotFoundError(f"task {spec!r}: no such file; give 'arithmetic' (the built-in task) or a .jsonl "
                                    "file of {\"messages\", \"answer\"} rows")
        rows = []
        with open(spec, encoding="utf-8") as f:
            for i, row in jsonl_records(f, spec):
                if not isinstance(row, dict) or not isinstance(row.get("messages"), list) or "answer" not in row:
                    raise ValueError(f"{spec}:{i}: expected an object with 'messages' (a list) and 'answer'")
                _check_prompt(row, f"{spec}:{i}", exact_match=reward is None)
                rows.append(row)
        if len(rows) < 2:
            raise ValueError(f"{spec}: need at least 2 rows (train + held-out), got {len(rows)}")
        n_held = max(1, int(len(rows) * heldout_frac))
        t = Task(spec, rows[:-n_held], rows[-n_held:], reward=lambda c, ex: exact_match_reward(c, ex["answer"]))
    if reward is not None:
        t.reward = reward
    return t
