"""Tests for unipo.models: char tokenizer, embedded tiny Qwen2 models, load/save, LoRA, errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from transformers import AutoTokenizer

from unipo.models import (
    DEFAULT_ALPHABET,
    SPECIAL_TOKENS,
    TINY_SIZES,
    build_char_tokenizer,
    build_tiny_model,
    format_prompt,
    load_model,
    pick_device,
    save_model,
)

TOKENIZER = build_char_tokenizer()


# ------------------------------------------------------------------------------------------- tokenizer
@given(st.text(alphabet=DEFAULT_ALPHABET, max_size=80))
def test_char_tokenizer_round_trips_any_text_in_the_alphabet(text: str) -> None:
    # The literal special-token strings are read as the special tokens (as in every HF tokenizer).
    assume(not any(special in text for special in SPECIAL_TOKENS))
    ids = TOKENIZER(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text)  # one token per character, spaces and newlines included
    assert all(i >= len(SPECIAL_TOKENS) for i in ids)
    assert TOKENIZER.decode(ids) == text


def test_char_tokenizer_ids_specials_and_padding() -> None:
    assert (TOKENIZER.pad_token_id, TOKENIZER.eos_token_id, TOKENIZER.unk_token_id) == (0, 1, 2)
    assert TOKENIZER.padding_side == "left"
    assert len(TOKENIZER) == 3 + len(DEFAULT_ALPHABET) == 99
    assert " " in DEFAULT_ALPHABET and "\n" in DEFAULT_ALPHABET
    # "a" is the 65th char after space (ord 97 - 32), so id 3 + 65 = 68.
    assert TOKENIZER("a ", add_special_tokens=False)["input_ids"] == [68, 3]
    assert TOKENIZER("é", add_special_tokens=False)["input_ids"] == [2]  # outside the alphabet -> <unk>
    assert TOKENIZER.decode([68, 1, 0], skip_special_tokens=True) == "a"
    batch = TOKENIZER(["ab", "abcd"], padding=True, add_special_tokens=False)
    assert batch["input_ids"][0][:2] == [0, 0] and batch["attention_mask"][0] == [0, 0, 1, 1]


def test_char_tokenizer_custom_alphabet_and_bad_alphabet() -> None:
    tok = build_char_tokenizer("ab")
    assert len(tok) == 5 and tok.decode(tok("abba")["input_ids"]) == "abba"
    with pytest.raises(ValueError, match="alphabet"):
        build_char_tokenizer("")


def test_char_tokenizer_saves_and_loads(tmp_path) -> None:
    TOKENIZER.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "x = 1 +  2\n  done."
    assert loaded(text)["input_ids"] == TOKENIZER(text)["input_ids"]
    assert loaded.decode(loaded(text)["input_ids"]) == text
    assert (loaded.pad_token_id, loaded.eos_token_id, loaded.padding_side) == (0, 1, "left")


# ---------------------------------------------------------------------------------------------- models
def expected_qwen2_params(vocab: int, hidden: int, layers: int, heads: int, kv_heads: int, mlp: int) -> int:
    """Qwen2 parameter count by hand: q/k/v have biases, o and the MLP do not, two RMSNorms per layer,
    a final norm, and the LM head tied to the embedding (counted once)."""
    head_dim = hidden // heads
    q = hidden * hidden + hidden
    kv = 2 * (hidden * kv_heads * head_dim + kv_heads * head_dim)
    o = hidden * hidden
    mlp_params = 3 * hidden * mlp
    norms = 2 * hidden
    return vocab * hidden + layers * (q + kv + o + mlp_params + norms) + hidden


@pytest.mark.parametrize(("size", "nominal"), [("tiny", 1.0e6), ("small", 31.5e6)])
def test_tiny_model_parameter_count(size: str, nominal: float) -> None:
    model, tokenizer = build_tiny_model(size)
    shape = TINY_SIZES[size]
    expected = expected_qwen2_params(
        len(tokenizer), shape["hidden_size"], shape["num_hidden_layers"], shape["num_attention_heads"],
        shape["num_key_value_heads"], shape["intermediate_size"],
    )
    # tiny: 99*128 + 4*(16512 + 16512 + 16384 + 196608 + 256) + 128 = 997,888
    # small: 99*512 + 8*(262656 + 262656 + 262144 + 3145728 + 1024) + 512 = 31,524,864
    assert expected == {"tiny": 997_888, "small": 31_524_864}[size]
    actual = sum(p.numel() for p in model.parameters())
    assert actual == expected
    assert abs(actual - nominal) / nominal < 0.05


def test_tiny_model_config_dtype_and_seed() -> None:
    model, tokenizer = build_tiny_model("tiny", seed=3)
    for config in (model.config, model.generation_config):
        assert (config.pad_token_id, config.eos_token_id, config.bos_token_id) == (0, 1, 1)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    state = torch.random.get_rng_state()
    same, _ = build_tiny_model("tiny", seed=3)
    other, _ = build_tiny_model("tiny", seed=4)
    assert torch.equal(torch.random.get_rng_state(), state)  # building never touches the caller's RNG
    assert torch.equal(model.model.embed_tokens.weight, same.model.embed_tokens.weight)
    assert not torch.equal(model.model.embed_tokens.weight, other.model.embed_tokens.weight)
    with pytest.raises(ValueError, match="huge"):
        build_tiny_model("huge")


def test_save_then_load_gives_identical_logits(tmp_path) -> None:
    model, tokenizer = load_model("tiny", device="cpu")
    save_model(model, tokenizer, tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "model.safetensors").is_file()
    loaded, loaded_tok = load_model(tmp_path / "ckpt", device="cpu")
    ids = torch.tensor([loaded_tok("hello world")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    assert loaded_tok.padding_side == "left" and loaded_tok.pad_token_id == 0
    assert next(loaded.parameters()).dtype == torch.float32


def test_load_model_tiny_names() -> None:
    small, _ = load_model("tiny:small", device="cpu")
    assert small.config.hidden_size == 512
    half, _ = load_model("tiny", device="cpu", dtype="bfloat16")
    assert next(half.parameters()).dtype == torch.bfloat16


def test_lora_leaves_only_lora_params_trainable() -> None:
    model, _ = load_model("tiny", device="cpu", lora={"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]})
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    # 4 layers x 2 modules x (A: r*in + B: out*r); q: 128 -> 128, v: 128 -> 64.
    expected = 4 * ((4 * 128 + 128 * 4) + (4 * 128 + 64 * 4))
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected
    with pytest.raises(ValueError, match="rank"):
        load_model("tiny", device="cpu", lora={"rank": 4})


def test_unknown_path_raises_value_error_naming_it(tmp_path) -> None:
    missing = tmp_path / "no_such_model"
    with pytest.raises(ValueError, match="no_such_model") as err:
        load_model(missing, device="cpu")
    assert "\n" not in str(err.value)
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(ValueError, match="empty_dir"):
        load_model(empty, device="cpu")
    with pytest.raises(ValueError, match="missing_rel"):
        load_model("./missing_rel", device="cpu")


def test_pick_device() -> None:
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="cuda:1"):
            pick_device("cuda:1")


def test_format_prompt_uses_chat_template_when_present() -> None:
    tok = build_char_tokenizer()
    assert format_prompt(tok, "2+2?") == "2+2?"
    tok.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    assert format_prompt(tok, "2+2?") == "<user>2+2?<assistant>"


def test_a_lora_checkpoint_reloads_with_its_base_and_stays_trainable(tmp_path):
    """save_pretrained of a LoRA model writes only the adapter; load_model finds the base again."""
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    model, tokenizer = build_tiny_model("tiny", seed=0)
    save_model(model, tokenizer, base_dir)
    lora_model, tokenizer = load_model(str(base_dir), lora={"r": 4}, device="cpu")
    with torch.no_grad():  # make the adapter non-trivial (LoRA's B starts at zero)
        for name, param in lora_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    save_model(lora_model, tokenizer, adapter_dir)
    assert (adapter_dir / "adapter_config.json").exists() and not (adapter_dir / "model.safetensors").exists()
    again, _ = load_model(str(adapter_dir), device="cpu")
    ids = torch.tensor([tokenizer("12+34=")["input_ids"]])
    torch.testing.assert_close(again(ids).logits, lora_model(ids).logits)
    assert {n for n, p in again.named_parameters() if p.requires_grad} == {
        n for n, p in lora_model.named_parameters() if p.requires_grad}


def test_a_saved_tiny_model_reads_spaces_after_reloading(tmp_path):
    """Regression: transformers 5 picked Qwen2Tokenizer for a saved tiny model (from model_type) and
    silently dropped spaces, so "sort 2 8:" was read as "sort28:"."""
    model, tokenizer = build_tiny_model("tiny", seed=0)
    save_model(model, tokenizer, tmp_path)
    _, again = load_model(str(tmp_path), device="cpu")
    text = "sort 2 8 4 0: 0 2 4 8"
    assert again(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert again.decode(again(text)["input_ids"]) == text
