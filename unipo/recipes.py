"""Every method as a recipe: a named, frozen choice per slot of the unified estimator.

Each recipe cites its paper (arXiv id) and states the choices the paper left open. The
trainer knows no recipe by name: it only reads the slots.
"""

from __future__ import annotations

import dataclasses

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
    notes="The paper adds a k3 KL to the reference (beta=0.04); DAPO, Dr. GRPO and TRL's default drop it, and so do we (set recipe.kl_coef to restore). std is the unbiased one, eps=1e-6 added to it.",
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
    notes='T_max in the sum-norm aggregation is the generation budget (max_new_tokens), a constant across batches.',
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
    notes="The paper's soft overlong buffer is 4k tokens of a 20k budget; we keep that ratio: the penalty ramps from 0 to -1 over the last 20% of the task's generation budget (rounded up to whole tokens). Dynamic sampling retries at most rollout.max_resample_tries extra rounds and then trains on the groups it has.",
    summary="clip-higher, dynamic sampling, token-level mean, soft overlong punishment",
    paper="arXiv 2503.14476 (DAPO, sec. 3.1-3.4)",
    advantage="grpo",
    loss="clip_higher",
    loss_params={"eps_low": 0.2, "eps_high": 0.28},
    aggregation="token_mean",
    dynamic_sampling=True,
    overlong_buffer_frac=0.2,  # the paper's 4k buffer of a 20k budget
))

GSPO = _add(Recipe(
    name="gspo",
    notes="eps 3e-4/4e-4 are the paper's values for Qwen3; the per-sequence loss is spread over the sequence's tokens and averaged per sequence (seq_mean_token_mean), which equals the paper's mean over sequences.",
    summary="sequence-level importance ratio (geometric mean of token ratios), clipped in a narrow band",
    paper="arXiv 2507.18071 (GSPO, sec. 4.1)",
    advantage="grpo",
    loss="gspo",
    loss_params={"eps_low": 3e-4, "eps_high": 4e-4},  # the paper's Qwen3 values
    aggregation="seq_mean_token_mean",  # the loss is constant over a sequence: a mean over sequences
))

GSPO_TOKEN = _add(Recipe(
    name="gspo_token",
    summary="GSPO's sequence ratio value with per-token gradients (token-level advantages allowed)",
    paper="arXiv 2507.18071 (GSPO-token, sec. 4.3)",
    advantage="grpo",
    loss="gspo_token",
    loss_params={"eps_low": 3e-4, "eps_high": 4e-4},
    aggregation="seq_mean_token_mean",
))

DHPO = _add(Recipe(
    name="dhpo",
    notes="Only the abstract was available: r_mix = w*rho + (1-w)*s and a matching clipped mix, min'ed as in PPO (see unipo.core.losses.dhpo). w = 1/2 here.",
    summary="token ratio and sequence ratio clipped in their own trust regions, averaged (w = 1/2)",
    paper="DHPO (seed 000; see unipo.core.losses.dhpo for the exact form used)",
    advantage="grpo",
    loss="dhpo",
    loss_params={"mixing": "average"},
    aggregation="token_mean",
))

DHPO_ENTROPY = _add(Recipe(
    name="dhpo_entropy",
    notes="w[i,t] = H[i,t] / max_t H[i,t] of the sequence (1/2 when the maximum is 0), from the current policy's entropy, detached.",
    summary="DHPO with entropy-guided per-token mixing of the token and sequence ratios",
    paper="DHPO (seed 000; see unipo.core.losses.dhpo)",
    advantage="grpo",
    loss="dhpo",
    loss_params={"mixing": "entropy"},  # the current policy's token entropy is handed in
    aggregation="token_mean",
))

CPGD = _add(Recipe(
    name="cpgd",
    notes='Reference code was unavailable: -min(log(rho)*A, clip(log(rho), log 0.8, log 1.2)*A) + 0.1*(rho - 1 - log(rho)). Two epochs, because the drift term is zero at ratio 1.',
    summary="clipped log-ratio policy gradient plus a policy-drift KL(pi_old || pi) penalty",
    paper="arXiv 2505.12504 (CPGD)",
    advantage="grpo",
    loss="cpgd",
    loss_params={"eps_low": 0.2, "eps_high": 0.2, "drift_coef": 0.1},
    aggregation="token_mean",
    epochs=2,  # the drift term is zero on the first epoch's ratio of 1; a second epoch lets it act
))

BNPO = _add(Recipe(
    name="bnpo",
    notes="From the authors' code: the Beta is fitted by moments to the group success rates, then a=1+alpha/3, b=1+beta/3 (clamped >= 1); 1/pdf capped at 1e6; a uniform Beta when the fit is undefined.",
    summary="advantage normalised by a Beta distribution fitted to the batch's success rates",
    paper="arXiv 2506.02864 (BNPO)",
    advantage="bnpo",
    loss="ppo_clip",
    aggregation="token_mean",
))

RLOO = _add(Recipe(
    name="rloo",
    summary="leave-one-out baseline: r_i - mean of the other rewards of the group",
    paper="arXiv 2402.14740 (Back to Basics: RLOO)",
    advantage="rloo",
    loss="ppo_clip",
    aggregation="seq_mean_token_mean",
))

REINFORCE_PP = _add(Recipe(
    name="reinforce_pp",
    notes="Group-mean baseline (REINFORCE++-baseline), then (A - mean)/(std + eps) over the batch's sequences, each sequence counted once.",
    summary="group-mean baseline, then advantages normalised over the whole batch",
    paper="arXiv 2501.03262 (REINFORCE++-baseline)",
    advantage="reinforce_pp",
    loss="ppo_clip",
    aggregation="token_mean",
))

SIMPLE_PO = _add(Recipe(
    name="simple_po",
    notes='eps=0.2; checked against the abstract only.',
    summary="quadratic penalty on (ratio - 1) instead of clipping",
    paper="arXiv 2401.16025 (Simple Policy Optimization)",
    advantage="grpo",
    loss="simple_po",
    loss_params={"eps": 0.2},
    aggregation="token_mean",
))

CISPO = _add(Recipe(
    name="cispo",
    notes="No lower clip (as in the paper's runs); eps_high=0.28, a value the paper does not fix (Trinity-RFT's).",
    summary="clip the importance weight (stop-gradient), never the token's gradient",
    paper="arXiv 2506.13585 (MiniMax-M1, CISPO)",
    advantage="grpo",
    loss="cispo",
    loss_params={"eps_high": 0.28},  # open choice: no lower clip, as in the paper's experiments
    aggregation="token_mean",
))

# --- token and sample selection ---------------------------------------------------------

HIGH_ENTROPY = _add(Recipe(
    name="high_entropy",
    notes="Builds on DAPO's clip-higher loss, as the paper does; the top 20% is counted over the whole batch's completion tokens, ties broken by position; entropy from the policy before the update.",
    summary="gradient only on the top 20% highest-entropy tokens of the batch (forking tokens)",
    paper="arXiv 2506.01939 (Beyond the 80/20 Rule)",
    family="selection",
    advantage="grpo",
    loss="clip_higher",  # the paper builds on DAPO
    aggregation="token_mean",
    selection=("high_entropy_tokens",),
    selection_params={"high_entropy_tokens": {"rho": 0.2}},
))

CPPO = _add(Recipe(
    name="cppo",
    notes='Keep ceil(0.5*G) completions per group (the paper prunes a tuned fraction).',
    summary="train only on the completions of each group with the largest |advantage|",
    paper="arXiv 2503.22342 (CPPO)",
    family="selection",
    advantage="grpo",
    loss="ppo_clip",
    aggregation="seq_mean_token_mean",
    selection=("cppo",),
    selection_params={"cppo": {"keep": 0.5}},  # open choice: keep half the group
))

D3S = _add(Recipe(
    name="d3s",
    notes='Only the abstract was available: the sample level keeps ceil(ratio*G) completions per group with maximal Var(A) (exact search); the token level keeps the top fraction by |A|*H; both ratios move linearly from (0.5, 0.2) to (1, 1) over the run (our schedule).',
    summary="max-variance subset of each group, then top |A|*H tokens; aggressive at first, relaxing",
    paper="arXiv 2509.22115 (D^3S)",
    family="selection",
    advantage="grpo",
    loss="ppo_clip",
    aggregation="token_mean",
    selection=("d3s",),
    selection_params={"d3s": {"schedule": True}},  # ratios from d3s_schedule(step, total_steps)
))

GTPO = _add(Recipe(
    name="gtpo",
    notes="From the authors' code: conflict tokens get weight 0 on negative and 2 on positive completions; completions with mean entropy above 0.7 are dropped. Conflicts are matched at any position (the paper's text), not only in the leading/trailing runs (their code).",
    summary="protect conflict tokens from negative updates; drop high-entropy completions",
    paper="arXiv 2508.03772 (GTPO)",
    family="selection",
    advantage="grpo",
    loss="ppo_clip",
    aggregation="token_mean",
    selection=("gtpo",),
))

EGSW = _add(Recipe(
    name="egsw",
    notes='alpha=0.1 and T=1 are our choice; weights are a softmax over the group scaled by the group size so they average 1.',
    summary="sequence weights softmax((A + alpha * mean entropy) / T) within each group",
    paper="arXiv 2503.22456 (EGSW)",
    family="selection",
    advantage="grpo",
    loss="ppo_clip",
    aggregation="seq_mean_token_mean",
    selection=("egsw",),
))

# --- advantage variants ------------------------------------------------------------------

SEED_GRPO = _add(Recipe(
    name="seed_grpo",
    notes='alpha=0.5 (tuned per model in the paper); semantic entropy from the frequencies of the extracted final answers.',
    summary="GRPO advantage shrunk by the semantic entropy of the group's final answers",
    paper="arXiv 2505.12346 (SEED-GRPO)",
    advantage="seed_grpo",
    advantage_params={"alpha": 0.5},  # open choice: the paper's alpha is tuned per model
    loss="ppo_clip",
    aggregation="seq_mean_token_mean",
))

STRATIFIED = _add(Recipe(
    name="stratified",
    notes='Strata are response-length buckets of 4 tokens (the paper stratifies search-agent trajectories by number of search calls); alpha=0.5.',
    summary="normalise advantages within strata of like trajectories, blended with the global ones",
    paper="arXiv 2510.06214 (Stratified GRPO)",
    advantage="stratified",
    # Strata are response-length buckets of 4 tokens (the paper stratifies by search calls).
    advantage_params={"alpha": 0.5},
    loss="ppo_clip",
    aggregation="seq_mean_token_mean",
))

SINGLE_STREAM = _add(Recipe(
    name="single_stream",
    notes="Run with rollout.group_size=1 for the paper's single stream. Unseen prompts start at Beta(1,1); the forgetting rate's divergence is the step's approximate KL to the sampling policy (the paper: per prompt).",
    summary="one completion per prompt; baseline from a per-prompt Beta tracker, batch-normalised",
    paper="arXiv 2509.13232 (Single-stream Policy Optimization)",
    advantage="single_stream",
    loss="ppo_clip",
    aggregation="token_mean",
    # Run it with rollout.group_size=1 (the paper's single stream); the recipe does not force
    # it so that runs at equal sample budgets stay comparable.
))

A_STAR_PO = _add(Recipe(
    name="a_star_po",
    notes="V* is estimated from the group's own rollouts (sampled from pi, which starts as pi_ref) instead of a separate offline pass over the reference; beta=1 for both the advantage and the loss.",
    summary="regress beta*log(pi/pi_ref) onto r - V*, V* = beta*log E_ref[exp(r/beta)]",
    paper="arXiv 2505.20686 (A*-PO)",
    advantage="a_star",
    advantage_params={"beta": 1.0},
    loss="a_star_po",
    loss_params={"beta": 1.0},
    # Open choice: V* is estimated from the group's own rollouts, not from a separate offline
    # pass over the reference policy (the group is sampled from pi, which starts as pi_ref).
    aggregation="seq_mean_token_mean",
))

PPO = _add(Recipe(
    name="ppo",
    notes="Value head: a zero-initialised linear layer on the policy's last hidden state (shared trunk), value_coef 0.5, clipped value loss; GAE with gamma=1, lambda=0.95; two epochs per batch.",
    summary="PPO with a value head on the policy trunk and GAE (token-level advantages)",
    paper="arXiv 1707.06347 (PPO); arXiv 1506.02438 (GAE)",
    advantage="gae",
    advantage_params={"gamma": 1.0, "lam": 0.95},
    loss="ppo_clip",
    aggregation="token_mean",
    value_coef=0.5,
    epochs=2,
))

# --- hybrid policy: on-policy rollouts plus off-policy expert traces -----------------------

LUFFY = _add(Recipe(
    name="luffy",
    notes="7 rollouts + 1 expert trace per group of 8 (the paper's ratio); the expert's probability is taken as 1, so off-policy tokens use pi/(pi+0.1) without clipping.",
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

CHORD = _add(Recipe(
    name="chord",
    notes='mu: linear warm-up (none here) then cosine decay from 0.5 to 0.02 over the run; the expert rows are SFT rows and stay out of the RL group.',
    summary="(1 - mu) * RL + mu * SFT on expert traces, mu warmed up then decayed",
    paper="arXiv 2508.11408 (CHORD)",
    family="hybrid",
    data="mixed",
    expert_per_group=1,
    expert_in_group=False,  # expert rows are SFT rows, not members of the RL group
    advantage="grpo",
    loss="ppo_clip",
    aggregation="token_mean",
    mixer="chord",
    mixer_params={"mu_peak": 0.5, "mu_valley": 0.02, "warmup_steps": 0},  # decay over the run
))

CHORD_PHI = _add(dataclasses.replace(
    CHORD, name="chord_phi",
    notes='As chord, with SFT tokens weighted by sg(p*(1-p)).',
    summary="CHORD with SFT tokens weighted by p(1 - p) (learn what is uncertain, keep what is known)",
    sft_weighting="phi",
))

HPT = _add(Recipe(
    name="hpt",
    notes="Threshold 0 (the paper's Qwen setting: SFT only when every rollout failed; LLaMA used 2 of 8).",
    summary="per prompt: SFT on the expert trace if the rollouts' success rate <= threshold, else RL",
    paper="arXiv 2509.04419 (HPT, Towards a Unified View of LLM Post-Training)",
    family="hybrid",
    data="mixed",
    expert_per_group=1,
    expert_in_group=False,
    advantage="grpo",
    loss="ppo_clip",
    aggregation="token_mean",
    mixer="hpt",
    mixer_params={"threshold": 0.0},  # the paper's Qwen gate: SFT only when every rollout failed
))

AHPO = _add(Recipe(
    name="ahpo",
    notes="R-hat = 1: the expert term is on for prompts with no correct rollout; the off-policy term is the expert trace's NLL.",
    summary="RL always, plus the expert trace's NLL on prompts with fewer than R correct rollouts",
    paper="arXiv 2510.08540 (MM-HELIX, AHPO)",
    family="hybrid",
    data="mixed",
    expert_per_group=1,
    expert_in_group=False,
    advantage="grpo",
    loss="ppo_clip",
    aggregation="token_mean",
    mixer="ahpo",
    mixer_params={"r_hat": 1},
))

RL_PLUS = _add(Recipe(
    name="rl_plus",
    notes="From the authors' code: expert tokens use pi / (0.5*pi_old + 0.5*pi_expert) with pi_expert = 0.5*(pi_old + 1), unclipped; the exploration weight (1 - sg(pi))^0.5 applies to expert rows.",
    summary="expert traces in the group with multiple importance sampling, plus an exploration advantage",
    paper="arXiv 2508.00222 (RL-PLUS)",
    family="hybrid",
    data="mixed",
    expert_per_group=1,
    advantage="rl_plus_explore",
    advantage_params={"gamma": 0.5},  # the authors' code
    loss="rl_plus",
    aggregation="token_mean",
))

CALIBRL = _add(Recipe(
    name="calibrl",
    notes="The paper's term |A|*LeakyReLU(s*(log pi_expert - log pi)) is turned into the advantage with the same gradient at pi_old (see unipo.core.hybrid.calibrl_advantage); slope 0.5.",
    summary="advantages calibrated against the expert trace with a LeakyReLU, weighted by rareness",
    paper="arXiv 2602.20197 (CalibRL)",
    family="hybrid",
    data="mixed",
    expert_per_group=1,
    advantage="calibrl",
    loss="ppo_clip",
    aggregation="token_mean",
))

GHPO = _add(Recipe(
    name="ghpo",
    notes='Only the abstract was available: hint levels 1/4, 1/2, 3/4 of the expert solution, appended to the prompt; the scored answer is hint + completion; the loss covers the generated tokens only.',
    summary="groups where every rollout failed are re-rolled with a growing prefix of the expert solution",
    paper="arXiv 2507.10628 (GHPO)",
    family="hybrid",
    hint_fractions=(0.25, 0.5, 0.75),
    advantage="grpo",
    loss="ppo_clip",
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

SFT_THEN_RL = _add(Recipe(
    name="sft_then_rl",
    notes='20 SFT steps, then GRPO; scale recipe.mixer_params.sft_steps with the run.',
    summary="SFT on expert traces for the first steps, then GRPO (the baseline hybrid papers beat)",
    paper="(two-stage SFT -> RL; e.g. arXiv 2504.14945 sec. 4 baselines)",
    family="hybrid",
    data="mixed",
    expert_per_group=1,
    expert_in_group=False,
    advantage="grpo",
    loss="ppo_clip",
    aggregation="token_mean",
    mixer="sft_then_rl",
    mixer_params={"sft_steps": 20},  # open choice: scale it with the run (an override)
))


def catalogue_markdown() -> str:
    """docs/recipes.md: every recipe's mechanism, paper, open choices and slots."""
    from unipo.config import Recipe, to_dict

    defaults = to_dict(Recipe(name="defaults"))
    lines = ["# Recipes", "",
             "Generated by `unipo recipes --markdown` (a test keeps this file in step with the code).",
             "Each recipe is one choice per slot of the unified estimator; the slots a recipe leaves at the",
             "default are not repeated. `unipo recipes show NAME` prints every slot.", "",
             "| name | family | mechanism | paper |", "|---|---|---|---|"]
    lines += [f"| [{r.name}](#{r.name}) | {r.family} | {r.summary} | {r.paper} |" for r in RECIPES.values()]
    for r in RECIPES.values():
        lines += ["", f"## {r.name}", "", f"{r.summary}.", "", f"Paper: {r.paper}."]
        if r.notes:
            lines += ["", f"Open choices: {r.notes}"]
        slots = {k: v for k, v in to_dict(r).items()
                 if k not in ("name", "summary", "paper", "family", "notes") and v != defaults[k]}
        lines += ["", "| slot | value |", "|---|---|"] + [f"| `{k}` | `{v}` |" for k, v in slots.items()]
        lines += ["", f"Run it: `unipo train --recipe {r.name} --task addition`"]
    return "\n".join(lines) + "\n"
