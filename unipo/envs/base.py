"""The environment protocol of multi-turn episodes, and the registry of environments.

An environment is a stateful object for one episode (the collector builds one per episode):

    observation = env.reset(problem)                     # the first observation (what the model reads first)
    observation, reward, done, info = env.step(action)   # the model's action text -> the environment's answer

- `reward` is the *turn* reward of that action (0 when the environment gives none);
- `done` ends the episode; the collector also ends it after `max_turns` actions or when the episode's
  token budget (`max_episode_tokens`, the model's own tokens over all its turns) is spent;
- `info` may hold `tool_errors` (int: failed tool calls in this step, logged as `env/tool_errors`) and
  `observation_role` ("tool" when the observation is a tool's result: a chat template renders it as one);
- at the end, for whatever reason it ended, `env.outcome()` is the episode's final reward in [0, 1] and
  `env.success()` whether the task was solved (`env/success`, and `correct` of its rows).

Problems come from the environment class itself (`sample(n, seed=, split=)`, as a task's), and so do expert
demonstrations: `demonstrate(problem)` is the list of an expert's actions, one per turn, which replayed against
the environment solve it (the rows of hybrid recipes, and SFT warm starts).

`ENVIRONMENTS` maps a name (`TrainConfig.env`, `unipo train --env NAME`) to the class.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from typing import Any

from unipo.core.registry import Registry
from unipo.tasks.base import Problem, split_of

ENVIRONMENTS: Registry[type[Environment]] = Registry("environment")


class Environment(ABC):
    """One episode's environment (see the module docstring for the protocol)."""

    name: str
    max_turns: int = 4  # actions per episode at most
    max_action_tokens: int = 16  # the model's tokens per action at most (rollout.max_new_tokens overrides)
    max_episode_tokens: int = 64  # the model's own tokens over the whole episode at most
    has_expert: bool = True  # `demonstrate` works (recipes that replay demonstrations refuse an env without)
    # the registered tools (`unipo.envs.tools`) it runs; a chat template is given their JSON schemas (`tools=`)
    tools: tuple[str, ...] = ()

    @classmethod
    def require(cls) -> None:
        """A one-line ValueError when something the environment needs is missing (an optional package)."""

    # -- problems --------------------------------------------------------------------------------
    @classmethod
    @abstractmethod
    def generate(cls, rng: random.Random) -> Problem:
        """One random problem (its prompt, answer and meta)."""

    @classmethod
    def sample(cls, n: int, *, seed: int, split: str = "train") -> list[Problem]:
        """n problems of `split` (prompts hashed into train/test as a task's, `unipo.tasks.base.split_of`); when
        the environment has too few distinct prompts for both splits, problems of the other split fill in."""
        rng = random.Random(f"{cls.name}|{seed}|{split}")
        drawn = [cls.generate(rng) for _ in range(20 * n + 20)]
        own = [p for p in drawn if split_of(p.prompt) == split]
        return (own + [p for p in drawn if split_of(p.prompt) != split])[:n]

    @classmethod
    @abstractmethod
    def demonstrate(cls, problem: Problem) -> list[str]:
        """An expert's actions, one per turn, that solve `problem`."""

    # -- one episode -----------------------------------------------------------------------------
    @abstractmethod
    def reset(self, problem: Problem) -> str:
        """Start an episode of `problem`; the first observation (the task as the model reads it)."""

    @abstractmethod
    def step(self, action: str) -> tuple[str, float, bool, dict[str, Any]]:
        """The model's action -> (observation, turn reward, done, info)."""

    @abstractmethod
    def outcome(self) -> float:
        """The episode's final reward in [0, 1] (read once it has ended)."""

    def success(self) -> bool:
        return self.outcome() >= 1.0


def get_env(name: str) -> type[Environment]:
    """The environment class registered as `name`, or of `gym:<id>` any gymnasium environment id
    (`unipo.envs.gymnasium_text`); ValueError listing the valid names otherwise, or saying what to install."""
    import unipo.envs  # noqa: F401  (registers the built-in environments)

    if name.startswith("gym:"):
        from unipo.envs.gymnasium_text import gym_environment

        return gym_environment(name[len("gym:"):])
    try:
        env_cls = ENVIRONMENTS.get(name)
    except ValueError as err:
        raise ValueError(f"{err}; or gym:<id>, a gymnasium environment id such as gym:Taxi-v4") from None
    env_cls.require()
    return env_cls
