"""EPO's entropy regulariser (unipo.core.entropy) and the entropy slot: hand-computed terms that match the authors'
code on the same input, the phase weights, gradients against finite differences, exact gradient accumulation, the
running per-turn history and its checkpoint, `bonus` equal bit for bit to the loss's old entropy term, and a short
EPO run on guess_number that resumes to the same state."""

from __future__ import annotations

import dataclasses
import math
import shutil

import pytest
import torch

import tests.test_trainer  # noqa: F401  (registers the "coin" test task)
from tests.test_runs import assert_same, outcome
from unipo.config import RolloutConfig, TrainConfig
from unipo.core.entropy import (
    ENTROPY_REGULARISERS,
    compute_entropy_term,
    history_per_row,
    phase_weight,
    turn_entropy_means,
)
from unipo.core.losses import AGGREGATIONS, aggregate, aggregation_denominator
from unipo.recipes import RECIPES, get_recipe
from unipo.slots import _synthetic_inputs, slot_choices
from unipo.trainer import resume_run, start_run
from unipo.update import EntropyHistory, PolicyUpdate

F64 = torch.float64
NAN = math.nan

# Rows 0 (turn 0), 1 and 2 (turn 1); row 1 has a padding token (entropy 9), row 2 three. The authors'
# generate_entropy_penalty + agg_loss (WujiangXu/EPO @5b6fa98e), run on this input outside the repo, gave
# agg(H) = 0.71875 and agg(P) = 0.0625 (token-mean), 0.633333.. and 0.0472222.. (seq-mean-token-mean).
H = torch.tensor([[1.0, 0.5, 1.5, 0.8], [0.5, 0.7, 0.3, 9.0], [0.45, 0.0, 0.0, 0.0]], dtype=F64)
MASK = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [1, 0, 0, 0]], dtype=F64)
TURN = torch.tensor([0, 1, 1])
HISTORY = torch.tensor([1.0, 0.5, 0.5], dtype=F64)  # H-bar of turn 0 is 1.0, of turn 1 0.5
NO_GATE = {"min_turn": 0}


def epo(entropy=H, mask=MASK, aggregation="token_mean", *, history=HISTORY, turn=TURN, step=0, total_steps=10,
        **params):
    return compute_entropy_term("epo", entropy, mask, aggregation, entropy_history=history, turn_index=turn,
                                step=step, total_steps=total_steps, **params)


# -- the term, by hand ---------------------------------------------------------------------------------------

def test_epo_term_inside_above_and_below_the_band_matches_the_authors_code():
    # band (0.8, 1.2) for turn 0, (0.4, 0.6) for turn 1, open: row 0's 0.8 is on the edge, so outside.
    # P = 0.1 on (0,1) below, (0,2) above, (0,3) edge, (1,1) above, (1,2) below; 0 on (0,0), (1,0), (2,0) inside.
    term, metrics = epo(**NO_GATE)
    assert term.item() == pytest.approx(5.75 / 8 - 0.5 / 8, abs=1e-12)  # 0.71875 - 0.0625
    assert metrics["entropy_smooth_penalty"].item() == pytest.approx(0.0625, abs=1e-12)
    assert metrics["entropy_out_of_band_frac"].item() == pytest.approx(5 / 8)  # theirs: 3/12 inside, with padding
    assert metrics["entropy_phase_weight"].item() == 1.0
    term, _ = epo(aggregation="seq_mean_token_mean", **NO_GATE)
    rows_h, rows_p = (3.8 / 4 + 1.5 / 3 + 0.45) / 3, (0.3 / 4 + 0.2 / 3) / 3
    assert term.item() == pytest.approx(rows_h - rows_p, abs=1e-12)  # 0.633333 - 0.047222
    # the README's ALFWorld band (0, 2 H-bar): every trained token inside, P = 0 (a padding token is not trained)
    term, metrics = epo(band_low=0.0, band_high=2.0, **NO_GATE)
    assert term.item() == pytest.approx(0.71875, abs=1e-12) and metrics["entropy_out_of_band_frac"].item() == 0.0
    # smooth_coef and penalty scale the smoothing part only
    term, _ = epo(smooth_coef=2.0, penalty=0.3, **NO_GATE)
    assert term.item() == pytest.approx(0.71875 - 2.0 * 3 * 0.0625, abs=1e-12)


def test_epo_seq_level_compares_each_rows_token_mean():
    # row means: 0.95 (turn 0, band (0.8, 1.2): inside), 0.5 (turn 1, (0.4, 0.6): inside), 0.45 (inside)
    assert epo(level="seq", **NO_GATE)[0].item() == pytest.approx(0.71875, abs=1e-12)
    # turn 1's history 0.8: band (0.64, 0.96), row 1 (0.5) and row 2 (0.45) below: all 4 of their tokens pay 0.1
    term, _ = epo(level="seq", history=torch.tensor([1.0, 0.8, 0.8], dtype=F64), **NO_GATE)
    assert term.item() == pytest.approx(0.71875 - 0.1 * 4 / 8, abs=1e-12)


def test_the_turn_gate_and_a_missing_history_leave_a_row_unpenalised():
    # min_turn = 1: row 0 (turn 0) pays nothing; rows 1, 2 pay for (1,1), (1,2)
    assert epo(min_turn=1)[0].item() == pytest.approx(0.71875 - 0.2 / 8, abs=1e-12)
    # the authors' default gate (turn >= 25) shuts it everywhere here: the plain bonus
    assert epo()[0].item() == pytest.approx(0.71875, abs=1e-12)
    # no history yet for row 0 (NaN): no penalty and no NaN
    term, metrics = epo(history=torch.tensor([NAN, 0.5, 0.5], dtype=F64), **NO_GATE)
    assert term.item() == pytest.approx(0.71875 - 0.2 / 8, abs=1e-12)
    assert metrics["entropy_out_of_band_frac"].item() == pytest.approx(2 / 8)  # (1,1), (1,2); row 0 not counted


def test_phase_weights_at_a_few_steps_match_the_authors_function():
    # _calculate_epoch_based_entropy_weight(k, K) of the authors' dp_actor.py, run outside the repo
    golden = {10: {0: 1.0, 1: 0.9340640092071278, 2: 0.8898657928234444, 5: 0.8270670566473225,
                   6: 0.43904930887522114, 7: 0.24095536952976163, 9: 0.07257436263152998,
                   10: 0.03982965469429116, 15: 0.03982965469429116},
              150: {0: 1.0, 37: 0.8745634693205331, 75: 0.8270670566473225, 76: 0.7686315513218586,
                    112: 0.1821101507070502, 149: 0.04145513373818067}}
    for total, weights in golden.items():
        for step, weight in weights.items():
            assert phase_weight(step, total) == pytest.approx(weight, abs=1e-15), (step, total)
    # by hand: the first half 1 - 0.2 (1 - exp(-2 k / (K//2))), the second 0.8 exp(-3 (k - K//2) / (K - K//2))
    assert phase_weight(1, 10) == pytest.approx(1 - 0.2 * (1 - math.exp(-0.4)))
    assert phase_weight(6, 10) == pytest.approx(0.8 * math.exp(-0.6))
    assert phase_weight(3, 0) == 1.0 and phase_weight(0, 1) == 1.0  # K//2 = 0: the first branch is 1
    assert phase_weight(1, 1) == pytest.approx(0.8 * math.exp(-3))
    term, metrics = epo(step=6, total_steps=10, phase_weights=True, **NO_GATE)
    assert term.item() == pytest.approx(0.71875 - 0.43904930887522114 * 0.0625, abs=1e-12)
    assert metrics["entropy_phase_weight"].item() == pytest.approx(0.43904930887522114)


@pytest.mark.parametrize("params", [{"band_low": -0.1}, {"band_high": 0.8}, {"penalty": -0.1}, {"smooth_coef": NAN},
                                   {"level": "turn"}, {"shape": "square"}, {"phase_weights": 1}, {"min_turn": 2.5}])
def test_a_bad_param_is_one_clear_error(params):
    with pytest.raises(ValueError, match=next(iter(params))):
        epo(**params)


def test_a_bad_param_fails_when_the_recipe_is_built():
    with pytest.raises(ValueError, match=r"recipe epo: band_high must be >= 0.0, got -1.0"):
        dataclasses.replace(get_recipe("epo"), entropy_params={"band_high": -1.0})
    with pytest.raises(ValueError, match="unknown entropy regulariser 'entropy'; valid: bonus, epo"):
        dataclasses.replace(get_recipe("epo"), entropy_regulariser="entropy")


# -- gradients -------------------------------------------------------------------------------------------------

def test_the_constant_penalty_carries_no_gradient_and_the_hinge_pushes_entropy_into_the_band():
    entropy = H.clone().requires_grad_()
    epo(entropy, **NO_GATE)[0].backward()
    torch.testing.assert_close(entropy.grad, MASK / 8)  # d agg(H) / dH: the authors' update is the bonus's
    entropy = H.clone().requires_grad_()
    epo(entropy, shape="hinge", **NO_GATE)[0].backward()
    # term = agg(H) - agg(0.1 (relu(low - H) + relu(H - high))): below the band +0.1/8, above -0.1/8
    below, above = torch.zeros_like(H), torch.zeros_like(H)
    below[0, 1] = below[1, 2] = 1.0
    above[0, 2] = above[1, 1] = 1.0
    torch.testing.assert_close(entropy.grad, MASK / 8 + 0.1 * (below - above) / 8)
    # its value: row 0's 0.5 is 0.3 below 0.8, 1.5 0.3 above 1.2; row 1's 0.7 is 0.1 above 0.6, 0.3 0.1 below 0.4
    term, _ = epo(shape="hinge", **NO_GATE)
    assert term.item() == pytest.approx(0.71875 - 0.1 * (0.3 + 0.3 + 0.1 + 0.1) / 8, abs=1e-12)


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("shape,level", [("hinge", "token"), ("hinge", "seq"), ("constant", "token")])
def test_gradient_matches_finite_differences_in_float64(aggregation, shape, level):
    gen = torch.Generator().manual_seed(3)
    entropy = (0.2 + 2 * torch.rand(4, 5, generator=gen, dtype=F64)).requires_grad_()
    mask = (torch.arange(5)[None] < torch.tensor([5, 3, 4, 1])[:, None]).to(F64)
    history = torch.tensor([1.0, 0.9, 1.4, 1.1], dtype=F64)

    def term(h):
        return epo(h, mask, aggregation, history=history, turn=torch.tensor([0, 1, 2, 3]), step=3, total_steps=8,
                   shape=shape, level=level, phase_weights=True, smooth_coef=2.0, penalty=0.5, min_turn=1)[0]

    assert torch.autograd.gradcheck(term, (entropy,), eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_micro_batches_with_the_whole_denominator_sum_to_the_whole_batch(aggregation):
    gen = torch.Generator().manual_seed(0)
    entropy = torch.rand(6, 4, generator=gen, dtype=F64) * 2
    mask = (torch.arange(4)[None] < torch.tensor([4, 2, 3, 4, 1, 3])[:, None]).to(F64)
    history, turn = torch.tensor([1.0, 0.8, 1.2, 1.0, 0.8, NAN], dtype=F64), torch.tensor([0, 1, 2, 0, 1, 2])
    den = aggregation_denominator(mask, aggregation, max_len=6)
    kwargs = {"shape": "hinge", "min_turn": 0, "max_len": 6}
    whole = epo(entropy, mask, aggregation, history=history, turn=turn, denominator=den, **kwargs)[0]
    parts = sum(epo(entropy[rows], mask[rows], aggregation, history=history[rows], turn=turn[rows],
                    denominator=den, **kwargs)[0] for rows in (torch.tensor([0, 1, 2]), torch.tensor([3, 4, 5])))
    torch.testing.assert_close(parts, whole)


# -- bonus: the loss's old entropy term, bit for bit -------------------------------------------------------

@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_bonus_is_the_old_aggregate_bit_for_bit(aggregation):
    gen = torch.Generator().manual_seed(1)
    entropy = torch.rand(5, 7, generator=gen)
    mask = (torch.arange(7)[None] < torch.tensor([7, 3, 0, 5, 1])[:, None]).float()
    den = aggregation_denominator(mask, aggregation, max_len=9)
    term, metrics = compute_entropy_term("bonus", entropy, mask, aggregation, denominator=den, max_len=9)
    assert torch.equal(term, aggregate(entropy, mask, aggregation, denominator=den, max_len=9)) and metrics == {}


class _Out:
    def __init__(self, logp, entropy):
        self.logp, self.entropy, self.hidden = logp, entropy, None


@pytest.mark.parametrize("name", [n for n, r in RECIPES.items() if r.entropy_coef and r.entropy_regulariser == "bonus"])
def test_every_recipe_with_an_entropy_bonus_gets_the_old_loss_bit_for_bit(name):
    """The update's loss with the entropy slot equals the loss without it minus entropy_coef times the old
    `aggregate(out.entropy, rl_mask, ...)`, bit for bit, on the slots' synthetic batch."""
    recipe = get_recipe(name)
    inputs, rewards, group_ids = _synthetic_inputs(recipe.data != "on_policy")
    mask = inputs["mask"]
    logp = (inputs["logp"] - 0.01).requires_grad_()
    entropy = (inputs["entropy"] + 0.5).requires_grad_()
    batch = type("Batch", (), {"completion_mask": mask, "off_policy": inputs["off_policy"], "group_ids": group_ids})()
    rows = torch.arange(len(mask))

    def loss_of(r):
        config = TrainConfig(recipe=r, task="coin", model="tiny")
        update = PolicyUpdate(config, forward=lambda *_, **__: _Out(logp, entropy), parameters=lambda: [],
                              optimizer=None, loss=slot_choices(r)[1], value_head=None, max_len=8)
        plan = update.plan(batch, mask, torch.ones(len(mask)), inputs["off_policy"].float(), inputs["logp"], None)
        denominators = plan.denominators(rows, r.aggregation, 8)
        return update.micro_batch_loss(batch, rows, plan, denominators, rewards - rewards.mean(), inputs)[0], \
            plan, denominators

    with_term, plan, denominators = loss_of(recipe)
    without, _, _ = loss_of(dataclasses.replace(recipe, entropy_coef=0.0))
    old = without - recipe.entropy_coef * aggregate(entropy, plan.rl_mask, recipe.aggregation,
                                                    denominator=denominators["rl"], max_len=8)
    assert recipe.entropy_coef and torch.equal(with_term, old)


# -- the running history -------------------------------------------------------------------------------------

def test_the_history_is_each_turns_mean_over_the_steps_that_had_it():
    history = EntropyHistory()
    # step 1: turn 0 tokens (1, 3) and (2): mean 2; turn 1 tokens (4): 4
    h1 = torch.tensor([[1.0, 3.0], [2.0, 9.0], [4.0, 9.0]])
    m1 = torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 0.0]])
    got = history.observe(h1, m1, torch.tensor([0, 0, 1]))
    torch.testing.assert_close(got, torch.tensor([2.0, 2.0, 4.0]))
    # step 2 has only turn 0 (mean 1) and a turn-2 row with no trained token: turn 1 keeps step 1's 4, turn 2 none
    got = history.observe(torch.tensor([[1.0, 1.0], [5.0, 5.0]]), torch.tensor([[1.0, 1.0], [0.0, 0.0]]),
                          torch.tensor([0, 2]))
    assert got[0].item() == pytest.approx(1.5) and math.isnan(got[1].item())
    assert history.counts.tolist() == [2.0, 1.0, 0.0] and history.sums.dtype == F64
    torch.testing.assert_close(history_per_row(history.sums, history.counts, torch.tensor([1, 0, 5])),
                               torch.tensor([4.0, 1.5, NAN], dtype=F64), equal_nan=True)
    restored = EntropyHistory()
    restored.load_state_dict(history.state_dict())
    assert torch.equal(restored.sums, history.sums) and torch.equal(restored.counts, history.counts)


def test_turn_entropy_means_is_a_token_mean_per_turn():
    means, present = turn_entropy_means(H, MASK, TURN)
    torch.testing.assert_close(means, torch.tensor([3.8 / 4, (1.5 + 0.45) / 4], dtype=F64))
    assert present.tolist() == [True, True]


def test_every_entropy_regulariser_is_exercised():
    assert set(ENTROPY_REGULARISERS) == {"bonus", "epo"}


# -- a run ---------------------------------------------------------------------------------------------------

def epo_config(out, steps=3):
    return TrainConfig(recipe=get_recipe("epo"), env="guess_number", model="tiny", steps=steps, seed=0, out=str(out),
                       save_every=1, eval_problems=2,
                       rollout=RolloutConfig(prompts_per_step=2, group_size=2, max_new_tokens=2))


def test_epo_trains_on_guess_number_and_its_history_survives_a_resume(tmp_path):
    out = tmp_path / "run"
    trainer = start_run(epo_config(out), progress=False)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    history = trainer.fit()
    assert [r["step"] for r in history] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) and r["actor/updates"] == 1.0 for r in history)
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
    # phase weights of steps 0, 1, 2 of 3 (logged), and a history of 3 steps at turn 0
    assert [r["actor/entropy_phase_weight"] for r in history] == pytest.approx(
        [1.0, 1 - 0.2 * (1 - math.exp(-2)), 0.8 * math.exp(-1.5)], abs=1e-6)
    state = trainer.state_dict()["entropy_history"]
    assert state["counts"][0].item() == 3.0  # every step has a turn 0
    assert 0 < state["sums"][0].item() / 3 < math.log(trainer.model.config.vocab_size)  # a mean entropy, in nats
    uninterrupted = outcome(trainer, out)
    shutil.rmtree(out / "checkpoint-3")
    resumed = resume_run(str(out), progress=False)
    assert resumed.step == 2 and resumed.entropy_history.counts[0].item() == 2.0
    resumed.fit()
    assert_same(outcome(resumed, out), uninterrupted)
    again = resumed.state_dict()["entropy_history"]
    assert torch.equal(again["sums"], state["sums"]) and torch.equal(again["counts"], state["counts"])
