"""Per-token estimators of the KL divergence between the policy π and a frozen reference π_ref.

With k1 = log π(y_t) − log π_ref(y_t) on tokens sampled from π (Schulman, "Approximating KL
Divergence", 2020, http://joschu.net/blog/kl-approx.html):

    k1 = k1                      unbiased for KL(π‖π_ref), high variance, can be negative
    k2 = ½·k1²                   biased, low variance, ≥ 0
    k3 = exp(−k1) + k1 − 1       unbiased for KL(π‖π_ref), low variance, ≥ 0

The estimators are used either in the loss (coefficient β, GRPO arXiv 2402.03300 uses k3) or
subtracted from the reward. Every call goes through `kl_estimate`, which checks the inputs and
treats π_ref as a constant (its log-probs are detached: the reference is frozen).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from unipo.core.registry import Registry
from unipo.core.validate import check_finite as _check_finite
from unipo.core.validate import check_ndim, check_same_shape

KLEstimator = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

KL_ESTIMATORS: Registry[KLEstimator] = Registry("KL estimator")


@KL_ESTIMATORS.register("k1")
def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k1 = log π − log π_ref (per token)."""
    return logp - ref_logp


@KL_ESTIMATORS.register("k2")
def kl_k2(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k2 = ½·(log π − log π_ref)² (per token)."""
    return 0.5 * (logp - ref_logp) ** 2


@KL_ESTIMATORS.register("k3")
def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k3 = exp(−k1) + k1 − 1 with k1 = log π − log π_ref (per token; Schulman's estimator).

    Written as expm1(−k1) + k1: for the small k1 of a policy near its reference, exp(−k1) − 1
    computed directly loses most of its digits to cancellation. Below |k1| = 1e-3 even that
    sum cancels (expm1's rounding is relative to k1, the result is ~k1²/2), so there the
    series k1²/2 − k1³/6 + k1⁴/24 is used (truncation error below k1⁵/120).
    """
    k1 = logp - ref_logp
    exact = torch.expm1(-k1) + k1
    series = k1 * k1 * (0.5 - k1 / 6 + k1 * k1 / 24)
    return torch.where(k1.abs() < 1e-3, series, exact)


def kl_estimate(
    logp: torch.Tensor, ref_logp: torch.Tensor, kind: str, *, check_finite: bool = True
) -> torch.Tensor:
    """Per-token KL estimate `[B, T]` of kind `kind` (k1, k2 or k3; see the module docstring).

    `ref_logp` is detached: π_ref is frozen, gradients flow only into `logp`. Padding is not
    masked here; the caller aggregates with its completion mask.
    """
    estimator = KL_ESTIMATORS.get(kind)
    check_ndim("logp", logp, 2)
    check_same_shape(logp=logp, ref_logp=ref_logp)
    if logp.dtype != ref_logp.dtype:
        raise ValueError(f"logp has dtype {logp.dtype} but ref_logp has dtype {ref_logp.dtype}")
    if check_finite:
        _check_finite("logp", logp)
        _check_finite("ref_logp", ref_logp)
    return estimator(logp, ref_logp.detach())
