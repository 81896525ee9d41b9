"""Sampling from the geometric mixture of the policy and the reference (Nash-MD, arXiv 2312.00886).

Nash-MD plays the policy against pi_mix(y|x) proportional to pi(y|x)^(1-beta) * pi_ref(y|x)^beta. As in TRL's
Nash-MD trainer (its GeometricMixtureWrapper), the mixture is taken token by token: at each step the next-token
log-probs are (1 - beta) * log pi(.|x, y_<t) + beta * log pi_ref(.|x, y_<t), renormalised; a sample of that
per-token mixture is not exactly a sample of the sequence-level mixture (the normalisers differ per prefix), which
is the approximation both the paper's experiments and TRL make. Both models decode with their own KV cache
(unipo.rollout's decoders); `sampling_logp` holds the mixture's log-prob of each drawn token.
"""

from __future__ import annotations

import torch
from torch import nn

from unipo.lean_decoder import lean_decoder
from unipo.rollout import Generation, _check_generate_args, _hf_decoder, _lean_decoder, _next_token, left_pad


def _decoder(model: nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, group_size: int,
             max_new_tokens: int):
    lean = lean_decoder(model)
    if lean is not None:
        return _lean_decoder(lean, prompt_ids, prompt_mask, group_size, max_new_tokens)
    return _hf_decoder(model, prompt_ids, prompt_mask, group_size, max_new_tokens, True)


def generate_mixture(model: nn.Module, reference: nn.Module, prompts: list[list[int]], *, beta: float,
                     group_size: int, max_new_tokens: int, eos_token_id: int, pad_token_id: int,
                     temperature: float = 1.0, top_p: float = 1.0,
                     generator: torch.Generator | None = None) -> Generation:
    """`group_size` completions per prompt from the token-level geometric mixture of `model` (weight 1 - beta)
    and `reference` (weight beta); beta = 0 samples `model`, beta = 1 samples `reference`."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"mixture beta must be in [0, 1], got {beta}")
    _check_generate_args(prompts, group_size, max_new_tokens, temperature, top_p, False)
    device = next(model.parameters()).device
    prompt_ids, prompt_mask = left_pad(prompts, pad_token_id, device)
    with torch.inference_mode():
        logits, rows_ids, rows_mask, step = _decoder(model, prompt_ids, prompt_mask, group_size, max_new_tokens)
        ref_logits, _, _, ref_step = _decoder(reference, prompt_ids, prompt_mask, group_size, max_new_tokens)
        batch = rows_ids.shape[0]
        tokens = torch.full((batch, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
        token_logp = torch.zeros((batch, max_new_tokens), dtype=torch.float32, device=device)
        live = torch.zeros((batch, max_new_tokens), dtype=torch.bool, device=device)
        done = torch.zeros(batch, dtype=torch.bool, device=device)
        steps = 0
        while True:
            mixed = ((1.0 - beta) * torch.log_softmax(logits.float() / temperature, dim=-1)
                     + beta * torch.log_softmax(ref_logits.float() / temperature, dim=-1))
            token, logp = _next_token(mixed, 1.0, top_p, False, generator)  # the tempered mixture, renormalised
            tokens[:, steps] = token.masked_fill(done, pad_token_id)
            token_logp[:, steps] = logp.masked_fill(done, 0.0)
            live[:, steps] = ~done
            done = done | (token == eos_token_id)
            steps += 1
            if steps == max_new_tokens or bool(done.all()):
                break
            logits = step(tokens[:, steps - 1:steps], steps)
            ref_logits = ref_step(tokens[:, steps - 1:steps], steps)
    return Generation(prompt_ids=rows_ids.clone(), prompt_mask=rows_mask.clone(),
                      completion_ids=tokens[:, :steps].clone(), completion_mask=live[:, :steps].long(),
                      sampling_logp=token_logp[:, :steps].clone(), truncated=~done)
