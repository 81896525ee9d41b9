"""Preference oracles: who judges two answers to one prompt, `prefer(problems, a, b) -> P(a > b)`, batched.

An oracle answers, for each i, the probability that answer `a[i]` is preferred to `b[i]` as a response to
`problems[i]` (a `unipo.tasks.base.Problem`: its `prompt`, and for the task oracle its answer key). The
online and self-play data sources (`unipo.collect`: online_pairs, self_play, nash_md) call it on the current
policy's samples; `TrainConfig.oracle` picks it by a spec string:

- `task`: the task's verifier. Both answers are scored with `score_completions` (the RL reward); P = 1, 0.5
  or 0 as a's score is above, equal to or below b's. A general preference this is not, but it is what every
  verifiable task offers (and ties are what the pair sources drop).
- `rm:<path>`: a Bradley-Terry reward model saved by `unipo.reward_model` (`RewardModelScorer(path).prefer`,
  sigma(r(a) - r(b))).
- `module:function`: user code, `function(prompts: list[str], a: list[str], b: list[str]) -> list[float]` of
  probabilities in [0, 1] (the module must be importable: on PYTHONPATH or installed).

`ORACLES` is a registry of the built-in kinds (the part of the spec before `:`), each a factory
`(argument, task) -> oracle`; anything else with a `:` is taken as user code.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence

import torch

from unipo.core.registry import Registry
from unipo.tasks.base import Problem, Task, score_completions

PreferFn = Callable[[Sequence[Problem], Sequence[str], Sequence[str]], torch.Tensor]

ORACLES: Registry[Callable[[str, Task], PreferFn]] = Registry("preference oracle")


def check_oracle_spec(spec: str) -> None:
    """ValueError (one line) unless `spec` has an oracle's form; nothing is loaded."""
    kind, _, argument = spec.partition(":")
    if spec == "task":
        return
    if kind == "rm" and argument:
        return
    if kind and argument and kind != "task" and all(part.isidentifier() for part in kind.split(".")) \
            and argument.isidentifier():
        return
    raise ValueError(f"oracle must be task, rm:<reward model folder> or module:function, got {spec!r}")


def build_oracle(spec: str, task: Task) -> PreferFn:
    """The oracle `spec` names, for problems of `task`."""
    check_oracle_spec(spec)
    kind, _, argument = spec.partition(":")
    if kind in ORACLES:
        return ORACLES.get(kind)(argument, task)
    return _user_oracle(kind, argument)


@ORACLES.register("task")
def task_oracle(argument: str, task: Task) -> PreferFn:
    """P(a > b) = 1, 0.5, 0 by the task verifier's scores of a and b (each distinct (problem, text) scored once a
    call)."""

    def prefer(problems: Sequence[Problem], a: Sequence[str], b: Sequence[str]) -> torch.Tensor:
        _check_lengths(problems, a, b)
        keys = list(dict.fromkeys([(i, t) for i, t in enumerate(a)] + [(i, t) for i, t in enumerate(b)]))
        scores = score_completions(task, [problems[i] for i, _ in keys], [t for _, t in keys]).rewards
        score = dict(zip(keys, scores))
        out = [0.5 if score[(i, x)] == score[(i, y)] else float(score[(i, x)] > score[(i, y)])
               for i, (x, y) in enumerate(zip(a, b))]
        return torch.tensor(out, dtype=torch.float32)

    return prefer


@ORACLES.register("rm")
def reward_model_oracle(argument: str, task: Task) -> PreferFn:
    """P(a > b) = sigma(r(a) - r(b)) under the reward model saved at `argument`."""
    from unipo.reward_model import RewardModelScorer

    scorer = RewardModelScorer(argument)

    def prefer(problems: Sequence[Problem], a: Sequence[str], b: Sequence[str]) -> torch.Tensor:
        _check_lengths(problems, a, b)
        keys = list(dict.fromkeys([(p.prompt, t) for p, t in zip(problems, a)] +
                                  [(p.prompt, t) for p, t in zip(problems, b)]))  # each answer scored once
        score = dict(zip(keys, scorer([k for k, _ in keys], [t for _, t in keys])))
        ra = torch.tensor([score[(p.prompt, t)] for p, t in zip(problems, a)], dtype=torch.float64)
        rb = torch.tensor([score[(p.prompt, t)] for p, t in zip(problems, b)], dtype=torch.float64)
        return torch.sigmoid(ra - rb).float()

    return prefer


def _user_oracle(module: str, name: str) -> PreferFn:
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"oracle {module}:{name}: cannot load it ({error})") from None
    if not callable(fn):
        raise ValueError(f"oracle {module}:{name} is not a function")

    def prefer(problems: Sequence[Problem], a: Sequence[str], b: Sequence[str]) -> torch.Tensor:
        _check_lengths(problems, a, b)
        values = list(fn([p.prompt for p in problems], list(a), list(b)))
        if len(values) != len(a) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                            and math.isfinite(v) and 0 <= v <= 1 for v in values):
            raise ValueError(f"oracle {module}:{name} must return {len(a)} probabilities in [0, 1], got "
                             f"{values[:4]!r}{'...' if len(values) > 4 else ''}")
        return torch.tensor([float(v) for v in values], dtype=torch.float32)

    return prefer


def _check_lengths(problems: Sequence[Problem], a: Sequence[str], b: Sequence[str]) -> None:
    if not len(problems) == len(a) == len(b):
        raise ValueError(f"an oracle call needs as many problems as answers: {len(problems)}, {len(a)}, {len(b)}")


def preference_matrix(prefer: PreferFn, problem: Problem, answers: Sequence[str]) -> torch.Tensor:
    """[G, G] P(y_i > y_j) among one prompt's answers (diagonal 0.5), from one oracle call over the pairs i < j
    (P(y_j > y_i) = 1 - P(y_i > y_j), the oracle taken as consistent)."""
    n = len(answers)
    matrix = torch.full((n, n), 0.5)
    upper = [(i, j) for i in range(n) for j in range(i + 1, n)]
    if upper:
        p = prefer([problem] * len(upper), [answers[i] for i, _ in upper], [answers[j] for _, j in upper])
        for (i, j), value in zip(upper, p.tolist()):
            matrix[i, j], matrix[j, i] = value, 1.0 - value
    return matrix


def win_rates(matrix: torch.Tensor) -> torch.Tensor:
    """[G] each answer's estimated P(y > pi): the mean of P(y_i > y_j) over the OTHER answers j (SPPO's estimate,
    arXiv 2405.00675 sec. 5: K samples, the win rate against the rest)."""
    n = matrix.shape[0]
    if n < 2:
        return torch.full((n,), 0.5)
    return (matrix.sum(1) - matrix.diagonal()) / (n - 1)


def win_rate_against(model, opponent, tokenizer, task: Task, prefer: PreferFn, *, n: int, seed: int = 0,
                     max_new_tokens: int, temperature: float = 1.0) -> dict[str, float]:
    """Mean P(model's answer > opponent's answer) under `prefer` on `n` problems of the task's test split, one
    sample of each model per problem at `temperature` (each model with its own seeded generator), and the
    fractions of problems won (P > 1/2), tied (= 1/2) and lost. The issue's "win rate against the reference"."""
    from unipo.models import format_prompt
    from unipo.rollout import generate

    problems = task.sample(n, seed=seed, split="test")
    prompts = [tokenizer(format_prompt(tokenizer, p.prompt), add_special_tokens=False)["input_ids"] for p in problems]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    texts = []
    for who in (model, opponent):
        was_training = who.training
        who.eval()
        try:
            out = generate(who, prompts, group_size=1, max_new_tokens=max_new_tokens,
                           eos_token_id=tokenizer.eos_token_id, pad_token_id=pad, temperature=temperature,
                           generator=torch.Generator(device=next(who.parameters()).device).manual_seed(seed))
        finally:
            who.train(was_training)
        texts.append(tokenizer.batch_decode(out.completion_ids, skip_special_tokens=True))
    p = prefer(problems, texts[0], texts[1]).double()
    return {"win_rate": float(p.mean()), "won": float((p > 0.5).double().mean()),
            "tied": float((p == 0.5).double().mean()), "lost": float((p < 0.5).double().mean())}
