"""Token and sample selection: which tokens of a batch get a gradient, and with what weight.

Every rule is registered in `SELECTIONS` with one signature,

    fn(mask [B, T], *, rewards [B], advantages [B] or [B, T], entropy [B, T] or None,
       group_ids [B], **params) -> weights [B, T] (float)

A weight of 0 drops a token (a sample-level rule drops the whole row); a positive weight keeps
it and scales its gradient. Weights are always 0 outside the completion mask. Rules are called
through `compute_selection`, which checks shapes, finiteness and parameter names; extra inputs
a rule needs (`truncated`, `token_ids`, ...) are keyword-only params, and a missing or unknown
one is a ValueError naming the valid ones.

Where a rule needs one advantage per completion and is given a [B, T] advantage, the
per-completion value is the mean over the completion's valid tokens (0 for an empty row).
Everything is vectorised: groups are handled with sort / scatter / index_add, never a Python
loop over groups, sequences or tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from numbers import Real

import torch

from . import validate
from .registry import Registry

SelectionFn = Callable[..., torch.Tensor]

SELECTIONS: Registry[SelectionFn] = Registry("selection")


# --------------------------------------------------------------------------------------------
# shared pieces


def _valid(mask: torch.Tensor) -> torch.Tensor:
    """Bool [B, T]: the tokens the completion mask keeps (bool mask, or float mask != 0)."""
    return mask if mask.dtype == torch.bool else mask != 0


def _weight_dtype(advantages: torch.Tensor) -> torch.dtype:
    return advantages.dtype if advantages.is_floating_point() else torch.get_default_dtype()


def _row_mean(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean of `values` [B, T] over each row's valid tokens; 0 for a row without any."""
    count = valid.sum(dim=1)
    total = torch.where(valid, values, torch.zeros_like(values)).sum(dim=1)
    return total / count.clamp(min=1).to(values.dtype)


def _sequence_advantage(advantages: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """One advantage per completion [B]: as given, or the mean over valid tokens of a [B, T] one."""
    return advantages if advantages.dim() == 1 else _row_mean(advantages, valid)


def _token_advantage(advantages: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """The advantage on every token [B, T] (a [B] advantage is constant over the row)."""
    return advantages.unsqueeze(1).expand(valid.shape) if advantages.dim() == 1 else advantages


def _ceil_count(fraction: float, count: torch.Tensor) -> torch.Tensor:
    """ceil(fraction · count) as int64, robust to float noise (0.2 · 15 = 3.0000000000000004 -> 3)."""
    exact = fraction * count.to(torch.float64)
    return torch.ceil(exact - 1e-9 * exact.clamp(min=1.0)).clamp(min=0).to(torch.int64)


def _rank_within_group(
    group_index: torch.Tensor, n_groups: int, score: torch.Tensor, *, descending: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row: its 0-based rank by `score` inside its group, and the group's start/size.

    Ties are broken by row index (stable sorts), so the result is deterministic. Returns
    (rank [B], order [B], counts [n_groups]); `order` lists rows grouped by group id, each group
    sorted by score.
    """
    order = torch.argsort(score, descending=descending, stable=True)
    order = order[torch.argsort(group_index[order], stable=True)]  # group-major, score-minor
    counts = torch.bincount(group_index, minlength=n_groups)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=order.device) - starts[group_index[order]]
    return rank, order, counts


def _top_fraction_of_tokens(score: torch.Tensor, valid: torch.Tensor, fraction: float) -> torch.Tensor:
    """Bool [B, T]: the ceil(fraction · N) valid tokens with the largest score, N = #valid.

    Ties go to the earlier token in row-major order (a stable sort), so exactly that many are
    kept whatever the ties.
    """
    flat_valid = valid.reshape(-1)
    flat_score = torch.where(flat_valid, score.reshape(-1), torch.full_like(score.reshape(-1), -math.inf))
    order = torch.argsort(flat_score, descending=True, stable=True)  # invalid (-inf) tokens sort last
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=order.device)
    keep = (rank < _ceil_count(fraction, flat_valid.sum())) & flat_valid
    return keep.reshape(valid.shape)


def _require_fraction(name: str, value: object, *, allow_zero: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    value = float(value)
    if not (0.0 <= value <= 1.0) or (value == 0.0 and not allow_zero):
        bound = "[0, 1]" if allow_zero else "(0, 1]"
        raise ValueError(f"{name} must be in {bound}, got {value}")
    return value


def _require_row_flags(name: str, flags: object, batch: int) -> torch.Tensor:
    if not isinstance(flags, torch.Tensor) or flags.dtype != torch.bool:
        raise ValueError(f"{name} must be a bool [B] tensor, got {getattr(flags, 'dtype', type(flags).__name__)}")
    validate.check_per_sequence(name, flags, batch)
    return flags


def informative_groups(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Bool [B]: True where the row's group has at least two different rewards.

    DAPO's dynamic sampling (arXiv 2503.14476, §3.2) keeps only these groups: a group whose
    rewards are all equal (all correct, all wrong, or a single member) has zero group-relative
    advantage and contributes no gradient. Resampling to refill the batch is the trainer's job.
    """
    validate.check_ndim("rewards", rewards, 1)
    validate.check_group_ids(group_ids, rewards.shape[0])
    group_index, n_groups = validate.group_index(group_ids)
    values = rewards.to(torch.float64)
    high = torch.full((n_groups,), -math.inf, dtype=torch.float64, device=values.device)
    low = torch.full((n_groups,), math.inf, dtype=torch.float64, device=values.device)
    high = high.scatter_reduce(0, group_index, values, reduce="amax", include_self=False)
    low = low.scatter_reduce(0, group_index, values, reduce="amin", include_self=False)
    return (high > low)[group_index]


def overlong_reward_penalty(lengths: torch.Tensor, max_len: int, cache_len: int) -> torch.Tensor:
    """DAPO's soft overlong punishment (arXiv 2503.14476, eq. 13), one value per completion [B].

        R(L) = 0                                 if L <= max_len − cache_len
             = (max_len − cache_len − L)/cache_len  if max_len − cache_len < L <= max_len
             = −1                                if L > max_len

    i.e. 0 until the last `cache_len` tokens of the budget, then linear down to −1 at `max_len`.
    It is added to the task reward before advantages are computed.
    """
    if not isinstance(lengths, torch.Tensor):
        raise ValueError(f"lengths must be a [B] tensor, got {type(lengths).__name__}")
    validate.check_ndim("lengths", lengths, 1)
    for name, value in (("max_len", max_len), ("cache_len", cache_len)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an int, got {value!r}")
    if not 0 < cache_len <= max_len:
        raise ValueError(f"need 0 < cache_len <= max_len, got cache_len={cache_len}, max_len={max_len}")
    dtype = lengths.dtype if lengths.is_floating_point() else torch.get_default_dtype()
    penalty = (max_len - cache_len - lengths.to(dtype)) / cache_len
    return penalty.clamp(min=-1.0, max=0.0)


# --------------------------------------------------------------------------------------------
# the rules


@SELECTIONS.register("none")
def _select_none(mask, *, rewards, advantages, entropy, group_ids) -> torch.Tensor:
    """Every valid token with weight 1 (no selection)."""
    return _valid(mask).to(_weight_dtype(advantages))


@SELECTIONS.register("dynamic_sampling")
def _select_dynamic_sampling(mask, *, rewards, advantages, entropy, group_ids) -> torch.Tensor:
    """DAPO (arXiv 2503.14476): drop every row of a group whose rewards are all equal."""
    keep_row = informative_groups(rewards, group_ids)
    return (_valid(mask) & keep_row.unsqueeze(1)).to(_weight_dtype(advantages))


@SELECTIONS.register("overlong_filter", inputs=("truncated",))
def _select_overlong_filter(mask, *, rewards, advantages, entropy, group_ids, truncated) -> torch.Tensor:
    """DAPO (arXiv 2503.14476, §3.4 overlong filtering): drop completions cut off at the budget.

    `truncated` [B] bool marks them; the soft alternative is `overlong_reward_penalty`.
    """
    truncated = _require_row_flags("truncated", truncated, mask.shape[0])
    return (_valid(mask) & ~truncated.unsqueeze(1)).to(_weight_dtype(advantages))


@SELECTIONS.register("high_entropy_tokens", inputs=("entropy",))
def _select_high_entropy_tokens(mask, *, rewards, advantages, entropy, group_ids, rho=0.2) -> torch.Tensor:
    """"Beyond the 80/20 rule" (arXiv 2506.01939): gradient only on the highest-entropy tokens.

    Among the N valid tokens of the whole batch, keep exactly ceil(ρ·N) (default ρ = 0.2) with
    the largest entropy H[i,t]. The paper thresholds at the batch's (1−ρ) entropy quantile; we
    keep an exact count instead so ties cannot change how many tokens train: tied tokens are
    taken in row-major order. ceil (not floor) so a non-empty batch always keeps a token.
    """
    rho = _require_fraction("rho", rho)
    entropy = _require_entropy("high_entropy_tokens", entropy)
    keep = _top_fraction_of_tokens(entropy, _valid(mask), rho)
    return keep.to(_weight_dtype(advantages))


@SELECTIONS.register("cppo")
def _select_cppo(mask, *, rewards, advantages, entropy, group_ids, keep=0.5, scope="group") -> torch.Tensor:
    """CPPO (arXiv 2503.22342): keep the k completions of each group with the largest |A|.

    scope="batch" ranks all the batch's completions together, as the authors' verl code does
    (lzhxmu/CPPO @52faeb37 cppo_verl/recipe/cppo/src/cppo_ray_trainer.py: top-k of |A| over the
    whole batch, which was enlarged by 1/(1 − P) prompts so the kept rows fill a normal batch).

    `keep` is a count (int >= 1; a smaller group keeps all its rows) or a fraction of the group
    (float in (0, 1]: k = ceil(keep · G)). The paper prunes at rate P and keeps k = G·(1 − P)
    (e.g. G = 16, P = 50% -> k = 8), so `keep=0.5` is its P = 50% setting. Ties in |A| go to the
    lower row index.
    """
    valid = _valid(mask)
    if scope == "group":
        group_index, n_groups = validate.group_index(group_ids)
    elif scope == "batch":
        group_index, n_groups = torch.zeros_like(group_ids, dtype=torch.int64), 1
    else:
        raise ValueError(f"scope must be 'group' or 'batch', got {scope!r}")
    score = _sequence_advantage(advantages, valid).abs()
    rank, _, counts = _rank_within_group(group_index, n_groups, score, descending=True)
    if isinstance(keep, bool) or not isinstance(keep, Real):
        raise ValueError(f"keep must be an int count >= 1 or a float fraction in (0, 1], got {keep!r}")
    if isinstance(keep, int):
        if keep < 1:
            raise ValueError(f"keep as a count must be >= 1, got {keep}")
        per_group = torch.full_like(counts, keep)
    else:
        per_group = _ceil_count(_require_fraction("keep", keep, allow_zero=False), counts)
    keep_row = rank < per_group[group_index]
    return (valid & keep_row.unsqueeze(1)).to(_weight_dtype(advantages))


def _max_variance_subset(
    values: torch.Tensor, group_index: torch.Tensor, n_groups: int, keep_counts: torch.Tensor
) -> torch.Tensor:
    """Bool [B]: per group, the `keep_counts[g]` members whose values have the largest variance.

    A max-variance subset of fixed size always consists of the i largest and k − i smallest
    values for some i (PODS, arXiv 2504.13818, which D^3S builds on), so we score every split
    i = 0..k with prefix sums over the group-sorted values and keep the best (smallest i on ties).
    """
    batch = values.numel()
    rank, order, counts = _rank_within_group(group_index, n_groups, values, descending=False)
    starts = torch.cumsum(counts, 0) - counts
    sorted_values = values.to(torch.float64)[order]
    zero = sorted_values.new_zeros(1)
    prefix = torch.cat([zero, torch.cumsum(sorted_values, 0)])  # prefix[j] = sum of first j
    prefix_sq = torch.cat([zero, torch.cumsum(sorted_values**2, 0)])

    n_high = torch.arange(batch + 1, device=values.device).unsqueeze(0)  # i, [1, B+1]
    k = keep_counts.unsqueeze(1)
    start, end = starts.unsqueeze(1), (starts + counts).unsqueeze(1)
    feasible = n_high <= k
    low_end = (start + k - n_high).clamp(min=0, max=batch)  # rows start .. start+k−i−1 (smallest)
    high_start = (end - n_high).clamp(min=0, max=batch)  # rows end−i .. end−1 (largest)

    def window_sum(cumulative: torch.Tensor) -> torch.Tensor:
        return (cumulative[low_end] - cumulative[start]) + (cumulative[end] - cumulative[high_start])

    size = k.clamp(min=1).to(torch.float64)
    mean = window_sum(prefix) / size
    variance = window_sum(prefix_sq) / size - mean**2
    variance = torch.where(feasible, variance, torch.full_like(variance, -math.inf))
    best_high = variance.argmax(dim=1)  # first maximum: fewest rows taken from the top on ties

    row_high, row_k, row_count = best_high[group_index], keep_counts[group_index], counts[group_index]
    return (rank < row_k - row_high) | (rank >= row_count - row_high)


@SELECTIONS.register("d3s", inputs=("entropy", "step", "total_steps"))
def _select_d3s(
    mask, *, rewards, advantages, entropy, group_ids, sample_ratio=0.5, token_ratio=0.2, scope="group",
    schedule=False, step=None, total_steps=None,
) -> torch.Tensor:
    """D^3S (arXiv 2509.22115): sample-level then token-level down-sampling.

    1. Sample level: in each group (scope="group", the paper's intra-group D^3S-I; scope="batch"
       treats the batch as one group, the cross-group variant) keep k = ceil(sample_ratio · G)
       completions whose advantages have the largest variance Var(A) (the paper ties Var(A) to
       an upper bound on the policy-gradient norm). The subset is found exactly (see
       `_max_variance_subset`).
    2. Token level: among the valid tokens of the kept completions, keep the ceil(token_ratio · N)
       with the largest |A[i,t]| · H[i,t] (ties in row-major order).
    With `schedule=True` the two ratios come from `d3s_schedule(step, total_steps)` instead of
    `sample_ratio`/`token_ratio` (the trainer hands every selection rule asking for `step` and
    `total_steps` the current values). Only the abstract of the paper was
    available to us; the subset size rule (ceil of a ratio), the exact solver and the batch-level
    token quota are our documented choices.
    """
    if schedule:
        if step is None or not total_steps:
            raise ValueError("d3s with schedule=True needs step and total_steps")
        sample_ratio, token_ratio = d3s_schedule(step, total_steps)
    sample_ratio = _require_fraction("sample_ratio", sample_ratio, allow_zero=False)
    token_ratio = _require_fraction("token_ratio", token_ratio)
    if scope not in ("group", "batch"):
        raise ValueError(f"scope must be 'group' or 'batch', got {scope!r}")
    entropy = _require_entropy("d3s", entropy)
    valid = _valid(mask)
    if scope == "group":
        group_index, n_groups = validate.group_index(group_ids)
    else:
        group_index, n_groups = torch.zeros_like(group_ids, dtype=torch.int64), 1
    counts = torch.bincount(group_index, minlength=n_groups)
    keep_row = _max_variance_subset(
        _sequence_advantage(advantages, valid), group_index, n_groups, _ceil_count(sample_ratio, counts)
    )
    kept_tokens = valid & keep_row.unsqueeze(1)
    score = _token_advantage(advantages, valid).abs() * entropy
    keep = _top_fraction_of_tokens(score, kept_tokens, token_ratio)
    return keep.to(_weight_dtype(advantages))


def d3s_schedule(
    step: int,
    total_steps: int,
    *,
    sample_ratio_start: float = 0.5,
    sample_ratio_end: float = 1.0,
    token_ratio_start: float = 0.2,
    token_ratio_end: float = 1.0,
) -> tuple[float, float]:
    """(sample_ratio, token_ratio) for `step` of `total_steps` in D^3S (arXiv 2509.22115).

    The paper's schedule "starts with aggressive down-sampling ... and gradually relaxes"; its
    exact form was not available to us, so this is our documented choice: both ratios move
    linearly from their start to their end value over training,

        ratio(step) = start + (end − start) · min(step / total_steps, 1),

    by default from keeping half the completions and 20% of tokens to keeping everything.
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an int >= 0, got {step!r}")
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"total_steps must be an int >= 1, got {total_steps!r}")
    ratios = {
        "sample_ratio_start": sample_ratio_start,
        "sample_ratio_end": sample_ratio_end,
        "token_ratio_start": token_ratio_start,
        "token_ratio_end": token_ratio_end,
    }
    checked = {k: _require_fraction(k, v, allow_zero=not k.startswith("sample")) for k, v in ratios.items()}
    progress = min(step / total_steps, 1.0)

    def interpolate(start: float, end: float) -> float:
        return start + (end - start) * progress

    return (
        interpolate(checked["sample_ratio_start"], checked["sample_ratio_end"]),
        interpolate(checked["token_ratio_start"], checked["token_ratio_end"]),
    )


@SELECTIONS.register("gtpo", inputs=("entropy", "token_ids"))
def _select_gtpo(
    mask, *, rewards, advantages, entropy, group_ids, token_ids, entropy_threshold=0.7, positive_conflict_weight=2.0,
    conflict_scope="runs", divide_by_conflicts=True, sign_from="rewards",
) -> torch.Tensor:
    """GTPO (arXiv 2508.03772): protect conflict tokens and drop high-entropy completions.

    A completion is positive or negative by the sign of its group-relative advantage:
    sign_from="rewards" (default) uses r − mean_g r (0 for a group of equal rewards), the code's
    unshaped advantage, so the sign is right even when `advantages` carry GTPO's entropy shaping;
    sign_from="advantages" uses the given advantages. A conflict token is a valid token of a
    positive or negative completion whose token id also occurs at the same place in a completion
    of the opposite sign in the same group:

      conflict_scope="runs" (default, the authors' code): "same place" is the same position from
        the start, for the completion's leading run of such tokens, or the same distance from
        the completion's last valid token, for its trailing run; only tokens in those runs count.
      conflict_scope="any" (the paper's text): the same position, anywhere in the completion.

    Weights: a conflict token of a negative completion gets 0 (its negative update is skipped);
    of a positive one `positive_conflict_weight` (2.0 in the code), and with "runs" a token in
    both the leading and the trailing run gets it twice over (2·2 = 4, as the code's product of
    its forward and backward masks). Other valid tokens weigh 1. With divide_by_conflicts=True
    (the code) each completion's weights are divided by its number of conflict tokens (at least
    1). A completion whose mean token entropy exceeds `entropy_threshold` (0.7 in the code) is
    dropped entirely; `entropy_threshold=None` disables this filter. The code's entropy shaping
    of the advantage (A − 0.1·H̄) is the `gtpo` advantage estimator.

    Checked against the authors' code, winstonsmith1897/GTPO @5d33811e8ea1cf76c665db65b247cef9d1e436dd
    (tests/golden/gtpo.json): `build_conflict_mask` and `UnslothEfficientGTPO.forward` in
    gtpo/gtpo_training.py, whose per-completion loss is Σ_t −A·δ_t·ρ_t / n_tokens / n_conflicts,
    i.e. these weights times a per-sequence token mean (aggregate with `seq_mean_token_mean`;
    the code sums over completions and keeps zero-weight tokens in each row's token count).
    """
    if not isinstance(token_ids, torch.Tensor) or token_ids.is_floating_point() or token_ids.dtype == torch.bool:
        raise ValueError(f"token_ids must be an integer [B, T] tensor, got {getattr(token_ids, 'dtype', token_ids)}")
    validate.check_same_shape(mask=mask, token_ids=token_ids)
    if isinstance(positive_conflict_weight, bool) or not isinstance(positive_conflict_weight, Real):
        raise ValueError(f"positive_conflict_weight must be a number > 0, got {positive_conflict_weight!r}")
    if positive_conflict_weight <= 0:
        raise ValueError(f"positive_conflict_weight must be > 0, got {positive_conflict_weight}")
    if conflict_scope not in ("runs", "any"):
        raise ValueError(f"conflict_scope must be 'runs' or 'any', got {conflict_scope!r}")
    if sign_from not in ("rewards", "advantages"):
        raise ValueError(f"sign_from must be 'rewards' or 'advantages', got {sign_from!r}")
    if not isinstance(divide_by_conflicts, bool):
        raise ValueError(f"divide_by_conflicts must be a bool, got {divide_by_conflicts!r}")
    valid = _valid(mask)
    if sign_from == "rewards":
        sequence_advantage = _group_centred_rewards(rewards, group_ids)
    else:
        sequence_advantage = _sequence_advantage(advantages, valid)
    positive, negative = sequence_advantage > 0, sequence_advantage < 0
    group_index, _ = validate.group_index(group_ids)

    if conflict_scope == "any":
        leading = _opposite_sign_match(group_index, _position_keys(valid, from_end=False), token_ids, valid,
                                       positive, negative)
        trailing = torch.zeros_like(leading)
    else:
        leading = _leading_run(_opposite_sign_match(
            group_index, _position_keys(valid, from_end=False), token_ids, valid, positive, negative), valid)
        trailing = _leading_run(_opposite_sign_match(
            group_index, _position_keys(valid, from_end=True), token_ids, valid, positive, negative).flip(1),
            valid.flip(1)).flip(1)
    active = (positive | negative).unsqueeze(1)
    conflict = (leading | trailing) & active

    dtype = _weight_dtype(advantages)
    weight = float(positive_conflict_weight)
    boost = torch.where(leading, weight, 1.0) * torch.where(trailing, weight, 1.0)
    weights = valid.to(dtype)
    weights = torch.where(conflict & negative.unsqueeze(1), torch.zeros_like(weights), weights)
    weights = torch.where(conflict & positive.unsqueeze(1), boost.to(dtype), weights)
    if divide_by_conflicts:
        weights = weights / conflict.sum(1, keepdim=True).clamp(min=1).to(dtype)
    if entropy_threshold is not None:
        if isinstance(entropy_threshold, bool) or not isinstance(entropy_threshold, Real):
            raise ValueError(f"entropy_threshold must be a number or None, got {entropy_threshold!r}")
        entropy = _require_entropy("gtpo", entropy)
        calm = _row_mean(entropy, valid) <= entropy_threshold
        weights = weights * calm.unsqueeze(1).to(dtype)
    return weights


def _group_centred_rewards(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """r − mean_g r per row [B], exactly 0 in a group of equal rewards (no rounding residue)."""
    group_index, n_groups = validate.group_index(group_ids)
    values = rewards.to(torch.float64)
    total = values.new_zeros(n_groups).index_add_(0, group_index, values)
    count = values.new_zeros(n_groups).index_add_(0, group_index, torch.ones_like(values))
    centred = values - (total / count)[group_index]
    return torch.where(informative_groups(rewards, group_ids), centred, torch.zeros_like(centred))


def _position_keys(valid: torch.Tensor, *, from_end: bool) -> torch.Tensor:
    """[B, T] int64: each token's position (from_end=False) or its number of later valid tokens
    in the row (from_end=True: 0 for the last valid token)."""
    if not from_end:
        return torch.arange(valid.shape[1], device=valid.device).expand(valid.shape)
    count = valid.to(torch.int64)
    return count.sum(1, keepdim=True) - count.cumsum(1)


def _opposite_sign_match(
    group_index: torch.Tensor, places: torch.Tensor, token_ids: torch.Tensor, valid: torch.Tensor,
    positive: torch.Tensor, negative: torch.Tensor,
) -> torch.Tensor:
    """Bool [B, T]: the valid tokens whose (group, place, token id) key is held by a valid token of
    a positive and of a negative completion."""
    batch, length = valid.shape
    keys = torch.stack([group_index.unsqueeze(1).expand(batch, length), places, token_ids.to(torch.int64)], -1)
    unique_keys, key_index = torch.unique(keys.reshape(-1, 3), dim=0, return_inverse=True)
    n_keys = unique_keys.shape[0]
    in_positive = (valid & positive.unsqueeze(1)).reshape(-1).to(torch.int64)
    in_negative = (valid & negative.unsqueeze(1)).reshape(-1).to(torch.int64)
    seen_positive = torch.zeros(n_keys, dtype=torch.int64, device=valid.device).index_add_(0, key_index, in_positive)
    seen_negative = torch.zeros(n_keys, dtype=torch.int64, device=valid.device).index_add_(0, key_index, in_negative)
    return ((seen_positive[key_index] > 0) & (seen_negative[key_index] > 0)).reshape(batch, length) & valid


def _leading_run(match: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Bool [B, T]: the valid tokens before which (among the row's valid tokens) every one matches."""
    misses = (valid & ~match).to(torch.int64).cumsum(1)
    return valid & match & (misses == 0)


@SELECTIONS.register("egsw", inputs=("entropy",))
def _select_egsw(mask, *, rewards, advantages, entropy, group_ids, alpha=0.1, temperature=1.0) -> torch.Tensor:
    """EGSW (arXiv 2503.22456), trajectory-wise: sequence weights from advantage and entropy.

        w_i = n_g · softmax_{j in group g}((A_j + α·H̄_j) / P)_i

    with H̄_j the mean token entropy of completion j and P the temperature. The paper normalises
    the exponentials to sum to 1 over the group; we multiply by the group size n_g so the weights
    of a group average 1 and a uniform weighting reproduces the unweighted loss (our choice; the
    defaults α = 0.1, P = 1 are ours too). Rows without valid tokens take no part in the softmax.
    The paper also has a step-wise variant (softmax over the group at each position t), not
    implemented here.
    """
    for name, value in (("alpha", alpha), ("temperature", temperature)):
        if isinstance(value, bool) or not isinstance(value, Real):
            raise ValueError(f"{name} must be a number, got {value!r}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    entropy = _require_entropy("egsw", entropy)
    valid = _valid(mask)
    dtype = _weight_dtype(advantages)
    non_empty = valid.any(dim=1)
    logits = (_sequence_advantage(advantages, valid) + alpha * _row_mean(entropy, valid)) / temperature
    logits = torch.where(non_empty, logits, torch.full_like(logits, -math.inf))

    group_index, n_groups = validate.group_index(group_ids)
    group_max = torch.full((n_groups,), -math.inf, dtype=logits.dtype, device=logits.device)
    group_max = group_max.scatter_reduce(0, group_index, logits, reduce="amax", include_self=False)
    group_max = torch.where(torch.isfinite(group_max), group_max, torch.zeros_like(group_max))  # empty groups
    exp = torch.where(non_empty, torch.exp(logits - group_max[group_index]), torch.zeros_like(logits))
    total = torch.zeros(n_groups, dtype=logits.dtype, device=logits.device).index_add_(0, group_index, exp)
    members = torch.zeros(n_groups, dtype=logits.dtype, device=logits.device).index_add_(
        0, group_index, non_empty.to(logits.dtype)
    )
    sequence_weight = members[group_index] * exp / total[group_index].clamp(min=torch.finfo(logits.dtype).tiny)
    return (valid.to(dtype) * sequence_weight.to(dtype).unsqueeze(1))


def _require_entropy(rule: str, entropy: torch.Tensor | None) -> torch.Tensor:
    if entropy is None:
        raise ValueError(f"selection {rule!r} needs the token entropy [B, T]; got entropy=None")
    return entropy


# --------------------------------------------------------------------------------------------
# public entry point


def compute_selection(
    name: str,
    mask: torch.Tensor,
    *,
    rewards: torch.Tensor,
    advantages: torch.Tensor,
    entropy: torch.Tensor | None = None,
    group_ids: torch.Tensor,
    check_finite: bool = True,
    **params: object,
) -> torch.Tensor:
    """Weights [B, T] of the registered selection rule `name` (0 = dropped, > 0 = kept/weighted).

    mask [B, T] (bool or float, nonzero = a completion token), rewards [B], advantages [B] or
    [B, T], entropy [B, T] or None, group_ids [B] integers. Shape/dtype errors and unknown or
    missing params raise ValueError; NaN/inf in the float inputs raise ValueError unless
    `check_finite=False`. The result is detached (selection is not differentiated through).
    """
    select = SELECTIONS.get(name)
    _check_inputs(mask, rewards, advantages, entropy, group_ids)
    SELECTIONS.check_params(name, params, shared=("rewards", "advantages", "entropy", "group_ids"))
    SELECTIONS.check_inputs(name, {*params, "entropy"})  # entropy: a shared argument, checked by each rule
    if check_finite:
        for key, value in {"rewards": rewards, "advantages": advantages, "entropy": entropy, **params}.items():
            if isinstance(value, torch.Tensor):
                validate.check_finite(key, value)
    with torch.no_grad():
        return select(
            mask, rewards=rewards, advantages=advantages, entropy=entropy, group_ids=group_ids, **params
        )


def _check_inputs(
    mask: torch.Tensor,
    rewards: torch.Tensor,
    advantages: torch.Tensor,
    entropy: torch.Tensor | None,
    group_ids: torch.Tensor,
) -> None:
    for key, value in (("mask", mask), ("rewards", rewards), ("advantages", advantages), ("group_ids", group_ids)):
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{key} must be a tensor, got {type(value).__name__}")
    validate.check_ndim("mask", mask, 2)
    batch = mask.shape[0]
    validate.check_per_sequence("rewards", rewards, batch)
    validate.check_group_ids(group_ids, batch)
    if advantages.dim() == 1:
        validate.check_per_sequence("advantages", advantages, batch)
    elif advantages.dim() == 2:
        validate.check_same_shape(mask=mask, advantages=advantages)
    else:
        raise ValueError(f"advantages must be [B] or [B, T], got shape {list(advantages.shape)}")
    if entropy is not None:
        if not isinstance(entropy, torch.Tensor) or not entropy.is_floating_point():
            got = getattr(entropy, "dtype", entropy)
            raise ValueError(f"entropy must be a floating [B, T] tensor or None, got {got}")
        validate.check_same_shape(mask=mask, entropy=entropy)


