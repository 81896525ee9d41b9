"""SWEET-RL's critic at 2 processes: one training step under torchrun, then the critic replicas compared.

    torchrun --nproc_per_node 2 tests/sweet_distributed.py OUT parallel=ddp [trajectories=FILE]

The critic learns inside collection (`unipo.sweet`). Each rank's episodes come from a scripted engine that guesses
at random (seeded by rank, so the ranks' episodes differ and some succeed); rank 0 writes OUT/sweet.json: how many
episode rows the critic's `prepare` was given on each rank and how many each rank collected, whether the ranks'
critic weights are bit-identical after the step, and whether they moved. With `trajectories=FILE` the episodes
are the recorded file's (offline, `unipo.episode_files`), each rank replaying its share of the step's problems.
Under FSDP the config refuses the recipe when it is built; rank 0 writes the message to
OUT/sweet.fsdp_refusal.txt.
"""

from __future__ import annotations

import dataclasses
import json
import random
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from scripted_engine import ScriptedEngine  # tests/scripted_engine.py (this script's folder is on sys.path)

from unipo.config import OptimConfig, RolloutConfig, TrainConfig
from unipo.distributed import from_environment, shutdown
from unipo.models import load_model
from unipo.recipes import get_recipe
from unipo.trainer import Trainer


def flat(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().double().flatten() for p in module.parameters()])


def main(out: Path, mode: str, trajectories: str | None) -> None:
    parallel = from_environment(mode)
    out.mkdir(parents=True, exist_ok=True)
    recipe = get_recipe("sweet_rl")
    recipe = dataclasses.replace(recipe, baseline_params={**recipe.baseline_params, "lr": 1e-2},
                                 data_params={"candidates": 2, "pairs_per_state": 1, "trajectories": trajectories})
    try:
        config = TrainConfig(recipe=recipe, model="tiny", steps=1, seed=0, env="guess_number", parallel=mode,
                             rollout=RolloutConfig(prompts_per_step=4, group_size=4, max_new_tokens=2),
                             optim=OptimConfig(lr=1e-3), eval_problems=2)
    except ValueError as error:
        if parallel.is_main:
            (out / "sweet.fsdp_refusal.txt").write_text(str(error))
        shutdown()
        return
    torch.manual_seed(0)
    model, tokenizer = load_model("tiny")
    trainer = Trainer(config, model=model, tokenizer=tokenizer, progress=False)
    guesses = random.Random(parallel.rank)
    trainer.collector.engine = ScriptedEngine(tokenizer, lambda text: str(guesses.randint(1, 15)))
    collected, prepared = [], []
    gather, prepare = trainer.collector.gather, trainer.tracker.prepare
    trainer.collector.gather = lambda batch: collected.append(len(batch)) or gather(batch)
    trainer.tracker.prepare = lambda batch: (prepared.append(len(batch)) if batch.episode_ids is not None
                                             else None) or prepare(batch)
    before = flat(trainer.tracker.critic)
    metrics = trainer.train_step().metrics
    after = flat(trainer.tracker.critic)
    replicas = [torch.zeros_like(after) for _ in range(parallel.world_size)]
    dist.all_gather(replicas, after)
    counts = [torch.zeros(2, dtype=torch.long) for _ in range(parallel.world_size)]
    dist.all_gather(counts, torch.tensor([collected[0], prepared[0]]))
    if parallel.is_main:
        (out / "sweet.json").write_text(json.dumps({
            "collected": [int(c[0]) for c in counts], "prepared": [int(c[1]) for c in counts],
            "replicas_equal": all(torch.equal(r, replicas[0]) for r in replicas),
            "moved": float((after - before).abs().max()), "critic_pairs": metrics.get("critic/pairs", 0.0)}))
    shutdown(trainer)


if __name__ == "__main__":
    settings = dict(arg.split("=", 1) for arg in sys.argv[2:])
    main(Path(sys.argv[1]), settings.get("parallel", "ddp"), settings.get("trajectories"))
