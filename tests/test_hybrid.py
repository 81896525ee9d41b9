"""Hybrid-policy pieces (unipo.core.hybrid): LUFFY, RL-PLUS, CHORD, HPT/AHPO/GHPO gates, CalibRL.

Every loss / estimator the hybrid module registers (in the shared POLICY_LOSSES and
ADVANTAGE_ESTIMATORS registries) needs a loop reference below, or the registry test fails.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from unipo.core import hybrid
from unipo.core.advantages import ADVANTAGE_ESTIMATORS, compute_advantages
from unipo.core.hybrid import (
    ahpo_offpolicy_weight,
    chord_mu_schedule,
    chord_phi_weights,
    ghpo_hint_fraction,
    ghpo_needs_hint,
    hpt_use_sft,
    policy_shaping,
)
from unipo.core.losses import POLICY_LOSSES, compute_policy_loss


def registered_here(registry) -> set[str]:
    return {name for name, fn in registry.items() if fn.__module__ == hybrid.__name__}


# --------------------------------------------------------------------------------------------
# loop references (plain Python, float64)


def ppo_token(logp, old_logp, adv, eps_low, eps_high):
    ratio = math.exp(logp - old_logp)
    clipped = min(max(ratio, 1 - eps_low), 1 + eps_high)
    return max(-ratio * adv, -clipped * adv)


def ref_hybrid(logp, old_logp, adv, mask, off_policy, off_token, eps_low, eps_high, clip=True):
    """Token losses: 0 on padding, PPO-clip (clip=True) or −ρ·A on rollout rows, `off_token(logp, old_logp, A)`
    on expert rows."""
    out = []
    for i in range(len(logp)):
        row = []
        for t in range(len(logp[0])):
            a = adv[i][t]
            if not mask[i][t]:
                row.append(0.0)
            elif off_policy[i]:
                row.append(off_token(logp[i][t], old_logp[i][t], a))
            elif clip:
                row.append(ppo_token(logp[i][t], old_logp[i][t], a, eps_low, eps_high))
            else:
                row.append(-math.exp(logp[i][t] - old_logp[i][t]) * a)
        out.append(row)
    return out


def ref_luffy(logp, old_logp, adv, mask, off_policy, eps_low=0.2, eps_high=0.2, shaping_gamma=0.1,
              clip_on_policy=False):
    def shaped(lp, _old, a):
        p = math.exp(lp)
        return -a * p / (p + shaping_gamma)
    return ref_hybrid(logp, old_logp, adv, mask, off_policy, shaped, eps_low, eps_high, clip_on_policy)


def ref_rl_plus(logp, old_logp, adv, mask, off_policy, eps_low=0.2, eps_high=0.2, expert_prob=1.0,
                clip_on_policy=False, explore_gamma=0.0):
    def mixture_importance(lp, old, a):
        p, p_old = math.exp(lp), math.exp(old)
        proxy = (p_old + expert_prob) / 2
        return -a * p / (p_old / 2 + proxy / 2) * (1 - p) ** explore_gamma
    return ref_hybrid(logp, old_logp, adv, mask, off_policy, mixture_importance, eps_low, eps_high, clip_on_policy)


LOSS_REFERENCES = {"luffy": ref_luffy, "rl_plus": ref_rl_plus}
# {} is the released scripts' setting (unclipped on-policy rows); clip_on_policy=True the papers' PPO form
LOSS_PARAMS = {
    "luffy": [{}, {"eps_low": 0.1, "eps_high": 0.3, "shaping_gamma": 0.5, "clip_on_policy": True},
              {"clip_on_policy": True}],
    "rl_plus": [{}, {"eps_low": 0.15, "eps_high": 0.25, "expert_prob": 0.8, "clip_on_policy": True},
                {"explore_gamma": 0.5}, {"clip_on_policy": True, "explore_gamma": 2.0}],
}


def ref_calibrl(rewards, group_ids, logp, expert_logp, off_policy=None, pass_threshold=0.1, success_reward=None,
                norm_by_std=False, negative_slope=0.5, guide_coef=0.1, eps=1e-6):
    batch, length = len(rewards), len(logp[0])
    on = [not off_policy[i] if off_policy is not None else True for i in range(batch)]
    advantage = []
    for i in range(batch):
        members = [rewards[j] for j in range(batch) if group_ids[j] == group_ids[i] and on[j]]
        if not on[i] or len(members) < 2 or len(set(members)) == 1:
            advantage.append(0.0)
            continue
        mean = sum(members) / len(members)
        std = math.sqrt(sum((r - mean) ** 2 for r in members) / (len(members) - 1))
        advantage.append((rewards[i] - mean) / (std + eps) if norm_by_std else rewards[i] - mean)
    out = []
    for i in range(batch):
        correct = rewards[i] > pass_threshold if success_reward is None else rewards[i] >= success_reward
        sign = 1.0 if correct else -1.0
        row = []
        for t in range(length):
            slope = 1.0 if sign * (expert_logp[i][t] - logp[i][t]) > 0 else negative_slope
            row.append(advantage[i] + guide_coef * sign * abs(advantage[i]) * slope)
        out.append(row)
    return out


ESTIMATOR_REFERENCES = {"calibrl": ref_calibrl}


def random_loss_inputs(seed, *, token_adv, batch=7, length=5, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(batch, length, generator=g, dtype=dtype) * 3 - 0.01
    old_logp = logp + 0.3 * torch.randn(batch, length, generator=g, dtype=dtype)
    shape = (batch, length) if token_adv else (batch,)
    advantages = torch.randn(shape, generator=g, dtype=dtype)
    mask = torch.rand(batch, length, generator=g) < 0.8
    mask[1] = False  # an all-masked row
    off_policy = torch.rand(batch, generator=g) < 0.4
    off_policy[0], off_policy[2] = False, True
    return logp, old_logp, advantages, mask, off_policy


def token_adv_list(advantages, like):
    return (advantages.unsqueeze(1).expand_as(like) if advantages.dim() == 1 else advantages).tolist()


# --------------------------------------------------------------------------------------------
# registry-wide tests


def test_every_registered_hybrid_name_has_a_reference():
    # calibrl's loss takes expert_logp and rewards instead of off_policy: its own loop reference below
    assert registered_here(POLICY_LOSSES) - {"calibrl"} == set(LOSS_REFERENCES) == set(LOSS_PARAMS)
    assert registered_here(ADVANTAGE_ESTIMATORS) == set(ESTIMATOR_REFERENCES)


@pytest.mark.parametrize("name", sorted(LOSS_REFERENCES))
@pytest.mark.parametrize("seed", range(4))
def test_loss_matches_loop_reference(name, seed):
    logp, old_logp, advantages, mask, off_policy = random_loss_inputs(seed, token_adv=seed % 2 == 1)
    if seed >= 2:
        mask = mask.double()
    for params in LOSS_PARAMS[name]:
        loss, metrics = POLICY_LOSSES.get(name)(logp, old_logp, advantages, mask, off_policy=off_policy, **params)
        want = LOSS_REFERENCES[name](
            logp.tolist(), old_logp.tolist(), token_adv_list(advantages, logp), (mask != 0).tolist(),
            off_policy.tolist(), **params,
        )
        torch.testing.assert_close(loss, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=1e-12)
        for value in metrics.values():
            assert value.dim() == 0 and not value.requires_grad and torch.isfinite(value)


@pytest.mark.parametrize("name", sorted(LOSS_REFERENCES))
def test_loss_gradcheck(name):
    logp, old_logp, advantages, mask, off_policy = random_loss_inputs(5, token_adv=False, batch=4, length=3)
    logp.requires_grad_(True)

    def objective(lp):
        return POLICY_LOSSES.get(name)(lp, old_logp, advantages, mask, off_policy=off_policy)[0]

    assert torch.autograd.gradcheck(objective, (logp,))


@pytest.mark.parametrize("name", sorted(LOSS_REFERENCES))
def test_loss_through_compute_policy_loss_and_degenerate_batches(name):
    logp, old_logp, advantages, mask, off_policy = random_loss_inputs(2, token_adv=False)
    loss, _ = compute_policy_loss(name, logp, old_logp, advantages, mask, off_policy=off_policy)
    assert torch.isfinite(loss)
    for flags in (torch.ones_like(off_policy), torch.zeros_like(off_policy)):  # all expert / all rollouts
        per_token, metrics = POLICY_LOSSES.get(name)(logp, old_logp, advantages, mask, off_policy=flags)
        assert torch.isfinite(per_token).all() and all(torch.isfinite(v) for v in metrics.values())
    nothing = torch.zeros_like(mask)
    per_token, metrics = POLICY_LOSSES.get(name)(logp, old_logp, advantages, nothing, off_policy=off_policy)
    assert (per_token == 0).all() and all(v == 0 for v in metrics.values())
    with pytest.raises(ValueError, match="off_policy must be a bool"):
        POLICY_LOSSES.get(name)(logp, old_logp, advantages, mask, off_policy=off_policy.long())
    with pytest.raises(ValueError, match=r"off_policy must be \[B\]"):
        POLICY_LOSSES.get(name)(logp, old_logp, advantages, mask, off_policy=off_policy[:-1])
    with pytest.raises(ValueError, match="non-finite"):
        compute_policy_loss(name, logp, old_logp.masked_fill(mask, math.nan), advantages, mask, off_policy=off_policy)


@st.composite
def on_policy_batches(draw):
    batch, length = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    seed = draw(st.integers(0, 2**31 - 1))
    eps_low, eps_high = draw(st.sampled_from([0.1, 0.2])), draw(st.sampled_from([0.2, 0.28]))
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(batch, length, generator=g, dtype=torch.float64) * 4
    old_logp = logp + draw(st.sampled_from([0.05, 0.5])) * torch.randn(batch, length, generator=g, dtype=torch.float64)
    advantages = torch.randn((batch, length) if draw(st.booleans()) else (batch,), generator=g, dtype=torch.float64)
    mask = torch.rand(batch, length, generator=g) < 0.7
    return logp, old_logp, advantages, mask, eps_low, eps_high


@pytest.mark.parametrize("name", sorted(LOSS_REFERENCES))
@given(on_policy_batches())
def test_all_on_policy_batch_equals_ppo_clip(name, data):
    logp, old_logp, advantages, mask, eps_low, eps_high = data
    logp_a, logp_b = logp.clone().requires_grad_(True), logp.clone().requires_grad_(True)
    on_only = torch.zeros(logp.shape[0], dtype=torch.bool)
    hybrid_loss, hybrid_metrics = POLICY_LOSSES.get(name)(
        logp_a, old_logp, advantages, mask, off_policy=on_only, eps_low=eps_low, eps_high=eps_high,
        clip_on_policy=True,
    )
    ppo_loss, ppo_metrics = POLICY_LOSSES.get("ppo_clip")(
        logp_b, old_logp, advantages, mask, eps_low=eps_low, eps_high=eps_high
    )
    torch.testing.assert_close(hybrid_loss, ppo_loss, rtol=0, atol=0)
    hybrid_loss.sum().backward()
    ppo_loss.sum().backward()
    torch.testing.assert_close(logp_a.grad, logp_b.grad, rtol=0, atol=0)
    for key, value in ppo_metrics.items():
        torch.testing.assert_close(hybrid_metrics[key], value)
    # the default (the released scripts' loss_remove_clip=True) is the unclipped −ρ·A
    unclipped, metrics = POLICY_LOSSES.get(name)(logp, old_logp, advantages, mask, off_policy=on_only)
    adv = advantages.unsqueeze(1).expand_as(logp) if advantages.dim() == 1 else advantages
    want = torch.where(mask, -adv * torch.exp(torch.where(mask, logp - old_logp, 0.0)), 0.0)
    torch.testing.assert_close(unclipped, want, rtol=1e-14, atol=0)
    assert metrics["clip_frac"] == 0


# --------------------------------------------------------------------------------------------
# hand-computed cases


def test_policy_shaping_hand():
    # f(p) = p/(p + 0.1): f(0.1) = 0.5, f(0.9) = 0.9, f(0) = 0; γ = 0.5: f(0.5) = 0.5
    torch.testing.assert_close(policy_shaping(torch.tensor([0.1, 0.9, 0.0])), torch.tensor([0.5, 0.9, 0.0]))
    torch.testing.assert_close(policy_shaping(torch.tensor(0.5), gamma=0.5), torch.tensor(0.5))
    with pytest.raises(ValueError):
        policy_shaping(torch.tensor(0.5), gamma=0.0)


def test_luffy_and_rl_plus_hand():
    # Row 0 on-policy: ρ = exp(log 1.5) = 1.5, A = 2 -> clipped at 1.2: loss = −min(3, 2.4) = −2.4.
    # Row 1 expert, π_θ = 0.5, A = 2:
    #   LUFFY:   −2 · 0.5/(0.5 + 0.1) = −5/3 (old_logp ignored)
    #   RL-PLUS: π_old = 0.25 -> proxy ½(0.25 + 1) = 0.625, denominator ½·0.25 + ½·0.625 = 0.4375,
    #            ratio 0.5/0.4375 = 8/7, loss −16/7
    logp = torch.tensor([[math.log(1.5 * 0.4)], [math.log(0.5)]], dtype=torch.float64)
    old_logp = torch.tensor([[math.log(0.4)], [math.log(0.25)]], dtype=torch.float64)
    adv = torch.tensor([2.0, 2.0], dtype=torch.float64)
    mask, off = torch.ones(2, 1, dtype=torch.bool), torch.tensor([False, True])
    luffy, metrics = POLICY_LOSSES.get("luffy")(logp, old_logp, adv, mask, off_policy=off, clip_on_policy=True)
    torch.testing.assert_close(luffy, torch.tensor([[-2.4], [-5 / 3]], dtype=torch.float64))
    assert metrics["clip_frac"] == 1.0 and metrics["off_policy_frac"] == 0.5
    torch.testing.assert_close(metrics["off_policy_prob"], torch.tensor(0.5, dtype=torch.float64))
    rl_plus, metrics = POLICY_LOSSES.get("rl_plus")(logp, old_logp, adv, mask, off_policy=off, clip_on_policy=True)
    torch.testing.assert_close(rl_plus, torch.tensor([[-2.4], [-16 / 7]], dtype=torch.float64))
    torch.testing.assert_close(metrics["off_ratio_mean"], torch.tensor(8 / 7, dtype=torch.float64))
    # Defaults (the released scripts): row 0 unclipped, −1.5·2 = −3; RL-PLUS with explore_gamma = 0.5
    # weighs the expert token by (1 − 0.5)^0.5.
    luffy, metrics = POLICY_LOSSES.get("luffy")(logp, old_logp, adv, mask, off_policy=off)
    torch.testing.assert_close(luffy, torch.tensor([[-3.0], [-5 / 3]], dtype=torch.float64))
    assert metrics["clip_frac"] == 0.0
    rl_plus, _ = POLICY_LOSSES.get("rl_plus")(logp, old_logp, adv, mask, off_policy=off, explore_gamma=0.5)
    torch.testing.assert_close(rl_plus, torch.tensor([[-3.0], [-16 / 7 * math.sqrt(0.5)]], dtype=torch.float64))
    # LUFFY's off-policy gradient: d/dlogp of −A·p/(p+γ) = −A·γ·p/(p+γ)² = −2·0.1·0.5/0.36
    logp.requires_grad_(True)
    POLICY_LOSSES.get("luffy")(logp, old_logp, adv, mask, off_policy=off)[0][1, 0].backward()
    torch.testing.assert_close(logp.grad[1, 0], torch.tensor(-0.1 / 0.36, dtype=torch.float64))


def test_chord_mu_schedule_hand():
    # peak 0.5, valley 0.1, warm-up 10, decay 20:
    #   step 0 -> 0; step 5 -> 0.25 (linear warm-up); step 10 -> 0.5 (peak);
    #   step 20 -> 0.1 + 0.4·½(1 + cos(π/2)) = 0.3; step 30 and later -> 0.1
    schedule = dict(mu_peak=0.5, mu_valley=0.1, warmup_steps=10, decay_steps=20)
    got = [chord_mu_schedule(s, **schedule) for s in (0, 5, 10, 20, 25, 30, 1000)]
    want = [0.0, 0.25, 0.5, 0.3, 0.1 + 0.4 * 0.5 * (1 + math.cos(math.pi * 0.75)), 0.1, 0.1]
    assert got == pytest.approx(want)
    assert chord_mu_schedule(0, mu_peak=0.5, mu_valley=0.1, warmup_steps=0, decay_steps=10) == 0.5
    assert chord_mu_schedule(3, mu_peak=0.5, mu_valley=0.1, warmup_steps=0, decay_steps=0) == 0.1
    with pytest.raises(ValueError):
        chord_mu_schedule(-1, **schedule)
    with pytest.raises(ValueError):
        chord_mu_schedule(1, mu_peak=1.5, mu_valley=0.1, warmup_steps=1, decay_steps=1)


def test_chord_phi_weights_hand_and_loop():
    logp = torch.tensor([[math.log(0.5), 0.0, math.log(0.1)]], dtype=torch.float64, requires_grad=True)
    phi = chord_phi_weights(logp)
    torch.testing.assert_close(phi, torch.tensor([[0.25, 0.0, 0.09]], dtype=torch.float64))  # p(1 − p)
    assert not phi.requires_grad
    logp = -torch.rand(4, 6, dtype=torch.float64) * 5
    want = [[math.exp(v) * (1 - math.exp(v)) for v in row] for row in logp.tolist()]
    torch.testing.assert_close(chord_phi_weights(logp), torch.tensor(want, dtype=torch.float64))


REWARDS = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0])
GROUPS = torch.tensor([3, 3, 3, 3, 8, 8, 8, 8, 1, 1])


def test_hpt_ahpo_ghpo_gates_hand():
    # successes per group: group 3 -> 1 of 4 (rate 0.25), group 8 -> 2 of 4 (0.5), group 1 -> 0 of 2 (0)
    assert hpt_use_sft(REWARDS, GROUPS).tolist() == [False] * 8 + [True] * 2  # default gate: rate <= 0
    assert hpt_use_sft(REWARDS, GROUPS, threshold=0.25).tolist() == [True] * 4 + [False] * 4 + [True] * 2
    assert ahpo_offpolicy_weight(REWARDS, GROUPS, r_hat=2).tolist() == [1.0] * 4 + [0.0] * 4 + [1.0] * 2
    assert ahpo_offpolicy_weight(REWARDS, GROUPS, r_hat=1).tolist() == [0.0] * 8 + [1.0] * 2
    assert ghpo_needs_hint(REWARDS, GROUPS).tolist() == [False] * 8 + [True] * 2
    # an expert row (reward 1) in group 1 is not an on-policy success
    expert = torch.tensor([False] * 9 + [True])
    rewards = REWARDS.clone()
    rewards[9] = 1.0
    assert ghpo_needs_hint(rewards, GROUPS, off_policy=expert).tolist() == [False] * 8 + [True] * 2
    assert hpt_use_sft(rewards, GROUPS, off_policy=expert).tolist() == [False] * 8 + [True] * 2
    assert ghpo_needs_hint(rewards, GROUPS).tolist() == [False] * 10
    # success threshold: rewards of 0.5 count as correct with success_reward=0.5
    half = ghpo_needs_hint(torch.tensor([0.5, 0.0]), torch.tensor([0, 0]), success_reward=0.5)
    assert half.tolist() == [False, False]


@given(st.lists(st.tuples(st.integers(0, 3), st.sampled_from([0.0, 1.0]), st.booleans()), min_size=1, max_size=12),
       st.sampled_from([0.0, 0.2, 0.5, 1.0]), st.sampled_from([0.5, 1.0, 2.0, 3.0]))
def test_gates_match_loop_reference(rows, threshold, r_hat):
    groups = torch.tensor([g for g, _, _ in rows])
    rewards = torch.tensor([r for _, r, _ in rows])
    off = torch.tensor([o for _, _, o in rows])
    want_sft, want_xi, want_hint = [], [], []
    for g, _, _ in rows:
        on = [r for (h, r, o) in rows if h == g and not o]
        correct = sum(1 for r in on if r >= 1.0)
        want_sft.append((correct / len(on) if on else 0.0) <= threshold)
        want_xi.append(1.0 if correct < r_hat else 0.0)
        want_hint.append(correct == 0)
    assert hpt_use_sft(rewards, groups, threshold, off_policy=off).tolist() == want_sft
    assert ahpo_offpolicy_weight(rewards, groups, r_hat, off_policy=off).tolist() == want_xi
    assert ghpo_needs_hint(rewards, groups, off_policy=off).tolist() == want_hint


def test_ghpo_hint_fraction():
    assert [ghpo_hint_fraction(k) for k in range(5)] == [0.0, 0.25, 0.5, 0.75, 0.75]
    assert ghpo_hint_fraction(torch.tensor([0, 2, 9])).tolist() == [0.0, 0.5, 0.75]
    assert ghpo_hint_fraction(2, schedule=(0.1, 0.3)) == 0.3
    for bad in (-1, 1.5):
        with pytest.raises(ValueError):
            ghpo_hint_fraction(bad)
    with pytest.raises(ValueError):
        ghpo_hint_fraction(1, schedule=(0.5, 0.25))


def test_calibrl_hand():
    # Group 0: on-policy rewards [1, 0] (row 2 is the expert trace): mean 0.5, unbiased std √0.5,
    # A = ±0.5/√0.5 = ±√0.5 (eps 0 here). expert_logp − logp = −0.1 at t=0 and 0 at t=1.
    #   row 0 (correct, s = +1): gaps −0.1, 0 (not > 0) -> damped slope 0.5: Â = √0.5 + √0.5·0.5 = 1.5·√0.5
    #   row 1 (wrong,   s = −1): t=0 gap +0.1 > 0 -> full slope 1: Â = −√0.5 − √0.5 = −2·√0.5;
    #                            t=1 gap 0 -> damped: Â = −√0.5 − 0.5·√0.5 = −1.5·√0.5
    #   row 2 (expert): 0
    # Group 1: rewards [1, 1] are equal -> A = 0 -> Â = 0.
    # (The paper's std-normalised form with guide weight 1; the defaults are checked below.)
    logp = torch.full((5, 2), -1.0, dtype=torch.float64)
    rewards, group_ids = torch.tensor([1.0, 0.0, 1.0, 1.0, 1.0], dtype=torch.float64), torch.tensor([0, 0, 0, 1, 1])
    inputs = {"logp": logp, "expert_logp": logp - torch.tensor([0.1, 0.0], dtype=torch.float64),
              "off_policy": torch.tensor([False, False, True, False, False])}
    got = compute_advantages("calibrl", rewards, group_ids, **inputs, eps=0.0, norm_by_std=True, guide_coef=1.0)
    root = math.sqrt(0.5)
    want = [[1.5 * root] * 2, [-2 * root, -1.5 * root], [0.0] * 2, [0.0] * 2, [0.0] * 2]
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64))
    # Defaults (the authors' released script): A = r − mean = ±0.5, guide weight 0.1:
    #   row 0: 0.5 + 0.1·0.5·0.5 = 0.525; row 1: −0.5 − 0.1·0.5 = −0.55 at t=0, −0.5 − 0.1·0.5·0.5 = −0.525 at t=1
    got = compute_advantages("calibrl", rewards, group_ids, **inputs)
    want = [[0.525] * 2, [-0.55, -0.525], [0.0] * 2, [0.0] * 2, [0.0] * 2]
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64))
    # "correct" is reward > 0.1 by default (0.5 counts), reward >= success_reward when given
    half = torch.tensor([1.0, 0.5, 1.0], dtype=torch.float64)
    three = {"logp": logp[:3], "expert_logp": logp[:3], "off_policy": torch.tensor([False, False, True])}
    signs = compute_advantages("calibrl", half, group_ids[:3], **three, guide_coef=1.0, negative_slope=1.0)
    torch.testing.assert_close(signs[:, 0], torch.tensor([0.5, -0.25 + 0.25, 0.0], dtype=torch.float64))
    signs = compute_advantages("calibrl", half, group_ids[:3], **three, guide_coef=1.0, negative_slope=1.0,
                               success_reward=1.0)
    torch.testing.assert_close(signs[:, 0], torch.tensor([0.5, -0.5, 0.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="off_policy must be a bool"):
        compute_advantages("calibrl", torch.zeros(5, dtype=torch.float64), torch.zeros(5, dtype=torch.long),
                           logp=logp, expert_logp=logp, off_policy=torch.zeros(5))


@pytest.mark.parametrize("seed", range(4))
def test_calibrl_matches_loop_reference(seed):
    g = torch.Generator().manual_seed(seed)
    batch, length = 11, 4
    rewards = torch.randint(0, 3, (batch,), generator=g).double() / 2
    group_ids = torch.randint(0, 3, (batch,), generator=g)
    logp = -torch.rand(batch, length, generator=g, dtype=torch.float64) * 2
    expert_logp = -torch.rand(batch, length, generator=g, dtype=torch.float64) * 2
    off = (torch.rand(batch, generator=g) < 0.3) if seed % 2 else None
    params = [{}, {"norm_by_std": True, "guide_coef": 1.0, "success_reward": 1.0},
              {"success_reward": 0.5, "negative_slope": 0.2, "guide_coef": 0.7, "norm_by_std": True},
              {"pass_threshold": 0.6, "negative_slope": 0.2}][seed]
    got = compute_advantages(
        "calibrl", rewards, group_ids, logp=logp, expert_logp=expert_logp, off_policy=off, **params
    )
    want = ref_calibrl(rewards.tolist(), group_ids.tolist(), logp.tolist(), expert_logp.tolist(),
                       off.tolist() if off is not None else None, **params)
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    assert not got.requires_grad


def ref_calibrl_loss(logp, old, adv, mask, expert_logp, rewards, eps=0.2, c=3.0, guide=0.1, slope=0.5, threshold=0.1):
    """Float64 loop: token mean of dual-clip PPO + guide·|A|·LeakyReLU(s·(expert − logp))."""
    total, count = 0.0, 0
    for i in range(logp.shape[0]):
        sign = 1.0 if float(rewards[i]) > threshold else -1.0
        for t in range(logp.shape[1]):
            if not mask[i, t]:
                continue
            a = float(adv[i])
            ratio = torch.exp(logp[i, t] - old[i, t])
            clipped = torch.clamp(ratio, 1 - eps, 1 + eps)
            ppo = torch.maximum(-a * ratio, -a * clipped)
            if a < 0:
                ppo = torch.minimum(ppo, torch.tensor(-a * c, dtype=logp.dtype))
            gap = sign * (float(expert_logp[i, t]) - logp[i, t])
            guided = abs(a) * (gap if float(gap) > 0 else slope * gap)
            total = total + ppo + guide * guided
            count += 1
    return total / count


@pytest.mark.parametrize("seed", range(3))
def test_calibrl_loss_matches_loop_reference_and_gradcheck(seed):
    logp, old_logp, advantages, mask, _ = random_loss_inputs(seed, token_adv=False)
    g = torch.Generator().manual_seed(100 + seed)
    expert_logp = logp.detach() + 0.5 * torch.randn(logp.shape, generator=g, dtype=logp.dtype)
    rewards = torch.rand(len(advantages), generator=g, dtype=logp.dtype)
    lp = logp.clone().requires_grad_(True)
    loss, _ = compute_policy_loss("calibrl", lp, old_logp, advantages, mask, "token_mean",
                                  expert_logp=expert_logp, rewards=rewards)
    ref_lp = logp.clone().requires_grad_(True)
    want = ref_calibrl_loss(ref_lp, old_logp, advantages, mask, expert_logp, rewards)
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(torch.autograd.grad(loss, lp)[0], torch.autograd.grad(want, ref_lp)[0])
