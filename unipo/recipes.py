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
    notes="One optimizer step per generation batch, as the paper (sec. 4.2: 'the policy model only has a single update following each exploration stage'): the ratio is 1 and the clip never acts; set recipe.mini_batches for an off-policy GRPO. The paper adds a k3 KL to the reference (beta=0.04); DAPO, Dr. GRPO and TRL's default drop it, and so do we (set recipe.kl_coef to restore). std is the unbiased one, eps=1e-6 added to it. No released training script.",
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
    notes="From the authors' script (sail-sg/understand-r1-zero @dfca49dd, train_zero_math.py): 128 prompts x 8 with train batches of 128 completions, i.e. 8 optimizer steps per generation batch; kept as 8 mini-batches of our batch. T_max in the sum-norm aggregation is the generation budget (max_new_tokens; theirs 3000), a constant across batches. Truncated completions score 0, as in their code.",
    summary="GRPO without std normalisation and without length normalisation",
    paper="arXiv 2503.20783 (Understanding R1-Zero-Like Training, sec. 3.2)",
    advantage="dr_grpo",  # r - mean_g r
    loss="ppo_clip",
    loss_params={"eps_low": 0.2, "eps_high": 0.2},
    # sum over tokens / (B * max_new_tokens): the constant is the generation budget.
    aggregation="seq_mean_token_sum_norm",
    zero_truncated=True,
    mini_batches=8,
))

DAPO = _add(Recipe(
    name="dapo",
    notes="From the authors' script (verl recipe/dapo/run_dapo_qwen2.5_32b.sh @246cac4c): 512 prompts with PPO mini-batches of 32, i.e. 16 optimizer steps per generation batch, kept as 16 mini-batches of our batch (4 rows each at 8 x 8); verl's dual clip at c=10 under the 0.2/0.28 clip-higher range; rewards +-1 (the task's 0/1 score mapped to 2s-1), so the overlong penalty (0 to -1) has the script's weight. Dynamic sampling keeps groups whose accuracy varies (the script's metric=acc, not the shaped reward) and retries at most rollout.max_resample_tries extra rounds (theirs: 10), then trains on the groups it has. The paper's soft overlong buffer is 4k tokens of a 20k budget; we keep that ratio: the penalty ramps from 0 to -1 over the last 20% of the task's budget (rounded up to whole tokens). Their lr 1e-6, 10 warm-up steps and weight decay 0.1 are run settings (optim.*).",
    summary="clip-higher, dynamic sampling, token-level mean, soft overlong punishment",
    paper="arXiv 2503.14476 (DAPO, sec. 3.1-3.4)",
    advantage="grpo",
    loss="dual_clip",
    loss_params={"eps_low": 0.2, "eps_high": 0.28, "clip_ratio_c": 10.0},
    aggregation="token_mean",
    dynamic_sampling=True,
    overlong_buffer_frac=0.2,  # the paper's 4k buffer of a 20k budget
    reward_scale="signed",
    mini_batches=16,
))

GSPO = _add(Recipe(
    name="gspo",
    notes="The paper's setup (sec. 5.1): each rollout batch is split into 4 mini-batches, one gradient step each; eps 3e-4/4e-4 are its values for Qwen3. No released training script. The per-sequence loss is spread over the sequence's tokens and averaged per sequence (seq_mean_token_mean), which equals the paper's mean over sequences.",
    summary="sequence-level importance ratio (geometric mean of token ratios), clipped in a narrow band",
    paper="arXiv 2507.18071 (GSPO, sec. 4.1)",
    advantage="grpo",
    loss="gspo",
    loss_params={"eps_low": 3e-4, "eps_high": 4e-4},  # the paper's Qwen3 values
    aggregation="seq_mean_token_mean",  # the loss is constant over a sequence: a mean over sequences
    mini_batches=4,
))

GSPO_TOKEN = _add(Recipe(
    name="gspo_token",
    notes="As gspo (4 mini-batches per generation batch, eps 3e-4/4e-4).",
    summary="GSPO's sequence ratio value with per-token gradients (token-level advantages allowed)",
    paper="arXiv 2507.18071 (GSPO-token, sec. 4.3)",
    advantage="grpo",
    loss="gspo_token",
    loss_params={"eps_low": 3e-4, "eps_high": 4e-4},
    aggregation="seq_mean_token_mean",
    mini_batches=4,
))

DHPO = _add(Recipe(
    name="dhpo",
    notes="No code was released (the paper promises it upon acceptance) and only the abstract could be read: r_mix = w*rho + (1-w)*s and a matching clipped mix, min'ed as in PPO (see unipo.core.losses.dhpo). w = 1/2 here. 4 mini-batches per generation batch (our choice, GSPO's schedule) so that both trust regions act.",
    summary="token ratio and sequence ratio clipped in their own trust regions, averaged (w = 1/2)",
    paper="arXiv 2601.05607 (DHPO, Dynamic Hybrid Policy Optimization)",
    advantage="grpo",
    loss="dhpo",
    loss_params={"mixing": "average"},
    aggregation="token_mean",
    mini_batches=4,
))

DHPO_ENTROPY = _add(Recipe(
    name="dhpo_entropy",
    notes="As dhpo; w[i,t] = H[i,t] / max_t H[i,t] of the sequence (1/2 when the maximum is 0), from the current policy's entropy, detached.",
    summary="DHPO with entropy-guided per-token mixing of the token and sequence ratios",
    paper="arXiv 2601.05607 (DHPO, entropy-guided mixing)",
    advantage="grpo",
    loss="dhpo",
    loss_params={"mixing": "entropy"},  # the current policy's token entropy is handed in
    aggregation="token_mean",
    mini_batches=4,
))

CPGD = _add(Recipe(
    name="cpgd",
    notes="From the authors' team's script (sii-research/siiRL @af00a771, examples/cpgd_trainer/run_qwen2_5-7b.sh, siirl/dag_worker/core_algos.py): the clipped log-ratio term -min(log(rho)*A, clip(log(rho), log 0.8, log 1.2)*A) plus the drift 0.001*sg(min(rho - 1, 2))*logp (gradient of the k3 KL(pi_old||pi) capped at 2); 512 prompts with mini-batches of 256: 2 optimizer steps per generation batch, kept as 2 mini-batches. Their gradient clip 0.5 and lr 1e-6 are run settings (optim.*). The paper's form: the same with the k3 drift uncapped (drift_clip=null).",
    summary="clipped log-ratio policy gradient plus a policy-drift KL(pi_old || pi) penalty",
    paper="arXiv 2505.12504 (CPGD)",
    advantage="grpo",
    loss="cpgd",
    loss_params={"eps_low": 0.2, "eps_high": 0.2, "drift_coef": 0.001, "drift_clip": 2.0},
    aggregation="token_mean",
    mini_batches=2,  # the drift term is zero at ratio 1; from the second update on it acts
))

BNPO = _add(Recipe(
    name="bnpo",
    notes="From the authors' code and script (changyi7231/BNPO @a9c51b98, recipe/bnpo/run.sh): the Beta is fitted by moments to the group success rates, then a=1+alpha/3, b=1+beta/3 (clamped >= 1); 1/pdf capped at 1e6; a uniform Beta when the fit is undefined. Clip 0.2/0.28 with verl's dual clip c=10, the seq-mean-token-sum aggregation, one optimizer step per generation batch (32 prompts, mini-batch 32). Their n=16 completions per prompt is a run setting: rollout.group_size=16.",
    summary="advantage normalised by a Beta distribution fitted to the batch's success rates",
    paper="arXiv 2506.02864 (BNPO)",
    advantage="bnpo",
    loss="dual_clip",
    loss_params={"eps_low": 0.2, "eps_high": 0.28, "clip_ratio_c": 10.0},
    aggregation="seq_mean_token_sum",
))

RLOO = _add(Recipe(
    name="rloo",
    notes="No released LLM training script; one optimizer step per generation batch (on-policy, so the clip never acts).",
    summary="leave-one-out baseline: r_i - mean of the other rewards of the group",
    paper="arXiv 2402.14740 (Back to Basics: RLOO)",
    advantage="rloo",
    loss="ppo_clip",
    aggregation="seq_mean_token_mean",
))

REINFORCE_PP = _add(Recipe(
    name="reinforce_pp",
    notes="Group-mean baseline (REINFORCE++-baseline), then (A - mean)/(std + eps) over the batch's sequences, each sequence counted once (verl and OpenRLHF whiten over tokens instead, which weights a sequence by its length). OpenRLHF's example scripts change between versions, so one optimizer step per generation batch.",
    summary="group-mean baseline, then advantages normalised over the whole batch",
    paper="arXiv 2501.03262 (REINFORCE++-baseline)",
    advantage="reinforce_pp",
    loss="ppo_clip",
    aggregation="token_mean",
))

SIMPLE_PO = _add(Recipe(
    name="simple_po",
    notes="The form -(rho*A - |A|/(2 eps)*(rho - 1)^2), eps=0.2, is the authors' code (MyRepositories-hub/Simple-Policy-Optimization @48c13fd7, mujoco/trainer.py), which trains control tasks only, with 4 mini-batches per batch (and 10 epochs); we keep the 4 mini-batches and one epoch.",
    summary="quadratic penalty on (ratio - 1) instead of clipping",
    paper="arXiv 2401.16025 (Simple Policy Optimization)",
    advantage="grpo",
    loss="simple_po",
    loss_params={"eps": 0.2},
    aggregation="token_mean",
    mini_batches=4,
))

CISPO = _add(Recipe(
    name="cispo",
    notes="No released code. No lower clip (as in the paper's runs); eps_high=0.28, a value the paper does not report (DAPO's). CISPO exists to keep the gradient of tokens clipped off-policy, so we take 4 mini-batches per generation batch (our choice; GSPO's schedule).",
    summary="clip the importance weight (stop-gradient), never the token's gradient",
    paper="arXiv 2506.13585 (MiniMax-M1, CISPO)",
    advantage="grpo",
    loss="cispo",
    loss_params={"eps_high": 0.28},  # open choice: no lower clip, as in the paper's experiments
    aggregation="token_mean",
    mini_batches=4,
))

# --- token and sample selection ---------------------------------------------------------

HIGH_ENTROPY = _add(Recipe(
    name="high_entropy",
    notes="The authors' script (Shenzhi-Wang/Beyond-the-80-20-Rule-RLVR @6f5dda6f, recipe/rlvr_with_high_entropy_tokens_only/) is the full DAPO script plus the top-20% entropy mask, so this recipe is dapo's (dynamic sampling on accuracy, overlong buffer, +-1 rewards, clip 0.2/0.28 with dual clip c=10, 16 optimizer steps per generation batch) with the selection. Dynamic sampling also keeps zero-advantage tokens of constant groups out of the 20% quota. Their mask is taken per micro-batch from the current forward's entropy; ours over the whole batch's completion tokens from pi_old's entropy (equal at the first update), ties broken by position.",
    summary="gradient only on the top 20% highest-entropy tokens of the batch (forking tokens)",
    paper="arXiv 2506.01939 (Beyond the 80/20 Rule)",
    family="selection",
    advantage="grpo",
    loss="dual_clip",  # the paper builds on DAPO
    loss_params={"eps_low": 0.2, "eps_high": 0.28, "clip_ratio_c": 10.0},
    aggregation="token_mean",
    selection=("high_entropy_tokens",),
    selection_params={"high_entropy_tokens": {"rho": 0.2}},
    dynamic_sampling=True,
    overlong_buffer_frac=0.2,
    reward_scale="signed",
    mini_batches=16,
))

CPPO = _add(Recipe(
    name="cppo",
    notes="From the authors' verl code and script (lzhxmu/CPPO @52faeb37, cppo_verl/recipe/cppo/math_cppo.sh): pruning rate P=0.5 across the whole batch (the half of all completions with the largest |A| is kept, wherever their group), the prompt batch enlarged to ceil(B/(1-P)) so the kept rows fill a normal batch, 2 PPO epochs, a k3 (low_var_kl) KL to the reference with coefficient 0.04 in the loss. The paper's text prunes within each group: selection_params.cppo.scope=group.",
    summary="train only on the completions with the largest |advantage| (half of an enlarged batch)",
    paper="arXiv 2503.22342 (CPPO)",
    family="selection",
    advantage="grpo",
    loss="ppo_clip",
    aggregation="seq_mean_token_mean",
    selection=("cppo",),
    selection_params={"cppo": {"keep": 0.5, "scope": "batch"}},
    prompt_multiplier=2.0,  # 1 / (1 - P)
    kl_coef=0.04,
    kl_estimator="k3",
    epochs=2,
))

D3S = _add(Recipe(
    name="d3s",
    notes='Only the abstract was available and no code was found: the sample level keeps ceil(ratio*G) completions per group with maximal Var(A) (exact search); the token level keeps the top fraction by |A|*H; both ratios move linearly from (0.5, 0.2) to (1, 1) over the run (our schedule); one optimizer step per generation batch.',
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
    notes="From the authors' code (winstonsmith1897/GTPO @5d33811e, gtpo/gtpo_training.py, config.yaml): the advantage (r - mean) - 0.1 * mean entropy of the completion, completions with mean entropy above 0.7 dropped; conflict tokens (in the leading and trailing runs of positions shared by a positive and a negative completion of the group) weigh 2 on positive and 0 on negative completions, each row's weights divided by its number of conflict tokens; a mean over sequences of token means; one pass per batch (their ratio is always 1). The paper's text matches conflicts at any position: selection_params.gtpo.conflict_scope=any. Their code sums over completions and keeps zero-weight tokens in a row's count; ours drops them (a row-level normaliser difference). Entropy is pi_old's at the rollout temperature (theirs: the raw current logits).",
    summary="protect conflict tokens from negative updates; drop high-entropy completions; entropy-shaped advantage",
    paper="arXiv 2508.03772 (GTPO)",
    family="selection",
    advantage="gtpo",
    loss="ppo_clip",
    aggregation="seq_mean_token_mean",
    selection=("gtpo",),
))

EGSW = _add(Recipe(
    name="egsw",
    notes='No released code: alpha=0.1 and T=1 are our choice; weights are a softmax over the group scaled by the group size so they average 1; one optimizer step per generation batch.',
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
    notes="No released code. The paper's base advantage is r - mean (no std normalisation); alpha=0.5 (tuned per model in the paper); semantic entropy from the frequencies of the extracted final answers; one optimizer step per generation batch.",
    summary="group-centred advantage shrunk by the semantic entropy of the group's final answers",
    paper="arXiv 2505.12346 (SEED-GRPO)",
    advantage="seed_grpo",
    advantage_params={"alpha": 0.5, "std_normalise": False},  # open choice: the paper's alpha is tuned per model
    loss="ppo_clip",
    aggregation="seq_mean_token_mean",
))

STRATIFIED = _add(Recipe(
    name="stratified",
    notes='No released code. Strata are response-length buckets of 4 tokens (the paper stratifies search-agent trajectories by number of search calls); alpha=0.5; one optimizer step per generation batch.',
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
    notes="From the verl recipe (volcengine/verl @4b2b3643, recipe/spo/): unseen prompts start at Beta(0.5, 0.5); clip 0.2/0.28; 1024 prompts with mini-batches of 128, i.e. 8 optimizer steps per generation batch, kept as 8 mini-batches. Run with rollout.group_size=1 for the single stream. The forgetting rate's divergence is the step's approximate KL to the sampling policy (theirs: per prompt, the mean |delta logp| of its last response).",
    summary="one completion per prompt; baseline from a per-prompt Beta tracker, batch-normalised",
    paper="arXiv 2509.13232 (Single-stream Policy Optimization)",
    advantage="single_stream",
    baseline="spo_tracker",
    baseline_params={"prior": 0.5},
    loss="clip_higher",
    loss_params={"eps_low": 0.2, "eps_high": 0.28},
    aggregation="token_mean",
    mini_batches=8,
    # Run it with rollout.group_size=1 (the paper's single stream); the recipe does not force
    # it so that runs at equal sample budgets stay comparable.
))

A_STAR_PO = _add(Recipe(
    name="a_star_po",
    notes="From the authors' script (ZhaolinGao/A-PO @c8823a32, scripts/apo_math.sh): beta1=0.5 in V* and beta2=1e-3 in the regression, 256 prompts with mini-batches of 128: 2 optimizer steps per generation batch. V* is estimated from the group's own rollouts (sampled from pi, which starts as pi_ref) instead of their separate offline pass of 8 reference samples per prompt.",
    summary="regress beta*log(pi/pi_ref) onto r - V*, V* = beta*log E_ref[exp(r/beta)]",
    paper="arXiv 2505.20686 (A*-PO)",
    advantage="a_star",
    advantage_params={"beta": 0.5},
    loss="a_star_po",
    loss_params={"beta": 1e-3},
    mini_batches=2,
    # Open choice: V* is estimated from the group's own rollouts, not from a separate offline
    # pass over the reference policy (the group is sampled from pi, which starts as pi_ref).
    aggregation="seq_mean_token_mean",
))

PPO = _add(Recipe(
    name="ppo",
    notes="Value head: a zero-initialised linear layer on the policy's last hidden state (shared trunk), value_coef 0.5, clipped value loss; GAE with gamma=1, lambda=0.95, advantages not whitened (verl whitens them over tokens); two epochs per batch.",
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
    notes="From the authors' script (ElliottYan/LUFFY @01f4ae06, exp_scripts/train.sh; loss in luffy/verl/verl/mix_src/mix_core_alg.py): 7 rollouts + 1 expert trace per group of 8; the group advantage r - mean over all 8 rows (grpo_use_std=False); rollouts get the unclipped -A*rho (loss_remove_clip=True); expert tokens -A*pi/(pi+0.1) (the expert's own probability taken as 1); the token sum divided by a constant T_max (loss_remove_token_mean=True: theirs T_max=8192 per micro-batch, ours the budget x rows, a constant factor away); entropy bonus 0.001 (aggregated like the loss; theirs is a token mean); 128 prompts with mini-batches of 64: 2 optimizer steps per generation batch. The paper's equations (std-normalised advantage, PPO clip on rollouts, token mean, no entropy bonus) are `luffy_paper`; on the demo task (sort:k=3, lr 1e-3) this recipe reached 0.295 held-out accuracy where luffy_paper reached 0.935, and 0.950 with only its advantage std-normalised (benchmarks/RESULTS.md).",
    summary="one expert trace in every group; policy shaping pi/(pi+0.1) on expert tokens (the released script)",
    paper="arXiv 2504.14945 (LUFFY, sec. 3)",
    family="hybrid",
    data="mixed",
    expert_per_group=1,  # the paper: 7 rollouts + 1 expert trace of 8
    expert_in_group=True,
    advantage="dr_grpo",
    loss="luffy",
    loss_params={"shaping_gamma": 0.1, "clip_on_policy": False},
    aggregation="seq_mean_token_sum_norm",
    entropy_coef=0.001,
    mini_batches=2,
))

LUFFY_PAPER = _add(dataclasses.replace(
    LUFFY, name="luffy_paper",
    notes="LUFFY as the paper's equations write it (sec. 3): the GRPO advantage (std-normalised) over the group with its expert trace, PPO clip (0.2) on the rollouts, policy shaping pi/(pi+0.1) on expert tokens, token-mean aggregation, no entropy bonus; the script's schedule (2 optimizer steps per generation batch). `luffy` is the released script.",
    summary="LUFFY per the paper's equations: std-normalised advantage, clipped rollouts, token mean",
    advantage="grpo",
    loss_params={"shaping_gamma": 0.1, "eps_low": 0.2, "eps_high": 0.2, "clip_on_policy": True},
    aggregation="token_mean",
    entropy_coef=0.0,
))

CHORD = _add(Recipe(
    name="chord",
    notes="From the authors' config (modelscope/Trinity-RFT @04143305, examples/mix_chord/mix_chord.yaml, the CHORD-mu setting): mu cosine-decays from 0.9 to 0.05 over 200 steps with no warm-up, then stays at 0.05; the expert data is a separate SFT set mixed into every batch at 20% of its rows (expert_batch_frac=0.2: demonstrations of other training prompts, outside every advantage group), the RL and SFT terms each normalised over their own tokens; one optimizer step per generation batch (mini-batch = the whole batch). The paper's figure of a decay 'over training' is their 200 steps; scale mixer_params.decay_steps with a longer run.",
    summary="(1 - mu) * RL + mu * SFT on a separate expert set, mu decayed",
    paper="arXiv 2508.11408 (CHORD)",
    family="hybrid",
    data="mixed",
    expert_batch_frac=0.2,
    expert_in_group=False,  # expert rows are SFT rows, not members of the RL group
    advantage="grpo",
    loss="ppo_clip",
    aggregation="token_mean",
    mixer="chord",
    mixer_params={"mu_peak": 0.9, "mu_valley": 0.05, "warmup_steps": 0, "decay_steps": 200},
))

CHORD_PHI = _add(dataclasses.replace(
    CHORD, name="chord_phi",
    notes="As chord, with SFT tokens weighted by sg(p*(1-p)) and, as the authors' CHORD-phi setting (Trinity-RFT @04143305, examples/mix_chord/mix_chord.yaml comments), a constant mu = 0.1 (no decay).",
    summary="CHORD with SFT tokens weighted by p(1 - p) (learn what is uncertain, keep what is known), mu = 0.1",
    sft_weighting="phi",
    mixer_params={"mu_peak": 0.1, "mu_valley": 0.1, "warmup_steps": 0, "decay_steps": 0},
))

HPT = _add(Recipe(
    name="hpt",
    notes="From the authors' script (TsinghuaC3I/Unify-Post-Training @ae332f5f, exp_scripts/train.sh, hpt/verl/verl/mix_src/mix_trainer.py): a full group of rollouts (8) plus the expert trace; threshold 0 (the Qwen gate: SFT only when every rollout failed; LLaMA: 2 of 8, threshold 0.25); the SFT loss (token mean over expert rows) added to the PG loss; the PG part as LUFFY's script: no std normalisation, no clip, sum over tokens / T_max, entropy bonus 0.001, 128 prompts with mini-batches of 64 (2 optimizer steps per generation batch). Their lr 5e-6 is a run setting (optim.lr).",
    summary="per prompt: SFT on the expert trace if the rollouts' success rate <= threshold, else RL",
    paper="arXiv 2509.04419 (HPT, Towards a Unified View of LLM Post-Training)",
    family="hybrid",
    data="mixed",
    expert_per_group=1,
    expert_in_group=False,
    expert_in_addition=True,
    advantage="dr_grpo",
    loss="unclipped",
    aggregation="seq_mean_token_sum_norm",
    entropy_coef=0.001,
    mixer="hpt",
    mixer_params={"threshold": 0.0},  # the paper's Qwen gate: SFT only when every rollout failed
    mini_batches=2,
))

AHPO = _add(Recipe(
    name="ahpo",
    notes="The training code is not released ('coming soon' in PhoenixZ810/MM-HELIX @15b95582). R-hat = 1: the expert term is on for prompts with no correct rollout; the off-policy term is the expert trace's NLL; one optimizer step per generation batch.",
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
    notes="From the authors' script and code (YihongDong/RL-PLUS @eb4aa4d4, exp_scripts/train_RL-PLUS.sh, rl_plus/verl/verl/recipe/rlplus_core_alg.py): 7 rollouts + 1 expert trace per group, the advantage r - mean over all 8 rows (group statistics include the expert row; no std); rollouts get the unclipped -A*rho; expert tokens -A*(1 - sg(pi))^0.5 * pi / (0.5*pi_old + 0.5*pi_expert) with pi_expert = 0.5*(pi_old + 1), unclipped, for advantages of either sign, the exploration weight taken with the current pi inside the loss (exact at every mini-batch); LUFFY's aggregation (token sum / constant T_max), entropy bonus 0.001 and schedule (2 optimizer steps per generation batch).",
    summary="expert traces in the group with multiple importance sampling, plus an exploration weight",
    paper="arXiv 2508.00222 (RL-PLUS)",
    family="hybrid",
    data="mixed",
    expert_per_group=1,
    advantage="dr_grpo",
    loss="rl_plus",
    loss_params={"explore_gamma": 0.5, "clip_on_policy": False},
    aggregation="seq_mean_token_sum_norm",
    entropy_coef=0.001,
    mini_batches=2,
))

CALIBRL = _add(Recipe(
    name="calibrl",
    notes="From the authors' script and code (zhh6425/CalibRL @0efd7991, src/examples/run_qwen25vl7b_virl_mix_policy.sh, src/core_algos.py, src/dp_actor.py): a full group of rollouts (theirs 10, ours rollout.group_size) plus 1 expert trace, used only as the calibration baseline (it leaves the loss and its token-mean denominator: mixer rl with expert_rows=false); group advantage r - mean without std (norm_adv_by_std_in_grpo=False); correct means score > 0.1; the loss: PPO with dual clip c=3 plus the guided term 0.1*|A|*LeakyReLU_0.5(s*(log pi_expert - log pi)), differentiated through log pi at every update (the `calibrl` loss; s = +1 for a passing rollout); 480 samples with mini-batches of 120: 4 optimizer steps per generation batch. The advantage slot's `calibrl` estimator with guide_coef>0 folds the guided term into the advantage instead (exact only at pi_old).",
    summary="advantages calibrated against the expert trace with a LeakyReLU, weighted by rareness",
    paper="arXiv 2602.20197 (CalibRL)",
    family="hybrid",
    data="mixed",
    expert_per_group=1,
    expert_in_addition=True,
    advantage="calibrl",
    advantage_params={"guide_coef": 0.0},  # the plain group advantage; the guided term is in the loss
    loss="calibrl",
    loss_params={"eps_low": 0.2, "eps_high": 0.2, "clip_ratio_c": 3.0, "guide_coef": 0.1},
    aggregation="token_mean",
    mixer="rl",
    mixer_params={"expert_rows": False},
    mini_batches=4,
))

GHPO = _add(Recipe(
    name="ghpo",
    notes="From the authors' code (hkgc-1/GHPO @af0a7dd8, src/ghpo/ghpo_trainer.py): groups whose rollouts all fail are re-rolled in the same step with the first 1/4, then 1/2, then 3/4 of the solution's characters (Python round) inside the user message, after the sentence 'The following text is the beginning part of the answer, which you can refer to for solving the problem:'; only the completion is scored, and the hinted prompt is the training prompt; token-mean loss, one optimizer step per generation batch. Their extra format reward (weight 0.5) is task-specific and not reproduced: the task's verifier is the reward.",
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
    paper="arXiv 2203.02155 (supervised fine-tuning, the first stage of InstructGPT; the baseline of every hybrid paper)",
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

# --- preference optimisation: offline pairs (`unipo train --recipe dpo --data pairs.jsonl`) ---------------
# The loss is a preference loss (unipo.core.preference) on (chosen, rejected) row pairs: the pairwise path of the
# update (unipo.core.pairwise, unipo.update). Per-row log-probs are summed over the answer's tokens (ipo: averaged,
# as TRL does); the reference's log-probs are recomputed every step (not cached), from the frozen initial policy
# unless the recipe moves it (reference_update). The advantage slot is unused.

DPO = _add(Recipe(
    name="dpo",
    notes="beta=0.1, the paper's default (its appendix B: 'unless noted otherwise') and TRL's. Pairs come from TrainConfig.pairs (`--data FILE`: JSONL, .json/.parquet, a save_to_disk folder or a hub id; unipo.pairs), prompts_per_step pairs a step, sampled with a seed; one optimizer step per batch. The reference is the initial policy, frozen; its log-probs are recomputed each step (TRL precomputes them once, the same numbers).",
    summary="direct preference optimisation: -log sigma(beta * implicit reward margin) on offline pairs",
    paper="arXiv 2305.18290 (DPO, Eq. 7)",
    family="preference",
    data="pairs",
    loss="dpo",
    loss_params={"beta": 0.1},
))

IPO = _add(dataclasses.replace(
    DPO, name="ipo",
    notes="beta (the paper's tau) = 0.1, TRL's default; log-probs averaged over each answer's tokens (length_norm, TRL's choice for IPO; the paper's h is a sum); loss (h/beta - 1/(2 beta))^2.",
    summary="identity preference optimisation: squared regression of the log-ratio margin onto 1/(2 tau)",
    paper="arXiv 2310.12036 (IPO, Eq. 17)",
    loss="ipo",
    loss_params={"beta": 0.1, "length_norm": True},
))

ROBUST_DPO = _add(dataclasses.replace(
    DPO, name="robust_dpo",
    notes="label_noise epsilon = 0.1 (our choice; set it to the flip rate you believe your labels have); beta=0.1. TRL's `robust` loss_type with label_smoothing=epsilon.",
    summary="DPO made unbiased under labels flipped with probability epsilon",
    paper="arXiv 2403.00409 (Provably Robust DPO)",
    loss="robust_dpo",
    loss_params={"beta": 0.1, "label_noise": 0.1},
))

RPO = _add(dataclasses.replace(
    DPO, name="rpo",
    notes="alpha=1 on the chosen answer's per-token mean NLL (Iterative RPO's weight and TRL's rpo_alpha normalisation); beta=0.1. In Iterative RPO the pairs are regenerated each round (correct vs incorrect chains of thought); here the recipe trains on given pairs: make them with unipo.pairs.make_pairs.",
    summary="DPO plus the NLL of the chosen answer",
    paper="arXiv 2404.19733 (Iterative Reasoning Preference Optimization)",
    loss="rpo",
    loss_params={"beta": 0.1, "alpha": 1.0},
))

SLIC = _add(dataclasses.replace(
    DPO, name="slic",
    notes="delta=1 (the paper's calibration margin); lambda=0.1 on the chosen answer's per-token mean NLL (our choice); the hinge is on the reference-normalised margin h with beta=1 (RSO's and TRL's `hinge`); with zero reference log-probs it is the paper's reference-free rank calibration.",
    summary="hinge on the margin (rank calibration) plus a cross-entropy regulariser",
    paper="arXiv 2305.10425 (SLiC-HF)",
    loss="slic",
    loss_params={"beta": 1.0, "delta": 1.0, "lam": 0.1},
))

TR_DPO = _add(dataclasses.replace(
    DPO, name="tr_dpo",
    notes="The reference moves: pi_ref <- alpha*pi + (1-alpha)*pi_ref every tau steps, alpha=0.6 and tau=512 (TRL's DPOConfig defaults ref_model_mixup_alpha=0.6, ref_model_sync_steps=512, which cite the paper); scale tau with a short run (recipe.reference_update_params.tau). The hard variant: recipe.reference_update=hard. The moving reference is saved in every checkpoint.",
    summary="DPO against a reference that is softly (or periodically) updated toward the policy",
    paper="arXiv 2404.09656 (TR-DPO)",
    loss="tr_dpo",
    reference_update="soft",
    reference_update_params={"alpha": 0.6, "tau": 512},
))

# --- online, iterative and self-play preference methods (pairs made from the policy's samples) ---------------

ONLINE_DPO = _add(Recipe(
    name="online_dpo",
    notes="Each step samples rollout.group_size completions per task prompt from the current policy and judges them with the preference oracle (TrainConfig.oracle: the task's verifier by default, rm:<path>, or module:function); chosen = the sample with the highest estimated win rate against the others, rejected = the lowest; prompts whose samples all tie give no pair (rollout/tied_prompts). The paper samples 2 answers and asks an LLM annotator: set rollout.group_size=2 for that; more samples give best-vs-worst pairs (as online iterative RLHF does). beta=0.1; reference frozen.",
    summary="DPO on fresh pairs of the policy's own samples, judged online",
    paper="arXiv 2402.04792 (Direct Language Model Alignment from Online AI Feedback)",
    family="online preference",
    data="online_pairs",
    loss="dpo",
    loss_params={"beta": 0.1},
))

ITERATIVE_DPO = _add(dataclasses.replace(
    ONLINE_DPO, name="iterative_dpo",
    notes="online_dpo in rounds: the reference is replaced by the current policy every tau=10 steps (a 'round'; our choice, scale it with the run), as online iterative RLHF retrains each iteration from the last one against it. Pairs are best-vs-worst of rollout.group_size samples under the oracle.",
    summary="online DPO in rounds, the reference refreshed to the current policy after each",
    paper="arXiv 2405.07863 (RLHF Workflow: online iterative DPO); arXiv 2312.11456",
    reference_update="hard",
    reference_update_params={"tau": 10},
))

SPIN = _add(Recipe(
    name="spin",
    notes="Pairs (the task's demonstration, one own sample of the current policy) with the logistic loss, which is DPO's with beta = lambda = 0.1 (the authors' default, uclaml/SPIN). The opponent/reference is the previous iterate: replaced by the current policy every tau=10 steps (our round length; the paper regenerates the whole SFT set each iteration and trains 2 epochs).",
    summary="self-play fine-tuning: prefer the demonstration over the model's own sample",
    paper="arXiv 2401.01335 (SPIN)",
    family="online preference",
    data="spin",
    loss="dpo",
    loss_params={"beta": 0.1},
    reference_update="hard",
    reference_update_params={"tau": 10},
))

SPPO = _add(Recipe(
    name="sppo",
    notes="Each step: rollout.group_size samples per prompt (the paper: K=5), each sample's win rate P(y > pi) estimated as the mean of the oracle's P(y > y') over the other samples; the best and worst samples are regressed with (log pi/pi_ref (y) - eta*(P - 1/2))^2, averaged over the two (the authors' code, uclaml/SPPO, whose eta = 1/beta, with beta=0.001 in its scripts/pipeline.sh @0a4a1c18: eta=1000). The reference is the previous iterate: replaced every tau=10 steps (our round length).",
    summary="self-play preference optimisation: regress log-ratios onto estimated win rates against the policy",
    paper="arXiv 2405.00675 (SPPO, Eq. 4.7)",
    family="online preference",
    data="self_play",
    loss="sppo",
    loss_params={"beta": 0.001, "eta": 1000.0},
    reference_update="hard",
    reference_update_params={"tau": 10},
))

DNO = _add(Recipe(
    name="dno",
    notes="DNO-Prct (the paper's practical algorithm, sec. 4): each step, rollout.group_size samples of the current policy plus the task's demonstration (the paper's gold/teacher answer) per prompt, all compared pairwise by the preference oracle; chosen = the highest estimated win rate, rejected = the lowest, kept only when they differ by at least 0.5 (the paper's large-margin filter; its threshold is not reproduced here: 0.5 is our choice), trained with DPO's loss against the previous iterate (reference replaced every tau=10 steps, our round length). beta=0.1 (our choice). The conceptual DNO (its regression onto win rates) is not implemented; sppo is the regression form.",
    summary="direct Nash optimisation, practical form: iterative DPO on large-margin pairs among own samples and the demonstration",
    paper="arXiv 2404.03715 (Direct Nash Optimization, DNO-Prct)",
    family="online preference",
    data="online_pairs",
    pair_with_demonstration=True,
    pair_min_margin=0.5,
    loss="dpo",
    loss_params={"beta": 0.1},
    reference_update="hard",
    reference_update_params={"tau": 10},
))

NASH_MD = _add(Recipe(
    name="nash_md",
    notes="Nash-MD-PG: rollout.group_size samples y of the policy per prompt, each against one sample y' of the geometric mixture pi^(1-beta) * pi_ref^beta (beta = mixture_coef = 0.5, TRL's NashMDConfig default), taken token by token as TRL does (unipo.mixture; unipo's own sampler even with rollout.engine=vllm); the oracle's P(y > y') (TrainConfig.oracle) is the reward, A = P - 1/2, REINFORCE on the summed log-prob of y (seq_mean_token_sum), plus beta_KL = 0.1 (TRL's default beta) times a KL to the reference in the loss, with the k2 estimator (whose gradient is the token-wise policy gradient of the reverse KL). The mixture samples are judged, never trained on. One optimizer step per batch.",
    summary="play against a geometric mixture of the policy and the reference; REINFORCE on the preference",
    paper="arXiv 2312.00886 (Nash Learning from Human Feedback, Nash-MD-PG)",
    family="online preference",
    data="nash_md",
    mixture_coef=0.5,
    advantage="preference_centred",
    loss="reinforce",
    aggregation="seq_mean_token_sum",
    kl_coef=0.1,
    kl_estimator="k2",
))


# --- multi-turn agents (`unipo train --recipe multiturn_grpo --env guess_number`; unipo.agents, unipo.envs) --------

MULTITURN_GRPO = _add(Recipe(
    name="multiturn_grpo",
    notes="Episodes against TrainConfig.env (default guess_number), rollout.group_size episodes per problem, one row per turn: the prompt is the conversation so far, the completion the model's action, so environment and tool tokens are never trained on (unipo.agents). Every turn of an episode gets its episode's outcome reward group-normalised over the problem's episodes (one value per episode, std unbiased + 1e-6): the trajectory-level baseline of MT-GRPO's paper (its GRPO-OR) and Search-R1's observation-masked GRPO (arXiv 2503.09516). The loss is GRPO's (PPO clip 0.2, mean over rows of token means: an episode of more turns weighs more, our choice). One optimizer step per batch; no KL.",
    summary="multi-turn GRPO: each turn gets its episode's group-normalised outcome advantage",
    paper="arXiv 2505.11821 (MT-GRPO paper's trajectory-level GRPO baseline, sec. 4)",
    family="multi-turn",
    data="episodes",
    advantage="episode_outcome",
    loss="ppo_clip",
    loss_params={"eps_low": 0.2, "eps_high": 0.2},
    aggregation="seq_mean_token_mean",
))

MT_GRPO = _add(dataclasses.replace(
    MULTITURN_GRPO,
    name="mt_grpo",
    notes="As multiturn_grpo, with MT-GRPO's turn-level credit: every turn but an episode's last gets A^O + lambda * A^T (A^T: the turn's reward normalised over the group's episodes at the same turn index), the last turn A^O alone; lambda = 1 as in the paper. The paper's episodes have two turns (tool call, answer); the T-turn form is our generalisation (unipo.core.turns). The turn rewards are the environment's (guess_number: an informative guess; calculator: the tool call ran). The paper draws the group's second turns from a shared first turn (a tree); we sample G independent episodes.",
    summary="multi-turn GRPO plus group-normalised turn-level rewards on the turns before the last",
    paper="arXiv 2505.11821 (Reinforcing Multi-Turn Reasoning in LLM Agents via Turn-Level Credit Assignment, sec. 4)",
    advantage="mt_grpo",
    advantage_params={"turn_coef": 1.0},
))

IGPO = _add(dataclasses.replace(
    MULTITURN_GRPO,
    name="igpo",
    notes="As multiturn_grpo, with IGPO's dense turn rewards: every turn but an episode's last is rewarded with its information gain, the rise in the policy's probability of the gold answer (exp of the mean log-prob of its tokens, as the model's next action) from the conversation before the turn to the one after it, computed by the collector in one no-grad forward over every turn's prompt; the last turn's reward is the outcome. The rewards are z-normalised over all turns of the group's episodes, then each turn's advantage is the sum of the normalised rewards from it on (gamma = 1). The normalisation set and gamma are our reading of the paper (not checked against released code).",
    summary="information-gain turn rewards (the policy's rising belief in the gold answer) plus the outcome, normalised and summed",
    paper="arXiv 2510.14967 (Information Gain-based Policy Optimization, sec. 3)",
    advantage="igpo",
    advantage_params={"gamma": 1.0},
))

ARCHER = _add(Recipe(
    name="archer",
    notes="From the authors' code (YifeiZhou02/ArCHer @7c771a76: archer/algorithms/archer/trainer.py, archer/models/critic.py, archer/data/utils.py, scripts/config/*.yaml). An off-policy turn-level critic (the archer_critic stateful baseline, unipo.archer) learns before each step's advantages from a replay buffer of every turn so far: twin Q heads regress on r + 0.95 (1 - done) Vbar_i(s'), twin V heads on Qbar_i(s, a~) with a~ a fresh action of the current policy, Polyak target tau = 0.1 after each critic step, Adam without weight decay, gradient-norm clip 1.0, buffer 100000. The per-turn reward is the environment's turn reward, plus the outcome on the episode's last turn (terminal). The actor is their REINFORCE: -mean over rows of A * (sum of the action's token log-probs), A = min(Q1, Q2)(s, a) - min(V1, V2)(s) from the critic just updated, raw (not normalised); one optimizer step per batch. Ours vs theirs: the critic's encoder is a copy of the policy (theirs roberta-base, with its own tokenizer); the actor trains on this step's on-policy turns (theirs: states drawn from the replay buffer, each with a fresh action: 3 actor epochs of 256, one optimizer step each); a step is one collection then its critic and actor updates (theirs: 128 trajectories, 50 critic steps of 256 transitions, actor frozen for the first 10-20 of 2000 iterations); the critic's schedule is scaled to a CPU run: 8 critic steps of 32 transitions a step (about one pass over guess_number's ~300 new turns), lr 1e-3, the actor's advantage 0 for the first 10 steps (80 critic steps; theirs 500-1000); their 32 micro-batch losses are summed, not averaged, and clipped with the policy's left-over gradients in the same norm; their buffer draws favour the oldest slots once it wraps, ours are uniform. Their schedule: recipe.baseline_params.critic_steps=50 critic_batch=256 lr=2e-5. advantage_params.center=true (not theirs) subtracts the batch mean of A. The paper (sec. 4, Algorithm 1) writes one Q and one V with target networks; the twin heads (the minimum only in the advantage) are the code's. Keep optim.lr (the actor's) well below the critic's: their configs use lm_lr 1e-6 with critic_lr 2e-5 (scripts/config/archer_20q.yaml); in benchmarks/agents.py, from a guess_number warm start at 1.00, the actor at 1e-4 fell to 0.58 and at 1e-5 held 0.97 (3 seeds).",
    summary="off-policy utterance-level critic (twin Q and V, TD with targets, replay buffer) whose Q - V is the token-level REINFORCE reward",
    paper="arXiv 2402.19446 (ArCHer: Training Language Model Agents via Hierarchical Multi-Turn RL, sec. 4)",
    family="multi-turn",
    data="episodes",
    advantage="archer",
    loss="reinforce",
    aggregation="seq_mean_token_sum",  # their -mean(sum_t log pi * A)
    advantage_params={"warmup_steps": 10},
    baseline="archer_critic",
    baseline_params={"critic_steps": 8, "critic_batch": 32, "lr": 1e-3},
))

SWEET_RL = _add(Recipe(
    name="sweet_rl",
    notes="From the authors' code: facebookresearch/sweet_rl @38daf2a5 (README's SWEET-RL commands; scripts/evaluate_code.py, sample_best_of_n.py, rank_best_of_n.py, generate_random_pairs_from_ranks.py) and their OpenRLHF fork YifeiZhou02/collab_openrlhf @87259d4b (openrlhf/trainer/dpo_trainer.py, datasets/reward_dataset.py, models/loss.py). Critic (recipe.baseline=sweet_critic, unipo.sweet): a copy of the policy's initial weights, with a frozen copy as its reference, reading 'In light that the final answer is: <gold answer>.' before the conversation (the rows' privileged `references`; the policy's prompts never hold it). Its pairs, per problem: the first episode of the highest outcome, if that outcome is >= 1 (a success), against every episode of lower outcome (evaluate_code.py). A trajectory's score S is the critic-minus-reference log-prob summed over all of its action tokens divided by their number (--mean_log_prob over the mask of every assistant turn); loss -log sigma(0.1 * (S+ - S-)); AdamW betas (0.9, 0.95), weight decay 0, lr 2e-7, gradient clip 1.0, batches of 8 pairs, 4 epochs (the README's critic command). Policy: at every turn state of the step's own episodes, 16 candidate actions of the current policy (sample_best_of_n.py: n=16, temperature 1; ours rollout.temperature), each scored 0.1 * (its mean log-prob under the critic, reading the prefix, minus its mean sampling log-prob: rank_best_of_n.py subtracts the sampler's, computed without the prefix); 4 pairs per state, each one candidate drawn from the upper half of the ranking and one from the lower half, the higher-scored chosen (extract_indices; their best-vs-worst variant is commented out); DPO with beta 0.1 on summed log-probs plus 0.01 times the chosen action's per-token mean NLL (rpo alpha=0.01: the README's --beta 0.1 --nll_loss_coef 0.01), against the frozen initial policy. Where this differs: theirs is offline (a fixed set of 15k trajectories, 3 per task, the critic trained once, candidates for 10% of the trajectories' turn states, one DPO epoch in batches of 8 pairs at lr 2e-7 with a cosine schedule); here each step is online by default (a recorded file: below): fresh episodes (rollout.group_size per problem; theirs 3), the critic's 4 epochs over this step's trajectory pairs only (it keeps its weights and AdamW state across steps, at a constant lr), candidates at every turn state of this step's episodes, and one optimizer step of the policy on all the step's pairs. Online the sampler is the current policy, no longer the critic's reference as in their first (and only) round; baseline_params.ranking_reference=critic_reference ranks with the trained parameterisation beta * (log pi_critic - log pi_ref) instead, both reading the prefix. Their ranking asks vLLM for prompt log-probs at temperature 0.5; we use the critic's untempered log-probs, as in its training (whether their vLLM version scaled prompt log-probs by temperature was not established). Their policy NLL term (no prompt key, --no_prompt) averages over the whole chosen sequence, conversation included; ours over the chosen action (the shared conversation cancels out of the DPO term either way). The paper writes the critic's objective with the turns' advantages summed over the trajectory (our reading, not re-checked against the paper's text); the code's token-weighted mean over the trajectory is used here (the two agree when every action has the same length). Theirs trains from fixed trajectories (offline): record them with `unipo episodes` and set recipe.data_params.trajectories=FILE (each step: the next problems of the file with their recorded episodes, replayed; unipo.episode_files); without it every step's episodes are fresh. Under torchrun with DDP every rank's critic learns from the global batch of episodes (FSDP refused); the critic and its reference are two more copies of the model, saved in every checkpoint.",
    summary="a critic that reads the gold answer learns turn-level advantages (Bradley-Terry on trajectory pairs); the policy gets DPO on its ranked candidate actions at each turn",
    paper="arXiv 2503.15478 (SWEET-RL, sec. 5)",
    family="multi-turn",
    data="turn_pairs",
    data_params={"candidates": 16, "pairs_per_state": 4},
    baseline="sweet_critic",
    baseline_params={"beta": 0.1, "lr": 2e-7, "epochs": 4, "pairs_per_update": 8, "max_grad_norm": 1.0,
                     "ranking_reference": "sampler"},
    loss="rpo",
    loss_params={"beta": 0.1, "alpha": 0.01},
))

EPO = _add(dataclasses.replace(
    MULTITURN_GRPO,
    name="epo",
    notes="From the authors' code (WujiangXu/EPO @5b6fa98e: verl/workers/actor/dp_actor.py update_policy, generate_entropy_penalty, _calculate_epoch_based_entropy_weight; verl/trainer/ppo/ray_trainer.py and agent_system/multi_turn_rollout/rollout_loop.py for the entropy history; verl/trainer/config/ppo_trainer.yaml; the GRPO branch of examples/general_running_server.sh with the README's ALFWorld EPO settings). Loss: policy loss - 0.001 * [agg(H) - c_s * w(k) * agg(P)] (unipo.core.entropy, recipe.entropy_regulariser=epo), token-mean aggregation, c_s = 1. H-bar of a row is the mean over the steps so far (this one included) of each step's token-mean pi_old entropy at the row's turn index; P = 0.1 on every token whose current entropy is outside the open band (0 * H-bar, 2 * H-bar) (README: min_ratio 0, max_ratio 2, out_range_penalty 0.1, token mode). w(k) (enable_smooth_weights) falls from 1 to 0.83 over the first half of training, then 0.8 * exp(-3 * progress) to 0.04; their K is hard-coded 150 (their default total_epochs, one step each), ours the run's steps. In their code P is a constant of H (a torch.where of constants), so the smoothing and its phase weight carry no gradient: the update is exactly an entropy bonus of 0.001 and P only shifts the loss's value and the logged out-of-band fraction; entropy_params.shape=hinge is a differentiable band penalty (ours, not theirs). Their smoothing acts only in micro-batches holding a turn >= max_step // 2, read from a config key never set (max_step, default 50): turn >= 25, the second half of ALFWorld's 50 turns; ours gates each row, turn >= min_turn = 2 (guess_number's 5 turns // 2; set entropy_params.min_turn for another environment). Their history pads a step with fewer turns than max_steps with zeros in front (shifting the turn indices) and counts finished episodes' dummy turns; ours averages each turn over the steps that had it, over live episodes' turns only. Advantage: verl-agent's GRPO as their trainer calls it (compute_mean_std_cross_all_data=True): every turn row carries its episode's reward and the mean and std are over all the group's turn rows, so a longer episode counts more; that is advantage=grpo on these rows (episode_outcome would count each episode once). Their policy loss is verl's dual-clip PPO (eps 0.2, c = 3) with a k3 (low_var_kl; theirs clamped to [-10, 10]) KL of 0.01 in the loss (the GRPO branch's use_kl_loss). Their mini-batches are 256 turn rows (about one update at our default 8 x 8 episodes of ~4 turns): one optimizer step per batch here. The README's example commands are PPO runs, and the script's PPO branch passes none of the entropy_smooth settings. The paper's own equations were not checked here (only its abstract was readable): trajectory-level entropy regularisation, a smoothing regulariser penalising deviations from historical averages, and phase weighting from conservative exploration to strong stabilisation.",
    summary="multi-turn GRPO with EPO's entropy term: the bonus minus a phase-weighted penalty for entropy outside a band around its running per-turn history",
    paper="arXiv 2509.22576 (EPO: Entropy-regularized Policy Optimization for LLM Agents Reinforcement Learning)",
    advantage="grpo",  # verl-agent's GRPO: mean and std over all the group's turn rows
    loss="dual_clip",  # verl's compute_policy_loss is dual-clip PPO
    loss_params={"eps_low": 0.2, "eps_high": 0.2, "clip_ratio_c": 3.0},
    aggregation="token_mean",
    kl_coef=0.01,
    kl_estimator="k3",
    entropy_coef=0.001,
    entropy_regulariser="epo",
    entropy_params={"smooth_coef": 1.0, "band_low": 0.0, "band_high": 2.0, "penalty": 0.1, "level": "token",
                    "shape": "constant", "phase_weights": True, "min_turn": 2},
))

TREE_GRPO = _add(Recipe(
    name="tree_grpo",
    notes="From the authors' code and scripts (AMAP-ML/Tree-GRPO @90b17099: train_multihopqa_tree_search.sh, search_r1/llm_agent/generation_ts.py, search_r1/llm_agent/tree_node.py, verl/trainer/ppo/ray_trainer_ts.py, verl/workers/actor/dp_actor.py). Rollouts (unipo.trees): M trees per problem, each first one episode; then L rounds in which N nodes (turns) of each tree are picked uniformly at random with replacement among its root and non-leaf nodes (the code's random.choices; the root is a candidate, so an expansion may be a fresh episode of the same tree) and one continuation is sampled from each to the end of an episode, sharing the turns before it; K leaves of each tree are kept at random. Their scripts: M=2, N=2, L=1, K=3 (6 leaves per question, every leaf kept). Ours: recipe.data_params trees=2, expansions=3, rounds=1, and K = rollout.group_size / trees, so the default group of 8 keeps all 4 leaves of each tree (the scripts' 'keep every leaf', scaled to 8). A branch replays its prefix's actions in a fresh environment (environments have no copy; a replay that answers differently is an error). Rows: each kept leaf is a whole episode of one-row-per-turn rows, a shared prefix turn repeated in every leaf below it, as their code puts the shared prefix into every leaf's trajectory. Advantage (their adv_estimator=tree): A = A_inter + A_intra on every turn of a leaf, A_inter = (R - mean) / (std + 1e-6) over the problem's M*K leaves, A_intra the same over the leaf's tree (unbiased std, over leaves); a group of one gets 0 here, R in their verl helper (never met with their K=3). Their loss (policy_loss=grpo: verl's dual clip, eps 0.2/0.2, c=3), token-mean aggregation, entropy bonus 0.001 (the config default), k3 (low_var_kl; theirs clamped to [-10, 10]) KL in the loss with coefficient 0.001, and 512 prompts with mini-batches of 64: 8 optimizer steps per generation batch. Their lr (unset in the tree scripts; 1e-6 in the GRPO ones), warm-up ratio 0.285 and top_p 0.95 are run settings (optim.*, rollout.top_p). Their reward is the QA task's exact match plus format scores; ours the environment's outcome.",
    summary="tree-search rollouts sharing prefixes; each leaf's outcome group-normalised within its tree plus across the problem's trees",
    paper="arXiv 2509.21240 (Tree Search for LLM Agent Reinforcement Learning, Tree-GRPO)",
    family="multi-turn",
    data="tree_episodes",
    data_params={"trees": 2, "expansions": 3, "rounds": 1},  # scripts: M=2, N=2, L=1, K=3; ours keep 4 of 4 per tree
    advantage="tree_grpo",
    advantage_params={"inter_coef": 1.0, "intra_coef": 1.0},
    loss="dual_clip",  # their policy_loss=grpo is verl's dual-clip PPO
    loss_params={"eps_low": 0.2, "eps_high": 0.2, "clip_ratio_c": 3.0},
    aggregation="token_mean",
    entropy_coef=0.001,
    kl_coef=0.001,
    kl_estimator="k3",
    mini_batches=8,
))


def catalogue_markdown() -> str:
    """docs/recipes.md: every recipe's mechanism, paper, open choices and slots."""
    from unipo.config import EPISODE_SOURCES, Recipe, to_dict

    defaults = to_dict(Recipe(name="defaults"))
    lines = ["# Recipes", "",
             "Generated by `unipo recipes --markdown` (a test keeps this file in step with the code).",
             "Each recipe is one choice per slot of the unified estimator; the slots a recipe leaves at the",
             "default are not repeated. `unipo recipes show NAME` prints every slot.", "",
             "`updates/batch` is the number of optimizer steps one generation batch gets (mini-batches x epochs):",
             "from the second on, pi_theta differs from pi_old and the recipe's ratio, clip or trust region acts.", "",
             "| name | family | mechanism | updates/batch | paper |", "|---|---|---|---|---|"]
    lines += [f"| [{r.name}](#{r.name}) | {r.family} | {r.summary} | {r.updates_per_batch} | {r.paper} |"
              for r in RECIPES.values()]
    for r in RECIPES.values():
        lines += ["", f"## {r.name}", "", f"{r.summary}.", "", f"Paper: {r.paper}."]
        if r.notes:
            lines += ["", f"Settings and open choices: {r.notes}"]
        slots = {k: v for k, v in to_dict(r).items()
                 if k not in ("name", "summary", "paper", "family", "notes") and v != defaults[k]}
        lines += ["", "| slot | value |", "|---|---|"] + [f"| `{k}` | `{v}` |" for k, v in slots.items()]
        data = " --data pairs.jsonl" if r.data == "pairs" else ""
        where = "--env guess_number" if r.data in EPISODE_SOURCES else "--task addition"
        lines += ["", f"Run it: `unipo train --recipe {r.name}{data} {where}`"]
    return "\n".join(lines) + "\n"
