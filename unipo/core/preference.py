"""Preference-optimisation losses (the DPO family) on per-sequence log-probabilities.

Every loss sees one batch of pairs (x, y_w, y_l) as four `[B]` tensors of summed log-probs:
`chosen_logp = log π(y_w|x)`, `rejected_logp = log π(y_l|x)` and the same two under the
frozen reference π_ref. Most losses are a function of the implicit reward margin

    h = β·[(log π − log π_ref)(y_w) − (log π − log π_ref)(y_l)]

Each registered function has one signature,

    fn(chosen_logp, rejected_logp, ref_chosen_logp, ref_rejected_logp, beta, **params)
        -> (per_pair_loss [B], extra_metrics)

and is called only through `compute_preference_loss`, which checks the inputs, averages the
per-pair losses and adds the metrics every variant shares. Extra inputs a variant needs
(an NLL term, win probabilities, a ranked list) are keyword-only `params`; a missing or unknown
one is a ValueError, never a silent default.

Length normalisation is the caller's choice: the losses take whatever per-sequence log-probs
they are given (TRL's IPO, for one, feeds per-token means; pass those to reproduce it).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from numbers import Real

import torch
import torch.nn.functional as F

from . import validate
from .registry import Registry

PreferenceLossFn = Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]

PREFERENCE_LOSSES: Registry[PreferenceLossFn] = Registry("preference loss")

_PAIR_INPUTS = ("chosen_logp", "rejected_logp", "ref_chosen_logp", "ref_rejected_logp")


# --------------------------------------------------------------------------------------------
# shared pieces


def _log_ratios(
    chosen_logp: torch.Tensor,
    rejected_logp: torch.Tensor,
    ref_chosen_logp: torch.Tensor,
    ref_rejected_logp: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log π − log π_ref)(y_w) and (log π − log π_ref)(y_l), each [B]."""
    return chosen_logp - ref_chosen_logp, rejected_logp - ref_rejected_logp


def _implicit_margin(
    chosen_logp: torch.Tensor,
    rejected_logp: torch.Tensor,
    ref_chosen_logp: torch.Tensor,
    ref_rejected_logp: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """h = β·[(log π − log π_ref)(y_w) − (log π − log π_ref)(y_l)], [B]."""
    chosen_ratio, rejected_ratio = _log_ratios(chosen_logp, rejected_logp, ref_chosen_logp, ref_rejected_logp)
    return beta * (chosen_ratio - rejected_ratio)


def _require_scalar(
    name: str,
    value: object,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """A finite plain number inside [low, high] (open ends where asked), else ValueError."""
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(float(value)):
        raise ValueError(f"{name} must be a finite plain number, got {value!r}")
    number = float(value)
    if low is not None and (number < low or (low_open and number == low)):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {number}")
    if high is not None and (number > high or (high_open and number == high)):
        raise ValueError(f"{name} must be {'<' if high_open else '<='} {high}, got {number}")
    return number


def _require_per_pair(name: str, tensor: object, like: torch.Tensor) -> torch.Tensor:
    """A `[B]` floating tensor with `like`'s batch size and dtype, else ValueError."""
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{name} must be a tensor of shape [B]=[{like.shape[0]}], got {type(tensor).__name__}")
    validate.check_per_sequence(name, tensor, like.shape[0])
    if tensor.dtype != like.dtype:
        raise ValueError(f"{name} has dtype {tensor.dtype} but the log-probs have dtype {like.dtype}")
    return tensor


def _neg_log_sigmoid(x: torch.Tensor) -> torch.Tensor:
    """−log σ(x) via logsigmoid: exact for large |x|, where log(sigmoid(x)) underflows to -inf."""
    return -F.logsigmoid(x)


# --------------------------------------------------------------------------------------------
# registered losses


@PREFERENCE_LOSSES.register("dpo")
def dpo_loss(
    chosen_logp: torch.Tensor,
    rejected_logp: torch.Tensor,
    ref_chosen_logp: torch.Tensor,
    ref_rejected_logp: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DPO (Rafailov et al., arXiv 2305.18290, Eq. 7): per-pair loss −log σ(h)."""
    h = _implicit_margin(chosen_logp, rejected_logp, ref_chosen_logp, ref_rejected_logp, beta)
    return _neg_log_sigmoid(h), {}


@PREFERENCE_LOSSES.register("ipo")
def ipo_loss(
    chosen_logp: torch.Tensor,
    rejected_logp: torch.Tensor,
    ref_chosen_logp: torch.Tensor,
    ref_rejected_logp: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """IPO (Azar et al., arXiv 2310.12036, Eq. 17): per-pair loss (h/β − 1/(2β))².

    The paper writes (h_π(y_w, y_l) − τ⁻¹/2)² with h_π = log[π(y_w)π_ref(y_l) / (π(y_l)π_ref(y_w))],
    the log-ratio difference *without* β, and τ the regulariser. With τ = β, h_π = h/β, which is
    the catalogue's form: checked, the same loss.
    """
    h = _implicit_margin(chosen_logp, rejected_logp, ref_chosen_logp, ref_rejected_logp, beta)
    return (h / beta - 1.0 / (2.0 * beta)) ** 2, {}


@PREFERENCE_LOSSES.register("robust_dpo")
def robust_dpo_loss(
    chosen_logp: torch.Tensor,
    rejected_logp: torch.Tensor,
    ref_chosen_logp: torch.Tensor,
    ref_rejected_logp: torch.Tensor,
    beta: float,
    *,
    label_noise: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Provably robust DPO (Chowdhury et al., arXiv 2403.00409):

        ((1−ε)·(−log σ(h)) − ε·(−log σ(−h))) / (1 − 2ε),   ε = `label_noise` ∈ [0, ½)

    an unbiased estimate of the clean-label DPO loss when each label is flipped with
    probability ε. It can be negative; ε = 0 is exactly DPO.
    """
    noise = _require_scalar("label_noise", label_noise, low=0.0, high=0.5, high_open=True)
    h = _implicit_margin(chosen_logp, rejected_logp, ref_chosen_logp, ref_rejected_logp, beta)
    kept = (1.0 - noise) * _neg_log_sigmoid(h)
    flipped = noise * _neg_log_sigmoid(-h)
    return (kept - flipped) / (1.0 - 2.0 * noise), {}


@PREFERENCE_LOSSES.register("rpo")
def rpo_loss(
    chosen_logp: torch.Tensor,
    rejected_logp: torch.Tensor,
    ref_chosen_logp: torch.Tensor,
    ref_rejected_logp: torch.Tensor,
    beta: float,
    *,
    chosen_nll: torch.Tensor,
    alpha: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """RPO (Liu et al., "Your SFT loss is implicitly an adversarial regularizer", arXiv 2405.16436):

        −log σ(h) + α·NLL(y_w)

    The paper's practical objective (Algorithm 2) adds to the DPO loss an SFT term
    η·β·(−log π(y_base|x)) with the chosen answer as y_base; here its coefficient η·β is the
    single plain number `alpha` (α = 0 is DPO). `chosen_nll` [B] is computed by the caller; we
    expect the per-token mean NLL of y_w, the normalisation of TRL's `rpo_alpha` (from Iterative
    RPO, arXiv 2404.19733), so α does not scale with answer length.
    """
    weight = _require_scalar("alpha", alpha, low=0.0)
    nll = _require_per_pair("chosen_nll", chosen_nll, chosen_logp)
    dpo_term, _ = dpo_loss(chosen_logp, rejected_logp, ref_chosen_logp, ref_rejected_logp, beta)
    return dpo_term + weight * nll, {"pref/chosen_nll": nll.detach().mean()}


@PREFERENCE_LOSSES.register("slic")
def slic_loss(
    chosen_logp: torch.Tensor,
    rejected_logp: torch.Tensor,
    ref_chosen_logp: torch.Tensor,
    ref_rejected_logp: torch.Tensor,
    beta: float,
    *,
    chosen_nll: torch.Tensor,
    delta: float,
    lam: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SLiC-HF (Zhao et al., arXiv 2305.10425): max(0, δ − h) + λ·NLL(y_w).

    Choice: the paper's calibration term max(0, δ − log π(y_w) + log π(y_l)) has no reference
    model and no β. We follow the catalogue and use h (with π_ref and β), the normalised-
    likelihood hinge of RSO (arXiv 2309.06657) and TRL's `hinge`; the paper's reference-free
    form is recovered exactly with β = 1 and zero reference log-probs. The regulariser is on
    the chosen answer (the paper's y_ref is the SFT target); `chosen_nll` [B] is the caller's
    per-token mean NLL of y_w.
    """
    margin = _require_scalar("delta", delta)
    weight = _require_scalar("lam", lam, low=0.0)
    nll = _require_per_pair("chosen_nll", chosen_nll, chosen_logp)
    h = _implicit_margin(chosen_logp, rejected_logp, ref_chosen_logp, ref_rejected_logp, beta)
    return torch.relu(margin - h) + weight * nll, {"pref/chosen_nll": nll.detach().mean()}


@PREFERENCE_LOSSES.register("lipo")
def lipo_loss(
    chosen_logp: torch.Tensor,
    rejected_logp: torch.Tensor,
    ref_chosen_logp: torch.Tensor,
    ref_rejected_logp: torch.Tensor,
    beta: float,
    *,
    list_logp: torch.Tensor | None = None,
    list_ref_logp: torch.Tensor | None = None,
    list_labels: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """LiPO-λ (Liu et al., arXiv 2402.01878, Sec. 4): listwise, lambda-weighted pairwise logistic.

    For a list of K answers with graded labels ψ and scores s_i = β·(log π − log π_ref)(y_i):

        loss = Σ_{i,j: ψ_i > ψ_j} Δ_ij · (−log σ(s_i − s_j))
        Δ_ij = |G_i − G_j| · |1/D(τ_i) − 1/D(τ_j)|,   G = 2^ψ − 1,   D(τ) = log₂(1 + τ)

    τ_i is the 1-based rank of y_i when the list is sorted by the model's current scores s,
    descending (the LambdaLoss weight the paper takes from learning-to-rank, checked).
    Choices the paper leaves open: the log in D is base 2 as in DCG (another base only rescales
    every Δ by one constant); ranks use detached scores (they are piecewise constant anyway)
    and break ties by list position; the sum over pairs is not normalised, so one list is one
    "pair" of the batch mean. Equal labels form no pair: a list of all-equal labels costs 0.

    List inputs are the params `list_logp`, `list_ref_logp` and `list_labels`, all [B, K]
    (given together). Without them the pair itself is the list: K = 2, labels (1, 0), and
    the loss is DPO's scaled by Δ = 1 − 1/log₂3 ≈ 0.369. The four pair tensors are still
    required with a list; they feed the shared metrics (pass the best and worst answer).
    """
    given = {"list_logp": list_logp, "list_ref_logp": list_ref_logp, "list_labels": list_labels}
    if all(value is None for value in given.values()):
        list_logp = torch.stack([chosen_logp, rejected_logp], dim=1)  # (B, 2)
        list_ref_logp = torch.stack([ref_chosen_logp, ref_rejected_logp], dim=1)
        list_labels = torch.tensor([1.0, 0.0], dtype=chosen_logp.dtype, device=chosen_logp.device)
        list_labels = list_labels.expand_as(list_logp)
    elif any(value is None for value in given.values()):
        missing = sorted(key for key, value in given.items() if value is None)
        raise ValueError(f"lipo list inputs go together: missing {missing}")
    else:
        _check_list_inputs(list_logp, list_ref_logp, list_labels, chosen_logp)

    scores = beta * (list_logp - list_ref_logp)  # (B, K)
    labels = list_labels.to(scores.dtype)
    gains = torch.exp2(labels) - 1.0

    # rank 1 = highest score; a stable sort makes the ranks a permutation even under ties
    order = torch.argsort(scores.detach(), dim=1, descending=True, stable=True)
    positions = torch.arange(1, scores.shape[1] + 1, device=scores.device).expand_as(order)
    ranks = torch.empty_like(order).scatter_(1, order, positions)
    inverse_discount = 1.0 / torch.log2(1.0 + ranks.to(scores.dtype))

    lambda_weight = (gains[:, :, None] - gains[:, None, :]).abs() * (
        inverse_discount[:, :, None] - inverse_discount[:, None, :]
    ).abs()  # (B, K, K)
    ordered = labels[:, :, None] > labels[:, None, :]  # pair (i, j) counts when ψ_i > ψ_j
    pair_loss = _neg_log_sigmoid(scores[:, :, None] - scores[:, None, :])
    per_list = torch.where(ordered, lambda_weight * pair_loss, torch.zeros_like(pair_loss)).sum(dim=(1, 2))

    with torch.no_grad():
        correct = (ordered & (scores[:, :, None] > scores[:, None, :])).sum()
        pair_accuracy = correct.to(scores.dtype) / ordered.sum().clamp(min=1).to(scores.dtype)
    return per_list, {"pref/list_pair_accuracy": pair_accuracy}


def _check_list_inputs(
    list_logp: torch.Tensor, list_ref_logp: torch.Tensor, list_labels: torch.Tensor, like: torch.Tensor
) -> None:
    for key, value in (("list_logp", list_logp), ("list_ref_logp", list_ref_logp), ("list_labels", list_labels)):
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{key} must be a [B, K] tensor, got {type(value).__name__}")
        validate.check_ndim(key, value, 2)
    validate.check_same_shape(list_logp=list_logp, list_ref_logp=list_ref_logp, list_labels=list_labels)
    batch, size = list_logp.shape
    if batch != like.shape[0] or size < 2:
        raise ValueError(f"lipo lists must be [B={like.shape[0]}, K>=2], got {list(list_logp.shape)}")
    for key, value in (("list_logp", list_logp), ("list_ref_logp", list_ref_logp)):
        if value.dtype != like.dtype:
            raise ValueError(f"{key} has dtype {value.dtype} but the log-probs have dtype {like.dtype}")
    if list_labels.dtype == torch.bool or list_labels.is_complex():
        raise ValueError(f"list_labels must hold graded relevance numbers, got dtype {list_labels.dtype}")


@PREFERENCE_LOSSES.register("tr_dpo")
def tr_dpo_loss(
    chosen_logp: torch.Tensor,
    rejected_logp: torch.Tensor,
    ref_chosen_logp: torch.Tensor,
    ref_rejected_logp: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """TR-DPO (Gorbatovski et al., arXiv 2404.09656): DPO's loss −log σ(h) against a moving π_ref.

    The loss is DPO's; what differs is that the trainer updates the reference weights during
    training with `soft_update_reference` (π_ref ← α·π + (1−α)·π_ref) or replaces them when
    `hard_update_due(step, τ)`. The name exists so a recipe can say which it trains.
    """
    return dpo_loss(chosen_logp, rejected_logp, ref_chosen_logp, ref_rejected_logp, beta)


@PREFERENCE_LOSSES.register("sppo")
def sppo_loss(
    chosen_logp: torch.Tensor,
    rejected_logp: torch.Tensor,
    ref_chosen_logp: torch.Tensor,
    ref_rejected_logp: torch.Tensor,
    beta: float,
    *,
    chosen_win_prob: torch.Tensor,
    rejected_win_prob: torch.Tensor,
    eta: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SPPO (Wu et al., arXiv 2405.00675, Algorithm 1, Eq. 4.7): per answer y,

        (log(π/π_ref)(y) − η·(P̂(y ≻ π_ref) − ½))²

    where π_ref is the previous iteration's policy π_t and P̂ the estimated probability that y
    beats a sample of π_t (`chosen_win_prob`, `rejected_win_prob`, [B] in [0, 1]). Checked:
    the loss regresses each log-ratio, not the margin h, so β enters only the shared metrics.
    Choice: the per-pair loss is the *mean* of the chosen and rejected terms (the authors'
    code, uclaml/SPPO; their η is 1/β there, here it is the explicit `eta`). Hard labels
    P̂ = (1, 0) give TRL's `sppo_hard` up to that factor of ½.
    """
    step = _require_scalar("eta", eta, low=0.0, low_open=True)
    chosen_prob = _require_per_pair("chosen_win_prob", chosen_win_prob, chosen_logp)
    rejected_prob = _require_per_pair("rejected_win_prob", rejected_win_prob, chosen_logp)
    chosen_ratio, rejected_ratio = _log_ratios(chosen_logp, rejected_logp, ref_chosen_logp, ref_rejected_logp)
    chosen_term = (chosen_ratio - step * (chosen_prob - 0.5)) ** 2
    rejected_term = (rejected_ratio - step * (rejected_prob - 0.5)) ** 2
    return 0.5 * (chosen_term + rejected_term), {}


# --------------------------------------------------------------------------------------------
# public entry point


def compute_preference_loss(
    name: str,
    chosen_logp: torch.Tensor,
    rejected_logp: torch.Tensor,
    ref_chosen_logp: torch.Tensor,
    ref_rejected_logp: torch.Tensor,
    beta: float,
    *,
    check_finite: bool = True,
    **params: object,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean over pairs of the registered preference loss `name`, plus metrics.

    Inputs are per-sequence summed log-probs, all [B] of one floating dtype; `beta` > 0.
    Metrics (0-dim, detached), with h the implicit margin and r = β·(log π − log π_ref):
      pref/reward_margin  mean h
      pref/accuracy       fraction of pairs with h > 0
      pref/chosen_reward  mean r(y_w)
      pref/rejected_reward mean r(y_l)
    plus any the variant adds (e.g. pref/chosen_nll). NaN/inf inputs raise ValueError unless
    `check_finite=False`.
    """
    loss_fn = PREFERENCE_LOSSES.get(name)
    pair = {
        "chosen_logp": chosen_logp,
        "rejected_logp": rejected_logp,
        "ref_chosen_logp": ref_chosen_logp,
        "ref_rejected_logp": ref_rejected_logp,
    }
    _check_pair_inputs(pair)
    beta = _require_scalar("beta", beta, low=0.0, low_open=True)
    PREFERENCE_LOSSES.check_params(name, params)
    if check_finite:
        for key, value in {**pair, **params}.items():
            if isinstance(value, torch.Tensor):
                validate.check_finite(key, value)

    per_pair, extra_metrics = loss_fn(chosen_logp, rejected_logp, ref_chosen_logp, ref_rejected_logp, beta, **params)
    with torch.no_grad():
        chosen_ratio, rejected_ratio = _log_ratios(chosen_logp, rejected_logp, ref_chosen_logp, ref_rejected_logp)
        chosen_reward, rejected_reward = beta * chosen_ratio, beta * rejected_ratio
        margin = chosen_reward - rejected_reward
        metrics = {
            "pref/reward_margin": margin.mean(),
            "pref/accuracy": (margin > 0).to(margin.dtype).mean(),
            "pref/chosen_reward": chosen_reward.mean(),
            "pref/rejected_reward": rejected_reward.mean(),
        }
    metrics.update(extra_metrics)
    return per_pair.mean(), metrics


def _check_pair_inputs(pair: dict[str, torch.Tensor]) -> None:
    for key, value in pair.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{key} must be a [B] tensor, got {type(value).__name__}")
        validate.check_ndim(key, value, 1)
        if not value.is_floating_point():
            raise ValueError(f"{key} must be floating point, got dtype {value.dtype}")
    validate.check_same_shape(**pair)
    dtypes = {key: value.dtype for key, value in pair.items()}
    if len(set(dtypes.values())) > 1:
        raise ValueError(f"dtype mismatch: {', '.join(f'{k}:{v}' for k, v in dtypes.items())}")
    if pair["chosen_logp"].shape[0] == 0:
        raise ValueError("preference loss needs at least one pair, got B=0")


# --------------------------------------------------------------------------------------------
# TR-DPO reference updates (arXiv 2404.09656)


def soft_update_reference(
    ref_params: Sequence[torch.Tensor], params: Sequence[torch.Tensor], alpha: float
) -> None:
    """TR-DPO soft update, in place: π_ref ← α·π + (1 − α)·π_ref for each tensor pair.

    α = 1 is the hard update (copy π into π_ref); α = 0 leaves π_ref unchanged. When to call
    it is the trainer's schedule: TRL's TR-DPO callback mixes with α = 0.6 every τ = 512 steps,
    i.e. calls this when `hard_update_due(step, tau)`. Policy tensors are cast to each reference
    tensor's device and dtype (a bf16 reference may track an fp32 policy); shapes must match.
    """
    weight = _require_scalar("alpha", alpha, low=0.0, high=1.0)
    ref_list, param_list = list(ref_params), list(params)
    if len(ref_list) != len(param_list):
        raise ValueError(f"ref_params has {len(ref_list)} tensors but params has {len(param_list)}")
    for index, (ref, new) in enumerate(zip(ref_list, param_list)):
        if ref.shape != new.shape:
            raise ValueError(f"tensor {index}: ref shape {list(ref.shape)} vs policy shape {list(new.shape)}")
        if not ref.is_floating_point():
            raise ValueError(f"tensor {index}: ref dtype {ref.dtype} is not floating point")
    with torch.no_grad():
        for ref, new in zip(ref_list, param_list):
            ref.lerp_(new.to(device=ref.device, dtype=ref.dtype), weight)  # ref + α·(new − ref)


def hard_update_due(step: int, tau: int) -> bool:
    """True when π_ref should be synced after optimizer step `step` (1-based): every `tau` steps.

    TR-DPO (arXiv 2404.09656) replaces π_ref with π every τ steps; step 0 (before any update)
    is never due, since π_ref = π there already.
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an int >= 0, got {step!r}")
    if isinstance(tau, bool) or not isinstance(tau, int) or tau < 1:
        raise ValueError(f"tau must be an int >= 1, got {tau!r}")
    return step > 0 and step % tau == 0
