"""Rollout correction: importance weights for the mismatch between the engine that sampled and the trainer.

A rollout engine (vLLM) computes its sampling log-probs with other kernels, and often in other precision, than
the trainer's forward, so the tokens were drawn from pi_sampler, not from the trainer's pi_old. Truncated
importance sampling (TIS; Yao et al. 2025, "Your Efficient RL Framework Secretly Brings You Off-Policy RL
Training") reweights each token's policy-gradient term by

    rho_t = pi_old(y_t) / pi_sampler(y_t) = exp(logp_old_t - logp_sampler_t)

truncated from above (and optionally below). unipo follows TRL's implementation (GRPOConfig
`vllm_importance_sampling_mode`, TRL 1.16.0) and its four modes:

    token_truncate      w_t = clip(rho_t, c_min, c_max)
    token_mask          w_t = rho_t if c_min <= rho_t <= c_max else 0
    sequence_truncate   w_t = clip(prod_t rho_t, c_min, c_max)          (one weight per sequence)
    sequence_mask       w_t = prod_t rho_t if within [c_min, c_max] else 0

The weights are constants (no gradient) multiplied into the per-token loss.
"""

from __future__ import annotations

import math

import torch

CORRECTION_MODES = ("none", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


def rollout_correction(trainer_logp: torch.Tensor, sampling_logp: torch.Tensor, mask: torch.Tensor, mode: str,
                       c_max: float | None = 3.0, c_min: float | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Per-token weights [B, T] (1 outside `mask`) and their statistics (`rollout/is_weight_mean`, `_max`,
    `rollout/is_corrected_frac`: the share of masked tokens whose weight was clipped or zeroed)."""
    if mode not in CORRECTION_MODES:
        raise ValueError(f"rollout correction mode {mode!r}: expected one of {', '.join(CORRECTION_MODES)}")
    keep = mask.bool()
    if mode == "none":
        return torch.ones_like(trainer_logp, dtype=torch.float32), {}
    diff = torch.where(keep, trainer_logp.float() - sampling_logp.float(), 0.0).detach()
    diff = torch.nan_to_num(diff, nan=0.0)  # a token without a sampling log-prob is left uncorrected
    if mode.startswith("sequence"):
        diff = diff.sum(dim=1, keepdim=True).expand_as(diff)
    ratio = diff.exp()
    low = -math.inf if c_min is None else c_min
    high = math.inf if c_max is None else c_max
    if mode.endswith("truncate"):
        weights = ratio.clamp(min=low, max=high)
        changed = (ratio < low) | (ratio > high)
    else:
        changed = (ratio < low) | (ratio > high)
        weights = ratio.masked_fill(changed, 0.0)
    weights = torch.where(keep, weights, 1.0)
    n = int(keep.sum())
    stats = {"rollout/is_weight_mean": float(weights[keep].mean()) if n else 1.0,
             "rollout/is_weight_max": float(weights[keep].max()) if n else 1.0,
             "rollout/is_corrected_frac": float((changed & keep).sum()) / n if n else 0.0}
    return weights, stats
