"""Hybrid-policy RL (on-policy rollouts + off-policy expert traces) versus pure on-policy RL
when rewards are sparse, on the embedded tiny model.

    python benchmarks/hybrid_vs_onpolicy.py [--quick] [--seeds 3] [--steps 200]
        [--recipes grpo,luffy,...] [--out benchmarks/out] [--lr 1e-4] [--workers 2] [--task sort]

For every seed: build `tiny` (seed s), warm-start it with a brief SFT that leaves it weak
(stopped once validation pass@8 reaches 0.2: held-out greedy accuracy about 10%), save it, and train every
recipe from those saved weights for the same number of steps with the same rollout and
optimiser settings. Each (recipe, seed) run is one job of a 2-worker process pool (one torch
thread per worker). Every run is scored on the same held-out problems: greedy accuracy along
the way (the learning curve) and at the end greedy accuracy, pass@1 and pass@8 (8 samples at
temperature 1) and the mean greedy response length.

Outputs (under --out): hybrid_vs_onpolicy.json (every number and setting),
hybrid_vs_onpolicy.md (the table and settings), hybrid_vs_onpolicy.png (learning curves),
and hybrid_vs_onpolicy/warmstart-seed<s>/ (the saved warm starts, reused when their settings
match).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_RECIPES = ("grpo", "dapo", "dr_grpo", "gspo", "cispo", "luffy", "chord", "hpt", "ghpo", "rl_plus", "calibrl",
                   "sft")

# Study-level changes to a library recipe (dataclasses.replace), reported in every output. None are
# needed on `sort`: DAPO's 4-token overlong buffer starts punishing after 8 of the 12-token budget,
# and a correct answer takes exactly 8 tokens (4 digits, 3 spaces, EOS).
RECIPE_OVERRIDES: dict[str, dict[str, Any]] = {}

# Rough relative cost per step (ghpo re-rolls failed groups, dapo refills): slow jobs go first.
_COST = {"ghpo": 3, "dapo": 3}

HISTORY_KEYS = ("reward_mean", "accuracy", "response_len_mean", "loss", "sft_loss", "entropy", "step_seconds",
                "clip_frac", "actor/ratio_max", "actor/updates", "actor/skipped_updates",
                "mix/mu", "mix/sft_prompt_frac", "rollout/generation_rounds")


@dataclass(frozen=True)
class StudyConfig:
    task: str = "sort"  # 4 digits 0-9 -> ascending; exact match
    recipes: tuple[str, ...] = DEFAULT_RECIPES
    seeds: tuple[int, ...] = (0, 1, 2)
    # RL phase: identical for every recipe
    steps: int = 200
    prompts_per_step: int = 8
    group_size: int = 8  # rows per prompt (luffy / rl_plus: expert row included; see group_composition)
    temperature: float = 1.0
    lr: float = 1e-4  # the best of {1e-4, 3e-4, 5e-4} for grpo (3e-4 unstable, 5e-4 collapses)
    micro_batch_size: int = 64
    # warm start: SFT on the task's demonstrations (its own prompt stream: seed + warm_seed_offset),
    # stopped at the first check where pass@8 on validation problems (train split, never the held-out
    # test problems) reaches warm_target_pass8, or after warm_steps (warm_target_pass8 <= 0: fixed length)
    warm_steps: int = 200
    warm_target_pass8: float = 0.2
    warm_check_every: int = 5
    warm_min_steps: int = 20
    warm_val_problems: int = 100
    warm_prompts: int = 128
    warm_lr: float = 3e-3
    warm_warmup_steps: int = 20
    warm_seed_offset: int = 1000
    # evaluation: the same held-out problems (eval_seed) for every run
    eval_problems: int = 300
    eval_seed: int = 0
    ks: tuple[int, ...] = (1, 8)
    curve_points: int = 5  # greedy held-out accuracy this many times along the run (plus step 0)
    workers: int = 2  # <= 1: run the jobs in this process, one after the other
    out: str = "benchmarks/out"

    @property
    def study_dir(self) -> Path:
        return Path(self.out) / "hybrid_vs_onpolicy"

    def warm_path(self, seed: int) -> Path:
        return self.study_dir / f"warmstart-seed{seed}"

    def warm_settings(self, seed: int) -> dict[str, Any]:
        keys = ("task", "warm_steps", "warm_prompts", "warm_lr", "warm_warmup_steps", "warm_seed_offset",
                "warm_target_pass8", "warm_check_every", "warm_min_steps", "warm_val_problems",
                "eval_problems", "eval_seed", "ks", "temperature")
        return {"seed": seed, **{k: _plain(getattr(self, k)) for k in keys}}

    def curve_steps(self) -> list[int]:
        n = max(1, min(self.curve_points, self.steps))
        return sorted({max(1, round(self.steps * i / n)) for i in range(1, n + 1)})


QUICK = StudyConfig(recipes=("grpo", "luffy", "sft"), seeds=(0,), steps=40, eval_problems=100, curve_points=2)


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


# --------------------------------------------------------------------------------------------
# configs shared by every run


def rollout_config(cfg: StudyConfig):
    from unipo.config import RolloutConfig

    return RolloutConfig(prompts_per_step=cfg.prompts_per_step, group_size=cfg.group_size,
                         temperature=cfg.temperature)


def optim_config(cfg: StudyConfig):
    from unipo.config import OptimConfig

    return OptimConfig(lr=cfg.lr, micro_batch_size=cfg.micro_batch_size)


def study_recipe(name: str):
    from unipo.recipes import get_recipe

    recipe = get_recipe(name)
    return dataclasses.replace(recipe, **RECIPE_OVERRIDES.get(name, {}))


def group_composition(name: str, cfg: StudyConfig) -> str:
    """What one prompt's rows are, and how many optimizer steps one generation batch gets, for the report."""
    r = study_recipe(name)
    schedule = (f"; {r.updates_per_batch} optimizer step(s) per batch "
                f"({r.mini_batches} mini-batches x {r.epochs} epochs)")
    return _rows_per_prompt(r, cfg.group_size) + schedule


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
    extra = f"; all-fail groups re-rolled with expert-prefix hints {list(r.hint_fractions)}" \
        if r.hint_fractions else ""
    extra += "; dynamic sampling refills with mixed-accuracy groups" if r.dynamic_sampling else ""
    return f"{g} rollouts{extra}"


# --------------------------------------------------------------------------------------------
# jobs (run in pool workers, or in this process when workers <= 1)


def _worker_init() -> None:
    import torch

    torch.set_num_threads(1)  # the tiny model is faster single-threaded, and the box has 2 cores
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except Exception:  # noqa: BLE001 - cosmetic only
        pass


def _evaluate(model, tokenizer, task, cfg: StudyConfig, ks: tuple[int, ...]) -> dict[str, float]:
    from unipo.evaluation import evaluate_model

    return evaluate_model(model, tokenizer, task, n=cfg.eval_problems, ks=ks, seed=cfg.eval_seed,
                          max_new_tokens=task.max_new_tokens, temperature=cfg.temperature)


class TrainSplit:
    """A task seen through its train split: validation problems for the warm start's stopping rule."""

    def __init__(self, task) -> None:
        self.task, self.name, self.max_new_tokens = task, task.name, task.max_new_tokens

    def sample(self, n: int, *, seed: int, split: str = "train"):
        return self.task.sample(n, seed=seed, split="train")

    def score(self, problem, completion: str) -> float:
        return self.task.score(problem, completion)


def warm_start_job(cfg: StudyConfig, seed: int, fresh: bool = False) -> dict[str, Any]:
    """Build tiny(seed), SFT it briefly, save it; reuse a saved one with identical settings."""
    from unipo.config import OptimConfig, RolloutConfig, TrainConfig
    from unipo.evaluation import evaluate_model
    from unipo.models import build_tiny_model, save_model
    from unipo.recipes import get_recipe
    from unipo.tasks.base import get_task
    from unipo.trainer import Trainer

    path, settings = cfg.warm_path(seed), cfg.warm_settings(seed)
    meta_file = path / "warmstart.json"
    if not fresh and meta_file.exists() and (path / "config.json").exists():
        meta = json.loads(meta_file.read_text())
        if meta.get("settings") == settings:
            return {**meta, "reused": True}
    started = time.perf_counter()
    model, tokenizer = build_tiny_model("tiny", seed=seed)
    config = TrainConfig(recipe=get_recipe("sft"), task=cfg.task, model="tiny", steps=cfg.warm_steps,
                         seed=seed + cfg.warm_seed_offset, device="cpu",
                         rollout=RolloutConfig(prompts_per_step=cfg.warm_prompts, group_size=1),
                         optim=OptimConfig(lr=cfg.warm_lr, micro_batch_size=256, warmup_steps=cfg.warm_warmup_steps))
    task = get_task(cfg.task)
    trainer = Trainer(config, model=model, tokenizer=tokenizer, progress=False)
    checks = []
    while trainer.step < cfg.warm_steps:
        trainer.history.append(trainer.train_step().metrics)
        if cfg.warm_target_pass8 > 0 and trainer.step >= cfg.warm_min_steps and \
                trainer.step % cfg.warm_check_every == 0:
            check = evaluate_model(model, tokenizer, TrainSplit(task), n=cfg.warm_val_problems, ks=(8,),
                                   seed=cfg.eval_seed + 1, max_new_tokens=task.max_new_tokens,
                                   temperature=cfg.temperature)
            checks.append({"step": trainer.step, **check})
            if check["pass@8"] >= cfg.warm_target_pass8:
                break
    seconds = time.perf_counter() - started
    evaluation = _evaluate(model, tokenizer, task, cfg, cfg.ks)
    save_model(model, tokenizer, path)
    meta = {"seed": seed, "path": str(path), "settings": settings, "steps": trainer.step, "eval": evaluation,
            "train_seconds": seconds, "validation_checks": checks}
    meta_file.write_text(json.dumps(meta, indent=1))
    return {**meta, "reused": False}


def train_job(cfg: StudyConfig, recipe_name: str, seed: int) -> dict[str, Any]:
    """Train one recipe from the seed's saved warm start; evaluate along the way and at the end."""
    from unipo.config import TrainConfig
    from unipo.models import load_model
    from unipo.tasks.base import get_task
    from unipo.trainer import NonFiniteLossError, Trainer

    started = time.perf_counter()
    path = str(cfg.warm_path(seed))
    model, tokenizer = load_model(path, device="cpu")
    task = get_task(cfg.task)
    recipe = study_recipe(recipe_name)
    config = TrainConfig(recipe=recipe, task=cfg.task, model=path, steps=cfg.steps, seed=seed, device="cpu",
                         rollout=rollout_config(cfg), optim=optim_config(cfg), eval_problems=cfg.eval_problems)
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
    except Exception as exc:  # noqa: BLE001 - one failed run is reported, not fatal to the study
        error = f"{type(exc).__name__}: {exc}"
    final = _evaluate(model, tokenizer, task, cfg, cfg.ks)
    curve.append({"step": trainer.step, **final})
    history = [{k: _round(m.get(k)) for k in HISTORY_KEYS if k in m} for m in trainer.history]
    return {"recipe": recipe_name, "seed": seed, "family": recipe.family, "final": final, "curve": curve,
            "history": history, "train_seconds": train_seconds, "wall_seconds": time.perf_counter() - started,
            "steps_done": trainer.step, "error": error}


def _round(value: Any) -> Any:
    return None if value is None else round(float(value), 5)


def _dispatch(job: tuple) -> dict[str, Any]:
    kind, *args = job
    return warm_start_job(*args) if kind == "warm" else train_job(*args)


def _run_jobs(jobs: list[tuple], cfg: StudyConfig, desc: str, progress: bool, pool) -> list[dict[str, Any]]:
    from tqdm.auto import tqdm

    bar = tqdm(total=len(jobs), desc=desc, disable=not progress, dynamic_ncols=True)
    results = []
    iterator = pool.imap_unordered(_dispatch, jobs) if pool is not None else map(_dispatch, jobs)
    for result in iterator:
        results.append(result)
        label = f"{result['recipe']}/seed{result['seed']}" if "recipe" in result else f"warm start seed{result['seed']}"
        if "final" in result:
            label += f" acc={result['final']['accuracy']:.3f}"
        bar.set_postfix_str(label)
        bar.update(1)
    bar.close()
    return results


# --------------------------------------------------------------------------------------------
# the study


def run_study(cfg: StudyConfig, *, progress: bool = True, fresh_warmstart: bool = False,
              command: str | None = None) -> dict[str, Any]:
    """Warm starts, then every (recipe, seed) run; returns (and writes) the summary dict."""
    unknown = [r for r in cfg.recipes if r not in _recipe_names()]
    if unknown:
        raise ValueError(f"unknown recipe(s) {unknown}; valid: {', '.join(_recipe_names())}")
    cfg.study_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    pool = None
    if cfg.workers > 1:
        import multiprocessing as mp

        pool = mp.get_context("spawn").Pool(cfg.workers, initializer=_worker_init)
    else:
        _worker_init()
    try:
        warm = _run_jobs([("warm", cfg, s, fresh_warmstart) for s in cfg.seeds], cfg, "warm starts", progress, pool)
        jobs = [("run", cfg, r, s) for r in cfg.recipes for s in cfg.seeds]
        jobs.sort(key=lambda j: -_COST.get(j[2], 1))  # stable: slow recipes first, then the given order
        runs = _run_jobs(jobs, cfg, "runs", progress, pool)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    total = time.perf_counter() - started
    summary = summarise(cfg, warm, runs, total, command)
    write_outputs(cfg, summary)
    return summary


def _recipe_names() -> list[str]:
    from unipo.recipes import RECIPES

    return list(RECIPES)


def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


METRICS = (("accuracy", "held-out acc (greedy)"), ("pass@1", "pass@1"), ("pass@8", "pass@8"),
           ("response_len_mean", "resp len"), ("clip_frac", "clip frac"), ("train_seconds", "train s"))


def _run_value(run: dict[str, Any], key: str) -> float:
    """A run's figure for the table: timing and the clip fraction (mean over its steps) from training,
    the rest from the final evaluation."""
    if key == "train_seconds":
        return run["train_seconds"]
    if key == "clip_frac":
        values = [m["clip_frac"] for m in run["history"] if m.get("clip_frac") is not None]
        return statistics.fmean(values) if values else math.nan
    return run["final"].get(key)


def summarise(cfg: StudyConfig, warm: list[dict], runs: list[dict], total_seconds: float,
              command: str | None) -> dict[str, Any]:
    import torch

    warm = sorted(warm, key=lambda w: w["seed"])
    rows = []
    warm_row = {"recipe": "warm start (step 0)", "family": "-", "n_seeds": len(warm), "errors": []}
    for key, _ in METRICS:
        values = [w["train_seconds"] if key == "train_seconds" else w["eval"].get(key, math.nan) for w in warm]
        warm_row[key], warm_row[f"{key}_std"] = _mean_std(values)
    rows.append(warm_row)
    for name in cfg.recipes:
        mine = sorted((r for r in runs if r["recipe"] == name), key=lambda r: r["seed"])
        row = {"recipe": name, "family": mine[0]["family"] if mine else "?", "n_seeds": len(mine),
               "errors": [r["error"] for r in mine if r["error"]]}
        for key, _ in METRICS:
            values = [_run_value(r, key) for r in mine]
            row[key], row[f"{key}_std"] = _mean_std(values)
        gains = [r["final"]["accuracy"] - w["eval"]["accuracy"] for r in mine for w in warm if w["seed"] == r["seed"]]
        row["gain"], row["gain_std"] = _mean_std(gains)
        rows.append(row)
    curves = {}
    for name in cfg.recipes:
        mine = [r for r in runs if r["recipe"] == name]
        steps = sorted({p["step"] for r in mine for p in r["curve"]})
        points = []
        for step in [0, *steps]:
            if step == 0:
                vals = [w["eval"]["accuracy"] for w in warm if w["seed"] in {r["seed"] for r in mine}]
            else:
                vals = [p["accuracy"] for r in mine for p in r["curve"] if p["step"] == step]
            m, s = _mean_std(vals)
            points.append({"step": step, "accuracy": m, "std": s, "n": len(vals)})
        curves[name] = points
    settings = {k: _plain(v) for k, v in dataclasses.asdict(cfg).items()}
    return {
        "study": "hybrid vs on-policy RL under sparse reward",
        "command": command,
        "settings": settings,
        "rollout_config": dataclasses.asdict(rollout_config(cfg)),
        "optim_config": dataclasses.asdict(optim_config(cfg)),
        "warm_start_config": {"recipe": "sft", "prompts_per_step": cfg.warm_prompts, "group_size": 1,
                              "lr": cfg.warm_lr, "warmup_steps": cfg.warm_warmup_steps, "micro_batch_size": 256,
                              "max_steps": cfg.warm_steps, "model": "build_tiny_model('tiny', seed=s)",
                              "prompt_seed": f"s + {cfg.warm_seed_offset}",
                              "steps_per_seed": {w["seed"]: w.get("steps", cfg.warm_steps) for w in warm}},
        "recipe_overrides": RECIPE_OVERRIDES,
        "group_composition": {r: group_composition(r, cfg) for r in cfg.recipes},
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


def _fmt(row: dict, key: str) -> str:
    mean, std = row[key], row[f"{key}_std"]
    if not math.isfinite(mean):
        return "n/a"
    if key == "train_seconds":
        return f"{mean:.0f} ± {std:.0f}"
    if key == "response_len_mean":
        return f"{mean:.2f} ± {std:.2f}"
    return f"{mean:.3f} ± {std:.3f}"


def markdown_table(summary: dict[str, Any]) -> str:
    head = ["recipe", "family", *[label for _, label in METRICS], "Δacc vs warm start"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in summary["table"]:
        gain = _fmt(row, "gain") if "gain" in row else "-"
        if gain not in ("-", "n/a"):
            gain = gain if gain.startswith("-") else f"+{gain}"
        cells = [row["recipe"], row["family"], *[_fmt(row, key) for key, _ in METRICS], gain]
        if row["errors"]:
            cells[0] += f" ({len(row['errors'])} failed)"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def settings_markdown(summary: dict[str, Any]) -> str:
    s, ro, op, ws = summary["settings"], summary["rollout_config"], summary["optim_config"], \
        summary["warm_start_config"]
    lines = [
        f"- task `{s['task']}`, seeds {s['seeds']}; every recipe starts from the same saved warm start per seed "
        f"and trains {s['steps']} steps; metrics are mean ± std over seeds.",
        f"- warm start: `build_tiny_model('tiny', seed=s)` + recipe `sft` on {ws['prompts_per_step']} "
        f"demonstrations per step, lr {ws['lr']} (warm-up {ws['warmup_steps']} steps), prompt stream seed "
        f"s + {s['warm_seed_offset']} (not the RL runs' stream), "
        + (f"stopped at the first check (every {s['warm_check_every']} steps from step {s['warm_min_steps']}) "
           f"where pass@8 on {s['warm_val_problems']} train-split validation problems reached "
           f"{s['warm_target_pass8']} (at most {ws['max_steps']} steps)" if s["warm_target_pass8"] > 0
           else f"{ws['max_steps']} steps")
        + f"; steps per seed: {ws['steps_per_seed']}. Saved with `save_model`, loaded with `load_model` "
        "by every run.",
        f"- every recipe (RL and sft): `RolloutConfig({', '.join(f'{k}={v}' for k, v in ro.items())})`, "
        f"`OptimConfig({', '.join(f'{k}={v}' for k, v in op.items())})`, recipe defaults otherwise"
        + (f"; study overrides: {summary['recipe_overrides']}" if summary["recipe_overrides"] else "") + ".",
        "- rows per prompt and step, and updates per generation batch (each recipe's own schedule):",
        *[f"  - `{r}`: {c}" for r, c in summary["group_composition"].items()],
        f"- evaluation: the same {s['eval_problems']} held-out (test-split) problems for every run "
        f"(`evaluate_model(..., ks={tuple(s['ks'])}, seed={s['eval_seed']})`): greedy accuracy, unbiased pass@k "
        f"from {max(s['ks'])} samples at temperature {s['temperature']}, mean greedy response length in tokens "
        f"(EOS included); learning-curve points (greedy accuracy) at steps {summary['curve_steps']}.",
        f"- train s: seconds in `Trainer.train_step` (evaluation excluded), one torch thread per run, "
        f"{s['workers']} runs in parallel on a {summary['environment']['cores']}-core CPU shared with other work; "
        f"the warm-start row's train s is its SFT time.",
        f"- torch {summary['environment']['torch']}, Python {summary['environment']['python']}; "
        f"total wall time {summary['total_seconds'] / 60:.1f} min.",
    ]
    return "\n".join(lines)


def write_outputs(cfg: StudyConfig, summary: dict[str, Any]) -> None:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "hybrid_vs_onpolicy.json").write_text(json.dumps(summary, indent=1, default=str))
    text = "\n\n".join(["# Hybrid vs on-policy study", f"Command: `{summary['command']}`",
                        markdown_table(summary), settings_markdown(summary)]) + "\n"
    (out / "hybrid_vs_onpolicy.md").write_text(text)
    plot(summary, out / "hybrid_vs_onpolicy.png")


def plot(summary: dict[str, Any], path: Path, smooth: int = 10) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    styles = {"hybrid": "-", "on-policy": "--", "sft": ":"}
    for i, (name, points) in enumerate(summary["curves"].items()):
        family = next((r["family"] for r in summary["table"] if r["recipe"] == name), "")
        ls = styles.get(family, "-")
        steps = [p["step"] for p in points]
        mean = [p["accuracy"] for p in points]
        left.plot(steps, mean, ls, marker="o", ms=3, color=f"C{i}", label=name)
        runs = [r for r in summary["runs"] if r["recipe"] == name]
        if not runs or name == "sft":
            continue
        length = min(len(r["history"]) for r in runs)
        per_step = []
        for t in range(length):
            vals = [r["history"][t].get("accuracy") for r in runs]
            vals = [v for v in vals if v is not None]
            per_step.append(sum(vals) / len(vals) if vals else float("nan"))
        avg = [_nanmean(per_step[max(0, t - smooth + 1):t + 1]) for t in range(length)]
        right.plot(range(1, length + 1), avg, ls, color=f"C{i}", label=name)
    left.set_title("held-out greedy accuracy (mean over seeds)")
    right.set_title(f"train rollout accuracy (mean over seeds, {smooth}-step moving average)")
    for ax in (left, right):
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, ncol=2)
    fig.suptitle(f"{summary['settings']['task']}: solid = hybrid, dashed = on-policy, dotted = SFT; "
                 "ghpo's train accuracy includes hinted rollouts, dapo's only kept groups", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _nanmean(values: list[float]) -> float:
    values = [v for v in values if v == v]
    return sum(values) / len(values) if values else float("nan")


# --------------------------------------------------------------------------------------------
# CLI


def parse_args(argv: list[str] | None = None) -> tuple[StudyConfig, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few recipes, 1 seed, short runs (minutes)")
    parser.add_argument("--seeds", help="N (seeds 0..N-1) or a comma-separated list (\"5,\" = seed 5 only)")
    parser.add_argument("--steps", type=int, help="RL steps per run")
    parser.add_argument("--recipes", help="comma-separated recipe names")
    parser.add_argument("--out", help="output folder (default benchmarks/out)")
    parser.add_argument("--lr", type=float, help="learning rate of every run after the warm start")
    parser.add_argument("--task", help="task spec (default sort)")
    parser.add_argument("--prompts-per-step", type=int, help="prompts per RL step")
    parser.add_argument("--group-size", type=int, help="rows per prompt (expert row included)")
    parser.add_argument("--warm-steps", type=int, help="SFT warm-start steps (the most, with --warm-target)")
    parser.add_argument("--warm-target", type=float, help="stop the warm start once validation pass@8 >= this")
    parser.add_argument("--eval-problems", type=int, help="held-out problems per evaluation")
    parser.add_argument("--workers", type=int, help="parallel runs (default 2; 1 = in this process)")
    parser.add_argument("--fresh-warmstart", action="store_true", help="recompute warm starts even if saved")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    cfg = QUICK if args.quick else StudyConfig()
    changes: dict[str, Any] = {}
    if args.seeds:
        parts = [int(s) for s in args.seeds.split(",") if s.strip()]
        changes["seeds"] = tuple(range(parts[0])) if "," not in args.seeds else tuple(parts)
    if args.recipes:
        changes["recipes"] = tuple(r.strip() for r in args.recipes.split(",") if r.strip())
    for flag, key in (("steps", "steps"), ("out", "out"), ("lr", "lr"), ("task", "task"),
                      ("warm_steps", "warm_steps"), ("warm_target", "warm_target_pass8"),
                      ("eval_problems", "eval_problems"), ("workers", "workers"),
                      ("prompts_per_step", "prompts_per_step"), ("group_size", "group_size")):
        if getattr(args, flag) is not None:
            changes[key] = getattr(args, flag)
    return dataclasses.replace(cfg, **changes), args


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console

    cfg, args = parse_args(argv)
    command = "python " + " ".join([sys.argv[0], *(sys.argv[1:] if argv is None else argv)])
    console = Console()
    console.print(f"[bold]hybrid vs on-policy[/]: {len(cfg.recipes)} recipes x {len(cfg.seeds)} seeds x "
                  f"{cfg.steps} steps on {cfg.task}, {cfg.workers} workers")
    summary = run_study(cfg, progress=not args.no_progress, fresh_warmstart=args.fresh_warmstart, command=command)
    print(markdown_table(summary))
    print(settings_markdown(summary))
    for row in summary["table"]:
        for error in row["errors"]:
            console.print(f"[red]{row['recipe']} failed:[/] {error}")
    console.print(f"wrote {Path(cfg.out) / 'hybrid_vs_onpolicy.json'}, .md and .png "
                  f"({summary['total_seconds'] / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
