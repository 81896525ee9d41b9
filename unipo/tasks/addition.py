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

    `reverse=True` asks for the sum written least-significant digit first (`"47+38="` ->
    `"58"`): the order in which carries are computed. Small transformers learn that format
    from far fewer examples (Lee et al., "Teaching Arithmetic to Small Transformers",
    arXiv 2307.03381), which is why the CPU demo uses it. The reversed answer is scored by
    exact string match.
    """

    name = "addition"
    scorer_is_safe = True  # pure verifier: never evaluates the completion, linear time

    def __init__(self, digits: int = 2, reverse: bool = False) -> None:
        check_digits("digits", digits)
        if not isinstance(reverse, bool):
            raise ValueError(f"reverse must be true or false, got {reverse!r}")
        self.digits, self.reverse = digits, reverse
        self.max_new_tokens = digits + 4  # digits + carry, EOS, and slack

    def generate(self, rng: random.Random, split: str) -> Problem:
        a, b = random_operand(rng, self.digits), random_operand(rng, self.digits)
        answer = str(a + b)[::-1] if self.reverse else str(a + b)
        return Problem(prompt=f"{a}+{b}=", answer=answer, demonstration=answer)

    def score(self, problem: Problem, completion: str) -> float:
        if self.reverse:
            return float(extract_answer(completion).strip() == problem.answer)
        return score_integer(problem, completion)
