"""Shared pieces of the vLLM tests (run in the environment .ci/vllm_env.sh builds, not in the default suite)."""

from __future__ import annotations

import torch

from unipo.config import OptimConfig, RolloutConfig, TrainConfig
from unipo.recipes import get_recipe
from unipo.tasks.base import TASKS, Problem, Task

# One intra-op thread, as the default suite: the tensors are tiny and the CI box has 2 shared cores.
torch.set_num_threads(1)


class ParityTask(Task):
    """Reward 1 when the completion's first character has an even code point: a random tiny model scores about
    half, so every group has reward variance from the first step and GRPO visibly learns within 10 steps."""

    name = "vllm_parity"
    max_new_tokens = 4
    scorer_is_safe = True  # a pure function of the text: scored in-process

    def sample(self, n, *, seed, split="train"):
        offset = 0 if split == "train" else 1000
        return [Problem(prompt=f"{(seed * 7 + i) % 97 + offset}?", answer="0", demonstration="0") for i in range(n)]

    def score(self, problem, completion):
        return float(bool(completion) and ord(completion[0]) % 2 == 0)


if ParityTask.name not in TASKS:
    TASKS.register(ParityTask.name)(lambda **_: ParityTask())


def grpo_config(engine: str, *, steps: int = 10, seed: int = 0, lr: float = 3e-3, prompts: int = 8,
                group: int = 8, **rollout) -> TrainConfig:
    return TrainConfig(recipe=get_recipe("grpo"), task=ParityTask.name, model="tiny", steps=steps, seed=seed,
                       rollout=RolloutConfig(prompts_per_step=prompts, group_size=group, engine=engine, **rollout),
                       optim=OptimConfig(lr=lr, micro_batch_size=64), eval_problems=4, save_every=0)
