"""Multi-turn agents: held-out success before and after RL, from an SFT warm start on demonstrations.

    .venv/bin/python benchmarks/agents.py [--envs guess_number,calculator] [--recipes multiturn_grpo,mt_grpo,archer]
        [--seeds 0,1,2] [--sft-steps 200] [--rl-steps 40] [--lr 5e-4] [--workers 2]

For each environment and seed (one "unit"): the tiny model's success at initialisation; after `--sft-steps` of SFT
on the environment's expert episodes (a multi-turn recipe with `mixer=sft` and one replayed demonstration per
problem, `--sft-prompts` problems a step at `--sft-lr`, no rollouts); then, from that same warm start, after
`--rl-steps` of each recipe (`--prompts` problems x `--group` episodes a step at `--lr`). Success is over `--eval`
held-out problems, one greedy episode each. Units run in `--workers` processes (spawned; the usable cores are split
between them). Prints a markdown table (mean over seeds, and each seed) with the sentences derived from it, and
writes benchmarks/out/agents.json.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import copy
import dataclasses
import json
import math
import multiprocessing
import os
import time
from pathlib import Path

import torch
from machine import cpu_info

from unipo.config import OptimConfig, RolloutConfig, TrainConfig
from unipo.models import load_model
from unipo.recipes import get_recipe
from unipo.trainer import Trainer

OUT = Path(__file__).parent / "out" / "agents.json"
KEPT = ("accuracy", "env/turns_mean", "env/tool_errors")  # what each evaluation contributes to the JSON


def evaluation(trainer: Trainer, n: int) -> dict[str, float]:
    result = trainer.evaluate(n)
    return {key: float(result[key]) for key in KEPT if key in result}


def warm_start(env: str, seed: int, steps: int, n_eval: int, prompts: int,
               lr: float = 5e-4) -> tuple[object, object, dict, dict]:
    """(model, tokenizer, evaluation at init, evaluation after SFT on demonstrations).

    The defaults (200 steps of 16 problems at lr 5e-4) teach the calculator's two copies (the factors into the call,
    the tool's value into the answer): held-out success 0.94 and 0.97 (seeds 0, 1), where the first slice's 60-300
    steps at lr 3e-3 with the keyword call did not (0.00-0.02; docs/agents.md, "Environments")."""
    model, tokenizer = load_model("tiny", device="cpu")
    recipe = dataclasses.replace(get_recipe("multiturn_grpo"), name="multiturn_sft", expert_per_group=1,
                                 expert_in_group=False, mixer="sft", aggregation="token_mean")
    config = TrainConfig(recipe=recipe, env=env, steps=steps, seed=seed, device="cpu", eval_problems=n_eval,
                         rollout=RolloutConfig(prompts_per_step=prompts, group_size=1),
                         optim=OptimConfig(lr=lr, warmup_steps=0))
    trainer = Trainer(config, model=model, tokenizer=tokenizer, progress=False)
    before = evaluation(trainer, n_eval)
    trainer.fit()
    return trainer.model, tokenizer, before, evaluation(trainer, n_eval)


def rl(model, tokenizer, recipe: str, env: str, seed: int, steps: int, n_eval: int, prompts: int, group: int,
       lr: float) -> dict:
    config = TrainConfig(recipe=get_recipe(recipe), env=env, steps=steps, seed=seed, device="cpu",
                         eval_problems=n_eval, rollout=RolloutConfig(prompts_per_step=prompts, group_size=group),
                         optim=OptimConfig(lr=lr, warmup_steps=0))
    trainer = Trainer(config, model=copy.deepcopy(model), tokenizer=tokenizer, progress=False)
    trainer.fit()
    return evaluation(trainer, n_eval)


def run_unit(env: str, seed: int, args: dict, threads: int) -> dict:
    """One environment and seed: the warm start, then every recipe from it. Runs in a worker process."""
    torch.set_num_threads(threads)
    started = time.perf_counter()
    model, tokenizer, init, sft = warm_start(env, seed, args["sft_steps"], args["eval"], args["sft_prompts"],
                                             args["sft_lr"])
    seconds = {"sft": time.perf_counter() - started}
    after = {}
    for recipe in args["recipes"].split(","):
        begun = time.perf_counter()
        after[recipe] = rl(model, tokenizer, recipe, env, seed, args["rl_steps"], args["eval"], args["prompts"],
                           args["group"], args["lr"])
        seconds[recipe] = time.perf_counter() - begun
    return {"env": env, "seed": seed, "init": init, "sft": sft, "after": after, "seconds": seconds,
            "threads": threads}


def noise_of_difference(after: list[float], before: list[float], n_eval: int) -> float:
    """Twice the larger of two standard errors of mean(after) - mean(before) over seeds: the seeds' own (the sample
    standard deviation of the per-seed differences over sqrt(seeds)) and the binomial one of n_eval-problem
    proportions (unpaired; the pooled rate Laplace-smoothed, (k + 1) / (n + 2), so that 0 and 1 keep some noise)."""
    n = len(after)
    differences = [a - b for a, b in zip(after, before)]
    mean = sum(differences) / n
    seeds = math.sqrt(sum((d - mean) ** 2 for d in differences) / (n - 1) / n) if n > 1 else 0.0
    pooled = (sum(after) + sum(before)) / (2 * n)
    smoothed = (pooled * n_eval + 1) / (n_eval + 2)
    binomial = math.sqrt(2 / n) * math.sqrt(smoothed * (1 - smoothed) / n_eval)
    return 2 * max(seeds, binomial)


def summarise(units: list[dict], recipes: list[str], n_eval: int) -> tuple[list[str], list[str]]:
    """The markdown table (mean over seeds, then each seed as init/SFT/recipes) and the sentences it supports."""
    lines = ["| env | init | SFT warm start | " + " | ".join(f"+ {r}" for r in recipes) + " | per seed (init/SFT/"
             + "/".join(recipes) + ") |",
             "|---|---|---|" + "---|" * len(recipes) + "---|"]
    sentences = []
    for env in dict.fromkeys(u["env"] for u in units):
        mine = sorted((u for u in units if u["env"] == env), key=lambda u: u["seed"])
        n = len(mine)

        def mean(pick):
            return sum(pick(u) for u in mine) / n

        init, sft = mean(lambda u: u["init"]["accuracy"]), mean(lambda u: u["sft"]["accuracy"])
        after = {r: mean(lambda u, r=r: u["after"][r]["accuracy"]) for r in recipes}
        seeds = "; ".join("/".join(f"{v:.2f}" for v in (u["init"]["accuracy"], u["sft"]["accuracy"],
                                                        *(u["after"][r]["accuracy"] for r in recipes)))
                          for u in mine)
        lines.append(f"| {env} | {init:.3f} | {sft:.3f} | " + " | ".join(f"{after[r]:.3f}" for r in recipes)
                     + f" | {seeds} |")
        sentences.append(f"{env}: the SFT warm start moves success from {init:.3f} to {sft:.3f} "
                         f"(mean of {n} seeds, {n_eval} held-out problems each).")
        for r in recipes:
            delta = after[r] - sft
            noise = noise_of_difference([u["after"][r]["accuracy"] for u in mine], [u["sft"]["accuracy"] for u in mine],
                                        n_eval)
            ups = sum(u["after"][r]["accuracy"] > u["sft"]["accuracy"] for u in mine)
            downs = sum(u["after"][r]["accuracy"] < u["sft"]["accuracy"] for u in mine)
            verdict = "beyond" if abs(delta) > noise else "within"
            sentences.append(f"  + {r}: {after[r]:.3f} ({delta:+.3f} vs the warm start; up in {ups}, down in {downs} "
                             f"of {n} seeds; {verdict} the noise of the difference, {noise:.3f}: two standard errors, "
                             f"over seeds or binomial, whichever is larger).")
    return lines, sentences


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--envs", default="guess_number,calculator")
    parser.add_argument("--recipes", default="multiturn_grpo,mt_grpo,archer")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--sft-steps", type=int, default=200)
    parser.add_argument("--sft-prompts", type=int, default=16)
    parser.add_argument("--sft-lr", type=float, default=5e-4)
    parser.add_argument("--rl-steps", type=int, default=40)
    parser.add_argument("--eval", type=int, default=64)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--workers", type=int, default=2, help="processes running units side by side")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--summarise", type=Path, metavar="JSON",
                        help="print the table and sentences of a run this script saved (no training)")
    args = parser.parse_args()
    if args.summarise:
        saved = json.loads(args.summarise.read_text())
        lines, sentences = summarise(saved["units"], saved["settings"]["recipes"].split(","), saved["settings"]["eval"])
        print("\n".join(lines) + "\n\n" + "\n".join(sentences))
        return
    recipes = args.recipes.split(",")
    for recipe in recipes:
        get_recipe(recipe)  # an unknown name fails here, before any training
    units = [(env, int(seed)) for env in args.envs.split(",") for seed in args.seeds.split(",")]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    workers = max(1, min(args.workers, len(units), cores))
    threads = max(1, cores // workers)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    print(f"{len(units)} units in {workers} processes x {threads} threads on {cpu_info()['model']}", flush=True)

    started = time.perf_counter()
    results, failed = [], []
    # spawn: a clean interpreter per worker (no forked torch threads); the calculator's sandbox starts its own
    # fork server inside it.
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(run_unit, env, seed, settings, threads) for env, seed in units]
        for (env, seed), future in zip(units, futures):
            try:
                unit = future.result()
            except Exception as error:  # noqa: BLE001 - one failed unit is reported; the others still count
                failed.append({"env": env, "seed": seed, "error": f"{type(error).__name__}: {error}"})
                print(f"{env} seed {seed}: FAILED ({failed[-1]['error']})", flush=True)
                continue
            results.append(unit)
            print(f"{unit['env']} seed {unit['seed']}: init {unit['init']['accuracy']:.3f}, "
                  f"sft {unit['sft']['accuracy']:.3f}, "
                  + ", ".join(f"{r} {v['accuracy']:.3f}" for r, v in unit["after"].items())
                  + f" ({sum(unit['seconds'].values()):.0f} s)", flush=True)
    wall = time.perf_counter() - started

    lines, sentences = summarise(results, recipes, args.eval)
    sentences += [f"{f['env']} seed {f['seed']} failed and is not in the table: {f['error']}" for f in failed]
    print("\n" + "\n".join(lines) + "\n")
    print("\n".join(sentences))
    print(f"\nwall time {wall:.0f} s; settings: {settings}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": cpu_info(), "settings": settings, "workers": workers,
                                    "threads_per_worker": threads, "wall_seconds": wall, "units": results,
                                    "failed": failed, "table": lines, "sentences": sentences}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
