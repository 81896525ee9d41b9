"""The pictures in docs/workflow.md, made by unipo itself: two short runs on the embedded tiny model, plotted.

    python docs/make_screenshots.py [--out docs/img]      # about a minute on a laptop CPU

A brief SFT warm start on sort:k=3 (as `unipo demo` does), then grpo and luffy for 30 steps each from that same
checkpoint, with held-out accuracy (100 test problems) at step 0 and every 5 steps. Writes grpo.png and
luffy.png (`unipo plot RUN`) and grpo-vs-luffy.png (`unipo plot RUN1 RUN2`). Nothing is downloaded; the runs go
to a temporary folder.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import torch

from unipo.config import OptimConfig, RolloutConfig, TrainConfig
from unipo.plots import plot_run, plot_runs
from unipo.recipes import get_recipe
from unipo.trainer import start_run

TASK = "sort:k=3"


def train(recipe: str, model: str, out: Path, steps: int, rollout: RolloutConfig, optim: OptimConfig,
          eval_every: int = 0) -> Path:
    config = TrainConfig(recipe=get_recipe(recipe), task=TASK, model=model, steps=steps, seed=0, out=str(out),
                         device="cpu", rollout=rollout, optim=optim, eval_every=eval_every, eval_problems=100,
                         save_every=0)
    trainer = start_run(config, progress=False)
    if eval_every:
        trainer.evaluate()  # step 0: the warm start, before this recipe's first update
    trainer.fit()
    if eval_every:
        trainer.evaluate()  # the last step (fit evaluates every eval_every steps before it)
    return out / f"checkpoint-{steps}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "img"), help="folder for the PNGs")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the tiny model's matmuls are too small to split (see unipo.demo)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = Path(tempfile.mkdtemp(prefix="unipo-screenshots-"))
    try:
        # 40 steps: ~35% held-out accuracy, so groups mix right and wrong answers and RL has a signal
        warm = train("sft", "tiny", runs / "sft", 40, RolloutConfig(prompts_per_step=256, group_size=1),
                     OptimConfig(lr=2e-3, micro_batch_size=512, warmup_steps=10))
        rl_rollout = RolloutConfig(prompts_per_step=16, group_size=8)
        rl_optim = OptimConfig(lr=2e-4, micro_batch_size=512)  # 1e-3 undid the warm start in a few steps
        for recipe in ("grpo", "luffy"):
            train(recipe, str(warm), runs / recipe, 30, rl_rollout, rl_optim, eval_every=5)
        notes: list[str] = []
        for recipe in ("grpo", "luffy"):
            print(plot_run(runs / recipe, out / f"{recipe}.png", notes=notes))
        print(plot_runs([runs / "grpo", runs / "luffy"], out / "grpo-vs-luffy.png")[-1])
        for note in notes:
            print(f"note: {note}")
    finally:
        shutil.rmtree(runs, ignore_errors=True)


if __name__ == "__main__":
    main()
