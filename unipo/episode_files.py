"""Recorded episodes: a fixed set of trajectories written once (`unipo episodes`) and trained on offline.

SWEET-RL's authors train from trajectories collected once by the initial policy (their ColBench data), not from
fresh rollouts each step; `recipe.data_params.trajectories=FILE` (recipe.data = turn_pairs) does the same here:
each step takes the next `rollout.prompts_per_step` problems of the file, in an order reshuffled every pass over
it (seeded), with all their recorded episodes.

The file is JSON lines, one episode a line:

    {"env": "guess_number", "problem_id": 0, "problem": {"prompt": ..., "answer": ..., "demonstration": ...,
     "meta": {...}}, "actions": ["8", "4", "6"], "outcome": 1.0, "success": true}

Episodes of the same `problem_id` form a group (the critic's trajectory pairs are drawn within one). Only the
problem and the actions are taken from the file: each episode is replayed in a fresh environment
(`unipo.agents.replay_episodes`), so observations, turn rewards and outcomes are the environment's, and a replay
whose outcome differs from the recorded one (another version of the environment, a non-deterministic one, an
edited file) is a one-line error. The file is data, read with `json.loads` only.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from unipo.tasks.base import Problem

FIELDS = ("env", "problem_id", "problem", "actions", "outcome", "success")


def problem_record(env_name: str, problem: Problem) -> dict:
    """A problem as JSON-ready data; ValueError if its `meta` is not JSON (an environment whose problems cannot be
    recorded)."""
    record = {"prompt": problem.prompt, "answer": problem.answer, "demonstration": problem.demonstration,
              "meta": dict(problem.meta)}
    try:
        json.dumps(record)
    except (TypeError, ValueError) as error:
        raise ValueError(f"environment {env_name}: its problems cannot be written as JSON ({error})") from None
    return record


def episode_record(env_name: str, problem_id: int, episode) -> dict:
    """One line of an episode file (`unipo.agents.Episode` -> JSON-ready dict)."""
    return {"env": env_name, "problem_id": problem_id, "problem": problem_record(env_name, episode.problem),
            "actions": [turn.action for turn in episode.turns], "outcome": float(episode.outcome),
            "success": bool(episode.success)}


def write_episodes(path: str | Path, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for record in records:
            fh.write(json.dumps(record) + "\n")


def read_episode_file(path: str | Path, env_name: str) -> list[list[tuple[int, Problem, list[str], float]]]:
    """The file's episodes grouped by problem, in the order of each problem's first line: per problem, a list of
    (line number, problem, actions, recorded outcome). One-line ValueError for a missing or malformed file, a line
    of another environment, or a problem id whose lines disagree on the problem."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise ValueError(f"episode file {path}: cannot read it ({error.strerror or error})") from None
    groups: dict[int, list[tuple[int, Problem, list[str], float]]] = {}
    problems: dict[int, Problem] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"episode file {path}, line {number}"
        try:
            record = json.loads(line)
        except ValueError:
            raise ValueError(f"{where}: not JSON") from None
        missing = [key for key in FIELDS if not isinstance(record, dict) or key not in record]
        if missing:
            raise ValueError(f"{where}: missing {', '.join(missing)} (fields: {', '.join(FIELDS)})")
        if record["env"] != env_name:
            raise ValueError(f"{where}: an episode of {record['env']!r}, and this run's environment is {env_name!r}")
        raw, actions, pid = record["problem"], record["actions"], record["problem_id"]
        if not (isinstance(raw, dict) and isinstance(raw.get("prompt"), str) and isinstance(raw.get("answer"), str)
                and isinstance(raw.get("meta", {}), dict)):
            raise ValueError(f"{where}: problem must be {{prompt: str, answer: str, demonstration, meta: {{}}}}")
        if not (isinstance(actions, list) and actions and all(isinstance(a, str) for a in actions)):
            raise ValueError(f"{where}: actions must be a non-empty list of strings")
        if isinstance(pid, bool) or not isinstance(pid, int):
            raise ValueError(f"{where}: problem_id must be an int")
        if isinstance(record["outcome"], bool) or not isinstance(record["outcome"], (int, float)):
            raise ValueError(f"{where}: outcome must be a number")
        problem = Problem(prompt=raw["prompt"], answer=raw["answer"], demonstration=raw.get("demonstration"),
                          meta=raw.get("meta", {}))
        if problems.setdefault(pid, problem) != problem:  # (meta compared too)
            raise ValueError(f"{where}: problem_id {pid} was another problem on an earlier line")
        groups.setdefault(pid, []).append((number, problem, actions, float(record["outcome"])))
    if not groups:
        raise ValueError(f"episode file {path}: no episodes")
    return list(groups.values())


def step_problems(n_problems: int, per_step: int, *, seed: int, step: int) -> list[int]:
    """The problem indices of a step: consecutive slices of passes over the file, each pass a fresh seeded
    permutation (pass k: `random.Random(seed * 1_000_003 + k)`), so a run sees every problem once before any
    twice."""
    start = step * per_step
    out = []
    while len(out) < per_step:
        epoch, offset = divmod(start + len(out), n_problems)
        order = list(range(n_problems))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        take = min(per_step - len(out), n_problems - offset)
        out += order[offset:offset + take]
    return out


def offline_episodes(collector, path: str, *, seed: int, step: int):
    """The collector's episodes for a step from the recorded file (replayed; see the module docstring): this rank's
    share of the step's problems, with every episode recorded for each. Returns (episodes batch, stats) as
    `unipo.agents.collect_episodes` does."""
    import math

    from unipo.agents import episode_stats, episodes_to_batch, replay_episodes
    from unipo.envs.base import get_env

    env_name = collector.env or "guess_number"
    env_cls = get_env(env_name)
    if collector._episode_file is None or collector._episode_file[0] != path:  # read once a run
        collector._episode_file = (path, read_episode_file(path, env_name))
    groups = collector._episode_file[1]
    want_all = math.ceil(collector.recipe.prompt_multiplier * collector.cfg.prompts_per_step)
    chosen = step_problems(len(groups), want_all, seed=seed, step=step)[collector.rank::collector.world_size]
    replays, recorded = [], []
    for g, index in enumerate(chosen):
        for number, problem, actions, outcome in groups[index]:
            replays.append((g, problem, actions))
            recorded.append((number, outcome))
    episodes = replay_episodes(collector.tokenizer, env_cls, replays, expert=False)
    for episode, (number, outcome) in zip(episodes, recorded):
        if episode.outcome != outcome:
            raise ValueError(f"episode file {path}, line {number}: replaying its actions in {env_name} gives outcome "
                             f"{episode.outcome:g}, the file says {outcome:g} (another version of the environment, "
                             f"a non-deterministic one, or an edited file)")
    stats = {"rollout/generation_rounds": 0.0, "rollout/groups_kept": float(len(chosen)),
             "rollout/reward_timeouts": 0.0, "rollout/offline_pass": float(step * want_all // len(groups)),
             **episode_stats(episodes)}
    if not episodes:
        return collector._empty(), stats
    batch = episodes_to_batch(episodes, collector.tokenizer, collector.device,
                              signed=collector.recipe.reward_scale == "signed")
    return batch, stats
