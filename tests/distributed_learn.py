"""One update of several recipes on a fixed batch, in one process or as a rank of a torchrun job.

    python tests/distributed_learn.py OUT                                  # the one-process reference
    torchrun --nproc_per_node 2 tests/distributed_learn.py OUT parallel=fsdp

Every process builds the same tiny model and the same global batch (seeded), ordered as the ranks will hold it
(prompts i with i mod N == r on rank r, rank by rank). In a torchrun job each rank keeps its own rows and
`unipo.distributed.gather_batch` must rebuild the global batch from them. Then `Trainer.learn` runs one update
(`recipe.mini_batches` optimizer steps) and rank 0 writes, per recipe, the last optimizer step's gradients and the
updated weights (safetensors). The one-process run also writes the *naive* data-parallel gradients: each shard's
update computed alone with its own normalisers, then averaged, which is what N processes would compute if no
normaliser were global. tests/test_distributed.py compares the files.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from unipo.collect import RolloutBatch, RolloutCollector
from unipo.config import OptimConfig, RolloutConfig, TrainConfig
from unipo.distributed import from_environment, gather_batch, shutdown
from unipo.models import load_model
from unipo.recipes import get_recipe
from unipo.tasks.base import get_task
from unipo.trainer import Trainer

WORLD = 2  # the shard layout the batch is ordered for (also used by the one-process reference)
CASES = {  # recipe -> optimizer steps per batch (their own settings otherwise): a sequence-mean, token-means,
    # batch statistics, a global top-entropy quota, expert rows, a value head
    "grpo": 2,
    "dapo": 1,
    "reinforce_pp": 2,
    "high_entropy": 1,
    "luffy_paper": 1,
    "ppo": 1,
    "mt_grpo": 2,  # multi-turn episodes (one row per turn; per-turn statistics over the group's episodes)
    "epo": 1,  # EPO's entropy history: per-turn means over the global batch
    "archer": 1,  # a stateful critic: each rank's replica trained on the global batch (DDP only; FSDP refuses it)
}


def config_for(name: str, parallel: str) -> TrainConfig:
    recipe = dataclasses.replace(get_recipe(name), mini_batches=CASES[name], epochs=1)
    if name == "archer":  # no warm-up (its advantage would be 0), and a small critic update
        recipe = dataclasses.replace(recipe, advantage_params={**recipe.advantage_params, "warmup_steps": 0},
                                     baseline_params={**recipe.baseline_params, "critic_steps": 2, "critic_batch": 8})
    env = "guess_number" if recipe.data == "episodes" else None
    return TrainConfig(recipe=recipe, task="sort", model="tiny", steps=4, seed=3, parallel=parallel, env=env,
                       rollout=RolloutConfig(prompts_per_step=4, group_size=4, max_new_tokens=12),
                       # micro-batches of 3 rows: ranks hold different numbers of them; no clipping, so the
                       # gradients compare as computed
                       optim=OptimConfig(lr=1e-3, micro_batch_size=3, grad_clip=1e9))


def sharded_order(batch: RolloutBatch, world: int) -> tuple[RolloutBatch, torch.Tensor]:
    """The batch reordered rank by rank (prompt i on rank i mod world), prompts renumbered in that order, and
    each row's rank: the global batch N ranks hold (an independent reference for `gather_batch`)."""
    shards = [batch.rows(batch.prompt_index % world == r) for r in range(world)]
    ordered = RolloutBatch.concat(shards)
    first_seen = {int(p): i for i, p in reversed(list(enumerate(ordered.prompt_index.tolist())))}
    order = sorted(first_seen, key=first_seen.get)
    renumber = {p: i for i, p in enumerate(order)}
    index = torch.tensor([renumber[int(p)] for p in ordered.prompt_index])
    ordered.group_ids = torch.where(ordered.group_ids < 0, -(index + 1), index)
    ordered.prompt_index = index
    origin = torch.cat([torch.full((len(s),), r) for r, s in enumerate(shards)])
    return ordered, origin


def fixed_batch(config: TrainConfig) -> RolloutBatch:
    torch.manual_seed(config.seed)
    model, tokenizer = load_model("tiny")
    # No refill (dynamic sampling would drop every group of an untrained model), and random rewards: the
    # untrained model scores 0 everywhere, which would leave no gradient to compare.
    recipe = dataclasses.replace(config.recipe, dynamic_sampling=False)
    collector = RolloutCollector(model, tokenizer, get_task(config.task), recipe, config.rollout,
                                 max_new_tokens=config.rollout.max_new_tokens, device=torch.device("cpu"),
                                 generator=torch.Generator().manual_seed(config.seed), env=config.env)
    batch, _ = collector.collect(seed=config.seed, step=0)
    random = torch.Generator().manual_seed(config.seed)
    batch.rewards = torch.rand(len(batch), generator=random).round(decimals=1)
    if batch.episode_ids is not None:  # an episode's rows share its outcome; each turn its own turn reward
        batch.rewards = batch.rewards[batch.episode_ids]
        batch.episode_rewards = batch.rewards.clone()
        batch.turn_rewards = torch.rand(len(batch), generator=random).round(decimals=1)
    batch.correct = batch.rewards >= 0.7
    return batch


def gradients(trainer: Trainer) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in list(trainer.model.named_parameters()) + [
            (f"value_head.{n}", p) for n, p in (trainer.value_head.named_parameters() if trainer.value_head else [])]:
        grad = p.grad if p.grad is not None else torch.zeros_like(p)
        out[name] = (grad.full_tensor() if hasattr(grad, "full_tensor") else grad).detach().clone()
    return out


def weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for name, p in trainer.model.named_parameters()}


def learn(config: TrainConfig, batch: RolloutBatch, origin: torch.Tensor | None) -> Trainer:
    torch.manual_seed(config.seed)
    model, tokenizer = load_model("tiny")
    trainer = Trainer(config, model=model, tokenizer=tokenizer, progress=False)
    trainer.learn(batch, origin=origin)
    return trainer


def main(out: Path, parallel_mode: str) -> None:
    parallel = from_environment(parallel_mode)
    out.mkdir(parents=True, exist_ok=True)
    trainers = []
    for name in CASES:
        if parallel.fsdp and get_recipe(name).value_coef > 0:
            continue  # FSDP refuses a value head (TrainConfig)
        if parallel.fsdp and name == "archer":  # refused in one line when the config is built, on every rank
            try:
                config_for(name, parallel_mode)
            except ValueError as error:
                if parallel.is_main:
                    (out / "archer.fsdp_refusal.txt").write_text(str(error))
            continue
        config = config_for(name, parallel_mode)
        ordered, origin = sharded_order(fixed_batch(config), WORLD)
        if parallel.active:
            assert parallel.world_size == WORLD
            local = ordered.rows(origin == parallel.rank)
            local.prompt_index = local.prompt_index - int(local.prompt_index.min())  # as a rank's collector numbers
            local.group_ids = torch.where(local.group_ids < 0, -(local.prompt_index + 1), local.prompt_index)
            if local.episode_ids is not None:  # a rank's collector numbers its own episodes from 0 too
                local.episode_ids = torch.unique(local.episode_ids, return_inverse=True)[1]
            rebuilt, rebuilt_origin = gather_batch(local, parallel)
            for field in ("prompt_index", "group_ids", "rewards", "off_policy", "completion_mask", "completion_ids",
                          "prompt_mask", "prompt_ids", "sampling_logp"):
                a, b = getattr(rebuilt, field), getattr(ordered, field)
                if b.dim() == 2:  # widths may differ by all-padding columns: compare the common part
                    width = min(a.shape[1], b.shape[1])
                    left = field.startswith("prompt_")  # prompts are left-padded: their right-aligned part
                    a, b = (a[:, a.shape[1] - width:], b[:, b.shape[1] - width:]) if left else (a[:, :width],
                                                                                              b[:, :width])
                assert torch.equal(a, b), f"gather_batch changed {field}"
            assert rebuilt.texts == ordered.texts and torch.equal(rebuilt_origin, origin)
            if ordered.episode_ids is not None:  # the same rows form the same episodes (ids unique across ranks)
                a, b = rebuilt.episode_ids, ordered.episode_ids
                assert torch.equal(a[:, None] == a[None, :], b[:, None] == b[None, :]), "gather_batch merged episodes"
            trainer = learn(config, rebuilt, rebuilt_origin)
        else:
            trainer = learn(config, ordered, None)
        grads, new_weights = gradients(trainer), weights(trainer)
        if parallel.is_main:
            save_file(grads, str(out / f"{name}.grad.safetensors"))
            save_file(new_weights, str(out / f"{name}.weights.safetensors"))
        if not parallel.active:  # the naive split: each shard alone, its own normalisers, gradients averaged
            naive = [gradients(learn(config, ordered.rows(origin == r), None)) for r in range(WORLD)]
            save_file({k: sum(g[k] for g in naive) / WORLD for k in naive[0]}, str(out / f"{name}.naive.safetensors"))
        trainers.append(trainer)
    if parallel.active:
        shutdown(*trainers)  # DDP's modules dropped first: gloo may hang at exit otherwise


if __name__ == "__main__":
    settings = dict(arg.split("=", 1) for arg in sys.argv[2:])
    main(Path(sys.argv[1]), settings.get("parallel", "ddp"))
