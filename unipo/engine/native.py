"""The native engine: unipo's own sampler (`unipo.rollout.generate`) over the trainer's model itself."""

from __future__ import annotations

import torch

from unipo.rollout import Generation, generate


class NativeEngine:
    """Samples with the trainer's own module, so its weights are always the current ones (`sync` copies nothing)
    and its log-probs are the trainer's forward's up to float rounding (`logp_exact`; the trainer still asks for
    float32 weights and top_p = 1 before it uses them as pi_old)."""

    logp_exact = True

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    @classmethod
    def from_config(cls, config, model: torch.nn.Module, tokenizer, device: torch.device) -> NativeEngine:
        return cls(model)

    def generate(self, prompts: list[list[int]], *, group_size: int, max_new_tokens: int, eos_token_id: int,
                 pad_token_id: int, temperature: float = 1.0, top_p: float = 1.0,
                 generator: torch.Generator | None = None, greedy: bool = False) -> Generation:
        return generate(self.model, prompts, group_size=group_size, max_new_tokens=max_new_tokens,
                        eos_token_id=eos_token_id, pad_token_id=pad_token_id, temperature=temperature, top_p=top_p,
                        greedy=greedy, generator=generator)

    def sync(self, model: torch.nn.Module) -> None:
        self.model = model

    def close(self) -> None:
        pass
