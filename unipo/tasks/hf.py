"""Problems from a Hugging Face `datasets` dataset: spec `hf:<path or id>[:key=value,...]`.

The source is a folder written by `save_to_disk` (read with `load_from_disk`), a data file (.parquet, .json,
.jsonl, .csv, .arrow) or a folder of them (`load_dataset`, splits named after the files), or a hub id
(`load_dataset(id)`). Parameters, comma-separated after the last colon:

    split=train          the split to train on
    eval_split=<split>   the split to evaluate on. Default: "test" when the dataset has one, else the training
                         split itself (with a warning). `eval_split=hash` holds out ~10% of the training split
                         by a hash of the prompt, as a jsonl: file does; nothing is held out unless asked.
    prompt=prompt        the prompt column: text, or a conversation (a list of {"role", "content"} messages),
                         which goes through the model's chat template as those turns
    answer=answer        the gold answer column (text or a number; a conversation: its last assistant turn)
    demonstration=...    the expert completion column (default: "demonstration" when the dataset has it, else
                         the answer itself)
    max_new_tokens=N     the completion budget (default: the longest demonstration in characters, plus 16)

e.g. `hf:data/train.parquet:prompt=question,answer=answer` or `hf:openai/gsm8k:answer=answer` (a hub id needs
the network when the run starts). Scoring is the jsonl task's: math-verify when the gold answer is math, else
exact match, in the reward sandbox. A missing column, split or file, or an empty split, is one ValueError line.
"""

from __future__ import annotations

import functools
import os
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from unipo.tasks.base import TASKS, Problem, check_sample_args, split_of
from unipo.tasks.jsonl import JsonlTask

FILE_BUILDERS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv", ".arrow": "arrow"}
_warned: set[str] = set()


class Conversation(str):
    """A chat prompt: its text (the turns' contents) is the prompt everywhere a string is needed (splits, logs),
    and `messages` are what `unipo.models.format_prompt` hands the chat template."""

    messages: tuple[Mapping[str, str], ...]

    def __new__(cls, messages: Sequence[Mapping[str, str]]) -> Conversation:
        turns = tuple({"role": str(m["role"]), "content": str(m["content"])} for m in messages)
        text = super().__new__(cls, "\n\n".join(turn["content"] for turn in turns))
        text.messages = turns
        return text

    def __add__(self, other: str) -> Conversation:
        """Text added to a conversation goes at the end of its last user turn (GHPO's hint)."""
        turns = [dict(turn) for turn in self.messages]
        last = max((i for i, turn in enumerate(turns) if turn["role"] == "user"), default=len(turns) - 1)
        turns[last]["content"] += other
        return Conversation(turns)

    def __reduce__(self):
        return Conversation, (self.messages,)


@TASKS.register("hf")
class HfTask(JsonlTask):
    scorer_is_safe = False  # the jsonl scorer (sympy): scored in the reward sandbox

    def __init__(self, source: str = "", split: str = "train", eval_split: str | None = None,
                 prompt: str = "prompt", answer: str = "answer", demonstration: str | None = None,
                 max_new_tokens: int | None = None) -> None:
        source = str(source).strip()
        if not source:
            raise ValueError("hf task needs a dataset: 'hf:<path or hub id>[:prompt=<column>,answer=<column>]'")
        self.source, self.name = source, f"hf:{source}"
        # a column or split named "1" is parsed as a number by the spec parser
        split, prompt, answer = str(split), str(prompt), str(answer)
        demonstration, eval_split = (None if v is None else str(v) for v in (demonstration, eval_split))
        splits = _read(source)
        if split not in splits:
            raise ValueError(f"{self.name}: no split {split!r} (splits: {', '.join(splits)}); choose one with split=")
        train = self._problems(splits, split, prompt, answer, demonstration)
        if eval_split is None and "test" in splits and split != "test":
            eval_split = "test"
        if eval_split is None:
            if self.name not in _warned:
                _warned.add(self.name)
                from unipo.runs import warn

                warn(f"{self.name} has no 'test' split: evaluation uses the training prompts (name a split with "
                     f"eval_split=<split>, or hold out ~10% by hash with eval_split=hash)")
            test = train
        elif eval_split == "hash":
            train, test = ([p for p in train if split_of(p.prompt) == part] for part in ("train", "test"))
        elif eval_split not in splits:
            raise ValueError(f"{self.name}: no split {eval_split!r} to evaluate on (splits: "
                             f"{', '.join(splits)}, or eval_split=hash)")
        else:
            test = self._problems(splits, eval_split, prompt, answer, demonstration)
        for part, problems in (("train", train), ("test", test)):
            if not problems:
                raise ValueError(f"{self.name}: the {part!r} split is empty after the hash split (eval_split=hash "
                                 f"puts ~10% of the prompts in 'test'); use a larger split or a named eval_split")
        self._splits = {"train": train, "test": test}
        self.problems = train + ([] if test is train else test)  # everything a preflight check should see
        longest = max(len(p.demonstration or p.answer) for p in self.problems)
        self.max_new_tokens = max_new_tokens if max_new_tokens is not None else longest + 16
        self._gold_cache: dict[str, list] = {}

    def _problems(self, splits: Mapping[str, Any], split: str, prompt: str, answer: str,
                  demonstration: str | None) -> list[Problem]:
        data = splits[split]
        columns = list(data.column_names)
        if demonstration is None and "demonstration" in columns:
            demonstration = "demonstration"
        for role, column in (("prompt", prompt), ("answer", answer), ("demonstration", demonstration)):
            if column is not None and column not in columns:
                raise ValueError(f"{self.name}: split {split!r} has no {role} column {column!r} (columns: "
                                 f"{', '.join(columns)}); name it with {role}=<column>")
        if len(data) == 0:
            raise ValueError(f"{self.name}: split {split!r} has no rows")
        wanted = list(dict.fromkeys(c for c in (prompt, answer, demonstration) if c is not None))
        problems = []
        for index, row in enumerate(data.select_columns(wanted).to_list()):
            where = f"{self.name}: split {split!r}, row {index}"
            gold = _text(row[answer], where, answer)
            shown = gold if demonstration is None or row[demonstration] is None else \
                _text(row[demonstration], where, demonstration)
            problems.append(Problem(prompt=_prompt(row[prompt], where, prompt), answer=gold, demonstration=shown))
        return problems

    def sample(self, n: int, *, seed: int, split: str = "train") -> list[Problem]:
        check_sample_args(n, split)
        pool = self._splits[split]
        rng = random.Random(f"{self.name}|{seed}|{split}")
        return rng.sample(pool, n) if n <= len(pool) else rng.choices(pool, k=n)

    def __getstate__(self) -> dict[str, Any]:
        # the reward sandbox only scores: the problems stay in this process
        return {**self.__dict__, "problems": [], "_splits": {}, "_gold_cache": {}}


def _prompt(value: Any, where: str, column: str) -> str:
    if isinstance(value, str):
        return value
    if _is_messages(value) and value:
        return Conversation(value)
    raise ValueError(f"{where}: prompt column {column!r} must hold text or a list of chat messages "
                     f"({{'role', 'content'}}), got {type(value).__name__}")


def _text(value: Any, where: str, column: str) -> str:
    """An answer or demonstration cell as text: a string, a number, or a conversation's last assistant turn."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if _is_messages(value) and value:
        replies = [m["content"] for m in value if m["role"] == "assistant"] or [value[-1]["content"]]
        return str(replies[-1])
    raise ValueError(f"{where}: column {column!r} must hold text, a number or chat messages, "
                     f"got {type(value).__name__}")


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(m, Mapping) and "role" in m and "content" in m for m in value)


def _read(source: str) -> Mapping[str, Any]:
    """The dataset's splits ({name: Dataset}); one ValueError line when it cannot be read."""
    try:
        import datasets
    except ImportError:
        raise ValueError("hf: tasks need the datasets package: pip install 'unipo[data]'") from None
    path = Path(os.path.expanduser(source))
    local = path.exists() or source.startswith((".", "/", "~")) or path.suffix in FILE_BUILDERS
    if local and not path.exists():
        raise ValueError(f"hf:{source}: no such file or folder")
    stamp = _stamp(path) if local else None
    try:
        return _load(str(path.resolve()) if local else source, local, stamp)
    except (OSError, ValueError, datasets.exceptions.DatasetNotFoundError) as error:
        if "corresponds to no data" in str(error):  # datasets' words for a file with no rows
            raise ValueError(f"hf:{source}: the dataset has no rows") from None
        first = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
        where = "" if local else " (not a local file or folder; looked up as a hub id)"
        raise ValueError(f"hf:{source}{where}: cannot be loaded: {first}") from None


def _stamp(path: Path) -> tuple:
    """What changes when the data on disk does (so a rewritten file is read again)."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files)


@functools.lru_cache(maxsize=8)
def _load(source: str, local: bool, stamp: tuple | None) -> Mapping[str, Any]:
    """Read once per process (a run builds its task a few times: checks, trainer, evaluation)."""
    import datasets

    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # a bar per split read is noise next to the run's own
    try:
        data = _load_splits(datasets, source, local)
    finally:
        if bars:
            datasets.enable_progress_bars()
    return data if isinstance(data, datasets.DatasetDict) else {"train": data}


def _load_splits(datasets, source: str, local: bool):
    path = Path(source)
    if local and path.is_dir() and any((path / f).is_file() for f in ("dataset_dict.json", "state.json")):
        return datasets.load_from_disk(source)
    if local and path.is_file():
        if path.suffix not in FILE_BUILDERS:
            raise ValueError(f"unknown data file type {path.suffix!r} (known: {', '.join(FILE_BUILDERS)})")
        return datasets.load_dataset(FILE_BUILDERS[path.suffix], data_files=source)
    return datasets.load_dataset(source)  # a folder of data files, or a hub id
