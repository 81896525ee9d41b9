"""Tree-structured episode rollouts (Tree-GRPO, arXiv 2509.21240), as rows of one `RolloutBatch`.

A node of a tree is one turn (the model's action and the environment's answer to it); a path from the root (the
problem's first observation) to a leaf (a turn that ended its episode) is one complete episode. For each problem:

1. M trees (`trees`), each one episode sampled from scratch;
2. L rounds (`rounds`) of expansion: each round picks N nodes of every tree (`expansions`) uniformly at random,
   with replacement, among the tree's root and its non-leaf nodes, and samples one new continuation from each
   picked node to the end of an episode: a branch that shares every turn up to and including the picked node
   (none, for the root) and re-samples the rest. A tree then has 1 + L * N leaves;
3. K = rollout.group_size / M leaves of each tree are kept, drawn at random without replacement (all of them when
   K = 1 + L * N): the problem's advantage group is its M * K kept leaves = rollout.group_size episodes.

This is the authors' procedure (AMAP-ML/Tree-GRPO @90b17099, search_r1/llm_agent/generation_ts.py
`run_llm_loop_tree_search`, tree_node.py `get_expand_node` (random.choices over the root and the non-leaf nodes)
and `sample_leaf` (shuffle, keep the first K); their scripts: M = 2, N = 2, L = 1, K = 3, every leaf kept).

Branching. Environments are stateful Python objects without a copy operation, so a branch from the node after k
turns starts a fresh environment (`reset(problem)`) and replays the k actions of the prefix (`step(action)` each),
which needs a deterministic environment: a replay whose observation, reward or end differs from the first time is
a ValueError. (A replayed tool call runs again; its failures are counted once, when first generated.) The branch's
prefix turns are the same `Turn` objects as its source's, with their prompts, sampled tokens and log-probs; its
token budget already holds the prefix's tokens. All branches of a round, over every tree of every problem, are
played together (`unipo.agents.play_episodes`): one `engine.generate` call per turn round.

Rows. Each kept leaf becomes an ordinary episode of rows, one per turn (`unipo.agents.episodes_to_batch`), its
shared prefix turns included: a prefix turn is a row of every kept leaf below it, as the authors' code puts the
shared prefix into every leaf's trajectory (`final_node_list`: one full response per leaf). We keep that layout,
rather than one row per node with an aggregated advantage, because it is what their loss sees: with a clipped
ratio, sum_i min(rho A_i, clip(rho) A_i) over the copies is not min(rho sum A_i, clip(rho) sum A_i) once the
leaves' advantages differ in sign, and the token-mean denominator counts each copy. The price is that a shared
turn's forward runs once per copy. Rows carry `tree_ids` (the leaf's tree: `unipo.core.tree` reads it) besides
every episode input.

Metrics: env/turns_mean, env/success and env/episodes over the kept leaves; env/tool_errors over every generated
turn; tree/nodes (the turns generated this step, a shared prefix counted once) and tree/leaves (grown, before
keeping K per tree).
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from unipo.agents import Episode, episode_input, episode_stats, episodes_to_batch, play_episodes, run_episodes
from unipo.envs.base import Environment, get_env
from unipo.tasks.base import Problem

# recipe.data_params of recipe.data=tree_episodes: M trees per problem, N nodes expanded per tree and round, L rounds
TREE_PARAMS = ("trees", "expansions", "rounds")
DEFAULT_TREE_PARAMS: Mapping[str, int] = {"trees": 2, "expansions": 3, "rounds": 1}


@dataclass(frozen=True)
class TreeShape:
    trees: int  # M
    expansions: int  # N
    rounds: int  # L
    keep: int  # K: leaves kept per tree (rollout.group_size / M)

    @property
    def leaves(self) -> int:
        """Leaves a tree grows: its first episode plus one per expansion."""
        return 1 + self.rounds * self.expansions


def check_tree_params(params: Mapping[str, Any]) -> None:
    """ValueError (one line) unless `params` are valid `recipe.data_params` of the tree source."""
    unknown = sorted(set(params) - set(TREE_PARAMS))
    if unknown:
        raise ValueError(f"recipe.data_params: unknown keys {unknown} for recipe.data=tree_episodes; valid: "
                         f"{', '.join(TREE_PARAMS)}")
    for key, value in params.items():
        low = 0 if key == "rounds" else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"recipe.data_params.{key}={value!r}: must be an integer >= {low}")


def tree_shape(params: Mapping[str, Any], group_size: int) -> TreeShape:
    """The tree shape of `recipe.data_params` for `rollout.group_size` leaves per problem (ValueError, one line,
    when group_size is not M * K with K <= 1 + L * N)."""
    check_tree_params(params)
    p = {**DEFAULT_TREE_PARAMS, **params}
    m, n, rounds = p["trees"], p["expansions"], p["rounds"]
    if group_size % m:
        raise ValueError(f"rollout.group_size={group_size}: tree rollouts keep the same number of leaves of each of "
                         f"recipe.data_params.trees={m} trees per problem; set rollout.group_size to a multiple of {m}")
    shape = TreeShape(m, n, rounds, group_size // m)
    if shape.keep > shape.leaves:
        raise ValueError(f"rollout.group_size={group_size} keeps {shape.keep} leaves of each of {m} trees, but a tree "
                         f"grows 1 + rounds x expansions = {shape.leaves}; raise recipe.data_params.expansions or "
                         f"rounds, or lower rollout.group_size")
    return shape


@dataclass
class TreeRollout:
    leaves: list[Episode]  # the kept leaves, problem by problem, tree by tree (each a whole episode)
    trees: list[int]  # the tree of each kept leaf (problem i's trees are i * M .. i * M + M - 1)
    episodes: list[Episode]  # every episode grown (kept or not)
    starts: list[int]  # turns each grown episode shares with the one it branched from (0: sampled from scratch)


def grow_trees(engine, tokenizer, env_cls: type[Environment], problems: list[Problem], shape: TreeShape, *,
               rng: random.Random, max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
               generator: torch.Generator | None = None) -> TreeRollout:
    """M trees per problem, grown by L rounds of N expansions each, K leaves of each kept (module docstring)."""
    sampling = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, generator=generator)
    episodes = run_episodes(engine, tokenizer, env_cls, problems, shape.trees, **sampling)  # episode j: tree j
    tree_of, starts = list(range(len(episodes))), [0] * len(episodes)
    n_trees = len(episodes)
    for _ in range(shape.rounds):
        members = _members(tree_of, n_trees)
        branches, envs, trees, new_starts = [], [], [], []
        for tree in range(n_trees):
            # the root (None, 0) and every non-leaf node: turn k-1 of an episode that generated it, not its last
            nodes = [(None, 0)] + [(e, k) for e in members[tree] for k in range(starts[e] + 1, len(episodes[e].turns))]
            for source, k in rng.choices(nodes, k=shape.expansions):
                problem = problems[tree // shape.trees]
                episode, env = _branch(env_cls, problem, tree // shape.trees,
                                       None if source is None else episodes[source], k)
                branches.append(episode)
                envs.append(env)
                trees.append(tree)
                new_starts.append(k)
        play_episodes(engine, tokenizer, env_cls, branches, envs, **sampling)
        episodes += branches
        tree_of += trees
        starts += new_starts
    leaves, leaf_trees = [], []
    for tree, grown in enumerate(_members(tree_of, n_trees)):
        kept = sorted(rng.sample(grown, shape.keep))
        leaves += [episodes[e] for e in kept]
        leaf_trees += [tree] * len(kept)
    return TreeRollout(leaves, leaf_trees, episodes, starts)


def _members(tree_of: list[int], n_trees: int) -> list[list[int]]:
    """Each tree's episodes, in the order they were grown."""
    members: list[list[int]] = [[] for _ in range(n_trees)]
    for e, tree in enumerate(tree_of):
        members[tree].append(e)
    return members


def _branch(env_cls: type[Environment], problem: Problem, group: int, source: Episode | None,
            k: int) -> tuple[Episode, Environment]:
    """A new episode that shares the first k turns of `source`, and its environment after replaying them."""
    env = env_cls()
    episode = Episode(problem, group, env.reset(problem), tools=env_cls.tools)
    if source is None:
        return episode, env
    if episode.first_observation != source.first_observation:
        raise ValueError(f"environment {env_cls.name} is not deterministic: reset gave another first observation; "
                         f"tree rollouts branch by replaying a prefix's actions")
    for turn in source.turns[:k]:
        observation, reward, done, _ = env.step(turn.action)
        if (observation, float(reward), bool(done)) != (turn.observation, turn.reward, False):
            raise ValueError(f"environment {env_cls.name} is not deterministic: replaying {turn.action!r} gave "
                             f"({observation!r}, {reward}, done={done}), first ({turn.observation!r}, {turn.reward}, "
                             f"done=False); tree rollouts branch by replaying a prefix's actions")
        episode.turns.append(turn)  # the same node: prompt, sampled tokens and log-probs shared with its source
    return episode, env


def tree_stats(rollout: TreeRollout) -> dict[str, float]:
    """env/* over the kept leaves (tool errors: every generated turn), tree/nodes, tree/leaves."""
    stats = episode_stats(rollout.leaves)
    stats["env/tool_errors"] = float(sum(e.tool_errors for e in rollout.episodes))  # a branch counts its own turns
    stats["tree/nodes"] = float(sum(len(e.turns) - s for e, s in zip(rollout.episodes, rollout.starts)))
    stats["tree/leaves"] = float(len(rollout.episodes))
    return stats


def collect_tree_episodes(collector, *, seed: int, step: int):
    """The collector's step for `recipe.data = tree_episodes` (`RolloutCollector.collect` dispatches here): this
    rank's share of `prompts_per_step` problems of `collector.env`, each a group of rollout.group_size kept leaves
    of M trees; the expansion picks are drawn from a generator seeded by (seed, step, rank)."""
    from unipo.agents import information_gain
    from unipo.collect import _mix_seed
    from unipo.slots import recipe_inputs

    env_cls = get_env(collector.env or "guess_number")
    r, cfg = collector.recipe, collector.cfg
    shape = tree_shape(r.data_params, cfg.group_size)
    want_all = math.ceil(r.prompt_multiplier * cfg.prompts_per_step)
    problems = env_cls.sample(want_all, seed=_mix_seed(seed, step, 0), split="train")
    problems = problems[collector.rank::collector.world_size]
    rollout = grow_trees(collector.engine, collector.tokenizer, env_cls, problems, shape,
                         rng=random.Random(_mix_seed(seed, step, 2_000_003 + collector.rank)),
                         max_new_tokens=cfg.max_new_tokens or env_cls.max_action_tokens,
                         temperature=cfg.temperature, top_p=cfg.top_p, generator=collector.generator)
    if "info_gain" in recipe_inputs(r):  # IGPO's turn rewards, should a recipe pair them with trees
        information_gain(collector.model, collector.tokenizer, rollout.leaves, collector.device)
    stats = {"rollout/generation_rounds": 1.0, "rollout/groups_kept": float(len(problems)),
             "rollout/reward_timeouts": 0.0, **tree_stats(rollout)}
    if not rollout.leaves:
        return collector._empty(), stats
    batch = episodes_to_batch(rollout.leaves, collector.tokenizer, collector.device,
                              signed=r.reward_scale == "signed")
    batch.tree_ids = torch.tensor(rollout.trees, dtype=torch.long, device=collector.device)[batch.episode_ids]
    return batch, stats


def tree_input(batch) -> torch.Tensor:
    """The batch input `tree_ids`: each row's tree; a batch without trees (recipe.data=episodes, or single-turn)
    makes each episode its own tree."""
    value = getattr(batch, "tree_ids", None)
    return value if value is not None else episode_input(batch, "episode_ids")
