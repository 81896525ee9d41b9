"""Tree-GRPO's advantage (arXiv 2509.21240): leaves of search trees, normalised within their tree and
across all the problem's trees.

A problem's rollouts are M trees of episodes (`unipo.trees`): each tree starts as one episode, then grows by
branches that share a prefix of turns with an earlier episode of the tree and re-sample the rest. Each leaf is one
complete episode; rows are its turns, a shared prefix turn repeated in every leaf that goes through it, as the
authors' code repeats the shared prefix in every leaf's trajectory (see `unipo.trees`). With R_e the outcome of
leaf e, g its problem (`group_ids`) and tau its tree (`tree_ids`):

    A_inter[e] = (R_e - mean_g R) / (std_g R + eps)          over every leaf of the problem's M trees
    A_intra[e] = (R_e - mean_tau R) / (std_tau R + eps)      over the leaves of e's tree
    A[e, t]    = inter_coef * A_inter[e] + intra_coef * A_intra[e]     on every turn t of e

The authors' code (AMAP-ML/Tree-GRPO @90b17099, verl/trainer/ppo/ray_trainer_ts.py, `adv_estimator == 'tree'`)
adds the two GRPO advantages with weight 1 each (the defaults); inter_coef = 0 is the paper's intra-tree-only
ablation, intra_coef = 0 its inter-tree-only one (plain multi-turn GRPO over the leaves).

Because a prefix turn is a row of every leaf below it, its total weight in the loss is the sum of those leaves'
advantages: the intra-tree term turns the outcome of the leaves into a step-level preference between the sibling
subtrees that split at a node (the paper's equivalence of intra-tree GRPO with step-level DPO).

Statistics are over leaves (episodes), not rows, and std is the unbiased one plus eps, as `grpo`: a tree (or
problem) whose leaves all score the same, or that has one leaf, gets 0 from that term. (The authors' verl helper
gives a group of one mean 0 and std 1, i.e. A = R; their scripts keep 3 leaves per tree, so it never arises there.)
On a batch without trees each episode is its own tree (`unipo.trees.tree_input`): the intra term is 0 and A is
multi-turn GRPO (`episode_outcome`), on a single-turn batch GRPO.
"""

from __future__ import annotations

import torch

from unipo.core import validate
from unipo.core.advantages import ADVANTAGE_ESTIMATORS, _group_standardised, _pair_keys, _segments
from unipo.core.turns import _per_episode

TREE_INPUTS = ("episode_ids", "episode_rewards", "tree_ids")


def leaf_advantages(group_ids: torch.Tensor, tree_ids: torch.Tensor, episode_ids: torch.Tensor,
                    episode_rewards: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """(A_inter, A_intra) per row (see the module docstring). ValueError if an episode's rows name two trees."""
    leaves = _pair_keys(group_ids, episode_ids)
    trees = _pair_keys(group_ids, tree_ids)
    first, index = _per_episode(leaves, leaves)  # (each leaf's first row, each row's leaf)
    if not torch.equal(trees[first][index], trees):
        raise ValueError("tree_ids: every row of an episode must name the same tree")
    outcome = episode_rewards[first]  # one value per leaf
    inter = _group_standardised(outcome, _segments(group_ids[first], outcome), eps)
    intra = _group_standardised(outcome, _segments(trees[first], outcome), eps)
    return inter[index], intra[index]


@ADVANTAGE_ESTIMATORS.register("tree_grpo", inputs=TREE_INPUTS)
def tree_grpo_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, *, episode_ids: torch.Tensor,
                         episode_rewards: torch.Tensor, tree_ids: torch.Tensor, inter_coef: float = 1.0,
                         intra_coef: float = 1.0, eps: float = 1e-6) -> torch.Tensor:
    """Tree-GRPO (arXiv 2509.21240): inter_coef * A_inter + intra_coef * A_intra on every turn of each leaf."""
    validate.check_ndim("rewards", rewards, 1)
    for name, tensor in (("episode_ids", episode_ids), ("episode_rewards", episode_rewards), ("tree_ids", tree_ids)):
        validate.check_per_sequence(name, tensor, rewards.shape[0])
    for name, coef in (("inter_coef", inter_coef), ("intra_coef", intra_coef)):
        if not coef >= 0:
            raise ValueError(f"{name} must be >= 0, got {coef}")
    if inter_coef == 0 and intra_coef == 0:
        raise ValueError("inter_coef and intra_coef are both 0: every advantage would be 0")
    inter, intra = leaf_advantages(group_ids, tree_ids, episode_ids, episode_rewards.to(rewards.dtype), eps)
    return inter_coef * inter + intra_coef * intra
