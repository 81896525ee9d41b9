"""Advantage estimators: rewards [B] and group ids [B] in, advantages [B] or [B, T] out.

Every estimator is registered in `ADVANTAGE_ESTIMATORS` under one name with one signature,
`fn(rewards, group_ids, **params) -> Tensor`, and callers go through `compute_advantages`,
which validates the inputs once. Group statistics are segment reductions over group ids
(`index_add` / `scatter_reduce`), so nothing loops over groups, sequences or tokens; the one
loop is GAE's reversed pass over time, which is a recursion.

Conventions the tests hold:
- "std" is the unbiased sample std (as `torch.std`, N-1); eps is added to the std.
- A group whose rewards are all equal (a group of one included) gets advantage exactly 0,
  never a rounding residue and never NaN.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch

from unipo.core import validate
from unipo.core.registry import Registry

AdvantageFn = Callable[..., torch.Tensor]
ADVANTAGE_ESTIMATORS: Registry[AdvantageFn] = Registry("advantage estimator")

# Params that describe another set of samples (reference-policy rollouts), so they are [N], not [B].
_UNBATCHED_PARAMS = frozenset({"ref_rewards", "ref_group_ids"})


def compute_advantages(
    name: str,
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    check_finite: bool = True,
    **params: object,
) -> torch.Tensor:
    """Advantages of the estimator registered as `name`: [B] (sequence-level) or [B, T] (token-level).

    Validates rewards ([B] float, or [B, T] token rewards for `gae`), group_ids ([B] int) and every
    tensor param ([B], [B, T] with one T, or [N] for `ref_*`); NaN/inf raise unless
    `check_finite=False`. Unknown names raise ValueError listing the valid ones.
    """
    estimator = ADVANTAGE_ESTIMATORS.get(name)
    ADVANTAGE_ESTIMATORS.check_inputs(name, params)
    _validate_inputs(rewards, group_ids, params, check_finite)
    return estimator(rewards, group_ids, **params)


def _validate_inputs(
    rewards: torch.Tensor, group_ids: torch.Tensor, params: dict[str, object], check_finite: bool
) -> None:
    if not isinstance(rewards, torch.Tensor) or not rewards.is_floating_point():
        raise ValueError(f"rewards must be a float tensor, got {getattr(rewards, 'dtype', type(rewards))}")
    if rewards.dim() not in (1, 2):
        raise ValueError(f"rewards must be [B] (or [B, T] token rewards), got shape {list(rewards.shape)}")
    batch = rewards.shape[0]
    validate.check_group_ids(group_ids, batch)
    per_token = {"rewards": rewards} if rewards.dim() == 2 else {}
    tensors = {key: value for key, value in params.items() if isinstance(value, torch.Tensor)}
    for key, value in tensors.items():
        if key in _UNBATCHED_PARAMS:
            validate.check_ndim(key, value, 1)
        elif value.dim() == 1:
            validate.check_per_sequence(key, value, batch)
        elif value.dim() == 2 and value.shape[0] == batch:
            per_token[key] = value
        else:
            raise ValueError(f"{key} must be [B]=[{batch}] or [B, T]=[{batch}, T], got shape {list(value.shape)}")
    validate.check_same_shape(**per_token)
    validate.check_same_shape(ref_rewards=tensors.get("ref_rewards"), ref_group_ids=tensors.get("ref_group_ids"))
    if check_finite:
        validate.check_finite("rewards", rewards)
        for key, value in tensors.items():
            validate.check_finite(key, value)


def _check_int_keys(name: str, keys: torch.Tensor, batch: int) -> None:
    validate.check_per_sequence(name, keys, batch)
    if keys.is_floating_point() or keys.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got dtype {keys.dtype}")


# ---------------------------------------------------------------------------------------------
# Segment statistics over groups
# ---------------------------------------------------------------------------------------------


class _Segments(NamedTuple):
    index: torch.Tensor  # [B] segment of each row, 0..n-1
    count: torch.Tensor  # [n] rows per segment (float, rewards' dtype)
    n: int


def _segments(keys: torch.Tensor, like: torch.Tensor) -> _Segments:
    index, n = validate.group_index(keys)
    count = like.new_zeros(n).index_add_(0, index, torch.ones_like(like))
    return _Segments(index, count, n)


def _pair_keys(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """One id per distinct (first, second) pair, e.g. (group, stratum)."""
    _, inverse = torch.unique(torch.stack([first, second.to(first.dtype)]), dim=1, return_inverse=True)
    return inverse


def _segment_sum(x: torch.Tensor, seg: _Segments) -> torch.Tensor:
    return x.new_zeros(seg.n).index_add(0, seg.index, x)


def _safe_sqrt(variance: torch.Tensor) -> torch.Tensor:
    # sqrt'(0) is inf: the double `where` keeps the value exact and the gradient finite at 0.
    positive = variance > 0
    root = torch.sqrt(torch.where(positive, variance, torch.ones_like(variance)))
    return torch.where(positive, root, torch.zeros_like(variance))


def _segment_mean_std(x: torch.Tensor, seg: _Segments) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row group mean and unbiased group std (0 for a group of one)."""
    mean = (_segment_sum(x, seg) / seg.count)[seg.index]
    variance = _segment_sum((x - mean) ** 2, seg) / (seg.count - 1).clamp(min=1)
    return mean, _safe_sqrt(variance)[seg.index]


def _constant_rows(x: torch.Tensor, seg: _Segments) -> torch.Tensor:
    """[B] bool: the row's segment holds one distinct value (so its advantage is 0 by definition)."""
    x = x.detach()
    high = x.new_zeros(seg.n).scatter_reduce(0, seg.index, x, "amax", include_self=False)
    low = x.new_zeros(seg.n).scatter_reduce(0, seg.index, x, "amin", include_self=False)
    return (high == low)[seg.index]


def _zero_where_constant(advantages: torch.Tensor, rewards: torch.Tensor, seg: _Segments) -> torch.Tensor:
    # (r - mean) is a rounding residue, not 0, when a group is constant: pin it to exactly 0.
    return torch.where(_constant_rows(rewards, seg), torch.zeros_like(advantages), advantages)


def _group_standardised(rewards: torch.Tensor, seg: _Segments, eps: float) -> torch.Tensor:
    mean, std = _segment_mean_std(rewards, seg)
    return _zero_where_constant((rewards - mean) / (std + eps), rewards, seg)


def _group_centred(rewards: torch.Tensor, seg: _Segments) -> torch.Tensor:
    mean, _ = _segment_mean_std(rewards, seg)
    return _zero_where_constant(rewards - mean, rewards, seg)


def _batch_std(x: torch.Tensor) -> torch.Tensor:
    """Unbiased std over the whole batch; 0 (not NaN) for a batch of one."""
    variance = ((x - x.mean()) ** 2).sum() / max(x.numel() - 1, 1)
    return _safe_sqrt(variance)


# ---------------------------------------------------------------------------------------------
# Group-relative estimators
# ---------------------------------------------------------------------------------------------


@ADVANTAGE_ESTIMATORS.register("grpo")
def grpo_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, *, eps: float = 1e-6) -> torch.Tensor:
    """GRPO (DeepSeekMath, arXiv 2402.03300): A_i = (r_i - mean_g r) / (std_g r + eps).

    std_g is the unbiased group std (torch.std, N-1). Groups of one or of equal rewards give 0.
    """
    validate.check_ndim("rewards", rewards, 1)
    return _group_standardised(rewards, _segments(group_ids, rewards), eps)


@ADVANTAGE_ESTIMATORS.register("dr_grpo")
def dr_grpo_advantages(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Dr. GRPO (arXiv 2503.20783): A_i = r_i - mean_g r (no division by the group std)."""
    validate.check_ndim("rewards", rewards, 1)
    return _group_centred(rewards, _segments(group_ids, rewards))


@ADVANTAGE_ESTIMATORS.register("rloo")
def rloo_advantages(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """RLOO (arXiv 2402.14740): A_i = r_i - mean_{j != i, j in g} r_j; a group of one gives 0."""
    validate.check_ndim("rewards", rewards, 1)
    seg = _segments(group_ids, rewards)
    group_sum = _segment_sum(rewards, seg)[seg.index]
    others = (seg.count[seg.index] - 1).clamp(min=1)
    return _zero_where_constant(rewards - (group_sum - rewards) / others, rewards, seg)


@ADVANTAGE_ESTIMATORS.register("reinforce_pp")
def reinforce_pp_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, *, eps: float = 1e-6) -> torch.Tensor:
    """REINFORCE++-baseline (arXiv 2501.03262): x_i = r_i - mean_g r, then A = (x - mean_B x) / (std_B x + eps).

    The batch statistics run over the B sequences (unbiased std). mean_B x is 0 by construction
    (every group's centred rewards sum to 0), so it is not subtracted: that keeps constant groups
    at exactly 0 instead of a rounding residue. (verl whitens over tokens instead, which weights
    each sequence by its length; here each sequence counts once.)
    """
    validate.check_ndim("rewards", rewards, 1)
    centred = _group_centred(rewards, _segments(group_ids, rewards))
    return centred / (_batch_std(centred) + eps)


@ADVANTAGE_ESTIMATORS.register("bnpo")
def bnpo_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    reward_min: float = 0.0,
    reward_max: float = 1.0,
    max_weight: float = 1e6,
) -> torch.Tensor:
    """BNPO (arXiv 2506.02864): A_i = (r_i - p_g) / f(p_g; a_N, b_N), f the Beta pdf.

    r is first mapped to [0, 1] by (r - reward_min) / (reward_max - reward_min) (the paper's theory
    is for binary rewards). p_g is the group mean. A Beta(a, b) is fitted by moments to the p_g of
    the batch's groups with >= 2 samples: with m = mean(p_g), v = var(p_g) (unbiased),
    a = m * (m(1 - m)/v - 1), b = (1 - m) * (m(1 - m)/v - 1); the normaliser uses the paper's
    variance-minimising a_N = 1 + a/3, b_N = 1 + b/3, each clamped to >= 1 as in the authors'
    code. Degenerate fits (fewer than 2 groups, or v = 0) fall back to a_N = b_N = 1, i.e. f = 1
    and A = r - p (REINFORCE with a group baseline). 1/f is capped at `max_weight` (the authors'
    code caps at 1e6) so p at 0 or 1 gives a finite weight; the pdf is evaluated at p clamped to
    [0, 1]. Groups of one or of equal rewards give 0.
    """
    validate.check_ndim("rewards", rewards, 1)
    seg = _segments(group_ids, rewards)
    scaled = (rewards - reward_min) / (reward_max - reward_min)
    group_p = _segment_sum(scaled, seg) / seg.count  # [G]
    fitted_group = (seg.count > 1).to(scaled.dtype)
    n_fitted = fitted_group.sum()
    p_mean = (group_p * fitted_group).sum() / n_fitted.clamp(min=1)
    p_var = (((group_p - p_mean) ** 2) * fitted_group).sum() / (n_fitted - 1).clamp(min=1)
    usable = (n_fitted >= 2) & (p_var > 0)
    spread = p_mean * (1 - p_mean) / torch.where(usable, p_var, torch.ones_like(p_var)) - 1
    one = torch.ones_like(p_mean)
    a_norm = torch.where(usable, (1 + p_mean * spread / 3).clamp(min=1), one)
    b_norm = torch.where(usable, (1 + (1 - p_mean) * spread / 3).clamp(min=1), one)
    p = group_p[seg.index]
    p_in_support = p.clamp(0, 1)
    log_pdf = (
        torch.xlogy(a_norm - 1, p_in_support)  # xlogy: 0 * log 0 = 0 when a_N = 1
        + torch.xlogy(b_norm - 1, 1 - p_in_support)
        - (torch.lgamma(a_norm) + torch.lgamma(b_norm) - torch.lgamma(a_norm + b_norm))
    )
    weight = torch.exp(-log_pdf).clamp(max=max_weight)
    return _zero_where_constant((scaled - p) * weight, rewards, seg)


@ADVANTAGE_ESTIMATORS.register("stratified", inputs=("strata",))
def stratified_advantages(
    rewards: torch.Tensor, group_ids: torch.Tensor, *, strata: torch.Tensor, alpha: float, eps: float = 1e-6
) -> torch.Tensor:
    """Stratified GRPO (arXiv 2510.06214): A = alpha * A_SAN + (1 - alpha) * A_GN.

    Within each prompt group the trajectories are split into strata by `strata` [B] (int key, e.g.
    the number of search calls). A_SAN_i = (r_i - mean_{g,k} r) / (std_{g,k} r + eps) over the
    stratum k of row i inside its group g; A_GN is the plain GRPO advantage over the whole group.
    Both use the unbiased std, so alpha = 0 is exactly `grpo`; a stratum of one or of equal
    rewards contributes 0 to A_SAN.
    """
    validate.check_ndim("rewards", rewards, 1)
    _check_int_keys("strata", strata, rewards.shape[0])
    groups = _segments(group_ids, rewards)
    strata_in_groups = _segments(_pair_keys(groups.index, strata), rewards)
    within = _group_standardised(rewards, strata_in_groups, eps)
    overall = _group_standardised(rewards, groups, eps)
    return alpha * within + (1 - alpha) * overall


@ADVANTAGE_ESTIMATORS.register("seed_grpo", inputs=("answer_ids",))
def seed_grpo_advantages(
    rewards: torch.Tensor, group_ids: torch.Tensor, *, answer_ids: torch.Tensor, alpha: float, eps: float = 1e-6,
    std_normalise: bool = True,
) -> torch.Tensor:
    """SEED-GRPO (arXiv 2505.12346): A_i = A_base_i * (1 - alpha * SE_g / SE_max_g).

    A_base is GRPO's (r - mean) / (std + eps), or the paper's r - mean with `std_normalise=False`.

    SE_g = -sum_k p_k log p_k is the semantic entropy of the group's answers, clustered by
    `answer_ids` [B] (equal id = same final answer), with p_k = |C_k| / G the cluster's share of the
    group (the frequency estimate; the paper's Monte Carlo form weights clusters by sequence
    likelihood, which needs log-probs this estimator does not take). SE_max_g = log G, the entropy
    when every answer differs; a group of one has SE = 0. The modulation is the paper's linear f.
    """
    validate.check_ndim("rewards", rewards, 1)
    _check_int_keys("answer_ids", answer_ids, rewards.shape[0])
    groups = _segments(group_ids, rewards)
    clusters = _segments(_pair_keys(groups.index, answer_ids), rewards)
    group_size = groups.count[groups.index]
    cluster_share = clusters.count[clusters.index] / group_size
    # sum over the rows of a group of -log p_k(i) / G equals sum over clusters of -p_k log p_k.
    entropy = _segment_sum(-torch.log(cluster_share) / group_size, groups)
    several = groups.count > 1
    # log(1) = 0 for a group of one: divide by 1 there instead (its entropy is 0 anyway).
    max_entropy = torch.where(several, torch.log(groups.count), torch.ones_like(groups.count))
    normalised = torch.where(several, entropy / max_entropy, torch.zeros_like(entropy))
    base = _group_standardised(rewards, groups, eps) if std_normalise else _group_centred(rewards, groups)
    return base * (1 - alpha * normalised)[groups.index]


@ADVANTAGE_ESTIMATORS.register("rl_plus_explore", inputs=("logp", "mask", "off_policy"))
def rl_plus_explore_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    logp: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    off_policy: torch.Tensor | None = None,
    norm_by_std: bool = False,
    on_policy_stats: bool = False,
    eps: float = 1e-6,
) -> torch.Tensor:
    """RL-PLUS exploration-based advantage (arXiv 2508.00222), [B, T]:

        A[i, t] = A_i * (1 - sg(pi(y_t)))^gamma   on the rows marked by `off_policy`
        A[i, t] = A_i                             elsewhere, 0 on masked tokens,

    A_i = r_i - mean_g r (norm_by_std=False, the default), or (r_i - mean_g r) / (std_g r + eps)
    (norm_by_std=True, GRPO's), with the group statistics over all rows of the group, expert
    rows included; on_policy_stats=True takes them over the group's on-policy rows only (the
    code's unused `grpo_split`: there a zero std counts as 1, so expert rows of a constant group
    keep r - mean; on-policy rows of a constant group get 0 here, and a lone on-policy rollout
    gets 0 here but r there).

    Checked against the authors' code, YihongDong/RL-PLUS @eb4aa4d4e2d7ce206056f9d7740138bfc94fad8f
    (tests/golden/rl_plus.json): the released script exp_scripts/train_RL-PLUS.sh runs
    adv_estimator=grpo with grpo_use_std=False (`compute_grpo_outcome_advantage` in
    rl_plus/verl/verl/trainer/ppo/core_algos.py over every row of the group), and
    `compute_token_on_off_policy_loss` (rl_plus/verl/verl/recipe/rlplus_core_alg.py) multiplies
    the advantage of the expert (prefix) tokens by (1 - exp(sg logp))^0.5 with the *current*
    policy's log-prob. `off_policy` [B] bool marks the expert rows, so an on-policy-only batch is
    the plain group advantage. When `off_policy` is not given, the rows with positive advantage
    (the correct completions) take the weight instead. `logp` [B, T] is the log-prob in the
    weight: current log-probs at loss time give the code's choice, the rollout's log-probs the
    pi_old variant (the same in a batch's first update). `rl_plus` loss's explore_gamma puts the
    weight in the loss instead; use one or the other.
    """
    validate.check_ndim("rewards", rewards, 1)
    validate.check_ndim("logp", logp, 2)
    token_mask = validate.as_float_mask(mask, logp)
    if off_policy is not None:
        validate.check_per_sequence("off_policy", off_policy, rewards.shape[0])
    for name, flag in (("norm_by_std", norm_by_std), ("on_policy_stats", on_policy_stats)):
        if not isinstance(flag, bool):
            raise ValueError(f"{name} must be a bool, got {flag!r}")
    seg = _segments(group_ids, rewards)
    if on_policy_stats and off_policy is not None:
        sequence_advantage = _on_policy_group_advantage(rewards, seg, ~off_policy.bool(), norm_by_std, eps)
    elif norm_by_std:
        sequence_advantage = _group_standardised(rewards, seg, eps)
    else:
        sequence_advantage = _group_centred(rewards, seg)
    if off_policy is None:
        weighted_rows = sequence_advantage > 0
    else:
        weighted_rows = off_policy.bool()
    # 1 - exp(logp) via expm1: exact for probabilities near 1, where 1 - exp loses digits.
    unlikeliness = (-torch.expm1(logp.detach())).clamp(min=0) ** gamma
    weight = torch.where(weighted_rows[:, None], unlikeliness, torch.ones_like(unlikeliness))
    return sequence_advantage[:, None] * weight * token_mask


def _on_policy_group_advantage(
    rewards: torch.Tensor, seg: _Segments, on_policy: torch.Tensor, norm_by_std: bool, eps: float
) -> torch.Tensor:
    """r - mean (/ std) with the group statistics over the on-policy rows; a zero std counts as 1."""
    on = on_policy.to(rewards.dtype)
    count = _segment_sum(on, seg)
    mean = (_segment_sum(rewards * on, seg) / count.clamp(min=1))[seg.index]
    centred = rewards - mean
    if norm_by_std:
        std = _safe_sqrt(_segment_sum((centred * on) ** 2, seg) / (count - 1).clamp(min=1))[seg.index]
        centred = centred / (torch.where(std > 0, std, torch.ones_like(std)) + eps)
    values = rewards.detach()
    high = torch.where(on_policy, values, torch.full_like(values, -math.inf))
    low = torch.where(on_policy, values, torch.full_like(values, math.inf))
    high = values.new_full((seg.n,), -math.inf).scatter_reduce(0, seg.index, high, "amax")
    low = values.new_full((seg.n,), math.inf).scatter_reduce(0, seg.index, low, "amin")
    # on-policy rows of a group with one on-policy value, and every row of a constant group: exactly 0
    constant = ((high == low)[seg.index] & on_policy) | _constant_rows(rewards, seg)
    return torch.where(constant, torch.zeros_like(centred), centred)


@ADVANTAGE_ESTIMATORS.register("gtpo", inputs=("entropy", "mask"))
def gtpo_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    entropy: torch.Tensor,
    mask: torch.Tensor,
    entropy_scale: float = 0.1,
    entropy_threshold: float | None = 0.7,
    norm_by_std: bool = False,
    eps: float = 1e-6,
) -> torch.Tensor:
    """GTPO's entropy-shaped advantage (arXiv 2508.03772), [B]:

        A_i = (r_i - mean_g r) - entropy_scale * H_i     if H_i <= entropy_threshold
        A_i = 0                                           otherwise,

    H_i the mean of `entropy` [B, T] over row i's valid tokens (`mask`; 0 for an empty row), and
    (r_i - mean_g r) / (std_g r + eps) instead with norm_by_std=True. A constant group gets 0 for
    its group-relative part but still -0.1 * H_i: the code pushes the entropy of every calm
    completion down. entropy_threshold=None keeps every row (the `gtpo` selection then drops the
    high-entropy ones, as it does anyway).

    Checked against the authors' code, winstonsmith1897/GTPO @5d33811e8ea1cf76c665db65b247cef9d1e436dd
    (tests/golden/gtpo.json): gtpo/gtpo_training.py computes `advantages = rewards - group mean`
    (the std division is commented out) in `_prepare_inputs`, then in
    `UnslothEfficientGTPO.forward` `adv - ENT_SCALE * entropy` where entropy <= ENT_THRESHOLD and
    0 elsewhere (ENT_SCALE = 0.1, ENT_THRESHOLD = 0.7; `compute_completion_stats` gives the mean
    token entropy of the completion). The sign of the unshaped advantage decides GTPO's conflict
    tokens: the `gtpo` selection reads it from the rewards (sign_from="rewards").
    """
    validate.check_ndim("rewards", rewards, 1)
    validate.check_ndim("entropy", entropy, 2)
    token_mask = validate.as_float_mask(mask, entropy)
    if entropy.shape[0] != rewards.shape[0]:
        raise ValueError(f"entropy must be [B, T] with B={rewards.shape[0]}, got shape {list(entropy.shape)}")
    if not isinstance(norm_by_std, bool):
        raise ValueError(f"norm_by_std must be a bool, got {norm_by_std!r}")
    seg = _segments(group_ids, rewards)
    base = _group_standardised(rewards, seg, eps) if norm_by_std else _group_centred(rewards, seg)
    mean_entropy = (entropy * token_mask).sum(1) / token_mask.sum(1).clamp(min=1)
    shaped = base - entropy_scale * mean_entropy.to(base.dtype)
    if entropy_threshold is None:
        return shaped
    return torch.where(mean_entropy <= entropy_threshold, shaped, torch.zeros_like(shaped))


@ADVANTAGE_ESTIMATORS.register("a_star")
def a_star_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    beta: float,
    ref_rewards: torch.Tensor | None = None,
    ref_group_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """A*-PO (arXiv 2505.20686): A_i = r_i - V*(x_g), V*(x) = beta * log mean_j exp(r_j / beta).

    The r_j are rewards of reference-policy samples of the same prompt: `ref_rewards` [N] with
    `ref_group_ids` [N] (ids shared with `group_ids`). When both are absent, the group's own
    rewards stand in for the reference samples (exact when the rollouts come from pi_ref, as in
    the paper's first stage; an approximation otherwise). Computed as a max-shifted logsumexp, so
    a constant group gives exactly 0. Every batch group must have reference samples.
    """
    validate.check_ndim("rewards", rewards, 1)
    if (ref_rewards is None) != (ref_group_ids is None):
        raise ValueError("a_star needs both ref_rewards and ref_group_ids, or neither")
    if ref_rewards is None or ref_group_ids is None:
        ref_rewards, ref_group_ids = rewards, group_ids
    batch = rewards.shape[0]
    keys, inverse = torch.unique(torch.cat([group_ids, ref_group_ids]), return_inverse=True)
    row_group, ref_group = inverse[:batch], inverse[batch:]
    ref_count = ref_rewards.new_zeros(keys.numel()).index_add(0, ref_group, torch.ones_like(ref_rewards))
    reference = _Segments(ref_group, ref_count, keys.numel())
    if bool((ref_count[row_group] == 0).any()):
        raise ValueError("a_star: some groups in the batch have no reference rewards")
    # Any shift m gives the same V* (m cancels), so a detached max keeps gradients exact.
    peak = ref_rewards.new_zeros(reference.n).scatter_reduce(
        0, ref_group, ref_rewards.detach(), "amax", include_self=False
    )
    mean_exp = _segment_sum(torch.exp((ref_rewards - peak[ref_group]) / beta), reference) / ref_count.clamp(min=1)
    v_star = peak + beta * torch.log(mean_exp)
    return rewards - v_star[row_group]


# ---------------------------------------------------------------------------------------------
# Value-based estimators
# ---------------------------------------------------------------------------------------------


@ADVANTAGE_ESTIMATORS.register("single_stream", inputs=("baseline",))
def single_stream_advantages(
    rewards: torch.Tensor, group_ids: torch.Tensor, *, baseline: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """SPO, Single-stream Policy Optimization (arXiv 2509.13232): A = r - v(x), then normalised
    over the batch: A = (x - mean_B x) / (std_B x + eps), unbiased std.

    `baseline` [B] is the per-prompt value v(x), e.g. `value_tracker_mean` of the prompt's tracker
    before this step's update. group_ids are not used: SPO has no groups.
    """
    validate.check_ndim("rewards", rewards, 1)
    validate.check_per_sequence("baseline", baseline, rewards.shape[0])
    residual = rewards - baseline
    return (residual - residual.mean()) / (_batch_std(residual) + eps)


def value_tracker_update(
    alpha: torch.Tensor,
    beta: torch.Tensor,
    rewards: torch.Tensor,
    kl: torch.Tensor,
    *,
    half_life_kl: float = 0.06,
    rho_min: float = 0.875,
    rho_max: float = 0.96,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SPO's KL-adaptive Beta tracker (arXiv 2509.13232), one step for P prompts (all [P]):

        rho = clip(2^(-D / D_half), rho_min, rho_max)
        alpha' = rho * alpha + r,    beta' = rho * beta + (1 - r)

    r in [0, 1] is the prompt's new reward; D (`kl`) is the divergence between the current policy
    and the one that last answered the prompt (the authors' code: the token mean of
    |old_logp - new_logp| over that earlier response). The more the policy moved, the more of the
    old evidence is forgotten. D_half = 0.06 and rho_max = 0.96 are the authors' code values;
    rho_min = 0.875 (an effective memory of 1/(1 - rho) = 8 samples) is the paper's lower clip.
    """
    validate.check_same_shape(alpha=alpha, beta=beta, rewards=rewards, kl=kl)
    rho = torch.pow(2.0, -kl / half_life_kl).clamp(rho_min, rho_max)
    return rho * alpha + rewards, rho * beta + (1 - rewards)


def value_tracker_mean(alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """The tracker's value estimate v(x) = alpha / (alpha + beta), the Beta posterior mean."""
    validate.check_same_shape(alpha=alpha, beta=beta)
    return alpha / (alpha + beta)


@ADVANTAGE_ESTIMATORS.register("gae", inputs=("values", "mask"))
def gae_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 1.0,
) -> torch.Tensor:
    """GAE (arXiv 1506.02438) as used by PPO (arXiv 1707.06347), [B, T]:

        delta_t = r_t + gamma * V_{t+1} - V_t,    A_t = delta_t + gamma * lam * A_{t+1}

    over the valid tokens of each row, with V = 0 after the last valid token. `rewards` is [B]
    (placed on each row's last valid token) or [B, T] token rewards; `values` and `mask` are [B, T]
    and the mask is read as 0/1. Masked tokens get 0 and are skipped by the recursion (their
    reward and value are ignored; the next valid token's value and advantage carry across), so a
    mask with holes (e.g. tool output) links each valid token to the next valid one. group_ids are
    not used.
    """
    validate.check_ndim("values", values, 2)
    token_mask = validate.as_float_mask(mask, values)
    if rewards.dim() == 1:
        validate.check_per_sequence("rewards", rewards, values.shape[0])
        token_rewards = _on_last_valid_token(rewards.to(values.dtype), token_mask)
    else:
        validate.check_same_shape(rewards=rewards, values=values)
        token_rewards = rewards.to(values.dtype)
    running = values.new_zeros(values.shape[0])  # A of the next valid token  # (B,)
    next_value = values.new_zeros(values.shape[0])  # V of the next valid token  # (B,)
    columns = []
    for t in reversed(range(values.shape[1])):  # a recursion over time: vectorised over B only
        valid = token_mask[:, t]
        step = token_rewards[:, t] + gamma * next_value - values[:, t] + gamma * lam * running
        columns.append(step * valid)
        running = valid * step + (1 - valid) * running
        next_value = valid * values[:, t] + (1 - valid) * next_value
    return torch.stack(columns[::-1], dim=1)  # (B, T)


def gae_returns(advantages: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Value targets for the critic: returns = advantages + values (both [B, T]; mask at loss time)."""
    validate.check_same_shape(advantages=advantages, values=values)
    return advantages + values


def _on_last_valid_token(rewards: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    """[B] rewards -> [B, T] with each reward on its row's last valid token (all-masked rows: none)."""
    positions = torch.arange(token_mask.shape[1], device=token_mask.device).expand_as(token_mask)
    last = torch.where(token_mask > 0, positions, torch.full_like(positions, -1)).amax(dim=1)  # (B,)
    placed = torch.where(last >= 0, rewards, torch.zeros_like(rewards))
    return torch.zeros_like(token_mask).scatter(1, last.clamp(min=0)[:, None], placed[:, None])
