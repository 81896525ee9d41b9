"""Policy losses (per token) and the aggregation that turns them into one number.

Every loss in `POLICY_LOSSES` has one signature,

    fn(logp, old_logp, advantages, mask, **params) -> (per_token_loss [B, T], metrics)

`logp`/`old_logp` are `[B, T]` log-probs of the sampled tokens under π and under π_old (the
policy that sampled them; treated as a constant), `advantages` is `[B]` (broadcast over T) or
`[B, T]`, `mask` a bool or float `[B, T]` completion mask. The ratio is ρ = exp(logp − old_logp).
The per-token loss is 0 on masked-out tokens. Metrics are 0-dim tensors computed without
gradient, masked token means: every loss reports `clip_frac` (fraction of tokens whose update is
clipped or truncated; 0 for losses without clipping), `approx_kl` (KL(π_old‖π), see
`_ratio_metrics`), `ratio_mean` and `ratio_max`.

Callers go through `compute_policy_loss(name, ...)`, which checks the inputs, applies token /
sample selection weights and aggregates with one of `AGGREGATIONS`. Aggregation is written as
numerator / denominator so that gradient accumulation is exact: compute the denominator once on
the full batch with `aggregation_denominator` and pass it to every micro-batch; the micro-batch
losses then sum to the full-batch loss (and their gradients to its gradient).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from numbers import Real

import torch

from unipo.core.registry import Registry
from unipo.core.validate import as_float_mask, check_ndim, check_per_sequence, check_same_shape
from unipo.core.validate import check_finite as _check_finite

Metrics = dict[str, torch.Tensor]
PolicyLoss = Callable[..., tuple[torch.Tensor, Metrics]]

POLICY_LOSSES: Registry[PolicyLoss] = Registry("policy loss")

AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm")

# --------------------------------------------------------------------------------------------
# shared pieces


def _require_number(name: str, value: object, *, low: float | None = None, high: float | None = None) -> float:
    """A finite plain number in the open interval (low, high), else ValueError."""
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(float(value)):
        raise ValueError(f"{name} must be a finite plain number, got {value!r}")
    if low is not None and value <= low:
        raise ValueError(f"{name} must be > {low}, got {value}")
    if high is not None and value >= high:
        raise ValueError(f"{name} must be < {high}, got {value}")
    return float(value)


def _safe_denominator(den: torch.Tensor) -> torch.Tensor:
    """Replace a zero count by 1: the matching numerator is 0 then, so 0/1 = 0 instead of NaN."""
    return torch.where(den > 0, den, torch.ones_like(den))


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / _safe_denominator(mask.sum())


def _token_advantages(advantages: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Advantages as `[B, T]`: a `[B]` tensor is broadcast over the tokens of its sequence."""
    if advantages.dim() == 1:
        check_per_sequence("advantages", advantages, like.shape[0])
        return advantages.unsqueeze(1).expand_as(like)
    check_same_shape(advantages=advantages, logp=like)
    return advantages


def _check_dtypes(**tensors: torch.Tensor | None) -> None:
    given = {k: v.dtype for k, v in tensors.items() if v is not None}
    if len(set(given.values())) > 1:
        described = ", ".join(f"{k}: {d}" for k, d in given.items())
        raise ValueError(f"dtype mismatch: {described}")
    if any(not d.is_floating_point for d in given.values()):
        raise ValueError(f"log-probs and advantages must be floating point, got {given}")


def _prepare(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Checked inputs as (float mask, advantages [B, T], log-ratio [B, T] that is 0 off the mask).

    The log-ratio is zeroed on padding so that garbage log-probs there can never overflow
    exp() into inf (inf * 0 = NaN would then leak through the masked sum).
    """
    check_ndim("logp", logp, 2)
    check_same_shape(logp=logp, old_logp=old_logp, mask=mask)
    _check_dtypes(logp=logp, old_logp=old_logp, advantages=advantages)
    m = as_float_mask(mask, logp)
    adv = _token_advantages(advantages, logp)
    log_ratio = torch.where(m > 0, logp - old_logp.detach(), torch.zeros_like(logp))  # π_old is a constant
    return m, adv, log_ratio


def _masked(loss: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return torch.where(m > 0, loss, torch.zeros_like(loss))


def _sequence_log_ratio(log_ratio: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """(1/|y_i|) Σ_t m·(logp − old_logp), `[B]`; 0 for an all-masked row (so s_i = 1)."""
    return (log_ratio * m).sum(1) / _safe_denominator(m.sum(1))


def _clipped_surrogate(
    ratio: torch.Tensor, clipped_ratio: torch.Tensor, adv: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token −min(r·A, clip(r)·A) = max(−r·A, −clip(r)·A) and where the clipped branch wins.

    Where it wins the loss is a constant in θ: those tokens get no gradient.
    """
    unclipped = -adv * ratio
    clipped = -adv * clipped_ratio
    return torch.maximum(unclipped, clipped), clipped > unclipped


@torch.no_grad()
def _ratio_metrics(log_ratio: torch.Tensor, m: torch.Tensor, clipped: torch.Tensor | None) -> Metrics:
    """clip_frac, approx_kl, ratio_mean, ratio_max as masked token statistics.

    approx_kl estimates KL(π_old‖π), the divergence from the policy that sampled the tokens:
    Schulman's k3 with the roles that make it unbiased on π_old's samples, ρ − 1 − log ρ
    (= `kl_k3(old_logp, logp)`), written expm1(log ρ) − log ρ for precision near ρ = 1.
    """
    ratio = log_ratio.exp()
    clip_frac = _masked_mean(clipped.to(m.dtype), m) if clipped is not None else m.new_zeros(())
    return {
        "clip_frac": clip_frac,
        "approx_kl": _masked_mean(torch.expm1(log_ratio) - log_ratio, m),
        "ratio_mean": _masked_mean(ratio, m),
        "ratio_max": torch.where(m > 0, ratio, torch.zeros_like(ratio)).amax(),
    }


# --------------------------------------------------------------------------------------------
# token-ratio clipped surrogates


def _ppo_clip_loss(logp, old_logp, advantages, mask, eps_low, eps_high):  # type: ignore[no-untyped-def]
    eps_low = _require_number("eps_low", eps_low, low=0.0, high=1.0)
    eps_high = _require_number("eps_high", eps_high, low=0.0)
    m, adv, log_ratio = _prepare(logp, old_logp, advantages, mask)
    ratio = log_ratio.exp()
    loss, clipped = _clipped_surrogate(ratio, ratio.clamp(1.0 - eps_low, 1.0 + eps_high), adv)
    return m, adv, log_ratio, loss, clipped


@POLICY_LOSSES.register("ppo_clip")
def ppo_clip(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
    *, eps_low: float = 0.2, eps_high: float = 0.2,
) -> tuple[torch.Tensor, Metrics]:
    """PPO clipped surrogate (arXiv 1707.06347; as in GRPO, arXiv 2402.03300), per token:

        L = −min(ρ·A, clip(ρ, 1 − eps_low, 1 + eps_high)·A)
    """
    m, _, log_ratio, loss, clipped = _ppo_clip_loss(logp, old_logp, advantages, mask, eps_low, eps_high)
    return _masked(loss, m), _ratio_metrics(log_ratio, m, clipped)


@POLICY_LOSSES.register("clip_higher")
def clip_higher(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
    *, eps_low: float = 0.2, eps_high: float = 0.28,
) -> tuple[torch.Tensor, Metrics]:
    """DAPO's Clip-Higher (arXiv 2503.14476): `ppo_clip` with a wider upper range,
    eps_high = 0.28, so low-probability tokens can still grow (against entropy collapse)."""
    m, _, log_ratio, loss, clipped = _ppo_clip_loss(logp, old_logp, advantages, mask, eps_low, eps_high)
    return _masked(loss, m), _ratio_metrics(log_ratio, m, clipped)


@POLICY_LOSSES.register("dual_clip")
def dual_clip(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
    *, eps_low: float = 0.2, eps_high: float = 0.2, clip_ratio_c: float = 3.0,
) -> tuple[torch.Tensor, Metrics]:
    """Dual-clip PPO (Ye et al., arXiv 1912.09729), per token:

        L = L_ppo_clip                      if A ≥ 0
        L = min(L_ppo_clip, −c·A)           if A < 0   (c = clip_ratio_c > 1)

    For A < 0 a huge ratio would make −ρ·A unbounded; the second clip caps it at c·|A| (and
    gives those tokens no gradient). Metric `dual_clip_frac`: tokens capped by the second clip.
    """
    clip_ratio_c = _require_number("clip_ratio_c", clip_ratio_c, low=1.0)
    m, adv, log_ratio, loss, clipped = _ppo_clip_loss(logp, old_logp, advantages, mask, eps_low, eps_high)
    bound = -clip_ratio_c * adv  # positive where A < 0
    dual = (adv < 0) & (loss > bound)
    loss = torch.where(adv < 0, torch.minimum(loss, bound), loss)
    metrics = _ratio_metrics(log_ratio, m, clipped | dual)
    with torch.no_grad():
        metrics["dual_clip_frac"] = _masked_mean(dual.to(m.dtype), m)
    return _masked(loss, m), metrics


# --------------------------------------------------------------------------------------------
# sequence-ratio surrogates (GSPO family) and the token/sequence hybrid (DHPO)


@POLICY_LOSSES.register("gspo")
def gspo(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
    *, eps_low: float = 3e-4, eps_high: float = 4e-4,
) -> tuple[torch.Tensor, Metrics]:
    """GSPO (Zheng et al., arXiv 2507.18071): one length-normalised ratio per sequence,

        s_i = (π(y_i|x) / π_old(y_i|x))^(1/|y_i|) = exp((1/|y_i|) Σ_t m·(logp − old_logp))
        L_i,t = −min(s_i·A_i,t, clip(s_i, 1 − eps_low, 1 + eps_high)·A_i,t)

    constant over the sequence's tokens when A is per sequence (the paper's A_i). Defaults are
    the paper's ranges (3e-4, 4e-4): s_i is a geometric mean, so it moves far less than ρ.
    Aggregate with `seq_mean_token_mean` for the paper's mean over sequences.
    """
    eps_low = _require_number("eps_low", eps_low, low=0.0, high=1.0)
    eps_high = _require_number("eps_high", eps_high, low=0.0)
    m, adv, log_ratio = _prepare(logp, old_logp, advantages, mask)
    # s_i = exp(Σ_t m·log ρ_t / Σ_t m), then broadcast over the sequence's tokens: [B, T]
    seq_ratio = _sequence_log_ratio(log_ratio, m).exp().unsqueeze(1).expand_as(logp)
    loss, clipped = _clipped_surrogate(seq_ratio, seq_ratio.clamp(1.0 - eps_low, 1.0 + eps_high), adv)
    metrics = _ratio_metrics(log_ratio, m, clipped)
    with torch.no_grad():
        metrics["seq_ratio_mean"] = _masked_mean(seq_ratio, m)
    return _masked(loss, m), metrics


@POLICY_LOSSES.register("gspo_token")
def gspo_token(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
    *, eps_low: float = 3e-4, eps_high: float = 4e-4,
) -> tuple[torch.Tensor, Metrics]:
    """GSPO-token (arXiv 2507.18071): the value of s_i, a gradient per token,

        s_i,t = sg[s_i] · π(y_t) / sg[π(y_t)]
        L_i,t = −min(s_i,t·A_i,t, clip(s_i,t, 1 − eps_low, 1 + eps_high)·A_i,t)

    With a per-sequence A its value and gradient equal GSPO's; a per-token A_i,t gives each
    token its own advantage (the variant's purpose: multi-turn / token-level credit).
    """
    eps_low = _require_number("eps_low", eps_low, low=0.0, high=1.0)
    eps_high = _require_number("eps_high", eps_high, low=0.0)
    m, adv, log_ratio = _prepare(logp, old_logp, advantages, mask)
    seq_log_ratio = _sequence_log_ratio(log_ratio, m).detach().unsqueeze(1)
    # s_i,t = exp(sg[log s_i] + logp − sg[logp]): value s_i, gradient s_i·∇logp_t; [B, T]
    token_seq_ratio = torch.exp(seq_log_ratio + logp - logp.detach())
    clipped_ratio = token_seq_ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    loss, clipped = _clipped_surrogate(token_seq_ratio, clipped_ratio, adv)
    return _masked(loss, m), _ratio_metrics(log_ratio, m, clipped)


def _entropy_mixing_weight(entropy: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """w_i,t = H_i,t / max_t' H_i,t' over the sequence's own tokens (½ if that max is 0).

    Normalising within the sequence keeps w in [0, 1] and the loss local to each row, so
    micro-batching cannot change it (a batch-wide normaliser would).
    """
    h = torch.where(m > 0, entropy.detach().clamp(min=0.0), torch.zeros_like(entropy))
    h_max = h.amax(dim=1, keepdim=True)
    return torch.where(h_max > 0, h / _safe_denominator(h_max), torch.full_like(h, 0.5))


@POLICY_LOSSES.register("dhpo", inputs=("entropy",))
def dhpo(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
    *, eps_low: float = 0.2, eps_high: float = 0.2, seq_eps_low: float = 3e-4, seq_eps_high: float = 4e-4,
    mixing: str = "average", entropy: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """DHPO (Min et al., "Orchestrating Tokens and Sequences: Dynamic Hybrid Policy
    Optimization for RLVR", arXiv 2601.05607): one clipped surrogate over a mix of the token
    ratio ρ_i,t (GRPO) and the sequence ratio s_i (GSPO), each clipped in its own trust region
    before mixing ("branch-specific clipping"):

        r_mix  = w·ρ_i,t + (1 − w)·s_i
        r_clip = w·clip(ρ_i,t, 1 − eps_low, 1 + eps_high) + (1 − w)·clip(s_i, 1 − seq_eps_low, 1 + seq_eps_high)
        L_i,t  = −min(r_mix·A, r_clip·A)

    mixing="average": w = ½. mixing="entropy": w_i,t = H_i,t / max_t H_i,t from the param
    `entropy` [B, T] (detached), so high-entropy "forking" tokens lean on their own ratio and
    low-entropy ones on the sequence's.
    Choices (only the abstract was available to check against): the mixed-ratio form above,
    the per-sequence entropy normaliser, and the trust regions (GRPO's 0.2 for tokens, GSPO's
    3e-4/4e-4 for sequences) are ours.
    """
    eps_low = _require_number("eps_low", eps_low, low=0.0, high=1.0)
    eps_high = _require_number("eps_high", eps_high, low=0.0)
    seq_eps_low = _require_number("seq_eps_low", seq_eps_low, low=0.0, high=1.0)
    seq_eps_high = _require_number("seq_eps_high", seq_eps_high, low=0.0)
    m, adv, log_ratio = _prepare(logp, old_logp, advantages, mask)
    if mixing == "average":
        w = torch.full_like(logp, 0.5)
    elif mixing == "entropy":
        if entropy is None:
            raise ValueError("dhpo with mixing='entropy' needs the param entropy [B, T]")
        check_same_shape(entropy=entropy, logp=logp)
        w = _entropy_mixing_weight(entropy.to(logp.dtype), m)
    else:
        raise ValueError(f"dhpo mixing must be 'average' or 'entropy', got {mixing!r}")
    token_ratio = log_ratio.exp()
    seq_ratio = _sequence_log_ratio(log_ratio, m).exp().unsqueeze(1).expand_as(logp)
    mixed = w * token_ratio + (1 - w) * seq_ratio
    mixed_clipped = (w * token_ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
                     + (1 - w) * seq_ratio.clamp(1.0 - seq_eps_low, 1.0 + seq_eps_high))
    loss, clipped = _clipped_surrogate(mixed, mixed_clipped, adv)
    metrics = _ratio_metrics(log_ratio, m, clipped)
    with torch.no_grad():
        metrics["mix_weight_mean"] = _masked_mean(w, m)
    return _masked(loss, m), metrics


# --------------------------------------------------------------------------------------------
# other surrogates


@POLICY_LOSSES.register("cpgd")
def cpgd(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
    *, eps_low: float = 0.2, eps_high: float = 0.2, drift_coef: float = 0.1, drift_clip: float | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """CPGD (Liu et al., arXiv 2505.12504): a policy-gradient objective on log ρ instead of ρ,
    clipped in log space, plus a policy-drift penalty α·KL(π_old‖π):

        L = −min(log ρ·A, clip(log ρ, log(1 − eps_low), log(1 + eps_high))·A) + α·(ρ − 1 − log ρ)

    ∇(log ρ·A) = A·∇logp: the plain policy gradient, without the importance weight that lets
    PPO-style updates blow up. The drift is estimated per token with ρ − 1 − log ρ, the k3
    estimator of KL(π_old‖π), unbiased on π_old's samples and ≥ 0.
    drift_clip = c (the authors' siiRL code, siirl/dag_worker/core_algos.py @af00a771): the drift
    term becomes α·sg(min(ρ − 1, c))·logp, whose gradient α·min(ρ − 1, c)·∇logp is the k3 term's
    (ρ − 1)·∇logp capped at c; the `cpgd` recipe uses their α = 0.001, c = 2. The clipped
    log-ratio PG term above matches their clamp of logp around logp_old in value and gradient.
    Metric `drift`: masked mean of the per-token k3 drift estimate ρ − 1 − log ρ.
    """
    eps_low = _require_number("eps_low", eps_low, low=0.0, high=1.0)
    eps_high = _require_number("eps_high", eps_high, low=0.0)
    if _require_number("drift_coef", drift_coef) < 0:
        raise ValueError(f"drift_coef must be >= 0, got {drift_coef}")
    m, adv, log_ratio = _prepare(logp, old_logp, advantages, mask)
    clipped_log_ratio = log_ratio.clamp(math.log1p(-eps_low), math.log1p(eps_high))
    policy_term, clipped = _clipped_surrogate(log_ratio, clipped_log_ratio, adv)
    drift = torch.expm1(log_ratio) - log_ratio  # ρ − 1 − log ρ  ≈ KL(π_old‖π) per token
    metrics = _ratio_metrics(log_ratio, m, clipped)
    with torch.no_grad():
        metrics["drift"] = _masked_mean(drift, m)
    if drift_clip is not None:
        cap = _require_number("drift_clip", drift_clip, low=0.0)
        drift = torch.expm1(log_ratio).clamp(max=cap).detach() * logp  # gradient min(ρ − 1, c)·∇logp
    return _masked(policy_term + drift_coef * drift, m), metrics


@POLICY_LOSSES.register("simple_po")
def simple_po(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
    *, eps: float = 0.2,
) -> tuple[torch.Tensor, Metrics]:
    """Simple Policy Optimization (Xie et al., arXiv 2401.16025, the SPO objective):

        L = −(ρ·A − |A| / (2ε) · (ρ − 1)²)

    A quadratic penalty instead of a clip: its optimum in ρ is exactly 1 + sign(A)·ε, the edge
    of PPO's trust region, and the gradient never vanishes. The form is the catalogue's (only
    the paper's abstract could be retrieved to check it); ε = 0.2 (PPO's) is our default.
    `clip_frac` here counts the tokens whose ratio lies outside [1 − ε, 1 + ε] (nothing is
    clipped).
    """
    eps = _require_number("eps", eps, low=0.0)
    m, adv, log_ratio = _prepare(logp, old_logp, advantages, mask)
    ratio = log_ratio.exp()
    loss = -(ratio * adv - adv.abs() / (2.0 * eps) * (ratio - 1.0) ** 2)
    return _masked(loss, m), _ratio_metrics(log_ratio, m, (ratio - 1.0).abs() > eps)


@POLICY_LOSSES.register("cispo")
def cispo(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
    *, eps_low: float | None = None, eps_high: float = 0.28,
) -> tuple[torch.Tensor, Metrics]:
    """CISPO (MiniMax-M1, arXiv 2506.13585): clip the importance weight, not the update,

        L = −sg[clip(ρ, 1 − eps_low, 1 + eps_high)] · A · logp

    so every token keeps a gradient (only its weight is truncated). The paper sets no lower
    bound (ε_low large) and tunes only ε_high; eps_low=None means no lower bound. The paper
    gives no number for ε_high: the default 0.28 is DAPO's clip-higher value (our choice).
    """
    lower = None if eps_low is None else 1.0 - _require_number("eps_low", eps_low, low=0.0, high=1.0)
    upper = 1.0 + _require_number("eps_high", eps_high, low=0.0)
    m, adv, log_ratio = _prepare(logp, old_logp, advantages, mask)
    ratio = log_ratio.exp()
    weight = ratio.clamp(min=lower, max=upper).detach()
    truncated = ratio > upper if lower is None else (ratio > upper) | (ratio < lower)
    return _masked(-weight * adv * logp, m), _ratio_metrics(log_ratio, m, truncated)


@POLICY_LOSSES.register("reinforce")
def reinforce(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
) -> tuple[torch.Tensor, Metrics]:
    """REINFORCE (Williams 1992): L = −A·logp (denominator sg[π]: no importance weight)."""
    m, adv, log_ratio = _prepare(logp, old_logp, advantages, mask)
    return _masked(-adv * logp, m), _ratio_metrics(log_ratio, m, None)


@POLICY_LOSSES.register("unclipped")
def unclipped(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
) -> tuple[torch.Tensor, Metrics]:
    """The importance-weighted policy gradient without a trust region: L = −ρ·A per token.

    What the LUFFY, HPT and RL-PLUS training scripts run on their rollouts (`loss_remove_clip=True`
    in their verl forks, e.g. ElliottYan/LUFFY @01f4ae06 luffy/verl/verl/mix_src/mix_core_alg.py).
    With one update per batch (ρ = 1) its gradient is REINFORCE's −A·∇logp.
    """
    m, adv, log_ratio = _prepare(logp, old_logp, advantages, mask)
    return _masked(-adv * log_ratio.exp(), m), _ratio_metrics(log_ratio, m, None)


@POLICY_LOSSES.register("sft")
def sft(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
) -> tuple[torch.Tensor, Metrics]:
    """Supervised fine-tuning, the negative log-likelihood of the target tokens: L = −logp.

    In the unified estimator this is A = 1 on expert tokens; `advantages` is ignored (but
    shape-checked, like every loss's inputs).
    """
    m, _, log_ratio = _prepare(logp, old_logp, advantages, mask)
    return _masked(-logp, m), _ratio_metrics(log_ratio, m, None)


@POLICY_LOSSES.register("a_star_po", inputs=("ref_logp",))
def a_star_po(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
    *, ref_logp: torch.Tensor | None = None, beta: float = 1e-3,
) -> tuple[torch.Tensor, Metrics]:
    """A*-PO (Brantley et al., arXiv 2505.20686, stage 2): least-squares regression of the
    policy's log-ratio to the reference onto the optimal advantage,

        L_i = (β · Σ_t m·(logp − ref_logp) − A_i)²,   A_i = r_i − V*(x_i)

    where the caller passes A_i (V* = β₁·log E_ref[exp(r/β₁)] is estimated offline from
    reference samples, not here). L_i is put on every token of sequence i, so
    `seq_mean_token_mean` gives the paper's mean over sequences. A `[B, T]` advantage is
    reduced to its masked token mean per sequence. `ref_logp` [B, T] (frozen, detached) is
    required; beta = 1e-3 is our default. Metric `residual_abs_mean`: mean |β·log-ratio − A|
    over non-empty sequences.
    """
    if ref_logp is None:
        raise ValueError("a_star_po needs the param ref_logp [B, T] (log-probs under π_ref)")
    beta = _require_number("beta", beta, low=0.0)
    check_same_shape(logp=logp, ref_logp=ref_logp)
    _check_dtypes(logp=logp, ref_logp=ref_logp)
    m, adv, log_ratio = _prepare(logp, old_logp, advantages, mask)
    n_tokens = m.sum(1)
    seq_adv = advantages if advantages.dim() == 1 else (adv * m).sum(1) / _safe_denominator(n_tokens)
    ref_log_ratio = torch.where(m > 0, logp - ref_logp.detach(), torch.zeros_like(logp))
    residual = beta * (ref_log_ratio * m).sum(1) - seq_adv  # [B]
    loss = (residual**2).unsqueeze(1).expand_as(logp)
    metrics = _ratio_metrics(log_ratio, m, None)
    with torch.no_grad():
        nonempty = (n_tokens > 0).to(m.dtype)
        metrics["residual_abs_mean"] = _masked_mean(residual.abs(), nonempty)
    return _masked(loss, m), metrics


def value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
    clip: float = 0.2, *, check_finite: bool = True,
) -> tuple[torch.Tensor, Metrics]:
    """PPO clipped value loss (arXiv 1707.06347; the OpenAI baselines form), per token:

        V_clip = V_old + clip(V − V_old, −clip, clip)
        L = ½ · max((V − R)², (V_clip − R)²)

    Returns (per-token loss [B, T], 0 off the mask; metrics `value_clip_frac`, the fraction of
    tokens where the clipped error is the larger, and `value_error`, masked mean of (V − R)²).
    Aggregate it with `aggregate` like a policy loss.
    """
    clip = _require_number("clip", clip, low=0.0)
    check_ndim("values", values, 2)
    check_same_shape(values=values, old_values=old_values, returns=returns, mask=mask)
    _check_dtypes(values=values, old_values=old_values, returns=returns)
    if check_finite:
        for name, tensor in (("values", values), ("old_values", old_values), ("returns", returns)):
            _check_finite(name, tensor)
    m = as_float_mask(mask, values)
    old_values = old_values.detach()
    clipped_values = old_values + (values - old_values).clamp(-clip, clip)
    unclipped_error = (values - returns) ** 2
    clipped_error = (clipped_values - returns) ** 2
    loss = 0.5 * torch.maximum(unclipped_error, clipped_error)
    with torch.no_grad():
        metrics = {
            "value_clip_frac": _masked_mean((clipped_error > unclipped_error).to(m.dtype), m),
            "value_error": _masked_mean(unclipped_error, m),
        }
    return _masked(loss, m), metrics


# --------------------------------------------------------------------------------------------
# aggregation


def _check_mode(mode: str) -> None:
    if mode not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {mode!r}; valid: {', '.join(AGGREGATIONS)}")


def aggregation_denominator(mask: torch.Tensor, mode: str, max_len: int | None = None) -> torch.Tensor:
    """The denominator of `mode` for `mask` [B, T] (compute it on the FULL batch), 0-dim:

    - token_mean:              Σ m                 (tokens in the batch; DAPO arXiv 2503.14476)
    - seq_mean_token_mean:     #rows with Σ_t m > 0 (all-masked rows are not counted; GRPO
                               arXiv 2402.03300)
    - seq_mean_token_sum:      #rows with Σ_t m > 0, over token SUMS: a mean over sequences of
                               their summed losses (verl's "seq-mean-token-sum"; BNPO's code)
    - seq_mean_token_sum_norm: B · T_max, T_max = max_len (the generation budget) if given,
                               else the mask's T; every row counts, the normaliser is a
                               constant by design (Dr. GRPO arXiv 2503.20783)
    """
    _check_mode(mode)
    check_ndim("mask", mask, 2)
    m = mask if mask.is_floating_point() else mask.float()
    if mode == "token_mean":
        return m.sum()
    if mode in ("seq_mean_token_mean", "seq_mean_token_sum"):
        return (m.sum(1) > 0).to(m.dtype).sum()
    if max_len is not None and (isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < m.shape[1]):
        raise ValueError(f"max_len must be an int >= the mask's T={m.shape[1]}, got {max_len!r}")
    t_max = m.shape[1] if max_len is None else max_len
    return torch.tensor(float(m.shape[0] * t_max), dtype=m.dtype, device=m.device)


def aggregate(
    per_token_loss: torch.Tensor, mask: torch.Tensor, mode: str,
    *, denominator: torch.Tensor | float | None = None, max_len: int | None = None,
) -> torch.Tensor:
    """One 0-dim loss from per-token losses: numerator(mode) / denominator.

    numerator: Σ_i,t L·m for token_mean, seq_mean_token_sum and seq_mean_token_sum_norm; Σ_i (Σ_t L·m / Σ_t m) for
    seq_mean_token_mean (an all-masked row adds 0). denominator: `aggregation_denominator(mask,
    mode, max_len)` unless given. For gradient accumulation pass the full batch's denominator to
    every micro-batch: the micro-batch results then sum exactly to the full-batch aggregate.
    A zero denominator (all-masked batch) gives loss 0, never NaN.
    """
    _check_mode(mode)
    check_ndim("per_token_loss", per_token_loss, 2)
    m = as_float_mask(mask, per_token_loss)
    weighted = per_token_loss * m
    if mode == "seq_mean_token_mean":
        numerator = (weighted.sum(1) / _safe_denominator(m.sum(1))).sum()
    else:
        numerator = weighted.sum()
    if denominator is None:
        denominator = aggregation_denominator(m, mode, max_len)
    elif max_len is not None:
        aggregation_denominator(m, mode, max_len)  # still validate max_len against this T
    den = torch.as_tensor(denominator, dtype=numerator.dtype, device=numerator.device)
    return numerator / _safe_denominator(den)


# --------------------------------------------------------------------------------------------
# the entry point


def compute_policy_loss(
    name: str,
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    agg: str = "token_mean",
    *,
    weights: torch.Tensor | None = None,
    denominator: torch.Tensor | float | None = None,
    max_len: int | None = None,
    check_finite: bool = True,
    **params: object,
) -> tuple[torch.Tensor, Metrics]:
    """The policy loss `name` aggregated with `agg`: (0-dim loss, metrics).

    `weights` [B, T] (token / sample selection) multiply the per-token loss, and tokens with
    weight 0 are removed from the mask before aggregating: denominators count only selected
    tokens (and `seq_mean_token_mean` only rows with a selected token). Sequence-level
    quantities inside a loss (GSPO's s_i, A*-PO's sum) still see the full completion `mask`.
    Metrics are over the completion mask. `denominator`/`max_len` go to `aggregate` (gradient
    accumulation: pass `aggregation_denominator` of the full, selection-weighted mask).
    `params` are the loss's keyword params; an unknown one is a ValueError. NaN/inf in any
    input is a ValueError unless check_finite=False.
    """
    fn = POLICY_LOSSES.get(name)
    _check_mode(agg)
    POLICY_LOSSES.check_params(name, params)
    POLICY_LOSSES.check_inputs(name, params)
    if weights is not None:
        check_same_shape(weights=weights, logp=logp)
    if check_finite:
        tensors = {"logp": logp, "old_logp": old_logp, "advantages": advantages, "mask": mask, "weights": weights}
        tensors.update({k: v for k, v in params.items() if isinstance(v, torch.Tensor)})
        for key, tensor in tensors.items():
            _check_finite(key, tensor)
    per_token_loss, metrics = fn(logp, old_logp, advantages, mask, **params)
    m = as_float_mask(mask, per_token_loss)
    if weights is not None:
        per_token_loss = per_token_loss * weights.to(per_token_loss.dtype)
        m = m * (weights != 0).to(m.dtype)
    return aggregate(per_token_loss, m, agg, denominator=denominator, max_len=max_len), metrics
