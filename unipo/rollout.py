"""Rollout engine: token ids in, completions + their sampling log-probs out; and the policy's log-probs.

`generate` is our own decode loop over a Hugging Face causal LM (no `model.generate`): each distinct prompt
is prefilled once, its KV cache is repeated for the G completions of its group, and all N*G rows decode
together one token per step. `policy_logprobs` is the single forward pass the trainer differentiates through;
both compute log-probs the same way (log_softmax(logits / temperature)), so for an unchanged model the
importance ratio of a fresh rollout is exactly 1 up to float rounding (tests pin this to 1e-5).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from unipo.core.logprobs import entropy_from_logits, selective_log_softmax


@dataclass
class Generation:
    """A batch of B = N*G completions; row i*G + g is completion g of prompt i.

    prompt_ids      [B, P] left-padded prompt ids (each prompt repeated G times)
    prompt_mask     [B, P] 1 on prompt tokens, 0 on left padding
    completion_ids  [B, T] generated ids, pad after EOS; T = longest completion actually generated
    completion_mask [B, T] 1 on generated tokens up to and including EOS, 0 after
    sampling_logp   [B, T] float32 log_softmax(logits / temperature) of each sampled token; 0 where masked
    truncated       [B]    bool, True when no EOS came within max_new_tokens
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    sampling_logp: torch.Tensor
    truncated: torch.Tensor


@dataclass
class PolicyOutput:
    """`logp` [B, T] log-probs of the completion tokens (0 on padding); `entropy` [B, T] of the next-token
    distribution when asked for; `hidden` [B, T, H] final hidden states at the positions predicting each
    completion token (input of the LM head, e.g. for a value head) when asked for."""

    logp: torch.Tensor
    entropy: torch.Tensor | None = None
    hidden: torch.Tensor | None = None


def left_pad(sequences: list[list[int]], pad_token_id: int, device: torch.device | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists into `ids` [N, P] (long) and `mask` [N, P] (long, 1 on real tokens)."""
    width = max(len(seq) for seq in sequences)
    ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, width - len(seq):] = torch.as_tensor(seq, dtype=torch.long)
            mask[row, width - len(seq):] = 1
    return ids.to(device), mask.to(device)


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip padding: cumsum(mask) - 1, clamped at 0 for the left padding itself."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _check_generate_args(prompts: list[list[int]], group_size: int, max_new_tokens: int, temperature: float,
                         top_p: float, greedy: bool) -> None:
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError(f"prompts must be a non-empty list of non-empty token lists, got lengths "
                         f"{[len(p) for p in prompts]}")
    if group_size < 1 or max_new_tokens < 1:
        raise ValueError(f"group_size and max_new_tokens must be >= 1, got {group_size} and {max_new_tokens}")
    if not greedy and not temperature > 0:
        raise ValueError(f"temperature must be > 0 for sampling, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero all but the smallest set of most likely tokens whose mass reaches `top_p` (nucleus sampling,
    Holtzman et al., arXiv:1904.09751). A token is kept when the mass strictly before it (in descending
    order) is < top_p, so the top token is always kept; ties are broken towards the lower id, as argmax does.
    The result is unnormalised (multinomial normalises)."""
    sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    keep = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, mass_before < top_p)
    return probs.masked_fill(~keep, 0.0)


def _next_token(logits: torch.Tensor, temperature: float, top_p: float, greedy: bool,
                generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick one token per row from `logits` [B, V]; return it [B] and its log_softmax(logits / temperature)."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)  # [B, V]
    if greedy:
        token = logp.argmax(dim=-1)
    else:
        probs = logp.exp()
        if top_p < 1.0:
            probs = top_p_filter(probs, top_p)
        token = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return token, logp.gather(-1, token[:, None]).squeeze(-1)


def _prefill(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor):
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask), use_cache=True,
                logits_to_keep=1)
    return out.logits[:, -1], out.past_key_values


def generate(
    model: nn.Module,
    prompts: list[list[int]],
    *,
    group_size: int,
    max_new_tokens: int,
    eos_token_id: int,
    pad_token_id: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    greedy: bool = False,
    generator: torch.Generator | None = None,
    share_prompt_cache: bool = True,
) -> Generation:
    """Sample `group_size` completions for each prompt (token ids) with a KV-cached decode loop.

    Each step draws y_t ~ softmax(logits / temperature) restricted to the top-p nucleus (greedy: argmax) and
    records log_softmax(logits / temperature)[y_t] over the full vocabulary: the log-prob the policy assigns
    to y_t at this temperature, which is what importance ratios compare against (with top_p < 1 the nucleus
    renormalisation is deliberately not included). With `share_prompt_cache` each distinct prompt is
    prefilled once and its cache repeated G times; otherwise the prompts are repeated before prefill (the
    reference path). Rows that emitted EOS keep emitting pad; the loop stops when all rows are done or after
    `max_new_tokens`. The model is used in whatever train/eval mode it is in.
    """
    _check_generate_args(prompts, group_size, max_new_tokens, temperature, top_p, greedy)
    device = _model_device(model)
    prompt_ids, prompt_mask = left_pad(prompts, pad_token_id, device)  # [N, P]
    with torch.inference_mode():
        if share_prompt_cache:
            logits, cache = _prefill(model, prompt_ids, prompt_mask)  # [N, V]
            logits = logits.repeat_interleave(group_size, dim=0)  # [B, V]
            cache.batch_repeat_interleave(group_size)
            prompt_ids = prompt_ids.repeat_interleave(group_size, dim=0)
            prompt_mask = prompt_mask.repeat_interleave(group_size, dim=0)
        else:
            prompt_ids = prompt_ids.repeat_interleave(group_size, dim=0)
            prompt_mask = prompt_mask.repeat_interleave(group_size, dim=0)
            logits, cache = _prefill(model, prompt_ids, prompt_mask)
        batch, prompt_len = prompt_ids.shape
        # Attention over [prompt | completion so far]; finished rows keep attending to their own (pad) tokens,
        # which is harmless because their outputs are discarded.
        attention = torch.ones((batch, prompt_len + max_new_tokens), dtype=torch.long, device=device)
        attention[:, :prompt_len] = prompt_mask
        first_position = prompt_mask.sum(dim=-1, keepdim=True)  # [B, 1] position of completion token 0
        tokens = torch.full((batch, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
        token_logp = torch.zeros((batch, max_new_tokens), dtype=torch.float32, device=device)
        live = torch.zeros((batch, max_new_tokens), dtype=torch.bool, device=device)
        done = torch.zeros(batch, dtype=torch.bool, device=device)
        steps = 0
        while True:
            token, logp = _next_token(logits, temperature, top_p, greedy, generator)
            tokens[:, steps] = token.masked_fill(done, pad_token_id)
            token_logp[:, steps] = logp.masked_fill(done, 0.0)
            live[:, steps] = ~done
            done = done | (token == eos_token_id)
            steps += 1
            # The one host sync per step: stopping as soon as every row hit EOS saves whole forward passes,
            # which cost far more than reading one bool.
            if steps == max_new_tokens or bool(done.all()):
                break
            logits = model(
                input_ids=tokens[:, steps - 1:steps],
                attention_mask=attention[:, :prompt_len + steps],
                position_ids=first_position + (steps - 1),
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            ).logits[:, -1]
        truncated = ~done
    # Clone out of inference mode: inference tensors cannot be saved for backward, and the trainer mixes
    # these (as constants) into differentiable expressions.
    return Generation(
        prompt_ids=prompt_ids.clone(),
        prompt_mask=prompt_mask.clone(),
        completion_ids=tokens[:, :steps].clone(),
        completion_mask=live[:, :steps].long(),
        sampling_logp=token_logp[:, :steps].clone(),
        truncated=truncated.clone(),
    )


def _check_policy_inputs(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, completion_ids: torch.Tensor,
                         completion_mask: torch.Tensor) -> None:
    if prompt_ids.dim() != 2 or completion_ids.dim() != 2 or prompt_ids.shape[0] != completion_ids.shape[0]:
        raise ValueError(f"prompt_ids [B, P] and completion_ids [B, T] must share B, got "
                         f"{list(prompt_ids.shape)} and {list(completion_ids.shape)}")
    if prompt_mask.shape != prompt_ids.shape or completion_mask.shape != completion_ids.shape:
        raise ValueError(f"masks must match their ids: prompt {list(prompt_ids.shape)} vs mask "
                         f"{list(prompt_mask.shape)}, completion {list(completion_ids.shape)} vs mask "
                         f"{list(completion_mask.shape)}")


def policy_logprobs(
    model: nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    temperature: float = 1.0,
    need_entropy: bool = False,
    return_hidden: bool = False,
) -> PolicyOutput:
    """log π(y_t | x, y_<t) = log_softmax(logits_t / temperature)[y_t] for every completion token, in ONE
    forward pass over [prompt | completion] (gradients flow; call it in train mode for training).

    Padding costs nothing: leading prompt columns that are padding in every row and trailing completion
    columns that are masked in every row are cut before the forward, and the last completion column is never
    fed (it predicts nothing). Logits are computed only at the positions that predict completion tokens
    (`logits_to_keep`). Outputs are restored to the input's T, zero on masked positions. Entropy is
    -Σ_v p_v log p_v of the same tempered distribution.
    """
    _check_policy_inputs(prompt_ids, prompt_mask, completion_ids, completion_mask)
    batch, width = completion_ids.shape
    completion_keep = completion_mask.bool()
    # Two host syncs per call (not per token): they decide how many columns the forward has to pay for.
    prompt_columns = prompt_mask.bool().any(dim=0)
    if not bool(prompt_columns.any()):
        raise ValueError("prompt_mask is all zero: every row needs at least one prompt token")
    first = int(prompt_columns.long().argmax())
    used = completion_keep.any(dim=0).nonzero()
    kept = int(used.max()) + 1 if used.numel() else 0
    head = model.get_output_embeddings()
    if kept == 0:  # nothing to score: all zeros, no forward
        zeros = torch.zeros((batch, width), dtype=torch.float32, device=completion_ids.device)
        hidden = zeros.new_zeros((batch, width, head.weight.shape[1])) if return_hidden else None
        return PolicyOutput(logp=zeros, entropy=zeros.clone() if need_entropy else None, hidden=hidden)

    targets = completion_ids[:, :kept]  # [B, T']
    ids = torch.cat([prompt_ids[:, first:], completion_ids[:, :kept - 1]], dim=1)
    mask = torch.cat([prompt_mask[:, first:], completion_mask[:, :kept - 1]], dim=1).long()

    captured: list[torch.Tensor] = []
    hook = None
    if return_hidden:
        # The LM head's input at the kept positions is exactly the hidden state that predicts each token.
        hook = head.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    try:
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask),
                       use_cache=False, logits_to_keep=kept).logits  # [B, T', V]
    finally:
        if hook is not None:
            hook.remove()
    # Temperature is applied (and half precision upcast) chunk by chunk inside: no scaled copy of the logits.
    keep = completion_keep[:, :kept]  # [B, T']
    pad_right = (0, width - kept)
    token_logp = selective_log_softmax(logits, targets, temperature=temperature)
    token_logp = F.pad(torch.where(keep, token_logp, 0.0), pad_right)
    entropy = None
    if need_entropy:
        entropy = F.pad(torch.where(keep, entropy_from_logits(logits, temperature=temperature), 0.0), pad_right)
    hidden = None
    if return_hidden:
        hidden = F.pad(torch.where(keep[..., None], captured[-1], 0.0), (0, 0) + pad_right)  # [B, T, H]
    return PolicyOutput(logp=token_logp, entropy=entropy, hidden=hidden)
