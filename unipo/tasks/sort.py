"""Sorting: prompt `"sort 7 2 9 2:"`, answer and demonstration `"2 2 7 9"`."""

from __future__ import annotations

import random
import re

from unipo.tasks.base import TASKS, GeneratedTask, Problem, extract_answer, parse_integer


@TASKS.register("sort")
class SortTask(GeneratedTask):
    """Sort `k` integers drawn uniformly (with repeats) from [low, high] ascending.

    The answer is space-separated; the scorer also accepts commas between numbers. The
    solver is Python's `sorted`.
    """

    name = "sort"
    scorer_is_safe = True  # pure verifier: never evaluates the completion, linear time

    def __init__(self, k: int = 4, low: int = 0, high: int = 9) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= 64:
            raise ValueError(f"k must be an int in [1, 64], got {k!r}")
        if not (isinstance(low, int) and isinstance(high, int) and 0 <= low <= high):
            raise ValueError(f"need integers 0 <= low <= high, got low={low!r}, high={high!r}")
        self.k, self.low, self.high = k, low, high
        self.max_new_tokens = k * (len(str(high)) + 1) + 4  # numbers, spaces, EOS, slack

    def generate(self, rng: random.Random, split: str) -> Problem:
        numbers = [rng.randint(self.low, self.high) for _ in range(self.k)]
        answer = " ".join(map(str, sorted(numbers)))
        prompt = "sort " + " ".join(map(str, numbers)) + ":"
        return Problem(prompt=prompt, answer=answer, demonstration=answer)

    def score(self, problem: Problem, completion: str) -> float:
        tokens = [t for t in re.split(r"[\s,]+", extract_answer(completion)) if t]
        gold = [int(t) for t in problem.answer.split()]
        return float(len(tokens) == len(gold) and [parse_integer(t) for t in tokens] == gold)
