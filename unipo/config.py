"""Frozen configuration: a recipe (one choice per estimator slot) plus how to run it.

A `Recipe` names what the papers differ on; `TrainConfig` names what a run differs on
(model, task, budget, seed). Both are frozen: derived values are properties, validation
happens in `__post_init__`, and nothing is mutated while training.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import yaml

# pair sources (unipo.collect): offline pairs (TrainConfig.pairs), judged pairs of fresh samples, SPIN's
# (demonstration, own sample), SPPO's best/worst own samples with their estimated win rates; turn_pairs: SWEET-RL's
# candidate actions at each turn state of the step's episodes, ranked by the recipe's critic (unipo.sweet)
PAIR_SOURCES = ("pairs", "online_pairs", "spin", "self_play", "turn_pairs")
# nash_md: the policy's samples, each rewarded with the oracle's P(sample > a sample of the geometric mixture of the
# policy and the reference) (Nash-MD, arXiv 2312.00886; unipo.mixture)
# episodes: multi-turn episodes against the environment TrainConfig.env, one row per turn (unipo.agents);
# tree_episodes: the same, rolled out as Tree-GRPO's search trees of shared prefixes (unipo.trees)
EPISODE_SOURCES = ("episodes", "tree_episodes", "turn_pairs")  # (turn_pairs: pairs made from episodes)
DATA_SOURCES = tuple(dict.fromkeys(("on_policy", "mixed", "expert", *PAIR_SOURCES, "nash_md", *EPISODE_SOURCES)))
REFERENCE_UPDATES = ("none", "soft", "hard")
SCHEDULES = ("constant", "cosine", "linear")
MODEL_DTYPES = ("float32", "bfloat16", "float16")
ROLLOUT_ENGINES = ("native", "vllm")  # unipo.engine.ENGINES
PARALLEL_MODES = ("ddp", "fsdp")  # data-parallel modes under torchrun (unipo.distributed)
LORA_KEYS = ("r", "alpha", "target_modules", "dropout")
DEVICE_FORMS = "auto, cpu, cuda, cuda:N or mps"
LOGGERS = ("jsonl", "tensorboard", "wandb")  # jsonl is always written; the others mirror it (unipo.tracking)
_DEVICE = re.compile(r"auto|cpu|mps|cuda(:[0-9]+)?")
_MAX_SEED = 2**63


def _frozen_mapping(value: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return types.MappingProxyType(dict(value or {}))


# -- value checks: each raises ONE line naming the key as the user types it, the value and what is allowed ------
def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _bad(key: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"{key} must be {allowed}, got {_show(value)}")


def check_int(key: str, value: Any, minimum: int | None = None, maximum: int | None = None) -> None:
    """An int (not a bool, not 2.5) within [minimum, maximum]."""
    ok = isinstance(value, int) and not isinstance(value, bool)
    ok = ok and (minimum is None or value >= minimum) and (maximum is None or value <= maximum)
    if not ok:
        allowed = "an int" + (f" >= {minimum}" if minimum is not None else "")
        allowed += f" and < {maximum + 1}" if maximum is not None else ""
        raise _bad(key, value, allowed)


def check_number(key: str, value: Any, allowed: str, ok=lambda x: True, *, allow_inf: bool = False) -> None:
    """A real number (int or float, not a bool): never NaN, infinite only when `allow_inf`, and `ok(value)`."""
    try:
        number = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan
    except OverflowError:  # an int too large for a float
        number = math.nan
    if math.isnan(number) or (math.isinf(number) and not allow_inf) or not ok(number):
        raise _bad(key, value, allowed)


def check_bool(key: str, value: Any) -> None:
    """A real boolean (YAML true/false): 'maybe' or 1 is not one."""
    if not isinstance(value, bool):
        raise _bad(key, value, "true or false")


def check_choice(key: str, value: Any, choices: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in choices:
        raise _bad(key, value, f"one of {', '.join(choices)}")


def check_name(key: str, value: Any, *, empty: bool = False) -> None:
    """A string (a registry name, a path, free text); non-empty unless `empty`."""
    if not isinstance(value, str) or not (empty or value.strip()):
        raise _bad(key, value, "a string" if empty else "a non-empty string")


def check_mapping(key: str, value: Any) -> None:
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise _bad(key, value, "a mapping {name: value, ...}")


@dataclass(frozen=True)
class Recipe:
    """One choice per slot of the unified policy-gradient estimator.

    grad = sum mask * weight * A * grad(pi) / denom, where
    - `data` picks the rows: the model's rollouts, expert traces, or both;
    - `advantage` picks A; `loss` picks the ratio/denominator and clipping;
    - `selection` picks the mask/weight (token and sample selection, in order);
    - `aggregation` says how per-token losses become one number;
    - `mixer` says, per row and step, how much of the RL loss and of the SFT loss it gets
      (this is where CHORD's schedule and HPT's gate live);
    - `entropy_regulariser` says what entropy term the loss subtracts `entropy_coef` times
      (the plain bonus, or EPO's band-smoothed one).
    """

    name: str
    summary: str = ""
    paper: str = ""
    family: str = "on-policy"
    notes: str = ""  # choices the paper left open, and how this recipe made them
    # data source
    data: str = "on_policy"
    expert_per_group: int = 0  # rows of each group that are expert traces (data != on_policy)
    expert_in_group: bool = True  # expert rows share the group's advantage baseline (LUFFY)
    # False: the expert rows take `expert_per_group` of the group's G slots (LUFFY's 7 + 1 of 8).
    # True: G rollouts plus the expert rows (HPT's gate counts a full group of rollouts).
    expert_in_addition: bool = False
    # > 0: the expert rows are demonstrations of OTHER training prompts, this fraction of the step's rows
    # (CHORD's separate SFT set mixed into every batch), instead of `expert_per_group` rows per group.
    expert_batch_frac: float = 0.0
    hint_fractions: tuple[float, ...] = ()  # GHPO: growing expert-prefix hints for all-fail groups
    # GHPO's hint: appended to the user message after this sentence (the assistant turn stays the model's)
    hint_template: str = "\n The following text is the beginning part of the answer, which you can refer to for " \
                         "solving the problem:\n{hint}"
    prompt_multiplier: float = 1.0  # sample ceil(m * prompts_per_step) prompts a step (CPPO refills pruned slots)
    zero_truncated: bool = False  # a completion cut off at the budget scores 0, whatever it says (Dr. GRPO's code)
    reward_scale: str = "unit"  # "unit": the task's score in [0, 1]; "signed": 2*score - 1 in [-1, 1] (DAPO's)
    # params of the data source: tree_episodes' tree shape (trees, expansions, rounds; unipo.trees), turn_pairs'
    # candidates and pairs_per_state (unipo.sweet); empty otherwise
    data_params: Mapping[str, Any] = field(default_factory=dict)
    # advantage
    advantage: str = "grpo"
    advantage_params: Mapping[str, Any] = field(default_factory=dict)
    # ratio / clipping / surrogate
    loss: str = "ppo_clip"
    loss_params: Mapping[str, Any] = field(default_factory=dict)
    aggregation: str = "seq_mean_token_mean"
    # token and sample selection, applied in order
    selection: tuple[str, ...] = ()
    selection_params: Mapping[str, Any] = field(default_factory=dict)
    dynamic_sampling: bool = False  # DAPO: refill the batch with groups whose accuracy differs
    overlong_buffer_frac: float = 0.0  # DAPO soft overlong punishment over this last fraction of the budget (0 = off)
    # RL/SFT mixing
    mixer: str = "rl"
    mixer_params: Mapping[str, Any] = field(default_factory=dict)
    sft_weighting: str = "uniform"  # "phi": CHORD-phi token weights p(1-p) on SFT tokens
    # a baseline that carries state across steps ("none" | "spo_tracker": SPO's per-prompt Beta tracker |
    # "sweet_critic": SWEET-RL's critic LM, unipo.sweet | ...: unipo.critics.BASELINES); an advantage that reads the
    # `baseline` input needs one, and so does recipe.data=turn_pairs
    baseline: str = "none"
    baseline_params: Mapping[str, Any] = field(default_factory=dict)
    # regularisers
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    entropy_coef: float = 0.0
    # the entropy term the loss subtracts entropy_coef times (unipo.core.entropy.ENTROPY_REGULARISERS): "bonus"
    # agg(H); "epo" agg(H) minus EPO's smoothing penalty for entropy outside a band around its running per-turn
    # history (state kept by the trainer, saved in checkpoints); entropy_params are the regulariser's params
    entropy_regulariser: str = "bonus"
    entropy_params: Mapping[str, Any] = field(default_factory=dict)
    # value head (PPO with GAE)
    value_coef: float = 0.0
    # a moving reference, applied after each training step's update (unipo.core.preference): "soft" mixes
    # pi_ref <- alpha*pi + (1-alpha)*pi_ref every `tau` steps (TR-DPO), "hard" copies pi into pi_ref every `tau`
    # steps (TR-DPO's hard update; SPIN's and iterative DPO's "reference = previous iterate")
    reference_update: str = "none"
    reference_update_params: Mapping[str, Any] = field(default_factory=dict)  # alpha (soft), tau (both)
    # online_pairs / self_play: the task's demonstration joins each prompt's samples as a candidate (DNO's
    # "student vs teacher" pairs), and a pair is kept only when the chosen answer's estimated win rate exceeds the
    # rejected one's by at least `pair_min_margin` (DNO's large-margin filter; 0: any strict preference)
    pair_with_demonstration: bool = False
    pair_min_margin: float = 0.0
    # nash_md: the weight beta of the reference in the geometric mixture pi^(1-beta) * pi_ref^beta (token-wise)
    mixture_coef: float = 0.5
    # update schedule: each generation batch is shuffled and split into `mini_batches` parts, one
    # optimizer step each, for `epochs` passes (epochs * mini_batches updates per rollout batch).
    # TRL: steps_per_generation = mini_batches, num_iterations = epochs. verl: ppo_mini_batch_size =
    # rows / mini_batches (counted in prompts there), ppo_epochs = epochs. From the second update on,
    # pi_theta != pi_old and the ratio, clipping and trust regions act.
    mini_batches: int = 1
    epochs: int = 1

    def __post_init__(self) -> None:
        check_name("recipe.name", self.name)
        try:
            self._check_plain_fields()
            object.__setattr__(self, "selection", _selection_names(self.selection))
        except ValueError as error:
            raise ValueError(f"recipe {self.name}: {error}") from None
        for name in ("advantage_params", "loss_params", "selection_params", "mixer_params", "baseline_params",
                     "reference_update_params", "data_params", "entropy_params"):
            object.__setattr__(self, name, _frozen_mapping(getattr(self, name)))
        object.__setattr__(self, "hint_fractions", tuple(self.hint_fractions))
        if self.data == "on_policy" and self.expert_per_group:
            raise ValueError(f"recipe {self.name}: recipe.expert_per_group needs recipe.data=mixed or expert")
        if self.expert_batch_frac and self.data != "mixed":
            raise ValueError(f"recipe {self.name}: recipe.expert_batch_frac needs recipe.data=mixed")
        from unipo.slots import check_recipe  # the slot registries import the core maths: load them lazily

        check_recipe(self)

    def _check_plain_fields(self) -> None:
        """Types and ranges of the fields that are not slot choices (those are `unipo.slots.check_recipe`'s)."""
        for key in ("summary", "paper", "family", "notes"):
            check_name(f"recipe.{key}", getattr(self, key), empty=True)
        # registry names: checked there
        for key in ("advantage", "loss", "aggregation", "mixer", "baseline", "entropy_regulariser"):
            check_name(f"recipe.{key}", getattr(self, key))
        check_choice("recipe.data", self.data, DATA_SOURCES)
        check_choice("recipe.sft_weighting", self.sft_weighting, ("uniform", "phi"))
        check_choice("recipe.reward_scale", self.reward_scale, ("unit", "signed"))
        from unipo.core.kl import KL_ESTIMATORS

        check_choice("recipe.kl_estimator", self.kl_estimator, tuple(KL_ESTIMATORS))
        for key in ("expert_in_group", "expert_in_addition", "zero_truncated", "dynamic_sampling"):
            check_bool(f"recipe.{key}", getattr(self, key))
        check_int("recipe.expert_per_group", self.expert_per_group, 0)
        check_int("recipe.mini_batches", self.mini_batches, 1)
        check_int("recipe.epochs", self.epochs, 1)
        for key in ("expert_batch_frac", "overlong_buffer_frac"):
            check_number(f"recipe.{key}", getattr(self, key), "a number in [0, 1)", lambda x: 0 <= x < 1)
        check_number("recipe.prompt_multiplier", self.prompt_multiplier, "a finite number >= 1", lambda x: x >= 1)
        check_number("recipe.kl_coef", self.kl_coef, "a finite number >= 0", lambda x: x >= 0)
        check_number("recipe.value_coef", self.value_coef, "a finite number >= 0", lambda x: x >= 0)
        check_number("recipe.entropy_coef", self.entropy_coef, "a finite number")
        check_name("recipe.hint_template", self.hint_template)
        try:
            self.hint_template.format(hint="")
            if "{hint}" not in self.hint_template:
                raise KeyError("hint")
        except (KeyError, IndexError, ValueError):
            raise _bad("recipe.hint_template", self.hint_template,
                       "a template whose only field is {hint} (write other braces as {{ }})") from None
        if not isinstance(self.hint_fractions, (list, tuple)):
            raise _bad("recipe.hint_fractions", self.hint_fractions, "a list of numbers in (0, 1], e.g. [0.25, 0.5]")
        for fraction in self.hint_fractions:
            check_number("recipe.hint_fractions", fraction, "a list of numbers in (0, 1]", lambda x: 0 < x <= 1)
        for key in ("advantage_params", "loss_params", "selection_params", "mixer_params", "baseline_params",
                    "data_params", "entropy_params"):
            if getattr(self, key) is not None:
                check_mapping(f"recipe.{key}", getattr(self, key))
        if self.data == "tree_episodes":
            from unipo.trees import check_tree_params

            check_tree_params(self.data_params or {})
            if self.expert_per_group:
                raise ValueError("recipe.expert_per_group: tree rollouts (recipe.data=tree_episodes) have no expert "
                                 "rows; use recipe.data=episodes")
        elif self.data == "turn_pairs":
            from unipo.sweet import turn_pair_params

            turn_pair_params(self.data_params or {})
            if self.baseline == "none":
                raise ValueError("recipe.data=turn_pairs ranks candidate actions with a critic: set recipe.baseline "
                                 "(sweet_critic)")
        elif self.data_params:
            raise ValueError(f"recipe.data_params={dict(self.data_params)} is only read by recipe.data=tree_episodes "
                             f"or turn_pairs (this recipe has data={self.data})")
        for name, params in (self.selection_params or {}).items():
            check_mapping(f"recipe.selection_params.{name}", params)
        check_choice("recipe.reference_update", self.reference_update, REFERENCE_UPDATES)
        check_bool("recipe.pair_with_demonstration", self.pair_with_demonstration)
        check_number("recipe.pair_min_margin", self.pair_min_margin, "a number in [0, 1)", lambda x: 0 <= x < 1)
        check_number("recipe.mixture_coef", self.mixture_coef, "a number in [0, 1]", lambda x: 0 <= x <= 1)
        if (self.pair_with_demonstration or self.pair_min_margin) and self.data not in ("online_pairs", "self_play"):
            raise ValueError("recipe.pair_with_demonstration and recipe.pair_min_margin shape judged pairs: they need "
                             "recipe.data=online_pairs or self_play")
        params = self.reference_update_params or {}
        check_mapping("recipe.reference_update_params", params)
        allowed = {"none": (), "soft": ("alpha", "tau"), "hard": ("tau",)}[self.reference_update]
        unknown = sorted(set(params) - set(allowed))
        if unknown:
            raise ValueError(f"recipe.reference_update_params: unknown keys {unknown} for reference_update="
                             f"{self.reference_update}; valid: {', '.join(allowed) or 'none'}")
        if "alpha" in params:
            check_number("recipe.reference_update_params.alpha", params["alpha"], "a number in (0, 1]",
                         lambda x: 0 < x <= 1)
        if "tau" in params:
            check_int("recipe.reference_update_params.tau", params["tau"], 1)

    @property
    def uses_expert(self) -> bool:
        return self.data != "on_policy" or bool(self.hint_fractions)

    @property
    def updates_per_batch(self) -> int:
        """Optimizer steps taken on one generation batch (1: the ratio is exactly 1, pi_old == pi)."""
        return self.epochs * self.mini_batches

    @property
    def needs_reference(self) -> bool:
        """A frozen (or moving) reference model: a KL to it, or a slot function that reads `ref_logp` (A*-PO's
        loss, every preference loss)."""
        from unipo.slots import recipe_inputs

        return (self.kl_coef > 0 or "ref_logp" in recipe_inputs(self) or self.reference_update != "none"
                or self.data == "nash_md")  # Nash-MD samples the mixture with the reference

    @property
    def reference_schedule(self) -> tuple[float, int] | None:
        """(alpha, tau) of the moving reference (alpha = 1: a hard copy), or None for a frozen one. Defaults:
        alpha 0.6 (TR-DPO's soft update, the paper's and TRL's value), tau 1 (soft) or 512 (hard, TRL's
        ref_model_sync_steps)."""
        if self.reference_update == "none":
            return None
        params = self.reference_update_params
        if self.reference_update == "soft":
            return float(params.get("alpha", 0.6)), int(params.get("tau", 1))
        return 1.0, int(params.get("tau", 512))


@dataclass(frozen=True)
class RolloutConfig:
    prompts_per_step: int = 8
    group_size: int = 8
    max_new_tokens: int | None = None  # None: the task's own budget
    temperature: float = 1.0
    top_p: float = 1.0
    max_resample_tries: int = 4  # dynamic sampling: extra generation rounds before giving up
    # who samples: "native" (unipo's sampler on the trainer's model) or "vllm" (colocated vLLM, docs/vllm.md)
    engine: str = "native"
    vllm_kv_cache_gib: float = 1.0  # vLLM's KV cache (its own default would take most of the memory)
    vllm_max_model_len: int | None = None  # None: the model's context
    vllm_gpu_memory_utilization: float = 0.3  # CUDA only: vLLM's share of the GPU beside the trainer
    # importance weights for the engine/trainer log-prob mismatch (unipo.core.correction; TRL's modes): none,
    # token_truncate (TIS), token_mask, sequence_truncate, sequence_mask; bounds on the ratio (None: unbounded)
    correction: str = "none"
    correction_max: float | None = 3.0
    correction_min: float | None = None
    # user reward functions added to the task's verifier: "module:function[@weight],..." (unipo.rewards)
    reward: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_int("rollout.prompts_per_step", self.prompts_per_step, 1)
        check_int("rollout.group_size", self.group_size, 1)
        if self.max_new_tokens is not None:
            check_int("rollout.max_new_tokens", self.max_new_tokens, 1)
        check_number("rollout.temperature", self.temperature, "a finite number > 0", lambda x: x > 0)
        check_number("rollout.top_p", self.top_p, "a number in (0, 1]", lambda x: 0 < x <= 1)
        check_int("rollout.max_resample_tries", self.max_resample_tries, 0)
        check_choice("rollout.engine", self.engine, ROLLOUT_ENGINES)
        check_number("rollout.vllm_kv_cache_gib", self.vllm_kv_cache_gib, "a finite number > 0", lambda x: x > 0)
        if self.vllm_max_model_len is not None:
            check_int("rollout.vllm_max_model_len", self.vllm_max_model_len, 1)
        check_number("rollout.vllm_gpu_memory_utilization", self.vllm_gpu_memory_utilization, "a number in (0, 1]",
                     lambda x: 0 < x <= 1)
        from unipo.core.correction import CORRECTION_MODES

        check_choice("rollout.correction", self.correction, CORRECTION_MODES)
        for key in ("correction_max", "correction_min"):
            if getattr(self, key) is not None:
                check_number(f"rollout.{key}", getattr(self, key), "a finite number > 0 (or null)", lambda x: x > 0)
        from unipo.rewards import parse_reward_specs

        object.__setattr__(self, "reward", parse_reward_specs(self.reward))  # syntax only: preflight imports
        if (self.correction_min is not None and self.correction_max is not None
                and self.correction_min > self.correction_max):
            raise ValueError(f"rollout.correction_min={self.correction_min} is above rollout.correction_max="
                             f"{self.correction_max}")


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.99)
    grad_clip: float = 1.0
    warmup_steps: int = 0
    schedule: str = "constant"  # constant | cosine | linear
    micro_batch_size: int = 64  # rows per forward/backward; gradients accumulate to the full batch

    def __post_init__(self) -> None:
        check_number("optim.lr", self.lr, "a finite number > 0", lambda x: x > 0)
        check_number("optim.weight_decay", self.weight_decay, "a finite number >= 0", lambda x: x >= 0)
        if not isinstance(self.betas, (list, tuple)) or len(self.betas) != 2:
            raise _bad("optim.betas", self.betas, "two numbers in [0, 1), e.g. [0.9, 0.99]")
        for beta in self.betas:
            check_number("optim.betas", beta, "two numbers in [0, 1), e.g. [0.9, 0.99]", lambda x: 0 <= x < 1)
        object.__setattr__(self, "betas", tuple(self.betas))
        # <= 0 would zero the update or flip it into gradient ascent; inf means no clipping
        check_number("optim.grad_clip", self.grad_clip, "a number > 0 (inf: no clipping)", lambda x: x > 0,
                     allow_inf=True)
        check_int("optim.warmup_steps", self.warmup_steps, 0)
        check_choice("optim.schedule", self.schedule, SCHEDULES)
        check_int("optim.micro_batch_size", self.micro_batch_size, 1)


@dataclass(frozen=True)
class TrainConfig:
    recipe: Recipe
    task: str = "addition"
    model: str = "tiny"
    steps: int = 50
    seed: int = 0
    out: str | None = None
    device: str = "auto"
    bf16: bool = False  # autocast matmuls to bfloat16 over the stored weights (off by default; see benchmarks)
    # the dtype the weights are loaded and stored in; AdamW's moments follow the parameters' dtype (README)
    model_dtype: str = "float32"
    gradient_checkpointing: bool = False  # recompute each layer's activations in the backward pass (README)
    # under torchrun: "ddp" (every rank holds the whole model) or "fsdp" (FSDP2 shards weights, gradients and
    # AdamW's moments over the ranks); ignored in one process. docs/scaling.md
    parallel: str = "ddp"
    # a system message before every prompt (a system turn through the chat template; without one, its text and a
    # blank line before the prompt): unipo.tasks.base.SystemPrompted
    system_prompt: str | None = None
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval_every: int = 0  # 0: only at the end
    eval_problems: int = 64
    save_every: int = 25  # a checkpoint every N steps and at the end (0: only at the end); see README
    max_bad_steps: int = 3  # consecutive non-finite losses before the run stops
    lora: Mapping[str, Any] | None = None
    # where metrics go besides metrics.jsonl: "tensorboard" (RUN/tb), "wandb" (RUN/wandb); "a,b" or a list
    log: tuple[str, ...] = ("jsonl",)
    # preference pairs for recipe.data=pairs (`unipo train --data FILE`): a JSONL file, a .json/.parquet file, a
    # save_to_disk folder or a hub id (unipo.pairs.load_pairs); the task still gives held-out evaluation
    pairs: str | None = None
    # who judges fresh samples for online_pairs / self_play / nash_md, and the evaluation's win rate against the
    # reference (unipo.oracles): "task" (the task's verifier),
    # "rm:<path>" (a reward model saved by unipo.reward_model), "module:function" (user code)
    oracle: str = "task"
    # the environment of a multi-turn recipe (recipe.data=episodes; `unipo train --env NAME`, unipo.envs): its
    # episodes replace the task's prompts (the default for such a recipe: guess_number)
    env: str | None = None

    def __post_init__(self) -> None:
        for key, kind in (("recipe", Recipe), ("rollout", RolloutConfig), ("optim", OptimConfig)):
            if not isinstance(getattr(self, key), kind):
                raise _bad(key, getattr(self, key), f"a section: set {key}.<key>=value" if key != "recipe"
                           else "a section: pick one with --recipe and set recipe.<key>=value")
        for key in ("model", "out"):  # a pathlib.Path is fine: kept as its string (the config is YAML)
            if isinstance(getattr(self, key), os.PathLike):
                object.__setattr__(self, key, os.fspath(getattr(self, key)))
        check_name("task", self.task)
        check_name("model", self.model)
        if self.out is not None:
            check_name("out", self.out)
        # steps=0 is an error, not "train 0 steps" (nor the default 50): `unipo eval` evaluates without training
        check_int("steps", self.steps, 1)
        check_int("seed", self.seed, 0, _MAX_SEED - 1)
        if not isinstance(self.device, str) or not _DEVICE.fullmatch(self.device):
            raise _bad("device", self.device, DEVICE_FORMS)
        check_bool("bf16", self.bf16)
        check_choice("model_dtype", self.model_dtype, MODEL_DTYPES)
        check_bool("gradient_checkpointing", self.gradient_checkpointing)
        check_choice("parallel", self.parallel, PARALLEL_MODES)
        if self.system_prompt is not None:
            check_name("system_prompt", self.system_prompt)
        if self.parallel == "fsdp" and (self.lora is not None or self.recipe.value_coef > 0):
            what = "a LoRA adapter" if self.lora is not None else "a value head (recipe.value_coef > 0)"
            raise ValueError(f"parallel=fsdp does not shard {what} yet; use parallel=ddp")
        if self.parallel == "fsdp" and self.recipe.baseline != "none":
            from unipo.critics import BASELINES

            if getattr(BASELINES.get(self.recipe.baseline), "needs_whole_model", False):
                raise ValueError(f"recipe.baseline={self.recipe.baseline} copies the whole policy and samples from it "
                                 f"on every rank: FSDP shards it; use parallel=ddp")
        check_int("eval_every", self.eval_every, 0)
        check_int("eval_problems", self.eval_problems, 1)
        check_int("save_every", self.save_every, 0)
        check_int("max_bad_steps", self.max_bad_steps, 1)
        if self.lora is not None:
            _check_lora(self.lora)
            object.__setattr__(self, "lora", _frozen_mapping(self.lora))
        object.__setattr__(self, "log", _log_names(self.log))
        if isinstance(self.pairs, os.PathLike):
            object.__setattr__(self, "pairs", os.fspath(self.pairs))
        if self.pairs is not None:
            check_name("pairs", self.pairs)
            if self.recipe.data != "pairs":
                raise ValueError(f"pairs={self.pairs!r} is set, but recipe {self.recipe.name} does not read preference "
                                 f"pairs (recipe.data={self.recipe.data}; an offline pair recipe has data=pairs)")
        check_name("oracle", self.oracle)
        from unipo.oracles import check_oracle_spec

        check_oracle_spec(self.oracle)
        if self.recipe.data in EPISODE_SOURCES and self.env is None:
            object.__setattr__(self, "env", "guess_number")
        if self.env is not None:
            from unipo.envs import get_env

            if self.recipe.data not in EPISODE_SOURCES:
                raise ValueError(f"env={self.env!r} is set, but recipe {self.recipe.name} is single-turn "
                                 f"(recipe.data={self.recipe.data}; a multi-turn recipe has data=episodes)")
            check_name("env", self.env)
            env_cls = get_env(self.env)  # ValueError listing the environments
            if self.recipe.expert_per_group and not env_cls.has_expert:
                raise ValueError(f"recipe {self.recipe.name} replays expert demonstrations (recipe.expert_per_group="
                                 f"{self.recipe.expert_per_group}), but environment {self.env} has none")
        r, g = self.recipe, self.rollout.group_size
        for flag in ("dynamic_sampling", "zero_truncated"):  # built for single-turn rows and data=episodes only
            if getattr(r, flag) and r.data in ("tree_episodes", "turn_pairs"):
                raise ValueError(f"recipe.{flag}=true is not built for recipe.data={r.data} (recipe {r.name}); "
                                 f"it applies to single-turn rollouts and data=episodes")
        if r.data == "tree_episodes":
            from unipo.trees import tree_shape

            tree_shape(r.data_params, g)  # group_size = trees x leaves kept per tree (ValueError otherwise)
        if r.data in ("online_pairs", "self_play") and g < 2:
            raise ValueError(f"rollout.group_size={g}: recipe {r.name} judges pairs among each prompt's samples "
                             f"(recipe.data={r.data}); set rollout.group_size >= 2")
        if r.data == "turn_pairs" and g < 2:
            raise ValueError(f"rollout.group_size={g}: recipe {r.name}'s critic learns from pairs of each problem's "
                             f"episodes (recipe.data=turn_pairs); set rollout.group_size >= 2")
        if r.data == "mixed" and not r.expert_in_addition and not r.expert_batch_frac and g <= r.expert_per_group:
            raise ValueError(
                f"rollout.group_size={g} leaves no rollouts: recipe {r.name} puts recipe.expert_per_group="
                f"{r.expert_per_group} expert rows into each group of rollout.group_size rows "
                f"(recipe.expert_in_addition=false); set rollout.group_size > {r.expert_per_group} "
                f"or recipe.expert_in_addition=true")


def _selection_names(value: Any) -> tuple[str, ...]:
    """`recipe.selection` as a tuple of names. A bare string is one name only if it names a registered selection
    (else `"cppo"` would be read one character at a time)."""
    from unipo.core.selection import SELECTIONS

    valid = ", ".join(SELECTIONS)
    if isinstance(value, str):
        if value not in SELECTIONS:
            raise _bad("recipe.selection", value, f"a list of selection names (valid: {valid})")
        return (value,)
    if not isinstance(value, (list, tuple)) or not all(isinstance(name, str) for name in value):
        raise _bad("recipe.selection", value, f"a list of selection names (valid: {valid})")
    return tuple(value)


def _log_names(value: Any) -> tuple[str, ...]:
    """`log` as ("jsonl", <trackers in the order given>): "tensorboard,wandb" and [tensorboard, wandb] alike."""
    allowed = f"some of {', '.join(LOGGERS)} (e.g. tensorboard,wandb)"
    names = value.split(",") if isinstance(value, str) else value
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise _bad("log", value, allowed)
    names = [n.strip() for n in names if n.strip()]
    if any(n not in LOGGERS for n in names):
        raise _bad("log", value, allowed)
    return tuple(dict.fromkeys(["jsonl", *names]))


def _check_lora(lora: Any) -> None:
    check_mapping("lora", lora)
    unknown = sorted(set(lora) - set(LORA_KEYS))
    if unknown:
        raise ValueError(f"lora: unknown option(s) {unknown}; valid: {', '.join(LORA_KEYS)}")
    if "r" in lora:
        check_int("lora.r", lora["r"], 1)
    if "alpha" in lora:
        check_number("lora.alpha", lora["alpha"], "a finite number > 0", lambda x: x > 0)
    if "dropout" in lora:
        check_number("lora.dropout", lora["dropout"], "a number in [0, 1)", lambda x: 0 <= x < 1)
    modules = lora.get("target_modules", "all-linear")
    if not (isinstance(modules, str) and modules) and not (
            isinstance(modules, (list, tuple)) and modules and all(isinstance(m, str) and m for m in modules)):
        raise _bad("lora.target_modules", modules, "a module name, a list of them, or all-linear")


def to_dict(config: Any) -> Any:
    """A plain-Python (YAML-safe) view of a config."""
    if dataclasses.is_dataclass(config):
        return {f.name: to_dict(getattr(config, f.name)) for f in fields(config)}
    if isinstance(config, Mapping):
        return {k: to_dict(v) for k, v in config.items()}
    if isinstance(config, (tuple, list)):
        return [to_dict(v) for v in config]
    return config


def from_dict(cls: type, data: Mapping[str, Any]) -> Any:
    """Rebuild a (nested) config dataclass from `to_dict`'s output."""
    if not isinstance(data, Mapping):
        raise ValueError(f"a {cls.__name__} section must be a mapping of key: value, got {_show(data)}")
    kwargs = {}
    for f in fields(cls):
        if f.name not in data:
            continue
        value = data[f.name]
        sub = _NESTED.get((cls, f.name))
        kwargs[f.name] = from_dict(sub, value) if sub and value is not None else value
    return cls(**kwargs)


_NESTED = {
    (TrainConfig, "recipe"): Recipe,
    (TrainConfig, "rollout"): RolloutConfig,
    (TrainConfig, "optim"): OptimConfig,
}


def config_keys(config: Any, prefix: str = "") -> list[str]:
    """Every dotted key an override may name (mapping-valued fields accept any sub-key)."""
    keys = []
    for f in fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            keys += config_keys(value, f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def apply_overrides(config: Any, overrides: Mapping[str, Any], *, parse: bool = True) -> Any:
    """`{"rollout.group_size": "4", "recipe.loss_params.eps_high": "0.3"}` -> a new config.

    Values are parsed as YAML scalars (so `4`, `0.3`, `true`, `[1, 2]` mean what they say). Every override is
    set first and the config is built (and so checked) once, so their order never matters. Any mistake (an
    unknown key, a value of the wrong type or out of range, a bad combination) is one ValueError line naming
    the dotted key; an unknown key lists the valid ones. `parse=False` takes values as they are (a config
    file's, already YAML).
    """
    data = to_dict(config)
    for key, raw in overrides.items():
        _set(config, data, str(key).split("."), raw, str(key), "", parse)  # the key is checked before its value
    try:
        return from_dict(type(config), data)
    except (ValueError, TypeError) as error:
        message = " ".join(str(error).split())  # one line, whatever the message was
        if not any(key in message for key in overrides):
            # e.g. a slot check ("recipe grpo: policy loss 'ppo_clip': unknown params ['eps_lo']"): name the keys
            keys = [k for k in overrides if k.startswith("recipe.")] if message.startswith("recipe ") else []
            message = f"{', '.join(keys or map(str, overrides))}: {message}" if overrides else message
        raise ValueError(message) from None


def parse_value(raw: str) -> Any:
    """A YAML scalar, with `3e-4` read as a number (YAML 1.1 wants `3.0e-4`). Not YAML: ValueError."""
    try:
        value = yaml.safe_load(raw)
    except (yaml.YAMLError, ValueError, TypeError, OverflowError) as error:
        problem = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(f"{_show(raw)} is not a valid value ({problem})") from None
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _parse_override(key: str, raw: Any) -> Any:
    if not isinstance(raw, str):
        return raw
    try:
        return parse_value(raw)
    except ValueError as error:
        raise ValueError(f"{key if key.isprintable() else repr(key)}: {error}") from None


def _did_you_mean(key: str, keys: list[str]) -> str:
    """" (did you mean X?)" for a key that is a field of another section (`reward` -> `rollout.reward`) or a near
    miss of a valid key (`rollout.temprature` -> `rollout.temperature`); "" otherwise."""
    import difflib

    same_field = [k for k in keys if k.rsplit(".", 1)[-1] == key.rsplit(".", 1)[-1]]
    close = same_field or difflib.get_close_matches(key, keys, n=2, cutoff=0.8)
    return f" (did you mean {' or '.join(close)}?)" if close else ""


def _set(config: Any, data: dict[str, Any], path: list[str], raw: Any, full_key: str, prefix: str,
         parse: bool = True) -> None:
    """Put `raw`, parsed, at `path` in `data` (`config` as plain data), checking the key against `config`'s fields."""
    head, rest = path[0], path[1:]
    names = {f.name for f in fields(config)}
    if head not in names:
        keys = config_keys(config, prefix)
        raise ValueError(f"unknown config key {full_key!r}{_did_you_mean(full_key, keys)}; valid: {', '.join(keys)}")
    current = getattr(config, head)
    if dataclasses.is_dataclass(current):
        if not rest:
            keys = ", ".join(config_keys(current, f"{prefix}{head}."))
            raise ValueError(f"config key {full_key!r} is a section, not a value; set one of: {keys}")
        _set(current, data[head], rest, raw, full_key, f"{prefix}{head}.", parse)
    elif not rest:
        data[head] = _parse_override(full_key, raw) if parse else raw
    elif isinstance(current, Mapping) or current is None:
        if len(rest) != 1:
            raise ValueError(f"config key {full_key!r} nests too deep")
        if not isinstance(data[head], Mapping) and data[head] is not None:
            raise ValueError(f"config key {full_key!r}: {prefix}{head} was set to {_show(data[head])}, not a mapping")
        data[head] = {**(data[head] or {}), rest[0]: _parse_override(full_key, raw) if parse else raw}
    else:
        raise ValueError(f"config key {full_key!r}: {prefix}{head} is a plain value, not a section")


def dump_yaml(config: Any) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)


def load_config_file(path: str | os.PathLike, *, recipe: str | None = None) -> TrainConfig:
    """A TrainConfig from a YAML file: a run's config.yaml, `unipo recipes show NAME --yaml`, or any subset of
    their keys (the rest keep their defaults; a dotted key `rollout.group_size: 4` works too).

    `recipe:` is a registered recipe's name, or a mapping that starts from the registered recipe it names (a
    recipe that is not registered must give every key, as a run's config.yaml does); a mapping value
    (`loss_params`, `lora`, ...) replaces the whole mapping. `recipe`, when given (--recipe), replaces the file's
    recipe section. Each mistake is one ValueError line naming the file and the key.
    """
    from unipo.recipes import RECIPES

    name = os.fspath(path)
    try:
        with open(name, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except FileNotFoundError:
        raise ValueError(f"config file {name!r} does not exist") from None
    except IsADirectoryError:
        raise ValueError(f"config file {name!r} is a folder, not a YAML file") from None
    except UnicodeDecodeError as error:
        raise ValueError(f"{name}: not UTF-8 text (byte {error.start + 1})") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ValueError(f"{name}: not valid YAML: {getattr(error, 'problem', None) or error}{where}") from None
    data = {} if data is None else data  # an empty file (or only comments): every default
    if not isinstance(data, Mapping):
        raise ValueError(f"{name}: expected a mapping of key: value at the top, got a {type(data).__name__}")
    data = {str(k): v for k, v in data.items()}
    section = data.pop("recipe", None)
    try:
        given: dict[str, Any] = {}
        if recipe is not None or section is None or isinstance(section, str):
            base = RECIPES.get(recipe or section or "grpo")  # grpo: the --recipe default
        elif isinstance(section, Mapping):
            given = {str(k): v for k, v in section.items()}
            label = given.get("name")
            check_name("recipe.name", label)
            if label in RECIPES:
                base = RECIPES.get(label)
            else:  # a custom recipe: starting it from grpo's defaults would hide a misspelt name
                missing = [f.name for f in fields(Recipe) if f.name not in given]
                if missing:
                    shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
                    raise ValueError(f"recipe {label!r} is not a registered recipe, so the file must give every "
                                     f"recipe key (missing: {shown}); registered: {', '.join(RECIPES)}")
                base = Recipe(name=label)
        else:
            raise _bad("recipe", section, "a recipe name or a mapping of recipe keys")
        config = TrainConfig(recipe=base)
        flat: dict[str, Any] = {}
        _flatten(config, data, "", flat)
        flat.update({f"recipe.{key}": value for key, value in given.items()})
        return apply_overrides(config, flat, parse=False)
    except ValueError as error:
        raise ValueError(f"{name}: {error}") from None


def _flatten(config: Any, data: Mapping[str, Any], prefix: str, flat: dict[str, Any]) -> None:
    """Nested sections as dotted keys (`{"rollout": {"group_size": 4}}` -> `{"rollout.group_size": 4}`)."""
    names = {f.name for f in fields(config)}
    for key, value in data.items():
        key = str(key)
        current = getattr(config, key) if key in names else None
        if dataclasses.is_dataclass(current) and isinstance(value, Mapping):
            _flatten(current, value, f"{prefix}{key}.", flat)
        else:
            flat[f"{prefix}{key}"] = value
