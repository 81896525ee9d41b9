"""Tests for unipo.rollout: the decode loop and the policy log-prob forward, to the last token.

The "tiny" model is random-init, so its text is gibberish but deterministic. A 2-letter-alphabet variant
(vocab = <pad>, <eos>, <unk>, a, b) emits EOS often, which exercises stopping, masking and trimming.
"""

from __future__ import annotations

import copy

import pytest
import torch

from unipo.models import build_tiny_model, load_model, save_model
from unipo.rollout import Generation, _plain_sdpa_model, generate, left_pad, policy_logprobs, top_p_filter

PAD, EOS = 0, 1


def _sharpened(model, scale: float = 3.0):
    """Scale every weight matrix: at the default init (std 0.02) attention is nearly uniform, positions barely
    matter and greedy decoding mostly repeats the last prompt character, which would let position or cache
    bugs slip through. At 3x the logits stay moderate (fp32 cached-vs-full differences ~3e-6)."""
    with torch.no_grad():
        for weight in model.parameters():
            if weight.dim() == 2:
                weight.mul_(scale)
    return model


MODEL, TOKENIZER = build_tiny_model("tiny")
_sharpened(MODEL)
EOS_MODEL, EOS_TOKENIZER = build_tiny_model("tiny", alphabet="ab", seed=1)
_sharpened(EOS_MODEL)
PROMPT_TEXTS = ["1+1=", "hello world, a much longer prompt", "x", "The quick brown fox"]
PROMPTS = [TOKENIZER(t, add_special_tokens=False)["input_ids"] for t in PROMPT_TEXTS]
AB_PROMPTS = [EOS_TOKENIZER(t, add_special_tokens=False)["input_ids"] for t in ["ab", "abba", "b", "aaabbb"]]


def _generate(model, prompts, **kwargs) -> Generation:
    kwargs.setdefault("group_size", 1)
    kwargs.setdefault("max_new_tokens", 12)
    return generate(model, prompts, eos_token_id=EOS, pad_token_id=PAD, **kwargs)


def _reference_logprobs(model, prompt: list[int], completion: list[int], temperature: float
                        ) -> tuple[list[float], list[float]]:
    """Brute force in float64: one unpadded forward of prompt + completion for this row alone, then
    log p(y_t) = z[y_t] - log Σ_v exp(z_v) and H_t = -Σ_v p_v log p_v with plain loops."""
    model64 = copy.deepcopy(model).double()
    with torch.no_grad():
        logits = model64(torch.tensor([prompt + completion])).logits[0]  # [P + T, V]
    logps, entropies = [], []
    for t, token in enumerate(completion):
        z = [float(v) / temperature for v in logits[len(prompt) - 1 + t]]
        peak = max(z)
        log_norm = peak + torch.tensor([v - peak for v in z], dtype=torch.float64).exp().sum().log().item()
        logps.append(z[token] - log_norm)
        entropies.append(-sum(torch.tensor(v - log_norm).exp().item() * (v - log_norm) for v in z))
    return logps, entropies


def _rows(gen: Generation) -> list[tuple[list[int], list[int]]]:
    """Each row as (unpadded prompt, completion up to and including EOS)."""
    out = []
    for b in range(gen.prompt_ids.shape[0]):
        prompt = gen.prompt_ids[b][gen.prompt_mask[b].bool()].tolist()
        out.append((prompt, gen.completion_ids[b][gen.completion_mask[b].bool()].tolist()))
    return out


# ------------------------------------------------------------------------------------ 1. shared prompt cache
@pytest.mark.parametrize("model,prompts", [(MODEL, PROMPTS), (EOS_MODEL, AB_PROMPTS)])
def test_greedy_with_shared_cache_equals_each_completion_decoded_alone(model, prompts) -> None:
    group = 3
    shared = _generate(model, prompts, group_size=group, greedy=True, max_new_tokens=16)
    unshared = _generate(model, prompts, group_size=group, greedy=True, max_new_tokens=16, share_prompt_cache=False)
    assert torch.equal(shared.completion_ids, unshared.completion_ids)
    for i, prompt in enumerate(prompts):
        alone = _generate(model, [prompt], greedy=True, max_new_tokens=16, share_prompt_cache=False)
        length = alone.completion_ids.shape[1]
        for g in range(group):
            row = i * group + g
            assert shared.completion_ids[row, :length].tolist() == alone.completion_ids[0].tolist()
            assert (shared.completion_ids[row, length:] == PAD).all()
            assert torch.equal(shared.prompt_ids[row][shared.prompt_mask[row].bool()], torch.tensor(prompt))
        torch.testing.assert_close(shared.sampling_logp[i * group, :length], alone.sampling_logp[0],
                                   atol=1e-5, rtol=0)


def test_fast_decode_path_matches_the_plain_hf_path() -> None:
    # SDPA models decode with a preallocated KV cache and a ready 4D mask; others (here: eager attention)
    # with HF's own DynamicCache and 2D mask. Both must give the same tokens and log-probs.
    plain = copy.deepcopy(EOS_MODEL)
    plain.set_attn_implementation("eager")
    assert _plain_sdpa_model(EOS_MODEL) and not _plain_sdpa_model(plain)
    for share in (True, False):
        for kwargs in ({"greedy": True}, {"temperature": 0.9}):
            fast_gen, plain_gen = (
                _generate(model, AB_PROMPTS, group_size=4, max_new_tokens=24, share_prompt_cache=share,
                          generator=torch.Generator().manual_seed(2), **kwargs)
                for model in (EOS_MODEL, plain)
            )
            assert torch.equal(fast_gen.completion_ids, plain_gen.completion_ids)
            assert torch.equal(fast_gen.truncated, plain_gen.truncated)
            torch.testing.assert_close(fast_gen.sampling_logp, plain_gen.sampling_logp, atol=1e-5, rtol=0)


def test_prompts_are_left_padded_and_repeated_per_group() -> None:
    gen = _generate(MODEL, PROMPTS, group_size=2, max_new_tokens=2, greedy=True)
    width = max(len(p) for p in PROMPTS)
    assert gen.prompt_ids.shape == (8, width)
    assert gen.prompt_mask[2].tolist() == [0] * (width - len(PROMPTS[1])) + [1] * len(PROMPTS[1])
    assert gen.prompt_ids[5].tolist() == [PAD] * (width - 1) + PROMPTS[2]  # row i*G+g = prompt 2, completion 1
    ids, mask = left_pad([[5, 6], [7]], pad_token_id=PAD)
    assert ids.tolist() == [[5, 6], [0, 7]] and mask.tolist() == [[1, 1], [0, 1]]


# --------------------------------------------------------------------- 2. sampling log-probs == policy log-probs
@pytest.mark.parametrize("temperature", [0.7, 1.0])
@pytest.mark.parametrize("model,prompts", [(MODEL, PROMPTS), (EOS_MODEL, AB_PROMPTS)])
def test_sampling_logp_equals_policy_logprobs(model, prompts, temperature: float) -> None:
    gen = _generate(model, prompts, group_size=4, max_new_tokens=20, temperature=temperature,
                    generator=torch.Generator().manual_seed(0))
    assert gen.sampling_logp.dtype == torch.float32
    with torch.no_grad():
        out = policy_logprobs(model, gen.prompt_ids, gen.prompt_mask, gen.completion_ids, gen.completion_mask,
                              temperature=temperature)
    assert out.logp.shape == gen.completion_ids.shape and out.entropy is None and out.hidden is None
    torch.testing.assert_close(out.logp, gen.sampling_logp, atol=1e-5, rtol=0)
    assert (gen.sampling_logp[gen.completion_mask == 0] == 0).all() and (out.logp[gen.completion_mask == 0] == 0).all()
    assert (gen.sampling_logp[gen.completion_mask == 1] < 0).all()


# ------------------------------------------------------------------ 3. padding and trimming change nothing
def test_padding_and_trimming_do_not_change_logprobs_and_match_float64_reference() -> None:
    temperature = 0.8
    gen = torch.Generator().manual_seed(1)
    rows = []
    for prompt_len, completion_len in [(3, 5), (11, 2), (1, 7), (6, 1)]:
        rows.append((torch.randint(3, 99, (prompt_len,), generator=gen).tolist(),
                     torch.randint(3, 99, (completion_len,), generator=gen).tolist()))
    # A batch with 9 extra all-pad prompt columns on the left and 6 extra masked completion columns.
    prompt_ids, prompt_mask = left_pad([p for p, _ in rows], PAD)
    prompt_ids = torch.cat([torch.full((4, 9), PAD), prompt_ids], dim=1)
    prompt_mask = torch.cat([torch.zeros(4, 9, dtype=torch.long), prompt_mask], dim=1)
    width = max(len(c) for _, c in rows) + 6
    completion_ids = torch.full((4, width), PAD)
    completion_mask = torch.zeros((4, width), dtype=torch.long)
    for b, (_, completion) in enumerate(rows):
        completion_ids[b, :len(completion)] = torch.tensor(completion)
        completion_mask[b, :len(completion)] = 1
    with torch.no_grad():
        batch = policy_logprobs(MODEL, prompt_ids, prompt_mask, completion_ids, completion_mask,
                                temperature=temperature, need_entropy=True)
    assert batch.logp.shape == batch.entropy.shape == (4, width)
    assert (batch.logp[completion_mask == 0] == 0).all() and (batch.entropy[completion_mask == 0] == 0).all()
    for b, (prompt, completion) in enumerate(rows):
        with torch.no_grad():
            alone = policy_logprobs(MODEL, torch.tensor([prompt]), torch.ones(1, len(prompt)),
                                    torch.tensor([completion]), torch.ones(1, len(completion)),
                                    temperature=temperature, need_entropy=True)
        n = len(completion)
        torch.testing.assert_close(batch.logp[b, :n], alone.logp[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(batch.entropy[b, :n], alone.entropy[0], atol=1e-5, rtol=0)
        ref_logp, ref_entropy = _reference_logprobs(MODEL, prompt, completion, temperature)
        for got, want in ((batch.logp[b, :n], ref_logp), (batch.entropy[b, :n], ref_entropy)):
            torch.testing.assert_close(got.double(), torch.tensor(want, dtype=torch.float64), atol=1e-5, rtol=0)


def test_policy_logprobs_all_masked_completions_give_zeros() -> None:
    prompt_ids, prompt_mask = left_pad(PROMPTS[:2], PAD)
    completion_ids = torch.full((2, 5), PAD)
    out = policy_logprobs(MODEL, prompt_ids, prompt_mask, completion_ids, torch.zeros(2, 5), need_entropy=True,
                          return_hidden=True)
    assert (out.logp == 0).all() and (out.entropy == 0).all() and out.hidden.shape == (2, 5, 128)
    with pytest.raises(ValueError, match="prompt_mask"):
        policy_logprobs(MODEL, prompt_ids, torch.zeros_like(prompt_mask), completion_ids, torch.ones(2, 5))
    with pytest.raises(ValueError, match=r"\[2, 5\]"):
        policy_logprobs(MODEL, prompt_ids, prompt_mask, completion_ids, torch.ones(2, 4))


def test_policy_logprobs_hidden_predicts_the_tokens_and_gradients_flow() -> None:
    gen = _generate(EOS_MODEL, AB_PROMPTS, group_size=2, max_new_tokens=10,
                    generator=torch.Generator().manual_seed(3))
    model = copy.deepcopy(EOS_MODEL).train()
    out = policy_logprobs(model, gen.prompt_ids, gen.prompt_mask, gen.completion_ids, gen.completion_mask,
                          return_hidden=True)
    mask = gen.completion_mask.bool()
    assert out.hidden.shape == (*gen.completion_ids.shape, 128) and (out.hidden[~mask] == 0).all()
    # The LM head applied to `hidden` reproduces the log-probs: it is the state that predicts each token.
    from_hidden = torch.log_softmax(model.lm_head(out.hidden), -1).gather(-1, gen.completion_ids[..., None])[..., 0]
    torch.testing.assert_close(from_hidden[mask], out.logp[mask], atol=1e-5, rtol=0)
    # Generation outputs are ordinary tensors (not inference tensors) that autograd may save.
    loss = -(out.logp * gen.sampling_logp).sum() + out.hidden.square().mean()
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None for g in grads) and any(float(g.abs().sum()) > 0 for g in grads)


# ----------------------------------------------------------------------------------------- 4. seeds
def test_same_seed_same_completions_different_seed_different() -> None:
    def sample(seed: int) -> Generation:
        return _generate(MODEL, PROMPTS, group_size=4, max_new_tokens=12, generator=torch.Generator().manual_seed(seed))

    first, again, other = sample(7), sample(7), sample(8)
    assert torch.equal(first.completion_ids, again.completion_ids)
    assert torch.equal(first.sampling_logp, again.sampling_logp)
    assert not torch.equal(first.completion_ids, other.completion_ids)
    # The G completions of one prompt differ from each other (they are samples, not copies).
    assert len({tuple(r) for r in first.completion_ids[:4].tolist()}) > 1


# --------------------------------------------------------------------- 5. lengths, EOS, masks, truncation
@pytest.mark.parametrize("max_new_tokens", [1, 3, 40])
def test_max_new_tokens_eos_masks_and_truncation(max_new_tokens: int) -> None:
    gen = _generate(EOS_MODEL, AB_PROMPTS, group_size=8, max_new_tokens=max_new_tokens,
                    generator=torch.Generator().manual_seed(5))
    ids, mask = gen.completion_ids, gen.completion_mask
    lengths = mask.sum(dim=1)
    assert ids.shape[1] <= max_new_tokens
    assert ids.shape[1] == int(lengths.max())  # trimmed to the longest completion actually generated
    saw_eos = saw_truncated = False
    for b in range(ids.shape[0]):
        n = int(lengths[b])
        assert mask[b].tolist() == [1] * n + [0] * (ids.shape[1] - n)  # a prefix mask
        assert (ids[b, n:] == PAD).all()
        eos_positions = (ids[b, :n] == EOS).nonzero().flatten().tolist()
        if gen.truncated[b]:
            saw_truncated = True
            assert n == max_new_tokens and eos_positions == []
        else:
            saw_eos = True
            assert eos_positions == [n - 1]  # the EOS is the last masked-in token
    if max_new_tokens == 40:  # EOS comes often in the ab-model: both cases occur, and all rows stop early
        assert saw_eos and ids.shape[1] < max_new_tokens
    if max_new_tokens == 1:
        assert saw_truncated and ids.shape == (32, 1)


# ------------------------------------------------------------------------------------------- 6. top-p
def test_top_p_filter_hand_computed() -> None:
    probs = torch.tensor([[0.1, 0.5, 0.15, 0.25]])
    # Descending: 0.5, 0.25, 0.15, 0.1; mass before each: 0, 0.5, 0.75, 0.9.
    # top_p=0.7 keeps {0.5, 0.25} (0.75 >= 0.7); top_p=0.76 adds 0.15; top_p=0.4 keeps only 0.5.
    def kept(top_p: float) -> list[bool]:
        filtered = top_p_filter(probs, top_p)
        assert torch.equal(filtered[filtered > 0], probs[filtered > 0])  # kept entries are untouched
        return (filtered > 0)[0].tolist()

    assert kept(0.7) == [False, True, False, True]
    assert kept(0.76) == [False, True, True, True]
    assert kept(0.4) == [False, True, False, False]
    assert kept(1.0) == [True, True, True, True]
    # Exact (dyadic) masses: descending 0.5, 0.25, 0.125 (id 0), 0.125 (id 2); mass before: 0, .5, .75, .875.
    probs = torch.tensor([[0.125, 0.5, 0.125, 0.25]])
    assert kept(0.75) == [False, True, False, True]  # {0.5, 0.25} already reaches 0.75: the smallest set
    assert kept(0.8) == [True, True, False, True]  # the tie between ids 0 and 2 goes to the lower id


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tiny_top_p_samples_only_the_argmax(seed: int) -> None:
    greedy = _generate(MODEL, PROMPTS, group_size=2, greedy=True)
    nucleus = _generate(MODEL, PROMPTS, group_size=2, top_p=1e-6, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(nucleus.completion_ids, greedy.completion_ids)


def test_sampled_tokens_lie_in_the_top_p_nucleus() -> None:
    top_p, temperature = 0.5, 1.3
    gen = _generate(MODEL, PROMPTS, group_size=8, max_new_tokens=8, top_p=top_p, temperature=temperature,
                    generator=torch.Generator().manual_seed(4))
    ids = torch.cat([gen.prompt_ids, gen.completion_ids], dim=1)
    mask = torch.cat([gen.prompt_mask, gen.completion_mask], dim=1)
    with torch.no_grad():
        logits = MODEL(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    width = gen.prompt_ids.shape[1]
    for t in range(gen.completion_ids.shape[1]):
        probs = torch.softmax(logits[:, width - 1 + t] / temperature, dim=-1)
        allowed = top_p_filter(probs, top_p) > 0
        chosen = allowed.gather(-1, gen.completion_ids[:, t:t + 1])[:, 0]
        assert chosen[gen.completion_mask[:, t].bool()].all()
    with pytest.raises(ValueError, match="top_p"):
        _generate(MODEL, PROMPTS, top_p=0.0)


# ---------------------------------------------------------------------------------- 7. reload and LoRA
def test_generate_on_a_reloaded_model_and_a_lora_model(tmp_path) -> None:
    reference = _generate(MODEL, PROMPTS, group_size=2, greedy=True)
    save_model(MODEL, TOKENIZER, tmp_path / "tiny")
    reloaded, _ = load_model(tmp_path / "tiny", device="cpu")
    assert torch.equal(_generate(reloaded, PROMPTS, group_size=2, greedy=True).completion_ids,
                       reference.completion_ids)

    lora_model, _ = load_model(tmp_path / "tiny", device="cpu", lora={"r": 4, "alpha": 8})
    # LoRA's B matrices start at zero, so the wrapped model decodes exactly like the base model.
    lora_greedy = _generate(lora_model, PROMPTS, group_size=2, greedy=True)
    assert torch.equal(lora_greedy.completion_ids, reference.completion_ids)
    sampled = _generate(lora_model, PROMPTS, group_size=3, max_new_tokens=8, temperature=0.9,
                        generator=torch.Generator().manual_seed(0))
    lora_model.train()
    out = policy_logprobs(lora_model, sampled.prompt_ids, sampled.prompt_mask, sampled.completion_ids,
                          sampled.completion_mask, temperature=0.9, return_hidden=True)
    torch.testing.assert_close(out.logp.detach(), sampled.sampling_logp, atol=1e-5, rtol=0)
    out.logp.sum().backward()
    trained = [name for name, p in lora_model.named_parameters() if p.grad is not None]
    assert trained and all("lora_" in name for name in trained)


def test_greedy_accepts_temperature_zero() -> None:
    at_one = _generate(MODEL, PROMPTS, greedy=True)
    at_zero = _generate(MODEL, PROMPTS, greedy=True, temperature=0.0)
    assert torch.equal(at_zero.completion_ids, at_one.completion_ids)
    assert torch.equal(at_zero.sampling_logp, at_one.sampling_logp)


def test_generate_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="non-empty"):
        _generate(MODEL, [[5], []])
    with pytest.raises(ValueError, match="group_size"):
        _generate(MODEL, PROMPTS, group_size=0)
    with pytest.raises(ValueError, match="temperature"):
        _generate(MODEL, PROMPTS, temperature=0.0)
