"""Tasks: verifiers, demonstrations, splits, spec parsing, reasoning-gym and jsonl adapters."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from fractions import Fraction
from itertools import permutations
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from unipo.tasks import TASKS, Problem, Task, extract_answer, get_task, score_completions, split_of
from unipo.tasks.base import ScoreResult, parse_params
from unipo.tasks.countdown import UnsafeExpression, check_countdown, evaluate_expression, solve_countdown

# One example spec per registered task; a newly registered task without one fails
# test_every_registered_task_has_an_example.
PROCEDURAL_SPECS = [
    "addition",
    "addition:digits=1",
    "addition:digits=4",
    "multiplication",
    "multiplication:digits=3,multiplier_digits=2",
    "sort",
    "sort:k=6,high=99",
    "countdown",
    "countdown:count=4,high=20",
]
RG_SPEC = "rg:leg_counting"


@pytest.fixture(scope="module")
def jsonl_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """60 problems (enough for both splits): math answers, a word answer, explicit demonstrations."""
    path = tmp_path_factory.mktemp("jsonl") / "problems.jsonl"
    records = [{"prompt": f"{i}/{i + 1} as a fraction?", "answer": f"\\frac{{{i}}}{{{i + 1}}}"} for i in range(1, 50)]
    records += [{"prompt": f"capital of France, take {i}?", "answer": "Paris"} for i in range(10)]
    records += [{"prompt": "2 to the 10th?", "answer": "2^{10}", "demonstration": "1024"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def example_specs(jsonl_path: Path) -> dict[str, list[str]]:
    return {
        "addition": [s for s in PROCEDURAL_SPECS if s.startswith("addition")],
        "multiplication": [s for s in PROCEDURAL_SPECS if s.startswith("multiplication")],
        "sort": [s for s in PROCEDURAL_SPECS if s.startswith("sort")],
        "countdown": [s for s in PROCEDURAL_SPECS if s.startswith("countdown")],
        "rg": [RG_SPEC],
        "jsonl": [str(jsonl_path)],
        "hf": [f"hf:{jsonl_path}:eval_split=hash"],  # the same file read by `datasets` (unipo.tasks.hf)
    }


# Other test modules register toy tasks of their own; only the library's tasks need examples here.
LIBRARY_TASKS = sorted(n for n in TASKS if TASKS[n].__module__.startswith("unipo."))


@pytest.mark.parametrize("name", LIBRARY_TASKS)
def test_every_registered_task_has_an_example(name: str, jsonl_path: Path) -> None:
    specs = example_specs(jsonl_path)
    assert name in specs, f"task {name!r} is registered but has no example spec in this file"
    for spec in specs[name]:
        assert isinstance(get_task(spec), Task)


# ---------------------------------------------------------------------------------------
# Scoring: correct, incorrect and garbage completions for every built-in
# ---------------------------------------------------------------------------------------

GARBAGE = ["", "   ", "\x00\x01", "lorem ipsum", "9" * 10_000, "<answer></answer>", "\\boxed{"]

SCORING_CASES = {
    "addition": (
        Problem("47+38=", "85", "85"),
        ["85", " 85\n", "085", "+85", "<answer>85</answer>", "think... \\boxed{85}", "<answer>1</answer> \\boxed{85}"],
        ["84", "8 5", "85abc", "85.0", "-85", "<answer>85</answer><answer>84</answer>", "85 then 84"],
    ),
    "multiplication": (
        Problem("47*8=", "376", "376"),
        ["376", "<answer> 376 </answer>"],
        ["375", "47*8", "3 76"],
    ),
    "sort": (
        Problem("sort 3 9 1 4:", "1 3 4 9", "1 3 4 9"),
        ["1 3 4 9", "1,3,4,9", " 1  3 4\t9 ", "<answer>1, 3, 4, 9</answer>"],
        ["1 3 9 4", "1 3 4", "1 3 4 9 9", "9 4 3 1", "1 3 4 x", "1349"],
    ),
    "countdown": (
        Problem("make 30 from 3 7 9:", "(3*7)+9", "(3*7)+9", {"numbers": (3, 7, 9), "target": 30}),
        ["(3*7)+9", "3*7+9", "9+7*3", " 9 + 3 * 7 ", "3*7+9=30", "<answer>9+(7*3)</answer>", "((3*7)+9)"],
        ["3*7+9=31", "3*9+7", "21+9", "3*7+9+9", "3*7", "30", "3*7+9.0", "3*7+09", "x=3*7+9"],
    ),
}


@pytest.mark.parametrize("name", sorted(SCORING_CASES))
def test_scoring_of_correct_incorrect_and_garbage(name: str) -> None:
    task = get_task(name)
    problem, correct, incorrect = SCORING_CASES[name]
    for completion in correct:
        assert task.score(problem, completion) == 1.0, completion
    for completion in incorrect + GARBAGE:
        assert task.score(problem, completion) == 0.0, completion[:50]


def test_scoring_cases_cover_every_builtin_generator() -> None:
    procedural = {spec.split(":")[0] for spec in PROCEDURAL_SPECS}
    assert procedural == set(SCORING_CASES)


# ---------------------------------------------------------------------------------------
# Countdown: the safe evaluator and the solver
# ---------------------------------------------------------------------------------------

MALICIOUS = [
    "__import__('os').system('x')",
    "(1).__class__",
    "2**99999999",
    "lambda: 1",
    "9" * 10_000,
    "1+" * 5_000 + "1",
    "(" * 150 + "1" + ")" * 150,
    "[1, 2]",
    "x",
    "open('f')",
    "1 if 1 else 2",
    "1; 2",
    "3.0",
    "1e3",
    "3j",
    "True",
    "0x10",
    "1_000",
    "+3",
    "~3",
    "7 // 2",
    "7 % 2",
    "1 < 2",
    "'a'",
    "9999999",  # above the literal cap
]


@pytest.mark.parametrize("text", MALICIOUS, ids=range(len(MALICIOUS)))
def test_countdown_evaluator_rejects_without_executing(text: str, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[object] = []
    monkeypatch.setattr(os, "system", lambda *args: calls.append(args) or 0)
    start = time.perf_counter()
    with pytest.raises(UnsafeExpression):
        evaluate_expression(text)
    assert not check_countdown(text, [1, 2], 3)
    assert time.perf_counter() - start < 1.0  # e.g. 2**99999999 is rejected, never computed
    assert calls == []


def test_countdown_division_by_zero_scores_zero() -> None:
    with pytest.raises(ZeroDivisionError):
        evaluate_expression("1/(3-3)")
    assert not check_countdown("1/(3-3)+3", [1, 3, 3, 3], 3)
    task = get_task("countdown")
    problem = Problem("make 4 from 4 2 2:", "4*(2/2)", "4*(2/2)", {"numbers": (4, 2, 2), "target": 4})
    assert task.score(problem, "4/(2-2)") == 0.0


def test_countdown_arithmetic_is_exact() -> None:
    # (1/3)*3 = 1 exactly; in floats 1/49*49 = 0.9999999999999999, a wrong "miss"
    assert evaluate_expression("(1/3)*3") == (Fraction(1), [1, 3, 3])
    assert 1 / 49 * 49 != 1
    assert check_countdown("1/49*49", [1, 49, 49], 1)
    assert check_countdown("8/(3-8/3)", [8, 3, 8, 3], 24)  # needs the fraction 1/3 on the way
    assert evaluate_expression("-3--4") == (Fraction(1), [3, 4])  # unary minus is allowed


def test_countdown_solver_finds_fraction_solutions_and_reports_impossible() -> None:
    solution = solve_countdown([3, 3, 8, 8], 24)
    assert solution is not None and check_countdown(solution, [3, 3, 8, 8], 24)
    assert solve_countdown([1, 1], 5) is None
    assert solve_countdown([7], 7) == "7"


def reachable_reference(numbers: tuple[int, ...]) -> set[Fraction]:
    """Every value of an expression using each number once, allowing negative intermediates."""
    if len(numbers) == 1:
        return {Fraction(numbers[0])}
    values: set[Fraction] = set()
    indices = range(len(numbers))
    for mask in range(1, 2 ** len(numbers) - 1):  # every split into two non-empty parts
        left = tuple(numbers[i] for i in indices if mask >> i & 1)
        right = tuple(numbers[i] for i in indices if not mask >> i & 1)
        for a in reachable_reference(left):
            for b in reachable_reference(right):
                values |= {a + b, a - b, a * b}
                if b != 0:
                    values.add(a / b)
    return values


@given(numbers=st.lists(st.integers(0, 9), min_size=2, max_size=3), target=st.integers(0, 60))
def test_countdown_solver_agrees_with_brute_force_reference(numbers: list[int], target: int) -> None:
    # The solver only tries non-negative intermediates; the reference tries everything.
    solution = solve_countdown(numbers, target)
    assert (solution is not None) == (Fraction(target) in reachable_reference(tuple(numbers)))
    if solution is not None:
        assert check_countdown(solution, numbers, target)


def test_countdown_problem_is_well_formed() -> None:
    for problem in get_task("countdown").sample(50, seed=0):
        numbers, target = problem.meta["numbers"], problem.meta["target"]
        assert problem.prompt == f"make {target} from {' '.join(map(str, numbers))}:"
        assert isinstance(target, int) and target > 0 and len(problem.prompt) <= 30
        assert sorted(evaluate_expression(problem.demonstration)[1]) == sorted(numbers)


# ---------------------------------------------------------------------------------------
# Demonstrations, determinism, splits
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", PROCEDURAL_SPECS)
@given(seed=st.integers(0, 2**31 - 1), split=st.sampled_from(["train", "test"]))
def test_demonstrations_score_one(spec: str, seed: int, split: str) -> None:
    task = get_task(spec)
    problems = task.sample(8, seed=seed, split=split)
    assert len(problems) == 8
    for problem in problems:
        assert task.score(problem, problem.demonstration) == 1.0, problem
        assert task.score(problem, problem.answer) == 1.0, problem
        assert split_of(problem.prompt) == split
        # the completion budget fits the demonstration plus EOS
        assert len(problem.demonstration) + 1 <= task.max_new_tokens


@pytest.mark.parametrize("spec", PROCEDURAL_SPECS)
def test_sample_is_deterministic_and_splits_are_disjoint(spec: str) -> None:
    task = get_task(spec)
    first = task.sample(30, seed=7)
    assert first == get_task(spec).sample(30, seed=7)  # fresh instance, same problems
    assert first != task.sample(30, seed=8)
    train = {p.prompt for p in task.sample(300, seed=1, split="train")}
    test = {p.prompt for p in task.sample(60, seed=1, split="test")}
    assert train and test and not train & test
    assert task.sample(0, seed=1) == []


def test_sample_is_stable_across_processes() -> None:
    # Python's str hash is salted per process; splits and samples must not depend on it.
    code = "from unipo.tasks import get_task; print([p.prompt for p in get_task('addition').sample(5, seed=3)])"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    output = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert output.strip() == str([p.prompt for p in get_task("addition").sample(5, seed=3)])


def test_split_of_is_pinned_and_about_ten_percent_test() -> None:
    prompts = [f"{a}+{b}=" for a in range(100) for b in range(100)]
    fraction = sum(split_of(p) == "test" for p in prompts) / len(prompts)
    assert 0.08 < fraction < 0.12
    # golden values: a change of hash or threshold would silently move problems between splits
    assert [split_of(p) for p in ["10+20=", "10+23=", "11+17=", "47+38=", "10+21="]] == ["test"] * 3 + ["train"] * 2


def test_sample_argument_errors() -> None:
    task = get_task("addition")
    with pytest.raises(ValueError, match="split"):
        task.sample(3, seed=0, split="validation")
    with pytest.raises(ValueError, match="non-negative"):
        task.sample(-1, seed=0)
    with pytest.raises(ValueError, match="too small"):
        get_task("sort:k=1,high=0").sample(1, seed=0, split="test")  # one prompt in total


# ---------------------------------------------------------------------------------------
# get_task, extract_answer, score_completions
# ---------------------------------------------------------------------------------------


def test_get_task_parses_params() -> None:
    assert get_task("addition").digits == 2
    assert get_task("addition:digits=3").digits == 3
    assert get_task(" addition:digits=3 ").digits == 3
    assert get_task("addition", digits=4).digits == 4
    task = get_task("countdown:count=4,low=2,high=20")
    assert (task.count, task.low, task.high) == (4, 2, 20)
    assert parse_params("a=3, b=0.5,c=x,d=true,e=-2") == {"a": 3, "b": 0.5, "c": "x", "d": True, "e": -2}
    assert parse_params("") == {}


@pytest.mark.parametrize(
    ("spec", "params", "message"),
    [
        ("subtraction", {}, "valid: .*addition.*countdown"),
        ("", {}, "valid:"),
        ("addition:digits", {}, "key=value"),
        ("addition:base=3", {}, "unknown parameter.*accepted: digits"),
        ("addition:digits=3", {"digits": 4}, "both"),
        ("addition:digits=0", {}, "digits"),
        ("countdown:count=9", {}, "count"),
        ("rg:no_such_dataset", {}, "valid: .*leg_counting"),
        ("rg:leg_counting:no_such_key=1", {}, "config"),
        ("jsonl:", {}, "needs a path"),
    ],
)
def test_get_task_errors(spec: str, params: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        get_task(spec, **params)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("  42 \n", "42"),
        ("<answer> 7 </answer>", "7"),
        ("<answer>1</answer> then <answer>2</answer>", "2"),
        ("so \\boxed{\\frac{1}{2}} done", "\\frac{1}{2}"),
        ("\\boxed{1} and \\boxed{2}", "2"),
        ("<answer>\\boxed{5}</answer>", "5"),
        ("\\boxed{3} <answer>4</answer>", "4"),
        ("\\boxed{2} \\boxed{unbalanced", "2"),
        ("<answer>multi\nline</answer>", "multi\nline"),
        ("no tags", "no tags"),
    ],
)
def test_extract_answer(text: str, expected: str) -> None:
    assert extract_answer(text) == expected


class FlakyTask(Task):
    name = "flaky"
    max_new_tokens = 4
    scorer_is_safe = True  # scored in-process (the sandbox's own tests are in test_sandbox.py)

    def sample(self, n: int, *, seed: int, split: str = "train") -> list[Problem]:
        return [Problem("p", "a", "a")] * n

    def score(self, problem: Problem, completion: str) -> float:
        if completion == "boom":
            raise RuntimeError("scorer bug")
        return {"a": 1.0, "nan": float("nan"), "big": 2.0}.get(completion, 0.0)


def test_score_completions_counts_scorer_errors_as_zero() -> None:
    task = FlakyTask()
    problems = task.sample(5, seed=0)
    result = score_completions(task, problems, ["a", "boom", "b", "nan", "big"])
    assert result.rewards == [1.0, 0.0, 0.0, 0.0, 0.0]
    assert result.errors == 3 and result.timeouts == 0  # the raise, the NaN and the out-of-range score
    assert score_completions(task, problems[:2], ["a", "a"]) == ScoreResult([1.0, 1.0], 0, 0, 0)
    with pytest.raises(ValueError, match="2 problems but 1 completions"):
        score_completions(task, problems[:2], ["a"])


def test_score_completions_on_a_builtin_with_a_foreign_problem() -> None:
    # a countdown problem without its meta makes the scorer raise: counted, not fatal
    task = get_task("countdown")
    result = score_completions(task, [Problem("make 1 from 1:", "1", "1")], ["1"])
    assert (result.rewards, result.errors) == ([0.0], 1)


# ---------------------------------------------------------------------------------------
# reasoning-gym adapter (offline)
# ---------------------------------------------------------------------------------------


@pytest.fixture()
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Refuse every network connection; local (AF_UNIX) ones stay: the reward sandbox's fork server uses one."""
    local_connect = socket.socket.connect

    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError("network access in a test")

    def connect(self: socket.socket, *args: object, **kwargs: object) -> None:
        if self.family != getattr(socket, "AF_UNIX", None):
            refuse()
        return local_connect(self, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.usefixtures("no_network")
def test_reasoning_gym_adapter_offline() -> None:
    task = get_task(RG_SPEC)
    assert task.name == RG_SPEC and task.max_new_tokens > 0
    train = task.sample(12, seed=5)
    assert train == get_task(RG_SPEC).sample(12, seed=5)
    test = task.sample(4, seed=5, split="test")
    assert not {p.prompt for p in train} & {p.prompt for p in test}
    for problem in train + test:
        entry = problem.meta["entry"]
        assert problem.prompt == entry["question"] and problem.demonstration == entry["answer"]
        assert task.score(problem, problem.demonstration) == 1.0
        assert task.score(problem, f"Thinking...\n<answer>{problem.demonstration}</answer>") == 1.0
        assert task.score(problem, "<answer>-1</answer>") == 0.0
    result = score_completions(task, train[:3], ["garbage", "", "\\boxed{}"])  # in the reward sandbox
    assert result.errors == 0 and result.timeouts == 0 and all(0.0 <= r < 1.0 for r in result.rewards)


def test_reasoning_gym_config_params_pass_through() -> None:
    task = get_task("rg:leg_counting:min_animals=2,max_animals=2")
    for problem in task.sample(5, seed=0):
        assert len(problem.meta["entry"]["metadata"]["animals"]) == 2


# ---------------------------------------------------------------------------------------
# jsonl adapter
# ---------------------------------------------------------------------------------------


def test_jsonl_reports_every_malformed_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(
        "\n".join(
            [
                '{"prompt": "ok", "answer": "1"}',  # 1: fine
                '{"prompt": "no closing brace"',  # 2: bad JSON
                '{"prompt": "missing answer"}',  # 3: missing key
                '{"prompt": "p", "answer": 3}',  # 4: wrong type
                "",  # 5: blank lines are skipped
                '["not", "an", "object"]',  # 6: not an object
                '{"prompt": "p", "answer": "1", "demonstration": 5}',  # 7: wrong type
                '{"prompt": "p", "answer": "1", "demonstration": null}',  # 8: fine
            ]
        )
    )
    with pytest.raises(ValueError) as error:
        get_task(f"jsonl:{path}")
    message = str(error.value)
    assert "5 malformed line(s)" in message
    for line, reason in [(2, "bad JSON"), (3, "missing key"), (4, "'answer' must be a string"),
                         (6, "expected a JSON object")]:
        assert f"{path}:{line}: {reason}" in message
    assert f"{path}:7: 'demonstration' must be a string" in message
    for fine in (1, 5, 8):
        assert f"{path}:{fine}:" not in message


def test_jsonl_math_verify_and_exact_match(jsonl_path: Path) -> None:
    task = get_task(str(jsonl_path))
    assert task.name == f"jsonl:{jsonl_path}"
    half = Problem("half?", "\\frac{1}{2}", "\\frac{1}{2}")
    answers = ["0.5", "1/2", "\\frac{2}{4}", "<answer>0.5</answer>", "\\boxed{0.5}"]
    assert [task.score(half, c) for c in answers] == [1.0] * 5
    assert [task.score(half, c) for c in ["0.6", "2", "", "half", "1/2 or 0.6 x"]] == [0.0] * 5
    power = Problem("2^10?", "2^{10}", "1024")
    assert task.score(power, "1024") == 1.0 and task.score(power, "1023") == 0.0
    word = Problem("capital?", "Paris", "Paris")  # a word: exact match, not a product of symbols
    assert [task.score(word, c) for c in ["Paris", " Paris\n", "<answer>Paris</answer>"]] == [1.0] * 3
    assert [task.score(word, c) for c in ["sirap", "paris", "P*a*r*i*s"]] == [0.0] * 3


def test_jsonl_demonstration_defaults_to_answer_and_scores_one(jsonl_path: Path) -> None:
    task = get_task(f"jsonl:{jsonl_path}")
    assert len(task.problems) == 60
    assert all(p.demonstration == p.answer for p in task.problems[:-1])
    assert task.problems[-1].demonstration == "1024"
    for problem in task.problems:
        assert task.score(problem, problem.demonstration) == 1.0, problem


def test_jsonl_sampling(jsonl_path: Path, tmp_path: Path) -> None:
    task = get_task(str(jsonl_path))
    train_pool = [p for p in task.problems if split_of(p.prompt) == "train"]
    test_pool = [p for p in task.problems if split_of(p.prompt) == "test"]
    assert train_pool and test_pool  # the fixture has prompts in both splits
    train = task.sample(len(train_pool), seed=0)
    assert sorted(p.prompt for p in train) == sorted(p.prompt for p in train_pool)  # without replacement
    assert train == task.sample(len(train_pool), seed=0) and train != task.sample(len(train_pool), seed=1)
    big = task.sample(5 * len(test_pool), seed=0, split="test")  # more than the split: with replacement
    assert len(big) == 5 * len(test_pool) and {p.prompt for p in big} <= {p.prompt for p in test_pool}
    single = tmp_path / "one.jsonl"
    prompt = next(f"q{i}" for i in range(1000) if split_of(f"q{i}") == "train")
    single.write_text(json.dumps({"prompt": prompt, "answer": "1"}) + "\n")
    with pytest.raises(ValueError, match="'test' split is empty"):
        get_task(str(single)).sample(1, seed=0, split="test")


def test_jsonl_scoring_off_the_main_thread(jsonl_path: Path) -> None:
    # math-verify's SIGALRM timeout cannot be set off the main thread; scoring must still work
    from concurrent.futures import ThreadPoolExecutor

    task = get_task(str(jsonl_path))
    problem = Problem("half?", "\\frac{1}{2}", "\\frac{1}{2}")
    with ThreadPoolExecutor(1) as pool:
        assert pool.submit(task.score, problem, "0.5").result() == 1.0


def test_countdown_accepts_the_numbers_in_any_order() -> None:
    for a, b, c in permutations((3, 7, 9)):
        assert check_countdown(f"{a}+{b}+{c}", [3, 7, 9], 19)


def test_reversed_addition_writes_the_sum_least_significant_digit_first():
    task = get_task("addition:reverse=true")
    problem = task.sample(1, seed=3)[0]
    a, b = (int(x) for x in problem.prompt.rstrip("=").split("+"))
    assert problem.answer == str(a + b)[::-1] == problem.demonstration
    assert task.score(problem, problem.answer) == 1.0
    assert task.score(problem, str(a + b)) == float(str(a + b) == str(a + b)[::-1])
    assert task.score(task.sample(1, seed=0)[0], "garbage") == 0.0
    with pytest.raises(ValueError, match="reverse"):
        get_task("addition:reverse=3")
