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

The logic is `unipo.compare` (the `unipo compare` command); this script is the study's settings and its
command-line options.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

from unipo.compare import CompareConfig, markdown_table, run_compare, settings_markdown

DEFAULT_RECIPES = ("grpo", "dapo", "dr_grpo", "gspo", "cispo", "luffy", "chord", "hpt", "ghpo", "rl_plus", "calibrl",
                   "sft")
# The study's settings where they differ from `unipo compare`'s: 12 recipes, 3 seeds, 200 steps, 2 runs at a time on
# the CPU, the outputs named hybrid_vs_onpolicy.* in benchmarks/out.
STUDY = {"recipes": DEFAULT_RECIPES, "seeds": (0, 1, 2), "steps": 200, "workers": 2, "out": "benchmarks/out",
         "name": "hybrid_vs_onpolicy", "warm_dir": "hybrid_vs_onpolicy", "baseline": "grpo",
         "overrides": {"device": "cpu"}}


def StudyConfig(**changes: Any) -> CompareConfig:  # noqa: N802 - the study's config, as it was named before
    settings = {**STUDY, **changes}
    if settings["baseline"] not in settings["recipes"]:
        settings["baseline"] = None  # the first recipe
    return CompareConfig(**settings)


QUICK = StudyConfig(recipes=("grpo", "luffy", "sft"), seeds=(0,), steps=40, eval_problems=100, curve_points=2)


def run_study(cfg: CompareConfig, *, progress: bool = True, fresh_warmstart: bool = False,
              command: str | None = None) -> dict[str, Any]:
    """Warm starts, then every (recipe, seed) run; returns (and writes) the summary dict."""
    return run_compare(cfg, progress=progress, fresh_warm_start=fresh_warmstart, command=command)


# --------------------------------------------------------------------------------------------
# CLI


def parse_args(argv: list[str] | None = None) -> tuple[CompareConfig, argparse.Namespace]:
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
        if cfg.baseline not in changes["recipes"]:
            changes["baseline"] = None  # the first recipe
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
