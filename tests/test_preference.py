"""Tests for unipo.core.preference: hand-computed cases, a float64 loop reference per registered
name, gradcheck, property tests, input checks and the TR-DPO reference updates."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from unipo.core.preference import (
    PREFERENCE_LOSSES,
    compute_preference_loss,
    hard_update_due,
    soft_update_reference,
)

NAMES = sorted(PREFERENCE_LOSSES)
F64 = torch.float64


def f64(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


# --------------------------------------------------------------------------------------------
# independent float64 reference: plain Python loops over pairs, math module only


def neg_log_sigmoid(x: float) -> float:
    # −log σ(x) = log(1 + e^{−x}), written two ways so neither exp overflows
    return math.log1p(math.exp(-x)) if x >= 0 else -x + math.log1p(math.exp(x))


def margins(pair: dict[str, list[float]], beta: float) -> list[float]:
    return [
        beta * ((pair["c"][i] - pair["rc"][i]) - (pair["r"][i] - pair["rr"][i])) for i in range(len(pair["c"]))
    ]


def ref_dpo(pair, beta, params):
    return [neg_log_sigmoid(h) for h in margins(pair, beta)]


def ref_ipo(pair, beta, params):
    return [(h / beta - 1 / (2 * beta)) ** 2 for h in margins(pair, beta)]


def ref_robust_dpo(pair, beta, params):
    eps = params["label_noise"]
    return [((1 - eps) * neg_log_sigmoid(h) - eps * neg_log_sigmoid(-h)) / (1 - 2 * eps) for h in margins(pair, beta)]


def ref_rpo(pair, beta, params):
    hs = margins(pair, beta)
    return [neg_log_sigmoid(hs[i]) + params["alpha"] * params["chosen_nll"][i] for i in range(len(hs))]


def ref_slic(pair, beta, params):
    hs = margins(pair, beta)
    return [max(0.0, params["delta"] - hs[i]) + params["lam"] * params["chosen_nll"][i] for i in range(len(hs))]


def ref_lipo(pair, beta, params):
    batch = len(pair["c"])
    if "list_logp" in params:
        logp, ref_logp, labels = params["list_logp"], params["list_ref_logp"], params["list_labels"]
    else:
        logp = [[pair["c"][b], pair["r"][b]] for b in range(batch)]
        ref_logp = [[pair["rc"][b], pair["rr"][b]] for b in range(batch)]
        labels = [[1.0, 0.0] for _ in range(batch)]
    out = []
    for b in range(batch):
        size = len(logp[b])
        s = [beta * (logp[b][i] - ref_logp[b][i]) for i in range(size)]
        # rank by counting: higher scores first, ties broken by list position
        rank = [1 + sum(1 for j in range(size) if s[j] > s[i] or (s[j] == s[i] and j < i)) for i in range(size)]
        inv_disc = [1 / math.log2(1 + rank[i]) for i in range(size)]
        gain = [2 ** labels[b][i] - 1 for i in range(size)]
        total = 0.0
        for i in range(size):
            for j in range(size):
                if labels[b][i] > labels[b][j]:
                    weight = abs(gain[i] - gain[j]) * abs(inv_disc[i] - inv_disc[j])
                    total += weight * neg_log_sigmoid(s[i] - s[j])
        out.append(total)
    return out


def ref_sppo(pair, beta, params):
    eta, out = params["eta"], []
    for i in range(len(pair["c"])):
        chosen = (pair["c"][i] - pair["rc"][i] - eta * (params["chosen_win_prob"][i] - 0.5)) ** 2
        rejected = (pair["r"][i] - pair["rr"][i] - eta * (params["rejected_win_prob"][i] - 0.5)) ** 2
        out.append(0.5 * (chosen + rejected))
    return out


REFERENCES = {
    "dpo": ref_dpo,
    "ipo": ref_ipo,
    "robust_dpo": ref_robust_dpo,
    "rpo": ref_rpo,
    "slic": ref_slic,
    "lipo": ref_lipo,
    "tr_dpo": ref_dpo,  # TR-DPO's loss is DPO's; only the reference model moves
    "sppo": ref_sppo,
}


def random_params(name: str, batch: int, gen: torch.Generator) -> dict[str, object]:
    """Extra params each variant needs, random where they are tensors."""
    uniform = lambda low, high, *shape: low + (high - low) * torch.rand(*shape, generator=gen, dtype=F64)  # noqa: E731
    return {
        "dpo": lambda: {},
        "ipo": lambda: {},
        "robust_dpo": lambda: {"label_noise": 0.2},
        "rpo": lambda: {"chosen_nll": uniform(0.2, 3.0, batch), "alpha": 0.7},
        "slic": lambda: {"chosen_nll": uniform(0.2, 3.0, batch), "delta": 1.0, "lam": 0.3},
        "lipo": lambda: {
            "list_logp": uniform(-20.0, -1.0, batch, 4),
            "list_ref_logp": uniform(-20.0, -1.0, batch, 4),
            "list_labels": torch.randint(0, 4, (batch, 4), generator=gen),  # ties in labels on purpose
        },
        "tr_dpo": lambda: {},
        "sppo": lambda: {
            "chosen_win_prob": uniform(0.0, 1.0, batch),
            "rejected_win_prob": uniform(0.0, 1.0, batch),
            "eta": 1.5,
        },
    }[name]()


def random_pair(batch: int, gen: torch.Generator) -> list[torch.Tensor]:
    return [-1.0 - 19.0 * torch.rand(batch, generator=gen, dtype=F64) for _ in range(4)]


def as_python(params: dict[str, object]) -> dict[str, object]:
    return {k: v.tolist() if isinstance(v, torch.Tensor) else v for k, v in params.items()}


# --------------------------------------------------------------------------------------------
# hand-computed cases
#
# One pair, β = 1 unless said: log π(y_w) = −1, log π_ref(y_w) = −2, log π(y_l) = −3,
# log π_ref(y_l) = −2, so the log-ratios are +1 and −1 and h = β·2.
#   dpo:    −log σ(2) = log(1 + e^{−2}) = 0.126928011
#   ipo:    β = 0.5: h = 1, h/β = 2, 1/(2β) = 1, (2 − 1)² = 1
#   robust: ε = 0.25: (0.75·0.126928 − 0.25·log(1 + e^{2}) [=2.126928]) / 0.5
#           = (0.095196 − 0.531732) / 0.5 = −0.873072  (= dpo − ε·h/(1−2ε) = 0.126928 − 1)
#   rpo:    α = 0.5, NLL = 2: 0.126928 + 0.5·2 = 1.126928
#   slic:   δ = 3, λ = 0.1, NLL = 2: max(0, 3 − 2) + 0.1·2 = 1.2
#   lipo:   pair as list, labels (1, 0); s = (1, −1) so ranks (1, 2); gains (1, 0);
#           Δ = 1·|1/log₂2 − 1/log₂3| = 1 − 0.630930 = 0.369070; 0.369070·0.126928 = 0.046845
#   tr_dpo: = dpo = 0.126928
#   sppo:   η = 2, P̂_w = 0.9, P̂_l = 0.2: ((1 − 2·0.4)² + (−1 − 2·(−0.3))²)/2 = (0.04 + 0.16)/2 = 0.1

HAND_PAIR = (-1.0, -3.0, -2.0, -2.0)
HAND_CASES: dict[str, tuple[float, dict[str, object], float]] = {
    "dpo": (1.0, {}, 0.126928011),
    "ipo": (0.5, {}, 1.0),
    "robust_dpo": (1.0, {"label_noise": 0.25}, -0.873071989),
    "rpo": (1.0, {"chosen_nll": f64(2.0), "alpha": 0.5}, 1.126928011),
    "slic": (1.0, {"chosen_nll": f64(2.0), "delta": 3.0, "lam": 0.1}, 1.2),
    "lipo": (1.0, {}, 0.046845352),
    "tr_dpo": (1.0, {}, 0.126928011),
    "sppo": (1.0, {"chosen_win_prob": f64(0.9), "rejected_win_prob": f64(0.2), "eta": 2.0}, 0.1),
}


@pytest.mark.parametrize("name", NAMES)
def test_hand_computed(name: str) -> None:
    beta, params, expected = HAND_CASES[name]
    pair = [f64(v) for v in HAND_PAIR]
    loss, _ = compute_preference_loss(name, *pair, beta, **params)
    assert loss.shape == ()
    assert loss.item() == pytest.approx(expected, abs=1e-8)


def test_lipo_hand_computed_list() -> None:
    # K = 3, β = 1, reference log-probs 0: s = (0, 1, −1); labels ψ = (2, 0, 1).
    # Ranks by s (descending): τ = (2, 1, 3); 1/D(τ) = 1/log₂(1+τ) = (0.630930, 1, 0.5).
    # Gains 2^ψ − 1 = (3, 0, 1). Pairs with ψ_i > ψ_j:
    #   (0,1): Δ = 3·0.369070 = 1.107211, −log σ(0 − 1) = log(1 + e) = 1.313262 -> 1.454057
    #   (0,2): Δ = 2·0.130930 = 0.261860, −log σ(0 + 1) = 0.313262       -> 0.082031
    #   (2,1): Δ = 1·0.5      = 0.5,      −log σ(−1 − 1) = 2.126928      -> 1.063464
    # total 2.599552; correctly ordered pairs: only (0,2), so pair accuracy 1/3.
    pair = [f64(v) for v in HAND_PAIR]
    loss, metrics = compute_preference_loss(
        "lipo",
        *pair,
        1.0,
        list_logp=f64(0.0, 1.0, -1.0)[None],
        list_ref_logp=torch.zeros(1, 3, dtype=F64),
        list_labels=torch.tensor([[2, 0, 1]]),
    )
    assert loss.item() == pytest.approx(2.599552, abs=1e-6)
    assert metrics["pref/list_pair_accuracy"].item() == pytest.approx(1 / 3)


# --------------------------------------------------------------------------------------------
# vectorised vs loop reference, gradcheck


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("name", NAMES)
def test_matches_loop_reference(name: str, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    batch, beta = 16, 0.5
    pair = random_pair(batch, gen)
    params = random_params(name, batch, gen)
    loss, _ = compute_preference_loss(name, *pair, beta, **params)
    plain = dict(zip(("c", "r", "rc", "rr"), (t.tolist() for t in pair)))
    per_pair = REFERENCES[name](plain, beta, as_python(params))
    expected = sum(per_pair) / len(per_pair)
    torch.testing.assert_close(loss, torch.tensor(expected, dtype=F64), rtol=1e-10, atol=1e-10)


def test_every_name_has_reference_and_hand_case() -> None:
    assert set(REFERENCES) == set(PREFERENCE_LOSSES)
    assert set(HAND_CASES) == set(PREFERENCE_LOSSES)


def test_lipo_pair_only_matches_reference_and_explicit_list() -> None:
    gen = torch.Generator().manual_seed(5)
    pair = random_pair(8, gen)
    loss, _ = compute_preference_loss("lipo", *pair, 0.3)
    plain = dict(zip(("c", "r", "rc", "rr"), (t.tolist() for t in pair)))
    expected = sum(ref_lipo(plain, 0.3, {})) / 8
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    explicit, _ = compute_preference_loss(
        "lipo",
        *pair,
        0.3,
        list_logp=torch.stack(pair[:2], dim=1),
        list_ref_logp=torch.stack(pair[2:], dim=1),
        list_labels=torch.tensor([[1, 0]] * 8),
    )
    torch.testing.assert_close(loss, explicit)


@pytest.mark.parametrize("name", NAMES)
def test_gradcheck(name: str) -> None:
    gen = torch.Generator().manual_seed(11)
    batch = 4
    pair = [t.requires_grad_() for t in random_pair(batch, gen)]
    params = random_params(name, batch, gen)
    differentiable = {
        k: v.requires_grad_() for k, v in params.items() if isinstance(v, torch.Tensor) and v.is_floating_point()
    }
    fixed = {k: v for k, v in params.items() if k not in differentiable}
    keys = list(differentiable)

    def loss_of(*inputs: torch.Tensor) -> torch.Tensor:
        extra = dict(zip(keys, inputs[4:]))
        return compute_preference_loss(name, *inputs[:4], 0.5, **extra, **fixed)[0]

    assert torch.autograd.gradcheck(loss_of, (*pair, *differentiable.values()))


# --------------------------------------------------------------------------------------------
# properties

finite = st.floats(-60.0, 60.0, allow_nan=False)
pairs = st.lists(st.tuples(finite, finite, finite, finite), min_size=1, max_size=8)
betas = st.floats(0.01, 5.0)


def unpack(rows: list[tuple[float, float, float, float]]) -> list[torch.Tensor]:
    return [torch.tensor(column, dtype=F64) for column in zip(*rows)]


@given(rows=pairs, beta=betas)
def test_dpo_swap_flips_sign_of_h(rows, beta) -> None:
    chosen, rejected, ref_chosen, ref_rejected = unpack(rows)
    dpo = PREFERENCE_LOSSES.get("dpo")
    forward, _ = dpo(chosen, rejected, ref_chosen, ref_rejected, beta)
    swapped, _ = dpo(rejected, chosen, ref_rejected, ref_chosen, beta)
    h = beta * ((chosen - ref_chosen) - (rejected - ref_rejected))
    # DPO of the swapped pair is DPO computed with −h; and −log σ(h) + log σ(−h) = −h
    torch.testing.assert_close(swapped, -F.logsigmoid(-h))
    torch.testing.assert_close(forward - swapped, -h, rtol=1e-9, atol=1e-9)


@given(rows=pairs, beta=betas)
def test_robust_dpo_without_noise_is_dpo(rows, beta) -> None:
    pair = unpack(rows)
    robust, _ = compute_preference_loss("robust_dpo", *pair, beta, label_noise=0.0)
    dpo, _ = compute_preference_loss("dpo", *pair, beta)
    torch.testing.assert_close(robust, dpo)


@given(rows=pairs, beta=betas, nll=st.floats(0.0, 10.0))
def test_rpo_without_nll_weight_is_dpo(rows, beta, nll) -> None:
    pair = unpack(rows)
    rpo, _ = compute_preference_loss("rpo", *pair, beta, chosen_nll=torch.full_like(pair[0], nll), alpha=0.0)
    dpo, _ = compute_preference_loss("dpo", *pair, beta)
    torch.testing.assert_close(rpo, dpo)


@given(rows=pairs, beta=betas)
def test_tr_dpo_loss_is_dpo_and_lipo_pair_is_scaled_dpo(rows, beta) -> None:
    pair = unpack(rows)
    dpo, _ = compute_preference_loss("dpo", *pair, beta)
    tr_dpo, _ = compute_preference_loss("tr_dpo", *pair, beta)
    torch.testing.assert_close(tr_dpo, dpo)
    lipo = PREFERENCE_LOSSES.get("lipo")(*pair, beta)[0]
    dpo_per_pair = PREFERENCE_LOSSES.get("dpo")(*pair, beta)[0]
    # K = 2: Δ = 1 − 1/log₂3 whichever answer the model ranks first
    torch.testing.assert_close(lipo, (1 - 1 / math.log2(3)) * dpo_per_pair)


# --------------------------------------------------------------------------------------------
# metrics and degenerate inputs


def test_metrics() -> None:
    # β = 2; log-ratios: pair 0 (+1, −1) -> h = 4; pair 1 (−0.5, +0.5) -> h = −2
    chosen, rejected = f64(-1.0, -2.5), f64(-3.0, -1.5)
    ref_chosen, ref_rejected = f64(-2.0, -2.0), f64(-2.0, -2.0)
    _, metrics = compute_preference_loss("dpo", chosen.requires_grad_(), rejected, ref_chosen, ref_rejected, 2.0)
    assert set(metrics) == {"pref/reward_margin", "pref/accuracy", "pref/chosen_reward", "pref/rejected_reward"}
    assert metrics["pref/reward_margin"].item() == pytest.approx(1.0)  # (4 − 2)/2
    assert metrics["pref/accuracy"].item() == pytest.approx(0.5)
    assert metrics["pref/chosen_reward"].item() == pytest.approx(0.5)  # 2·(1 − 0.5)/2
    assert metrics["pref/rejected_reward"].item() == pytest.approx(-0.5)
    assert all(m.shape == () and not m.requires_grad for m in metrics.values())


@pytest.mark.parametrize("name", ["dpo", "robust_dpo", "tr_dpo", "lipo"])
def test_huge_margins_stay_finite(name: str) -> None:
    chosen = f64(0.0, -1e4).requires_grad_()
    rejected = f64(-1e4, 0.0)
    zeros = torch.zeros(2, dtype=F64)
    params = {"label_noise": 0.1} if name == "robust_dpo" else {}
    loss, _ = compute_preference_loss(name, chosen, rejected, zeros, zeros, 1.0, **params)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(chosen.grad).all()


def test_lipo_all_equal_labels_cost_nothing() -> None:
    pair = [f64(-1.0), f64(-2.0), f64(-1.5), f64(-1.5)]
    loss, metrics = compute_preference_loss(
        "lipo", *pair, 1.0, list_logp=f64(-1.0, -2.0, -3.0)[None],
        list_ref_logp=torch.zeros(1, 3, dtype=F64), list_labels=torch.ones(1, 3),
    )
    assert loss.item() == 0.0 and metrics["pref/list_pair_accuracy"].item() == 0.0


# --------------------------------------------------------------------------------------------
# input checks


def good_pair(batch: int = 3) -> list[torch.Tensor]:
    return random_pair(batch, torch.Generator().manual_seed(0))


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="dpo"):
        compute_preference_loss("nope", *good_pair(), 0.1)


def test_shape_dtype_and_rank_mismatch() -> None:
    chosen, rejected, ref_chosen, ref_rejected = good_pair()
    with pytest.raises(ValueError, match=r"\[2\]"):
        compute_preference_loss("dpo", chosen, rejected[:2], ref_chosen, ref_rejected, 0.1)
    with pytest.raises(ValueError, match="dtype"):
        compute_preference_loss("dpo", chosen.float(), rejected, ref_chosen, ref_rejected, 0.1)
    with pytest.raises(ValueError, match=r"\[B\]"):
        compute_preference_loss("dpo", chosen[None], rejected[None], ref_chosen[None], ref_rejected[None], 0.1)
    with pytest.raises(ValueError, match="chosen_nll"):
        compute_preference_loss("rpo", *good_pair(), 0.1, chosen_nll=f64(1.0, 2.0), alpha=1.0)
    with pytest.raises(ValueError, match="K>=2"):
        compute_preference_loss(
            "lipo", *good_pair(), 0.1, list_logp=torch.zeros(3, 1, dtype=F64),
            list_ref_logp=torch.zeros(3, 1, dtype=F64), list_labels=torch.zeros(3, 1),
        )
    with pytest.raises(ValueError, match="B=0"):
        compute_preference_loss("dpo", *[torch.zeros(0, dtype=F64)] * 4, 0.1)


def test_non_finite_inputs_raise_unless_disabled() -> None:
    chosen, rejected, ref_chosen, ref_rejected = good_pair()
    chosen[1] = float("nan")
    with pytest.raises(ValueError, match="chosen_logp"):
        compute_preference_loss("dpo", chosen, rejected, ref_chosen, ref_rejected, 0.1)
    loss, _ = compute_preference_loss("dpo", chosen, rejected, ref_chosen, ref_rejected, 0.1, check_finite=False)
    assert torch.isnan(loss)
    nll = f64(1.0, float("inf"), 1.0)
    with pytest.raises(ValueError, match="chosen_nll"):
        compute_preference_loss("rpo", *good_pair(), 0.1, chosen_nll=nll, alpha=1.0)


def test_bad_params_and_scalars() -> None:
    pair = good_pair()
    with pytest.raises(ValueError, match="missing params \\['label_noise'\\]"):
        compute_preference_loss("robust_dpo", *pair, 0.1)
    with pytest.raises(ValueError, match="unknown params \\['alpha'\\]"):
        compute_preference_loss("dpo", *pair, 0.1, alpha=1.0)
    with pytest.raises(ValueError, match="label_noise"):
        compute_preference_loss("robust_dpo", *pair, 0.1, label_noise=0.5)
    with pytest.raises(ValueError, match="beta"):
        compute_preference_loss("dpo", *pair, 0.0)
    with pytest.raises(ValueError, match="beta"):
        compute_preference_loss("dpo", *pair, torch.tensor(0.1))
    with pytest.raises(ValueError, match="eta"):
        compute_preference_loss(
            "sppo", *pair, 0.1, chosen_win_prob=pair[0], rejected_win_prob=pair[0], eta=-1.0
        )
    with pytest.raises(ValueError, match="missing"):
        compute_preference_loss("lipo", *pair, 0.1, list_logp=torch.zeros(3, 2, dtype=F64))


# --------------------------------------------------------------------------------------------
# TR-DPO reference updates


def test_soft_update_reference_lerps_in_place() -> None:
    ref = [torch.zeros(2, dtype=F64), torch.full((1, 2), 4.0, dtype=torch.bfloat16)]
    policy = [f64(1.0, -2.0).requires_grad_(), torch.zeros(1, 2, dtype=F64)]
    storage = ref[0].data_ptr()
    soft_update_reference(ref, policy, 0.25)  # ref ← 0.25·π + 0.75·ref
    torch.testing.assert_close(ref[0], f64(0.25, -0.5))
    assert ref[0].data_ptr() == storage and not ref[0].requires_grad
    assert ref[1].dtype == torch.bfloat16 and ref[1].tolist() == [[3.0, 3.0]]
    soft_update_reference(ref, policy, 1.0)  # α = 1: the hard update, an exact copy
    torch.testing.assert_close(ref[0], f64(1.0, -2.0))


def test_soft_update_reference_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="alpha"):
        soft_update_reference([torch.zeros(2)], [torch.zeros(2)], 1.5)
    with pytest.raises(ValueError, match="params has 2"):
        soft_update_reference([torch.zeros(2)], [torch.zeros(2), torch.zeros(2)], 0.5)
    with pytest.raises(ValueError, match=r"\[3\]"):
        soft_update_reference([torch.zeros(2)], [torch.zeros(3)], 0.5)


def test_hard_update_due() -> None:
    assert [hard_update_due(step, 3) for step in range(8)] == [False, False, False, True, False, False, True, False]
    assert hard_update_due(5, 1)
    with pytest.raises(ValueError, match="tau"):
        hard_update_due(4, 0)
    with pytest.raises(ValueError, match="step"):
        hard_update_due(-1, 2)
