"""Token log-probabilities and entropies from logits, without a second [B, T, V] tensor.

The trainer's forward pass turns `[B, T, V]` logits into `[B, T]` log-probs of the sampled ids
(and, when a loss or a selection rule needs it, the entropy of each next-token distribution).
`torch.log_softmax(logits).gather(...)` materialises a full `[B, T, V]` log-softmax, and its
backward keeps it alive: at V = 150k that is the largest tensor of the step. Here both
functions work on chunks of positions (slices along T, so temporaries are
B × chunk × V) and their backward passes are written by hand so that autograd keeps only the
input logits and two `[B, T]` tensors. Half-precision logits (bf16/fp16) are upcast chunk by
chunk and the results are float32; float32/float64 logits give results of their own dtype.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from unipo.core.validate import check_same_shape

# Elements per temporary chunk: 4M float32 = 16 MB, small next to the logits yet large enough
# that the per-chunk Python overhead is negligible.
_CHUNK_ELEMENTS = 1 << 22


def _positions_per_chunk(batch: int, vocab: int, chunk_rows: int | None) -> int:
    """How many positions along T one chunk covers (all B rows of them at once).

    Chunks are slices along T rather than of a flattened [B·T, V] view: flattening a
    non-contiguous view such as `logits[:, :-1]` would copy the whole tensor.
    """
    if chunk_rows is not None:
        if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
            raise ValueError(f"chunk_rows must be a positive int, got {chunk_rows!r}")
        rows = chunk_rows
    else:
        rows = _CHUNK_ELEMENTS // max(vocab, 1)
    return max(1, rows // max(batch, 1))


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half precision (and float32), float64 stays float64."""
    return torch.promote_types(dtype, torch.float32)


def _scaled_chunk(logits: torch.Tensor, t0: int, t1: int, dtype: torch.dtype, temperature: float) -> torch.Tensor:
    chunk = logits[:, t0:t1].to(dtype)  # [B, t, V]; a copy only for half-precision logits
    return chunk if temperature == 1.0 else chunk / temperature


def _tempered_grad(grad_out: torch.Tensor, dtype: torch.dtype, temperature: float) -> torch.Tensor:
    """The incoming gradient in the compute dtype, times d(x/τ)/dx = 1/τ."""
    grad_out = grad_out.to(dtype)
    return grad_out / temperature if temperature != 1.0 else grad_out


def _check_logits(logits: torch.Tensor, temperature: float) -> None:
    if logits.dim() != 3:
        raise ValueError(f"logits must be [B, T, V], got shape {list(logits.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be floating point, got dtype {logits.dtype}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature must be a number > 0, got {temperature!r}")


class _SelectiveLogSoftmax(torch.autograd.Function):
    """log softmax(logits / τ)[ids] per position; backward: (onehot(ids) − softmax) · g / τ."""

    @staticmethod
    def forward(ctx, logits, ids, temperature, chunk_rows):  # type: ignore[no-untyped-def]
        batch, length, vocab = logits.shape
        dtype = _compute_dtype(logits.dtype)
        step = _positions_per_chunk(batch, vocab, chunk_rows)
        chosen = logits.gather(2, ids.unsqueeze(2)).squeeze(2).to(dtype)  # [B, T]
        if temperature != 1.0:
            chosen = chosen / temperature
        # Same arithmetic as log_softmax: (x − max) − log Σ exp(x − max), so results match it.
        row_max = torch.empty(batch, length, dtype=dtype, device=logits.device)
        log_sum = torch.empty_like(row_max)
        for t0 in range(0, length, step):
            chunk = _scaled_chunk(logits, t0, t0 + step, dtype, temperature)
            mx = chunk.amax(dim=2)
            row_max[:, t0:t0 + step] = mx
            log_sum[:, t0:t0 + step] = (chunk - mx.unsqueeze(2)).exp_().sum(dim=2).log_()
        ctx.save_for_backward(logits, ids, row_max + log_sum)
        ctx.temperature, ctx.step = temperature, step
        return (chosen - row_max) - log_sum

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):  # type: ignore[no-untyped-def]
        logits, ids, lse = ctx.saved_tensors
        grad_out = _tempered_grad(grad_out, lse.dtype, ctx.temperature)
        grad_logits = torch.empty_like(logits)
        for t0 in range(0, logits.shape[1], ctx.step):
            t1 = t0 + ctx.step
            chunk = _scaled_chunk(logits, t0, t1, lse.dtype, ctx.temperature)
            g = grad_out[:, t0:t1].unsqueeze(2)
            # Same dtype: compute straight into the output slice; half precision: one float32
            # temporary, rounded once at the end.
            out = grad_logits[:, t0:t1] if logits.dtype == lse.dtype else None
            grad = torch.sub(chunk, lse[:, t0:t1].unsqueeze(2), out=out).exp_().mul_(-g)  # −softmax · g
            grad.scatter_add_(2, ids[:, t0:t1].unsqueeze(2), g)  # + onehot(id) · g
            if out is None:
                grad_logits[:, t0:t1] = grad
        return grad_logits, None, None, None


class _EntropyFromLogits(torch.autograd.Function):
    """H = −Σ p log p of softmax(logits / τ) per position; backward: dH/dx_j = −p_j (x_j − E_p[x])."""

    @staticmethod
    def forward(ctx, logits, temperature, chunk_rows):  # type: ignore[no-untyped-def]
        batch, length, vocab = logits.shape
        dtype = _compute_dtype(logits.dtype)
        step = _positions_per_chunk(batch, vocab, chunk_rows)
        lowest = torch.finfo(dtype).min
        entropy = torch.empty(batch, length, dtype=dtype, device=logits.device)
        lse = torch.empty_like(entropy)
        for t0 in range(0, length, step):
            chunk = _scaled_chunk(logits, t0, t0 + step, dtype, temperature)
            mx = chunk.amax(dim=2, keepdim=True)
            # x − max, with −inf (a banned vocabulary entry) raised to the lowest finite number:
            # exp() of it is still exactly 0, and 0·lowest = 0 where 0·(−inf) would be NaN.
            shifted = (chunk - mx).clamp_(min=lowest)
            unnormalised = shifted.exp()
            total = unnormalised.sum(dim=2)
            # H = logsumexp − Σ p·x = log Σ exp(x − max) − Σ exp(x − max)·(x − max) / Σ exp(x − max)
            weighted = shifted.mul_(unnormalised).sum(dim=2)
            entropy[:, t0:t0 + step] = total.log() - weighted / total
            lse[:, t0:t0 + step] = mx.squeeze(2) + total.log()
        ctx.save_for_backward(logits, lse, entropy)
        ctx.temperature, ctx.step = temperature, step
        return entropy

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):  # type: ignore[no-untyped-def]
        logits, lse, entropy = ctx.saved_tensors
        grad_out = _tempered_grad(grad_out, lse.dtype, ctx.temperature)
        lowest = torch.finfo(lse.dtype).min
        grad_logits = torch.empty_like(logits)
        for t0 in range(0, logits.shape[1], ctx.step):
            t1 = t0 + ctx.step
            chunk = _scaled_chunk(logits, t0, t1, lse.dtype, ctx.temperature)
            log_p = (chunk - lse[:, t0:t1].unsqueeze(2)).clamp_(min=lowest)  # finite, see forward
            p = log_p.exp()
            # x − E_p[x] = (x − logsumexp) + H, so −p·(x − E_p[x])·g = −p·(log p + H)·g
            grad = log_p.add_(entropy[:, t0:t1].unsqueeze(2)).mul_(p).mul_(-grad_out[:, t0:t1].unsqueeze(2))
            grad_logits[:, t0:t1] = grad
        return grad_logits, None, None


def selective_log_softmax(
    logits: torch.Tensor, ids: torch.Tensor, *, temperature: float = 1.0, chunk_rows: int | None = None
) -> torch.Tensor:
    """log softmax(logits / temperature)[..., ids] → `[B, T]`, memory-light.

    logp[b, t] = x[b, t, ids[b, t]] − logsumexp_v x[b, t, v] with x = logits / temperature,
    computed in chunks of about `chunk_rows` positions (whole slices along T; default: ~4M
    logits per chunk). Matches `torch.log_softmax(x, -1).gather(-1, ids[..., None])` (same arithmetic).
    Differentiable in `logits` (first order). Half-precision logits give float32 log-probs.
    """
    _check_logits(logits, temperature)
    if ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise ValueError(f"ids must be an integer tensor, got dtype {ids.dtype}")
    check_same_shape(ids=ids, logits_without_vocab=logits[..., 0])
    return _SelectiveLogSoftmax.apply(logits, ids.long(), float(temperature), chunk_rows)


def entropy_from_logits(
    logits: torch.Tensor, *, temperature: float = 1.0, chunk_rows: int | None = None
) -> torch.Tensor:
    """Entropy of each next-token distribution softmax(logits / temperature) → `[B, T]`.

    H = −Σ_v p_v log p_v = logsumexp(x) − Σ_v p_v·x_v, over row chunks like
    `selective_log_softmax`. Differentiable in `logits` (an entropy bonus needs it); callers
    that only select or log should call it under `torch.no_grad()`.
    """
    _check_logits(logits, temperature)
    return _EntropyFromLogits.apply(logits, float(temperature), chunk_rows)


def token_logprobs_and_entropy(
    logits: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0, need_entropy: bool = True,
    *, chunk_rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(log-probs of `ids` [B, T], entropy [B, T] or None) under softmax(logits / temperature).

    Use the sampling temperature so that logp matches the rollout's sampling log-probs
    (the temperature is applied chunk by chunk, never as a scaled copy of the logits).
    """
    logp = selective_log_softmax(logits, ids, temperature=temperature, chunk_rows=chunk_rows)
    entropy = entropy_from_logits(logits, temperature=temperature, chunk_rows=chunk_rows) if need_entropy else None
    return logp, entropy
