"""One DPO update on offline pairs, in one process or as a rank of a 2-process torchrun job.

    python tests/pairwise_distributed.py OUT PAIRS                         # the one-process reference (+ naive)
    torchrun --nproc_per_node 2 tests/pairwise_distributed.py OUT PAIRS parallel=ddp

5 pairs a step: rank 0 holds 3, rank 1 holds 2 (pairs r, r + 2, ... of the draw), micro-batches of one pair, so rank 1
runs a one-row padding chunk. The pairwise loss must divide by the global mini-batch's 5 pairs on both ranks, so the
ranks' gradients add up to the one-process gradient; the *naive* split (each rank's own mean, averaged) differs.
tests/test_preference_trainer.py compares the files.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from unipo.config import OptimConfig, RolloutConfig, TrainConfig
from unipo.distributed import from_environment, gather_batch, shutdown
from unipo.models import load_model
from unipo.recipes import get_recipe
from unipo.trainer import Trainer


def build(pairs: str, mode: str) -> Trainer:
    config = TrainConfig(recipe=get_recipe("dpo"), task="sort", model="tiny", steps=1, seed=3, parallel=mode,
                         pairs=pairs, rollout=RolloutConfig(prompts_per_step=5, group_size=2),
                         optim=OptimConfig(lr=1e-3, micro_batch_size=2, grad_clip=1e9))
    torch.manual_seed(3)
    model, tokenizer = load_model("tiny")
    return Trainer(config, model=model, tokenizer=tokenizer, progress=False)


def gradients(trainer: Trainer) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in trainer.model.named_parameters():
        grad = p.grad if p.grad is not None else torch.zeros_like(p)
        out[name] = (grad.full_tensor() if hasattr(grad, "full_tensor") else grad).detach().clone()
    return out


def main(out: Path, pairs: str, mode: str) -> None:
    parallel = from_environment(mode)
    out.mkdir(parents=True, exist_ok=True)
    trainer = build(pairs, mode)
    batch, _ = trainer.collector.collect(seed=3, step=0)
    batch, origin = gather_batch(batch, trainer.parallel)
    trainer.learn(batch, origin=origin)
    grads = gradients(trainer)
    if parallel.is_main:
        save_file(grads, str(out / f"{'parallel' if parallel.active else 'single'}.grad.safetensors"))
    if not parallel.active:  # pairs of the draw at even / odd positions: what ranks 0 / 1 hold
        naive = []
        for rank in range(2):
            alone = build(pairs, mode)
            rows = torch.arange(len(batch)).view(-1, 2)[rank::2].reshape(-1)
            alone.learn(batch.rows(rows))
            naive.append(gradients(alone))
        save_file({k: (naive[0][k] + naive[1][k]) / 2 for k in grads}, str(out / "naive.grad.safetensors"))
    else:
        shutdown(trainer)


if __name__ == "__main__":
    settings = dict(arg.split("=", 1) for arg in sys.argv[3:])
    main(Path(sys.argv[1]), sys.argv[2], settings.get("parallel", "ddp"))
