"""Countdown: reach a target from given numbers with + - * / and parentheses.

The arithmetic game of Stream of Search (Gandhi et al., arXiv 2404.03683) that TinyZero
(github.com/Jiayi-Pan/TinyZero, no paper) used to reproduce R1-Zero-style RL. Prompt
`"make 30 from 3 7 9:"`, answer and demonstration an expression such as `"(3*7)+9"` that uses
every given number exactly once.

Choices, against TinyZero's reward (verl/utils/reward_score/countdown.py), and why:
- Reward is binary: 1 for a valid expression with the right value, else 0. TinyZero gave 0.1
  to any wrong answer inside <answer> tags (a format reward); shaping belongs to the recipe,
  not hidden in the task.
- Arithmetic is exact (`fractions.Fraction`), not float with a 1e-5 tolerance, so `(1/3)*3`
  equals 1 and no float rounding can accept a wrong answer. Intermediate fractions and
  negatives are allowed; the target is a positive integer.
- The completion is parsed with `ast` and walked against an allow-list (integer literals
  written in plain decimal, binary + - * /, unary minus, parentheses); anything else (names,
  calls, attributes, `**`, floats, very long input, huge literals) scores 0 and nothing is
  executed. TinyZero filtered characters with a regex and then called `eval`, which lets
  `2**99999999` through (the regex admits `*`) and hangs the reward worker.
- `expr` and `expr = target` are both accepted.
"""

from __future__ import annotations

import ast
import operator
import random
from collections import Counter
from collections.abc import Callable, Sequence
from fractions import Fraction

from unipo.tasks.base import TASKS, GeneratedTask, Problem, extract_answer, parse_integer, split_of

MAX_EXPRESSION_CHARS = 200  # far above any honest answer; bounds parse time and nesting depth
MAX_LITERAL = 10**6

_BINARY: dict[type, Callable[[Fraction, Fraction], Fraction]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,  # Fraction / Fraction(0) raises ZeroDivisionError
}


class UnsafeExpression(ValueError):
    """The text is not an expression the countdown verifier accepts."""


def evaluate_expression(text: str) -> tuple[Fraction, list[int]]:
    """Exact value of an arithmetic expression and the integer literals it uses, in order.

    Raises UnsafeExpression for anything outside the allow-list and ZeroDivisionError on
    division by zero. Only the parsed tree is inspected; the text is never executed.
    """
    text = text.strip()
    if len(text) > MAX_EXPRESSION_CHARS:
        raise UnsafeExpression(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as error:
        raise UnsafeExpression(f"not an expression: {error}") from None
    literals: list[int] = []
    return _evaluate(tree.body, text, literals), literals


def _evaluate(node: ast.AST, source: str, literals: list[int]) -> Fraction:
    # Each node type is checked before its children are visited, so a forbidden node is
    # rejected before any arithmetic below it happens.
    if isinstance(node, ast.Constant) and type(node.value) is int:
        written = ast.get_source_segment(source, node) or ""
        if not written.isdigit() or not written.isascii():  # no 0x10, 1_000
            raise UnsafeExpression(f"literal {written!r} is not a plain decimal integer")
        if node.value > MAX_LITERAL:
            raise UnsafeExpression(f"literal larger than {MAX_LITERAL}")
        literals.append(node.value)
        return Fraction(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left = _evaluate(node.left, source, literals)
        right = _evaluate(node.right, source, literals)
        return _BINARY[type(node.op)](left, right)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_evaluate(node.operand, source, literals)
    raise UnsafeExpression(f"{type(node).__name__} is not allowed")


def check_countdown(expression: str, numbers: Sequence[int], target: int) -> bool:
    """True iff `expression` (optionally `... = target`) uses exactly `numbers` and equals `target`."""
    left, equals, right = expression.rpartition("=")
    if equals:
        if parse_integer(right) != target:
            return False
        expression = left
    try:
        value, used = evaluate_expression(expression)
    except (UnsafeExpression, ZeroDivisionError):
        return False
    return Counter(used) == Counter(numbers) and value == target


def solve_countdown(numbers: Sequence[int], target: int) -> str | None:
    """An expression using each number once with value `target`, by exhaustive search; else None.

    Depth-first: replace two values by one of their combinations, remembering value multisets
    already shown unsolvable. For a target >= 0 only non-negative intermediates are tried
    (subtraction as larger minus smaller): |u+v|, |u-v|, |u*v|, |u/v| are all reachable from |u|
    and |v| that way, so no solution is lost. Exponential in len(numbers): ~1 ms for 3 numbers,
    ~30 ms for 5, seconds for 6 (so the task caps `count` at 5).
    """
    if target < 0 or any(n < 0 for n in numbers):
        raise ValueError("solve_countdown expects a non-negative target and numbers")
    goal = Fraction(target)
    unsolvable: set[tuple[Fraction, ...]] = set()

    def search(items: list[tuple[Fraction, str]]) -> str | None:
        if len(items) == 2:  # the last step, inlined: most of the search happens here
            return _final_step(items[0], items[1], goal)
        key = tuple(sorted(value for value, _ in items))
        if key in unsolvable:
            return None
        for i in range(len(items)):
            for j in range(i + 1, len(items)):
                rest = items[:i] + items[i + 1 : j] + items[j + 1 :]
                for combined in _combinations(items[i], items[j]):
                    found = search(rest + [combined])
                    if found is not None:
                        return found
        unsolvable.add(key)
        return None

    if len(numbers) == 1:
        return str(numbers[0]) if numbers[0] == target else None
    found = search([(Fraction(n), str(n)) for n in numbers])
    # every combination is parenthesised; the outermost pair is redundant
    return None if found is None else found[1:-1]


def _combinations(a: tuple[Fraction, str], b: tuple[Fraction, str]) -> list[tuple[Fraction, str]]:
    (x, ex), (y, ey) = a if a[0] >= b[0] else b, b if a[0] >= b[0] else a  # x >= y >= 0
    out = [(x + y, f"({ex}+{ey})"), (x * y, f"({ex}*{ey})"), (x - y, f"({ex}-{ey})")]
    if y != 0:
        out.append((x / y, f"({ex}/{ey})"))
    if x != 0:
        out.append((y / x, f"({ey}/{ex})"))
    return out


def _final_step(a: tuple[Fraction, str], b: tuple[Fraction, str], goal: Fraction) -> str | None:
    (x, ex), (y, ey) = a if a[0] >= b[0] else b, b if a[0] >= b[0] else a  # x >= y >= 0
    if x + y == goal:
        return f"({ex}+{ey})"
    if x * y == goal:
        return f"({ex}*{ey})"
    if x - y == goal:
        return f"({ex}-{ey})"
    if y != 0 and x == goal * y:
        return f"({ex}/{ey})"
    if x != 0 and y == goal * x:
        return f"({ey}/{ex})"
    return None


@TASKS.register("countdown")
class CountdownTask(GeneratedTask):
    """`count` numbers uniform in [low, high]; the target is the value of a random expression.

    The generator combines the numbers in random order with random operators and keeps the
    draw when the value is a positive integer, so every target is reachable; the
    demonstration is then found by `solve_countdown` (not copied from the generator).
    """

    name = "countdown"
    scorer_is_safe = True  # pure verifier: never evaluates the completion, linear time

    def __init__(self, count: int = 3, low: int = 1, high: int = 9) -> None:
        if isinstance(count, bool) or not isinstance(count, int) or not 2 <= count <= 5:
            raise ValueError(f"count must be an int in [2, 5] (the solver is exponential), got {count!r}")
        if not (isinstance(low, int) and isinstance(high, int) and 0 <= low <= high <= MAX_LITERAL):
            raise ValueError(f"need integers 0 <= low <= high <= {MAX_LITERAL}, got {low!r}, {high!r}")
        self.count, self.low, self.high = count, low, high
        # numbers, operators and parentheses of a fully parenthesised answer, EOS, slack
        self.max_new_tokens = count * (len(str(high)) + 3) + 4

    def generate(self, rng: random.Random, split: str) -> Problem | None:
        while True:
            numbers = [rng.randint(self.low, self.high) for _ in range(self.count)]
            target = _random_expression_value(numbers, rng)
            if target is not None and target.denominator == 1 and target > 0:
                break
        prompt = f"make {target} from {' '.join(map(str, numbers))}:"
        if split_of(prompt) != split:
            return None  # skip the solver for a problem the caller would reject
        expression = solve_countdown(numbers, int(target))
        if expression is None:  # cannot happen: the generator's own expression reaches it
            raise RuntimeError(f"countdown solver found no expression for {numbers} -> {target}")
        meta = {"numbers": tuple(numbers), "target": int(target)}
        return Problem(prompt=prompt, answer=expression, demonstration=expression, meta=meta)

    def score(self, problem: Problem, completion: str) -> float:
        numbers, target = problem.meta["numbers"], problem.meta["target"]
        return float(check_countdown(extract_answer(completion), numbers, target))


def _random_expression_value(numbers: Sequence[int], rng: random.Random) -> Fraction | None:
    """Value of a random expression using each number once; None on division by zero."""
    values = [Fraction(n) for n in numbers]
    while len(values) > 1:
        i, j = sorted(rng.sample(range(len(values)), 2), reverse=True)
        right, left = values.pop(i), values.pop(j)
        combine = rng.choice(list(_BINARY.values()))
        if combine is operator.truediv and right == 0:
            return None
        values.append(combine(left, right))
    return values[0]
