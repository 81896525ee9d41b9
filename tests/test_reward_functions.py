"""User reward functions (`rollout.reward=module:function@weight,...`, unipo.rewards): errors counted per function
and scored 0, None drops the row, weights add to the verifier's reward, the sandbox runs them, the CLI checks them."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
import yaml
from typer.testing import CliRunner

from unipo.cli import app
from unipo.collect import RolloutCollector
from unipo.config import RolloutConfig, TrainConfig, apply_overrides
from unipo.models import build_tiny_model
from unipo.recipes import get_recipe
from unipo.rewards import RewardFunctions, RewardSpec, as_reward, parse_reward_specs
from unipo.tasks.base import Problem, get_task

runner = CliRunner()
SMALL = ["rollout.prompts_per_step=2", "rollout.group_size=2", "eval_problems=4"]

MODULE = '''
import math
import os


def boom(prompt, completion, **fields):
    raise RuntimeError("bug in the reward")


def nan(prompt, completion, **fields):
    return math.nan


def text(prompt, completion, **fields):
    return "1.0"


def negative(prompt, completion, **fields):
    return -2.5


def big(prompt, completion, answer, demonstration, **fields):
    return 10.0 if completion == answer else 3


def skip_b(prompt, completion, **fields):
    return None if completion.startswith("b") else 1.0


def fields_seen(prompt, completion, answer, demonstration, **meta):
    return float(prompt == "P" and answer == "a" and demonstration == "D" and meta == {"level": 2})


def writes(prompt, completion, **fields):
    open(os.path.join("/tmp", "unipo-reward-escape"), "w").write("x")
    return 1.0


def length_penalty(prompt, completion, **fields):
    return -0.01 * len(completion)


def odd_skipped(prompt, completion, **fields):
    return None if len(completion) % 2 else 0.0


def hangs(prompt, completion, **fields):
    if completion == "hang":
        while True:
            pass
    return 0.5
'''


@pytest.fixture
def module(tmp_path, monkeypatch):
    """A reward module `myrewards` in a temp folder on sys.path (and on PYTHONPATH for subprocesses)."""
    name = f"myrewards_{abs(hash(str(tmp_path))) % 10**8}"  # fresh per test: no stale import
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    return name


def test_spec_syntax_and_config():
    assert RewardSpec.parse("m.sub:fn@-0.5") == RewardSpec("m.sub", "fn", -0.5)
    assert RewardSpec.parse("path/to/r.py:fn") == RewardSpec("path/to/r.py", "fn", 1.0)
    assert parse_reward_specs("a:f@0.1, b:g") == ("a:f@0.1", "b:g") == parse_reward_specs(["a:f@0.1", "b:g"])
    assert parse_reward_specs("") == () == parse_reward_specs(None)
    config = apply_overrides(TrainConfig(recipe=get_recipe("grpo")), {"rollout.reward": "a:f@0.1,b:g"})
    assert config.rollout.reward == ("a:f@0.1", "b:g")
    for bad, message in (("a", "is not MODULE:FUNCTION"), ("a:f@x", "finite number"), ("a:f@inf", "finite"),
                         ("a:f,a:f@2", "twice"), ("a:1f", "is not MODULE")):
        with pytest.raises(ValueError, match=message):
            RolloutConfig(reward=bad)


def test_values_a_function_may_return():
    assert as_reward(-3) == -3.0 and as_reward(True) == 1.0 and math.isnan(as_reward(None))
    for bad in ("1.0", math.nan, math.inf, [1.0], torch.tensor(1.0)):
        with pytest.raises((TypeError, ValueError)):
            as_reward(bad)


def test_errors_are_counted_per_function_and_weights_combine(module):
    names = ["boom", "nan", "text", "negative@0.5", "big@0.1", "skip_b@2", "fields_seen", "writes"]
    functions = RewardFunctions([f"{module}:{n}" for n in names])
    problems = [Problem("P", "a", "D", {"level": 2}), Problem("Q", "x", None)]
    result = functions.score(problems, ["a", "b"])  # row 0: the answer; row 1: skipped by skip_b
    # raised, NaN, a string and a forbidden write (the sandbox refuses it) are errors: 0 for the row, counted
    assert result.errors == {"boom": 2, "nan": 2, "text": 2, "negative": 0, "big": 0, "skip_b": 0, "fields_seen": 0,
                             "writes": 2}
    assert not os.path.exists("/tmp/unipo-reward-escape")
    assert result.skipped == [False, True]
    # row 0: 0.5 * -2.5 + 0.1 * 10 + 2 * 1 + 1 * 1 (every row field arrived)
    assert result.total[0] == pytest.approx(-1.25 + 1.0 + 2.0 + 1.0)
    assert result.sums["big"] == 13.0 and result.counts["big"] == 2 and result.counts["skip_b"] == 1


def test_a_function_that_hangs_times_out_in_the_sandbox(module):
    from unipo.sandbox import RewardSandbox

    with RewardSandbox(1, timeout_s=0.5) as sandbox:
        functions = RewardFunctions([f"{module}:hangs@2"], sandbox=sandbox)
        result = functions.score([Problem("P", "a", None)] * 3, ["ok", "hang", "ok"])
    assert result.timeouts == 1 and result.errors == {"hangs": 1}
    assert result.total == [1.0, 0.0, 1.0] and result.skipped == [False] * 3


def test_the_collector_adds_the_functions_to_the_verifier(module):
    model, tokenizer = build_tiny_model("tiny", seed=0)
    task = get_task("sort")
    problems = task.sample(2, seed=0)

    def collector(recipe: str, reward: str) -> RolloutCollector:
        return RolloutCollector(model, tokenizer, task, get_recipe(recipe), RolloutConfig(
            prompts_per_step=4, group_size=4, reward=reward), max_new_tokens=task.max_new_tokens,
            device=torch.device("cpu"), generator=torch.Generator().manual_seed(0))

    texts = [problems[0].answer, "b wrong"]
    rewards, correct, errors = collector("grpo", f"{module}:negative@0.5,{module}:boom")._score(problems, texts)
    assert rewards.tolist() == [1.0 - 1.25, 0.0 - 1.25] and correct.tolist() == [True, False] and errors == 0
    # on the signed scale (DAPO) the verifier's term is 2s - 1; `correct` is still the verifier's full marks
    signed = collector("dapo", f"{module}:big")
    rewards, correct, _ = signed._score(problems, texts)
    assert rewards.tolist() == [1.0 + 10.0, -1.0 + 3.0] and correct.tolist() == [True, False]
    rewards, _, _ = collector("grpo", f"{module}:skip_b")._score(problems, texts)
    assert rewards[0] == 2.0 and math.isnan(rewards[1])  # NaN marks the row `_sample` drops

    # a whole step: rows whose completion has odd length were skipped, i.e. are not in the batch
    skipping = collector("grpo", f"{module}:odd_skipped,{module}:boom")
    batch, stats = skipping.collect(seed=0, step=1)
    assert all(len(t) % 2 == 0 for t in batch.texts) and torch.isfinite(batch.rewards).all()
    assert stats["rollout/reward_skipped"] == 16 - len(batch) > 0
    assert stats["rollout/reward_errors/boom"] == 16 and stats["rollout/reward_errors/odd_skipped"] == 0
    with pytest.raises(ValueError, match="preference pairs"):
        collector("online_dpo", f"{module}:big")


def test_preflight_names_a_missing_module_or_function(module, tmp_path):
    for spec, message in ((f"{module}:absent", f"module '{module}' has no 'absent'"),
                          ("no_such_module_xyz:f", "cannot import 'no_such_module_xyz' .*No module named")):
        result = runner.invoke(app, ["train", "--task", "sort", "--steps", "1", "--out", str(tmp_path / "r"),
                                     f"rollout.reward={spec}"])
        assert result.exit_code == 2 and not (tmp_path / "r").exists()
        line = result.output.strip()
        assert line.startswith("error: rollout.reward") and "\n" not in line
        assert re.search(message, line), line


def test_train_three_steps_with_reward_functions_via_the_cli(module, tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "unipo", "train", "--task", "sort", "--steps", "3", "--out", str(out),
               f"rollout.reward={module}:length_penalty@0.5,{module}:boom", *SMALL]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path.parent)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert r["rollout/reward_errors/boom"] == 4 and r["rollout/reward_errors/length_penalty"] == 0
        assert r["rollout/reward_fn/length_penalty"] < 0 and r["rollout/reward_skipped"] == 0


def test_a_parquet_task_with_a_reward_function_via_the_cli_and_a_config_file(module, tmp_path):
    datasets = pytest.importorskip("datasets")
    path = tmp_path / "sort.parquet"
    rows = [{"question": f"sort {i % 7} {i % 5}:", "answer": " ".join(sorted([str(i % 7), str(i % 5)]))}
            for i in range(40)]
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    result = runner.invoke(app, ["train", "--task", f"hf:{path}:prompt=question,answer=answer", "--steps", "3",
                                 "--out", str(tmp_path / "run"), f"rollout.reward={module}:big@0.1", *SMALL,
                                 "rollout.max_new_tokens=8"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["rollout/reward_errors/big"] for r in rows] == [0, 0, 0]
    assert all(r["rollout/reward_fn/big"] >= 3 for r in rows)  # 3 or 10 per row: the function ran on each
    # the run's config.yaml (the reward functions included) starts another run
    config = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert config["rollout"]["reward"] == [f"{module}:big@0.1"]
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({**config, "out": str(tmp_path / "again")}))
    again = runner.invoke(app, ["train", "--config", str(tmp_path / "run.yaml")])
    assert again.exit_code == 0, again.output
    rows = [json.loads(line) for line in (tmp_path / "again" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(r["rollout/reward_fn/big"] >= 3 for r in rows)
