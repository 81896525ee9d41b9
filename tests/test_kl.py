"""KL estimators: hand-computed values, loop reference, gradcheck, properties, errors."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from unipo.core.kl import KL_ESTIMATORS, kl_estimate

F64 = torch.float64


def ref_k1(lp: float, ref: float) -> float:
    return lp - ref


def ref_k2(lp: float, ref: float) -> float:
    return 0.5 * (lp - ref) ** 2


def ref_k3(lp: float, ref: float) -> float:
    return math.exp(ref - lp) + (lp - ref) - 1.0


REFERENCES = {"k1": ref_k1, "k2": ref_k2, "k3": ref_k3}


@pytest.mark.parametrize("kind", sorted(KL_ESTIMATORS))
def test_every_estimator_has_a_reference(kind):
    assert kind in REFERENCES, f"add a loop reference for the new KL estimator {kind!r}"


# logp = log 0.5, ref_logp = log 0.25 → k1 = log 2 = 0.6931472
#   k2 = ½·0.4804530 = 0.2402265; k3 = exp(−log 2) + log 2 − 1 = 0.5 + 0.6931472 − 1 = 0.1931472
# logp = log 0.25, ref_logp = log 0.5 → k1 = −0.6931472; k2 = 0.2402265; k3 = 2 − 0.6931472 − 1 = 0.3068528
HAND = {
    "k1": [0.6931472, -0.6931472],
    "k2": [0.2402265, 0.2402265],
    "k3": [0.1931472, 0.3068528],
}


@pytest.mark.parametrize("kind", sorted(KL_ESTIMATORS))
def test_hand_computed(kind):
    logp = torch.tensor([[math.log(0.5), math.log(0.25)]], dtype=F64)
    ref = torch.tensor([[math.log(0.25), math.log(0.5)]], dtype=F64)
    torch.testing.assert_close(kl_estimate(logp, ref, kind), torch.tensor([HAND[kind]], dtype=F64), atol=1e-7, rtol=0)


@pytest.mark.parametrize("kind", sorted(KL_ESTIMATORS))
def test_matches_loop_reference_and_gradcheck(kind):
    g = torch.Generator().manual_seed(1)
    logp = (-torch.rand(4, 6, generator=g, dtype=F64) * 4).requires_grad_()
    ref = -torch.rand(4, 6, generator=g, dtype=F64) * 4
    got = kl_estimate(logp, ref, kind).detach()
    for b in range(4):
        for t in range(6):
            assert abs(float(got[b, t]) - REFERENCES[kind](float(logp[b, t].detach()), float(ref[b, t]))) < 1e-12
    assert torch.autograd.gradcheck(lambda x: kl_estimate(x, ref, kind), (logp,))


def test_reference_is_treated_as_constant():
    logp = torch.tensor([[-1.0, -2.0]], dtype=F64, requires_grad=True)
    ref = torch.tensor([[-1.5, -1.0]], dtype=F64, requires_grad=True)
    kl_estimate(logp, ref, "k3").sum().backward()
    assert ref.grad is None
    # d k3 / d logp = 1 − exp(ref − logp)
    torch.testing.assert_close(logp.grad, 1 - torch.exp(ref.detach() - logp.detach()))


@given(st.lists(st.tuples(st.floats(-20, 0), st.floats(-20, 0)), min_size=1, max_size=8))
def test_property_k2_k3_nonnegative_and_zero_iff_equal(pairs):
    logp = torch.tensor([[p for p, _ in pairs]], dtype=F64)
    ref = torch.tensor([[r for _, r in pairs]], dtype=F64)
    for kind in ("k2", "k3"):
        values = kl_estimate(logp, ref, kind)
        assert (values >= 0).all()
        assert (values[logp == ref] == 0).all()


@given(st.floats(-1e-6, 1e-6))
def test_property_k3_precise_near_zero(delta):
    # k3 ≈ ½·k1² for small k1; a naive exp(−k1) − 1 + k1 would cancel to 0 or to noise
    logp = torch.tensor([[-1.0 + delta]], dtype=F64)
    got = float(kl_estimate(logp, torch.tensor([[-1.0]], dtype=F64), "k3"))
    k1 = float(logp) + 1.0
    assert abs(got - 0.5 * k1**2) <= 1e-6 * k1**2 + 1e-30


def test_errors():
    logp = torch.zeros(2, 3, dtype=F64)
    with pytest.raises(ValueError, match="valid: k1, k2, k3"):
        kl_estimate(logp, logp, "k4")
    with pytest.raises(ValueError, match=r"ref_logp\[2, 2\]"):
        kl_estimate(logp, torch.zeros(2, 2, dtype=F64), "k3")
    with pytest.raises(ValueError, match="dtype"):
        kl_estimate(logp, logp.float(), "k3")
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        kl_estimate(torch.zeros(3, dtype=F64), torch.zeros(3, dtype=F64), "k3")
    bad = logp.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="ref_logp"):
        kl_estimate(logp, bad, "k1")
    assert torch.isnan(kl_estimate(logp, bad, "k1", check_finite=False)[0, 0])
