"""Multiplication: prompt `"47*8="`, answer and demonstration `"376"`."""

from __future__ import annotations

import random

from unipo.tasks.addition import check_digits, random_operand, score_integer
from unipo.tasks.base import TASKS, GeneratedTask, Problem


@TASKS.register("multiplication")
class MultiplicationTask(GeneratedTask):
    """a * b, a with exactly `digits` digits and b with exactly `multiplier_digits` digits.

    Operands are uniform over numbers of exactly that many digits (1-digit ones include 0),
    as in `addition`. The solver is Python's `*`.
    """

    name = "multiplication"
    scorer_is_safe = True  # pure verifier: never evaluates the completion, linear time

    def __init__(self, digits: int = 2, multiplier_digits: int = 1) -> None:
        check_digits("digits", digits)
        check_digits("multiplier_digits", multiplier_digits)
        self.digits = digits
        self.multiplier_digits = multiplier_digits
        self.max_new_tokens = digits + multiplier_digits + 3  # product digits, EOS, slack

    def generate(self, rng: random.Random, split: str) -> Problem:
        a = random_operand(rng, self.digits)
        b = random_operand(rng, self.multiplier_digits)
        answer = str(a * b)
        return Problem(prompt=f"{a}*{b}=", answer=answer, demonstration=answer)

    def score(self, problem: Problem, completion: str) -> float:
        return score_integer(problem, completion)
