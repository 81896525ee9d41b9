"""Frozen configuration: a recipe (one choice per estimator slot) plus how to run it.

A `Recipe` names what the papers differ on; `TrainConfig` names what a run differs on
(model, task, budget, seed). Both are frozen: derived values are properties, validation
happens in `__post_init__`, and nothing is mutated while training.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import yaml

DATA_SOURCES = ("on_policy", "mixed", "expert")


def _frozen_mapping(value: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return types.MappingProxyType(dict(value or {}))


@dataclass(frozen=True)
class Recipe:
    """One choice per slot of the unified policy-gradient estimator.

    grad = sum mask * weight * A * grad(pi) / denom, where
    - `data` picks the rows: the model's rollouts, expert traces, or both;
    - `advantage` picks A; `loss` picks the ratio/denominator and clipping;
    - `selection` picks the mask/weight (token and sample selection, in order);
    - `aggregation` says how per-token losses become one number;
    - `mixer` says, per row and step, how much of the RL loss and of the SFT loss it gets
      (this is where CHORD's schedule and HPT's gate live).
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
    # a baseline that carries state across steps ("none" | "spo_tracker": SPO's per-prompt Beta tracker);
    # an advantage that reads the `baseline` input needs one
    baseline: str = "none"
    baseline_params: Mapping[str, Any] = field(default_factory=dict)
    # regularisers
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    entropy_coef: float = 0.0
    # value head (PPO with GAE)
    value_coef: float = 0.0
    # update schedule: each generation batch is shuffled and split into `mini_batches` parts, one
    # optimizer step each, for `epochs` passes (epochs * mini_batches updates per rollout batch).
    # TRL: steps_per_generation = mini_batches, num_iterations = epochs. verl: ppo_mini_batch_size =
    # rows / mini_batches (counted in prompts there), ppo_epochs = epochs. From the second update on,
    # pi_theta != pi_old and the ratio, clipping and trust regions act.
    mini_batches: int = 1
    epochs: int = 1

    def __post_init__(self) -> None:
        for name in ("advantage_params", "loss_params", "selection_params", "mixer_params", "baseline_params"):
            object.__setattr__(self, name, _frozen_mapping(getattr(self, name)))
        object.__setattr__(self, "selection", tuple(self.selection))
        object.__setattr__(self, "hint_fractions", tuple(self.hint_fractions))
        if self.data not in DATA_SOURCES:
            raise ValueError(f"recipe {self.name}: data must be one of {DATA_SOURCES}, got {self.data!r}")
        if self.data == "on_policy" and self.expert_per_group:
            raise ValueError(f"recipe {self.name}: expert_per_group needs data='mixed' or 'expert'")
        if self.sft_weighting not in ("uniform", "phi"):
            raise ValueError(f"recipe {self.name}: sft_weighting must be 'uniform' or 'phi'")
        if self.reward_scale not in ("unit", "signed"):
            raise ValueError(f"recipe {self.name}: reward_scale must be 'unit' or 'signed', got {self.reward_scale!r}")
        if not 0.0 <= self.expert_batch_frac < 1.0:
            raise ValueError(f"recipe {self.name}: expert_batch_frac must be in [0, 1)")
        if self.expert_batch_frac and self.data != "mixed":
            raise ValueError(f"recipe {self.name}: expert_batch_frac needs data='mixed'")
        if not self.prompt_multiplier >= 1.0:
            raise ValueError(f"recipe {self.name}: prompt_multiplier must be >= 1")
        if "{hint}" not in self.hint_template:
            raise ValueError(f"recipe {self.name}: hint_template must contain {{hint}}")
        if not 0.0 <= self.overlong_buffer_frac < 1.0:
            raise ValueError(f"recipe {self.name}: overlong_buffer_frac must be in [0, 1)")
        for knob in ("epochs", "mini_batches"):
            value = getattr(self, knob)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"recipe {self.name}: {knob} must be an int >= 1, got {value!r}")
        from unipo.slots import check_recipe  # the slot registries import the core maths: load them lazily

        check_recipe(self)

    @property
    def uses_expert(self) -> bool:
        return self.data != "on_policy" or bool(self.hint_fractions)

    @property
    def updates_per_batch(self) -> int:
        """Optimizer steps taken on one generation batch (1: the ratio is exactly 1, pi_old == pi)."""
        return self.epochs * self.mini_batches

    @property
    def needs_reference(self) -> bool:
        return self.kl_coef > 0 or self.loss == "a_star_po"


@dataclass(frozen=True)
class RolloutConfig:
    prompts_per_step: int = 8
    group_size: int = 8
    max_new_tokens: int | None = None  # None: the task's own budget
    temperature: float = 1.0
    top_p: float = 1.0
    max_resample_tries: int = 4  # dynamic sampling: extra generation rounds before giving up

    def __post_init__(self) -> None:
        if self.prompts_per_step < 1 or self.group_size < 1:
            raise ValueError("rollout.prompts_per_step and rollout.group_size must be >= 1")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"rollout.top_p must be in (0, 1], got {self.top_p}")
        if self.temperature <= 0:
            raise ValueError(f"rollout.temperature must be > 0, got {self.temperature}")


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
        object.__setattr__(self, "betas", tuple(self.betas))
        if self.schedule not in ("constant", "cosine", "linear"):
            raise ValueError(f"optim.schedule must be constant, cosine or linear, got {self.schedule!r}")
        if self.micro_batch_size < 1:
            raise ValueError("optim.micro_batch_size must be >= 1")


@dataclass(frozen=True)
class TrainConfig:
    recipe: Recipe
    task: str = "addition"
    model: str = "tiny"
    steps: int = 50
    seed: int = 0
    out: str | None = None
    device: str = "auto"
    bf16: bool = False  # autocast matmuls to bfloat16 (off by default; see benchmarks)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval_every: int = 0  # 0: only at the end
    eval_problems: int = 64
    save_every: int = 0  # 0: only at the end
    max_bad_steps: int = 3  # consecutive non-finite losses before the run stops
    lora: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.lora is not None:
            object.__setattr__(self, "lora", _frozen_mapping(self.lora))
        if self.steps < 0:
            raise ValueError("steps must be >= 0")


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


def apply_overrides(config: Any, overrides: Mapping[str, str]) -> Any:
    """`{"rollout.group_size": "4", "recipe.loss_params.eps_high": "0.3"}` -> a new config.

    Values are parsed as YAML scalars (so `4`, `0.3`, `true`, `[1, 2]` mean what they say).
    An unknown key raises ValueError listing the valid ones.
    """
    for key, raw in overrides.items():
        config = _override(config, key.split("."), parse_value(raw) if isinstance(raw, str) else raw, key, "")
    return config


def parse_value(raw: str) -> Any:
    """A YAML scalar, with `3e-4` read as a number (YAML 1.1 wants `3.0e-4`)."""
    value = yaml.safe_load(raw)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _override(config: Any, path: list[str], value: Any, full_key: str, prefix: str) -> Any:
    head, rest = path[0], path[1:]
    names = {f.name for f in fields(config)}
    if head not in names:
        valid = ", ".join(config_keys(config, prefix))
        raise ValueError(f"unknown config key {full_key!r}; valid: {valid}")
    current = getattr(config, head)
    if not rest:
        return dataclasses.replace(config, **{head: value})
    if dataclasses.is_dataclass(current):
        return dataclasses.replace(config, **{head: _override(current, rest, value, full_key, f"{prefix}{head}.")})
    if isinstance(current, Mapping) or current is None:
        if len(rest) != 1:
            raise ValueError(f"config key {full_key!r} nests too deep")
        return dataclasses.replace(config, **{head: {**(current or {}), rest[0]: value}})
    raise ValueError(f"config key {full_key!r}: {head} is a plain value, not a section")


def dump_yaml(config: Any) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)
