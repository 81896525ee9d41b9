"""Environments of the gymnasium library (Farama Foundation) as unipo text environments.

An optional dependency: `pip install 'unipo[envs]'` (gymnasium and its few pure-Python/numpy dependencies);
importing unipo never imports it, and asking for one of these environments without it is a one-line error.

`GymTextEnvironment` wraps one gymnasium environment id with a `Discrete` action space:

- a problem is the `gymnasium.make` keyword arguments (`draw`: FrozenLake's random map) and a reset seed, so an
  episode is a pure function of its problem and actions (the library's randomness is seeded by the reset);
- observations are text (`render`: the library's observation as `str` unless a subclass draws it); the first one
  is the problem's prompt;
- an action is parsed strictly (`parse_action`): after stripping surrounding whitespace and lower-casing, the
  whole text must be one word of `action_words` or the action's number (`action_start` ... `action_start + n - 1`);
  anything else is not sent to the library: the observation is `invalid action` (short, as every turn's prompt
  holds the whole conversation: the state is unchanged and still the observation above, the vocabulary is in the
  first one), turn reward 0, counted in `info["tool_errors"]` (`env/tool_errors`: the environment's interface
  refused the call), and the episode goes on;
- the turn reward is the library's reward; the episode ends when the library terminates or truncates it;
- success (`solved`): the episode terminated, not truncated, on a positive reward (the goal rewards of FrozenLake,
  Taxi and Blackjack; an environment whose success is otherwise, e.g. CliffWalking's goal reward of -1 or
  CartPole's reward of 1 on every step, overrides `solved`); outcome = float(success);
- the expert (`demonstrate`): the shortest action sequence to success, by breadth-first search over the library's
  transition table `P[state][action] = [(prob, next_state, reward, terminated)]` from the reset state (the
  toy-text environments have one). An environment without such a table, or with a random transition
  (`is_slippery=True`), has no expert (`has_expert = False`): `demonstrate` raises, and a recipe that replays
  demonstrations refuses it when its config is built.

Registered: `frozen_lake` (random non-slippery 4x4 FrozenLake maps, the map drawn as text), and every gymnasium
id through the name `gym:<id>` (`unipo.envs.base.get_env` -> `gym_environment`), e.g. `gym:Taxi-v4`: the
observation as the library's `str`, the actions as numbers, the first observation headed by the id and the
action range.
"""

from __future__ import annotations

import functools
import random
import re
from collections import deque
from typing import Any

from unipo.envs.base import ENVIRONMENTS, Environment
from unipo.tasks.base import Problem

INSTALL_HINT = "pip install 'unipo[envs]' (or: pip install 'gymnasium>=1.0')"
GENERIC_MAX_TURNS = 20  # gym:<id> episodes: the library's time limit, at most this many actions (the tiny
# model's 512 positions hold 20 turns of Taxi's or Blackjack's short observations)
_NUMBER = re.compile(r"-?[0-9]+")  # ASCII digits only (\d also matches other scripts' digits)


def import_gymnasium(needed_by: str):
    """The gymnasium module, or a one-line ValueError saying what to install."""
    try:
        import gymnasium
    except ImportError:
        raise ValueError(f"environment {needed_by} needs the gymnasium package, which is not installed: "
                         f"{INSTALL_HINT}") from None
    return gymnasium


class GymTextEnvironment(Environment):
    """A gymnasium environment with a `Discrete` action space, as text (see the module docstring)."""

    env_id: str  # the gymnasium id (`gymnasium.make(env_id, **kwargs)`)
    action_words: tuple[str, ...] = ()  # action i's word (the number is accepted too); (): the numbers only
    n_actions: int
    action_start: int = 0  # the Discrete space's `start`: action i is the library's `action_start + i`
    has_expert = True  # breadth-first search over the transition table (only for deterministic ones)
    header: str = ""  # text before the first observation

    # -- what a subclass chooses ---------------------------------------------------------------------
    @classmethod
    def draw(cls, rng: random.Random) -> dict[str, Any]:
        """The `gymnasium.make` keyword arguments of one random problem (default: none)."""
        return {}

    def render(self, observation: Any) -> str:
        """The library's observation as text."""
        return str(observation)

    @staticmethod
    def solved(reward: float, terminated: bool) -> bool:
        """Whether the episode's last step was a success (terminated on a positive reward)."""
        return bool(terminated) and reward > 0

    # -- the vocabulary ------------------------------------------------------------------------------
    @classmethod
    def action_text(cls, action: int) -> str:
        """The text of the library's action `action` (its word, else its number)."""
        index = action - cls.action_start
        return cls.action_words[index] if cls.action_words else str(action)

    @classmethod
    def parse_action(cls, text: str) -> int | None:
        """The library's action named by `text` (one word of the vocabulary or the action's number, surrounding
        whitespace and case ignored), or None."""
        word = text.strip().lower()
        if word in cls.action_words:
            return cls.action_start + cls.action_words.index(word)
        if _NUMBER.fullmatch(word) and 0 <= int(word) - cls.action_start < cls.n_actions:
            return int(word)
        return None

    # -- problems ------------------------------------------------------------------------------------
    @classmethod
    def require(cls) -> None:
        import_gymnasium(cls.name)

    @classmethod
    def generate(cls, rng: random.Random) -> Problem:
        """A problem whose expert plan (when there is an expert) fits in `max_turns` actions."""
        for _ in range(1000):
            meta = {"kwargs": cls.draw(rng), "seed": rng.randrange(2**31)}
            env = cls()
            prompt = env.reset(Problem(prompt="", answer="", demonstration=None, meta=meta))
            plan = env.plan() if cls.has_expert else []
            if plan is not None and len(plan) <= cls.max_turns:
                answer = " ".join(cls.action_text(a) for a in plan)
                return Problem(prompt=prompt, answer=answer, demonstration=None, meta=meta)
        raise ValueError(f"environment {cls.name}: no problem with a plan of at most {cls.max_turns} actions in "
                         f"1000 draws")

    @classmethod
    def demonstrate(cls, problem: Problem) -> list[str]:
        if not cls.has_expert:
            raise ValueError(f"environment {cls.name} has no expert demonstrations (its transitions are random or "
                             f"not tabulated)")
        env = cls()
        env.reset(problem)
        plan = env.plan()
        if plan is None:
            raise ValueError(f"environment {cls.name}: no sequence of actions solves this problem")
        return [cls.action_text(a) for a in plan]

    def plan(self) -> list[int] | None:
        """The shortest sequence of actions from the current state to success (breadth-first search over the
        library's deterministic transition table `P`), or None when no sequence reaches it."""
        table, start = self.gym.unwrapped.P, int(self.gym.unwrapped.s)
        parent: dict[int, tuple[int, int] | None] = {start: None}
        queue = deque([start])
        while queue:
            state = queue.popleft()
            for action in range(self.action_start, self.action_start + self.n_actions):
                (_, after, reward, terminated), = table[state][action]
                if self.solved(reward, terminated):
                    actions, back = [action], state
                    while parent[back] is not None:  # parent[s] = (the state before s, the action taken there)
                        back, taken = parent[back]
                        actions.append(taken)
                    return actions[::-1]
                if not terminated and int(after) not in parent:
                    parent[int(after)] = (state, action)
                    queue.append(int(after))
        return None

    # -- one episode ---------------------------------------------------------------------------------
    def reset(self, problem: Problem) -> str:
        gymnasium = import_gymnasium(self.name)
        self.gym = gymnasium.make(self.env_id, **problem.meta["kwargs"])
        observation, _ = self.gym.reset(seed=problem.meta["seed"])
        self.success_flag, self.invalid_actions = False, 0
        return self.header + self.render(observation)

    def step(self, action: str) -> tuple[str, float, bool, dict[str, Any]]:
        chosen = self.parse_action(action)
        if chosen is None:
            self.invalid_actions += 1
            return "invalid action", 0.0, False, {"tool_errors": 1}
        observation, reward, terminated, truncated, _ = self.gym.step(chosen)
        self.success_flag = self.solved(float(reward), bool(terminated))
        return self.render(observation), float(reward), bool(terminated or truncated), {"tool_errors": 0}

    def outcome(self) -> float:
        return float(self.success_flag)


@ENVIRONMENTS.register("frozen_lake")
class FrozenLake(GymTextEnvironment):
    """gymnasium's FrozenLake-v1, not slippery, on a random `size` x `size` map (`generate_random_map`: each cell
    frozen with probability 0.8, a path from S to G guaranteed), drawn as text with the player as `@`:

        Walk to G, avoid H: left, down, right or up.
        @FFF
        FHFF
        FFFH
        HFFG

    Actions: `left`, `down`, `right`, `up` (or 0 to 3). Turn reward 1 on reaching G, else 0; falling in a hole
    ends the episode (outcome 0), and so do `max_turns` = 8 actions (the shortest path was 6 moves on each of 2,000
    drawn maps: two moves may be wasted; a map whose shortest path is longer than 8 is redrawn). Expert: a shortest
    path (breadth-first search). The 4x4 size,
    not 3x3: the 3x3 generator draws only about 50 different maps, of which about 3 hash into the test split, too
    few for a held-out evaluation; 4x4 has thousands (about 750 different in 2,000 draws, 10% of them test)."""

    name = "frozen_lake"
    env_id = "FrozenLake-v1"
    size, frozen_probability = 4, 0.8
    action_words = ("left", "down", "right", "up")
    n_actions = 4
    header = "Walk to G, avoid H: left, down, right or up.\n"
    max_turns = 8
    max_action_tokens = 6  # "right" + EOS on the tiny model's tokenizer
    max_episode_tokens = 48

    @classmethod
    def draw(cls, rng: random.Random) -> dict[str, Any]:
        import_gymnasium(cls.name)  # its one-line error when missing
        from gymnasium.envs.toy_text.frozen_lake import generate_random_map

        desc = generate_random_map(size=cls.size, p=cls.frozen_probability, seed=rng.randrange(2**31))
        return {"desc": desc, "is_slippery": False}

    def render(self, observation: Any) -> str:
        row, col = divmod(int(observation), self.gym.unwrapped.ncol)
        rows = [b"".join(line).decode() for line in self.gym.unwrapped.desc]  # desc: a (size, size) bytes array
        rows[row] = rows[row][:col] + "@" + rows[row][col + 1:]
        return "\n".join(rows)


@functools.cache
def gym_environment(env_id: str) -> type[GymTextEnvironment]:
    """The environment class of `gym:<env_id>` (one class per id): actions as the numbers of its `Discrete`
    action space, observations as the library's `str`, at most `GENERIC_MAX_TURNS` actions, an expert when the
    environment has a deterministic transition table."""
    gymnasium = import_gymnasium(f"gym:{env_id}")
    try:
        probe = gymnasium.make(env_id)
    except gymnasium.error.Error as err:
        raise ValueError(f"environment gym:{env_id}: {str(err).splitlines()[0]}") from None
    space = probe.action_space
    if not isinstance(space, gymnasium.spaces.Discrete):
        raise ValueError(f"environment gym:{env_id}: only Discrete action spaces can be said as text "
                         f"(its action space is {space})")
    n, start = int(space.n), int(space.start)
    steps = (probe.spec.max_episode_steps if probe.spec else None) or GENERIC_MAX_TURNS
    table = getattr(probe.unwrapped, "P", None)
    deterministic = isinstance(table, dict) and all(
        len(outcomes) == 1 for actions in table.values() for outcomes in actions.values())
    action_tokens = max(len(str(start)), len(str(start + n - 1))) + 1  # + EOS
    turns = min(steps, GENERIC_MAX_TURNS)
    return type(f"Gym_{re.sub(r'[^0-9A-Za-z]', '_', env_id)}", (GymTextEnvironment,), {
        "__doc__": f"gymnasium's {env_id} (unipo.envs.gymnasium_text.gym_environment).",
        "name": f"gym:{env_id}", "env_id": env_id, "n_actions": n, "action_start": start,
        "has_expert": deterministic, "header": f"{env_id}, actions {start}-{start + n - 1}:\n",
        "max_turns": turns, "max_action_tokens": action_tokens, "max_episode_tokens": turns * action_tokens})
