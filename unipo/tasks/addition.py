"""Addition of two integers: prompt `"47+38="`, answer and demonstration `"85"`."""

from __future__ import annotations

import random

from unipo.tasks.base import TASKS, GeneratedTask, Problem, extract_answer, parse_integer


def random_operand(rng: random.Random, digits: int) -> int:
    """Uniform over the integers with exactly `digits` digits (0-9 when digits == 1)."""
    low = 0 if digits == 1 else 10 ** (digits - 1)
    return rng.randint(low, 10**digits - 1)


def check_digits(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 18:
        raise ValueError(f"{name} must be an int in [1, 18], got {value!r}")


def score_integer(problem: Problem, completion: str) -> float:
    """1 if the extracted answer is the gold integer (sign and leading zeros tolerated), else 0."""
    value = parse_integer(extract_answer(completion))
    return float(value is not None and value == int(problem.answer))


@TASKS.register("addition")
class AdditionTask(GeneratedTask):
    """a + b with both operands drawn uniformly with exactly `digits` digits.

    "Exactly" rather than "up to" keeps every prompt of one length and difficulty; 1-digit
    operands include 0. The solver is Python's `+`.
    """

    name = "addition"

    def __init__(self, digits: int = 2) -> None:
        check_digits("digits", digits)
        self.digits = digits
        self.max_new_tokens = digits + 4  # digits + carry, EOS, and slack

    def generate(self, rng: random.Random, split: str) -> Problem:
        a, b = random_operand(rng, self.digits), random_operand(rng, self.digits)
        answer = str(a + b)
        return Problem(prompt=f"{a}+{b}=", answer=answer, demonstration=answer)

    def score(self, problem: Problem, completion: str) -> float:
        return score_integer(problem, completion)
