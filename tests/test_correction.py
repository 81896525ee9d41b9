"""Rollout correction (unipo.core.correction) by hand, and in the trainer against an engine whose log-probs are off."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from unipo.config import OptimConfig, RolloutConfig, TrainConfig
from unipo.core.correction import rollout_correction
from unipo.recipes import get_recipe
from unipo.trainer import Trainer

TRAINER = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.1, -4.0]])
SAMPLER = torch.tensor([[-1.5, -1.0, -0.5], [-0.3, -2.6, 0.0]])  # row 1's last token is padding
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])


def test_token_truncate_by_hand():
    # rho = exp(trainer - sampler): [e^0.5, e^-1, 1], [1, e^2.5, (padding)]
    weights, stats = rollout_correction(TRAINER, SAMPLER, MASK, "token_truncate", c_max=2.0)
    expected = torch.tensor([[math.exp(0.5), math.exp(-1.0), 1.0], [1.0, 2.0, 1.0]])
    torch.testing.assert_close(weights, expected)
    assert stats["rollout/is_corrected_frac"] == pytest.approx(1 / 5)
    assert stats["rollout/is_weight_max"] == pytest.approx(2.0)


def test_token_mask_zeroes_ratios_outside_the_bounds():
    weights, stats = rollout_correction(TRAINER, SAMPLER, MASK, "token_mask", c_max=2.0, c_min=0.5)
    expected = torch.tensor([[math.exp(0.5), 0.0, 1.0], [1.0, 0.0, 1.0]])  # e^-1 < 0.5, e^2.5 > 2
    torch.testing.assert_close(weights, expected)
    assert stats["rollout/is_corrected_frac"] == pytest.approx(2 / 5)


def test_sequence_modes_use_the_product_of_the_row():
    # row 0: exp(0.5 - 1 + 0) = e^-0.5; row 1: exp(0 + 2.5) = e^2.5 (the padding token does not count)
    weights, _ = rollout_correction(TRAINER, SAMPLER, MASK, "sequence_truncate", c_max=3.0)
    torch.testing.assert_close(weights, torch.tensor([[math.exp(-0.5)] * 3, [3.0, 3.0, 1.0]]))
    weights, _ = rollout_correction(TRAINER, SAMPLER, MASK, "sequence_mask", c_max=3.0)
    torch.testing.assert_close(weights, torch.tensor([[math.exp(-0.5)] * 3, [0.0, 0.0, 1.0]]))


def test_equal_log_probs_give_weight_one_and_none_is_identity():
    weights, stats = rollout_correction(TRAINER, TRAINER, MASK, "token_truncate")
    assert torch.equal(weights, torch.ones_like(weights)) and stats["rollout/is_corrected_frac"] == 0.0
    weights, stats = rollout_correction(TRAINER, SAMPLER, MASK, "none")
    assert torch.equal(weights, torch.ones_like(weights)) and stats == {}


def test_config_checks_the_correction_settings():
    with pytest.raises(ValueError, match="rollout.correction"):
        RolloutConfig(correction="tis")
    with pytest.raises(ValueError, match="correction_min"):
        RolloutConfig(correction="token_mask", correction_min=3.0, correction_max=2.0)


class _OffEngine:
    """The native sampler, claiming inexact log-probs (as vLLM's are): the trainer must measure them."""

    logp_exact = False

    def __init__(self, engine):
        self.inner = engine

    def __getattr__(self, name):
        return getattr(self.inner, name)


def _trainer(correction: str) -> Trainer:
    config = TrainConfig(recipe=get_recipe("grpo"), task="sort", steps=2, seed=0,
                         rollout=RolloutConfig(prompts_per_step=2, group_size=4, max_new_tokens=8,
                                               correction=correction, correction_max=2.0),
                         optim=OptimConfig(lr=1e-3))
    trainer = Trainer(config, progress=False)
    trainer.engine = _OffEngine(trainer.engine)
    return trainer


def test_the_trainer_measures_the_mismatch_and_the_correction_changes_the_update():
    """The sampler's log-probs shifted by a known amount: the logged mismatch is that amount, and with
    token_truncate the update differs from the uncorrected one (it is the same without a shift)."""
    results = {}
    for correction in ("none", "token_truncate"):
        trainer = _trainer(correction)
        batch, _ = trainer.collector.collect(seed=0, step=0)
        batch.rewards = torch.arange(len(batch), dtype=torch.float32) % 3  # a signal to learn from
        shift = torch.full_like(batch.sampling_logp, 0.25) * batch.completion_mask
        batch = dataclasses.replace(batch, sampling_logp=batch.sampling_logp - shift)
        before = [p.detach().clone() for p in trainer.model.parameters()]
        metrics, finite = trainer.learn(batch)
        assert finite
        assert metrics["rollout/logprob_diff_max"] == pytest.approx(0.25, abs=1e-4)
        assert metrics["rollout/logprob_diff_mean"] == pytest.approx(0.25, abs=1e-4)
        results[correction] = ([p.detach() - b for p, b in zip(trainer.model.parameters(), before)], metrics)
    assert results["token_truncate"][1]["rollout/is_weight_mean"] == pytest.approx(math.exp(0.25), rel=1e-3)
    moved = max(float((a - b).abs().max()) for a, b in zip(results["none"][0], results["token_truncate"][0]))
    assert moved > 1e-6
