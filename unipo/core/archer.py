"""ArCHer's utterance-level critic maths (arXiv 2402.19446), as the authors' code computes it.

ArCHer (Actor-Critic with a Hierarchical structure) learns a critic over *turns* (utterances) off-policy, from
a replay buffer of transitions (s_t, a_t, r_t, s_{t+1}, done_t), and trains the token-level policy with the
turn's advantage as the reward of every token of its action. The authors' code (YifeiZhou02/ArCHer @7c771a76,
archer/algorithms/archer/trainer.py, archer/models/critic.py) keeps two Q heads and two V heads over one
encoder, and a target copy of all of it (bars below):

    Q_i target:  y_i = r + gamma * (1 - done) * Vbar_i(s')                     (i = 1, 2; each its own twin)
    V_i target:  z_i = Qbar_i(s, a~),  a~ ~ pi(. | s) a fresh action of the current policy
    loss:        sum_i mean (Q_i(s, a) - y_i)^2 + mean (V_i(s) - z_i)^2
    target:      theta_bar <- tau * theta + (1 - tau) * theta_bar   after every critic step
    advantage:   A(s, a) = min(Q_1, Q_2)(s, a) - min(V_1, V_2)(s)      under the current (not the target) critic

The minimum of the pair enters only the advantage; each head regresses on its own target twin (no minimum in the
targets). The actor's loss is -mean_i (A_i * sum_t log pi(a_i,t | s_i, a_i,<t)): REINFORCE over the action's
tokens with the raw advantage (no normalisation).

Here: `episode_transitions` (the per-turn reward, next-state row and done flag of a batch of turns),
`td_targets`, `double_min`, `critic_advantage`, `critic_loss`, `soft_update_target`, and the `archer` advantage
estimator (the critic's advantage handed in as the `baseline` batch input, `unipo.archer.ArcherCritic`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Real

import torch
import torch.nn.functional as F

from unipo.core import validate
from unipo.core.advantages import ADVANTAGE_ESTIMATORS
from unipo.core.preference import soft_update_reference


def episode_transitions(episodes: torch.Tensor, turn_index: torch.Tensor, turn_rewards: torch.Tensor,
                        episode_rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rewards [B], next_row [B] long, done [B] bool) of a batch of turns, rows in any order.

    Row i is turn t of episode e (`episodes` [B]: any id per episode). Its next state s_{t+1} is the prompt of the
    row of the same episode with turn t + 1 (`next_row`, -1 for none); a row with no next turn is its episode's
    last and is terminal (done: the environment ended it, or its turn or token budget did, as the authors' envs
    end an episode at their turn limit). The per-turn reward counts the outcome after the last turn, as
    `unipo.core.turns.turn_discounted` does:

        r_{e,t} = turn_rewards_{e,t} + [t is e's last turn] * episode_rewards_e
    """
    validate.check_ndim("turn_rewards", turn_rewards, 1)
    rows = turn_rewards.shape[0]
    for name, tensor in (("episodes", episodes), ("turn_index", turn_index), ("episode_rewards", episode_rewards)):
        validate.check_per_sequence(name, tensor, rows)
    follows = (episodes[:, None] == episodes[None, :]) & (turn_index[None, :] == turn_index[:, None] + 1)  # [i, j]
    if bool((follows.sum(1) > 1).any()):
        raise ValueError("episode_transitions: a turn index appears twice in one episode")
    done = ~follows.any(1)
    next_row = torch.where(done, torch.full_like(turn_index, -1), follows.to(torch.long).argmax(1))
    rewards = turn_rewards + done.to(turn_rewards.dtype) * episode_rewards.to(turn_rewards.dtype)
    return rewards, next_row, done


def td_targets(rewards: torch.Tensor, done: torch.Tensor, next_values: torch.Tensor, gamma: float) -> torch.Tensor:
    """[N] y = r + gamma * (1 - done) * V(s'): the one-step TD target of Q(s, a) (V(s') from the target critic;
    its value at a terminal s' is never read)."""
    _check_fraction("gamma", gamma, open_low=False)
    validate.check_ndim("rewards", rewards, 1)
    validate.check_per_sequence("done", done, rewards.shape[0])
    validate.check_per_sequence("next_values", next_values, rewards.shape[0])
    live = (~done.bool()).to(rewards.dtype)
    return rewards + gamma * live * torch.where(done.bool(), torch.zeros_like(next_values), next_values)


def double_min(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """The elementwise minimum of twin estimates (clipped double Q: the pessimistic one of the two heads)."""
    validate.check_same_shape(first=first, second=second)
    return torch.minimum(first, second)


def critic_advantage(q1: torch.Tensor, q2: torch.Tensor, v1: torch.Tensor, v2: torch.Tensor) -> torch.Tensor:
    """[N] A(s, a) = min(Q_1, Q_2)(s, a) - min(V_1, V_2)(s)."""
    return double_min(q1, q2) - double_min(v1, v2)


def critic_loss(q: tuple[torch.Tensor, torch.Tensor], v: tuple[torch.Tensor, torch.Tensor],
                q_targets: tuple[torch.Tensor, torch.Tensor], v_targets: tuple[torch.Tensor, torch.Tensor]
                ) -> torch.Tensor:
    """sum_i mean (Q_i - y_i)^2 + mean (V_i - z_i)^2 over the twin heads i = 1, 2 (targets detached)."""
    if not len(q) == len(v) == len(q_targets) == len(v_targets) == 2:
        raise ValueError(f"critic_loss takes two Q heads, two V heads and a target each, got {len(q)}, {len(v)}, "
                         f"{len(q_targets)}, {len(v_targets)}")
    pairs = [*zip(q, q_targets), *zip(v, v_targets)]
    return torch.stack([F.mse_loss(pred, target.detach().to(pred.dtype)) for pred, target in pairs]).sum()


def soft_update_target(target: Sequence[torch.Tensor], online: Sequence[torch.Tensor], tau: float) -> None:
    """In place, for each tensor pair: theta_bar <- tau * theta + (1 - tau) * theta_bar (Polyak averaging; tau = 1
    copies)."""
    _check_fraction("tau", tau, open_low=True)
    soft_update_reference(target, online, tau)


@ADVANTAGE_ESTIMATORS.register("archer", inputs=("baseline", "step"))
def archer_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, *, baseline: torch.Tensor, step: int,
                      warmup_steps: int = 0, center: bool = False) -> torch.Tensor:
    """ArCHer (arXiv 2402.19446): A_i = the critic's min(Q_1, Q_2)(s_i, a_i) - min(V_1, V_2)(s_i), raw (the authors
    normalise nothing), handed in as `baseline` [B] by the `archer_critic` stateful baseline; 0 while
    step < warmup_steps (the authors' warm-up iterations train the critic alone). group_ids are not used.

    `center` (not the authors'): A_i - mean_B A, so that a critic whose Q - V is off zero on the policy's own actions
    does not push every sampled action up (or down) with REINFORCE."""
    validate.check_ndim("rewards", rewards, 1)
    validate.check_per_sequence("baseline", baseline, rewards.shape[0])
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ValueError(f"warmup_steps must be an int >= 0, got {warmup_steps!r}")
    if not isinstance(center, bool):
        raise ValueError(f"center must be true or false, got {center!r}")
    advantages = baseline.to(rewards.dtype)
    if center:
        advantages = advantages - advantages.mean()
    return torch.zeros_like(advantages) if step < warmup_steps else advantages


def _check_fraction(name: str, value: object, *, open_low: bool) -> None:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(float(value)) \
            or not (0 < value <= 1 if open_low else 0 <= value <= 1):
        raise ValueError(f"{name} must be a number in {'(0, 1]' if open_low else '[0, 1]'}, got {value!r}")
