"""`unipo rm` trains a reward model on pairs; `rollout.reward=rm:FOLDER@W` adds W x its score to the verifier's."""

from __future__ import annotations

import json
import random

import pytest
from typer.testing import CliRunner

from unipo.cli import app
from unipo.reward_model import RewardModelScorer
from unipo.rewards import RewardFunctions, RewardSpec, check_reward_functions, parse_reward_specs
from unipo.tasks.base import Problem

runner = CliRunner()


@pytest.fixture(scope="module")
def rm_folder(tmp_path_factory):
    """A reward model trained by the command on sorted-vs-unsorted pairs."""
    root = tmp_path_factory.mktemp("rm")
    rng = random.Random(0)
    with open(root / "pairs.jsonl", "w") as fh:
        for _ in range(60):
            xs = [rng.randint(0, 99) for _ in range(4)]
            good, bad = sorted(xs), sorted(xs, reverse=True)
            if good != bad:
                fh.write(json.dumps({"prompt": f"Sort: {xs}", "chosen": str(good), "rejected": str(bad)}) + "\n")
    result = runner.invoke(app, ["rm", "--data", str(root / "pairs.jsonl"), "--out", str(root / "rm"), "--steps", "5",
                                 "--lr", "1e-3"])
    assert result.exit_code == 0, result.output
    assert "pairwise accuracy" in result.output and "rollout.reward=rm:" in result.output
    return root / "rm"


def test_an_rm_entry_parses_with_its_weight_and_is_checked_before_loading(rm_folder, tmp_path):
    spec = RewardSpec.parse(f"rm:{rm_folder}@0.5")
    assert spec.is_reward_model and spec.function == str(rm_folder) and spec.weight == 0.5
    assert parse_reward_specs(f"rm:{rm_folder}@0.5") == (f"rm:{rm_folder}@0.5",)
    check_reward_functions([f"rm:{rm_folder}"])
    with pytest.raises(ValueError, match="not a reward model folder"):
        check_reward_functions([f"rm:{tmp_path}"])
    with pytest.raises(ValueError, match="finite number"):
        RewardSpec.parse(f"rm:{rm_folder}@nan")


def test_the_reward_is_the_weighted_model_score(rm_folder):
    problems = [Problem(prompt="Sort: [3, 1, 2]", answer="[1, 2, 3]", demonstration=None),
                Problem(prompt="Sort: [9, 4]", answer="[4, 9]", demonstration=None)]
    completions = ["[1, 2, 3]", "[9, 4]"]
    scores = RewardModelScorer(rm_folder)([p.prompt for p in problems], completions)
    out = RewardFunctions([f"rm:{rm_folder}@0.5"]).score(problems, completions)
    assert out.total == pytest.approx([0.5 * s for s in scores], rel=1e-6)
    assert out.skipped == [False, False] and out.errors == {"rm": 0}


def test_the_command_refuses_a_held_out_fraction_outside_zero_one(rm_folder, tmp_path):
    result = runner.invoke(app, ["rm", "--data", "x.jsonl", "--out", str(tmp_path / "o"), "--held-out", "1.5"])
    assert result.exit_code == 2 and "--held-out" in result.output
