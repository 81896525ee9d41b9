"""The RL/SFT mixing slot: how much RL loss and how much SFT loss each row gets.

A mixer sees the whole rollout batch (rewards, which rows are expert traces, which prompt
each row answers) and the training step, and returns two per-row weights:

    loss = sum_rows rl_weight * L_RL(row) + sum_rows sft_weight * L_SFT(row)

Pure on-policy methods give every rollout rl_weight 1; SFT gives every expert row
sft_weight 1; CHORD schedules the two, HPT/AHPO gate them per prompt. The per-prompt gates
and schedules themselves are pure maths in `unipo.core.hybrid`.
"""

from __future__ import annotations

import torch

from unipo.core import hybrid
from unipo.core.registry import Registry

MIXERS: Registry = Registry("mixer")

Weights = tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]


def _per_prompt_to_rows(on_policy_flags: torch.Tensor, on_prompt_index: torch.Tensor,
                        prompt_index: torch.Tensor) -> torch.Tensor:
    """Spread a per-row flag computed on on-policy rows to every row of the same prompt."""
    n_prompts = int(prompt_index.max()) + 1
    per_prompt = torch.zeros(n_prompts, dtype=on_policy_flags.dtype, device=on_policy_flags.device)
    per_prompt[on_prompt_index] = on_policy_flags
    return per_prompt[prompt_index]


@MIXERS.register("rl")
def rl_only(*, rewards, prompt_index, off_policy, step, total_steps, expert_rows: bool = True) -> Weights:
    """Every row is trained by the RL loss (expert rows too, when the loss handles them). With
    `expert_rows=False` expert rows are no training target at all (CalibRL uses them only as a baseline):
    they leave the RL loss and its token-mean denominator."""
    rl = torch.ones_like(rewards) if expert_rows else (~off_policy).to(rewards.dtype)
    return rl, torch.zeros_like(rewards), {}


@MIXERS.register("sft")
def sft_only(*, rewards, prompt_index, off_policy, step, total_steps) -> Weights:
    """Only expert rows, by negative log-likelihood."""
    return torch.zeros_like(rewards), off_policy.to(rewards.dtype), {}


@MIXERS.register("sft_then_rl")
def sft_then_rl(*, rewards, prompt_index, off_policy, step, total_steps, sft_steps: int) -> Weights:
    """SFT on expert rows for the first `sft_steps` steps, then RL on rollouts only."""
    expert = off_policy.to(rewards.dtype)
    if step < sft_steps:
        return torch.zeros_like(rewards), expert, {"mix/sft_stage": torch.tensor(1.0)}
    return 1.0 - expert, torch.zeros_like(rewards), {"mix/sft_stage": torch.tensor(0.0)}


@MIXERS.register("chord")
def chord(*, rewards, prompt_index, off_policy, step, total_steps, mu_peak: float = 0.5,
          mu_valley: float = 0.02, warmup_steps: int = 0, decay_steps: int | None = None) -> Weights:
    """CHORD (arXiv 2508.11408): L = (1 - mu) L_RL(rollouts) + mu L_SFT(expert), mu decaying."""
    mu = hybrid.chord_mu_schedule(step, mu_peak=mu_peak, mu_valley=mu_valley, warmup_steps=warmup_steps,
                                  decay_steps=decay_steps if decay_steps is not None else total_steps)
    expert = off_policy.to(rewards.dtype)
    return (1.0 - mu) * (1.0 - expert), mu * expert, {"mix/mu": torch.tensor(float(mu))}


@MIXERS.register("hpt")
def hpt(*, rewards, prompt_index, off_policy, step, total_steps, threshold: float = 0.0) -> Weights:
    """HPT (arXiv 2509.04419): per prompt, SFT on the expert trace if the rollouts' success
    rate is <= threshold, else RL on the rollouts."""
    on = ~off_policy
    use_sft_on = hybrid.hpt_use_sft(rewards[on], prompt_index[on], threshold)
    use_sft = _per_prompt_to_rows(use_sft_on, prompt_index[on], prompt_index)
    expert = off_policy.to(rewards.dtype)
    sft_w = expert * use_sft.to(rewards.dtype)
    rl_w = (1.0 - expert) * (~use_sft).to(rewards.dtype)
    return rl_w, sft_w, {"mix/sft_prompt_frac": use_sft_on.float().mean()}


@MIXERS.register("ahpo")
def ahpo(*, rewards, prompt_index, off_policy, step, total_steps, r_hat: int = 1) -> Weights:
    """AHPO (MM-HELIX): RL on every rollout, plus the expert term with weight 1 on prompts
    whose correct rollouts number fewer than r_hat."""
    on = ~off_policy
    weight_on = hybrid.ahpo_offpolicy_weight(rewards[on], prompt_index[on], r_hat)
    weight = _per_prompt_to_rows(weight_on.to(rewards.dtype), prompt_index[on], prompt_index)
    expert = off_policy.to(rewards.dtype)
    return 1.0 - expert, expert * weight, {"mix/expert_prompt_frac": weight_on.float().mean()}
