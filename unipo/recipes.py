"""Every method as a recipe: a named, frozen choice per slot of the unified estimator.

Each recipe cites its paper (arXiv id) and states the choices the paper left open. The
trainer knows no recipe by name: it only reads the slots.
"""

from __future__ import annotations

from unipo.config import Recipe
from unipo.core.registry import Registry

RECIPES: Registry = Registry("recipe")


def _add(recipe: Recipe) -> Recipe:
    RECIPES.register(recipe.name)(recipe)
    return recipe


def get_recipe(name: str) -> Recipe:
    return RECIPES.get(name)


# --- on-policy RL with verifiable rewards ------------------------------------------------

GRPO = _add(Recipe(
    name="grpo",
    summary="group-normalised advantage, PPO clip, mean over sequences of token means",
    paper="arXiv 2402.03300 (DeepSeekMath, sec. 4.1)",
    advantage="grpo",  # (r - mean) / (std + 1e-6), std unbiased
    loss="ppo_clip",
    loss_params={"eps_low": 0.2, "eps_high": 0.2},
    aggregation="seq_mean_token_mean",
    # Open choice: the paper adds a k3 KL to the reference with beta=0.04; recent practice
    # (DAPO, Dr. GRPO, TRL's default) drops it. We drop it; set recipe.kl_coef to restore.
))

DR_GRPO = _add(Recipe(
    name="dr_grpo",
    summary="GRPO without std normalisation and without length normalisation",
    paper="arXiv 2503.20783 (Understanding R1-Zero-Like Training, sec. 3.2)",
    advantage="dr_grpo",  # r - mean_g r
    loss="ppo_clip",
    loss_params={"eps_low": 0.2, "eps_high": 0.2},
    # sum over tokens / (B * max_new_tokens): the constant is the generation budget.
    aggregation="seq_mean_token_sum_norm",
))

DAPO = _add(Recipe(
    name="dapo",
    summary="clip-higher, dynamic sampling, token-level mean, soft overlong punishment",
    paper="arXiv 2503.14476 (DAPO, sec. 3.1-3.4)",
    advantage="grpo",
    loss="clip_higher",
    loss_params={"eps_low": 0.2, "eps_high": 0.28},
    aggregation="token_mean",
    dynamic_sampling=True,
    # The paper's buffer is 4k of a 20k budget; on short tasks we punish over the last
    # quarter of the budget (the trainer clamps the buffer to the budget).
    overlong_buffer=4,
))

# --- hybrid policy: on-policy rollouts plus off-policy expert traces -----------------------

LUFFY = _add(Recipe(
    name="luffy",
    summary="one expert trace in every group; policy shaping pi/(pi+0.1) on expert tokens, no clip there",
    paper="arXiv 2504.14945 (LUFFY, sec. 3)",
    family="hybrid",
    data="mixed",
    expert_per_group=1,  # the paper: 7 rollouts + 1 expert trace of 8
    expert_in_group=True,
    advantage="grpo",
    loss="luffy",
    loss_params={"shaping_gamma": 0.1, "eps_low": 0.2, "eps_high": 0.2},
    aggregation="token_mean",
))

# --- supervised -------------------------------------------------------------------------

SFT = _add(Recipe(
    name="sft",
    summary="negative log-likelihood of expert demonstrations (A = 1 on expert tokens)",
    paper="(supervised fine-tuning; the baseline of every hybrid paper)",
    family="sft",
    data="expert",
    expert_per_group=1,
    expert_in_group=False,
    mixer="sft",
    aggregation="token_mean",
))
