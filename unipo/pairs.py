"""Preference data: pairs (or ranked lists) of answers to one prompt, read, checked, tokenised, or made from a task.

Record. A `PreferencePair` is a prompt and a `chosen` and a `rejected` answer, or a ranked list (`responses`
with `ranks`, lower rank = better, ties allowed; `chosen`/`rejected` are then its best and worst answer).
Text is either plain (`str`) or conversational (a tuple of `Message(role, content)`). A plain prompt is
formatted as the RL trainer formats task prompts (`format_prompt`); a conversational prompt goes through the
tokenizer's chat template with the generation prompt. A conversational answer is the assistant continuation
of that prompt in the template (TRL's convention: the template closes the turn); a plain answer is the raw
text the policy would generate after the prompt, ended by EOS (unipo's SFT and rollout convention), whatever
the prompt's form. A conversational answer to a plain prompt is refused.

Sources. `load_pairs` reads a JSONL file (one object per line: `prompt`, `chosen`, `rejected`, or `prompt`,
`responses`, `ranks`; other keys are kept in `meta`), a Hugging Face `datasets` source (`.json`/`.parquet` via
`load_dataset`, a folder written by `save_to_disk`, a hub id when the hub is reachable, or a `Dataset` object)
with a column mapping (`prompt_field=...`). `make_pairs` samples G completions per prompt of a verifiable task
and pairs them by reward; `write_pairs_jsonl` writes any pairs back as JSONL.

Bad rows. Every row is checked when read: a missing field or column, a null, a non-string message content, an
empty prompt or answer, chosen equal to rejected, fewer than two ranked answers, a rank list whose length
differs from the answers, non-finite or all-equal ranks, duplicate answers. Each problem is one line naming the
file and line (`pairs.jsonl:7: ...`) or the dataset row (`data.parquet row 6: ...`, rows counted from 0). By
default the first one raises `PairDataError` (saying how many other rows are bad): nothing is trained on a
silently wrong row. `skip_invalid=True` drops the bad rows instead and keeps one line per dropped row in
`PairData.skipped` (also logged as a warning with the count), so the drop is visible and countable.

Tokens. `tokenize_pairs` builds the padded batch a pair loss needs (`PairBatch`; layout in its docstring):
prompt ids exactly as the RL trainer encodes task prompts (`format_prompt`, no special tokens added) and
plain answers encoded as unipo's SFT path does (text ids + EOS), so the policy is scored on what it would
generate. Conversational answers are not given an extra EOS: the chat template closes the turn.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from numbers import Real
from pathlib import Path
from typing import Any, Union

import torch

from unipo.models import format_prompt
from unipo.rollout import generate, pad_sequences
from unipo.tasks.base import Task, score_completions

logger = logging.getLogger(__name__)

RULES = ("correct_vs_incorrect", "best_vs_worst")
_DATASET_SUFFIXES = {".json": "json", ".parquet": "parquet"}


class PairDataError(ValueError):
    """A preference row (or source) that cannot be trained on; the message is one line naming where."""


# --------------------------------------------------------------------------------------------------- record


@dataclass(frozen=True)
class Message:
    """One chat turn. Only text turns: `content` must be a string."""

    role: str
    content: str

    def as_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


Text = Union[str, tuple[Message, ...]]


@dataclass(frozen=True)
class PreferencePair:
    """A prompt with a preferred and a dispreferred answer, or with a ranked list of answers.

    Pairwise: `chosen` ≻ `rejected`. Listwise: `responses` with `ranks` (same length ≥ 2, finite numbers,
    lower = better, not all equal); `chosen`/`rejected` are left out when built and set to the best and worst
    answer (the first of tied best, the last of tied worst). `source` says where the row came from and opens
    every error message; `meta` carries extra fields (a made pair's rewards, a dataset's other columns). Neither
    takes part in equality: two pairs are equal when their prompt and answers are. Checked when built; a bad
    record raises `PairDataError`.
    """

    prompt: Text
    chosen: Text | None = None
    rejected: Text | None = None
    responses: tuple[Text, ...] | None = None
    ranks: tuple[float, ...] | None = None
    source: str = field(default="pair", compare=False)
    meta: Mapping[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        where = self.source
        for name in ("responses", "ranks"):  # lists are accepted, stored as tuples (hashable, immutable)
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        turns = getattr(self.prompt, "messages", None)  # a task's chat prompt (`unipo.tasks.hf.Conversation`)
        if isinstance(self.prompt, str) and turns is not None:
            object.__setattr__(self, "prompt", _as_messages(list(turns), "prompt", where))
        conversational = _check_text(self.prompt, "prompt", where)
        listwise = self.responses is not None or self.ranks is not None
        if listwise:
            if self.chosen is not None or self.rejected is not None:
                raise PairDataError(f"{where}: give chosen/rejected or responses/ranks, not both")
            self._check_list(conversational)
            best = min(range(len(self.ranks)), key=lambda i: self.ranks[i])
            worst = max(reversed(range(len(self.ranks))), key=lambda i: self.ranks[i])
            object.__setattr__(self, "chosen", self.responses[best])
            object.__setattr__(self, "rejected", self.responses[worst])
            return
        for name in ("chosen", "rejected"):
            value = getattr(self, name)
            if value is None:
                raise PairDataError(f"{where}: missing field {name!r}")
            if _check_text(value, name, where) and not conversational:
                raise PairDataError(f"{where}: {name} is a message list but the prompt is plain text")
        if self.chosen == self.rejected:
            raise PairDataError(f"{where}: chosen equals rejected, so the pair states no preference")

    def _check_list(self, conversational: bool) -> None:
        where, responses, ranks = self.source, self.responses, self.ranks
        if responses is None or ranks is None:
            raise PairDataError(f"{where}: missing field {'responses' if responses is None else 'ranks'!r}")
        if not isinstance(responses, tuple) or not isinstance(ranks, tuple):
            raise PairDataError(f"{where}: responses and ranks must be tuples (lists in the file)")
        if len(ranks) != len(responses):
            raise PairDataError(f"{where}: {len(ranks)} ranks for {len(responses)} responses")
        if len(responses) < 2:
            raise PairDataError(f"{where}: a ranked list needs at least 2 responses, got {len(responses)}")
        for index, response in enumerate(responses):
            if _check_text(response, f"responses[{index}]", where) and not conversational:
                raise PairDataError(f"{where}: responses[{index}] is a message list but the prompt is plain text")
        for index, rank in enumerate(ranks):
            if isinstance(rank, bool) or not isinstance(rank, Real) or not math.isfinite(float(rank)):
                raise PairDataError(f"{where}: ranks[{index}] must be a finite number, got {rank!r}")
        if len(set(ranks)) == 1:
            raise PairDataError(f"{where}: all {len(ranks)} ranks are equal, so the list states no preference")
        seen: dict[Text, int] = {}
        for index, response in enumerate(responses):
            if response in seen:
                raise PairDataError(f"{where}: responses[{seen[response]}] and responses[{index}] are identical")
            seen[response] = index

    @property
    def is_listwise(self) -> bool:
        return self.responses is not None

    @property
    def is_conversational(self) -> bool:
        return not isinstance(self.prompt, str)

    def answers(self) -> tuple[Text, ...]:
        """The answers in batch order: (chosen, rejected) for a pair, `responses` for a list."""
        return self.responses if self.responses is not None else (self.chosen, self.rejected)

    def relevance(self) -> tuple[float, ...]:
        """Graded relevance of `answers()`, higher = better, best-to-worst spread as ranks: max(rank) − rank.
        (1, 0) for a pair. This is what LiPO's `list_labels` take."""
        if self.ranks is None:
            return (1.0, 0.0)
        top = max(self.ranks)
        return tuple(float(top - rank) for rank in self.ranks)

    def to_json(self) -> dict[str, Any]:
        """The JSONL object `load_pairs` reads back to an equal pair (meta keys included)."""
        out: dict[str, Any] = {"prompt": _text_json(self.prompt)}
        if self.responses is not None:
            out["responses"] = [_text_json(r) for r in self.responses]
            out["ranks"] = list(self.ranks)
        else:
            out["chosen"], out["rejected"] = _text_json(self.chosen), _text_json(self.rejected)
        clash = sorted(set(self.meta) & {"prompt", "chosen", "rejected", "responses", "ranks"})
        if clash:
            raise PairDataError(f"{self.source}: meta keys {clash} would overwrite the pair's own fields")
        return {**out, **self.meta}


def _text_json(text: Text) -> str | list[dict[str, str]]:
    return text if isinstance(text, str) else [m.as_dict() for m in text]


def _check_text(text: object, name: str, where: str) -> bool:
    """True for a message tuple, False for a string; PairDataError for anything empty or malformed."""
    if isinstance(text, str):
        if not text.strip():
            raise PairDataError(f"{where}: {name} is empty")
        return False
    if not isinstance(text, tuple) or not all(isinstance(m, Message) for m in text):
        raise PairDataError(f"{where}: {name} must be a string or a list of {{role, content}} messages, "
                            f"got {type(text).__name__}")
    if not text:
        raise PairDataError(f"{where}: {name} is an empty message list")
    for index, message in enumerate(text):
        if not isinstance(message.role, str) or not message.role.strip():
            raise PairDataError(f"{where}: {name}[{index}] has no role")
        if not isinstance(message.content, str):
            raise PairDataError(f"{where}: {name}[{index}] content must be a string, got "
                                f"{type(message.content).__name__}")
    if not any(m.content.strip() for m in text):
        raise PairDataError(f"{where}: {name} is empty (every message content is blank)")
    return True


# ---------------------------------------------------------------------------------------- reading raw rows


@dataclass(frozen=True)
class PairFields:
    """Which key (JSONL) or column (datasets) holds each part of a pair."""

    prompt: str = "prompt"
    chosen: str = "chosen"
    rejected: str = "rejected"
    responses: str = "responses"
    ranks: str = "ranks"

    def __post_init__(self) -> None:
        names = [self.prompt, self.chosen, self.rejected, self.responses, self.ranks]
        if not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names):
            raise ValueError(f"field names must be distinct non-empty strings, got {names}")


def _as_messages(value: list, name: str, where: str) -> tuple[Message, ...]:
    messages = []
    for index, item in enumerate(value):
        if not isinstance(item, Mapping):
            raise PairDataError(f"{where}: {name}[{index}] must be a {{role, content}} object, got "
                                f"{type(item).__name__}")
        # Arrow gives every struct the union of keys, absent ones as None: only non-null extras are refused
        extra = sorted(k for k, v in item.items() if k not in ("role", "content") and v is not None)
        if extra:
            raise PairDataError(f"{where}: {name}[{index}] has keys {extra}; only text messages "
                                f"{{role, content}} are supported")
        for key in ("role", "content"):
            if item.get(key) is None:
                raise PairDataError(f"{where}: {name}[{index}] has no {key!r}")
        role, content = item["role"], item["content"]
        if not isinstance(role, str):
            raise PairDataError(f"{where}: {name}[{index}] role must be a string, got {type(role).__name__}")
        if not isinstance(content, str):
            raise PairDataError(f"{where}: {name}[{index}] content must be a string, got {type(content).__name__}")
        messages.append(Message(role, content))
    return tuple(messages)


def _as_text(value: object, name: str, where: str) -> Text:
    """A raw JSON value as Text: a string, or a list of {role, content} objects."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return _as_messages(value, name, where)
    raise PairDataError(f"{where}: {name} must be a string or a list of {{role, content}} messages, "
                        f"got {type(value).__name__}")


def pair_from_row(row: Mapping[str, Any], where: str, fields: PairFields = PairFields()) -> PreferencePair:
    """One raw row (a JSON object, a dataset row) as a checked PreferencePair; other keys go to `meta`.
    A key that is absent or null counts as missing."""
    present = {k for k, v in row.items() if v is not None}
    pairwise = fields.chosen in present or fields.rejected in present
    listwise = fields.responses in present or fields.ranks in present
    if fields.prompt not in present:
        raise PairDataError(f"{where}: missing field {fields.prompt!r}")
    if pairwise and listwise:
        raise PairDataError(f"{where}: has both {fields.chosen}/{fields.rejected} and {fields.responses}/"
                            f"{fields.ranks}; give one form per row")
    if not pairwise and not listwise:
        raise PairDataError(f"{where}: missing field {fields.chosen!r} (and {fields.rejected!r}; or "
                            f"{fields.responses!r} + {fields.ranks!r} for a ranked list)")
    used = {fields.prompt, fields.chosen, fields.rejected, fields.responses, fields.ranks}
    meta = {k: v for k, v in row.items() if k not in used}
    prompt = _as_text(row[fields.prompt], "prompt", where)
    if pairwise:
        for name, key in (("chosen", fields.chosen), ("rejected", fields.rejected)):
            if key not in present:
                raise PairDataError(f"{where}: missing field {key!r}")
        chosen = _as_text(row[fields.chosen], "chosen", where)
        rejected = _as_text(row[fields.rejected], "rejected", where)
        return PreferencePair(prompt, chosen, rejected, source=where, meta=meta)
    for key in (fields.responses, fields.ranks):
        if key not in present:
            raise PairDataError(f"{where}: missing field {key!r}")
    responses, ranks = row[fields.responses], row[fields.ranks]
    if not isinstance(responses, list) or not isinstance(ranks, list):
        raise PairDataError(f"{where}: {fields.responses} and {fields.ranks} must be lists, got "
                            f"{type(responses).__name__} and {type(ranks).__name__}")
    texts = tuple(_as_text(r, f"responses[{i}]", where) for i, r in enumerate(responses))
    return PreferencePair(prompt, responses=texts, ranks=tuple(ranks), source=where, meta=meta)


# ----------------------------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class PairData(Sequence):
    """The pairs read from one source, in order, and one line per row that `skip_invalid` dropped."""

    pairs: tuple[PreferencePair, ...]
    source: str
    skipped: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index):  # type: ignore[override]
        return self.pairs[index]

    def __iter__(self) -> Iterator[PreferencePair]:
        return iter(self.pairs)


def _collect(rows: Iterable[tuple[str, Any]], fields: PairFields, source: str, skip_invalid: bool) -> PairData:
    """Check every row; raise on the first bad one (counting the rest) unless skip_invalid."""
    pairs: list[PreferencePair] = []
    errors: list[str] = []
    for where, row in rows:
        try:
            if isinstance(row, _Unreadable):
                raise PairDataError(f"{where}: {row}")
            if not isinstance(row, Mapping):
                raise PairDataError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
            pairs.append(pair_from_row(row, where, fields))
        except PairDataError as error:
            errors.append(str(error))
    if errors and not skip_invalid:
        more = f" ({len(errors) - 1} more bad row(s); fix them or pass skip_invalid=True)" if len(errors) > 1 else ""
        raise PairDataError(errors[0] + more)
    if errors:
        logger.warning("%s: skipped %d bad row(s) of %d; first: %s", source, len(errors), len(errors) + len(pairs),
                       errors[0])
    if not pairs:
        raise PairDataError(f"{source}: no preference pairs" + (f" ({len(errors)} bad row(s) skipped)" if errors
                                                                  else ""))
    return PairData(tuple(pairs), source, tuple(errors))


class _Unreadable(str):
    """Why a raw line could not be parsed (told apart from a line whose JSON is a string)."""


def _jsonl_rows(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open("rb") as file:
        for number, raw in enumerate(file, start=1):
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                yield where, _Unreadable(f"not UTF-8 (byte {error.start + 1})")
                continue
            if not line.strip():
                continue
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as error:
                yield where, _Unreadable(f"bad JSON ({error.msg} at column {error.colno})")
            except RecursionError:
                yield where, _Unreadable("JSON nested too deeply")


def read_pairs_jsonl(path: str | os.PathLike[str], *, fields: PairFields = PairFields(),
                     skip_invalid: bool = False) -> PairData:
    """Every non-blank line of a JSONL file as a PreferencePair (errors name `path:line`)."""
    file = Path(path)
    if not file.is_file():
        raise PairDataError(f"{file}: no such file")
    return _collect(_jsonl_rows(file), fields, str(file), skip_invalid)


def pairs_from_dataset(dataset: Any, *, name: str = "dataset", fields: PairFields = PairFields(),
                       skip_invalid: bool = False) -> PairData:
    """Rows of a `datasets.Dataset` as PreferencePairs (errors name `<name> row <i>`, i from 0).

    The column mapping is checked against the dataset's columns first: a named column that does not exist is
    one error listing the columns there are, before any row is read."""
    columns = list(getattr(dataset, "column_names", None) or [])
    if not columns:
        raise PairDataError(f"{name}: not a datasets.Dataset with named columns (got {type(dataset).__name__})")
    have = set(columns)
    pair_cols = [c for c in (fields.chosen, fields.rejected) if c not in have]
    list_cols = [c for c in (fields.responses, fields.ranks) if c not in have]
    # the prompt column, and each form either complete or wholly absent (one of the two complete)
    absent = ([fields.prompt] if fields.prompt not in have else []) + [c[0] for c in (pair_cols, list_cols)
                                                                       if len(c) == 1]
    if not absent and len(pair_cols) == 2 and len(list_cols) == 2:
        absent = pair_cols
    if absent:
        raise PairDataError(f"{name}: no column {absent[0]!r} (columns: {', '.join(columns)}); map yours with "
                            f"prompt_field=, chosen_field=, rejected_field= (or responses_field=, ranks_field=)")
    return _collect(((f"{name} row {i}", row) for i, row in enumerate(dataset)), fields, name, skip_invalid)


def _import_datasets():
    try:
        import datasets
    except ImportError:
        raise PairDataError("reading Hugging Face datasets needs the `datasets` package: pip install 'unipo[data]'"
                            ) from None
    return datasets


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


def load_pairs(
    source: str | os.PathLike[str] | Any,
    *,
    split: str = "train",
    prompt_field: str = "prompt",
    chosen_field: str = "chosen",
    rejected_field: str = "rejected",
    responses_field: str = "responses",
    ranks_field: str = "ranks",
    skip_invalid: bool = False,
) -> PairData:
    """Preference pairs from `source`, checked row by row (see the module docstring for what is refused).

    `source` is one of: a `.jsonl` file (read here, errors name file:line); a `.json` or `.parquet` file
    (`datasets.load_dataset("json"|"parquet", data_files=...)`, errors name the row); a folder written by
    `Dataset.save_to_disk` / `DatasetDict.save_to_disk` (`load_from_disk`; a DatasetDict gives `split`); a
    `datasets.Dataset` or `DatasetDict` object; anything else is taken as a hub id,
    `load_dataset(source, split=split)`, which needs a reachable hub. The `*_field` arguments map your keys or
    columns onto the pair's parts.
    """
    fields = PairFields(prompt_field, chosen_field, rejected_field, responses_field, ranks_field)
    if not isinstance(source, (str, os.PathLike)):
        name = type(source).__name__
        if isinstance(source, Mapping):  # a DatasetDict: take the split
            if split not in source:
                raise PairDataError(f"{name}: no split {split!r} (splits: {', '.join(map(str, source))})")
            source, name = source[split], f"{name}[{split}]"
        return pairs_from_dataset(source, name=name, fields=fields, skip_invalid=skip_invalid)
    path = Path(os.path.expanduser(os.fspath(source)))
    name = os.fspath(source)
    if path.suffix == ".jsonl":
        return read_pairs_jsonl(path, fields=fields, skip_invalid=skip_invalid)
    if path.is_dir():
        datasets = _import_datasets()
        try:
            loaded = datasets.load_from_disk(os.fspath(path))
        except (FileNotFoundError, ValueError, OSError) as error:
            raise PairDataError(f"{name}: not a dataset folder written by save_to_disk ({_first_line(error)})"
                                ) from None
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise PairDataError(f"{name}: no split {split!r} (splits: {', '.join(loaded)})")
            loaded, name = loaded[split], f"{name}[{split}]"
        return pairs_from_dataset(loaded, name=name, fields=fields, skip_invalid=skip_invalid)
    if path.suffix in _DATASET_SUFFIXES:
        if not path.is_file():
            raise PairDataError(f"{name}: no such file")
        datasets = _import_datasets()
        try:
            loaded = datasets.load_dataset(_DATASET_SUFFIXES[path.suffix], data_files=os.fspath(path), split="train")
        except Exception as error:  # noqa: BLE001 - any reader failure is reported as one line naming the file
            raise PairDataError(f"{name}: cannot be read as {path.suffix[1:]}: {_first_line(error)}") from None
        return pairs_from_dataset(loaded, name=name, fields=fields, skip_invalid=skip_invalid)
    if path.exists():
        raise PairDataError(f"{name}: not a .jsonl/.json/.parquet file or a save_to_disk folder")
    if name.startswith(("/", ".", "~")) or os.sep != "/" and os.sep in name:
        raise PairDataError(f"{name}: no such file or folder")
    datasets = _import_datasets()
    try:
        loaded = datasets.load_dataset(name, split=split)
    except Exception as error:  # noqa: BLE001 - an unreachable hub or a missing dataset: one line
        raise PairDataError(f"{name}: not a local path; as a hub dataset it cannot be loaded: {_first_line(error)}"
                            ) from None
    return pairs_from_dataset(loaded, name=f"{name}[{split}]", fields=fields, skip_invalid=skip_invalid)


def write_pairs_jsonl(pairs: Iterable[PreferencePair], path: str | os.PathLike[str]) -> int:
    """Write `pairs` as JSONL (`PreferencePair.to_json` per line, UTF-8); returns how many were written."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with target.open("w", encoding="utf-8") as file:
        for pair in pairs:
            file.write(json.dumps(pair.to_json(), ensure_ascii=False) + "\n")
            count += 1
    return count


# ---------------------------------------------------------------------------------------------- tokenising


def _template(tokenizer, messages: Sequence[Message], where: str, **kwargs: Any) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise PairDataError(f"{where}: conversational pair but the tokenizer has no chat template")
    return tokenizer.apply_chat_template([m.as_dict() for m in messages], tokenize=False, **kwargs)


def encode_prompt(tokenizer, prompt: Text, *, where: str = "prompt") -> list[int]:
    """Prompt ids: plain text through `format_prompt` (one user turn when the tokenizer has a chat template,
    else raw; exactly how the RL trainer prompts the policy), messages through the chat template with the
    generation prompt. No special tokens are added beyond what the template writes."""
    text = format_prompt(tokenizer, prompt) if isinstance(prompt, str) else _template(
        tokenizer, prompt, where, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise PairDataError(f"{where}: the prompt encodes to no tokens")
    return ids


def encode_answer(tokenizer, prompt: Text, answer: Text, *, where: str = "answer") -> list[int]:
    """Completion ids of `answer` to `prompt`: plain text + EOS (unipo's SFT encoding); a conversational
    answer is the chat template of prompt + answer minus the rendered prompt (with its generation prompt), so
    the template's own end-of-turn closes it and no EOS is appended (TRL's convention). The cut is made on the
    rendered text, so the prompt ids are exactly `encode_prompt`'s (what the policy is prompted with)."""
    if isinstance(answer, str):
        return tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    if isinstance(prompt, str):
        raise PairDataError(f"{where}: a message-list answer needs a message-list prompt")
    head = _template(tokenizer, prompt, where, add_generation_prompt=True)
    full = _template(tokenizer, tuple(prompt) + tuple(answer), where)
    if not full.startswith(head):
        raise PairDataError(f"{where}: the chat template renders prompt + answer with a different prefix than "
                            f"the prompt alone, so the answer cannot be cut off it")
    ids = tokenizer(full[len(head):], add_special_tokens=False)["input_ids"]
    if not ids:
        raise PairDataError(f"{where}: the answer encodes to no tokens")
    return ids


@dataclass(frozen=True)
class PairBatch:
    """Tokenised preference rows for one forward pass of the policy (and one of the reference).

    Layout: B items (pairs or ranked lists) of K answers each (K = 2 for pairs; one K per batch) give
    N = B·K rows, **item-major**: row i·K + k is answer k of item i. For a pair, k = 0 is chosen and k = 1
    rejected, so rows interleave (chosen₀, rejected₀, chosen₁, ...). Consecutive rows share their prompt, which
    the lean forward of `unipo.rollout.policy_logprobs` runs once per item; it is also the rollout layout
    (row i·G + g), so the same helpers serve online pairs.

      prompt_ids      [N, P] long, left-padded with the pad id;  prompt_mask [N, P] 1 on prompt tokens
      completion_ids  [N, T] long, right-padded;                 completion_mask [N, T] 1 on answer tokens
                      (an EOS ends each plain answer and counts as an answer token)
      labels          [B, K] float, graded relevance (higher = better): (1, 0) for pairs, max(rank) − rank
      chosen_index    [B] long, k of the best answer;  rejected_index [B] long, k of the worst
      sources         where each item came from (for messages)

    Typical use (then `compute_preference_loss(name, *policy_pair, *reference_pair, beta)`):

        out = policy_logprobs(model, b.prompt_ids, b.prompt_mask, b.completion_ids, b.completion_mask)
        chosen, rejected = b.pair(b.sequence_logps(out.logp))
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    labels: torch.Tensor
    chosen_index: torch.Tensor
    rejected_index: torch.Tensor
    sources: tuple[str, ...]

    def __post_init__(self) -> None:
        rows, items = self.prompt_ids.shape[0], self.labels.shape[0]
        if self.labels.dim() != 2 or rows != items * self.labels.shape[1]:
            raise ValueError(f"PairBatch: {rows} rows do not make {items} items of labels {list(self.labels.shape)}")
        if self.completion_ids.shape[0] != rows or self.prompt_mask.shape != self.prompt_ids.shape or \
                self.completion_mask.shape != self.completion_ids.shape:
            raise ValueError("PairBatch: ids and masks disagree in shape")

    def __len__(self) -> int:
        return self.labels.shape[0]

    @property
    def list_size(self) -> int:
        return self.labels.shape[1]

    def to(self, device: torch.device | str) -> PairBatch:
        moved = {k: getattr(self, k).to(device) for k in ("prompt_ids", "prompt_mask", "completion_ids",
                                                          "completion_mask", "labels", "chosen_index",
                                                          "rejected_index")}
        return PairBatch(**moved, sources=self.sources)

    def _per_item(self, values: torch.Tensor) -> torch.Tensor:
        return values.view(len(self), self.list_size)

    def lengths(self) -> torch.Tensor:
        """[B, K] answer lengths in tokens (EOS included)."""
        return self._per_item(self.completion_mask.sum(dim=1))

    def sequence_logps(self, token_logp: torch.Tensor) -> torch.Tensor:
        """[N, T] per-token log-probs -> [B, K] sums over each answer's tokens: log π(y|x) = Σ_t log π(y_t|x, y_<t)."""
        if token_logp.shape != self.completion_ids.shape:
            raise ValueError(f"token_logp must be {list(self.completion_ids.shape)}, got {list(token_logp.shape)}")
        return self._per_item((token_logp * self.completion_mask.to(token_logp.dtype)).sum(dim=1))

    def mean_logps(self, token_logp: torch.Tensor) -> torch.Tensor:
        """[B, K] per-token means log π(y|x) / |y| (TRL's IPO and sigmoid_norm inputs; −mean = chosen NLL)."""
        return self.sequence_logps(token_logp) / self.lengths().to(token_logp.dtype)

    def pair(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, K] per-answer values -> (chosen [B], rejected [B]), the best and the worst answer of each item."""
        if values.shape != self.labels.shape:
            raise ValueError(f"values must be {list(self.labels.shape)}, got {list(values.shape)}")
        return (values.gather(1, self.chosen_index[:, None]).squeeze(1),
                values.gather(1, self.rejected_index[:, None]).squeeze(1))


def tokenize_pairs(tokenizer, pairs: Sequence[PreferencePair], *, max_length: int | None = None,
                   device: torch.device | str | None = None) -> PairBatch:
    """`pairs` as one PairBatch (layout in its docstring). All items must have the same number of answers
    (2 for pairs); a row whose prompt + answer exceeds `max_length` tokens, or whose answers encode to the
    same ids (e.g. characters the tokenizer maps to one unknown token), is a PairDataError naming the row:
    nothing is truncated silently."""
    if not pairs:
        raise ValueError("tokenize_pairs needs at least one pair")
    sizes = {len(p.answers()) for p in pairs}
    if len(sizes) > 1:
        raise PairDataError(f"one batch needs one list size, got answers per item {sorted(sizes)}; batch pairs "
                            f"and ranked lists of each size separately")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    prompts: list[list[int]] = []
    answers: list[list[int]] = []
    for pair in pairs:
        prompt = encode_prompt(tokenizer, pair.prompt, where=pair.source)
        encoded = [encode_answer(tokenizer, pair.prompt, a, where=pair.source) for a in pair.answers()]
        if len({tuple(ids) for ids in encoded}) < len(encoded):
            raise PairDataError(f"{pair.source}: two answers encode to the same token ids")
        if max_length is not None:
            longest = len(prompt) + max(map(len, encoded))
            if longest > max_length:
                raise PairDataError(f"{pair.source}: prompt + answer is {longest} tokens, over max_length="
                                    f"{max_length}")
        prompts.extend([prompt] * len(encoded))
        answers.extend(encoded)
    prompt_ids, prompt_mask = pad_sequences(prompts, pad_id, left=True, device=device)
    completion_ids, completion_mask = pad_sequences(answers, pad_id, left=False, device=device)
    labels = torch.tensor([p.relevance() for p in pairs], dtype=torch.float32, device=device)
    best = [min(range(len(p.answers())), key=lambda k, p=p: -p.relevance()[k]) for p in pairs]
    worst = [max(reversed(range(len(p.answers()))), key=lambda k, p=p: -p.relevance()[k]) for p in pairs]
    return PairBatch(prompt_ids, prompt_mask, completion_ids, completion_mask, labels,
                     torch.tensor(best, device=device), torch.tensor(worst, device=device),
                     tuple(p.source for p in pairs))


# ------------------------------------------------------------------------------------- pairs from a task


@dataclass(frozen=True)
class MadePairs:
    """What `make_pairs` returns: the pairs and a log of how they were made.

    log keys: rule, prompts, group_size, samples, pairs, no_pair (prompts without a usable pair, the sum of
    the reasons: all_blank + all_correct + none_correct for correct_vs_incorrect, all_blank + all_tied for
    best_vs_worst), empty_samples (decoded to blank text, never used), truncated_samples (no EOS within
    max_new_tokens; usable), scorer_errors, scorer_timeouts, mean_reward (over all samples).
    """

    pairs: tuple[PreferencePair, ...]
    log: Mapping[str, Any]

    def write_jsonl(self, path: str | os.PathLike[str]) -> int:
        return write_pairs_jsonl(self.pairs, path)


def make_pairs(
    model,
    tokenizer,
    task: Task,
    *,
    n_prompts: int,
    group_size: int,
    seed: int,
    rule: str = "correct_vs_incorrect",
    split: str = "train",
    max_new_tokens: int | None = None,
    temperature: float = 1.0,
    top_p: float = 1.0,
    prompts_per_batch: int = 32,
) -> MadePairs:
    """Sample `group_size` completions for each of `n_prompts` task prompts with `model` (current or frozen
    policy, via `unipo.rollout.generate`), score them with the task's verifier (`score_completions`) and keep
    at most one pair per prompt:

    - "correct_vs_incorrect": chosen = a full-marks completion (reward ≥ 1, the trainer's `correct`),
      rejected = one scoring less; each drawn at random among its kind (seeded). No pair if none or all are
      correct.
    - "best_vs_worst": chosen = a highest-reward completion, rejected = a lowest-reward one (random among
      ties, seeded). No pair if all rewards are equal.

    Blank completions are never used (an empty answer is not a valid pair). Prompts are encoded as the RL
    trainer encodes them; the pairs store the task's prompt (its messages for a chat prompt when the tokenizer
    has a chat template) and the plain completion texts, which `tokenize_pairs` encodes back to the same
    prompt ids and to the sampled text + EOS. Deterministic for (model, task, seed). `meta` of each pair:
    task, rule, chosen_reward, rejected_reward, rejected_truncated.
    """
    if rule not in RULES:
        raise ValueError(f"rule must be one of {list(RULES)}, got {rule!r}")
    for name, value in (("n_prompts", n_prompts), ("group_size", group_size), ("prompts_per_batch",
                                                                               prompts_per_batch)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 to form a pair, got {group_size}")
    budget = max_new_tokens if max_new_tokens is not None else getattr(task, "max_new_tokens", None)
    if budget is None:
        raise ValueError(f"task {task.name!r} sets no max_new_tokens; pass max_new_tokens=")
    problems = task.sample(n_prompts, seed=seed, split=split)
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    picker = random.Random(f"unipo.make_pairs|{seed}")
    eos_id = tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    counts = dict.fromkeys(("no_pair", "all_blank", "all_correct", "none_correct", "all_tied", "empty_samples",
                            "truncated_samples", "scorer_errors", "scorer_timeouts"), 0)
    reward_sum = 0.0
    pairs: list[PreferencePair] = []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(problems), prompts_per_batch):
            chunk = problems[start:start + prompts_per_batch]
            gen = generate(model, [encode_prompt(tokenizer, p.prompt) for p in chunk], group_size=group_size,
                           max_new_tokens=budget, eos_token_id=eos_id, pad_token_id=pad_id, temperature=temperature,
                           top_p=top_p, generator=generator)
            texts = tokenizer.batch_decode(gen.completion_ids, skip_special_tokens=True)
            scored = score_completions(task, [p for p in chunk for _ in range(group_size)], texts)
            counts["scorer_errors"] += scored.errors
            counts["scorer_timeouts"] += scored.timeouts
            reward_sum += sum(scored.rewards)
            truncated = gen.truncated.tolist()
            for index, problem in enumerate(chunk):
                rows = range(index * group_size, (index + 1) * group_size)
                usable = [r for r in rows if texts[r].strip()]
                counts["empty_samples"] += group_size - len(usable)
                counts["truncated_samples"] += sum(truncated[r] for r in rows)
                picked = _pick(usable, scored.rewards, rule, picker, counts)
                if picked is None:
                    counts["no_pair"] += 1
                    continue
                win, lose = picked
                prompt = problem.prompt  # a chat prompt stays messages only where the template renders it
                if getattr(prompt, "messages", None) is not None and not getattr(tokenizer, "chat_template", None):
                    prompt = str(prompt)
                pairs.append(PreferencePair(
                    prompt, texts[win], texts[lose], source=f"{task.name} seed {seed} prompt {start + index}",
                    meta={"task": task.name, "rule": rule, "chosen_reward": scored.rewards[win],
                          "rejected_reward": scored.rewards[lose], "rejected_truncated": bool(truncated[lose])}))
    finally:
        model.train(was_training)
    samples = len(problems) * group_size
    log = {"rule": rule, "prompts": len(problems), "group_size": group_size, "samples": samples,
           "pairs": len(pairs), **counts, "mean_reward": reward_sum / samples}
    if rule == "correct_vs_incorrect":
        log.pop("all_tied")
    else:
        log.pop("all_correct"), log.pop("none_correct")
    logger.info("make_pairs %s: %d pairs from %d prompts (%d without a usable pair)", task.name, len(pairs),
                len(problems), counts["no_pair"])
    return MadePairs(tuple(pairs), log)


def _pick(rows: list[int], rewards: Sequence[float], rule: str, rng: random.Random,
          counts: dict[str, int]) -> tuple[int, int] | None:
    """(winner row, loser row) under `rule`, or None (counted) when the group offers no pair."""
    if not rows:
        counts["all_blank"] += 1
        return None
    if rule == "correct_vs_incorrect":
        good = [r for r in rows if rewards[r] >= 1.0]
        bad = [r for r in rows if rewards[r] < 1.0]
        if not good or not bad:
            counts["all_correct" if good else "none_correct"] += 1
            return None
        return rng.choice(good), rng.choice(bad)
    top, bottom = max(rewards[r] for r in rows), min(rewards[r] for r in rows)
    if top == bottom:
        counts["all_tied"] += 1
        return None
    return rng.choice([r for r in rows if rewards[r] == top]), rng.choice([r for r in rows if rewards[r] == bottom])
