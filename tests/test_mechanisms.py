"""Recipes whose identity is a clip, a ratio or a trust region act only off-policy: from the second optimizer
step on one generation batch. Each test runs the trainer's own update on one fixed batch of the tiny model.

With the mini-batch split (>= 2 updates per batch) the recipe clips some tokens and its update differs from
GRPO's under the same schedule; without it (`mini_batches=1, epochs=1`) pi_theta == pi_old, nothing clips,
and the same assertions fail (checked in `test_without_the_split_nothing_clips`).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import tests.test_trainer  # noqa: F401  (registers the "coin" task)
from tests.test_trainer import params_snapshot
from unipo.config import OptimConfig, RolloutConfig, TrainConfig
from unipo.models import build_tiny_model
from unipo.recipes import get_recipe
from unipo.trainer import Trainer

# recipe -> overrides that make it the mechanism under test (dual_clip has no recipe of its own)
MECHANISMS = {
    "grpo": {},  # ppo_clip
    "dapo": {"dynamic_sampling": False},  # clip_higher (the batch is fixed: no refill)
    "dual_clip": {"loss": "dual_clip", "loss_params": {"eps_low": 0.2, "eps_high": 0.2, "clip_ratio_c": 1.05}},
    "gspo": {},
    "gspo_token": {},
    "cispo": {},
    "dhpo": {},
    "cpgd": {},
    "simple_po": {},
    "luffy_paper": {},  # LUFFY's clipped rollouts (the paper); `luffy` (the script) is unclipped, see below
    "rl_plus": {"loss_params": {"explore_gamma": 0.5, "clip_on_policy": True}},
}


def _recipe(name: str, **overrides):
    base = "grpo" if name == "dual_clip" else name
    return dataclasses.replace(get_recipe(base), **{**MECHANISMS[name], **overrides})


def _trainer(recipe, *, top_p: float = 1.0, micro_batch_size: int = 8) -> Trainer:
    torch.manual_seed(0)
    model, tokenizer = build_tiny_model("tiny", alphabet="0123456789?")
    config = TrainConfig(recipe=recipe, task="coin", steps=10, seed=0,
                         rollout=RolloutConfig(prompts_per_step=4, group_size=4, top_p=top_p),
                         optim=OptimConfig(lr=3e-3, micro_batch_size=micro_batch_size, grad_clip=1e9),
                         eval_problems=4)
    return Trainer(config, model=model, tokenizer=tokenizer, progress=False)


def _update(recipe, batch=None):
    """(metrics, weights after the update, batch) of one `learn` on the fixed step-0 batch."""
    trainer = _trainer(recipe)
    if batch is None:
        batch, _ = trainer.collector.collect(seed=0, step=0)
    metrics, finite = trainer.learn(batch)
    assert finite
    return metrics, params_snapshot(trainer.model), batch


def _max_diff(a, b) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def _schedule(recipe, mini_batches: int, epochs: int):
    return dataclasses.replace(recipe, mini_batches=mini_batches, epochs=epochs)


def _assert_mechanism_acts(name: str, mini_batches: int, epochs: int) -> None:
    """The recipe clips some tokens and its update differs from GRPO's under the same schedule and batch."""
    recipe = _schedule(_recipe(name), mini_batches=mini_batches, epochs=epochs)
    metrics, weights, batch = _update(recipe)
    assert metrics["actor/updates"] + metrics["actor/skipped_updates"] == mini_batches * epochs
    assert metrics["clip_frac"] > 0, metrics
    assert metrics["actor/ratio_max"] > 1.0
    # GRPO under the same schedule on the same batch (for GRPO itself: its unclipped surrogate)
    reference = _schedule(get_recipe("grpo"), mini_batches=mini_batches, epochs=epochs)
    if name == "grpo":
        reference = dataclasses.replace(reference, loss_params={"eps_low": 0.999, "eps_high": 1e6})
    _, reference_weights, _ = _update(reference, batch)
    assert _max_diff(weights, reference_weights) > 1e-6


@pytest.mark.parametrize("name", sorted(MECHANISMS))
def test_off_policy_updates_clip_and_differ_from_grpo(name):
    _assert_mechanism_acts(name, mini_batches=4, epochs=2)


@pytest.mark.parametrize("name", sorted(MECHANISMS))
def test_without_the_split_the_mechanism_test_fails(name):
    """One update per batch: the ratio is exactly 1, nothing clips, and the test above fails."""
    metrics, _, _ = _update(_schedule(_recipe(name), mini_batches=1, epochs=1))
    assert metrics["clip_frac"] == 0.0 and metrics["actor/ratio_max"] <= 1.0
    with pytest.raises(AssertionError):
        _assert_mechanism_acts(name, mini_batches=1, epochs=1)


def test_gspo_and_grpo_diverge_within_ten_steps_on_the_same_seed():
    runs = {}
    for name in ("gspo", "grpo"):
        trainer = _trainer(get_recipe(name))
        clip = [trainer.train_step().metrics["clip_frac"] for _ in range(10)]
        runs[name] = (clip, params_snapshot(trainer.model))
    assert max(runs["gspo"][0]) > 0
    assert _max_diff(runs["gspo"][1], runs["grpo"][1]) > 1e-5


def test_mini_batches_split_the_batch_into_shuffled_parts_covering_every_row_once():
    from unipo.update import mini_batch_rows

    parts = mini_batch_rows(10, 3, torch.Generator().manual_seed(0))
    assert [len(p) for p in parts] == [4, 3, 3]
    assert sorted(torch.cat(parts).tolist()) == list(range(10))
    assert all(torch.equal(p, p.sort().values) for p in parts)  # a group's rows stay adjacent
    assert not torch.equal(torch.cat(parts), torch.arange(10))  # shuffled
    assert [len(p) for p in mini_batch_rows(2, 5, None)] == [1, 1]  # never an empty mini-batch


def test_sampler_log_probs_equal_the_behaviour_pass():
    """pi_old from the sampler (exact: full softmax, fp32) agrees with a no-grad forward over the batch."""
    trainer = _trainer(_schedule(get_recipe("grpo"), mini_batches=2, epochs=1))
    batch, _ = trainer.collector.collect(seed=0, step=0)
    rows = torch.arange(len(batch))
    trainer.model.train()
    passed = trainer._behaviour_pass(batch, rows, need_entropy=False, need_values=False)["logp"]
    torch.testing.assert_close(batch.sampling_logp, passed, atol=2e-5, rtol=0)
    _, old, stats = trainer._provider(batch)
    assert stats["rollout/old_logp_from_sampler"] == 1.0
    assert torch.equal(old, batch.sampling_logp)


def test_top_p_sampling_takes_pi_old_from_a_behaviour_pass():
    recipe = _schedule(get_recipe("grpo"), mini_batches=2, epochs=1)
    trainer = _trainer(recipe, top_p=0.9)
    batch, _ = trainer.collector.collect(seed=0, step=0)
    _, old, stats = trainer._provider(batch)
    assert stats["rollout/old_logp_from_sampler"] == 0.0
    expected = trainer._behaviour_pass(batch, torch.arange(len(batch)), need_entropy=False,
                                       need_values=False)["logp"]
    torch.testing.assert_close(old, expected)


def test_expert_rows_take_pi_old_from_the_behaviour_pass():
    trainer = _trainer(_schedule(get_recipe("luffy"), mini_batches=2, epochs=1))
    batch, _ = trainer.collector.collect(seed=0, step=0)
    _, old, _ = trainer._provider(batch)
    expert = batch.off_policy
    assert expert.any() and torch.all(batch.sampling_logp[expert] == 0)
    passed = trainer._behaviour_pass(batch, expert.nonzero().squeeze(1), need_entropy=False,
                                     need_values=False)["logp"]
    torch.testing.assert_close(old[expert], passed)
    assert bool((old[expert] < 0).any())  # real log-probs, not the sampler's zeros


def test_accumulation_inside_a_mini_batch_is_exact():
    """Micro-batches of 2 rows inside mini-batches of 8 give the update of whole mini-batches."""
    recipe = _schedule(get_recipe("dapo"), mini_batches=2, epochs=2)
    recipe = dataclasses.replace(recipe, dynamic_sampling=False)
    results = []
    batch = None
    for micro in (16, 2):
        trainer = _trainer(recipe, micro_batch_size=micro)
        # plain SGD: Adam divides by sqrt(v), which turns rounding noise in near-zero gradients into lr-sized steps
        trainer.update.optimizer = torch.optim.SGD(trainer.model.parameters(), lr=0.1)
        if batch is None:
            batch, _ = trainer.collector.collect(seed=0, step=0)
        metrics, _ = trainer.learn(batch)
        results.append((metrics, params_snapshot(trainer.model)))
    assert _max_diff(results[0][1], results[1][1]) < 1e-6
    assert abs(results[0][0]["loss"] - results[1][0]["loss"]) < 1e-6


def test_a_step_without_signal_leaves_the_weights_alone():
    """All groups constant -> every advantage is exactly 0 -> zero gradient -> no AdamW step (whose momentum
    and decay would otherwise move every weight)."""
    trainer = _trainer(get_recipe("grpo"))
    trainer.train_step()  # AdamW now has momentum
    batch, _ = trainer.collector.collect(seed=0, step=1)
    batch.rewards = torch.zeros_like(batch.rewards)
    before = params_snapshot(trainer.model)
    metrics, finite = trainer.learn(batch)
    assert finite and metrics["actor/updates"] == 0 and metrics["actor/skipped_updates"] == 1
    assert _max_diff(before, params_snapshot(trainer.model)) == 0.0


@pytest.mark.parametrize("name", ["luffy", "rl_plus"])
def test_released_hybrid_scripts_run_off_policy_without_a_clip(name):
    """LUFFY's and RL-PLUS's scripts remove the rollouts' clip: from the second update the ratio moves, nothing
    is clipped, and the update still differs from the clipped (paper) form."""
    recipe = _schedule(get_recipe(name), mini_batches=4, epochs=2)
    metrics, weights, batch = _update(recipe)
    assert metrics["clip_frac"] == 0.0 and metrics["actor/ratio_max"] > 1.2
    clipped = dataclasses.replace(recipe, loss_params={**recipe.loss_params, "clip_on_policy": True})
    clipped_metrics, clipped_weights, _ = _update(clipped, batch)
    assert clipped_metrics["clip_frac"] > 0
    assert _max_diff(weights, clipped_weights) > 1e-6
