"""Entropy regularisers: the entropy slot of the loss.

The update subtracts `entropy_coef * term` from the loss (a positive term rewards entropy). Every regulariser in
`ENTROPY_REGULARISERS` has one signature,

    fn(entropy, mask, aggregation, *, denominator=None, max_len=None, **declared_inputs, **params)
        -> (term 0-dim, metrics)

`entropy` is the current policy's per-token entropy H[i, t] `[B, T]` *with* its gradient, `mask` the trained
tokens `[B, T]`, and `aggregation`, `denominator`, `max_len` are `unipo.core.losses.aggregate`'s: pass the whole
mini-batch's denominator to every micro-batch and the micro-batch terms sum to the mini-batch's term (gradient
accumulation and the ranks' sum stay exact). Declared inputs come from the batch (`unipo.slots.INPUTS`); a
per-row one arrives restricted to the micro-batch's rows.

- `bonus`, the plain entropy bonus (PPO's c2·S term):  term = agg(H).
- `epo`, EPO (arXiv 2509.22576), as the authors' code computes it (WujiangXu/EPO @5b6fa98e,
  verl/workers/actor/dp_actor.py: `update_policy`, `generate_entropy_penalty`,
  `_calculate_epoch_based_entropy_weight`; verl/trainer/ppo/ray_trainer.py and
  agent_system/multi_turn_rollout/rollout_loop.py for the history):

      term = agg(H) − c_s · w(k) · agg(P)

  H̄_i, the historical entropy of row i, is the mean over the training steps so far (this one included) of each
  step's token-mean π_old entropy at row i's turn index (`entropy_history`, kept by the trainer: see
  `turn_entropy_means`, `accumulate_turn_history`, `history_per_row`). The band of row i is
  (κ_l·H̄_i, κ_r·H̄_i), open at both ends, and the per-token penalty is

      P[i, t] = p · 1[H[i, t] ∉ (κ_l·H̄_i, κ_r·H̄_i)]                    shape = "constant" (the authors')
      P[i, t] = p · (relu(κ_l·H̄_i − H[i, t]) + relu(H[i, t] − κ_r·H̄_i))  shape = "hinge"    (not the authors')

  on rows whose turn index is ≥ `min_turn` and whose H̄_i is known (0 elsewhere); with level = "seq" each row's
  masked token mean of H stands for every H[i, t]. The constant penalty is a step function of H: it has no
  gradient (the authors' `torch.where(within, 0, p)`), so `epo` with shape = "constant" moves the weights
  exactly as `bonus` does and only shifts the loss's value; "hinge" is our differentiable reading of the
  paper's band (gradient −p·c_s·w below it, +p·c_s·w above it, per unit of H, in the loss). w(k) is the phase
  weight (`phase_weight`) when `phase_weights`, else 1.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from numbers import Real

import torch

from unipo.core.losses import aggregate
from unipo.core.registry import Registry
from unipo.core.validate import as_float_mask, check_ndim, check_per_sequence

EntropyRegulariser = Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]

ENTROPY_REGULARISERS: Registry[EntropyRegulariser] = Registry("entropy regulariser")


@ENTROPY_REGULARISERS.register("bonus")
def entropy_bonus(entropy: torch.Tensor, mask: torch.Tensor, aggregation: str, *,
                  denominator: torch.Tensor | float | None = None, max_len: int | None = None
                  ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """term = agg(H): the entropy bonus, aggregated like the policy loss."""
    return aggregate(entropy, mask, aggregation, denominator=denominator, max_len=max_len), {}


@ENTROPY_REGULARISERS.register("epo", inputs=("entropy_history", "turn_index", "step", "total_steps"))
def epo_entropy(entropy: torch.Tensor, mask: torch.Tensor, aggregation: str, *,
                denominator: torch.Tensor | float | None = None, max_len: int | None = None,
                entropy_history: torch.Tensor, turn_index: torch.Tensor, step: int, total_steps: int,
                smooth_coef: float = 1.0, band_low: float = 0.8, band_high: float = 1.2, penalty: float = 0.1,
                level: str = "token", shape: str = "constant", phase_weights: bool = False, min_turn: int = 25,
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """term = agg(H) − smooth_coef · w(step) · agg(P) (module docstring). Defaults are the authors' config's
    (verl/trainer/config/ppo_trainer.yaml: entropy_smooth_coeff 1.0, entropy_smooth_min_ratio 0.8, max_ratio
    1.2, out_range_penalty 0.1, mask_mode token, enable_smooth_weights False); `min_turn` = 25 is their
    effective gate (`max_step // 2` of a config key never set, default 50). `entropy_history` [B] is H̄ of each
    row (NaN: none yet), `turn_index` [B] its turn. Metrics: `entropy_out_of_band_frac` (the share of the trained
    tokens that pay the penalty: gated, with a history, outside the band), `entropy_phase_weight` w,
    `entropy_smooth_penalty` agg(P)."""
    coef = _number("smooth_coef", smooth_coef, low=0.0)
    low = _number("band_low", band_low, low=0.0)
    high = _number("band_high", band_high, low=0.0)
    if high <= low:
        raise ValueError(f"band_high must be > band_low = {low}, got {high}")
    p = _number("penalty", penalty, low=0.0)
    if level not in ("token", "seq"):
        raise ValueError(f"level must be 'token' or 'seq', got {level!r}")
    if shape not in ("constant", "hinge"):
        raise ValueError(f"shape must be 'constant' or 'hinge', got {shape!r}")
    if not isinstance(phase_weights, bool):
        raise ValueError(f"phase_weights must be true or false, got {phase_weights!r}")
    if isinstance(min_turn, bool) or not isinstance(min_turn, int) or min_turn < 0:
        raise ValueError(f"min_turn must be an int >= 0, got {min_turn!r}")
    check_ndim("entropy", entropy, 2)
    check_per_sequence("entropy_history", entropy_history, entropy.shape[0])
    check_per_sequence("turn_index", turn_index, entropy.shape[0])
    m = as_float_mask(mask, entropy)
    # the constant penalty compares a detached H: a step function carries no gradient (as the authors' where)
    current = entropy if shape == "hinge" else entropy.detach()
    if level == "seq":  # the row's token mean stands for each of its tokens
        row_mean = (current * m).sum(1) / m.sum(1).clamp(min=1)
        current = row_mean[:, None].expand_as(entropy)
    h_bar = entropy_history.to(entropy.dtype)[:, None]  # (B, 1)
    lower, upper = low * h_bar, high * h_bar
    inside = (current > lower) & (current < upper)  # open band: a token on its edge is outside (the authors')
    if shape == "constant":
        per_token = p * (~inside).to(entropy.dtype)
    else:
        per_token = p * (torch.relu(lower - current) + torch.relu(current - upper))
    gated = ((turn_index >= min_turn) & torch.isfinite(entropy_history))[:, None]  # (B, 1)
    per_token = torch.where(gated, per_token, torch.zeros_like(per_token))  # where, not *: H̄ = NaN off the gate
    weight = phase_weight(step, total_steps) if phase_weights else 1.0
    bonus = aggregate(entropy, m, aggregation, denominator=denominator, max_len=max_len)
    smooth = aggregate(per_token, m, aggregation, denominator=denominator, max_len=max_len)
    penalised = m * gated * ~inside  # a masked token mean over every trained token, as clip_frac
    metrics = {"entropy_out_of_band_frac": (penalised.sum() / m.sum().clamp(min=1)).detach(),
               "entropy_phase_weight": torch.tensor(weight, dtype=entropy.dtype, device=entropy.device),
               "entropy_smooth_penalty": smooth.detach()}
    return bonus - coef * weight * smooth, metrics


def compute_entropy_term(name: str, entropy: torch.Tensor, mask: torch.Tensor, aggregation: str, *,
                         denominator: torch.Tensor | float | None = None, max_len: int | None = None,
                         **kwargs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The term of regulariser `name` (the loss subtracts entropy_coef times it) and its metrics; `kwargs` are
    its params and declared inputs."""
    return ENTROPY_REGULARISERS.get(name)(entropy, mask, aggregation, denominator=denominator, max_len=max_len,
                                          **kwargs)


def phase_weight(step: int, total_steps: int) -> float:
    """EPO's phase weight of the smoothing penalty at step k of K (`_calculate_epoch_based_entropy_weight`):

        k ≤ K//2:  w = 1 − 0.2·(1 − exp(−2·k/(K//2)))                  (1 at k = 0, 0.827 at k = K//2)
        k > K//2:  w = 0.8·exp(−3·(k − K//2)/(K − K//2))               (0.8·e^-3 = 0.040 at k = K)

    k clamped to [0, K]; K ≤ 0 gives 1; K//2 = 0 gives 1 in the first branch. The two branches do not meet at
    K//2 (0.827 -> 0.8·e^(-3/(K-K//2))): the authors' shape, kept."""
    if total_steps <= 0:
        return 1.0
    k = max(0, min(step, total_steps))
    half = total_steps // 2
    if k <= half:
        return 1.0 if half == 0 else 1.0 - 0.2 * (1.0 - math.exp(-2.0 * k / half))
    return 0.8 * math.exp(-3.0 * (k - half) / (total_steps - half))


# -- the historical entropy (its state is held by the trainer: unipo.update.EntropyHistory) -------------------------

def turn_entropy_means(entropy: torch.Tensor, mask: torch.Tensor, turn_index: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """One step's token-mean entropy at each turn index k = 0..max(turn_index):

        mean[k] = Σ_{i: turn_i = k} Σ_t H[i, t]·m[i, t] / Σ_{i: turn_i = k} Σ_t m[i, t]

    (the authors' per-turn `(entropys * response_mask).sum() / response_mask.sum()` over the batch), and
    present[k] = the step has a masked token at turn k (mean[k] = 0 where not)."""
    check_ndim("entropy", entropy, 2)
    check_per_sequence("turn_index", turn_index, entropy.shape[0])
    m = as_float_mask(mask, entropy)
    n_turns = int(turn_index.max()) + 1 if turn_index.numel() else 0
    sums = entropy.new_zeros(n_turns).index_add_(0, turn_index, (entropy * m).sum(1))
    tokens = entropy.new_zeros(n_turns).index_add_(0, turn_index, m.sum(1))
    present = tokens > 0
    return torch.where(present, sums / tokens.clamp(min=1e-30), torch.zeros_like(sums)), present


def accumulate_turn_history(sums: torch.Tensor, counts: torch.Tensor, step_means: torch.Tensor,
                            present: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The running per-turn sums and step counts after one more step (`turn_entropy_means`'s output), grown to
    the longest turn index seen. H̄[k] = sums[k] / counts[k] is then the mean over the steps that had turn k."""
    n = max(len(sums), len(step_means))
    grown_sums = sums.new_zeros(n)
    grown_counts = counts.new_zeros(n)
    grown_sums[:len(sums)] = sums
    grown_counts[:len(counts)] = counts
    grown_sums[:len(step_means)] += torch.where(present, step_means.to(sums.dtype), grown_sums.new_zeros(()))
    grown_counts[:len(present)] += present.to(counts.dtype)
    return grown_sums, grown_counts


def history_per_row(sums: torch.Tensor, counts: torch.Tensor, turn_index: torch.Tensor) -> torch.Tensor:
    """[B]: H̄ of each row's turn index, NaN for a turn no step has had yet."""
    known = torch.cat([sums / counts.clamp(min=1), sums.new_full((1,), math.nan)])
    known[:len(counts)][counts == 0] = math.nan
    return known[turn_index.clamp(max=len(counts))]


def _number(name: str, value: object, *, low: float) -> float:
    """A finite plain number >= low, else a one-line ValueError."""
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(float(value)):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return float(value)
