"""Hybrid policy: on-policy rollouts and off-policy expert traces in one objective.

The losses here are registered into the shared `POLICY_LOSSES` registry (one signature,
`fn(logp, old_logp, advantages, mask, **params) -> (per_token_loss [B, T], metrics)`), and the
CalibRL advantage into `ADVANTAGE_ESTIMATORS`, so a hybrid recipe goes through the same trainer
path as any other. Rows are marked expert or not by `off_policy` [B] bool. The remaining pieces
are pure helpers the trainer calls to decide, per group and step, how much RL and how much
SFT a row gets (CHORD's μ schedule, HPT's and AHPO's gates, GHPO's hints).

Mixed groups (LUFFY, arXiv 2504.14945): each group holds the model's rollouts plus expert
traces, and the group advantage is computed over all of them together, on- and off-policy
members alike. That is just the ordinary group estimator applied to the whole group (LUFFY's
and RL-PLUS's released scripts: adv_estimator=grpo with grpo_use_std=False, i.e. `dr_grpo`), so
no separate estimator exists for it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Real

import torch

from . import validate
from .advantages import ADVANTAGE_ESTIMATORS
from .losses import POLICY_LOSSES

# --------------------------------------------------------------------------------------------
# shared pieces


def _check_loss_inputs(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, off_policy: object
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shape checks; returns (advantages as [B, T], off_policy [B] bool)."""
    validate.check_ndim("logp", logp, 2)
    validate.check_same_shape(logp=logp, old_logp=old_logp, mask=mask)
    batch = logp.shape[0]
    if advantages.dim() == 1:
        validate.check_per_sequence("advantages", advantages, batch)
        advantages = advantages.unsqueeze(1).expand_as(logp)
    else:
        validate.check_same_shape(logp=logp, advantages=advantages)
    if not isinstance(off_policy, torch.Tensor) or off_policy.dtype != torch.bool:
        raise ValueError(f"off_policy must be a bool [B] tensor, got {getattr(off_policy, 'dtype', off_policy)}")
    validate.check_per_sequence("off_policy", off_policy, batch)
    return advantages, off_policy


def _split_rows(
    mask: torch.Tensor, off_policy: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """[B, T] views: (valid tokens, expert rows, valid expert tokens, mask of on-policy rows only)."""
    valid = mask if mask.dtype == torch.bool else mask != 0
    off_rows = off_policy.unsqueeze(1).expand_as(valid)
    on_mask = mask & ~off_rows if mask.dtype == torch.bool else mask * (~off_rows).to(mask.dtype)
    return valid, off_rows, off_rows & valid, on_mask


def _on_policy_ppo(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    on_mask: torch.Tensor,
    off_rows: torch.Tensor,
    eps_low: float,
    eps_high: float,
    clip: bool = True,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The on-policy rows' loss (its metrics cover only those tokens).

    clip=True: the registered `ppo_clip` loss, −min(ρ·A, clip(ρ, 1 − ε_lo, 1 + ε_hi)·A).
    clip=False: the unclipped surrogate −ρ·A (the released LUFFY / RL-PLUS scripts set
    `loss_remove_clip=True`); `clip_frac` is then 0.
    Expert rows get old_logp := sg(logp) so their (unused) branch stays finite whatever the
    caller put there.
    """
    if not isinstance(clip, bool):
        raise ValueError(f"clip_on_policy must be a bool, got {clip!r}")
    safe_old = torch.where(off_rows, logp.detach(), old_logp)
    loss, metrics = POLICY_LOSSES.get("ppo_clip")(
        logp, safe_old, advantages, on_mask, eps_low=eps_low, eps_high=eps_high
    )
    if clip:
        return loss, metrics
    valid = on_mask if on_mask.dtype == torch.bool else on_mask != 0
    # log-ratio 0 off the mask: garbage log-probs on padding can never overflow exp()
    log_ratio = torch.where(valid, logp - safe_old.detach(), torch.zeros_like(logp))
    loss = torch.where(valid, -advantages * log_ratio.exp(), torch.zeros_like(logp))
    metrics["clip_frac"] = torch.zeros_like(metrics["clip_frac"])
    return loss, metrics


def _masked_mean(values: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """Detached mean of `values` over `where`; 0 when `where` is empty (never NaN)."""
    values = values.detach()
    total = torch.where(where, values, torch.zeros_like(values)).sum()
    return total / where.sum().clamp(min=1).to(values.dtype)


def _mixed_loss(
    on_loss: torch.Tensor, off_loss: torch.Tensor, valid: torch.Tensor, off_policy: torch.Tensor
) -> torch.Tensor:
    per_token = torch.where(off_policy.unsqueeze(1), off_loss, on_loss)
    return torch.where(valid, per_token, torch.zeros_like(per_token))  # masked tokens contribute nothing


def _require_number(name: str, value: object, *, low: float | None = None, low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(float(value)):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    value = float(value)
    if low is not None and (value < low or (low_open and value == low)):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value}")
    return value


# --------------------------------------------------------------------------------------------
# LUFFY


def policy_shaping(prob: torch.Tensor, gamma: float = 0.1) -> torch.Tensor:
    """LUFFY's policy shaping f(p) = p / (p + γ) (arXiv 2504.14945, γ = 0.1).

    Its gradient f'(p) = γ / (p + γ)² is largest for low-probability tokens, so imitating an
    expert trace pushes up the tokens the policy finds unlikely instead of sharpening the
    likely ones.
    """
    gamma = _require_number("gamma", gamma, low=0.0, low_open=True)
    return prob / (prob + gamma)


@POLICY_LOSSES.register("luffy", inputs=("off_policy",))
def luffy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    off_policy: torch.Tensor,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    shaping_gamma: float = 0.1,
    clip_on_policy: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """LUFFY (arXiv 2504.14945): policy gradient on rollouts, shaped off-policy PG on expert traces.

        on-policy rows  (off_policy = False): −A·ρ, ρ = π_θ/π_old                 (clip_on_policy=False)
                                              ppo_clip(logp, old_logp, A; ε_lo, ε_hi)  (clip_on_policy=True)
        off-policy rows (off_policy = True):  −A · f(π_θ(y_t)),  f(p) = p / (p + γ)

    Checked against the authors' code: `compute_token_on_off_policy_loss` in
    luffy/verl/verl/mix_src/mix_core_alg.py of ElliottYan/LUFFY @01f4ae066249e6965ce0d5512ccdf99a12895c74,
    off_policy_reshape="p_div_p_0.1" (γ = 0.1); tests/golden/luffy.json. Its released training script
    (exp_scripts/train.sh) sets loss_remove_clip=True, so by default the on-policy surrogate is
    unclipped; clip_on_policy=True is the paper's clipped objective (the code's
    loss_remove_clip=False: clip(ρ, 1 − 0.2, max(clip_upper_bound = 1, 1.2))).
    The expert rows have no clipping and no π_old: the expert's own token probability is taken
    as 1 (the ratio is π_θ/1), so `old_logp` is ignored on those rows. The gradient flows
    through π_θ = exp(logp). A is the group advantage over on- and off-policy members together
    (the script: adv_estimator=grpo, grpo_use_std=False, i.e. `dr_grpo` over the whole group),
    aggregated as Σ L·m / T_max (loss_remove_token_mean=True) with an entropy bonus of 0.001.
    Metrics: ppo_clip's (over on-policy tokens; clip_frac is 0 when unclipped) plus
      off_policy_frac  fraction of valid tokens on expert rows
      off_policy_prob  mean π_θ on expert tokens
      off_shaped_mean  mean f(π_θ) on expert tokens
    """
    advantages, off_policy = _check_loss_inputs(logp, old_logp, advantages, mask, off_policy)
    valid, off_rows, off_tokens, on_mask = _split_rows(mask, off_policy)
    on_loss, metrics = _on_policy_ppo(
        logp, old_logp, advantages, on_mask, off_rows, eps_low, eps_high, clip_on_policy
    )
    prob = torch.exp(logp)
    shaped = policy_shaping(prob, shaping_gamma)
    off_loss = -advantages * shaped
    metrics = {key: torch.nan_to_num(value.detach()) for key, value in metrics.items()}
    metrics.update(
        off_policy_frac=_masked_mean(off_tokens.to(logp.dtype), valid),
        off_policy_prob=_masked_mean(prob, off_tokens),
        off_shaped_mean=_masked_mean(shaped, off_tokens),
    )
    return _mixed_loss(on_loss, off_loss, valid, off_policy), metrics


# --------------------------------------------------------------------------------------------
# RL-PLUS


@POLICY_LOSSES.register("rl_plus", inputs=("off_policy",))
def rl_plus_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    off_policy: torch.Tensor,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    expert_prob: float = 1.0,
    clip_on_policy: bool = False,
    explore_gamma: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """RL-PLUS (arXiv 2508.00222): PG on rollouts, multiple importance sampling on expert tokens.

        on-policy rows:  −A·ρ (clip_on_policy=False)  or  ppo_clip(logp, old_logp, A; ε_lo, ε_hi) (True)
        expert rows:     −A · (1 − sg π_θ(e_t))^γx · π_θ(e_t) / (½·π_old(e_t) + ½·π_ω(e_t)),  no clipping

    Checked against the authors' code: `compute_token_on_off_policy_loss` with
    off_policy_strategy="RL-PLUS" in rl_plus/verl/verl/recipe/rlplus_core_alg.py of
    YihongDong/RL-PLUS @eb4aa4d4e2d7ce206056f9d7740138bfc94fad8f; tests/golden/rl_plus.json. The
    expert policy π_ω is unknown; its proxy is the mixture π_ω = ½·(π_old + p_e) of the old policy
    and a point-mass expert with probability p_e = `expert_prob` (1 there), so the denominator is
    ¾·π_old + ¼·p_e: bounded away from 0 and close to π_old where the model already agrees with
    the expert. On expert rows `old_logp` must be π_old's log-prob of the expert tokens. The
    released script (exp_scripts/train_RL-PLUS.sh) sets loss_remove_clip=True: by default the
    on-policy surrogate is unclipped; clip_on_policy=True gives the clipped (paper) form.
    The exploration weight (1 − sg π_θ)^γx (γx = 0.5) is applied inside the loss there, with the
    current π_θ. Here it is either the `rl_plus_explore` advantage estimator (explore_gamma=0,
    the default: pass its output as `advantages`; equal to the code while π_θ = π_old, i.e. in
    a batch's first update) or this loss's explore_gamma=0.5 with a plain group advantage (equal
    in every update). Never both. Metrics: ppo_clip's (on-policy tokens; clip_frac 0 when
    unclipped) plus
      off_policy_frac, off_policy_prob (mean π_θ on expert tokens),
      off_ratio_mean   mean MIS ratio on expert tokens
    """
    advantages, off_policy = _check_loss_inputs(logp, old_logp, advantages, mask, off_policy)
    expert_prob = _require_number("expert_prob", expert_prob, low=0.0, low_open=True)
    explore_gamma = _require_number("explore_gamma", explore_gamma, low=0.0)
    valid, off_rows, off_tokens, on_mask = _split_rows(mask, off_policy)
    on_loss, metrics = _on_policy_ppo(
        logp, old_logp, advantages, on_mask, off_rows, eps_low, eps_high, clip_on_policy
    )
    prob, old_prob = torch.exp(logp), torch.exp(old_logp)
    expert_proxy = 0.5 * (old_prob + expert_prob)
    ratio = prob / (0.5 * old_prob + 0.5 * expert_proxy)
    off_loss = -advantages * ratio
    if explore_gamma:
        # (1 − sg π)^γx with 1 − exp(logp) via expm1: exact for probabilities near 1
        off_loss = off_loss * (-torch.expm1(logp.detach())).clamp(min=0) ** explore_gamma
    metrics = {key: torch.nan_to_num(value.detach()) for key, value in metrics.items()}
    metrics.update(
        off_policy_frac=_masked_mean(off_tokens.to(logp.dtype), valid),
        off_policy_prob=_masked_mean(prob, off_tokens),
        off_ratio_mean=_masked_mean(ratio, off_tokens),
    )
    return _mixed_loss(on_loss, off_loss, valid, off_policy), metrics


# --------------------------------------------------------------------------------------------
# CHORD


def chord_mu_schedule(
    step: int, *, mu_peak: float, mu_valley: float, warmup_steps: int, decay_steps: int
) -> float:
    """CHORD's global SFT weight μ at `step` (arXiv 2508.11408).

        step < warmup:                  μ = μ_peak · step / warmup          (linear warm-up from 0)
        warmup <= step < warmup+decay:  μ = μ_valley + (μ_peak − μ_valley)·½(1 + cos(π·(step−warmup)/decay))
        step >= warmup + decay:         μ = μ_valley

    i.e. a linear warm-up then a cosine decay from μ_peak to μ_valley, moving training from
    imitation to on-policy exploration. warmup_steps = 0 skips the warm-up; decay_steps = 0
    jumps straight to μ_valley. Checked against the authors' `mu_schedule_function` in
    trinity/algorithm/policy_loss_fn/chord_policy_loss.py of modelscope/Trinity-RFT
    @041433056e9067e35a42a3943ecbaf89bef24518 (tests/golden/chord.json). Their example config
    (examples/mix_chord/mix_chord.yaml) runs warmup 200, decay 400, μ 0.5 -> 0.02 and notes
    CHORD-μ = (0, 200, 0.9 -> 0.05) and CHORD-φ = constant μ = 0.1 (0, 0, 0.1 -> 0.1).
    """
    for name, value in (("step", step), ("warmup_steps", warmup_steps), ("decay_steps", decay_steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    for name, value in (("mu_peak", mu_peak), ("mu_valley", mu_valley)):
        if _require_number(name, value, low=0.0) > 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value}")
    if step < warmup_steps:
        return step / warmup_steps * mu_peak
    if step >= warmup_steps + decay_steps:
        return float(mu_valley)
    cosine = 0.5 * (1.0 + math.cos(math.pi * (step - warmup_steps) / decay_steps))
    return mu_valley + (mu_peak - mu_valley) * cosine


def chord_phi_weights(logp: torch.Tensor) -> torch.Tensor:
    """CHORD-φ token weights for the SFT loss: φ = sg(p·(1 − p)), p = exp(logp) (arXiv 2508.11408).

    Tokens the policy already finds near-certain (p ≈ 1) or near-impossible (p ≈ 0) are
    down-weighted, so expert data nudges the uncertain tokens without disrupting the rest.
    Use as `loss_sft = −φ · logp` per token. Detached: φ is a weight, not part of the objective.
    Checked against the authors' `phi_function` / `SFTPhiLossFn` (token-mean of −logp·sg φ over the
    expert tokens) in trinity/algorithm/policy_loss_fn/chord_policy_loss.py of
    modelscope/Trinity-RFT @041433056e9067e35a42a3943ecbaf89bef24518 (tests/golden/chord.json).
    """
    prob = torch.exp(logp.detach())
    return prob * (1.0 - prob)


# --------------------------------------------------------------------------------------------
# per-group gates: HPT, AHPO, GHPO


def _correct_per_group(
    rewards: torch.Tensor, group_ids: torch.Tensor, success_reward: float, off_policy: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: (number of correct on-policy rollouts in its group, number of on-policy rollouts)."""
    validate.check_ndim("rewards", rewards, 1)
    batch = rewards.shape[0]
    validate.check_group_ids(group_ids, batch)
    _require_number("success_reward", success_reward)
    counted = torch.ones(batch, dtype=torch.bool, device=rewards.device)
    if off_policy is not None:
        if not isinstance(off_policy, torch.Tensor) or off_policy.dtype != torch.bool:
            raise ValueError(f"off_policy must be a bool [B] tensor, got {getattr(off_policy, 'dtype', off_policy)}")
        validate.check_per_sequence("off_policy", off_policy, batch)
        counted = ~off_policy
    group_index, n_groups = validate.group_index(group_ids)
    correct = (rewards >= success_reward) & counted
    zeros = torch.zeros(n_groups, dtype=torch.int64, device=rewards.device)
    n_correct = zeros.index_add(0, group_index, correct.long())
    n_counted = zeros.index_add(0, group_index, counted.long())
    return n_correct[group_index], n_counted[group_index]


def hpt_use_sft(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    threshold: float = 0.0,
    *,
    success_reward: float = 1.0,
    off_policy: torch.Tensor | None = None,
) -> torch.Tensor:
    """HPT's per-prompt switch (arXiv 2509.04419): True [B] where the group should train by SFT.

    A rollout is correct when its reward >= `success_reward`. With P the group's success rate
    over its on-policy rollouts (`off_policy` rows are not counted), the group uses SFT on the
    expert trace when P <= threshold and RL otherwise. The authors' code compares the number of
    correct rollouts out of 8 with a gate of 0 (Qwen) or 2 (LLaMA), i.e. threshold 0 or 0.25;
    the default 0 switches to SFT only when every rollout failed.
    """
    threshold = _require_number("threshold", threshold, low=0.0)
    n_correct, n_counted = _correct_per_group(rewards, group_ids, success_reward, off_policy)
    success_rate = n_correct.to(torch.float64) / n_counted.clamp(min=1).to(torch.float64)
    return success_rate <= threshold


def ahpo_offpolicy_weight(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    r_hat: float,
    *,
    success_reward: float = 1.0,
    off_policy: torch.Tensor | None = None,
) -> torch.Tensor:
    """AHPO's off-policy gate ξ (MM-HELIX, arXiv 2510.08540): float [B] of 1 or 0.

        ξ = 1  if (number of correct on-policy rollouts in the group) < R̂,   else 0

    so the expert (SFT) term helps only while rewards are sparse and switches itself off once
    the model solves the prompt on its own. L = ξ·L_off + L_on. Correct means reward >=
    `success_reward`; `off_policy` rows are not counted.
    """
    r_hat = _require_number("r_hat", r_hat, low=0.0)
    n_correct, _ = _correct_per_group(rewards, group_ids, success_reward, off_policy)
    dtype = rewards.dtype if rewards.is_floating_point() else torch.get_default_dtype()
    return (n_correct.to(torch.float64) < r_hat).to(dtype)


def ghpo_needs_hint(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    success_reward: float = 1.0,
    off_policy: torch.Tensor | None = None,
) -> torch.Tensor:
    """GHPO's difficulty detection (arXiv 2507.10628): True [B] where every rollout of the group failed.

    Those prompts are re-rolled with part of the expert solution appended as a hint
    (`ghpo_hint_fraction`); the others train by plain on-policy RL.
    """
    n_correct, _ = _correct_per_group(rewards, group_ids, success_reward, off_policy)
    return n_correct == 0


def ghpo_hint_fraction(
    level: int | torch.Tensor, schedule: Sequence[float] = (0.25, 0.5, 0.75)
) -> float | torch.Tensor:
    """Fraction of the expert solution given as a hint at hint `level` (GHPO, arXiv 2507.10628).

    Level 0 is no hint; level k >= 1 (the k-th consecutive all-fail round of the prompt) gets
    schedule[k − 1], and levels past the end stay at the last entry. The default
    (1/4, 1/2, 3/4) is GHPO's multi-stage guidance: the hint grows only while the model still
    fails, and the full solution is never given. Accepts an int or an integer tensor of levels.
    """
    fractions = [0.0] + [_require_number("schedule entry", f, low=0.0) for f in schedule]
    if any(f > 1.0 for f in fractions) or any(b < a for a, b in zip(fractions, fractions[1:])):
        raise ValueError(f"schedule must be non-decreasing fractions in [0, 1], got {tuple(schedule)}")
    if isinstance(level, torch.Tensor):
        if level.is_floating_point() or level.dtype == torch.bool:
            raise ValueError(f"level must be an integer tensor, got dtype {level.dtype}")
        if bool((level < 0).any()):
            raise ValueError("level must be >= 0")
        table = torch.tensor(fractions, dtype=torch.get_default_dtype(), device=level.device)
        return table[level.clamp(max=len(fractions) - 1)]
    if isinstance(level, bool) or not isinstance(level, int) or level < 0:
        raise ValueError(f"level must be an int >= 0, got {level!r}")
    return fractions[min(level, len(fractions) - 1)]


# --------------------------------------------------------------------------------------------
# CalibRL


@POLICY_LOSSES.register("calibrl", inputs=("expert_logp", "rewards"))
def calibrl_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    expert_logp: torch.Tensor,
    rewards: torch.Tensor,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    clip_ratio_c: float = 3.0,
    guide_coef: float = 0.1,
    negative_slope: float = 0.5,
    pass_threshold: float = 0.1,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """CalibRL (arXiv 2602.20197) as its released code trains, per token of a rollout:

        L = dual_clip(ρ, A; ε_lo, ε_hi, c) + guide_coef · |A_i| · LeakyReLU_α(s_i · (log π_e(t) − log π_θ(y_i,t)))

    s_i = +1 when the rollout passed (reward > `pass_threshold`), −1 otherwise; log π_e(t) is π_old's
    log-prob of the group's expert trace at position t (`expert_logp`, the calibration baseline, fixed);
    A_i the group advantage of the rollouts (e.g. `calibrl_advantage` with guide_coef=0: r − mean, no std).
    The guided term is differentiated through log π_θ at every update, so unlike folding it into the
    advantage (`calibrl_advantage`) it stays exact after the first optimizer step. Expert rows are no
    training target: leave them out of `mask` (the recipe's mixer does). Checked against the authors'
    `compute_mix_policy_loss(mix_policy_loss="expert-guided")` plus 0.1·guided_loss (zhh6425/CalibRL
    @0efd7991, src/core_algos.py, src/dp_actor.py): tests/golden/calibrl.json. Metrics: dual_clip's, plus
    `guided_mean`, the mean guided term over the tokens.
    """
    from .losses import dual_clip

    guide_coef = _require_number("guide_coef", guide_coef, low=0.0)
    negative_slope = _require_number("negative_slope", negative_slope, low=0.0)
    pass_threshold = _require_number("pass_threshold", pass_threshold)
    validate.check_same_shape(logp=logp, expert_logp=expert_logp)
    validate.check_per_sequence("rewards", rewards, logp.shape[0])
    policy, metrics = dual_clip(logp, old_logp, advantages, mask, eps_low=eps_low, eps_high=eps_high,
                                clip_ratio_c=clip_ratio_c)
    sign = torch.where(rewards > pass_threshold, 1.0, -1.0).to(logp.dtype).unsqueeze(1)
    magnitude = (advantages if advantages.dim() == 2 else advantages.unsqueeze(1)).abs()
    guided = magnitude * torch.nn.functional.leaky_relu(sign * (expert_logp.detach() - logp), negative_slope)
    valid = mask != 0 if mask.dtype != torch.bool else mask
    guided = torch.where(valid, guided, torch.zeros_like(guided))
    metrics["guided_mean"] = _masked_mean(guided, valid)
    return policy + guide_coef * guided, metrics


@ADVANTAGE_ESTIMATORS.register("calibrl", inputs=("logp", "expert_logp", "off_policy"))
def calibrl_advantage(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    logp: torch.Tensor,
    expert_logp: torch.Tensor,
    off_policy: torch.Tensor | None = None,
    pass_threshold: float = 0.1,
    success_reward: float | None = None,
    norm_by_std: bool = False,
    negative_slope: float = 0.5,
    guide_coef: float = 0.1,
    eps: float = 1e-6,
) -> torch.Tensor:
    """CalibRL (arXiv 2602.20197): group advantage plus an expert-calibrated term, [B, T].

    What the authors' code optimises, per on-policy token, is the PPO loss with the group
    advantage A_i plus guide_coef times a guided term,

        L = L_PPO(A_i) + 0.1 · |A_i| · LeakyReLU_α(s_i · (log π_e(t) − log π(y_{i,t}))),

    with s_i = +1 for a correct rollout and −1 otherwise, log π_e(t) the old policy's log-prob
    of the group's expert trace at the same position t (the calibration baseline), and α = 0.5.
    |A_i| is the "group rareness" weight. The LeakyReLU is the asymmetric activation: where the
    rollout is less confident than the expert on a correct answer (or more confident on a wrong
    one) the update is full; where it is already past the expert baseline it is damped to α,
    keeping its direction.

    An advantage estimator cannot see π_θ during the update, so we return the advantage whose
    policy gradient equals that of L at π = π_old (its derivative in log π):

        Â[i,t] = A_i + guide_coef · s_i · |A_i| · (1 if s_i·(expert_logp − logp) > 0 else α)

    to be used with a ratio loss (`dual_clip` with c = 3 is the code's; `ppo_clip` has the same
    gradient at π = π_old). `logp` is π_old's log-probs of each row, `expert_logp` [B, T] the old
    log-probs of that row's group expert trace, position-aligned (the trainer copies the expert
    row across the group). A_i = r − mean_g r over the group's on-policy rows, divided by
    (std_g r + eps) (unbiased std) when norm_by_std=True; groups with fewer than two on-policy
    rows or equal rewards get 0. Expert rows (`off_policy`) get 0: CalibRL uses the expert only
    as the baseline; the code drops them from the loss and from its token-mean denominator.
    Correct means reward > `pass_threshold`, or reward >= `success_reward` when that is given.

    Checked against the authors' code, zhh6425/CalibRL @0efd799160ec69a3c212e75ba4eb6334c721b8ec
    (tests/golden/calibrl.json): `compute_mix_grpo_outcome_advantage` and `compute_mix_policy_loss`
    (mix_policy_loss="expert-guided") in src/core_algos.py, combined as pg_loss + 0.1·guided_loss
    in src/dp_actor.py; the defaults are the released script's
    (src/examples/run_qwen25vl7b_virl_mix_policy.sh: norm_adv_by_std_in_grpo=False, pass = score
    > 0.1, guide weight 0.1). The paper's std-normalised rareness weight is norm_by_std=True.
    One difference is kept: a group with a single on-policy rollout gets 0 here, r − 0 there.
    """
    validate.check_ndim("rewards", rewards, 1)
    batch = rewards.shape[0]
    validate.check_group_ids(group_ids, batch)
    for name, value in (("logp", logp), ("expert_logp", expert_logp)):
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            raise ValueError(f"{name} must be a floating [B, T] tensor, got {getattr(value, 'dtype', value)}")
        validate.check_ndim(name, value, 2)
    validate.check_same_shape(logp=logp, expert_logp=expert_logp)
    if logp.shape[0] != batch:
        raise ValueError(f"logp must be [B, T] with B={batch}, got shape {list(logp.shape)}")
    negative_slope = _require_number("negative_slope", negative_slope, low=0.0)
    guide_coef = _require_number("guide_coef", guide_coef)
    eps = _require_number("eps", eps, low=0.0)
    pass_threshold = _require_number("pass_threshold", pass_threshold)
    if success_reward is not None:
        success_reward = _require_number("success_reward", success_reward)
    if not isinstance(norm_by_std, bool):
        raise ValueError(f"norm_by_std must be a bool, got {norm_by_std!r}")
    on_policy = torch.ones(batch, dtype=torch.bool, device=rewards.device)
    if off_policy is not None:
        if not isinstance(off_policy, torch.Tensor) or off_policy.dtype != torch.bool:
            raise ValueError(f"off_policy must be a bool [B] tensor, got {getattr(off_policy, 'dtype', off_policy)}")
        validate.check_per_sequence("off_policy", off_policy, batch)
        on_policy = ~off_policy

    dtype = logp.dtype
    values = rewards.to(dtype)
    group_index, n_groups = validate.group_index(group_ids)
    weight = on_policy.to(dtype)
    count = torch.zeros(n_groups, dtype=dtype, device=values.device).index_add_(0, group_index, weight)
    total = torch.zeros_like(count).index_add_(0, group_index, values * weight)
    mean = total / count.clamp(min=1)
    deviation = (values - mean[group_index]) * weight
    advantage = deviation
    if norm_by_std:
        square = torch.zeros_like(count).index_add_(0, group_index, deviation**2)
        std = torch.sqrt(square / (count - 1).clamp(min=1))
        advantage = deviation / (std[group_index] + eps)
    # Equal on-policy rewards leave a rounding residue in r − mean: pin such groups to exactly 0.
    high = torch.full_like(count, -math.inf).scatter_reduce(
        0, group_index, torch.where(on_policy, values, torch.full_like(values, -math.inf)), "amax"
    )
    low = torch.full_like(count, math.inf).scatter_reduce(
        0, group_index, torch.where(on_policy, values, torch.full_like(values, math.inf)), "amin"
    )
    informative = (count >= 2) & (high > low)
    advantage = torch.where(informative[group_index] & on_policy, advantage, torch.zeros_like(advantage))

    correct = rewards > pass_threshold if success_reward is None else rewards >= success_reward
    sign = torch.where(correct, 1.0, -1.0).to(dtype)
    gap = sign.unsqueeze(1) * (expert_logp - logp)
    slope = torch.where(gap > 0, torch.ones_like(gap), torch.full_like(gap, negative_slope))
    guided = sign.unsqueeze(1) * advantage.abs().unsqueeze(1) * slope
    return (advantage.unsqueeze(1) + guide_coef * guided).detach()
