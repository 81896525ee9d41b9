"""Models and tokenizers: the embedded tiny Qwen2 + character tokenizer, and one loader for everything else.

`load_model` is the single entry point the trainer uses: a local directory, a hub id, or the special names
`"tiny"` / `"tiny:small"` (random-init Qwen2 models over a character vocabulary, built in memory, so tests
and benchmarks never touch the network). Optional LoRA wrapping goes through peft.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from unipo.config import LORA_KEYS

PAD_TOKEN, EOS_TOKEN, UNK_TOKEN = "<pad>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD_TOKEN, EOS_TOKEN, UNK_TOKEN)  # ids 0, 1, 2

# Printable ASCII (space .. tilde) plus newline: enough for arithmetic, code-like and chat-like toy tasks.
DEFAULT_ALPHABET = "".join(chr(c) for c in range(32, 127)) + "\n"

# Qwen2 shapes of the embedded models. With the 99-token default vocabulary and tied embeddings:
# "tiny" ~ 1.0M parameters, "small" ~ 31.5M (the tests recompute both by hand).
TINY_SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(
        hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, intermediate_size=512
    ),
    "small": dict(
        hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4, intermediate_size=2048
    ),
    # Qwen2.5-0.5B's decoder shape (0.36B parameters over the char vocabulary): the GPU benchmark's model
    "0.5b": dict(
        hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, intermediate_size=4864
    ),
}

_LORA_KEYS = set(LORA_KEYS)
TINY_MAX_POSITIONS = 512  # the embedded models' context (max_position_embeddings)
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


# ----------------------------------------------------------------------------------------------- tokenizer
def build_char_tokenizer(alphabet: str = DEFAULT_ALPHABET) -> PreTrainedTokenizerFast:
    """A character-level tokenizer: one id per character of `alphabet`, after `<pad>`=0, `<eos>`=1, `<unk>`=2.

    Every character is its own pre-token (a regex split matching any single character, newlines included) and the
    decoder fuses tokens without separators, so encode/decode round-trips any text over the alphabet.
    Characters outside the alphabet map to `<unk>`. As with any HF tokenizer, the literal strings
    `<pad>`/`<eos>`/`<unk>` in input text are read as the special tokens themselves.
    """
    chars = list(dict.fromkeys(alphabet))  # dedupe, keep order
    clash = [c for c in chars if c in SPECIAL_TOKENS]
    if clash or not chars:
        raise ValueError(f"alphabet must be non-empty single characters, got {alphabet!r}")
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab.update({c: len(SPECIAL_TOKENS) + i for i, c in enumerate(chars)})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        padding_side="left",
        clean_up_tokenization_spaces=False,  # the default cleanup would eat the space in "a ."
    )
    return tokenizer


# ------------------------------------------------------------------------------------------------- models
def build_tiny_model(
    size: str = "tiny", *, alphabet: str = DEFAULT_ALPHABET, seed: int = 0, max_positions: int = TINY_MAX_POSITIONS,
    dtype: torch.dtype | str | None = None,
) -> tuple[Qwen2ForCausalLM, PreTrainedTokenizerFast]:
    """A randomly initialised (seeded) Qwen2ForCausalLM of shape `TINY_SIZES[size]` + its char tokenizer. The
    weights are drawn in float32 and then stored in `dtype` (None: float32), so every dtype rounds the same model."""
    torch_dtype = _resolve_dtype(dtype)
    if size not in TINY_SIZES:
        raise ValueError(f"unknown tiny model size {size!r}; valid: {sorted(TINY_SIZES)}")
    tokenizer = build_char_tokenizer(alphabet)
    special = dict(
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id
    )
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        use_cache=True,
        **TINY_SIZES[size],
        **special,
    )
    # Weight init draws from the global RNG: fork it so building a model never perturbs the caller's stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config).to(torch.float32)
    model = model.to(torch_dtype)
    for key, value in special.items():
        setattr(model.generation_config, key, value)
    model.eval()
    return model, tokenizer


def pick_device(device: str | torch.device = "auto") -> torch.device:
    """`"auto"` -> CUDA when available else CPU; anything else is passed to `torch.device`."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    return torch.device(device)


def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    # float32 by default: the maths (ratios, KL) is checked to 1e-5 and CPU bf16 matmuls are slow anyway.
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; valid: {sorted(_DTYPES)}")
    return _DTYPES[dtype]


class ModelSourceError(ValueError):
    """`--model` names something that cannot be loaded: one line naming it and what is wrong."""


class PromptTooLongError(ValueError):
    """A prompt plus its completion budget does not fit in the model's context."""


# A folder must hold one of these to be a model (weights) or to carry its own tokenizer.
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
ADAPTER_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                   "sentencepiece.bpe.model", "tiktoken.model")


def _is_tiny(name: str) -> bool:
    return name == "tiny" or name.startswith("tiny:")


def _looks_local(name: str) -> bool:
    """True when `name` must be a filesystem path, not a hub id (`org/name`): it exists, starts with `.`, `~` or
    `/`, has a backslash or more than one `/`, is `dir/name` whose `dir` exists here (`runs/ckpt`), or is a bare
    name (`mycheckpoint`: hub ids have an org; a missing bare name is a missing folder, not a hub lookup)."""
    if os.path.exists(os.path.expanduser(name)) or name.startswith((".", "/", "~")) or "\\" in name:
        return True
    if name.count("/") > 1 or (os.sep != "/" and os.sep in name):
        return True
    if "/" in name:
        return os.path.isdir(name.split("/", 1)[0])
    return True


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def _check_local_model_dir(path: str) -> None:
    """One ModelSourceError line unless `path` is a loadable model folder: it exists, its config.json is valid
    JSON, its weight files are there and complete (safetensors headers against file sizes), and it has tokenizer
    files (without them transformers would silently build an empty tokenizer). Reads no weights."""
    if not os.path.exists(path):
        hint = "" if "/" in path.strip("/") or path.startswith((".", "~")) else \
            " (a hub id is org/name, e.g. Qwen/Qwen2.5-0.5B-Instruct; 'tiny' is the embedded model)"
        raise ModelSourceError(f"model folder {path!r} does not exist{hint}")
    if not os.path.isdir(path):
        raise ModelSourceError(f"model path {path!r} is a file, not a model folder")
    adapter = os.path.isfile(os.path.join(path, ADAPTER_CONFIG))
    config_file = os.path.join(path, ADAPTER_CONFIG if adapter else "config.json")
    if not os.path.isfile(config_file):
        raise ModelSourceError(f"model path {path!r} is not a model folder (no config.json)")
    try:
        with open(config_file, encoding="utf-8") as fh:
            config = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ModelSourceError(f"model folder {path!r}: {os.path.basename(config_file)} is not valid JSON "
                               f"({_first_line(error)})") from None
    if not isinstance(config, dict):
        raise ModelSourceError(f"model folder {path!r}: {os.path.basename(config_file)} is not a JSON object")
    weights = [f for f in (ADAPTER_WEIGHT_FILES if adapter else WEIGHT_FILES) if os.path.isfile(os.path.join(path, f))]
    if not weights:
        raise ModelSourceError(f"model folder {path!r} has no weights (expected one of "
                               f"{', '.join(ADAPTER_WEIGHT_FILES if adapter else WEIGHT_FILES)})")
    for name in weights:
        _check_weight_file(path, name)
    if not adapter and not _has_tokenizer(path):
        raise ModelSourceError(f"model folder {path!r} has no tokenizer files (expected one of "
                               f"{', '.join(TOKENIZER_FILES)}); save the tokenizer there too (save_pretrained)")


def _has_tokenizer(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES) or any(
        f.endswith(".tiktoken") for f in os.listdir(path))


def _check_weight_file(folder: str, name: str) -> None:
    """A sharded index names shards that exist; a safetensors file is as long as its header says."""
    path = os.path.join(folder, name)
    if name.endswith(".index.json"):
        try:
            with open(path, encoding="utf-8") as fh:
                shards = sorted(set(json.load(fh)["weight_map"].values()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as error:
            raise ModelSourceError(f"model folder {folder!r}: {name} is not a valid shard index "
                                   f"({_first_line(error)})") from None
        for shard in shards:
            if not os.path.isfile(os.path.join(folder, shard)):
                raise ModelSourceError(f"model folder {folder!r}: shard {shard} named in {name} is missing")
            if shard.endswith(".safetensors"):
                _check_safetensors(folder, shard)
    elif name.endswith(".safetensors"):
        _check_safetensors(folder, name)


def _check_safetensors(folder: str, name: str) -> None:
    path = os.path.join(folder, name)
    size = os.path.getsize(path)
    problem = None
    with open(path, "rb") as fh:
        head = fh.read(8)
        header_len = int.from_bytes(head, "little") if len(head) == 8 else -1
        if header_len < 0 or 8 + header_len > size:
            problem = "its header is cut short"
        else:
            try:
                header = json.loads(fh.read(header_len))
                end = max((int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"), default=0)
            except (ValueError, KeyError, TypeError, IndexError, AttributeError):
                problem = "its header is not valid"
            else:
                if 8 + header_len + end > size:
                    problem = f"it is truncated ({size} of {8 + header_len + end} bytes)"
    if problem:
        raise ModelSourceError(f"model folder {folder!r}: {name} is damaged: {problem}; save or download it again")


ADAPTER_CONFIG = "adapter_config.json"


def _load_adapter(path: str, dtype: torch.dtype):
    """A LoRA checkpoint (peft's save_pretrained): its base model plus the adapter, trainable."""
    import json

    from peft import PeftModel  # optional dependency: imported only when asked for

    with open(os.path.join(path, ADAPTER_CONFIG)) as fh:
        base = json.load(fh).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"LoRA checkpoint {path!r} does not name its base model (base_model_name_or_path)")
    if _is_tiny(base):
        model = build_tiny_model(base.partition(":")[2] or "tiny", dtype=dtype)[0]
        model.name_or_path = base
    else:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    tokenizer_source = path if os.path.isfile(os.path.join(path, "tokenizer_config.json")) else base
    return PeftModel.from_pretrained(model, path, is_trainable=True), load_tokenizer(tokenizer_source)


def load_tokenizer(source: str) -> PreTrainedTokenizerBase:
    """`AutoTokenizer.from_pretrained(source)`, except for a saved plain `tokenizers` tokenizer (the char tokenizer).

    transformers 5 picks the tokenizer class from the model config's `model_type` (qwen2 -> Qwen2Tokenizer), which
    replaces the saved pre-tokenizer with its own and silently drops spaces ("sort 2 8:" -> "sort28:"), so a saved
    tiny model would no longer read its prompts. A local folder whose tokenizer_config.json declares the generic
    class is loaded as that class, with its tokenizer.json as saved.
    """
    config_file = os.path.join(source, "tokenizer_config.json")
    if os.path.isfile(config_file):
        import json

        with open(config_file) as fh:
            declared = json.load(fh).get("tokenizer_class")
        if declared in ("TokenizersBackend", "PreTrainedTokenizerFast"):
            return PreTrainedTokenizerFast.from_pretrained(source)
    return AutoTokenizer.from_pretrained(source)


def load_model(
    name_or_path: str | os.PathLike[str],
    *,
    device: str | torch.device = "auto",
    dtype: torch.dtype | str | None = None,
    lora: dict[str, Any] | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load `(model, tokenizer)`: `"tiny"`/`"tiny:<size>"`, a local directory, or a hub id (same code path).

    The tokenizer gets a pad token (eos) when it has none and pads on the left (for generation); the model
    config's pad id follows it. `lora={"r", "alpha", "target_modules", "dropout"}` wraps the model with peft
    (defaults r=8, alpha=16, all linear layers except the LM head, dropout 0), leaving only LoRA weights
    trainable. `dtype` is the dtype the weights are loaded and stored in (`TrainConfig.model_dtype`); None means
    float32.
    """
    name = os.fspath(name_or_path)
    torch_dtype = _resolve_dtype(dtype)
    if _is_tiny(name):
        model, tokenizer = build_tiny_model(name.partition(":")[2] or "tiny", dtype=torch_dtype)
        model.name_or_path = name  # built the same from its name (seeded): a LoRA adapter on it records it
    else:
        local = _looks_local(name)
        if local:
            name = os.path.expanduser(name)
            _check_local_model_dir(name)
        adapter = os.path.isfile(os.path.join(name, ADAPTER_CONFIG))
        if adapter and lora is not None:
            raise ValueError(f"{name!r} is already a LoRA checkpoint: drop the lora option to continue it")
        with _load_errors(name, local):
            if adapter:
                model, tokenizer = _load_adapter(name, torch_dtype)
            else:
                model = AutoModelForCausalLM.from_pretrained(name, dtype=torch_dtype)
                tokenizer = load_tokenizer(name)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model = model.to(pick_device(device))
    if lora is not None:
        model = _wrap_lora(model, lora)
    return model, tokenizer


@contextmanager
def _load_errors(name: str, local: bool):
    """Turn a failure to load `name` (a damaged folder the checks above could not see, a hub id the hub does not
    have or cannot be reached for) into one ModelSourceError line naming it."""
    from safetensors import SafetensorError

    try:
        yield
    except ModelSourceError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError, EOFError, SafetensorError) as error:
        where = f"model folder {name!r}" if local else f"model {name!r} (not a local folder; looked up as a hub id)"
        raise ModelSourceError(f"{where}: cannot be loaded: {_first_line(error)}") from None


def model_config(name_or_path: str | os.PathLike[str]):
    """The model's config, without its weights (the checks of `load_model` included): for `inspect_model`."""
    from transformers import AutoConfig

    name = os.fspath(name_or_path)
    if name == "tiny" or name.startswith("tiny:"):
        size = name.partition(":")[2] or "tiny"
        if size not in TINY_SIZES:
            raise ValueError(f"unknown tiny model size {size!r}; valid: {sorted(TINY_SIZES)}")
        return Qwen2Config(max_position_embeddings=TINY_MAX_POSITIONS, **TINY_SIZES[size])
    local = _looks_local(name)
    if local:
        name = os.path.expanduser(name)
        _check_local_model_dir(name)
    with _load_errors(name, local):
        if os.path.isfile(os.path.join(name, ADAPTER_CONFIG)):
            with open(os.path.join(name, ADAPTER_CONFIG)) as fh:
                base = json.load(fh).get("base_model_name_or_path")
            if not base:
                raise ModelSourceError(f"LoRA checkpoint {name!r} does not name its base model "
                                       f"(base_model_name_or_path)")
            return model_config(base) if _is_tiny(base) else AutoConfig.from_pretrained(base)
        return AutoConfig.from_pretrained(name)


def inspect_model(name_or_path: str | os.PathLike[str]) -> tuple[PreTrainedTokenizerBase, int | None]:
    """`(tokenizer, context length)` of a model without loading its weights: what a check before training needs
    (prompt lengths), and the same one-line errors as `load_model` for a bad name or folder."""
    name = os.fspath(name_or_path)
    config = model_config(name)
    if name == "tiny" or name.startswith("tiny:"):
        return build_char_tokenizer(), context_length(config)
    name = os.path.expanduser(name) if _looks_local(name) else name
    with _load_errors(name, _looks_local(name)):
        source = name
        if os.path.isfile(os.path.join(name, ADAPTER_CONFIG)) and not _has_tokenizer(name):
            with open(os.path.join(name, ADAPTER_CONFIG)) as fh:
                source = json.load(fh)["base_model_name_or_path"]
        tokenizer = load_tokenizer(source)
    return tokenizer, context_length(config)


def context_length(model_or_config) -> int | None:
    """The most positions the model was built for (`max_position_embeddings`; tiny: 512), or None if its config
    does not say. Accepts a model (peft-wrapped too) or its config."""
    config = getattr(model_or_config, "config", model_or_config)
    for candidate in (config, getattr(config, "text_config", None)):
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx"):
            value = getattr(candidate, key, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def check_prompt_lengths(lengths: Iterable[int], max_new_tokens: int, context: int | None,
                         *, what: str = "prompt") -> None:
    """PromptTooLongError (one line) unless every `lengths[i]` tokens + `max_new_tokens` fit in `context`.

    A prompt past the model's context is never run silently: on rotary models it runs on positions the model
    never saw, and a long one allocates memory for every position (30,000 characters on the tiny model: 7 GB)."""
    if context is None:
        return
    lengths = list(lengths)
    too_long = [n for n in lengths if n + max_new_tokens > context]
    if too_long:
        longest = max(too_long)
        fix = (f"shorten the prompts or set rollout.max_new_tokens <= {context - longest}" if longest < context
               else "shorten the prompts (or use a model with a longer context)")
        budget = f" plus a completion budget of {max_new_tokens}" if max_new_tokens else ""
        raise PromptTooLongError(
            f"{len(too_long)} of {len(lengths)} {what}s do not fit the model's context: the longest has {longest} "
            f"tokens{budget}, over the model's {context} positions (max_position_embeddings); {fix}")


def _wrap_lora(model: PreTrainedModel, lora: dict[str, Any]) -> PreTrainedModel:
    unknown = set(lora) - _LORA_KEYS
    if unknown:
        raise ValueError(f"unknown LoRA option(s) {sorted(unknown)}; valid: {sorted(_LORA_KEYS)}")
    from peft import LoraConfig, get_peft_model  # optional dependency: imported only when asked for

    # peft records the base as model.name_or_path: a folder as typed ("runs/sft/checkpoint-25") would only load
    # from the directory it was typed in, so the adapter records it absolute
    base = model.__dict__.get("name_or_path") or ""
    if base and not _is_tiny(base) and os.path.isdir(os.path.expanduser(base)):
        model.name_or_path = os.path.abspath(os.path.expanduser(base))
    config = LoraConfig(
        r=int(lora.get("r", 8)),
        lora_alpha=float(lora.get("alpha", 16)),
        target_modules=lora.get("target_modules", "all-linear"),
        lora_dropout=float(lora.get("dropout", 0.0)),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def save_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: str | os.PathLike[str]) -> None:
    """`save_pretrained` the model (safetensors; only the adapter for a peft model) and the tokenizer to `path`."""
    Path(path).mkdir(parents=True, exist_ok=True)
    # a LoRA model: the adapter only (peft's vocabulary check would look a base that is not a folder up on the hub)
    model.save_pretrained(os.fspath(path), **({"save_embedding_layers": False} if hasattr(model, "peft_config")
                                              else {}))
    tokenizer.save_pretrained(os.fspath(path))


def format_prompt(tokenizer: PreTrainedTokenizerBase, text: str) -> str:
    """`text` as one user turn through the tokenizer's chat template (generation prompt added), else raw. A prompt
    that carries chat turns (`text.messages`: a conversational dataset column, `unipo.tasks.hf.Conversation`) is
    templated as those turns."""
    if getattr(tokenizer, "chat_template", None):
        messages = getattr(text, "messages", None) or [{"role": "user", "content": text}]
        return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    return text
