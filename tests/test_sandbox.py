"""The reward sandbox (unipo/sandbox.py) and the linear-time, length-capped parsers in front of it.

Hostile completions (code that writes files, forks, hangs or is 10 MB long) are scored by a task whose
scorer literally `eval`s the completion and by reasoning-gym's spiral_matrix (`eval`) and countdown
(sympy's `parse_expr`): each scores 0, is counted as an error or a timeout, returns within the time
limit and leaves no file behind. Healthy completions still score what they score in-process.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.sandbox_tasks import EvalTask, ProbeTask
from unipo.sandbox import RewardSandbox, SandboxError, _decode, _record, _seccomp_program
from unipo.tasks import TASKS, Problem, Task, extract_answer, get_task, score_completions
from unipo.tasks.base import MAX_SCORED_CHARS, score_in_process
from unipo.tasks.countdown import UnsafeExpression, check_countdown, evaluate_expression
from unipo.tasks.jsonl import load_jsonl

TIMEOUT_S = 1.0
SLACK_S = 2.5  # killing and replacing a worker, on a busy 2-core machine
REPO = Path(__file__).resolve().parents[1]

if EvalTask.name not in TASKS:
    TASKS.register(EvalTask.name)(lambda **_: EvalTask())


@pytest.fixture(scope="module")
def sandbox():
    with RewardSandbox(2, timeout_s=TIMEOUT_S) as box:
        task = EvalTask()
        assert box.score(task, task.sample(2, seed=0), ["[1]", "[2]"]).rewards == [1.0, 0.0]  # started, warm
        yield box


@pytest.fixture(scope="module")
def rg_tasks() -> dict[str, Task]:
    return {spec: get_task(spec) for spec in ("rg:spiral_matrix", "rg:countdown")}


# ---------------------------------------------------------------------------------------
# Hostile completions: each scores 0, is counted, returns in time and writes nothing
# ---------------------------------------------------------------------------------------

PAYLOADS = {
    "os.system": "__import__('os').system('touch pwned') or [1]",
    "open-write": "open('pwned', 'w').write('x')",
    "9**9**9": "9**9**9",
    "fork-bomb": "[__import__('os').fork() for _ in range(64)]",
    "fork-chain": "__import__('os').fork() or __import__('os').fork() or __import__('os').fork()",
    "while-true": "exec('while True: pass')",
    "10MB": " " * 10_000_000 + "__import__('os').system('touch pwned') or [1]",
}
ERROR, TIMEOUT = (1, 0), (0, 1)  # (errors, timeouts)
EXPECTED = {
    "os.system": ERROR, "open-write": ERROR, "9**9**9": TIMEOUT, "fork-bomb": ERROR, "fork-chain": ERROR,
    "while-true": TIMEOUT, "10MB": ERROR,
}
# sympy's parser rejects the comprehension before anything runs (rg's countdown then gives its 0.01)
NOT_REACHED = {("rg:countdown", "fork-bomb")}
CASES = [(task, payload) for task in ("hostile_eval", "rg:spiral_matrix", "rg:countdown") for payload in PAYLOADS
         if (task, payload) not in NOT_REACHED]


@pytest.mark.parametrize(("spec", "payload"), CASES)
def test_hostile_completion_scores_zero_and_is_counted(spec, payload, sandbox, rg_tasks, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    task = rg_tasks.get(spec) or EvalTask()
    problem = task.sample(1, seed=3)[0]
    start = time.monotonic()
    result = score_completions(task, [problem], [PAYLOADS[payload]], sandbox=sandbox)
    elapsed = time.monotonic() - start
    assert result.rewards == [0.0]
    assert (result.errors, result.timeouts) == EXPECTED[payload]
    assert result.truncated == (payload == "10MB")
    assert elapsed < TIMEOUT_S + SLACK_S
    for folder in (tmp_path, REPO, Path.cwd()):
        assert not (folder / "pwned").exists()


def test_a_blocked_call_costs_only_itself(sandbox):
    """The rest of the chunk (healthy answers) is scored by a fresh scorer process."""
    task = EvalTask()
    problems = task.sample(6, seed=0)
    completions = ["[1]", "__import__('os').system('true') or [1]", "[1]", "[2]", "open('x', 'w')", "[1]"]
    result = sandbox.score(task, problems, completions)
    assert result.rewards == [1.0, 0.0, 1.0, 0.0, 0.0, 1.0]
    assert (result.errors, result.timeouts) == (2, 0)


def test_a_hung_worker_is_killed_replaced_and_cleaned_up(sandbox):
    task = EvalTask()
    before = {w.process.pid: w.scratch for w in sandbox._workers}
    restarts = sandbox.restarts
    result = sandbox.score(task, task.sample(4, seed=0), ["[1]", "any(iter(int, 1))", "[1]", "[1]"])
    assert result.rewards == [1.0, 0.0, 1.0, 1.0] and result.timeouts == 1
    assert sandbox.restarts == restarts + 1
    gone = [pid for pid in before if pid not in {w.process.pid for w in sandbox._workers}]
    assert len(gone) == 1
    assert not Path(before[gone[0]]).exists()  # its scratch directory
    assert not _live_members(gone[0])  # nothing of its process group still runs
    assert sandbox.score(task, task.sample(2, seed=1), ["[1]", "[1]"]).rewards == [1.0, 1.0]


def _live_members(pgid: int) -> list[int]:
    """Processes of group `pgid` that are not zombies."""
    live = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            live.append(int(stat.parent.name))
    return live


TAMPER = ("setattr(__import__('tests.sandbox_tasks', fromlist=['EvalTask']).EvalTask, 'score', lambda *a: 1.0)"
          " or [2]")  # from now on every answer is right: no audited event, so nothing blocks it


def test_a_tampering_completion_reaches_at_most_its_own_chunk(sandbox):
    task = EvalTask()
    problems = task.sample(6, seed=0)
    size = math.ceil(len(problems) / sandbox.n_workers)  # calls per chunk (below chunk_size)
    tampered = sandbox.score(task, problems, [TAMPER] + ["[2]"] * 5).rewards
    assert tampered == [0.0] + [1.0] * (size - 1) + [0.0] * (6 - size)  # the rest of its own chunk: yes; others: no
    assert sandbox.score(task, problems, ["[2]"] * 6).rewards == [0.0] * 6  # later calls: no
    with RewardSandbox(1, timeout_s=TIMEOUT_S, fork_per_chunk=False) as reused:  # the faster, weaker mode
        assert reused.score(task, problems[:1], [TAMPER]).rewards == [0.0]
        assert reused.score(task, problems, ["[2]"] * 6).rewards == [1.0] * 6  # every later call
        assert "fork-per-chunk" not in reused.layers.split(",")


def test_forged_result_records_are_rejected(sandbox):
    """A completion that writes a well-formed record (reward 1, a guessed nonce) into every open descriptor
    gets the parent to see a record it did not ask for: the call scores 0 and its worker is replaced."""
    task = EvalTask()
    record = _record(3, 0, 12345, 1.0, "")
    frame = struct.pack("!i", len(record)) + record
    forge = ("exec(\"import os\\nfor f in os.listdir('/proc/self/fd'):\\n try: os.write(int(f), %r)\\n"
             " except OSError: pass\")" % frame)
    result = sandbox.score(task, task.sample(3, seed=0), ["[2]", forge, "[2]"])
    assert result.rewards == [0.0, 0.0, 0.0] and result.errors == 1


def test_malformed_records_are_rejected():
    good = _record(3, 0, 7, 0.5, "text")
    assert _decode(good) == (3, 0, 7, 0.5, "text")
    assert _decode(good[:-1]) is None  # text shorter than its length field
    assert _decode(good + b"x") is None
    assert _decode(b"\x09" + good[1:]) is None  # unknown kind
    assert _decode(b"") is None
    assert _decode(_record(3, 1, 7, 0.0, "\x1b[31mred\n"))[4] == "\\x1b[31mred\\n"  # shown escaped
    # A successful result carries a text-returning task's text as it is, up to 4096 bytes; error text at most 240.
    assert _decode(_record(3, 0, 7, 0.0, "a\n\u00fc"))[4] == "a\n\u00fc"
    assert len(_record(3, 0, 7, 0.0, "x" * 5000)) == len(good) - 4 + 4096
    assert len(_record(3, 1, 7, 0.0, "x" * 5000)) == len(good) - 4 + 240
    assert _decode(struct.pack("<BBQdH", 3, 0, 7, 0.0, 4097) + b"x" * 4097) is None
    assert _decode(struct.pack("<BBQdH", 3, 1, 7, 0.0, 241) + b"x" * 241) is None


# ---------------------------------------------------------------------------------------
# Healthy scoring and routing
# ---------------------------------------------------------------------------------------


def test_healthy_rg_tasks_score_as_in_process(sandbox, rg_tasks):
    for task in rg_tasks.values():
        problems = task.sample(8, seed=1)
        completions = [p.answer for p in problems] + [f"<answer>{p.answer}</answer>" for p in problems]
        completions += ["garbage", "[1, 2]"]
        problems = problems * 2 + problems[:2]
        result = sandbox.score(task, problems, completions)
        assert result.rewards[:16] == [1.0] * 16
        assert result == score_in_process(task, problems, completions)


def test_jsonl_math_is_scored_in_the_sandbox(sandbox, tmp_path):
    path = tmp_path / "math.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"q{i}", "answer": a}) + "\n" for i, a in enumerate(["\\frac{1}{2}",
                                                                                                        "2^{10}"])))
    task = get_task(str(path))
    assert not task.scorer_is_safe
    half, power = task.problems
    start = time.monotonic()
    result = sandbox.score(task, [half, power, half, power], ["\\boxed{0.5}", "1024", "\\boxed{9^{9^{9}}}", "1023"])
    assert result.rewards == [1.0, 1.0, 0.0, 0.0] and (result.errors, result.timeouts) == (0, 1)
    assert time.monotonic() - start < TIMEOUT_S + SLACK_S + 2.0  # + building the task in a fresh worker


def test_score_completions_routes_by_scorer_is_safe(sandbox):
    class SafeProbe(ProbeTask):
        scorer_is_safe = True

    here = [Problem("p", "pid", "pid", {"pid": os.getpid()})]
    assert score_completions(SafeProbe(), here, ["pid"]).rewards == [1.0]  # scored in this process
    assert score_completions(ProbeTask(), here, ["pid"], sandbox=sandbox).rewards == [0.0]  # elsewhere
    for name in ("addition", "multiplication", "sort", "countdown"):
        assert get_task(name).scorer_is_safe
    assert not get_task("rg:leg_counting").scorer_is_safe and not Task.scorer_is_safe


def test_scorer_process_is_confined(sandbox):
    checks = ["fds", "stdio", "cwd", "session", "nofile", "nproc", "fsize", "core", "as", "cpu"]
    task = ProbeTask()
    result = sandbox.score(task, task.sample(len(checks), seed=0), checks)
    assert dict(zip(checks, result.rewards)) == dict.fromkeys(checks, 1.0)
    for layer in ("session", "fds", "rlimits", "fork-per-chunk", "audit"):
        assert layer in sandbox.layers.split(",")


def test_an_unpicklable_task_is_refused_with_a_clear_error(sandbox):
    task = EvalTask()
    task.scorer_state = lambda: None  # a lambda does not pickle
    with pytest.raises(SandboxError, match="cannot be sent to the reward sandbox.*scorer_is_safe"):
        sandbox.score(task, task.sample(1, seed=0), ["[1]"])


@pytest.mark.skipif(not sys.platform.startswith("linux") or _seccomp_program(platform.machine(), 1) is None,
                    reason="the seccomp filter is built for Linux x86-64 and aarch64")
def test_seccomp_filter_refuses_processes_writes_sockets_and_signals(tmp_path):
    """The kernel layer alone (no audit hook): what a process can still do once the filter is loaded."""
    probe = f"""
import json, os, socket, threading
from unipo.sandbox import _install_seccomp
assert _install_seccomp()
def refused(action):
    try:
        action()
    except PermissionError:
        return True
    return False
out = {{
    "fork": refused(os.fork),
    "write": refused(lambda: os.open({str(tmp_path / "w")!r}, os.O_WRONLY | os.O_CREAT)),
    "mkdir": refused(lambda: os.mkdir({str(tmp_path / "d")!r})),
    "socket": refused(lambda: socket.socket()),
    "kill": refused(lambda: os.kill(os.getppid(), 0)),
    "read": not refused(lambda: open({str(REPO / "pyproject.toml")!r}).read()),
    "thread": not refused(lambda: threading.Thread(target=int).start()),
}}
print(json.dumps(out))
"""
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == dict.fromkeys(["fork", "write", "mkdir", "socket", "kill", "read", "thread"],
                                                    True)
    assert not (tmp_path / "w").exists() and not (tmp_path / "d").exists()


def test_collector_reports_reward_timeouts(monkeypatch):
    import unipo.collect
    from unipo.config import OptimConfig, RolloutConfig, TrainConfig
    from unipo.recipes import get_recipe
    from unipo.tasks.base import ScoreResult
    from unipo.trainer import Trainer

    def two_timeouts_per_call(task, problems, completions, **_):
        return ScoreResult([0.0] * len(problems), errors=1, timeouts=2)

    monkeypatch.setattr(unipo.collect, "score_completions", two_timeouts_per_call)
    config = TrainConfig(recipe=get_recipe("grpo"), task=EvalTask.name, model="tiny", steps=1, seed=0,
                         rollout=RolloutConfig(prompts_per_step=2, group_size=2), optim=OptimConfig(lr=1e-3),
                         eval_problems=2)
    batch, stats = Trainer(config, progress=False).collector.collect(seed=0, step=1)
    assert stats["rollout/reward_timeouts"] == 2.0 and batch.reward_timeouts == 2
    assert batch.reward_errors == 1


# ---------------------------------------------------------------------------------------
# Parsers: linear time, capped input, only the documented errors on hostile input
# ---------------------------------------------------------------------------------------


def reference_extract_answer(text: str) -> str:
    """extract_answer as it was (a lazy regex and a rescan from every `\\boxed{`): the semantics to keep."""
    best_start, best = -1, None
    for match in re.finditer(r"<answer>(.*?)</answer>", text, re.DOTALL):
        best_start, best = match.start(), match.group(1)
    start, boxed_start, boxed = text.rfind("\\boxed{"), -1, None
    while start != -1:
        depth, i = 1, start + len("\\boxed{")
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            boxed_start, boxed = start, text[start + len("\\boxed{"): i - 1]
            break
        start = text.rfind("\\boxed{", 0, start)
    if boxed is not None and boxed_start > best_start:
        best = boxed
    return (text if best is None else best).strip()


PIECES = ["<answer>", "</answer>", "\\boxed{", "{", "}", "\\boxed", "<answer", "x", "1", " ", "\n", "\\"]


@given(st.lists(st.sampled_from(PIECES), max_size=60))
def test_extract_answer_matches_the_quadratic_reference(pieces):
    text = "".join(pieces)
    assert extract_answer(text) == reference_extract_answer(text)


@given(st.text(max_size=300))
def test_extract_answer_never_raises(text):
    assert isinstance(extract_answer(text), str)


@pytest.mark.parametrize("text", ["\\boxed{" * 4000, "<answer>" * 4000, "\\boxed{" * 4000 + "}" * 3999,
                                  "{" * 28000, "<answer>\\boxed{" * 2000 + "</answer>"])
def test_extract_answer_is_linear_on_adversarial_text(text):
    start = time.perf_counter()
    extract_answer(text)
    extract_answer(text * 4)  # 4x the length: still far from the quadratic 16x
    assert time.perf_counter() - start < 0.1


@given(st.text(alphabet="0123456789+-*/()= .x_e\\boxed{}<>", max_size=400), st.lists(st.integers(0, 99), max_size=5),
       st.integers(-5, 500))
def test_countdown_verifier_raises_nothing(text, numbers, target):
    assert check_countdown(text, numbers, target) in (True, False)
    try:
        evaluate_expression(text)
    except (UnsafeExpression, ZeroDivisionError):
        pass


JSON_PIECES = ['{"prompt": ', '"answer": ', '"demonstration": ', '"p"', '"\\ud800"', "null", "1" * 5000, "[" * 3000,
               "]", "}", ", ", ":", '"', "\\", "\n", "\r", "\xff", "\x00", "é", " "]


@given(st.lists(st.one_of(st.sampled_from(JSON_PIECES), st.text(max_size=5)), max_size=20), st.binary(max_size=30))
def test_jsonl_loader_raises_only_value_error(tmp_path_factory, pieces, raw):
    path = tmp_path_factory.mktemp("jsonl") / "hostile.jsonl"
    path.write_bytes("".join(pieces).encode("utf-8", "surrogatepass") + raw)
    try:
        problems = load_jsonl(path)
    except ValueError as error:
        assert "malformed line(s)" in str(error)
    else:
        for problem in problems:
            problem.prompt.encode("utf-8")  # every string is valid Unicode


def test_long_completions_are_scored_on_their_tail():
    task = get_task("addition")
    problem = Problem("47+38=", "85", "85")
    long = "x" * (3 * MAX_SCORED_CHARS) + "<answer>85</answer>"
    result = score_completions(task, [problem, problem], [long, "85"])
    assert result.rewards == [1.0, 1.0] and result.truncated == 1
    cut = "<answer>85</answer>" + "x" * MAX_SCORED_CHARS  # the answer is outside the scored tail
    assert score_completions(task, [problem], [cut]).rewards == [0.0]
