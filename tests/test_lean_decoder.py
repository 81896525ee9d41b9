"""The lean forward (unipo.lean_decoder) against the Hugging Face forward it replaces: logits, log-probs, entropy,
hidden states and gradients, on padded prompts, groups sharing a prompt and rows that stopped early; and the
models it must refuse (then the HF path runs)."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import unipo.rollout as rollout
from unipo.lean_decoder import LeanDecoder, NoCache, lean_decoder, positions_from_mask, prefill_mask
from unipo.models import build_tiny_model, load_model
from unipo.rollout import generate, left_pad, policy_logprobs

PAD, EOS = 0, 1


def _sharpened(model, scale: float = 3.0):
    """Larger weights than the 0.02-std init, so that attention, positions and masks visibly matter."""
    with torch.no_grad():
        for weight in model.parameters():
            if weight.dim() == 2:
                weight.mul_(scale)
    return model


def _tiny_llama():
    config = LlamaConfig(vocab_size=40, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)
    torch.manual_seed(3)
    return _sharpened(LlamaForCausalLM(config).eval())


QWEN = _sharpened(build_tiny_model("tiny")[0])
LLAMA = _tiny_llama()
EOS_MODEL, EOS_TOKENIZER = build_tiny_model("tiny", alphabet="ab", seed=1)
_sharpened(EOS_MODEL)


def _hf_only(monkeypatch) -> None:
    monkeypatch.setattr(rollout, "lean_decoder", lambda model: None)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


# ----------------------------------------------------------------------------------------------- which models
def test_plain_qwen2_and_llama_get_a_lean_decoder() -> None:
    assert isinstance(lean_decoder(QWEN), LeanDecoder)
    assert isinstance(lean_decoder(LLAMA), LeanDecoder)


def test_models_it_cannot_reproduce_fall_back_to_hf() -> None:
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=20, n_embd=16, n_layer=1, n_head=2, n_positions=16))
    assert lean_decoder(gpt2) is None
    lora, _ = load_model("tiny", device="cpu", lora={"r": 2})
    assert lean_decoder(lora) is None and lean_decoder(lora.get_base_model()) is None  # LoRA layers
    patched = copy.deepcopy(QWEN)
    patched.forward = lambda *a, **k: None  # e.g. TRL's fused LM head replaces the instance's forward
    assert lean_decoder(patched) is None
    hooked = copy.deepcopy(QWEN)
    hooked.model.layers[0].mlp.down_proj.register_forward_hook(lambda *a: None)
    assert lean_decoder(hooked) is None
    scaled = copy.deepcopy(QWEN)
    scaled.config.rope_parameters = {**scaled.config.rope_parameters, "rope_type": "linear", "factor": 2.0}
    assert lean_decoder(scaled) is None


# ------------------------------------------------------------------------------------------------- the forward
@pytest.mark.parametrize("model", [QWEN, LLAMA], ids=["qwen2", "llama"])
def test_prefill_logits_equal_the_hf_forward_on_padded_prompts(model) -> None:
    ids, mask = left_pad([[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16]], PAD)
    with torch.no_grad():
        reference = model(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask)).logits
        lean = lean_decoder(model)
        ours = lean.logits(lean.hidden(ids, positions_from_mask(mask), prefill_mask(mask), NoCache()))
    real = mask.bool()
    torch.testing.assert_close(ours[real], reference[real], rtol=1e-5, atol=1e-5)
    assert torch.isfinite(ours).all()  # padding queries attend to themselves: no NaN anywhere


def _policy_batch():
    """Groups of 3 rows sharing a prompt, prompts of different lengths, completions that stop early."""
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12], [13]]
    prompt_ids, prompt_mask = left_pad([p for p in prompts for _ in range(3)], PAD)
    gen = torch.Generator().manual_seed(0)
    completion_ids = torch.randint(3, 40, (9, 6), generator=gen)
    lengths = torch.tensor([6, 2, 4, 6, 6, 1, 3, 5, 6])
    completion_mask = (torch.arange(6)[None] < lengths[:, None]).long()
    completion_ids = completion_ids.masked_fill(completion_mask == 0, PAD)
    return prompt_ids, prompt_mask, completion_ids, completion_mask


def _logprobs_and_grads(model, batch, **kwargs):
    model.zero_grad(set_to_none=True)
    out = policy_logprobs(model, *batch, temperature=0.7, need_entropy=True, return_hidden=True, **kwargs)
    weights = torch.linspace(-1, 1, out.logp.numel()).view_as(out.logp)
    ((out.logp * weights).sum() + out.entropy.sum() + out.hidden.pow(2).mean()).backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    return out, grads


@pytest.mark.parametrize("model", [QWEN, LLAMA], ids=["qwen2", "llama"])
@pytest.mark.parametrize("padded", [True, False], ids=["mixed-lengths", "one-length"])
def test_policy_logprobs_and_gradients_equal_the_hf_path(model, padded, monkeypatch) -> None:
    batch = _policy_batch()
    if not padded:
        batch = (batch[0][:, -1:], batch[1][:, -1:], *batch[2:])  # every prompt one token long
    model = copy.deepcopy(model).train()
    lean_out, lean_grads = _logprobs_and_grads(model, batch)
    _hf_only(monkeypatch)
    hf_out, hf_grads = _logprobs_and_grads(model, batch)
    for name in ("logp", "entropy", "hidden"):
        torch.testing.assert_close(getattr(lean_out, name), getattr(hf_out, name), rtol=1e-5, atol=1e-5)
    assert _relative(lean_grads, hf_grads) < 1e-5


def test_rows_with_distinct_prompts_still_match(monkeypatch) -> None:
    """No two consecutive rows share a prompt: one prompt pass per row, same numbers."""
    prompt_ids, prompt_mask, completion_ids, completion_mask = _policy_batch()
    order = torch.tensor([0, 3, 6, 1, 4, 7, 2, 5, 8])
    batch = (prompt_ids[order], prompt_mask[order], completion_ids[order], completion_mask[order])
    lean_out = policy_logprobs(QWEN, *batch)
    _hf_only(monkeypatch)
    torch.testing.assert_close(lean_out.logp, policy_logprobs(QWEN, *batch).logp, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------- generation
@pytest.mark.parametrize("model", [QWEN, LLAMA], ids=["qwen2", "llama"])
def test_lean_greedy_decoding_equals_hf_decoding(model, monkeypatch) -> None:
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12], [13]]
    lean = generate(model, prompts, group_size=2, max_new_tokens=10, eos_token_id=EOS, pad_token_id=PAD, greedy=True)
    _hf_only(monkeypatch)
    hf = generate(model, prompts, group_size=2, max_new_tokens=10, eos_token_id=EOS, pad_token_id=PAD, greedy=True)
    assert torch.equal(lean.completion_ids, hf.completion_ids)
    torch.testing.assert_close(lean.sampling_logp, hf.sampling_logp, rtol=1e-5, atol=1e-5)


def test_lean_sampling_log_probs_are_the_policy_log_probs_of_the_samples() -> None:
    """Sampled with EOS stops: the recorded log-probs equal a fresh training forward's (ratio 1 at step 0)."""
    prompts = [EOS_TOKENIZER(t, add_special_tokens=False)["input_ids"] for t in ["ab", "abba", "b"]]
    gen = generate(EOS_MODEL, prompts, group_size=4, max_new_tokens=12, eos_token_id=EOS, pad_token_id=PAD,
                   generator=torch.Generator().manual_seed(1))
    assert (gen.completion_mask.sum(1) < 12).any()  # some rows stopped early
    logp = policy_logprobs(EOS_MODEL, gen.prompt_ids, gen.prompt_mask, gen.completion_ids, gen.completion_mask).logp
    torch.testing.assert_close(logp, gen.sampling_logp, rtol=1e-5, atol=1e-5)


def test_a_sampled_padding_token_gets_no_embedding_gradient_as_in_hf(monkeypatch) -> None:
    """A sampled completion may contain the padding token's id as a real token (an untrained model samples it).
    HF's embedding (padding_idx) never sends a lookup's gradient to that row; the lean forward must not either,
    or the two paths train differently (seen as a mismatch between FSDP, which takes the HF path, and one process)."""
    prompt_ids, prompt_mask, completion_ids, completion_mask = _policy_batch()
    completion_ids[0, 2] = PAD  # inside row 0's mask: a real token that happens to be the padding id
    batch = (prompt_ids, prompt_mask, completion_ids, completion_mask)
    model = copy.deepcopy(QWEN).train()
    assert model.model.embed_tokens.padding_idx == PAD
    _logprobs_and_grads(model, batch)
    lean_row = model.model.embed_tokens.weight.grad[PAD].clone()
    _hf_only(monkeypatch)
    _logprobs_and_grads(model, batch)
    hf_row = model.model.embed_tokens.weight.grad[PAD]
    torch.testing.assert_close(lean_row, hf_row, rtol=1e-4, atol=1e-5)
