"""A lean forward pass for Llama/Qwen2-style decoders, run on the Hugging Face module's own weights.

Same maths as the HF forward (RMSNorm in float32, rotary embedding, grouped-query attention through torch SDPA,
SwiGLU MLP, LM head), minus the per-call machinery (mask builders, cache objects, output capture, keyword
plumbing) that costs more than the matmuls on a small model on a CPU. It reads the HF parameters themselves, so
gradients land in them and the optimizer, checkpoints and `state_dict` are untouched.

Two things the HF forward cannot do cheaply are built in:
- a KV cache written into preallocated buffers (`BufferCache`), for the decode loop;
- a prompt prefix shared by the G completions of a group (`PrefixCache`): the prompt runs once per distinct
  prompt and its keys/values are indexed out to the rows, with gradients flowing back through that index. The
  maths is that of running each row separately (the prompt rows are identical), at 1/G of the prompt's cost.

`lean_decoder(model)` returns None for anything it does not reproduce exactly (other architectures, LoRA or
quantised layers, scaled RoPE, sliding windows, attention dropout, non-SiLU MLPs); callers then use the HF path.
Tests pin logits, log-probs and gradients to the HF forward.

Gradient checkpointing (`model.gradient_checkpointing_enable()`) is honoured, not dropped: in train mode with
gradients on, each decoder layer HF marked for checkpointing runs under non-reentrant `torch.utils.checkpoint`
(its activations are recomputed in the backward pass), the same layers HF's own forward would checkpoint. Always
non-reentrant, whatever HF was given: the prompt's keys/values leave the layer through the cache, and only the
non-reentrant form lets gradients flow back through them. In eval mode or under no_grad (sampling, the
behaviour pass) nothing changes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

_ARCHITECTURES = ("Qwen2ForCausalLM", "LlamaForCausalLM")


@dataclass(frozen=True)
class _Layer:
    norm1: torch.Tensor
    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    o: nn.Linear
    norm2: torch.Tensor
    gate: nn.Linear
    up: nn.Linear
    down: nn.Linear


class NoCache:
    """Keys/values of this call only (a prefill or a full forward); keeps them when `keep` is set."""

    def __init__(self, keep: bool = False) -> None:
        self.keep, self.layers = keep, []

    def extend(self, index: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keep:  # by index: a checkpointed layer's recomputation in the backward pass calls this again
            self.layers[index:index + 1] = [(k, v)]
        return k, v


class PrefixCache:
    """Per-layer prefix keys/values [B, kv_heads, P, d] (differentiable) put before this call's own."""

    def __init__(self, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.layers = layers

    def extend(self, index: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        past_k, past_v = self.layers[index]
        return torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)


class BufferCache:
    """Preallocated per-layer buffers [B, kv_heads, capacity, d] (inference only): each call writes its keys and
    values at `length` and attends over everything written so far; `advance` moves past them."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], length: int) -> None:
        self.keys, self.values, self.length = keys, values, length

    def extend(self, index: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + k.shape[2]
        self.keys[index][:, :, self.length:end] = k
        self.values[index][:, :, self.length:end] = v
        return self.keys[index][:, :, :end], self.values[index][:, :, :end]

    def advance(self, steps: int) -> None:
        self.length += steps


class LeanDecoder:
    """The forward of a supported HF causal LM (see `lean_decoder`), as plain tensor operations."""

    def __init__(self, model: nn.Module) -> None:
        config, body = model.config, model.model
        first = body.layers[0].self_attn
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim, self.scaling = first.head_dim, first.scaling
        self.eps = body.norm.variance_epsilon
        self.embedding, self.final_norm = body.embed_tokens.weight, body.norm.weight
        # HF's embedding never sends a lookup's gradient to the padding token's row; neither does this one
        self.padding_idx = body.embed_tokens.padding_idx
        self.head = model.lm_head
        self.inv_freq = body.rotary_emb.inv_freq
        self.rope_scale = float(body.rotary_emb.attention_scaling)
        self.layers = [_Layer(layer.input_layernorm.weight, layer.self_attn.q_proj, layer.self_attn.k_proj,
                              layer.self_attn.v_proj, layer.self_attn.o_proj, layer.post_attention_layernorm.weight,
                              layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj)
                       for layer in body.layers[:config.num_hidden_layers]]
        # the layers HF would checkpoint (train mode only, as in HF's GradientCheckpointingLayer)
        self.checkpointed = [model.training and bool(getattr(layer, "gradient_checkpointing", False))
                             for layer in body.layers[:config.num_hidden_layers]]

    # -- pieces -------------------------------------------------------------------------------------
    def norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """HF's RMSNorm: normalise in float32, back to the input dtype, then scale (same rounding steps)."""
        if x.dtype == weight.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), weight, self.eps)  # one kernel, bit-identical to the steps below
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)
        return weight * normed

    def rotary(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [B, 1, L, d] of each position, built as HF builds them (the d/2 frequencies, twice)."""
        freqs = positions[..., None].float() * self.inv_freq.float()  # [B, L, d/2]
        freqs = torch.cat([freqs, freqs], dim=-1)
        cos, sin = freqs.cos(), freqs.sin()
        if self.rope_scale != 1.0:
            cos, sin = cos * self.rope_scale, sin * self.rope_scale
        return cos.to(dtype)[:, None], sin.to(dtype)[:, None]

    @staticmethod
    def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """HF's x*cos + rotate_half(x)*sin, rotate_half(x) = [-x2, x1]."""
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat([-x2, x1], dim=-1) * sin

    def attention(self, index: int, x: torch.Tensor, rope, mask: torch.Tensor | None, cache) -> torch.Tensor:
        layer, (batch, length, _) = self.layers[index], x.shape
        q = layer.q(x).view(batch, length, self.heads, self.head_dim).transpose(1, 2)
        k = layer.k(x).view(batch, length, self.kv_heads, self.head_dim).transpose(1, 2)
        v = layer.v(x).view(batch, length, self.kv_heads, self.head_dim).transpose(1, 2)
        # q and k rotated as one tensor: 6 kernel launches per layer instead of 14 (plus their autograd nodes)
        qk = self.rotate(torch.cat([q, k], dim=1), *rope)
        q, k = qk[:, :self.heads], qk[:, self.heads:]
        k, v = cache.extend(index, k, v)
        # No mask: plain causal attention over this call's own tokens (or one query attending to everything).
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scaling,
                                             is_causal=mask is None and length > 1,
                                             enable_gqa=self.heads != self.kv_heads)
        return layer.o(out.transpose(1, 2).reshape(batch, length, self.heads * self.head_dim))

    def mlp(self, index: int, x: torch.Tensor) -> torch.Tensor:
        layer = self.layers[index]
        return layer.down(F.silu(layer.gate(x)) * layer.up(x))

    # -- the forward --------------------------------------------------------------------------------
    def hidden(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None, cache) -> torch.Tensor:
        """Final-norm hidden states [B, L, H] of `ids` [B, L] at `positions` [B, L].

        `mask` is a bool [B or 1, 1, L, L_past + L] (True = attend) or None for plain causal attention with no
        past; `cache` supplies the keys/values before this call's own (NoCache, PrefixCache or BufferCache)."""
        h = F.embedding(ids, self.embedding, padding_idx=self.padding_idx)
        rope = self.rotary(positions, h.dtype)
        grad = torch.is_grad_enabled()
        for index in range(len(self.layers)):
            if grad and self.checkpointed[index]:
                h = checkpoint(self.layer, index, h, rope, mask, cache, use_reentrant=False)
            else:
                h = self.layer(index, h, rope, mask, cache)
        return self.norm(h, self.final_norm)

    def layer(self, index: int, h: torch.Tensor, rope, mask: torch.Tensor | None, cache) -> torch.Tensor:
        """One decoder layer: attention then MLP, each pre-normed and residual."""
        h = h + self.attention(index, self.norm(h, self.layers[index].norm1), rope, mask, cache)
        return h + self.mlp(index, self.norm(h, self.layers[index].norm2))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden)

    # -- whole passes -------------------------------------------------------------------------------
    def prefill(self, ids: torch.Tensor, mask: torch.Tensor, padded: bool):
        """Run prompts [N, P] (left-padded, `mask` 1 on tokens); return the last position's hidden state
        [N, 1, H] and every layer's keys/values [N, kv_heads, P, d]."""
        cache = NoCache(keep=True)
        attend = prefill_mask(mask) if padded else None
        hidden = self.hidden(ids, positions_from_mask(mask), attend, cache)
        return hidden[:, -1:], cache.layers

    def completion_hidden(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, completion_ids: torch.Tensor,
                          padded: bool) -> torch.Tensor:
        """Hidden states [B, 1 + T, H] at the positions that predict each of `completion_ids` [B, 1 + T] (the last
        prompt token, then the first T completion tokens), with each distinct prompt run once (see PrefixCache).

        Consecutive rows with identical prompts share one prompt pass; completion tokens sit right after their
        row's prompt tokens (positions continue from the prompt length)."""
        owner, unique = prompt_groups(prompt_ids, prompt_mask)
        last, layers = self.prefill(prompt_ids[unique], prompt_mask[unique], padded)
        last = last.index_select(0, owner)  # [B, 1, H]
        length = completion_ids.shape[1] - 1
        if length == 0:
            return last
        prefix = PrefixCache([(k.index_select(0, owner), v.index_select(0, owner)) for k, v in layers])
        start = prompt_mask.sum(dim=1, keepdim=True)  # [B, 1] position of completion token 0
        positions = start + torch.arange(length, device=start.device)
        attend = completion_mask(prompt_mask if padded else prompt_mask[:1], length)
        return torch.cat([last, self.hidden(completion_ids[:, :-1], positions, attend, prefix)], dim=1)


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip left padding: cumsum(mask) - 1, clamped at 0 for the padding itself."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def prompt_groups(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For rows [B, P]: `owner` [B], the index of each row's prompt among the distinct ones, and `unique` [U],
    the first row of each run of consecutive identical rows (ids and mask)."""
    new = torch.ones(ids.shape[0], dtype=torch.bool, device=ids.device)
    new[1:] = (ids[1:] != ids[:-1]).any(dim=1) | (mask[1:] != mask[:-1]).any(dim=1)
    return new.long().cumsum(0) - 1, new.nonzero().squeeze(1)


def prefill_mask(mask: torch.Tensor) -> torch.Tensor:
    """Bool [N, 1, P, P]: causal, not to padding keys. A padding query attends to itself alone, so that no row
    is empty (SDPA would give NaN, which masked-out keys would still carry into real rows as 0 * NaN)."""
    length = mask.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=mask.device).tril()
    eye = torch.eye(length, dtype=torch.bool, device=mask.device)
    return ((causal & mask.bool()[:, None, :]) | eye)[:, None]


def completion_mask(prompt_mask: torch.Tensor, length: int) -> torch.Tensor:
    """Bool [R, 1, T, P + T] for T completion queries after a [R, P] prompt: every prompt token of the row
    (not its padding), then causal over the completion."""
    rows, prompt_len = prompt_mask.shape
    device = prompt_mask.device
    prompt_part = prompt_mask.bool()[:, None, None, :].expand(rows, 1, length, prompt_len)
    causal = torch.ones(length, length, dtype=torch.bool, device=device).tril().expand(rows, 1, length, length)
    return torch.cat([prompt_part, causal], dim=-1)


def lean_decoder(model: nn.Module) -> LeanDecoder | None:
    """A LeanDecoder for `model` when it reproduces the HF forward exactly, else None."""
    if type(model).__name__ not in _ARCHITECTURES or not _plain_config(model.config):
        return None
    body = getattr(model, "model", None)
    if body is None or not _plain_modules(model, body):
        return None
    return LeanDecoder(model)


def _plain_config(config) -> bool:
    rope = getattr(config, "rope_parameters", None) or {}
    layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
    return (getattr(config, "hidden_act", None) == "silu" and rope.get("rope_type", "default") == "default"
            and layer_types == {"full_attention"} and not getattr(config, "attention_dropout", 0.0)
            and getattr(config, "_attn_implementation", None) in ("sdpa", "eager")
            and getattr(config, "pretraining_tp", 1) == 1)


def _plain_modules(model: nn.Module, body: nn.Module) -> bool:
    """Exactly nn.Linear / nn.Embedding / RMSNorm modules: no LoRA, quantised or patched layers, no hooks
    (gradient checkpointing is fine: `LeanDecoder.hidden` checkpoints the same layers)."""
    linears = [model.lm_head]
    for layer in body.layers:
        attn, mlp = layer.self_attn, layer.mlp
        linears += [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj]
        if not all(type(n).__name__.endswith("RMSNorm") for n in (layer.input_layernorm,
                                                                   layer.post_attention_layernorm)):
            return False
    modules = [model, body, body.embed_tokens, body.norm, *linears]
    # HF's checkpointing adds a hook making the embeddings' output require grad (for frozen embeddings under
    # reentrant checkpointing): it changes no value, and the lean forward checkpoints non-reentrantly.
    allowed = {hook.id for hook in getattr(model, "_require_grads_hooks", None) or ()}
    return (all(type(m) is nn.Linear for m in linears) and type(body.embed_tokens) is nn.Embedding
            and type(body.norm).__name__.endswith("RMSNorm") and not any(_hooked(m, allowed) for m in modules)
            and _unpatched_forward(model))


def _hooked(module: nn.Module, allowed: set[int] = frozenset()) -> bool:
    return bool(set(module._forward_hooks) - allowed or module._forward_pre_hooks)


def _unpatched_forward(model: nn.Module) -> bool:
    """The class's own forward: a patched instance forward (e.g. a fused LM head) means other maths."""
    return "forward" not in vars(model) and "forward" not in vars(model.lm_head)
