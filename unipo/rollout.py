"""Rollout engine: token ids in, completions + their sampling log-probs out; and the policy's log-probs.

`generate` is our own decode loop over a Hugging Face causal LM (no `model.generate`): each distinct prompt
is prefilled once, its KV cache is repeated for the G completions of its group, and all N*G rows decode
together one token per step. `policy_logprobs` is the single forward pass the trainer differentiates through;
both compute log-probs the same way (log_softmax(logits / temperature)), so for an unchanged model the
importance ratio of a fresh rollout is exactly 1 up to float rounding (tests pin this to 1e-5).

Both run on `unipo.lean_decoder` when the model is a plain Llama/Qwen2-style decoder (the same maths without
HF's per-call machinery, and each group's prompt run once in the training pass too), else on the HF forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from unipo.core.logprobs import entropy_from_logits, selective_log_softmax
from unipo.lean_decoder import BufferCache, LeanDecoder, lean_decoder, positions_from_mask
from unipo.models import check_prompt_lengths, context_length


class NonFiniteLogitsError(ValueError):
    """The model's next-token distribution holds NaN/inf: its weights diverged (or a checkpoint is damaged)."""

    def __init__(self) -> None:
        super().__init__("the model's next-token distribution is NaN/inf while sampling: its weights have diverged "
                         "(lower optim.lr) or the checkpoint holds non-finite values")


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


def pad_sequences(sequences: list[list[int]], pad_token_id: int, *, left: bool,
                  device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> `ids` [N, L] (long) and `mask` [N, L] (long, 1 on real tokens), padded on one side."""
    width = max(len(seq) for seq in sequences)
    ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            span = slice(width - len(seq), width) if left else slice(0, len(seq))
            ids[row, span] = torch.as_tensor(seq, dtype=torch.long)
            mask[row, span] = 1
    return ids.to(device), mask.to(device)


def left_pad(sequences: list[list[int]], pad_token_id: int, device: torch.device | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists into `ids` [N, P] and `mask` [N, P] (prompts, for generation)."""
    return pad_sequences(sequences, pad_token_id, left=True, device=device)


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
    """Pick one token per row from `logits` [B, V]; return it [B] and its log_softmax(logits / temperature).
    Greedy decoding accepts temperature 0 ("no sampling") and then records log-probs at temperature 1."""
    logp = torch.log_softmax(logits.float() / (temperature if temperature > 0 else 1.0), dim=-1)  # [B, V]
    if greedy:
        token = logp.argmax(dim=-1)
    else:
        # A NaN/inf logit makes its whole row NaN: sample it uniformly rather than crash inside multinomial (or
        # trip a device assert); its NaN log-prob stops `generate` with NonFiniteLogitsError.
        probs = logp.exp().nan_to_num(nan=1.0)
        if top_p < 1.0:
            probs = top_p_filter(probs, top_p)
        token = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return token, logp.gather(-1, token[:, None]).squeeze(-1)


class _PreallocatedLayer(DynamicLayer):
    """A DynamicLayer that writes each step's keys/values into spare capacity instead of `torch.cat`-ing the
    whole cache (a full copy per layer per token, ~15% of a tiny model's decode time). `keys`/`values` stay
    views of the filled part, so everything inherited (lengths, masks, repeat/select) keeps working; after a
    repeat or select they are fresh tensors and the next update moves them into a new buffer."""

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity
        self.key_buffer: torch.Tensor | None = None
        self.value_buffer: torch.Tensor | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start = self.get_seq_length()
        end = start + key_states.shape[-2]
        if not self._keys_live_in_buffer(end):
            self.key_buffer = self._new_buffer(key_states, start, end, self.keys)
            self.value_buffer = self._new_buffer(value_states, start, end, self.values)
        self.key_buffer[:, :, start:end] = key_states
        self.value_buffer[:, :, start:end] = value_states
        self.keys, self.values = self.key_buffer[:, :, :end], self.value_buffer[:, :, :end]
        return self.keys, self.values

    def _keys_live_in_buffer(self, end: int) -> bool:
        buffer = self.key_buffer
        return (buffer is not None and self.keys.data_ptr() == buffer.data_ptr()
                and self.keys.shape[0] == buffer.shape[0] and end <= buffer.shape[2])

    def _new_buffer(self, states: torch.Tensor, start: int, end: int, filled: torch.Tensor) -> torch.Tensor:
        batch, heads, _, dim = states.shape
        buffer = states.new_empty((batch, heads, max(self.capacity, end), dim))
        if start:
            buffer[:, :, :start] = filled
        return buffer


class _PreallocatedCache(DynamicCache):
    def __init__(self, num_layers: int, capacity: int) -> None:
        Cache.__init__(self, layers=[_PreallocatedLayer(capacity) for _ in range(num_layers)])


def _plain_sdpa_model(model: nn.Module) -> bool:
    """Every layer full attention through torch SDPA: then a [B, 1, 1, L] bool mask is exactly the decode
    mask HF would build (saving its mask construction per step) and the preallocated cache is safe."""
    config = model.config
    layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
    return (getattr(config, "_attn_implementation", None) == "sdpa" and layer_types == {"full_attention"}
            and isinstance(getattr(config, "num_hidden_layers", None), int))


def _prefill(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, capacity: int | None):
    """Run the prompts [B, P]; return the next-token logits [B, V] and the KV cache."""
    cache = _PreallocatedCache(model.config.num_hidden_layers, capacity) if capacity else None
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask),
                past_key_values=cache, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1], out.past_key_values


def _prefill_groups(model: nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, group_size: int,
                    share_prompt_cache: bool, capacity: int | None):
    """Prefill N prompts for N*G rows: once each then repeat logits and cache (shared), or repeat first."""
    if share_prompt_cache:
        logits, cache = _prefill(model, prompt_ids, prompt_mask, capacity)  # [N, V]
        logits = logits.repeat_interleave(group_size, dim=0)  # [B, V]
        cache.batch_repeat_interleave(group_size)
    prompt_ids = prompt_ids.repeat_interleave(group_size, dim=0)  # [B, P]
    prompt_mask = prompt_mask.repeat_interleave(group_size, dim=0)
    if not share_prompt_cache:
        logits, cache = _prefill(model, prompt_ids, prompt_mask, capacity)
    return logits, cache, prompt_ids, prompt_mask


def _hf_decoder(model: nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, group_size: int,
                max_new_tokens: int, share_prompt_cache: bool):
    """Prefill through the HF forward; return the first logits [B, V], the B-row prompts, and `step(token,
    steps)` that feeds one token column [B, 1] and returns the next logits (the general path)."""
    fast = _plain_sdpa_model(model)
    capacity = prompt_ids.shape[1] + max_new_tokens if fast else None
    logits, cache, prompt_ids, prompt_mask = _prefill_groups(
        model, prompt_ids, prompt_mask, group_size, share_prompt_cache, capacity)
    batch, prompt_len = prompt_ids.shape
    # Attention over [prompt | completion so far]; finished rows keep attending to their own (pad) tokens,
    # which is harmless because their outputs are discarded.
    attention = torch.ones((batch, prompt_len + max_new_tokens), dtype=torch.long, device=prompt_ids.device)
    attention[:, :prompt_len] = prompt_mask
    if fast:
        attention = attention.bool()[:, None, None, :]  # [B, 1, 1, L]: HF uses a 4D mask as given
    first_position = prompt_mask.sum(dim=-1, keepdim=True)  # [B, 1] position of completion token 0

    def step(token: torch.Tensor, steps: int) -> torch.Tensor:
        return model(input_ids=token, attention_mask=attention[..., :prompt_len + steps],
                     position_ids=first_position + (steps - 1), past_key_values=cache, use_cache=True,
                     logits_to_keep=1).logits[:, -1]
    return logits, prompt_ids, prompt_mask, step


def _lean_decoder(lean: LeanDecoder, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, group_size: int,
                  max_new_tokens: int):
    """`_hf_decoder` on the lean forward: each distinct prompt prefilled once, its keys/values copied G times
    into preallocated buffers that the decode steps fill in place."""
    padded = not bool(prompt_mask.all())  # no padding (one prompt length): plain causal masks, no mask tensors
    last, layers = lean.prefill(prompt_ids, prompt_mask, padded)
    logits = lean.logits(last)[:, -1].repeat_interleave(group_size, dim=0)  # [B, V]
    prompt_ids = prompt_ids.repeat_interleave(group_size, dim=0)
    prompt_mask = prompt_mask.repeat_interleave(group_size, dim=0)
    batch, prompt_len = prompt_ids.shape
    keys, values = [], []
    for k, v in layers:
        for source, buffers in ((k, keys), (v, values)):
            buffer = source.new_empty((batch, source.shape[1], prompt_len + max_new_tokens, source.shape[3]))
            buffer[:, :, :prompt_len] = source.repeat_interleave(group_size, dim=0)
            buffers.append(buffer)
    cache = BufferCache(keys, values, prompt_len)
    attention = None
    if padded:  # [B, 1, 1, L]: the row's prompt tokens and every completion token so far
        attention = prompt_mask.new_ones((batch, 1, 1, prompt_len + max_new_tokens), dtype=torch.bool)
        attention[:, 0, 0, :prompt_len] = prompt_mask.bool()
    first_position = prompt_mask.sum(dim=-1, keepdim=True)

    def step(token: torch.Tensor, steps: int) -> torch.Tensor:
        mask = None if attention is None else attention[..., :prompt_len + steps]
        hidden = lean.hidden(token, first_position + (steps - 1), mask, cache)
        cache.advance(1)
        return lean.logits(hidden)[:, -1]
    return logits, prompt_ids, prompt_mask, step


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
    prefilled once and its cache repeated G times, on the lean forward when the model has one
    (`unipo.lean_decoder`); otherwise the prompts are repeated before an HF prefill (the reference path).
    Rows that emitted EOS keep emitting pad; the loop stops when all rows are done or after `max_new_tokens`.
    The model is used in whatever train/eval mode it is in.
    """
    _check_generate_args(prompts, group_size, max_new_tokens, temperature, top_p, greedy)
    check_prompt_lengths(map(len, prompts), max_new_tokens, context_length(model))
    device = _model_device(model)
    prompt_ids, prompt_mask = left_pad(prompts, pad_token_id, device)  # [N, P]
    lean = lean_decoder(model) if share_prompt_cache else None
    with torch.inference_mode():
        if lean is not None:
            logits, prompt_ids, prompt_mask, step = _lean_decoder(lean, prompt_ids, prompt_mask, group_size,
                                                                  max_new_tokens)
        else:
            logits, prompt_ids, prompt_mask, step = _hf_decoder(model, prompt_ids, prompt_mask, group_size,
                                                                max_new_tokens, share_prompt_cache)
        batch = prompt_ids.shape[0]
        tokens = torch.full((batch, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
        token_logp = torch.zeros((batch, max_new_tokens), dtype=torch.float32, device=device)
        live = torch.zeros((batch, max_new_tokens), dtype=torch.bool, device=device)
        done = torch.zeros(batch, dtype=torch.bool, device=device)
        diverged = torch.zeros((), dtype=torch.bool, device=device)
        steps = 0
        while True:
            token, logp = _next_token(logits, temperature, top_p, greedy, generator)
            diverged = diverged | (logp.isnan() & ~done).any()
            tokens[:, steps] = token.masked_fill(done, pad_token_id)
            token_logp[:, steps] = logp.masked_fill(done, 0.0)
            live[:, steps] = ~done
            done = done | (token == eos_token_id)
            steps += 1
            # The one host sync per step: stopping as soon as every row hit EOS saves whole forward passes,
            # which cost far more than reading one bool.
            if steps == max_new_tokens or bool(done.all() | diverged):
                break
            logits = step(tokens[:, steps - 1:steps], steps)
    if bool(diverged):
        raise NonFiniteLogitsError()
    # Clone out of inference mode: inference tensors cannot be saved for backward, and the trainer mixes
    # these (as constants) into differentiable expressions.
    return Generation(
        prompt_ids=prompt_ids.clone(),
        prompt_mask=prompt_mask.clone(),
        completion_ids=tokens[:, :steps].clone(),
        completion_mask=live[:, :steps].long(),
        sampling_logp=token_logp[:, :steps].clone(),
        truncated=~done,
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


def _hf_logits(model: nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, completion_ids: torch.Tensor,
               completion_mask: torch.Tensor, return_hidden: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Logits [B, T, V] predicting each completion token from one HF forward over [prompt | completion[:-1]],
    and (when asked) the LM head's input at those positions."""
    kept = completion_ids.shape[1]
    ids = torch.cat([prompt_ids, completion_ids[:, :kept - 1]], dim=1)
    mask = torch.cat([prompt_mask, completion_mask[:, :kept - 1]], dim=1).long()
    captured: list[torch.Tensor] = []
    head, hook = model.get_output_embeddings(), None
    if return_hidden:
        # The LM head's input at the kept positions is exactly the hidden state that predicts each token.
        hook = head.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    try:
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask),
                       use_cache=False, logits_to_keep=kept).logits  # [B, T, V]
    finally:
        if hook is not None:
            hook.remove()
    return logits, captured


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
    fed (it predicts nothing). On the lean forward, consecutive rows with the same prompt (a group) run that
    prompt once. Logits are computed only at the positions that predict completion tokens
    (`logits_to_keep`). Outputs are restored to the input's T, zero on masked positions. Entropy is
    -Σ_v p_v log p_v of the same tempered distribution.
    """
    _check_policy_inputs(prompt_ids, prompt_mask, completion_ids, completion_mask)
    batch, width = completion_ids.shape
    completion_keep = completion_mask.bool()
    if prompt_ids.shape[1] == 0:
        raise ValueError("prompt_ids has no columns: every row needs at least one prompt token")
    # One host sync per call (not per token): it decides how many columns the forward has to pay for.
    prompt_columns = prompt_mask.bool().any(dim=0).long()  # [P]
    completion_columns = completion_keep.any(dim=0).long()  # [T]
    column_number = torch.arange(1, width + 1, device=completion_keep.device)
    last_used = F.pad(completion_columns * column_number, (1, 0)).max()  # leading 0: T may be 0
    padding = (prompt_mask == 0).sum()
    has_prompt, first, kept, padding = torch.stack(
        [prompt_columns.max(), prompt_columns.argmax(), last_used, padding]).tolist()
    # first = first prompt column any row uses; kept = 1 + last completion column any row uses; padding left
    # after cutting the first columns means rows of different prompt lengths
    if not has_prompt:
        raise ValueError("prompt_mask is all zero: every row needs at least one prompt token")
    context = context_length(model)
    if context is not None and prompt_ids.shape[1] - first + kept > context:  # a row may not fit: measure each
        rows = prompt_mask.sum(1) + completion_mask[:, :kept].sum(1)
        check_prompt_lengths(rows.tolist(), 0, context, what="prompt + completion row")
    head = model.get_output_embeddings()
    if kept == 0:  # nothing to score: all zeros, no forward
        zeros = torch.zeros((batch, width), dtype=torch.float32, device=completion_ids.device)
        hidden = zeros.new_zeros((batch, width, head.weight.shape[1])) if return_hidden else None
        return PolicyOutput(logp=zeros, entropy=zeros.clone() if need_entropy else None, hidden=hidden)

    targets = completion_ids[:, :kept]  # [B, T']
    lean = lean_decoder(model)
    if lean is not None:  # each distinct prompt runs once for its group (see LeanDecoder.completion_hidden)
        captured = [lean.completion_hidden(prompt_ids[:, first:], prompt_mask[:, first:], targets,
                                           padded=padding > batch * first)]
        logits = lean.logits(captured[0])
    else:
        logits, captured = _hf_logits(model, prompt_ids[:, first:], prompt_mask[:, first:], completion_ids[:, :kept],
                                      completion_mask[:, :kept], return_hidden)
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
