"""Preference oracles (unipo.oracles): task verifier, reward model, user code; win-rate estimates by hand."""

from __future__ import annotations

import math

import pytest
import torch

from unipo.config import OptimConfig, RolloutConfig, TrainConfig
from unipo.models import load_model
from unipo.oracles import build_oracle, check_oracle_spec, preference_matrix, win_rates
from unipo.recipes import get_recipe
from unipo.reward_model import RewardModel, RewardModelScorer, save_reward_model
from unipo.tasks.base import Problem, get_task
from unipo.trainer import Trainer


def test_task_oracle_is_one_half_zero_by_the_verifier():
    task = get_task("addition")
    problem = task.sample(1, seed=0, split="train")[0]
    right, wrong = problem.demonstration, "no idea"
    prefer = build_oracle("task", task)
    p = prefer([problem] * 4, [right, wrong, right, wrong], [wrong, right, right, wrong])
    assert p.tolist() == [1.0, 0.0, 0.5, 0.5]


def test_win_rates_by_hand():
    # P(y_i > y_j) for 3 answers: y0 beats both, y1 beats y2 with 0.75
    matrix = torch.tensor([[0.5, 1.0, 1.0], [0.0, 0.5, 0.75], [0.0, 0.25, 0.5]])
    torch.testing.assert_close(win_rates(matrix), torch.tensor([1.0, 0.375, 0.125]))
    calls = []

    def prefer(problems, a, b):
        calls.append(list(zip(a, b)))
        table = {("x", "y"): 1.0, ("x", "z"): 1.0, ("y", "z"): 0.75}
        return torch.tensor([table[(u, v)] for u, v in zip(a, b)])

    built = preference_matrix(prefer, Problem("q", "a", None), ["x", "y", "z"])
    torch.testing.assert_close(built, matrix)
    assert calls == [[("x", "y"), ("x", "z"), ("y", "z")]]  # one batched call over the pairs i < j


def test_user_code_oracle_and_its_errors(tmp_path, monkeypatch):
    (tmp_path / "my_judges.py").write_text(
        "def longer(prompts, a, b):\n    return [0.5 if len(x) == len(y) else float(len(x) > len(y)) "
        "for x, y in zip(a, b)]\n\ndef broken(prompts, a, b):\n    return [2.0] * len(a)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    problem = Problem("q", "a", None)
    prefer = build_oracle("my_judges:longer", get_task("addition"))
    assert prefer([problem] * 2, ["aaa", "a"], ["a", "a"]).tolist() == [1.0, 0.5]
    with pytest.raises(ValueError, match="probabilities in \\[0, 1\\]"):
        build_oracle("my_judges:broken", get_task("addition"))([problem], ["a"], ["b"])
    with pytest.raises(ValueError, match="cannot load it"):
        build_oracle("my_judges:absent", get_task("addition"))
    for bad in ("judge", "rm:", ":f", "task:x", "a b:c"):
        with pytest.raises(ValueError, match="oracle must be"):
            check_oracle_spec(bad)


def test_reward_model_oracle_is_bradley_terry(tmp_path):
    model, tokenizer = load_model("tiny")
    save_reward_model(RewardModel(model, seed=3), tokenizer, tmp_path / "rm")
    prefer = build_oracle(f"rm:{tmp_path / 'rm'}", get_task("sort"))
    scorer = RewardModelScorer(tmp_path / "rm")
    problem = Problem("sort 3 1 2", "1 2 3", None)
    p = prefer([problem, problem], ["1 2 3", "3 2 1"], ["3 2 1", "3 2 1"])
    assert p[0].item() == pytest.approx(scorer.prefer("sort 3 1 2", "1 2 3", "3 2 1"), rel=1e-5)
    assert p[1].item() == pytest.approx(0.5)


def test_online_dpo_trains_with_a_reward_model_oracle(tmp_path):
    model, tokenizer = load_model("tiny")
    save_reward_model(RewardModel(model, seed=3), tokenizer, tmp_path / "rm")
    config = TrainConfig(recipe=get_recipe("online_dpo"), task="sort", model="tiny", steps=2, seed=0,
                         rollout=RolloutConfig(prompts_per_step=2, group_size=3, max_new_tokens=6),
                         optim=OptimConfig(lr=1e-3), eval_problems=2, oracle=f"rm:{tmp_path / 'rm'}")
    history = Trainer(config, progress=False).fit()
    # a random reward model never ties: every prompt gives a pair
    assert [r["rollout/pairs"] for r in history] == [2.0, 2.0]
    assert all(math.isfinite(r["loss"]) for r in history)
