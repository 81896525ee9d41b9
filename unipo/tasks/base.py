"""What a task is: prompts, a verifier, and an expert demonstration per prompt.

A `Task` hands the trainer `Problem`s (prompt, gold answer, demonstration) and scores
completions in [0, 1]. Hybrid-policy methods (LUFFY arXiv 2504.14945, CHORD, HPT, ...) need an
off-policy expert trace for every prompt, so every built-in task produces one with its own
solver.

Splits: a problem belongs to "train" or "test" by a stable hash of its prompt (`split_of`),
so the two splits never share a prompt, whatever the seed, the task parameters or the
process (Python's `hash` is salted per process; sha256 is not).

Model output is untrusted input: nothing here evaluates it as code. Scorers that may (a
third-party verifier that calls `eval` or sympy's `parse_expr`, as several reasoning-gym datasets
do) run in the reward sandbox (`unipo.sandbox`): a task whose `scorer_is_safe` is False is scored
in a pool of resource-limited worker processes, never in the training process.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import logging
import math
import random
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from unipo.core.registry import Registry

logger = logging.getLogger(__name__)

SPLITS = ("train", "test")
TEST_FRACTION_PERCENT = 10  # ~10% of prompts are test prompts

# A generator needs ~1/TEST_FRACTION draws per test problem; this many draws per requested
# problem (plus a constant) before concluding the problem space is too small for the split.
_DRAWS_PER_PROBLEM = 200
_MIN_DRAWS = 2000


@dataclass(frozen=True)
class Problem:
    """One prompt with its gold answer and an expert demonstration (the completion text).

    `meta` carries whatever the task's scorer needs besides the answer (countdown's numbers,
    a reasoning-gym entry). It is left out of the hash so a Problem stays hashable.
    """

    prompt: str
    answer: str
    demonstration: str | None
    meta: Mapping = field(default_factory=dict, hash=False)


class Task(ABC):
    """A source of problems and their verifier.

    `sample(n, seed=s, split=...)` is deterministic for (task parameters, s, split);
    `score(problem, completion)` returns a reward in [0, 1].
    """

    name: str
    max_new_tokens: int  # a completion budget that fits a correct answer with room to spare
    # True only for a scorer that never evaluates the completion as code and runs in time linear
    # in its length (the built-in verifiers); any other task is scored in the reward sandbox,
    # which needs the task to be picklable (or to re-create itself in the worker via __reduce__).
    scorer_is_safe: bool = False
    # True for a task whose `score` returns (number, text) rather than a number: the reward sandbox sends the text
    # back too (`ScoreResult.texts`, at most MAX_RESULT_TEXT bytes of UTF-8). Tools use it (`unipo.envs.tools`).
    returns_text: bool = False

    @abstractmethod
    def sample(self, n: int, *, seed: int, split: str = "train") -> list[Problem]: ...

    @abstractmethod
    def score(self, problem: Problem, completion: str) -> float: ...

    def check_score(self, value: object) -> float:
        """`score`'s value as a reward, or ValueError/TypeError (scored 0, counted): a float in [0, 1] for a task's
        verifier; a user reward function (`unipo.rewards`) allows any finite float."""
        return check_reward(value)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, max_new_tokens={self.max_new_tokens})"


class SystemPrompted(Task):
    """`task` with a system message before every prompt (`TrainConfig.system_prompt`): a tokenizer with a chat
    template gets a system turn before the conversation; one without sees the system text, a blank line, then the
    prompt. Scoring, budgets and everything else are the task's own."""

    def __init__(self, task: Task, system: str) -> None:
        self.task, self.system = task, system
        self.name, self.max_new_tokens, self.scorer_is_safe = task.name, task.max_new_tokens, task.scorer_is_safe

    def sample(self, n: int, *, seed: int, split: str = "train") -> list[Problem]:
        from unipo.tasks.hf import Conversation

        def prompted(prompt: str) -> str:
            turns = getattr(prompt, "messages", None) or ({"role": "user", "content": prompt},)
            return Conversation([{"role": "system", "content": self.system}, *turns])

        return [dataclasses.replace(p, prompt=prompted(p.prompt)) for p in self.task.sample(n, seed=seed, split=split)]

    def score(self, problem: Problem, completion: str) -> float:
        return self.task.score(problem, completion)

    def check_score(self, value: object) -> float:
        return self.task.check_score(value)

    def __getattr__(self, name: str):  # the task's other attributes (demonstrations, parameters)
        if name == "task":  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.task, name)


class GeneratedTask(Task):
    """A task with an unbounded procedural generator: rejection-samples problems into a split."""

    @abstractmethod
    def generate(self, rng: random.Random, split: str) -> Problem | None:
        """One random problem drawn with `rng`, of either split.

        May return None as soon as the drawn prompt turns out not to be in `split`, to skip
        expensive work (countdown's solver); the caller checks the split either way.
        """

    def sample(self, n: int, *, seed: int, split: str = "train") -> list[Problem]:
        check_sample_args(n, split)
        rng = random.Random(f"{self.name}|{seed}|{split}")  # str seeds are hashed with sha512: stable
        problems: list[Problem] = []
        max_draws = _DRAWS_PER_PROBLEM * n + _MIN_DRAWS
        for _ in range(max_draws):
            if len(problems) == n:
                break
            problem = self.generate(rng, split)
            if problem is not None and split_of(problem.prompt) == split:
                problems.append(problem)
        if len(problems) < n:
            raise ValueError(
                f"task {self.name!r}: found only {len(problems)} of {n} {split!r} problems in "
                f"{max_draws} draws; the problem space is too small for this split"
            )
        return problems


def check_sample_args(n: int, split: str) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")


def split_of(prompt: str) -> str:
    """'test' for ~10% of prompts chosen by sha256 of the prompt, 'train' for the rest."""
    digest = hashlib.sha256(prompt.encode("utf-8")).digest()
    bucket = int.from_bytes(digest[:8], "big") % 100
    return "test" if bucket < TEST_FRACTION_PERCENT else "train"


def derive_seed(*parts: object) -> int:
    """A stable 31-bit seed from any printable parts (for libraries that want an int seed)."""
    digest = hashlib.sha256("|".join(map(str, parts)).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % (2**31)


# ----------------------------------------------------------------------------------------
# Reading answers out of completions
# ----------------------------------------------------------------------------------------

_ANSWER_OPEN, _ANSWER_CLOSE = "<answer>", "</answer>"
_BOXED = "\\boxed{"
_BRACE = re.compile(r"[{}]")
_MAX_INT_DIGITS = 64  # longer "integers" are garbage, and int() of huge strings is slow

# Completions longer than this are scored on their last MAX_SCORED_CHARS characters (where a
# final `<answer>` or `\boxed{}` sits): `score_completions` cuts them before any parser or
# scorer sees them, and counts them. A reasoning trace of a few thousand tokens fits; a 10 MB
# completion costs the scorer no more than an 8 KB one.
MAX_SCORED_CHARS = 8192


def extract_answer(text: str) -> str:
    """The content of the last `<answer>...</answer>` or `\\boxed{...}` in `text`, else `text`.

    Whichever of the two starts last wins, so `<answer>\\boxed{5}</answer>` gives `5`. The
    result is stripped. Chat models that reason before answering and the tiny char-level
    model that answers directly are then scored by the same tasks.

    `<answer>` pairs are read left to right, each opening tag with the first closing tag after
    it (the lazy regex `<answer>(.*?)</answer>`); `\\boxed{` takes the last one whose braces
    balance. Both are one pass over the text: time linear in its length, whatever it holds.
    """
    best_start, best = _last_answer_tag(text)
    boxed_start, boxed = _last_boxed(text)
    if boxed is not None and boxed_start > best_start:
        best = boxed
    return (text if best is None else best).strip()


def _last_answer_tag(text: str) -> tuple[int, str | None]:
    """Start index and content of the last `<answer>...</answer>` pair, as `re.finditer` of the lazy
    pattern would pair them, in one left-to-right pass (the regex rescans to the end from every
    unclosed `<answer>`: quadratic)."""
    start, content, position = -1, None, 0
    while True:
        opening = text.find(_ANSWER_OPEN, position)
        if opening == -1:
            return start, content
        closing = text.find(_ANSWER_CLOSE, opening + len(_ANSWER_OPEN))
        if closing == -1:  # no later opening tag can close either
            return start, content
        start, content = opening, text[opening + len(_ANSWER_OPEN) : closing]
        position = closing + len(_ANSWER_CLOSE)


def _last_boxed(text: str) -> tuple[int, str | None]:
    """Start index and content of the last `\\boxed{...}` whose braces balance.

    One pass over the braces with a stack of open ones: the `}` that pops a `\\boxed{` brace is the
    one the brace-counting scan from that `\\boxed{` would stop at, so the result is the same as
    trying each `\\boxed{` from the last one back, without rescanning the tail for every one.
    """
    opened: list[int] = []  # indices of unmatched "{" (a "}" with none open is ignored)
    best_start, best_end = -1, -1
    first_open = len(_BOXED) - 1  # index of "{" inside "\\boxed{"
    for match in _BRACE.finditer(text):
        index = match.start()
        if text[index] == "{":
            opened.append(index)
        elif opened:
            brace = opened.pop()
            start = brace - first_open
            if start > best_start and text.startswith(_BOXED, start):
                best_start, best_end = start, index
    if best_start == -1:
        return -1, None
    return best_start, text[best_start + len(_BOXED) : best_end]


def parse_integer(text: str) -> int | None:
    """`text` (stripped) as an int if it is one (optional sign, digits only), else None."""
    text = text.strip()
    if len(text) > _MAX_INT_DIGITS or not re.fullmatch(r"[+-]?[0-9]+", text):
        return None
    return int(text)


# ----------------------------------------------------------------------------------------
# Scoring a batch without letting one bad scorer call stop the run
# ----------------------------------------------------------------------------------------


@dataclass
class ScoreResult:
    """Rewards of a batch of completions and what went wrong while scoring them.

    `errors`: scorer calls that raised, returned something that is not a finite number in [0, 1],
    tried something the sandbox forbids, or crashed their worker; `timeouts`: calls that overran
    the sandbox's time limit; `truncated`: completions longer than MAX_SCORED_CHARS, scored on
    their tail. Every error and timeout scored 0.
    """

    rewards: list[float]
    errors: int = 0
    timeouts: int = 0
    truncated: int = 0
    texts: list[str] | None = None  # a `returns_text` task's texts ("" where the call failed); else None


def score_completions(task: Task, problems: Sequence[Problem], completions: Sequence[str], *,
                      sandbox: object | None = None) -> ScoreResult:
    """Rewards `task.score(p, c)` for each pair, with the count of failed and timed-out calls.

    A call that raises, or returns something that is not a finite number in [0, 1], scores 0
    and is counted: one malformed completion (or a scorer bug on a rare input) must not stop
    a training run, but the count is logged so it is not silent either. Completions are cut to
    their last MAX_SCORED_CHARS characters first. A task whose `scorer_is_safe` is False is
    scored in `sandbox` (a `unipo.sandbox.RewardSandbox`; default: the process-wide one), where a
    call that hangs scores 0 and counts as a timeout.
    """
    if len(problems) != len(completions):
        raise ValueError(f"{len(problems)} problems but {len(completions)} completions")
    capped, truncated = cap_completions(completions)
    if task.scorer_is_safe:
        result = score_in_process(task, problems, capped)
    else:
        from unipo.sandbox import default_sandbox  # multiprocessing only when a task needs it

        result = (sandbox or default_sandbox()).score(task, problems, capped)
    result.truncated = truncated
    return result


def cap_completions(completions: Sequence[str]) -> tuple[list[str], int]:
    """Each completion cut to its last MAX_SCORED_CHARS characters, and how many were cut."""
    capped = [c if len(c) <= MAX_SCORED_CHARS else c[-MAX_SCORED_CHARS:] for c in completions]
    return capped, sum(len(c) > MAX_SCORED_CHARS for c in completions)


def score_in_process(task: Task, problems: Sequence[Problem], completions: Sequence[str]) -> ScoreResult:
    """`task.score` on each pair in this process (for scorers that are safe to run here), errors counted."""
    rewards: list[float] = []
    texts: list[str] | None = [] if getattr(task, "returns_text", False) else None  # (duck-typed tasks too)
    errors = 0
    first_error: str | None = None
    for problem, completion in zip(problems, completions):
        text = ""
        try:
            value = task.score(problem, completion)
            if texts is not None:
                value, text = split_text_result(value)
            reward = getattr(task, "check_score", check_reward)(value)
        except Exception as error:  # noqa: BLE001 - any scorer failure becomes reward 0
            errors += 1
            first_error = first_error or f"{type(error).__name__}: {error}"
            reward, text = 0.0, ""
        rewards.append(reward)
        if texts is not None:
            texts.append(text)
    if errors:
        logger.warning("task %s: %d scorer error(s) scored 0; first: %s", task.name, errors, first_error)
    return ScoreResult(rewards, errors, texts=texts)


MAX_RESULT_TEXT = 4096  # bytes of UTF-8 a `returns_text` task's text keeps (the sandbox's record limit)


def split_text_result(value: object) -> tuple[float, str]:
    """A `returns_text` task's (number, text), the text cut to MAX_RESULT_TEXT bytes of UTF-8; TypeError if
    `value` is not such a pair."""
    if not (isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], str)):
        raise TypeError(f"a text-returning scorer must return (number, str), got {type(value).__name__}")
    text = value[1].encode("utf-8", "replace")[:MAX_RESULT_TEXT].decode("utf-8", "ignore")
    return float(value[0]), text


def check_reward(value: object) -> float:
    """`value` as a float in [0, 1]; ValueError (or TypeError) for anything else."""
    reward = float(value)  # type: ignore[arg-type]
    if not (math.isfinite(reward) and 0.0 <= reward <= 1.0):
        raise ValueError(f"score {reward!r} is outside [0, 1]")
    return reward


# ----------------------------------------------------------------------------------------
# Registry and spec parsing
# ----------------------------------------------------------------------------------------

TASKS: Registry[Callable[..., Task]] = Registry("task")

# Tasks whose spec carries a free-form argument after the colon instead of key=value params.
_ARGUMENT_KEY = {"rg": "dataset", "jsonl": "path"}


def get_task(spec: str, **params: object) -> Task:
    """Build a task from a spec string; keyword `params` add to those in the spec.

    Forms: `"addition"`, `"addition:digits=3"` (comma-separated key=value; ints, floats and
    true/false are parsed, anything else stays a string), `"rg:<dataset>"` or
    `"rg:<dataset>:key=value,..."` (a reasoning-gym dataset and its config), `"jsonl:<path>"`,
    a bare path ending in `.jsonl`, `"hf:<path or hub id>[:key=value,...]"` (a `datasets` dataset; the
    parameters follow the last colon) and a bare path ending in `.parquet` or `.arrow`. Unknown names and
    parameters raise ValueError.
    """
    spec = spec.strip()
    if spec.endswith(".jsonl") and not spec.startswith(("jsonl:", "hf:")):
        spec = f"jsonl:{spec}"
    if spec.endswith((".parquet", ".arrow")) and not spec.startswith("hf:"):
        spec = f"hf:{spec}"
    name, _, rest = spec.partition(":")
    try:
        factory = TASKS.get(name)
    except ValueError as error:
        raise ValueError(f"{error} (also: rg:<dataset>, jsonl:<path>, hf:<dataset>, or a path ending in .jsonl "
                         f"or .parquet)") from None
    if name == "jsonl":
        spec_params: dict[str, object] = {"path": rest}  # a path may contain ':' or ','
    elif name == "hf":  # hf:<source>[:k=v,...]; a source may contain ':' (the parameters hold an '=')
        source, _, param_text = rest.rpartition(":")
        if not source or "=" not in param_text:
            source, param_text = rest, ""
        spec_params = {"source": source, **parse_params(param_text)}
    elif name in _ARGUMENT_KEY:
        argument, _, param_text = rest.partition(":")
        spec_params = {_ARGUMENT_KEY[name]: argument, **parse_params(param_text)}
    else:
        spec_params = parse_params(rest)
    both = sorted(set(spec_params) & set(params))
    if both:
        raise ValueError(f"task {name!r}: parameter(s) {both} given both in the spec and as keywords")
    merged = {**spec_params, **params}
    _check_params(name, factory, merged)
    return factory(**merged)


def parse_params(text: str) -> dict[str, object]:
    """`"a=3,b=0.5,c=x"` -> {"a": 3, "b": 0.5, "c": "x"}; empty text -> {}."""
    params: dict[str, object] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"task parameter {item!r} is not of the form key=value")
        params[key.strip()] = _parse_value(value.strip())
    return params


def _parse_value(value: str) -> object:
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    for convert in (int, float):
        try:
            return convert(value)
        except ValueError:
            pass
    return value


def _check_params(name: str, factory: Callable[..., Task], params: Mapping[str, object]) -> None:
    """ValueError naming the accepted parameters when `params` has one the factory lacks."""
    signature = inspect.signature(factory)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values()):
        return  # the factory validates its own free-form config
    accepted = [p for p in signature.parameters if p != "self"]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ValueError(f"task {name!r}: unknown parameter(s) {unknown}; accepted: {', '.join(accepted)}")
