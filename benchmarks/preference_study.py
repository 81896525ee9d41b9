"""Preference and self-play recipes against GRPO, from one shared SFT warm start per seed.

    .venv/bin/python benchmarks/preference_study.py [--seeds 0 1 2] [--steps 60] [--out benchmarks/out/preference]

For every seed: the warm start of `unipo compare` (SFT on the task's demonstrations, `unipo.compare`); offline pairs
made ONCE from that warm start (`unipo.pairs.make_pairs`: 8 samples per prompt, a correct one against an incorrect
one, judged by the task's verifier), for `dpo`; then every recipe trains `--steps` steps from the warm start with the
same rollout and optimiser settings. Scored on the same held-out problems: greedy accuracy (and pass@k) as in
`unipo compare`, and the win rate against the warm start (one sample each per held-out problem, judged by the task
oracle: 1 / 0.5 / 0; `unipo.oracles.win_rate_against`). Prints a table (mean ± sample std over seeds, the gain over
the warm start paired by seed) and sentences computed from it; writes every number to `<out>/preference_study.json`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

RECIPES = ("grpo", "dpo", "online_dpo", "spin", "sppo", "nash_md", "dno")


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def main() -> None:
    import torch

    from unipo.compare import CompareConfig, _evaluate, warm_start_job
    from unipo.models import load_model
    from unipo.oracles import build_oracle, win_rate_against
    from unipo.pairs import make_pairs
    from unipo.tasks.base import get_task
    from unipo.trainer import Trainer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES))
    parser.add_argument("--task", default="sort")
    parser.add_argument("--eval-problems", type=int, default=200)
    parser.add_argument("--pair-prompts", type=int, default=256, help="prompts sampled to make dpo's pairs")
    parser.add_argument("--out", default="benchmarks/out/preference")
    args = parser.parse_args()

    torch.set_num_threads(1)
    cfg = CompareConfig(recipes=tuple(r for r in args.recipes if r != "dpo") or ("grpo",), seeds=tuple(args.seeds),
                        steps=args.steps, task=args.task, eval_problems=args.eval_problems, out=args.out)
    task = get_task(args.task)
    prefer = build_oracle("task", task)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    runs, warm_rows, pair_logs = [], [], {}
    for seed in args.seeds:
        warm = warm_start_job(cfg, seed)
        warm_rows.append({"seed": seed, **warm["eval"]})
        warm_model, tokenizer = load_model(warm["path"])
        pairs_file = out / f"pairs-seed{seed}.jsonl"
        made = make_pairs(warm_model, tokenizer, task, n_prompts=args.pair_prompts, group_size=8, seed=seed,
                          rule="correct_vs_incorrect")
        made.write_jsonl(pairs_file)
        pair_logs[seed] = made.log
        for recipe in args.recipes:
            config = cfg.run_config(recipe, seed)
            if recipe == "dpo":  # the study's one offline recipe: its data is the pairs made above
                config = dataclasses.replace(config, pairs=str(pairs_file))
            model, tokenizer = load_model(warm["path"])
            t0 = time.perf_counter()
            trainer = Trainer(config, model=model, tokenizer=tokenizer, progress=False)
            while trainer.step < config.steps:
                trainer.train_step()
            final = _evaluate(model, tokenizer, task, cfg, cfg.ks)
            wins = win_rate_against(model, warm_model, tokenizer, task, prefer, n=args.eval_problems, seed=10_000,
                                    max_new_tokens=trainer.max_new_tokens)
            runs.append({"recipe": recipe, "seed": seed, **final, **{f"vs_warm/{k}": v for k, v in wins.items()},
                         "train_seconds": time.perf_counter() - t0})
            print(f"seed {seed} {recipe}: accuracy {final['accuracy']:.3f}, win rate vs warm start "
                  f"{wins['win_rate']:.3f}", flush=True)

    warm_by_seed = {row["seed"]: row for row in warm_rows}
    rows = []
    for recipe in args.recipes:
        mine = [r for r in runs if r["recipe"] == recipe]
        acc, acc_sd = _mean_std([r["accuracy"] for r in mine])
        gain, gain_sd = _mean_std([r["accuracy"] - warm_by_seed[r["seed"]]["accuracy"] for r in mine])
        win, win_sd = _mean_std([r["vs_warm/win_rate"] for r in mine])
        rows.append({"recipe": recipe, "accuracy": acc, "accuracy_sd": acc_sd, "gain": gain, "gain_sd": gain_sd,
                     "win_rate": win, "win_rate_sd": win_sd, "seeds": len(mine)})
    warm_acc, warm_sd = _mean_std([row["accuracy"] for row in warm_rows])
    print(f"\nTask {args.task}, {len(args.seeds)} seeds, {args.steps} steps from the SFT warm start "
          f"(held-out greedy accuracy {warm_acc:.3f} ± {warm_sd:.3f}); win rate: P(recipe's sample > warm start's)\n")
    print("| recipe | held-out acc (greedy) | Δ vs warm start | win rate vs warm start |")
    print("|---|---|---|---|")
    for row in rows:
        print(f"| {row['recipe']} | {row['accuracy']:.3f} ± {row['accuracy_sd']:.3f} | {row['gain']:+.3f} ± "
              f"{row['gain_sd']:.3f} | {row['win_rate']:.3f} ± {row['win_rate_sd']:.3f} |")
    best = max(rows, key=lambda r: r["accuracy"])
    worst = min(rows, key=lambda r: r["accuracy"])
    print(f"\nHighest held-out accuracy: {best['recipe']} ({best['accuracy']:.3f}); lowest: {worst['recipe']} "
          f"({worst['accuracy']:.3f}). Recipes above the warm start on accuracy in every seed: "
          + (", ".join(r for r in args.recipes
                       if all(x["accuracy"] > warm_by_seed[x["seed"]]["accuracy"] for x in runs if x["recipe"] == r))
             or "none") + ".")
    made = {seed: log.get("pairs") for seed, log in pair_logs.items()}
    print(f"dpo's pairs made once from each warm start (pairs per seed): {made}. "
          f"Total time {(time.perf_counter() - started) / 60:.1f} min.")
    (out / "preference_study.json").write_text(json.dumps(
        {"args": vars(args), "warm": warm_rows, "pair_logs": {str(k): v for k, v in pair_logs.items()},
         "rows": rows, "runs": runs}, indent=2, default=float))
    print(f"wrote {out / 'preference_study.json'}")


if __name__ == "__main__":
    main()
