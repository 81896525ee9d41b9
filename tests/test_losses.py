"""Policy losses and aggregation: hand-computed cases, loop references, gradcheck, properties."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from unipo.core.losses import (
    AGGREGATIONS,
    POLICY_LOSSES,
    aggregate,
    aggregation_denominator,
    compute_policy_loss,
    value_loss,
)

F64 = torch.float64


# --------------------------------------------------------------------------------------------
# brute-force float64 references: plain loops over sequences and tokens, 0-dim tensors so that
# autograd of the reference gives an independent gradient too.


def _value(x):
    return float(x.detach()) if isinstance(x, torch.Tensor) else float(x)


def _clip(x, low, high):
    """clip with a constant (no gradient) outside [low, high]; None = unbounded."""
    if low is not None and _value(x) < low:
        return torch.tensor(low, dtype=F64)
    if high is not None and _value(x) > high:
        return torch.tensor(high, dtype=F64)
    return x


def _adv(advantages, b, t):
    return advantages[b] if advantages.dim() == 1 else advantages[b, t]


def _tokens(mask, b):
    return [t for t in range(mask.shape[1]) if bool(mask[b, t])]


def _seq_log_ratio(logp, old, mask, b):
    tokens = _tokens(mask, b)
    if not tokens:
        return torch.zeros((), dtype=F64)
    return sum(logp[b, t] - old[b, t] for t in tokens) / len(tokens)


def _per_token(fn):
    """Turn fn(b, t) -> loss into a reference returning the [B][T] list (0 off the mask)."""

    def reference(logp, old, adv, mask, **params):
        return [[fn(logp, old, adv, mask, b, t, **params) if bool(mask[b, t]) else torch.zeros((), dtype=F64)
                 for t in range(mask.shape[1])] for b in range(mask.shape[0])]

    return reference


def _surrogate(r, r_clipped, a):
    return -min(r * a, r_clipped * a, key=_value)


@_per_token
def ref_ppo_clip(logp, old, adv, mask, b, t, eps_low=0.2, eps_high=0.2):
    r = torch.exp(logp[b, t] - old[b, t])
    return _surrogate(r, _clip(r, 1 - eps_low, 1 + eps_high), _adv(adv, b, t))


@_per_token
def ref_clip_higher(logp, old, adv, mask, b, t, eps_low=0.2, eps_high=0.28):
    r = torch.exp(logp[b, t] - old[b, t])
    return _surrogate(r, _clip(r, 1 - eps_low, 1 + eps_high), _adv(adv, b, t))


@_per_token
def ref_dual_clip(logp, old, adv, mask, b, t, eps_low=0.2, eps_high=0.2, clip_ratio_c=3.0):
    r = torch.exp(logp[b, t] - old[b, t])
    a = _adv(adv, b, t)
    loss = _surrogate(r, _clip(r, 1 - eps_low, 1 + eps_high), a)
    if _value(a) < 0 and _value(loss) > _value(-clip_ratio_c * a):
        return -clip_ratio_c * a
    return loss


@_per_token
def ref_gspo(logp, old, adv, mask, b, t, eps_low=3e-4, eps_high=4e-4):
    s = torch.exp(_seq_log_ratio(logp, old, mask, b))
    return _surrogate(s, _clip(s, 1 - eps_low, 1 + eps_high), _adv(adv, b, t))


@_per_token
def ref_gspo_token(logp, old, adv, mask, b, t, eps_low=3e-4, eps_high=4e-4):
    s = torch.exp(_seq_log_ratio(logp, old, mask, b)).detach() * torch.exp(logp[b, t] - logp[b, t].detach())
    return _surrogate(s, _clip(s, 1 - eps_low, 1 + eps_high), _adv(adv, b, t))


@_per_token
def ref_dhpo(logp, old, adv, mask, b, t, eps_low=0.2, eps_high=0.2, seq_eps_low=3e-4, seq_eps_high=4e-4,
             mixing="average", entropy=None):
    if mixing == "average":
        w = 0.5
    else:
        h_max = max(max(float(entropy[b, u]), 0.0) for u in _tokens(mask, b))
        w = max(float(entropy[b, t]), 0.0) / h_max if h_max > 0 else 0.5
    r = torch.exp(logp[b, t] - old[b, t])
    s = torch.exp(_seq_log_ratio(logp, old, mask, b))
    mixed = w * r + (1 - w) * s
    mixed_clipped = w * _clip(r, 1 - eps_low, 1 + eps_high) + (1 - w) * _clip(s, 1 - seq_eps_low, 1 + seq_eps_high)
    return _surrogate(mixed, mixed_clipped, _adv(adv, b, t))


@_per_token
def ref_cpgd(logp, old, adv, mask, b, t, eps_low=0.2, eps_high=0.2, drift_coef=0.1):
    lr = logp[b, t] - old[b, t]
    policy = _surrogate(lr, _clip(lr, math.log(1 - eps_low), math.log(1 + eps_high)), _adv(adv, b, t))
    return policy + drift_coef * (torch.exp(lr) - 1 - lr)


@_per_token
def ref_simple_po(logp, old, adv, mask, b, t, eps=0.2):
    r = torch.exp(logp[b, t] - old[b, t])
    a = _adv(adv, b, t)
    return -(r * a - abs(_value(a)) / (2 * eps) * (r - 1) ** 2)


@_per_token
def ref_cispo(logp, old, adv, mask, b, t, eps_low=None, eps_high=0.28):
    r = float(torch.exp(logp[b, t] - old[b, t]).detach())
    weight = min(r, 1 + eps_high) if eps_low is None else min(max(r, 1 - eps_low), 1 + eps_high)
    return -weight * _adv(adv, b, t) * logp[b, t]


@_per_token
def ref_reinforce(logp, old, adv, mask, b, t):
    return -_adv(adv, b, t) * logp[b, t]


@_per_token
def ref_unclipped(logp, old, adv, mask, b, t):
    return -_adv(adv, b, t) * torch.exp(logp[b, t] - old[b, t])


@_per_token
def ref_sft(logp, old, adv, mask, b, t):
    return -logp[b, t]


@_per_token
def ref_a_star_po(logp, old, adv, mask, b, t, ref_logp=None, beta=1e-3):
    tokens = _tokens(mask, b)
    target = adv[b] if adv.dim() == 1 else sum(adv[b, u] for u in tokens) / len(tokens)
    log_ratio_sum = sum(logp[b, u] - ref_logp[b, u] for u in tokens)
    return (beta * log_ratio_sum - target) ** 2


REFERENCES = {
    "ppo_clip": ref_ppo_clip, "clip_higher": ref_clip_higher, "dual_clip": ref_dual_clip, "gspo": ref_gspo,
    "gspo_token": ref_gspo_token, "dhpo": ref_dhpo, "cpgd": ref_cpgd, "simple_po": ref_simple_po,
    "cispo": ref_cispo, "reinforce": ref_reinforce, "sft": ref_sft, "a_star_po": ref_a_star_po,
    "unclipped": ref_unclipped,
}


def ref_aggregate(per_token, mask, mode, max_len=None):
    B, T = mask.shape
    if mode == "token_mean":
        n = sum(float(mask[b, t]) for b in range(B) for t in range(T))
        total = sum(per_token[b][t] * float(mask[b, t]) for b in range(B) for t in range(T))
        return total / n if n else torch.zeros((), dtype=F64)
    if mode == "seq_mean_token_mean":
        row_means = []
        for b in range(B):
            n = sum(float(mask[b, t]) for t in range(T))
            if n:
                row_means.append(sum(per_token[b][t] * float(mask[b, t]) for t in range(T)) / n)
        return sum(row_means) / len(row_means) if row_means else torch.zeros((), dtype=F64)
    total = sum(per_token[b][t] * float(mask[b, t]) for b in range(B) for t in range(T))
    if mode == "seq_mean_token_sum":
        rows = sum(1 for b in range(B) if any(bool(mask[b, t]) for t in range(T)))
        return total / rows if rows else torch.zeros((), dtype=F64)
    return total / (B * (max_len or T))


# --------------------------------------------------------------------------------------------
# inputs


def make_inputs(B=4, T=5, seed=0, spread=0.3, token_adv=False, empty_row=True):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g, dtype=F64) * 3 - 0.1
    logp = (old + spread * torch.randn(B, T, generator=g, dtype=F64)).clamp(max=-1e-3).requires_grad_()
    adv = torch.randn(B, T, generator=g, dtype=F64) if token_adv else torch.randn(B, generator=g, dtype=F64)
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[:, 0] = True
    if empty_row:
        mask[-1] = False
    extra = {
        "ref_logp": old + 0.5 * torch.randn(B, T, generator=g, dtype=F64),
        "entropy": torch.rand(B, T, generator=g, dtype=F64) * 2,
    }
    return logp, old, adv, mask, extra


def params_for(name, extra, variant=0):
    """Defaults, plus a second variant that exercises the non-default branches."""
    wide = {"eps_low": 0.05, "eps_high": 0.08}
    table = {
        "ppo_clip": [{}, {"eps_low": 0.1, "eps_high": 0.3}],
        "clip_higher": [{}, {"eps_high": 0.1}],
        "dual_clip": [{}, {"clip_ratio_c": 1.2, "eps_low": 0.1}],
        "gspo": [{}, wide],
        "gspo_token": [{}, wide],
        "dhpo": [{}, {"mixing": "entropy", "entropy": extra["entropy"], "seq_eps_low": 0.05, "seq_eps_high": 0.05}],
        "cpgd": [{}, {"drift_coef": 0.5, "eps_high": 0.1}],
        "simple_po": [{}, {"eps": 0.1}],
        "cispo": [{}, {"eps_low": 0.1, "eps_high": 0.1}],
        "reinforce": [{}, {}],
        "unclipped": [{}, {}],
        "sft": [{}, {}],
        "a_star_po": [{"ref_logp": extra["ref_logp"]}, {"ref_logp": extra["ref_logp"], "beta": 0.3}],
    }
    return table[name][variant]


# Every loss registered by unipo.core.losses; others (hybrid's luffy, rl_plus) register into
# the same registry from their own module and are tested beside it.
ALL_LOSSES = sorted(name for name, fn in POLICY_LOSSES.items() if fn.__module__ == "unipo.core.losses")
# Losses whose value depends on a stop-gradient ratio (CISPO's sg[clip(ρ)] weight): a finite
# difference of the value is not their gradient.
STOP_GRADIENT_IN_VALUE = {"cispo"}


# --------------------------------------------------------------------------------------------
# vectorised == loop reference, for every registered loss


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_every_registered_loss_has_a_reference(name):
    assert name in REFERENCES, f"add a loop reference for the new policy loss {name!r}"


@pytest.mark.parametrize("variant", [0, 1])
@pytest.mark.parametrize("token_adv", [False, True])
@pytest.mark.parametrize("name", ALL_LOSSES)
def test_loss_matches_loop_reference(name, token_adv, variant):
    spread = 3e-4 if name.startswith("gspo") and variant == 0 else 0.3  # straddle GSPO's tiny range
    logp, old, adv, mask, extra = make_inputs(seed=variant + 7, spread=spread, token_adv=token_adv)
    params = params_for(name, extra, variant)
    per_token, metrics = POLICY_LOSSES[name](logp, old, adv, mask, **params)
    expected = REFERENCES[name](logp, old, adv, mask, **params)
    torch.testing.assert_close(per_token, torch.stack([torch.stack(row) for row in expected]))
    assert {"clip_frac", "approx_kl"} <= set(metrics)
    assert all(v.dim() == 0 and not v.requires_grad for v in metrics.values())
    for mode in AGGREGATIONS:
        loss, _ = compute_policy_loss(name, logp, old, adv, mask, mode, **params)
        ref_loss = ref_aggregate(expected, mask, mode)
        torch.testing.assert_close(loss, ref_loss)
        grad, = torch.autograd.grad(loss, logp)
        ref_grad, = torch.autograd.grad(ref_loss, logp, retain_graph=True, allow_unused=True)
        torch.testing.assert_close(grad, torch.zeros_like(logp) if ref_grad is None else ref_grad)


@pytest.mark.parametrize("name", ALL_LOSSES)
@pytest.mark.parametrize("variant", [0, 1])
def test_gradcheck(name, variant):
    spread = 1e-4 if name.startswith("gspo") and variant == 0 else 0.3
    logp, old, adv, mask, extra = make_inputs(B=3, T=4, seed=3 + variant, spread=spread)
    params = params_for(name, extra, variant)
    shift = (logp - old).detach()
    for mode in AGGREGATIONS:
        if name in STOP_GRADIENT_IN_VALUE:
            # The loss value moves with sg[ρ] but its gradient, by design, does not: check the
            # gradient at a frozen ratio by moving old_logp along with logp.
            def fn(x):
                return compute_policy_loss(name, x, x.detach() - shift, adv, mask, mode, **params)[0]
        else:
            def fn(x):
                return compute_policy_loss(name, x, old, adv, mask, mode, **params)[0]
        assert torch.autograd.gradcheck(fn, (logp,))


def test_approx_kl_is_k3_of_old_to_new():
    logp, old, adv, mask, _ = make_inputs(empty_row=False)
    _, metrics = POLICY_LOSSES["reinforce"](logp, old, adv, mask)
    ratio = torch.exp(logp.detach() - old)
    expected = ((ratio - 1 - ratio.log()) * mask).sum() / mask.sum()
    torch.testing.assert_close(metrics["approx_kl"], expected)


# --------------------------------------------------------------------------------------------
# hand-computed cases: one sequence, two tokens, ratios ρ = [1.5, 0.5]

OLD = [math.log(0.2), math.log(0.4)]
NEW = [math.log(0.3), math.log(0.2)]  # ρ = 0.3/0.2 = 1.5, 0.2/0.4 = 0.5


def _one_sequence(new=NEW, old=OLD, advantage=1.0):
    logp = torch.tensor([new], dtype=F64, requires_grad=True)
    mask = torch.ones(1, 2, dtype=torch.bool)
    return logp, torch.tensor([old], dtype=F64), torch.tensor([advantage], dtype=F64), mask


S = math.sqrt(0.75)  # GSPO: s = exp(mean(log 1.5, log 0.5)) = sqrt(1.5 * 0.5) = 0.8660254

HAND_CASES = [
    # ppo_clip ε=0.2, A=1: min(1.5, 1.2) = 1.2 → −1.2; min(0.5, 0.8) = 0.5 → −0.5
    ("ppo_clip", {}, 1.0, NEW, OLD, [-1.2, -0.5]),
    # A=−1: min(−1.5, −1.2) = −1.5 → 1.5; min(−0.5, −0.8) = −0.8 → 0.8
    ("ppo_clip", {}, -1.0, NEW, OLD, [1.5, 0.8]),
    # clip_higher ε_hi=0.28: min(1.5, 1.28) → −1.28; token 2 as PPO → −0.5
    ("clip_higher", {}, 1.0, NEW, OLD, [-1.28, -0.5]),
    # dual_clip c=3, A=−1, ρ = [4, 0.5]: PPO gives 4 (unclipped side), capped at −c·A = 3; 0.8 stays
    ("dual_clip", {}, -1.0, [math.log(0.4), math.log(0.2)], [math.log(0.1), math.log(0.4)], [3.0, 0.8]),
    # gspo A=1: s = 0.8660254 < 1 − 3e-4, min(s, clip(s) = 0.9997) = s → −s on both tokens
    ("gspo", {}, 1.0, NEW, OLD, [-S, -S]),
    # A=−1: min(−s, −0.9997) = −0.9997 → 0.9997 on both tokens
    ("gspo", {}, -1.0, NEW, OLD, [0.9997, 0.9997]),
    # gspo_token: the value is GSPO's
    ("gspo_token", {}, 1.0, NEW, OLD, [-S, -S]),
    # dhpo average: token 1 r_mix = (1.5 + s)/2 = 1.1830127, r_clip = (1.2 + 0.9997)/2 = 1.09985 → −1.09985
    #               token 2 r_mix = (0.5 + s)/2 = 0.6830127, r_clip = (0.8 + 0.9997)/2 = 0.89985 → −0.6830127
    ("dhpo", {}, 1.0, NEW, OLD, [-1.09985, -(0.5 + S) / 2]),
    # dhpo entropy, H = [2, 1] → w = [1, 0.5]: token 1 is pure PPO (−1.2), token 2 as averaged
    ("dhpo", {"mixing": "entropy", "entropy": torch.tensor([[2.0, 1.0]], dtype=F64)}, 1.0, NEW, OLD,
     [-1.2, -(0.5 + S) / 2]),
    # cpgd ε=0.2, α=0.1, A=1: log ρ = [0.4054651, −0.6931472]
    #   token 1: clip to log 1.2 = 0.1823216 → −0.1823216 + 0.1·(1.5 − 1 − 0.4054651) = −0.1728681
    #   token 2: min(−0.6931472, log 0.8 = −0.2231436) = −0.6931472 → 0.6931472 + 0.1·(0.5 − 1 + 0.6931472) = 0.7124619
    ("cpgd", {}, 1.0, NEW, OLD, [-0.1823216 + 0.1 * (0.5 - math.log(1.5)), 0.6931472 + 0.1 * (math.log(2) - 0.5)]),
    # simple_po ε=0.2, A=1: −(1.5 − 1/0.4·0.25) = −0.875; −(0.5 − 2.5·0.25) = 0.125
    ("simple_po", {}, 1.0, NEW, OLD, [-0.875, 0.125]),
    # cispo ε_hi=0.28, A=1: weights [1.28, 0.5]; −1.28·log 0.3 = 1.5410852; −0.5·log 0.2 = 0.8047190
    ("cispo", {}, 1.0, NEW, OLD, [1.5410852, 0.8047190]),
    # reinforce A=2: −2·log 0.3 = 2.4079456; −2·log 0.2 = 3.2188758
    ("reinforce", {}, 2.0, NEW, OLD, [2.4079456, 3.2188758]),
    # unclipped A=−1: ρ·1 = [1.5, 0.5] (no clip on either side)
    ("unclipped", {}, -1.0, NEW, OLD, [1.5, 0.5]),
    # sft ignores A: −log 0.3 = 1.2039728; −log 0.2 = 1.6094379
    ("sft", {}, 5.0, NEW, OLD, [1.2039728, 1.6094379]),
    # a_star_po β=0.5, ref = [0.25, 0.1]: Σ log-ratio = log 1.2 + log 2 = 0.8754687; 0.5·0.8754687 − 1 = −0.5622656;
    # squared 0.3161426 on both tokens
    ("a_star_po", {"beta": 0.5, "ref_logp": torch.tensor([[math.log(0.25), math.log(0.1)]], dtype=F64)}, 1.0, NEW, OLD,
     [0.3161426, 0.3161426]),
]


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_every_registered_loss_has_a_hand_case(name):
    assert name in {case[0] for case in HAND_CASES}


@pytest.mark.parametrize(("name", "params", "advantage", "new", "old", "expected"), HAND_CASES)
def test_hand_computed(name, params, advantage, new, old, expected):
    logp, old_logp, adv, mask = _one_sequence(new, old, advantage)
    per_token, _ = POLICY_LOSSES[name](logp, old_logp, adv, mask, **params)
    torch.testing.assert_close(per_token, torch.tensor([expected], dtype=F64), atol=1e-6, rtol=1e-6)


def test_hand_ppo_clip_metrics_and_gradient():
    logp, old, adv, mask = _one_sequence()
    loss, metrics = compute_policy_loss("ppo_clip", logp, old, adv, mask)
    # token mean of [−1.2, −0.5] = −0.85; token 1 clipped → clip_frac ½ and no gradient there;
    # token 2: d(−ρ·A)/dlogp = −ρ = −0.5, divided by 2 tokens → −0.25
    torch.testing.assert_close(loss, torch.tensor(-0.85, dtype=F64))
    torch.testing.assert_close(metrics["clip_frac"], torch.tensor(0.5, dtype=F64))
    torch.testing.assert_close(metrics["ratio_max"], torch.tensor(1.5, dtype=F64))
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, -0.25]], dtype=F64))


# --------------------------------------------------------------------------------------------
# aggregation


def test_aggregation_hand_computed():
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0], [7.0, 7.0, 7.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)
    # token_mean: (1 + 2 + 3 + 4) / 4 = 2.5
    torch.testing.assert_close(aggregate(per_token, mask, "token_mean"), torch.tensor(2.5, dtype=F64))
    # seq_mean_token_mean: row means 2 and 4, the all-masked row is not counted → 3
    torch.testing.assert_close(aggregate(per_token, mask, "seq_mean_token_mean"), torch.tensor(3.0, dtype=F64))
    # seq_mean_token_sum: row sums 6 and 4 over the 2 non-empty rows → 5
    torch.testing.assert_close(aggregate(per_token, mask, "seq_mean_token_sum"), torch.tensor(5.0, dtype=F64))
    # seq_mean_token_sum_norm: 10 / (3 rows · T=3) = 1.111..; with max_len=5: 10 / 15
    torch.testing.assert_close(aggregate(per_token, mask, "seq_mean_token_sum_norm"), torch.tensor(10 / 9, dtype=F64))
    torch.testing.assert_close(aggregate(per_token, mask, "seq_mean_token_sum_norm", max_len=5),
                               torch.tensor(10 / 15, dtype=F64))
    assert float(aggregation_denominator(mask, "seq_mean_token_mean")) == 2.0


@pytest.mark.parametrize("mode", AGGREGATIONS)
def test_aggregation_matches_loop_reference(mode):
    g = torch.Generator().manual_seed(11)
    per_token = torch.randn(5, 7, generator=g, dtype=F64, requires_grad=True)
    mask = torch.rand(5, 7, generator=g) > 0.4
    mask[2] = False
    rows = [[per_token[b, t] for t in range(7)] for b in range(5)]
    for max_len in (None, 10):
        got = aggregate(per_token, mask, mode, max_len=max_len)
        torch.testing.assert_close(got, ref_aggregate(rows, mask, mode, max_len))
    assert torch.autograd.gradcheck(lambda x: aggregate(x, mask, mode), (per_token,))


def test_weights_scale_loss_and_drop_zero_weight_tokens_from_denominator():
    logp, old, adv, mask, _ = make_inputs(empty_row=False)
    weights = torch.rand(mask.shape, dtype=F64) + 0.5
    weights[:, 1] = 0.0
    loss, _ = compute_policy_loss("reinforce", logp, old, adv, mask, weights=weights)
    selected = mask & (weights != 0)
    expected = (-adv[:, None] * logp * weights * selected).sum() / selected.sum()
    torch.testing.assert_close(loss, expected)


def test_aggregation_errors():
    per_token = torch.zeros(2, 3, dtype=F64)
    mask = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="valid: token_mean, seq_mean_token_mean, seq_mean_token_sum, "
                                         "seq_mean_token_sum_norm"):
        aggregate(per_token, mask, "sum")
    with pytest.raises(ValueError, match="max_len"):
        aggregate(per_token, mask, "seq_mean_token_sum_norm", max_len=2)
    with pytest.raises(ValueError, match="shape mismatch"):
        aggregate(per_token, torch.ones(2, 4), "token_mean")


# --------------------------------------------------------------------------------------------
# properties


@given(
    log_ratio=st.lists(st.floats(-1.0, 1.0), min_size=6, max_size=6),
    adv=st.lists(st.floats(-2.0, 2.0).filter(lambda a: abs(a) > 1e-3), min_size=6, max_size=6),
    eps=st.sampled_from([(0.2, 0.2), (0.2, 0.28), (0.1, 0.3)]),
)
def test_property_ppo_clip_gradient_is_zero_outside_trust_region(log_ratio, adv, eps):
    eps_low, eps_high = eps
    ratio = torch.tensor(log_ratio, dtype=F64).exp()
    assume(bool(((ratio - (1 + eps_high)).abs() > 1e-6).all() and ((ratio - (1 - eps_low)).abs() > 1e-6).all()))
    old = torch.full((2, 3), -1.0, dtype=F64)
    logp = (old + torch.tensor(log_ratio, dtype=F64).view(2, 3)).requires_grad_()
    a = torch.tensor(adv, dtype=F64).view(2, 3)
    loss, _ = compute_policy_loss("ppo_clip", logp, old, a, torch.ones(2, 3), eps_low=eps_low, eps_high=eps_high)
    loss.backward()
    r = ratio.view(2, 3)
    outside = ((a > 0) & (r > 1 + eps_high)) | ((a < 0) & (r < 1 - eps_low))
    assert (logp.grad[outside] == 0).all()
    assert (logp.grad[~outside] != 0).all()


@given(
    seq_log_ratio=st.lists(st.floats(-0.5, 0.5), min_size=3, max_size=3),
    adv=st.lists(st.floats(-2.0, 2.0), min_size=3, max_size=3),
    length=st.integers(1, 4),
    eps=st.floats(1e-4, 0.3),
)
def test_property_gspo_equals_grpo_when_ratio_is_constant_per_sequence(seq_log_ratio, adv, length, eps):
    old = -torch.rand(3, length, dtype=F64) - 0.5
    logp = (old + torch.tensor(seq_log_ratio, dtype=F64)[:, None]).requires_grad_()
    a = torch.tensor(adv, dtype=F64)
    mask = torch.ones(3, length, dtype=torch.bool)
    gspo_loss, _ = compute_policy_loss("gspo", logp, old, a, mask, eps_low=eps, eps_high=eps)
    grpo_loss, _ = compute_policy_loss("ppo_clip", logp, old, a, mask, eps_low=eps, eps_high=eps)
    torch.testing.assert_close(gspo_loss, grpo_loss)
    if length == 1:  # one token: s_i = ρ_i exactly, so the gradients agree too
        g_gspo, = torch.autograd.grad(gspo_loss, logp)
        g_grpo, = torch.autograd.grad(grpo_loss, logp)
        torch.testing.assert_close(g_gspo, g_grpo)


@pytest.mark.parametrize("name", ALL_LOSSES)
@given(
    seed=st.integers(0, 10_000),
    batch=st.integers(2, 6),
    length=st.integers(1, 5),
    n_micro=st.integers(2, 3),
    mode=st.sampled_from(AGGREGATIONS),
    use_weights=st.booleans(),
)
def test_property_gradient_accumulation_equals_full_batch(name, seed, batch, length, n_micro, mode, use_weights):
    logp, old, adv, mask, extra = make_inputs(B=batch, T=length, seed=seed, empty_row=seed % 2 == 0)
    params = params_for(name, extra, variant=1)
    weights = None
    if use_weights:
        weights = (torch.rand(batch, length, generator=torch.Generator().manual_seed(seed)) > 0.3).to(F64) * 0.7
    max_len = length + 2
    full_loss, _ = compute_policy_loss(name, logp, old, adv, mask, mode, weights=weights, max_len=max_len, **params)
    full_grad, = torch.autograd.grad(full_loss, logp)

    selected = mask if weights is None else mask & (weights != 0)
    denominator = aggregation_denominator(selected, mode, max_len=max_len)
    accumulated = torch.zeros((), dtype=F64)
    for rows in torch.arange(batch).chunk(n_micro):
        sub = {k: (v[rows] if isinstance(v, torch.Tensor) else v) for k, v in params.items()}
        micro_loss, _ = compute_policy_loss(
            name, logp[rows], old[rows], adv[rows], mask[rows], mode,
            weights=None if weights is None else weights[rows], denominator=denominator, max_len=max_len, **sub,
        )
        accumulated = accumulated + micro_loss
    acc_grad, = torch.autograd.grad(accumulated, logp)
    torch.testing.assert_close(accumulated, full_loss)
    torch.testing.assert_close(acc_grad, full_grad)


@pytest.mark.parametrize("name", ALL_LOSSES)
@given(seed=st.integers(0, 10_000), mode=st.sampled_from(AGGREGATIONS))
def test_property_all_masked_rows_contribute_nothing(name, seed, mode):
    logp, old, adv, mask, extra = make_inputs(B=3, T=4, seed=seed, empty_row=False)
    params = params_for(name, extra, variant=1)
    # the same batch plus one all-masked row of garbage-but-finite numbers
    pad_logp = torch.cat([logp, torch.full((1, 4), -50.0, dtype=F64)])
    pad_old = torch.cat([old, torch.full((1, 4), 30.0, dtype=F64)])
    pad_adv = torch.cat([adv, torch.tensor([1e3], dtype=F64)])
    pad_mask = torch.cat([mask, torch.zeros(1, 4, dtype=torch.bool)])
    pad_params = {k: (torch.cat([v, torch.ones(1, 4, dtype=F64)]) if isinstance(v, torch.Tensor) else v)
                  for k, v in params.items()}
    base_loss, _ = compute_policy_loss(name, logp, old, adv, mask, mode, **params)
    pad_loss, metrics = compute_policy_loss(name, pad_logp, pad_old, pad_adv, pad_mask, mode, **pad_params)
    grad, = torch.autograd.grad(pad_loss, pad_logp)
    assert torch.isfinite(pad_loss) and torch.isfinite(grad).all()
    assert all(torch.isfinite(v) for v in metrics.values())
    assert (grad[-1] == 0).all()
    if mode == "seq_mean_token_sum_norm":  # the constant B·T_max counts every row, by design
        base_loss = base_loss * 3 / 4
    torch.testing.assert_close(pad_loss, base_loss)


@pytest.mark.parametrize("name", ALL_LOSSES)
@pytest.mark.parametrize("mode", AGGREGATIONS)
def test_all_masked_batch_gives_zero_loss(name, mode):
    logp, old, adv, mask, extra = make_inputs(B=2, T=3)
    loss, metrics = compute_policy_loss(name, logp, old, adv, torch.zeros_like(mask), mode, **params_for(name, extra))
    grad, = torch.autograd.grad(loss, logp)
    assert float(loss.detach()) == 0.0 and (grad == 0).all()
    assert all(torch.isfinite(v) for v in metrics.values())


# --------------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize("which", ["logp", "old_logp", "advantages", "weights", "ref_logp"])
def test_non_finite_input_raises_unless_unchecked(which):
    logp, old, adv, mask, extra = make_inputs()
    inputs = {"logp": logp.detach().clone(), "old_logp": old, "advantages": adv,
              "weights": torch.ones(mask.shape, dtype=F64), "ref_logp": extra["ref_logp"].clone()}
    inputs[which] = inputs[which].clone()
    inputs[which].view(-1)[0] = float("nan")
    name = "a_star_po"
    args = (name, inputs["logp"], inputs["old_logp"], inputs["advantages"], mask)
    with pytest.raises(ValueError, match=which):
        compute_policy_loss(*args, weights=inputs["weights"], ref_logp=inputs["ref_logp"])
    compute_policy_loss(*args, weights=inputs["weights"], ref_logp=inputs["ref_logp"], check_finite=False)


def test_unknown_names_and_params_raise_listing_valid_ones():
    logp, old, adv, mask, _ = make_inputs()
    with pytest.raises(ValueError, match="valid: a_star_po, calibrl, cispo"):
        compute_policy_loss("grpo_typo", logp, old, adv, mask)
    with pytest.raises(ValueError, match="valid: token_mean"):
        compute_policy_loss("ppo_clip", logp, old, adv, mask, "mean")
    with pytest.raises(ValueError, match="eps_low"):
        compute_policy_loss("ppo_clip", logp, old, adv, mask, eps=0.2)
    with pytest.raises(ValueError, match="ref_logp"):
        compute_policy_loss("a_star_po", logp, old, adv, mask)
    with pytest.raises(ValueError, match="entropy"):
        compute_policy_loss("dhpo", logp, old, adv, mask, mixing="entropy")
    with pytest.raises(ValueError, match="mixing"):
        compute_policy_loss("dhpo", logp, old, adv, mask, mixing="max")
    with pytest.raises(ValueError, match="eps_low"):
        compute_policy_loss("ppo_clip", logp, old, adv, mask, eps_low=1.5)
    with pytest.raises(ValueError, match="clip_ratio_c"):
        compute_policy_loss("dual_clip", logp, old, adv, mask, clip_ratio_c=0.5)


def test_shape_and_dtype_mismatch_raise():
    logp, old, adv, mask, _ = make_inputs(B=4, T=5)
    with pytest.raises(ValueError, match=r"old_logp\[4, 4\]"):
        compute_policy_loss("ppo_clip", logp, old[:, :4], adv, mask)
    with pytest.raises(ValueError, match=r"advantages must be \[B\]=\[4\]"):
        compute_policy_loss("ppo_clip", logp, old, adv[:3], mask)
    with pytest.raises(ValueError, match="dtype"):
        compute_policy_loss("ppo_clip", logp, old.float(), adv, mask)
    with pytest.raises(ValueError, match=r"weights\[4, 3\]"):
        compute_policy_loss("ppo_clip", logp, old, adv, mask, weights=torch.ones(4, 3, dtype=F64))


# --------------------------------------------------------------------------------------------
# value loss


def test_value_loss_hand_computed_and_reference():
    # V = [1.5, 0.0], V_old = [1.0, 0.0], R = [2.0, 0.5], clip 0.2:
    # token 1: V_clip = 1.2 → max((1.5−2)², (1.2−2)²) = 0.64 → ½·0.64 = 0.32 (clipped error larger)
    # token 2: V_clip = 0 → max(0.25, 0.25) = 0.25 → 0.125
    values = torch.tensor([[1.5, 0.0]], dtype=F64, requires_grad=True)
    loss, metrics = value_loss(values, torch.tensor([[1.0, 0.0]], dtype=F64), torch.tensor([[2.0, 0.5]], dtype=F64),
                               torch.ones(1, 2, dtype=torch.bool))
    torch.testing.assert_close(loss, torch.tensor([[0.32, 0.125]], dtype=F64))
    torch.testing.assert_close(metrics["value_clip_frac"], torch.tensor(0.5, dtype=F64))

    g = torch.Generator().manual_seed(5)
    values = torch.randn(3, 4, generator=g, dtype=F64, requires_grad=True)
    old_values = values.detach() + 0.3 * torch.randn(3, 4, generator=g, dtype=F64)
    returns = torch.randn(3, 4, generator=g, dtype=F64)
    mask = torch.rand(3, 4, generator=g) > 0.3
    per_token, _ = value_loss(values, old_values, returns, mask)
    for b in range(3):
        for t in range(4):
            v, vo, r = float(values[b, t].detach()), float(old_values[b, t]), float(returns[b, t])
            clipped = vo + min(max(v - vo, -0.2), 0.2)
            expected = 0.5 * max((v - r) ** 2, (clipped - r) ** 2) if mask[b, t] else 0.0
            assert abs(float(per_token[b, t].detach()) - expected) < 1e-12
    assert torch.autograd.gradcheck(lambda x: value_loss(x, old_values, returns, mask)[0], (values,))
    with pytest.raises(ValueError, match="returns"):
        value_loss(values, old_values, returns.clone().fill_(float("inf")), mask)


def test_cpgd_drift_clip_caps_the_drift_gradient_at_c():
    """The authors' drift term α·sg(min(ρ − 1, c))·logp: with A = 0 its gradient is α·min(ρ − 1, c) per token."""
    old = torch.log(torch.tensor([[0.1, 0.5, 0.2]], dtype=F64))
    logp = torch.log(torch.tensor([[0.5, 0.55, 0.2]], dtype=F64)).requires_grad_()  # ρ = 5, 1.1, 1
    mask = torch.ones(1, 3, dtype=torch.bool)
    loss, _ = compute_policy_loss("cpgd", logp, old, torch.zeros(1, dtype=F64), mask, "token_mean",
                                  drift_coef=0.001, drift_clip=2.0)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[0.002, 0.0001, 0.0]], dtype=F64) / 3)
