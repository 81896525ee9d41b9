"""SWEET-RL's maths (arXiv 2503.15478): a turn-level advantage read off a critic LM, its Bradley-Terry objective on
trajectory pairs, and the pairs it trains on (trajectories, then per-turn candidate actions).

The critic is a causal LM pi_phi that reads the privileged training-time information c (the reference solution)
before the conversation o_t; its advantage for an action a_t of |a_t| tokens is a scaled mean log-probability
ratio against a reference model pi_0:

    A(o_t, a_t, c) = beta * (1/|a_t|) * sum_k [log pi_phi(a_t,k | c, o_t, a_t,<k) - log pi_0(a_t,k | o_t, a_t,<k)]

- `turn_advantages` computes it per row (a row = one turn's action; pi_0 is whatever the caller hands in).
- `trajectory_scores`: the score of a whole trajectory tau, as the authors' critic training computes it
  (collab_openrlhf @87259d4b, openrlhf/trainer/dpo_trainer.py `concatenated_forward` with --mean_log_prob, the
  loss mask covering every assistant turn): the log-ratio summed over all the trajectory's action tokens,
  divided by their number,

      S(tau) = sum_t sum_k [log pi_phi - log pi_ref](a_t,k) / sum_t |a_t|,

  i.e. the token-weighted mean of the turns' mean log-ratios (the paper writes the sum over turns of the turns'
  advantages, each a per-action mean; the two agree when every action has the same length).
- `bradley_terry_loss`: -log sigma(beta * (S(tau+) - S(tau-))) per pair (OpenRLHF's DPOLoss, label smoothing 0).
- `trajectory_pairs`: the authors' critic pairs (sweet_rl @38daf2a5, scripts/evaluate_code.py): in each group
  (one task's trajectories), the first trajectory of highest reward is chosen, only if that reward reaches 1 (a
  full success), against every trajectory of the group whose reward is lower.
- `candidate_pairs`: the authors' policy pairs (scripts/generate_random_pairs_from_ranks.py, `extract_indices`):
  of K candidate actions ranked by the critic's score, one drawn uniformly from the K//2 lowest and one from the
  rest; the higher-scored is chosen (the upper one on a tie), n_pairs draws per state.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from unipo.core import validate


def turn_advantages(logp: torch.Tensor, reference_logp: torch.Tensor, mask: torch.Tensor,
                    beta: float) -> torch.Tensor:
    """[N] A = beta * (mean over the row's masked tokens of logp - the same mean of reference_logp).

    logp, reference_logp, mask: [N, T]. A row without tokens gets 0."""
    _check_rows(logp, reference_logp, mask)
    _check_beta(beta)
    mask = mask.to(logp.dtype)
    count = mask.sum(1)
    ratio = ((logp - reference_logp.to(logp.dtype)) * mask).sum(1)
    return beta * torch.where(count > 0, ratio / count.clamp(min=1), torch.zeros_like(ratio))


def trajectory_scores(logp_sums: torch.Tensor, reference_sums: torch.Tensor, token_counts: torch.Tensor,
                      episode_index: torch.Tensor, num_episodes: int) -> torch.Tensor:
    """[E] S_e = sum over rows r of episode e of (logp_sums[r] - reference_sums[r]) / sum of token_counts[r].

    Rows are turns: `logp_sums[r]` is the critic's log-prob summed over turn r's action tokens, `reference_sums[r]`
    the reference's, `token_counts[r]` their number; `episode_index[r]` in [0, num_episodes). An episode with no
    tokens scores 0."""
    if not (logp_sums.shape == reference_sums.shape == token_counts.shape == episode_index.shape) \
            or logp_sums.dim() != 1:
        raise ValueError(f"trajectory_scores takes four [R] tensors, got shapes {list(logp_sums.shape)}, "
                         f"{list(reference_sums.shape)}, {list(token_counts.shape)}, {list(episode_index.shape)}")
    if len(episode_index) and (int(episode_index.min()) < 0 or int(episode_index.max()) >= num_episodes):
        raise ValueError(f"episode_index must lie in [0, {num_episodes}), got {episode_index.tolist()}")
    diff = logp_sums - reference_sums.to(logp_sums.dtype)
    totals = torch.zeros(num_episodes, dtype=diff.dtype, device=diff.device).index_add(0, episode_index, diff)
    counts = torch.zeros(num_episodes, dtype=diff.dtype, device=diff.device).index_add(
        0, episode_index, token_counts.to(diff.dtype))
    return torch.where(counts > 0, totals / counts.clamp(min=1), torch.zeros_like(totals))


def bradley_terry_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor, beta: float) -> torch.Tensor:
    """[P] -log sigma(beta * (chosen_scores - rejected_scores)), computed with logsigmoid (exact for large margins)."""
    if chosen_scores.shape != rejected_scores.shape or chosen_scores.dim() != 1:
        raise ValueError(f"bradley_terry_loss takes two [P] tensors, got shapes {list(chosen_scores.shape)} and "
                         f"{list(rejected_scores.shape)}")
    _check_beta(beta)
    return -F.logsigmoid(beta * (chosen_scores - rejected_scores))


def trajectory_pairs(rewards: torch.Tensor, groups: torch.Tensor,
                     min_chosen_reward: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen [P], rejected [P]) trajectory indices: in each group, the first trajectory of the highest reward,
    if that reward is >= `min_chosen_reward`, against every trajectory of the group with a lower reward.

    rewards, groups: [E]. Pairs come out group by group (in ascending group id), rejected in index order."""
    if rewards.dim() != 1 or rewards.shape != groups.shape:
        raise ValueError(f"trajectory_pairs takes [E] rewards and groups, got shapes {list(rewards.shape)} and "
                         f"{list(groups.shape)}")
    group, n = validate.group_index(groups)
    best = torch.full((n,), float("-inf"), dtype=rewards.dtype, device=rewards.device)
    best = best.scatter_reduce(0, group, rewards, "amax")
    index = torch.arange(len(rewards), device=rewards.device)
    at_best = rewards == best[group]
    first_best = torch.full((n,), len(rewards), dtype=torch.long, device=rewards.device)
    first_best = first_best.scatter_reduce(0, group[at_best], index[at_best], "amin")
    eligible = best >= min_chosen_reward
    rejected = (rewards < best[group]) & eligible[group]
    order = torch.argsort(group[rejected] * len(rewards) + index[rejected])  # group by group, then by index
    rejected_index = index[rejected][order]
    return first_best[group[rejected_index]], rejected_index


def candidate_pairs(scores: torch.Tensor, n_pairs: int,
                    generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen [S, n_pairs], rejected [S, n_pairs]) candidate indices in [0, K) from scores [S, K].

    For each draw: rank the K candidates by score (ascending), pick rank lo uniformly in [0, K//2) and rank hi
    uniformly in [K//2, K); the candidate of higher score is chosen, the candidate at hi on a tie."""
    if scores.dim() != 2 or scores.shape[1] < 2:
        raise ValueError(f"candidate_pairs takes [S, K] scores with K >= 2 candidates, got {list(scores.shape)}")
    if isinstance(n_pairs, bool) or not isinstance(n_pairs, int) or n_pairs < 1:
        raise ValueError(f"n_pairs must be an int >= 1, got {n_pairs!r}")
    states, k = scores.shape
    device = generator.device if generator is not None else scores.device
    lo = torch.randint(0, k // 2, (states, n_pairs), generator=generator, device=device).to(scores.device)
    hi = torch.randint(k // 2, k, (states, n_pairs), generator=generator, device=device).to(scores.device)
    order = torch.argsort(scores, dim=1, stable=True)
    low, high = order.gather(1, lo), order.gather(1, hi)
    low_wins = scores.gather(1, low) > scores.gather(1, high)
    return torch.where(low_wins, low, high), torch.where(low_wins, high, low)


def _check_rows(*tensors: torch.Tensor) -> None:
    shapes = [list(t.shape) for t in tensors]
    if any(t.dim() != 2 for t in tensors) or any(s != shapes[0] for s in shapes):
        raise ValueError(f"expected [N, T] tensors of one shape, got {shapes}")


def _check_beta(beta: float) -> None:
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not beta > 0 or beta != beta \
            or beta == float("inf"):
        raise ValueError(f"beta must be a finite number > 0, got {beta!r}")
