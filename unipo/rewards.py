"""Reward functions as plain Python: `rollout.reward=MODULE:FUNCTION[@WEIGHT],...`, and reward models
(`rm:FOLDER[@WEIGHT]`: a Bradley-Terry model `unipo rm` trained, scored in-process, its raw score times the weight
added like a function's).

Syntax. A comma-separated string (or a YAML list) of `MODULE:FUNCTION[@WEIGHT]`. MODULE is an importable dotted
name (found on PYTHONPATH or in the current folder) or the path of a `.py` file; WEIGHT is a finite number (default
1; negative is fine). E.g. `rollout.reward=myrewards:brevity@0.1,myrewards:style@0.5`.

Call. Each function is called once per scored row (rollouts and expert rows alike) as
`fn(prompt, completion, answer=..., demonstration=..., **meta)`: the task's prompt (before the chat template),
the completion text (its last 8192 characters, as the verifier sees it), the problem's gold answer and
demonstration (None when the task has none) and the task's extra fields (`Problem.meta`: a `datasets` row's or a
reasoning-gym entry's). Accept `**kwargs` for the fields you do not use. It returns a number (int, float, bool or
a numpy number; any finite value, [0, 1] is not required) or None.

Combination. reward = verifier term + sum_i weight_i * fn_i(...). The verifier term is the task's score as
without reward functions: on the recipe's scale (`reward_scale`: unit [0, 1] or signed 2s - 1), zeroed for a
truncated row under `zero_truncated`, plus DAPO's overlong penalty. `correct` (train accuracy, dynamic sampling,
GHPO hints) and held-out evaluation stay the verifier's: full marks from the task's own scorer, which keeps its
[0, 1] contract.

None (skip). A row for which any function returns None is dropped from the step's batch: it is not trained on and
takes no part in its group's baseline (its group is one row smaller; a group whose rows are all dropped is gone
from the step). Counted in `rollout/reward_skipped`.

Errors. A function that raises, returns NaN or an infinity, returns something that is not a number, or overruns
the sandbox's time limit ($UNIPO_REWARD_TIMEOUT_S, default 5 s per call) adds 0 for that row and is counted in
`rollout/reward_errors/<name>` (timeouts also in `rollout/reward_timeouts`); the run goes on. <name> is the
function's name (`module.function` when two modules give the same name). `rollout/reward_fn/<name>` is the mean of
its values over the rows it did not skip (errors as 0).

Sandbox. The functions score model output, so they run in the reward sandbox (`unipo.sandbox`) like a verifier
that is not known safe: in confined worker processes (no writes, no network, no subprocesses), never in the
training process. The module is imported in the trainer too (a check before the model loads), so keep its import
free of side effects.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import math
import numbers
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unipo.tasks.base import Problem, Task, score_completions

_SPEC = re.compile(r"(?P<module>[^@]+?):(?P<function>[A-Za-z_][A-Za-z0-9_]*)(?:@(?P<weight>[^@]*))?")
_ROW_FIELDS = ("answer", "demonstration")
SYNTAX = ("MODULE:FUNCTION[@WEIGHT] or rm:FOLDER[@WEIGHT], comma-separated (e.g. myrewards:brevity@0.1,"
          "rm:runs/my-rm)")
RM = "rm"  # `rm:FOLDER`: a Bradley-Terry reward model saved by `unipo rm` (unipo.reward_model)


@dataclass(frozen=True)
class RewardSpec:
    """One `MODULE:FUNCTION[@WEIGHT]` entry."""

    module: str
    function: str
    weight: float = 1.0

    @property
    def is_reward_model(self) -> bool:
        return self.module == RM

    @classmethod
    def parse(cls, text: Any) -> RewardSpec:
        if isinstance(text, str) and text.strip().startswith(f"{RM}:"):
            folder, _, weight = text.strip()[len(RM) + 1:].partition("@")
            if not folder:
                raise ValueError(f"rollout.reward entry {text!r}: rm: needs the reward model's folder (rm:FOLDER)")
            return cls(RM, folder, _weight(text, weight) if weight else 1.0)
        if not isinstance(text, str) or not (match := _SPEC.fullmatch(text.strip())):
            raise ValueError(f"rollout.reward entry {text!r} is not {SYNTAX}")
        weight = 1.0 if match["weight"] is None else _weight(text, match["weight"])
        return cls(match["module"].strip(), match["function"], weight)

    def __str__(self) -> str:
        return f"{self.module}:{self.function}" + ("" if self.weight == 1.0 else f"@{self.weight!r}")


def _weight(text: str, raw: str) -> float:
    try:
        weight = float(raw)
    except ValueError:
        weight = math.nan
    if not math.isfinite(weight):
        raise ValueError(f"rollout.reward entry {text!r}: the weight after '@' must be a finite number")
    return weight


def parse_reward_specs(value: Any) -> tuple[str, ...]:
    """`rollout.reward` as a tuple of canonical entries; "" / None / [] -> (). ValueError (one line) otherwise."""
    if value is None:
        return ()
    if isinstance(value, str):
        items = [part for part in value.split(",") if part.strip()]
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        raise ValueError(f"rollout.reward must be {SYNTAX}, got {value!r}")
    specs = [RewardSpec.parse(item) for item in items]
    reward_names(specs)  # duplicates are an error now, not at the first step
    return tuple(str(spec) for spec in specs)


def reward_names(specs: Sequence[RewardSpec]) -> list[str]:
    """The metric name of each function: its name, or `module.function` where two modules give the same name."""
    short = [RM if spec.is_reward_model else spec.function for spec in specs]
    names = [name if short.count(name) == 1 else (f"{RM}.{Path(s.function).name}" if s.is_reward_model
                                                   else f"{Path(s.module).stem}.{s.function}")
             for name, s in zip(short, specs)]
    for name in names:
        if names.count(name) > 1:
            raise ValueError(f"rollout.reward lists {name!r} twice; give each function once (with its weight)")
    return names


# -- loading ------------------------------------------------------------------------------------------------------
def import_reward_function(spec: RewardSpec, root: str | None = None) -> tuple[Callable[..., Any], str | None]:
    """(the function, the folder to put on sys.path to import its module elsewhere); one-line ValueError if the
    module does not import or has no such function. `root`: a folder to try when the module is not found."""
    try:
        if spec.module.endswith(".py"):
            module = _import_file(spec.module)
            root = None
        else:
            module = _import_module(spec.module, root)
            root = _import_root(module, spec.module)
    except Exception as error:  # noqa: BLE001 - whatever the user's module raises while importing
        message = " ".join(f"{type(error).__name__}: {error}".split())
        raise ValueError(f"rollout.reward {str(spec)!r}: cannot import {spec.module!r} ({message})") from None
    function = getattr(module, spec.function, None)
    if function is None:
        raise ValueError(f"rollout.reward {str(spec)!r}: module {spec.module!r} has no {spec.function!r}")
    if not callable(function):
        raise ValueError(f"rollout.reward {str(spec)!r}: {spec.module}.{spec.function} is not a function")
    return function, root


def _import_module(name: str, root: str | None):
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as error:
        if error.name != name.split(".")[0]:
            raise
    # the `unipo` script's sys.path lacks the current folder, where a user's module usually sits
    for folder in (root, os.getcwd()):
        if folder and folder not in sys.path:
            sys.path.append(folder)
    return importlib.import_module(name)


def _import_file(path: str):
    full = os.path.abspath(path)
    if not os.path.isfile(full):
        raise FileNotFoundError(f"no file {full!r}")
    name = f"unipo_reward_{Path(full).stem}_{hashlib.sha256(full.encode()).hexdigest()[:8]}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, full)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _import_root(module: Any, name: str) -> str | None:
    """The sys.path entry the module was found under (so a sandbox worker started earlier can find it too)."""
    file = getattr(module, "__file__", None)
    if not file:
        return None
    path = Path(file).resolve()
    depth = name.count(".") + (path.name == "__init__.py")
    return str(path.parents[depth])


def check_reward_functions(specs: Sequence[str]) -> None:
    """Import each function, and check each reward model's folder (preflight: before the model loads); one-line
    ValueError on the first that fails."""
    from unipo.reward_model import CONFIG_FILE

    for text in specs:
        spec = RewardSpec.parse(text)
        if spec.is_reward_model:
            if not (Path(spec.function) / CONFIG_FILE).is_file():
                raise ValueError(f"rollout.reward {text!r}: {spec.function} is not a reward model folder (no "
                                 f"{CONFIG_FILE}; train one with `unipo rm --data PAIRS --out FOLDER`)")
        else:
            import_reward_function(spec)


# -- scoring ------------------------------------------------------------------------------------------------------
def row_fields(problem: Problem) -> dict[str, Any]:
    """The keyword arguments a reward function gets besides the prompt and the completion."""
    extra = {k: v for k, v in dict(problem.meta or {}).items()
             if isinstance(k, str) and k.isidentifier() and k not in (*_ROW_FIELDS, "prompt", "completion")}
    return {"answer": problem.answer, "demonstration": problem.demonstration, **extra}


def as_reward(value: Any) -> float:
    """A function's return value as a reward: a finite float, NaN for None (the skip marker: a NaN the function
    returns itself is an error); TypeError or ValueError for anything else."""
    if value is None:
        return math.nan
    if isinstance(value, (str, bytes)) or not isinstance(value, numbers.Real):
        raise TypeError(f"returned a {type(value).__name__}, not a number")
    reward = float(value)
    if not math.isfinite(reward):
        raise ValueError(f"returned {reward}")
    return reward


class SandboxedRewardFunction(Task):
    """A reward function seen as a task's scorer, so the reward sandbox runs it: `score` calls the function and
    checks its value; unpickled in a sandbox worker, it imports the function there."""

    scorer_is_safe = False  # user code on model output: always the sandbox
    max_new_tokens = 1  # unused: it only scores
    warm_up = False  # the sandbox's warm-up call would run outside the scorer's confinement, and count as a call

    def __init__(self, spec: RewardSpec, root: str | None = None) -> None:
        self.spec = spec
        self.name = f"reward {spec.module}:{spec.function}"
        self.function, self.root = import_reward_function(spec, root)

    def __reduce__(self):
        module = os.path.abspath(self.spec.module) if self.spec.module.endswith(".py") else self.spec.module
        return (SandboxedRewardFunction, (RewardSpec(module, self.spec.function, self.spec.weight), self.root))

    def sample(self, n: int, *, seed: int, split: str = "train") -> list[Problem]:
        raise NotImplementedError("a reward function scores; it has no problems")

    def score(self, problem: Problem, completion: str) -> float:
        return as_reward(self.function(problem.prompt, completion, **row_fields(problem)))

    def check_score(self, value: object) -> float:
        """Any finite float, or NaN (None, already told apart from a NaN return by `as_reward` in the worker)."""
        reward = float(value)  # type: ignore[arg-type]
        if math.isinf(reward):
            raise ValueError(f"score {reward!r} is infinite")
        return reward


@dataclass
class UserRewards:
    """What the reward functions gave a list of rows."""

    total: list[float]  # sum_i weight_i * fn_i per row (errors add 0)
    skipped: list[bool]  # some function returned None
    errors: dict[str, int] = field(default_factory=dict)  # per function: raised, bad value, timeout
    timeouts: int = 0
    sums: dict[str, float] = field(default_factory=dict)  # per function: sum of its values (errors as 0) ...
    counts: dict[str, int] = field(default_factory=dict)  # ... over this many rows (those it did not skip)


class RewardFunctions:
    """The functions of `rollout.reward`, imported once; `score(problems, completions)` -> `UserRewards`."""

    def __init__(self, specs: Sequence[str], *, sandbox: Any | None = None) -> None:
        from unipo.reward_model import RewardModelScorer

        self.specs = [RewardSpec.parse(text) for text in specs]
        self.names = reward_names(self.specs)
        # A reward model is our own network scoring text: it runs in this process, no user code involved.
        self.scorers = [RewardModelScorer(spec.function) if spec.is_reward_model else SandboxedRewardFunction(spec)
                        for spec in self.specs]
        self.sandbox = sandbox  # None: the process-wide one

    def score(self, problems: Sequence[Problem], completions: Sequence[str]) -> UserRewards:
        n = len(problems)
        # plain rows: a task's meta may be a read-only mapping, which does not pickle
        rows = [Problem(p.prompt, p.answer, p.demonstration, dict(p.meta or {})) for p in problems]
        out = UserRewards(total=[0.0] * n, skipped=[False] * n)
        for name, spec, scorer in zip(self.names, self.specs, self.scorers):
            if spec.is_reward_model:  # raw Bradley-Terry scores: only their differences mean anything
                values = scorer([p.prompt for p in rows], list(completions))
                out.errors[name], out.sums[name], out.counts[name] = 0, sum(values), n
                out.total = [t + spec.weight * v for t, v in zip(out.total, values)]
                continue
            result = score_completions(scorer, rows, completions, sandbox=self.sandbox)
            out.errors[name] = result.errors + result.timeouts
            out.timeouts += result.timeouts
            values = [v for v in result.rewards if not math.isnan(v)]
            out.sums[name], out.counts[name] = sum(values), len(values)
            for i, value in enumerate(result.rewards):
                if math.isnan(value):
                    out.skipped[i] = True
                else:
                    out.total[i] += spec.weight * value
        return out
