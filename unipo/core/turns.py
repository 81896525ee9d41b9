"""Credit assignment over multi-turn episodes: advantage estimators whose rows are the turns of episodes.

An episode of T turns is T rows of the batch (`unipo.agents`); each row carries its episode id, its turn index
(0..T-1), the environment's reward for that turn and the episode's final (outcome) reward. A group (`group_ids`)
is the G episodes of one problem. Every estimator here is a registered advantage estimator with declared batch
inputs (`unipo.slots.INPUTS`); on a single-turn batch the trainer provides one-turn episodes (episode id = row,
turn 0, turn reward = episode reward = the row's reward), where each reduces to GRPO on the rewards.

Statistics are over episodes, not rows: an episode of 5 turns counts once in its group's outcome mean and std,
as one of 1 turn does. All are segment reductions (no loop over groups, episodes or turns).

- `episode_outcome`, multi-turn GRPO (trajectory-level outcome advantage, MT-GRPO's "GRPO-OR" baseline, arXiv
  2505.11821 sec. 4; Search-R1's masked-observation GRPO, arXiv 2503.09516):
      A[e, t] = (R_e - mean_g R) / (std_g R + eps) for every turn t of episode e (R_e the outcome reward).
- `mt_grpo`, MT-GRPO's turn-level credit (arXiv 2505.11821, sec. 4, eq. for A^MT): the paper's episodes have two
  turns (a tool call, then the answer); the tool-call turn's tokens get A^T + lambda * A^O and the answer's
  tokens A^O, where A^O is the outcome advantage above and A^T the turn reward group-normalised. We generalise
  to T turns: every turn but the episode's last gets
      A[e, t] = A^O_e + lambda * (r[e, t] - mean r[., t]) / (std r[., t] + eps)
  with the turn-level statistics over the group's episodes that have a turn t; the last turn gets A^O_e alone.
  lambda (`turn_coef`) = 1 as in the paper's experiments.
- `turn_discounted`, per-turn discounting (the turn-level return of GTPO, arXiv 2511.14846 sec. 3.2, and of
  classic RL): the return G[e, t] = sum_{k >= t} gamma^(k - t) r[e, k] + gamma^(T_e - 1 - t) R_e, the outcome
  counted as a reward after the last turn, then group-normalised among the episodes' turns of the same index:
      A[e, t] = (G[e, t] - mean G[., t]) / (std G[., t] + eps).
  gamma = 1 gives reward-to-go; a turn index only one episode of the group reached gets 0.
- `igpo`, IGPO (arXiv 2510.14967, sec. 3): the turn reward of every turn but the last is its information gain
  IG[e, t] = p[e, t+1] - p[e, t], p[e, k] = exp(mean log pi(gold answer tokens | the conversation after k turns))
  (computed by the collector, `unipo.agents.information_gain`); the last turn's reward is the outcome R_e. These
  rewards are z-normalised over all the turns of the group's episodes, and each turn's advantage is the
  discounted sum of the normalised rewards from it on: A[e, t] = sum_{k >= t} gamma^(k - t) z[e, k], gamma = 1
  (verify: the paper's normalisation set and gamma are as we read them).
std is the unbiased one (N-1) with eps added to it, as `grpo`; a segment of equal values gets exactly 0.
"""

from __future__ import annotations

import torch

from unipo.core import validate
from unipo.core.advantages import ADVANTAGE_ESTIMATORS, _group_standardised, _pair_keys, _segments

# every episode input the trainer provides (unipo.slots.INPUTS; unipo.agents.episode_input)
EPISODE_INPUTS = ("episode_ids", "turn_index", "turn_rewards", "episode_rewards", "info_gain")
_TURN_INPUTS = ("episode_ids", "turn_index", "turn_rewards", "episode_rewards")


def _episode_keys(group_ids: torch.Tensor, episode_ids: torch.Tensor) -> torch.Tensor:
    """One id per (group, episode)."""
    return _pair_keys(group_ids, episode_ids)


def _per_episode(values: torch.Tensor, episodes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the first row of each episode, each row's episode index 0..n-1)."""
    index, n = validate.group_index(episodes)
    first = torch.full((n,), len(values), dtype=torch.long, device=values.device)
    first = first.scatter_reduce(0, index, torch.arange(len(values), device=values.device), "amin")
    return first, index


def _outcome_advantage(group_ids: torch.Tensor, episode_ids: torch.Tensor, episode_rewards: torch.Tensor,
                       eps: float) -> torch.Tensor:
    """A^O per row: the episode's outcome, standardised over its group's episodes (one value per episode)."""
    first, index = _per_episode(episode_rewards, _episode_keys(group_ids, episode_ids))
    outcome = episode_rewards[first]
    per_episode = _group_standardised(outcome, _segments(group_ids[first], outcome), eps)
    return per_episode[index]


def _check(rewards: torch.Tensor, *tensors: torch.Tensor) -> None:
    validate.check_ndim("rewards", rewards, 1)
    for t in tensors:
        validate.check_per_sequence("episode input", t, rewards.shape[0])


@ADVANTAGE_ESTIMATORS.register("episode_outcome", inputs=("episode_ids", "episode_rewards"))
def episode_outcome_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, *, episode_ids: torch.Tensor,
                               episode_rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Multi-turn GRPO: every turn of episode e gets (R_e - mean_g R) / (std_g R + eps) (see the module doc)."""
    _check(rewards, episode_ids, episode_rewards)
    return _outcome_advantage(group_ids, episode_ids, episode_rewards.to(rewards.dtype), eps)


@ADVANTAGE_ESTIMATORS.register("mt_grpo", inputs=_TURN_INPUTS)
def mt_grpo_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, *, episode_ids: torch.Tensor,
                       turn_index: torch.Tensor, turn_rewards: torch.Tensor, episode_rewards: torch.Tensor,
                       turn_coef: float = 1.0, eps: float = 1e-6) -> torch.Tensor:
    """MT-GRPO (arXiv 2505.11821): A^O + turn_coef * A^T on every turn but the last, A^O on the last."""
    _check(rewards, episode_ids, turn_index, turn_rewards, episode_rewards)
    if turn_coef < 0:
        raise ValueError(f"turn_coef must be >= 0, got {turn_coef}")
    outcome = _outcome_advantage(group_ids, episode_ids, episode_rewards.to(rewards.dtype), eps)
    turn = _group_standardised(turn_rewards.to(rewards.dtype), _segments(_pair_keys(group_ids, turn_index), rewards),
                               eps)
    return outcome + turn_coef * turn * (~_last_turn(group_ids, episode_ids, turn_index)).to(rewards.dtype)


@ADVANTAGE_ESTIMATORS.register("turn_discounted", inputs=_TURN_INPUTS)
def turn_discounted_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, *, episode_ids: torch.Tensor,
                               turn_index: torch.Tensor, turn_rewards: torch.Tensor, episode_rewards: torch.Tensor,
                               gamma: float = 0.9, eps: float = 1e-6) -> torch.Tensor:
    """Per-turn discounted return (turn rewards, then the outcome after the last turn), normalised per turn index."""
    _check(rewards, episode_ids, turn_index, turn_rewards, episode_rewards)
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    returns = discounted_turn_returns(_episode_keys(group_ids, episode_ids), turn_index,
                                      turn_rewards.to(rewards.dtype), episode_rewards.to(rewards.dtype), gamma)
    return _group_standardised(returns, _segments(_pair_keys(group_ids, turn_index), rewards), eps)


@ADVANTAGE_ESTIMATORS.register("igpo", inputs=("episode_ids", "turn_index", "info_gain", "episode_rewards"))
def igpo_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, *, episode_ids: torch.Tensor,
                    turn_index: torch.Tensor, info_gain: torch.Tensor, episode_rewards: torch.Tensor,
                    gamma: float = 1.0, eps: float = 1e-6) -> torch.Tensor:
    """IGPO (arXiv 2510.14967): information-gain turn rewards, the outcome on the last turn, z-normalised over the
    group's turns, then summed (discounted) from each turn on."""
    _check(rewards, episode_ids, turn_index, info_gain, episode_rewards)
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    last = _last_turn(group_ids, episode_ids, turn_index)
    turn_rewards = torch.where(last, episode_rewards.to(rewards.dtype), info_gain.to(rewards.dtype))
    z = _group_standardised(turn_rewards, _segments(group_ids, rewards), eps)
    return discounted_turn_returns(_episode_keys(group_ids, episode_ids), turn_index, z, torch.zeros_like(z), gamma)


def discounted_turn_returns(episodes: torch.Tensor, turn_index: torch.Tensor, turn_rewards: torch.Tensor,
                            episode_rewards: torch.Tensor, gamma: float) -> torch.Tensor:
    """G[e, t] = sum_{k >= t} gamma^(k-t) r[e, k] + gamma^(T_e-1-t) R_e, for rows in any order.

    As sums over the rows of the same episode at or after t: sum_k [k >= t] gamma^(k-t) r_k, a [B, B] masked
    product (B is the rows of one batch: small)."""
    same = episodes[:, None] == episodes[None, :]
    ahead = turn_index[None, :] - turn_index[:, None]  # [i, j]: k_j - t_i
    weight = torch.where(same & (ahead >= 0), gamma ** ahead.clamp(min=0).to(turn_rewards.dtype),
                         torch.zeros((), dtype=turn_rewards.dtype, device=turn_rewards.device))
    last = _last_index(episodes, turn_index)
    outcome = gamma ** (last - turn_index).to(turn_rewards.dtype) * episode_rewards
    return weight @ turn_rewards + outcome


def _last_index(episodes: torch.Tensor, turn_index: torch.Tensor) -> torch.Tensor:
    """Each row's episode's last turn index."""
    index, n = validate.group_index(episodes)
    last = torch.zeros(n, dtype=turn_index.dtype, device=turn_index.device)
    return last.scatter_reduce(0, index, turn_index, "amax", include_self=False)[index]


def _last_turn(group_ids: torch.Tensor, episode_ids: torch.Tensor, turn_index: torch.Tensor) -> torch.Tensor:
    """[B] bool: the row is its episode's last turn."""
    return turn_index == _last_index(_episode_keys(group_ids, episode_ids), turn_index)
