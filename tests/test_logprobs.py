"""Chunked log-softmax gather and entropy against torch references and loops."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from unipo.core.logprobs import entropy_from_logits, selective_log_softmax, token_logprobs_and_entropy

F64 = torch.float64


def _inputs(B=3, T=5, V=11, dtype=torch.float32, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, T, V, generator=g, dtype=torch.float64) * scale).to(dtype)
    ids = torch.randint(0, V, (B, T), generator=g)
    return logits, ids


def test_hand_computed():
    # logits [0, log 3] → softmax [¼, ¾]: log p(id=1) = log ¾ = −0.2876821;
    # H = −(¼ log ¼ + ¾ log ¾) = 0.3465736 + 0.2157616 = 0.5623351
    logits = torch.tensor([[[0.0, math.log(3.0)]]], dtype=F64)
    torch.testing.assert_close(selective_log_softmax(logits, torch.tensor([[1]])),
                               torch.tensor([[-0.2876821]], dtype=F64),
                               atol=1e-7, rtol=0)
    torch.testing.assert_close(entropy_from_logits(logits), torch.tensor([[0.5623351]], dtype=F64), atol=1e-7, rtol=0)


@pytest.mark.parametrize("chunk_rows", [None, 1, 4, 1000])
def test_matches_log_softmax_gather_float32(chunk_rows):
    logits, ids = _inputs(B=4, T=9, V=1000, scale=5.0)
    expected = torch.log_softmax(logits, dim=-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    got = selective_log_softmax(logits, ids, chunk_rows=chunk_rows)
    assert got.dtype == torch.float32
    # 1e-6 absolute plus 1e-6 relative: float32 spacing at |logp| = 20 is already 1.9e-6, and the
    # vocabulary sum's order (ours chunked, torch's vectorised) may differ by one unit there.
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)


def test_loop_reference_entropy_and_temperature():
    logits, ids = _inputs(dtype=F64)
    for temperature in (1.0, 0.6):
        logp, entropy = token_logprobs_and_entropy(logits, ids, temperature=temperature, chunk_rows=2)
        for b in range(logits.shape[0]):
            for t in range(logits.shape[1]):
                row = [float(x) / temperature for x in logits[b, t]]
                mx = max(row)
                lse = mx + math.log(sum(math.exp(x - mx) for x in row))
                probs = [math.exp(x - lse) for x in row]
                assert abs(float(logp[b, t]) - (row[int(ids[b, t])] - lse)) < 1e-12
                assert abs(float(entropy[b, t]) + sum(p * math.log(p) for p in probs)) < 1e-12


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_gradcheck(temperature):
    logits, ids = _inputs(B=2, T=3, V=5, dtype=F64)
    logits.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x: selective_log_softmax(x, ids, temperature=temperature, chunk_rows=2), (logits,)
    )
    assert torch.autograd.gradcheck(lambda x: entropy_from_logits(x, temperature=temperature, chunk_rows=2), (logits,))


def test_gradients_match_autograd_of_log_softmax():
    logits, ids = _inputs(B=3, T=4, V=50, dtype=torch.float32)
    weights = torch.randn(3, 4)
    x1 = logits.clone().requires_grad_()
    (selective_log_softmax(x1, ids, chunk_rows=5) * weights).sum().backward()
    (entropy_from_logits(x1, chunk_rows=5) * weights).sum().backward()
    x2 = logits.clone().requires_grad_()
    log_p = torch.log_softmax(x2, -1)
    ((log_p.gather(-1, ids.unsqueeze(-1)).squeeze(-1) - (log_p.exp() * log_p).sum(-1)) * weights).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-5, rtol=1e-5)


def test_bf16_computes_in_float32():
    logits, ids = _inputs(B=2, T=6, V=300, dtype=torch.bfloat16)
    reference = logits.float()
    got = selective_log_softmax(logits, ids, chunk_rows=3)
    assert got.dtype == torch.float32
    expected = torch.log_softmax(reference, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    p = torch.softmax(reference, -1)
    torch.testing.assert_close(entropy_from_logits(logits), -(p * p.log()).sum(-1), atol=1e-5, rtol=0)
    x = logits.clone().requires_grad_()
    selective_log_softmax(x, ids).sum().backward()
    assert x.grad.dtype == torch.bfloat16 and torch.isfinite(x.grad).all()


def test_non_contiguous_logits_and_masked_vocabulary():
    logits, ids = _inputs(B=2, T=6, V=20, dtype=F64)
    view = logits[:, :-1]  # the trainer's shifted logits: not contiguous
    assert not view.is_contiguous()
    expected = torch.log_softmax(view, -1).gather(-1, ids[:, :-1, None]).squeeze(-1)
    torch.testing.assert_close(selective_log_softmax(view, ids[:, :-1], chunk_rows=3), expected)
    masked = logits.clone()
    masked[..., :5] = float("-inf")  # banned vocabulary entries: p = 0, no NaN
    x = masked.clone().requires_grad_()
    entropy = entropy_from_logits(x, chunk_rows=3)
    p = torch.softmax(masked[..., 5:], -1)
    torch.testing.assert_close(entropy, -(p * p.log()).sum(-1))
    entropy.sum().backward()
    assert torch.isfinite(x.grad).all() and (x.grad[..., :5] == 0).all()


@given(
    seed=st.integers(0, 10_000),
    shape=st.tuples(st.integers(1, 3), st.integers(1, 6), st.integers(2, 40)),
    chunk_rows=st.integers(1, 20),
    scale=st.floats(0.1, 30.0),
)
def test_property_chunking_does_not_change_results(seed, shape, chunk_rows, scale):
    B, T, V = shape
    logits, ids = _inputs(B, T, V, dtype=torch.float32, seed=seed, scale=scale)
    torch.testing.assert_close(selective_log_softmax(logits, ids, chunk_rows=chunk_rows),
                               selective_log_softmax(logits, ids))
    entropy = entropy_from_logits(logits, chunk_rows=chunk_rows)
    torch.testing.assert_close(entropy, entropy_from_logits(logits))
    assert (entropy >= -1e-5).all() and (entropy <= math.log(V) + 1e-5).all()


def test_need_entropy_false_and_errors():
    logits, ids = _inputs()
    logp, entropy = token_logprobs_and_entropy(logits, ids, need_entropy=False)
    assert entropy is None and logp.shape == ids.shape
    with pytest.raises(ValueError, match=r"\[B, T, V\]"):
        selective_log_softmax(logits[0], ids[0])
    with pytest.raises(ValueError, match=r"ids\[3, 4\]"):
        selective_log_softmax(logits, ids[:, :4])
    with pytest.raises(ValueError, match="integer"):
        selective_log_softmax(logits, ids.float())
    with pytest.raises(ValueError, match="temperature"):
        entropy_from_logits(logits, temperature=0.0)
    with pytest.raises(ValueError, match="chunk_rows"):
        entropy_from_logits(logits, chunk_rows=0)
