"""Multi-turn agents: held-out success before and after RL, from an SFT warm start on demonstrations.

    python benchmarks/agents.py --envs guess_number --recipes multiturn_grpo,mt_grpo --seeds 0 \
        --sft-steps 200 --rl-steps 40

For each environment and seed: the tiny model's success at initialisation; after `--sft-steps` of SFT on the
environment's expert episodes (a multi-turn recipe with `mixer=sft` and one replayed demonstration per problem,
`--sft-prompts` problems a step at `--sft-lr`, no rollouts); then, from that same warm start, after `--rl-steps` of
each recipe (`--prompts` problems x `--group` episodes a step at `--lr`). Success is over `--eval`
held-out problems, one greedy episode each. Prints a markdown table (mean over seeds, and each seed).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import time

from unipo.config import OptimConfig, RolloutConfig, TrainConfig
from unipo.models import load_model
from unipo.recipes import get_recipe
from unipo.trainer import Trainer


def success(trainer: Trainer, n: int) -> float:
    return trainer.evaluate(n)["accuracy"]


def warm_start(env: str, seed: int, steps: int, n_eval: int, prompts: int,
               lr: float = 5e-4) -> tuple[object, object, float, float]:
    """(model, tokenizer, success at init, success after SFT on demonstrations).

    The calculator's copies (the factors into the call, the tool's value into the answer) are learnt in a sudden
    drop of the loss after a plateau: at lr 5e-4 and 16 problems a step after ~150-200 steps; at lr 3e-3 mostly not
    within 300 (docs/agents.md, "Environments")."""
    model, tokenizer = load_model("tiny", device="cpu")
    recipe = dataclasses.replace(get_recipe("multiturn_grpo"), name="multiturn_sft", expert_per_group=1,
                                 expert_in_group=False, mixer="sft", aggregation="token_mean")
    config = TrainConfig(recipe=recipe, env=env, steps=steps, seed=seed, device="cpu", eval_problems=n_eval,
                         rollout=RolloutConfig(prompts_per_step=prompts, group_size=1),
                         optim=OptimConfig(lr=lr, warmup_steps=0))
    trainer = Trainer(config, model=model, tokenizer=tokenizer, progress=False)
    before = success(trainer, n_eval)
    trainer.fit()
    return trainer.model, tokenizer, before, success(trainer, n_eval)


def rl(model, tokenizer, recipe: str, env: str, seed: int, steps: int, n_eval: int, prompts: int, group: int,
       lr: float) -> float:
    config = TrainConfig(recipe=get_recipe(recipe), env=env, steps=steps, seed=seed, device="cpu",
                         eval_problems=n_eval, rollout=RolloutConfig(prompts_per_step=prompts, group_size=group),
                         optim=OptimConfig(lr=lr, warmup_steps=0))
    trainer = Trainer(config, model=copy.deepcopy(model), tokenizer=tokenizer, progress=False)
    trainer.fit()
    return success(trainer, n_eval)


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
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args()
    recipes = args.recipes.split(",")
    rows = []
    for env in args.envs.split(","):
        per_seed = []
        for seed in map(int, args.seeds.split(",")):
            started = time.perf_counter()
            model, tokenizer, init, sft = warm_start(env, seed, args.sft_steps, args.eval, args.sft_prompts,
                                                     args.sft_lr)
            after = {r: rl(model, tokenizer, r, env, seed, args.rl_steps, args.eval, args.prompts, args.group,
                           args.lr) for r in recipes}
            per_seed.append((init, sft, after))
            print(f"{env} seed {seed}: init {init:.3f}, sft {sft:.3f}, "
                  + ", ".join(f"{r} {v:.3f}" for r, v in after.items())
                  + f" ({time.perf_counter() - started:.0f} s)", flush=True)
        n = len(per_seed)
        mean = [sum(s[0] for s in per_seed) / n, sum(s[1] for s in per_seed) / n,
                *[sum(s[2][r] for s in per_seed) / n for r in recipes]]
        rows.append((env, mean, per_seed))
    print()
    print("| env | init | SFT warm start | " + " | ".join(f"+ {r}" for r in recipes) + " |")
    print("|---|---|---|" + "---|" * len(recipes))
    for env, mean, per_seed in rows:
        seeds = "; ".join("/".join(f"{v:.2f}" for v in (s[0], s[1], *s[2].values())) for s in per_seed)
        print(f"| {env} | " + " | ".join(f"{v:.3f}" for v in mean) + f" |  (per seed: {seeds})")
    print(f"\nsettings: {vars(args)}")


if __name__ == "__main__":
    main()
