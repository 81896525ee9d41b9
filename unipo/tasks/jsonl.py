"""Problems from a JSON-lines file: spec `"jsonl:<path>"` or a bare path ending in `.jsonl`.

Each non-blank line is an object `{"prompt": str, "answer": str, "demonstration": str}`
with "demonstration" optional (absent or null: the answer itself is the demonstration, i.e.
the expert completion is the bare answer). Every malformed line (bad UTF-8, bad JSON, JSON
nested too deeply, a wrong key or type, a string that is not valid Unicode) is reported at once in
one ValueError, as `path:line: reason`; a file that cannot be read raises OSError.

Scoring parses the completion with sympy (math-verify), which can hang or run out of memory on
crafted input (`9**9**9`), so the task is not `scorer_is_safe`: `score_completions` scores it in
the reward sandbox, whose per-call time limit is the only timeout relied on (math-verify's own
uses SIGALRM, works on the main thread only and logs the whole completion; it is turned off).
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

from unipo.tasks.base import TASKS, Problem, Task, check_sample_args, extract_answer, split_of

_WORD = re.compile(r"[A-Za-z]{2,}")
_LATEX_COMMAND = re.compile(r"\\[A-Za-z]+")


@TASKS.register("jsonl")
class JsonlTask(Task):
    """A finite set of problems, scored with math-verify or exact match.

    Scoring: if the gold answer parses as math, reward = `verify(parse(gold),
    parse(extract_answer(completion)))`, so `\\frac{1}{2}`, `1/2` and `0.5` agree; otherwise
    reward = exact match of the stripped strings. Both sides are parsed as inline LaTeX
    (wrapped in `$...$` unless already delimited): undelimited, math-verify reads `2^{10}` as
    2. A gold answer containing a word (two letters in a row outside a LaTeX command, e.g.
    "Paris") is not math even if it parses: LaTeX would read it as the product P*a*r*i*s, and
    "sirap" would then match.
    Sampling: without replacement from the split when n fits, with replacement when n exceeds
    the split's size; an empty split raises ValueError.
    `max_new_tokens` defaults to the longest demonstration (in characters, an upper bound on
    tokens) plus 16.
    """

    scorer_is_safe = False  # sympy parsing: scored in the reward sandbox

    def __init__(self, path: str = "", max_new_tokens: int | None = None) -> None:
        if not str(path).strip():
            raise ValueError("jsonl task needs a path: 'jsonl:<path>' or a path ending in .jsonl")
        self.path = Path(path)
        self.name = f"jsonl:{path}"
        self.problems = load_jsonl(self.path)
        longest = max((len(p.demonstration or p.answer) for p in self.problems), default=0)
        self.max_new_tokens = max_new_tokens if max_new_tokens is not None else longest + 16
        self._gold_cache: dict[str, list] = {}

    def sample(self, n: int, *, seed: int, split: str = "train") -> list[Problem]:
        check_sample_args(n, split)
        pool = [p for p in self.problems if split_of(p.prompt) == split]
        if not pool:
            raise ValueError(
                f"{self.path}: the {split!r} split is empty ({len(self.problems)} problems in the file; "
                f"a prompt's split is fixed by its hash, ~10% go to 'test')"
            )
        rng = random.Random(f"{self.name}|{seed}|{split}")
        return rng.sample(pool, n) if n <= len(pool) else rng.choices(pool, k=n)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_gold_cache": {}}  # parsed gold answers are rebuilt where needed

    def score(self, problem: Problem, completion: str) -> float:
        from math_verify import parse, verify  # imported here: sympy is slow to import

        timeout = None  # the sandbox bounds the call's wall-clock time (see the module docstring)
        answer = problem.answer.strip()
        if answer not in self._gold_cache:
            is_math = not _WORD.search(_LATEX_COMMAND.sub("", answer))
            self._gold_cache[answer] = parse(_as_latex(answer), parsing_timeout=timeout) if is_math else []
        gold = self._gold_cache[answer]
        predicted = extract_answer(completion)
        if not gold:
            return float(predicted == answer)
        return float(verify(gold, parse(_as_latex(predicted), parsing_timeout=timeout), timeout_seconds=timeout))


def _as_latex(text: str) -> str:
    """`text` as inline LaTeX math, unless it already carries math delimiters."""
    return text if any(mark in text for mark in ("$", "\\(", "\\[")) else f"${text}$"


def load_jsonl(path: Path) -> list[Problem]:
    """All problems in `path`; one ValueError listing every malformed line otherwise."""
    problems: list[Problem] = []
    errors: list[str] = []
    with path.open("rb") as file:
        for number, raw in enumerate(file, start=1):
            problem_or_reason = _parse_line(raw)
            if isinstance(problem_or_reason, str):
                errors.append(f"{path}:{number}: {problem_or_reason}")
            elif problem_or_reason is not None:
                problems.append(problem_or_reason)
    if errors:
        raise ValueError(f"{len(errors)} malformed line(s) in {path}:\n" + "\n".join(errors))
    return problems


def _parse_line(raw: bytes) -> Problem | str | None:
    """The line's Problem, None for a blank line, or the reason it is malformed."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        return f"not UTF-8 (byte {error.start + 1})"
    if not line.strip():
        return None
    try:
        record: Any = json.loads(line)
    except json.JSONDecodeError as error:
        return f"bad JSON ({error.msg} at column {error.colno})"
    except RecursionError:
        return "bad JSON (nested too deeply)"
    except ValueError as error:  # e.g. an integer literal longer than Python converts
        return f"bad JSON ({error})"
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}"
    missing = [key for key in ("prompt", "answer") if key not in record]
    if missing:
        return f"missing key(s) {missing}"
    for key in ("prompt", "answer", "demonstration"):
        value = record.get(key)
        if key in record and not isinstance(value, str) and not (key == "demonstration" and value is None):
            return f"{key!r} must be a string, got {type(value).__name__}"
        if isinstance(value, str) and not _is_unicode(value):
            return f"{key!r} is not valid Unicode (a lone surrogate escape)"
    demonstration = record.get("demonstration")
    return Problem(
        prompt=record["prompt"],
        answer=record["answer"],
        demonstration=record["answer"] if demonstration is None else demonstration,
    )


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
