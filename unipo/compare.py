"""`unipo compare`: recipes trained from one shared warm start per seed, compared on held-out problems.

For every seed: the model (`tiny`: built with that seed; any other: loaded, the same for every seed) is warm-started
with a brief SFT on the task's demonstrations (stopped once pass@8 on train-split validation problems reaches
`warm_target_pass8`, or after `warm_steps`; 0 steps: no warm start) and saved; every recipe then trains `steps`
steps from those saved weights with the same rollout and optimiser settings (`key=value` overrides apply to every
run). Every run is scored on the same held-out problems: greedy accuracy along the way (the learning curve, from
step 0 = the warm start) and at the end greedy accuracy, pass@k and the mean greedy response length.

Outputs (under `out`): `<name>.json` (every number and setting), `<name>.md` (the table and settings),
`<name>.png` (learning curves with spread bands) and the warm starts (reused while their settings match).
The table gives mean ± sample std over seeds, the gain over the warm start and the difference against the
baseline recipe, both paired by seed (mean ± std of the per-seed differences).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unipo.config import check_int, check_number

# Rough relative cost per step (ghpo re-rolls failed groups, dapo refills): slow jobs go first in a pool.
_COST = {"ghpo": 3, "dapo": 3}
HISTORY_KEYS = ("reward_mean", "accuracy", "response_len_mean", "loss", "sft_loss", "entropy", "step_seconds",
                "clip_frac", "actor/ratio_max", "actor/updates", "actor/skipped_updates",
                "mix/mu", "mix/sft_prompt_frac", "rollout/generation_rounds")
# (key, column title) of the table's per-run figures
METRICS = (("accuracy", "held-out acc (greedy)"), ("pass@1", "pass@1"), ("pass@8", "pass@8"),
           ("response_len_mean", "resp len"), ("clip_frac", "clip frac"), ("train_seconds", "train s"))
# what the warm start takes from the runs' overrides (the rest is the RL phase's)
_WARM_KEYS = ("device", "model_dtype", "bf16", "gradient_checkpointing")
# `unipo compare --quick` (the test suite's mode): small batches, a short warm start, few held-out problems
QUICK = {"prompts_per_step": 2, "group_size": 4, "warm_steps": 40, "warm_prompts": 64, "warm_min_steps": 20,
         "warm_val_problems": 16, "warm_warmup_steps": 5, "eval_problems": 24, "curve_points": 4}


@dataclass(frozen=True)
class CompareConfig:
    recipes: tuple[str, ...] = ("grpo", "luffy", "chord")
    seeds: tuple[int, ...] = (0, 1)
    steps: int = 20
    task: str = "sort"
    model: str = "tiny"
    baseline: str | None = None  # the recipe the others are differenced against (None: the first)
    # RL phase: identical for every recipe (then `overrides`, key=value as `unipo train` takes them)
    prompts_per_step: int = 8
    group_size: int = 8  # rows per prompt (luffy: expert row included)
    temperature: float = 1.0
    lr: float = 1e-4
    micro_batch_size: int = 64
    overrides: Mapping[str, Any] = field(default_factory=dict)
    # warm start: SFT on the task's demonstrations (its own prompt stream: seed + warm_seed_offset), stopped at the
    # first check where pass@8 on validation problems (train split, never the held-out ones) reaches
    # warm_target_pass8, or after warm_steps (warm_target_pass8 <= 0: fixed length; warm_steps 0: none)
    warm_steps: int = 200
    warm_target_pass8: float = 0.2
    warm_check_every: int = 5
    warm_min_steps: int = 20
    warm_val_problems: int = 100
    warm_prompts: int = 128
    warm_lr: float | None = None  # None: 3e-3 for tiny models, 1e-5 otherwise
    warm_warmup_steps: int = 20
    warm_seed_offset: int = 1000
    # evaluation: the same held-out problems (eval_seed) for every run
    eval_problems: int = 300
    eval_seed: int = 0
    ks: tuple[int, ...] = (1, 8)
    curve_points: int = 5  # greedy held-out accuracy this many times along the run (plus step 0)
    workers: int = 1  # parallel runs (a spawn pool, one torch thread each); 1: in this process
    out: str = "runs/compare"
    name: str = "compare"  # the output files' stem
    warm_dir: str = "warm_starts"  # where warm starts are saved, under `out` (unless absolute)

    def __post_init__(self) -> None:
        from unipo.recipes import RECIPES

        for key in ("recipes", "seeds", "ks"):
            value = getattr(self, key)
            object.__setattr__(self, key, tuple(value) if isinstance(value, (list, tuple)) else value)
        if not self.recipes or not all(isinstance(r, str) for r in self.recipes):
            raise ValueError(f"recipes must be a list of recipe names, got {self.recipes!r}")
        unknown = [r for r in self.recipes if r not in RECIPES]
        if unknown:
            raise ValueError(f"unknown recipe(s) {unknown}; valid: {', '.join(RECIPES)}")
        if len(set(self.recipes)) != len(self.recipes):
            raise ValueError(f"recipes lists a recipe twice: {', '.join(self.recipes)}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct, at least one, got {self.seeds!r}")
        for seed in self.seeds:
            check_int("seed", seed, 0)
        object.__setattr__(self, "baseline", self.baseline or self.recipes[0])
        if self.baseline not in self.recipes:
            raise ValueError(f"--baseline {self.baseline!r} is not among the recipes ({', '.join(self.recipes)})")
        for key in ("steps", "prompts_per_step", "group_size", "micro_batch_size", "warm_check_every",
                    "warm_val_problems", "warm_prompts", "eval_problems", "curve_points", "workers"):
            check_int(key, getattr(self, key), 1)
        for key in ("warm_steps", "warm_min_steps", "warm_warmup_steps", "warm_seed_offset", "eval_seed"):
            check_int(key, getattr(self, key), 0)
        if not self.ks or not all(isinstance(k, int) and k >= 1 for k in self.ks):
            raise ValueError(f"ks must be ints >= 1, got {self.ks!r}")
        check_number("lr", self.lr, "a finite number > 0", lambda x: x > 0)
        if self.warm_lr is not None:
            check_number("warm_lr", self.warm_lr, "a finite number > 0", lambda x: x > 0)
        check_number("warm_target_pass8", self.warm_target_pass8, "a number <= 1", lambda x: x <= 1)
        object.__setattr__(self, "overrides", dict(self.overrides))
        for recipe in self.recipes:  # every run's config builds: a bad key=value is one line before anything runs
            self.run_config(recipe, self.seeds[0])

    # -- derived -----------------------------------------------------------------------------------------------
    @property
    def is_tiny(self) -> bool:
        return self.model == "tiny" or self.model.startswith("tiny:")

    @property
    def warm_root(self) -> Path:
        return Path(self.out) / self.warm_dir

    def warm_path(self, seed: int) -> Path:
        return self.warm_root / f"warmstart-seed{seed}"

    def start_model(self, seed: int) -> str:
        """What every run of this seed loads: the saved warm start, or the model itself without one."""
        return str(self.warm_path(seed)) if self.warm_steps else self.model

    def warm_settings(self, seed: int) -> dict[str, Any]:
        keys = ("task", "model", "warm_steps", "warm_prompts", "warm_lr", "warm_warmup_steps", "warm_seed_offset",
                "warm_target_pass8", "warm_check_every", "warm_min_steps", "warm_val_problems",
                "eval_problems", "eval_seed", "ks", "temperature")
        warm_overrides = {k: v for k, v in self.overrides.items() if k in _WARM_KEYS}
        return {"seed": seed, **{k: _plain(getattr(self, k)) for k in keys}, "overrides": warm_overrides}

    def curve_steps(self) -> list[int]:
        n = max(1, min(self.curve_points, self.steps))
        return sorted({max(1, round(self.steps * i / n)) for i in range(1, n + 1)})

    def run_config(self, recipe_name: str, seed: int):
        """The TrainConfig of one (recipe, seed) run."""
        from unipo.config import OptimConfig, RolloutConfig, TrainConfig, apply_overrides
        from unipo.recipes import get_recipe

        config = TrainConfig(recipe=get_recipe(recipe_name), task=self.task, model=self.start_model(seed),
                             steps=self.steps, seed=seed, eval_problems=self.eval_problems,
                             rollout=RolloutConfig(prompts_per_step=self.prompts_per_step, group_size=self.group_size,
                                                   temperature=self.temperature),
                             optim=OptimConfig(lr=self.lr, micro_batch_size=self.micro_batch_size))
        return apply_overrides(config, self.overrides)

    def warm_config(self, seed: int):
        from unipo.config import OptimConfig, RolloutConfig, TrainConfig, apply_overrides
        from unipo.recipes import get_recipe

        lr = self.warm_lr if self.warm_lr is not None else (3e-3 if self.is_tiny else 1e-5)
        config = TrainConfig(recipe=get_recipe("sft"), task=self.task, model=self.model, steps=max(1, self.warm_steps),
                             seed=seed + self.warm_seed_offset,
                             rollout=RolloutConfig(prompts_per_step=self.warm_prompts, group_size=1),
                             optim=OptimConfig(lr=lr, micro_batch_size=min(256, self.warm_prompts),
                                               warmup_steps=self.warm_warmup_steps))
        return apply_overrides(config, {k: v for k, v in self.overrides.items() if k in _WARM_KEYS})


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def group_composition(name: str, group_size: int) -> str:
    """What one prompt's rows are, and how many optimizer steps one generation batch gets, for the report."""
    from unipo.recipes import get_recipe

    r = get_recipe(name)
    schedule = (f"; {r.updates_per_batch} optimizer step(s) per batch "
                f"({r.mini_batches} mini-batches x {r.epochs} epochs)")
    return _rows_per_prompt(r, group_size) + schedule


def _rows_per_prompt(r, g: int) -> str:
    if r.data == "expert":
        return f"{r.expert_per_group} expert trace (SFT), no rollouts"
    if r.data == "mixed":
        if r.expert_batch_frac:
            return (f"{g} rollouts; plus expert traces of other prompts, {r.expert_batch_frac:.0%} of the batch's "
                    f"rows (SFT/mixer rows)")
        where = "in the advantage group" if r.expert_in_group else "outside the group (SFT/mixer rows)"
        if r.mixer_params.get("expert_rows") is False:
            where = "as the calibration baseline only (not trained on)"
        rollouts = g if r.expert_in_addition else g - r.expert_per_group
        return f"{rollouts} rollouts + {r.expert_per_group} expert trace {where}"
    if r.data != "on_policy":
        return f"data source {r.data}"
    extra = f"; all-fail groups re-rolled with expert-prefix hints {list(r.hint_fractions)}" \
        if r.hint_fractions else ""
    extra += "; dynamic sampling refills with mixed-accuracy groups" if r.dynamic_sampling else ""
    return f"{g} rollouts{extra}"


# -- jobs (in pool workers, or in this process) -----------------------------------------------------------------
def _worker_init() -> None:
    import torch

    torch.set_num_threads(1)  # a small model is faster single-threaded, and runs share the cores
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except Exception:  # noqa: BLE001 - cosmetic only
        pass


def _evaluate(model, tokenizer, task, cfg: CompareConfig, ks: tuple[int, ...]) -> dict[str, float]:
    from unipo.evaluation import evaluate_model

    return evaluate_model(model, tokenizer, task, n=cfg.eval_problems, ks=ks, seed=cfg.eval_seed,
                          max_new_tokens=task.max_new_tokens, temperature=cfg.temperature)


class _TrainSplit:
    """A task seen through its train split: validation problems for the warm start's stopping rule."""

    def __init__(self, task) -> None:
        self.task, self.name, self.max_new_tokens = task, task.name, task.max_new_tokens
        self.scorer_is_safe = task.scorer_is_safe

    def sample(self, n: int, *, seed: int, split: str = "train"):
        return self.task.sample(n, seed=seed, split="train")

    def score(self, problem, completion: str) -> float:
        return self.task.score(problem, completion)

    def check_score(self, value: object) -> float:
        return self.task.check_score(value)


def _initial_model(cfg: CompareConfig, seed: int, config):
    from unipo.models import build_tiny_model, load_model

    if cfg.is_tiny:  # a fresh initialisation per seed
        size = cfg.model.partition(":")[2] or "tiny"
        return build_tiny_model(size, seed=seed, dtype=config.model_dtype)
    return load_model(cfg.model, device=config.device, dtype=config.model_dtype, lora=config.lora)


def warm_start_job(cfg: CompareConfig, seed: int, fresh: bool = False) -> dict[str, Any]:
    """SFT the seed's initial model briefly and save it; reuse a saved one with identical settings."""
    from unipo.evaluation import evaluate_model
    from unipo.models import save_model
    from unipo.tasks.base import get_task
    from unipo.trainer import Trainer

    path, settings = cfg.warm_path(seed), cfg.warm_settings(seed)
    meta_file = path / "warmstart.json"
    if not fresh and meta_file.exists() and (path / "config.json").exists():
        meta = json.loads(meta_file.read_text())
        if meta.get("settings") == settings:
            return {**meta, "reused": True}
    started = time.perf_counter()
    config = cfg.warm_config(seed)
    model, tokenizer = _initial_model(cfg, seed, config)
    task = get_task(cfg.task)
    trainer = Trainer(config, model=model, tokenizer=tokenizer, progress=False)
    checks = []
    while trainer.step < cfg.warm_steps:
        trainer.history.append(trainer.train_step().metrics)
        if cfg.warm_target_pass8 > 0 and trainer.step >= cfg.warm_min_steps and \
                trainer.step % cfg.warm_check_every == 0:
            check = evaluate_model(model, tokenizer, _TrainSplit(task), n=cfg.warm_val_problems, ks=(8,),
                                   seed=cfg.eval_seed + 1, max_new_tokens=task.max_new_tokens,
                                   temperature=cfg.temperature)
            checks.append({"step": trainer.step, **check})
            if check["pass@8"] >= cfg.warm_target_pass8:
                break
    seconds = time.perf_counter() - started
    evaluation = _evaluate(model, tokenizer, task, cfg, cfg.ks)
    path.mkdir(parents=True, exist_ok=True)
    save_model(model, tokenizer, path)
    meta = {"seed": seed, "path": str(path), "settings": settings, "steps": trainer.step, "eval": evaluation,
            "train_seconds": seconds, "validation_checks": checks}
    meta_file.write_text(json.dumps(meta, indent=1))
    return {**meta, "reused": False}


def start_job(cfg: CompareConfig, seed: int) -> dict[str, Any]:
    """Without a warm start (warm_steps 0): the model itself is every run's start, evaluated once per seed."""
    from unipo.tasks.base import get_task

    config = cfg.run_config(cfg.recipes[0], seed)
    model, tokenizer = _initial_model(cfg, seed, config)
    return {"seed": seed, "path": cfg.model, "settings": {}, "steps": 0, "train_seconds": 0.0,
            "eval": _evaluate(model, tokenizer, get_task(cfg.task), cfg, cfg.ks), "reused": False}


def train_job(cfg: CompareConfig, recipe_name: str, seed: int) -> dict[str, Any]:
    """Train one recipe from the seed's start; evaluate along the way and at the end."""
    from unipo.models import load_model
    from unipo.tasks.base import get_task
    from unipo.trainer import NonFiniteLossError, Trainer

    started = time.perf_counter()
    config = cfg.run_config(recipe_name, seed)
    if cfg.warm_steps:
        model, tokenizer = load_model(config.model, device=config.device, dtype=config.model_dtype, lora=config.lora)
    else:
        model, tokenizer = _initial_model(cfg, seed, config)
    task = get_task(cfg.task)
    trainer = Trainer(config, model=model, tokenizer=tokenizer, progress=False)
    curve_at = set(cfg.curve_steps())
    curve: list[dict[str, float]] = []
    train_seconds, error = 0.0, None
    try:
        # Trainer.fit's loop, with our own evaluation points (greedy accuracy on the held-out set).
        while trainer.step < cfg.steps:
            t0 = time.perf_counter()
            result = trainer.train_step()
            train_seconds += time.perf_counter() - t0
            trainer.history.append(result.metrics)
            if trainer.bad_steps >= config.max_bad_steps:
                raise NonFiniteLossError(f"{trainer.bad_steps} non-finite steps in a row at step {trainer.step}")
            if trainer.step in curve_at and trainer.step < cfg.steps:
                curve.append({"step": trainer.step, **_evaluate(model, tokenizer, task, cfg, (1,))})
    except Exception as exc:  # noqa: BLE001 - one failed run is reported, not fatal to the comparison
        error = f"{type(exc).__name__}: {exc}"
    final = _evaluate(model, tokenizer, task, cfg, cfg.ks)
    curve.append({"step": trainer.step, **final})
    history = [{k: _round(m.get(k)) for k in HISTORY_KEYS if k in m} for m in trainer.history]
    return {"recipe": recipe_name, "seed": seed, "family": config.recipe.family, "final": final, "curve": curve,
            "history": history, "train_seconds": train_seconds, "wall_seconds": time.perf_counter() - started,
            "steps_done": trainer.step, "error": error}


def _round(value: Any) -> Any:
    return None if value is None else round(float(value), 5)


def _dispatch(job: tuple) -> dict[str, Any]:
    kind, *args = job
    return {"warm": warm_start_job, "start": start_job, "run": train_job}[kind](*args)


def _run_jobs(jobs: list[tuple], bar, pool) -> list[dict[str, Any]]:
    results = []
    iterator = pool.imap_unordered(_dispatch, jobs) if pool is not None else map(_dispatch, jobs)
    for result in iterator:
        results.append(result)
        label = f"{result['recipe']}/seed{result['seed']}" if "recipe" in result else f"start seed{result['seed']}"
        if "final" in result:
            label += f" acc={result['final']['accuracy']:.3f}"
        bar.set_postfix_str(label)
        bar.update(1)
    return results


# -- the comparison -----------------------------------------------------------------------------------------------
def run_compare(cfg: CompareConfig, *, progress: bool = True, fresh_warm_start: bool = False,
                command: str | None = None) -> dict[str, Any]:
    """Warm starts, then every (recipe, seed) run; returns (and writes) the summary dict."""
    from tqdm.auto import tqdm

    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    pool = None
    if cfg.workers > 1:
        import multiprocessing as mp

        pool = mp.get_context("spawn").Pool(cfg.workers, initializer=_worker_init)
    else:
        _worker_init()
    kind = "warm" if cfg.warm_steps else "start"
    starts = [(kind, cfg, s, fresh_warm_start) if kind == "warm" else (kind, cfg, s) for s in cfg.seeds]
    jobs = [("run", cfg, r, s) for r in cfg.recipes for s in cfg.seeds]
    jobs.sort(key=lambda j: -_COST.get(j[2], 1))  # stable: slow recipes first, then the given order
    bar = tqdm(total=len(starts) + len(jobs), desc=f"compare ({len(cfg.seeds)} starts, {len(jobs)} runs)",
               disable=not progress, dynamic_ncols=True, unit="run")
    try:
        warm = _run_jobs(starts, bar, pool)
        runs = _run_jobs(jobs, bar, pool)
    finally:
        bar.close()
        if pool is not None:
            pool.close()
            pool.join()
    summary = summarise(cfg, warm, runs, time.perf_counter() - started, command)
    write_outputs(cfg, summary)
    return summary


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value; NaN for none) of the finite values."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _run_value(run: dict[str, Any], key: str) -> float:
    """A run's figure for the table: timing and the clip fraction (mean over its steps) from training, the rest
    from the final evaluation."""
    if key == "train_seconds":
        return run["train_seconds"]
    if key == "clip_frac":
        values = [m["clip_frac"] for m in run["history"] if m.get("clip_frac") is not None]
        return statistics.fmean(values) if values else math.nan
    return run["final"].get(key, math.nan)


def summarise(cfg: CompareConfig, warm: list[dict], runs: list[dict], total_seconds: float,
              command: str | None) -> dict[str, Any]:
    import torch

    warm = sorted(warm, key=lambda w: w["seed"])
    start_acc = {w["seed"]: w["eval"]["accuracy"] for w in warm}
    by_recipe = {name: sorted((r for r in runs if r["recipe"] == name), key=lambda r: r["seed"])
                 for name in cfg.recipes}
    base_acc = {r["seed"]: r["final"]["accuracy"] for r in by_recipe[cfg.baseline] if not r["error"]}
    rows = []
    warm_row = {"recipe": "warm start (step 0)" if cfg.warm_steps else "start (step 0)", "family": "-",
                "n_seeds": len(warm), "errors": []}
    for key, _ in METRICS:
        values = [w["train_seconds"] if key == "train_seconds" else w["eval"].get(key, math.nan) for w in warm]
        warm_row[key], warm_row[f"{key}_std"] = mean_std(values)
    rows.append(warm_row)
    for name, mine in by_recipe.items():
        row = {"recipe": name, "family": mine[0]["family"] if mine else "?", "n_seeds": len(mine),
               "errors": [r["error"] for r in mine if r["error"]]}
        for key, _ in METRICS:
            row[key], row[f"{key}_std"] = mean_std([_run_value(r, key) for r in mine])
        # paired by seed: each run against its own seed's warm start, and against the baseline's run of that seed
        row["gain"], row["gain_std"] = mean_std([r["final"]["accuracy"] - start_acc[r["seed"]] for r in mine])
        row["delta"], row["delta_std"] = mean_std([r["final"]["accuracy"] - base_acc[r["seed"]] for r in mine
                                                   if r["seed"] in base_acc and not r["error"]])
        rows.append(row)
    curves = {}
    for name, mine in by_recipe.items():
        steps = sorted({p["step"] for r in mine for p in r["curve"]})
        points = []
        for step in [0, *steps]:
            if step == 0:
                vals = [start_acc[r["seed"]] for r in mine]
            else:
                vals = [p["accuracy"] for r in mine for p in r["curve"] if p["step"] == step]
            m, s = mean_std(vals)
            points.append({"step": step, "accuracy": m, "std": s, "n": len(vals)})
        curves[name] = points
    example = cfg.run_config(cfg.recipes[0], cfg.seeds[0])
    return {
        "study": f"{', '.join(cfg.recipes)} on {cfg.task} from a shared warm start per seed",
        "command": command,
        "settings": {k: _plain(v) for k, v in dataclasses.asdict(cfg).items()},
        "baseline": cfg.baseline,
        "rollout_config": dataclasses.asdict(example.rollout),
        "optim_config": dataclasses.asdict(example.optim),
        "warm_start_config": {"recipe": "sft", "prompts_per_step": cfg.warm_prompts, "group_size": 1,
                              "lr": cfg.warm_config(cfg.seeds[0]).optim.lr, "warmup_steps": cfg.warm_warmup_steps,
                              "micro_batch_size": min(256, cfg.warm_prompts), "max_steps": cfg.warm_steps,
                              "model": (f"build_tiny_model({cfg.model!r}, seed=s)" if cfg.is_tiny else cfg.model),
                              "prompt_seed": f"s + {cfg.warm_seed_offset}",
                              "steps_per_seed": {w["seed"]: w.get("steps", cfg.warm_steps) for w in warm}},
        "group_composition": {r: group_composition(r, example.rollout.group_size) for r in cfg.recipes},
        "curve_steps": [0, *cfg.curve_steps()],
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                        "workers": cfg.workers, "threads_per_worker": 1},
        "total_seconds": total_seconds,
        "table": rows,
        "curves": curves,
        "warm_starts": warm,
        "runs": sorted(runs, key=lambda r: (r["recipe"], r["seed"])),
    }


# -- outputs ------------------------------------------------------------------------------------------------------
def fmt(row: dict, key: str, *, signed: bool = False) -> str:
    """`mean ± std` as the table shows it (the JSON holds the unrounded numbers)."""
    mean, std = row.get(key, math.nan), row.get(f"{key}_std", math.nan)
    if not math.isfinite(mean):
        return "n/a"
    digits = 0 if key == "train_seconds" else 2 if key == "response_len_mean" else 3
    return f"{mean:{'+' if signed else ''}.{digits}f} ± {std:.{digits}f}"


def markdown_table(summary: dict[str, Any]) -> str:
    baseline = summary.get("baseline")
    head = ["recipe", "family", *[label for _, label in METRICS], "Δacc vs warm start"]
    head += [f"Δacc vs {baseline}"] if baseline else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in summary["table"]:
        cells = [row["recipe"], row["family"], *[fmt(row, key) for key, _ in METRICS]]
        cells.append(fmt(row, "gain", signed=True) if "gain" in row else "-")
        if baseline:
            cells.append("-" if "delta" not in row else "0 (baseline)" if row["recipe"] == baseline
                         else fmt(row, "delta", signed=True))
        if row["errors"]:
            cells[0] += f" ({len(row['errors'])} failed)"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def settings_markdown(summary: dict[str, Any]) -> str:
    s, ro, op, ws = summary["settings"], summary["rollout_config"], summary["optim_config"], \
        summary["warm_start_config"]
    warm = (f"- warm start: `{ws['model']}` + recipe `sft` on {ws['prompts_per_step']} demonstrations per step, "
            f"lr {ws['lr']} (warm-up {ws['warmup_steps']} steps), prompt stream seed s + {s['warm_seed_offset']} "
            f"(not the RL runs' stream), "
            + (f"stopped at the first check (every {s['warm_check_every']} steps from step {s['warm_min_steps']}) "
               f"where pass@8 on {s['warm_val_problems']} train-split validation problems reached "
               f"{s['warm_target_pass8']} (at most {ws['max_steps']} steps)" if s["warm_target_pass8"] > 0
               else f"{ws['max_steps']} steps")
            + f"; steps per seed: {ws['steps_per_seed']}. Saved with `save_model`, loaded by every run.") \
        if s["warm_steps"] else f"- no warm start: every run starts from `{s['model']}` (seed s)."
    lines = [
        f"- task `{s['task']}`, model `{s['model']}`, seeds {s['seeds']}; every recipe starts from the same start "
        f"per seed and trains {s['steps']} steps; figures are mean ± sample std over seeds; Δ columns are paired "
        f"by seed (mean ± std of the per-seed differences), against the start and against `{summary['baseline']}`.",
        warm,
        f"- every recipe: `RolloutConfig({', '.join(f'{k}={v}' for k, v in ro.items())})`, "
        f"`OptimConfig({', '.join(f'{k}={v}' for k, v in op.items())})`, recipe defaults otherwise"
        + (f"; overrides {s['overrides']}" if s["overrides"] else "") + ".",
        "- rows per prompt and step, and updates per generation batch (each recipe's own schedule):",
        *[f"  - `{r}`: {c}" for r, c in summary["group_composition"].items()],
        f"- evaluation: the same {s['eval_problems']} held-out (test-split) problems for every run "
        f"(`evaluate_model(..., ks={tuple(s['ks'])}, seed={s['eval_seed']})`): greedy accuracy, unbiased pass@k "
        f"from {max(s['ks'])} samples at temperature {s['temperature']}, mean greedy response length in tokens "
        f"(EOS included); learning-curve points (greedy accuracy) at steps {summary['curve_steps']}.",
        f"- train s: seconds in `Trainer.train_step` (evaluation excluded), {s['workers']} run(s) at a time on a "
        f"{summary['environment']['cores']}-core machine; the start row's train s is its SFT time.",
        f"- torch {summary['environment']['torch']}, Python {summary['environment']['python']}; "
        f"total wall time {summary['total_seconds'] / 60:.1f} min.",
    ]
    return "\n".join(lines)


def output_paths(cfg: CompareConfig) -> dict[str, Path]:
    out = Path(cfg.out)
    return {kind: out / f"{cfg.name}.{kind}" for kind in ("json", "md", "png")}


def write_outputs(cfg: CompareConfig, summary: dict[str, Any]) -> None:
    paths = output_paths(cfg)
    paths["json"].parent.mkdir(parents=True, exist_ok=True)
    paths["json"].write_text(json.dumps(summary, indent=1, default=str))
    text = "\n\n".join([f"# {summary['study']}", f"Command: `{summary['command']}`", markdown_table(summary),
                        settings_markdown(summary)]) + "\n"
    paths["md"].write_text(text)
    plot(summary, paths["png"])


def plot(summary: dict[str, Any], path: Path, smooth: int | None = None) -> None:
    """Left: held-out greedy accuracy (mean over seeds, ± std band) at the curve points. Right: train rollout
    accuracy per step (mean over seeds of a trailing moving average, ± std band)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    steps_total = summary["settings"]["steps"]
    smooth = smooth or max(1, steps_total // 10)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.6))
    styles = {"hybrid": "-", "on-policy": "--", "sft": ":"}
    for i, (name, points) in enumerate(summary["curves"].items()):
        family = next((r["family"] for r in summary["table"] if r["recipe"] == name), "")
        ls, color = styles.get(family, "-"), f"C{i}"
        steps = np.array([p["step"] for p in points], dtype=float)
        mean = np.array([p["accuracy"] for p in points], dtype=float)
        std = np.array([p["std"] for p in points], dtype=float)
        left.plot(steps, mean, ls, marker="o", ms=3, color=color, label=f"{name} ({family})")
        left.fill_between(steps, mean - std, mean + std, color=color, alpha=0.15, linewidth=0)
        runs = [r for r in summary["runs"] if r["recipe"] == name and r["history"]]
        length = min((len(r["history"]) for r in runs), default=0)
        if not length:
            continue
        per_run = np.array([[np.nan if r["history"][t].get("accuracy") is None else r["history"][t]["accuracy"]
                             for t in range(length)] for r in runs], dtype=float)
        smoothed = np.array([[np.nanmean(row[max(0, t - smooth + 1):t + 1]) if np.isfinite(
            row[max(0, t - smooth + 1):t + 1]).any() else np.nan for t in range(length)] for row in per_run])
        x = np.arange(1, length + 1)
        m = np.nanmean(smoothed, axis=0)
        s = np.nanstd(smoothed, axis=0, ddof=1) if len(runs) > 1 else np.zeros_like(m)
        right.plot(x, m, ls, color=color, label=name)
        right.fill_between(x, m - s, m + s, color=color, alpha=0.15, linewidth=0)
    n_seeds = len(summary["settings"]["seeds"])
    left.set_title(f"held-out greedy accuracy (mean ± std over {n_seeds} seeds)", fontsize=10)
    right.set_title(f"train rollout accuracy ({smooth}-step moving average, mean ± std over seeds)", fontsize=10)
    for ax in (left, right):
        ax.set_xlabel("RL step")
        low, high = ax.get_ylim()
        ax.set_ylim(max(low, -0.02), min(high, 1.02))  # accuracy: bands may not leave [0, 1]
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, ncol=2)
    left.set_ylabel("accuracy")
    fig.suptitle(f"{summary['settings']['task']} on {summary['settings']['model']}: solid = hybrid, dashed = "
                 f"on-policy, dotted = SFT; step 0 = the shared start", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
