"""SWEET-RL (arXiv 2503.15478), online or from recorded episodes: a critic LM that reads privileged training-time
information, and the turn-level preference pairs it ranks for the policy's DPO.

Two pieces, joined by the stateful-baseline protocol (`unipo.critics.StatefulBaseline`):

- `SweetCritic` (`BASELINES["sweet_critic"]`): a causal LM initialised from the policy's weights (the authors
  initialise theirs from the same base model) plus a frozen copy of those weights as its reference. It reads each
  row's `references` text (the problem's gold answer, never shown to the policy) through a prefix, as the authors'
  scripts do: "In light that the final answer is: <answer>." before the conversation. `prepare(batch)` trains it
  on the batch's episodes: trajectory pairs of each problem (the best episode, if a success, against every worse
  one), Bradley-Terry on the trajectories' scores (`unipo.core.sweet`), `epochs` passes of mini-batches of
  `pairs_per_update` pairs, its own AdamW. `baseline(batch)` is each row's advantage: beta times the critic's
  mean log-prob of the action minus, by default, the sampler's (`ranking_reference`).
- `collect_turn_pairs` (`recipe.data = turn_pairs`): each step, the policy's episodes (as `recipe.data =
  episodes`), or with `data_params.trajectories` the step's problems of a recorded episode file, replayed
  (`unipo.episode_files`, the authors' offline setting); the critic learns from them (`prepare`); at every turn
  state the policy took, `candidates` fresh actions are sampled (one `engine.generate` call), scored by the critic
  (`baseline`), and `pairs_per_state` (higher, lower) pairs are drawn from the top and bottom halves of the
  ranking. The batch is those pairs (two consecutive rows, chosen first; the policy's own prompt, no privileged
  text), for a pairwise loss against the reference (the recipe's: DPO plus 0.01 NLL of the chosen). The trainer
  hands its stateful baseline to the collector (`RolloutCollector(critic=...)`); the data source uses only the
  protocol's hooks.

A pair batch has no episode rows, so the trainer's own `prepare` call on it (`Trainer.learn`) teaches the critic
nothing more. Under torchrun with DDP each rank's critic learns from the global batch of episodes (the collector's
`gather`) with identically seeded shuffles, so the replicas stay equal, and each rank ranks the candidates at its own
turn states; FSDP is refused in one line (the critic copies the whole policy).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from unipo.core import validate
from unipo.core.sweet import bradley_terry_loss, candidate_pairs, trajectory_pairs, trajectory_scores, turn_advantages
from unipo.critics import BASELINES, StatefulBaseline

# the authors' privileged prefix (sweet_rl @38daf2a5, scripts/evaluate_code.py and rank_best_of_n.py)
PRIVILEGED_TEMPLATE = "In light that the final answer is: {reference}."
RANKING_REFERENCES = ("sampler", "critic_reference")
# the authors' best_of_n and --num_pairs; `trajectories`: a recorded episode file to train from offline, as they do
# (unipo.episode_files), instead of the policy's fresh episodes each step
TURN_PAIR_DEFAULTS = {"candidates": 16, "pairs_per_state": 4, "trajectories": None}
_SCORE_ROWS = 64  # rows per no-grad critic forward (memory bound only: the numbers do not depend on it)


@BASELINES.register("sweet_critic")
class SweetCritic(StatefulBaseline):
    """SWEET-RL's critic (see the module docstring). Defaults are the authors' (README's critic command: beta 0.1,
    learning rate 2e-7, 4 epochs, batches of 8 pairs; OpenRLHF's Adam betas (0.9, 0.95), weight decay 0, gradient
    clip 1.0)."""

    needs_whole_model = True  # it copies the policy (FSDP would shard it: TrainConfig refuses that)

    def __init__(self, *, beta: float = 0.1, lr: float = 2e-7, epochs: int = 4, pairs_per_update: int = 8,
                 max_grad_norm: float = 1.0, ranking_reference: str = "sampler",
                 privileged_template: str = PRIVILEGED_TEMPLATE) -> None:
        for key, value in (("beta", beta), ("lr", lr), ("max_grad_norm", max_grad_norm)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                raise ValueError(f"sweet_critic: {key} must be a finite number > 0, got {value!r}")
        for key, value in (("epochs", epochs), ("pairs_per_update", pairs_per_update)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"sweet_critic: {key} must be an int >= 1, got {value!r}")
        if ranking_reference not in RANKING_REFERENCES:
            raise ValueError(f"sweet_critic: ranking_reference must be one of {', '.join(RANKING_REFERENCES)}, "
                             f"got {ranking_reference!r}")
        if not isinstance(privileged_template, str) or "{reference}" not in privileged_template:
            raise ValueError(f"sweet_critic: privileged_template must be a string with a {{reference}} field, got "
                             f"{privileged_template!r}")
        self.beta, self.lr, self.epochs, self.pairs_per_update = float(beta), float(lr), epochs, pairs_per_update
        self.max_grad_norm, self.ranking_reference = float(max_grad_norm), ranking_reference
        self.privileged_template = privileged_template
        self.critic = self.reference = self.optimizer = self.tokenizer = None
        self.updates = 0  # optimizer steps taken so far

    # -- the protocol ------------------------------------------------------------------------------------------
    def setup(self, *, model, tokenizer, device: torch.device, seed: int) -> None:
        """The critic and its frozen reference: two copies of the policy's (initial) weights."""
        self.critic = copy.deepcopy(model).to(device)
        self.reference = copy.deepcopy(model).to(device).eval()
        for p in self.reference.parameters():
            p.requires_grad_(False)
        self.optimizer = torch.optim.AdamW([p for p in self.critic.parameters() if p.requires_grad], lr=self.lr,
                                           betas=(0.9, 0.95), weight_decay=0.0)
        self.tokenizer, self.device = tokenizer, device
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.generator = torch.Generator().manual_seed(seed)  # shuffles the critic's pairs
        self._prefixes: dict[str, list[int]] = {}

    def prepare(self, batch) -> dict[str, float]:
        """Train on the batch's episodes: `epochs` passes over its trajectory pairs (a batch with no episode rows,
        such as the pair batch of `recipe.data = turn_pairs`, teaches nothing). Metrics: critic/pairs,
        critic/updates, critic/loss and critic/accuracy (chosen scored above rejected), averaged over the step's
        updates, before each update."""
        if batch.episode_ids is None or len(batch) == 0:
            return {}
        self._need_references(batch)
        episode, n_episodes = validate.group_index(batch.episode_ids)
        first = torch.full((n_episodes,), len(batch), dtype=torch.long, device=episode.device)
        first = first.scatter_reduce(0, episode, torch.arange(len(batch), device=episode.device), "amin")
        chosen, rejected = trajectory_pairs(batch.episode_rewards[first].float(), batch.group_ids[first])
        if len(chosen) == 0:
            return {"critic/pairs": 0.0, "critic/updates": 0.0}
        involved = torch.isin(episode, torch.cat([chosen, rejected])).nonzero().squeeze(1)
        counts = batch.completion_mask.float().sum(1)
        with torch.no_grad():
            reference_sums = torch.zeros(len(batch), device=counts.device)
            reference_sums[involved] = self._summed_logp(self.reference, batch, involved).to(counts)
        losses, accuracies = [], []
        self.critic.train()
        with torch.enable_grad():
            for _ in range(self.epochs):
                order = torch.randperm(len(chosen), generator=self.generator).to(chosen.device)
                for part in order.split(self.pairs_per_update):
                    loss, accuracy = self._update(batch, episode, chosen[part], rejected[part], reference_sums,
                                                  counts)
                    losses.append(loss)
                    accuracies.append(accuracy)
        self.critic.eval()
        return {"critic/pairs": float(len(chosen)), "critic/updates": float(len(losses)),
                "critic/loss": sum(losses) / len(losses), "critic/accuracy": sum(accuracies) / len(accuracies)}

    @torch.no_grad()
    def baseline(self, batch) -> torch.Tensor:
        """[B] each row's advantage A = beta * (mean log pi_critic(action | privileged prefix + conversation) - mean
        log pi_0(action)), pi_0 the sampler's log-probs (`ranking_reference=sampler`, the authors' ranking script)
        or the critic's frozen reference, reading the same prefix (`critic_reference`, the trained parameterisation)."""
        self._need_references(batch)
        rows = torch.arange(len(batch), device=batch.completion_ids.device)
        mask = batch.completion_mask.float()
        logp = self._logp(self.critic, batch, rows)
        if self.ranking_reference == "sampler":
            if bool(batch.off_policy.any()):
                raise ValueError("sweet_critic ranks against the sampler's log-probs, and expert rows have none "
                                 "(set ranking_reference=critic_reference)")
            reference = batch.sampling_logp
        else:
            reference = self._logp(self.reference, batch, rows)
        return turn_advantages(logp.float(), reference.float(), mask, self.beta)

    def state_dict(self) -> dict:
        """The critic, its reference (a resumed run's policy is not the initial one), AdamW's state, the shuffle."""
        return {"critic": {k: v.detach().clone() for k, v in self.critic.state_dict().items()},
                "reference": {k: v.detach().clone() for k, v in self.reference.state_dict().items()},
                "optimizer": self.optimizer.state_dict(), "generator": self.generator.get_state(),
                "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.critic.load_state_dict({k: v.to(self.device) for k, v in state["critic"].items()})
        self.reference.load_state_dict({k: v.to(self.device) for k, v in state["reference"].items()})
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.updates = int(state["updates"])

    # -- internals ---------------------------------------------------------------------------------------------
    def _update(self, batch, episode: torch.Tensor, chosen: torch.Tensor, rejected: torch.Tensor,
                reference_sums: torch.Tensor, counts: torch.Tensor) -> tuple[float, float]:
        """One AdamW step on the mean Bradley-Terry loss of these pairs; (loss, accuracy) before the step."""
        episodes = torch.unique(torch.cat([chosen, rejected]))  # sorted
        rows = torch.isin(episode, episodes).nonzero().squeeze(1)
        sums = self._summed_logp(self.critic, batch, rows)
        local = torch.searchsorted(episodes, episode[rows])
        scores = trajectory_scores(sums.float(), reference_sums[rows], counts[rows], local, len(episodes))
        good, bad = scores[torch.searchsorted(episodes, chosen)], scores[torch.searchsorted(episodes, rejected)]
        loss = bradley_terry_loss(good, bad, self.beta).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in self.critic.parameters() if p.requires_grad], self.max_grad_norm)
        self.optimizer.step()
        self.updates += 1
        return float(loss.detach()), float((good > bad).float().mean())

    def _summed_logp(self, model, batch, rows: torch.Tensor) -> torch.Tensor:
        """[len(rows)] the model's log-prob of each row's action, summed over its tokens (gradients flow when they
        may: one forward for all rows)."""
        if torch.is_grad_enabled():
            return (self._forward(model, batch, rows) * batch.completion_mask[rows]).sum(1)
        return (self._logp(model, batch, rows) * batch.completion_mask[rows]).sum(1)

    def _logp(self, model, batch, rows: torch.Tensor) -> torch.Tensor:
        """[len(rows), T] no-grad log-probs in chunks of _SCORE_ROWS rows."""
        with torch.no_grad():
            return torch.cat([self._forward(model, batch, part) for part in rows.split(_SCORE_ROWS)])

    def _forward(self, model, batch, rows: torch.Tensor) -> torch.Tensor:
        from unipo.rollout import policy_logprobs

        prompt_ids, prompt_mask = self.critic_prompts(batch, rows)
        out = policy_logprobs(model, prompt_ids, prompt_mask, batch.completion_ids[rows], batch.completion_mask[rows])
        return out.logp

    def critic_prompts(self, batch, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, mask) [len(rows), P'] left-padded: the privileged prefix, then the row's own prompt (the
        conversation the policy saw, unchanged)."""
        from unipo.rollout import pad_sequences

        prompts = [self._prefix(batch.references[r]) + batch.prompt_ids[r][batch.prompt_mask[r].bool()].tolist()
                   for r in rows.tolist()]
        return pad_sequences(prompts, self.pad_id, left=True, device=batch.prompt_ids.device)

    def _prefix(self, reference: str) -> list[int]:
        if reference not in self._prefixes:
            text = self.privileged_template.format(reference=reference)
            self._prefixes[reference] = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self._prefixes[reference]

    @staticmethod
    def _need_references(batch) -> None:
        if batch.references is None:
            raise ValueError("sweet_critic reads each row's privileged information (batch.references), which only "
                             "episode batches carry (recipe.data=episodes or turn_pairs)")


def turn_pair_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """`recipe.data_params` of `recipe.data = turn_pairs`, with the defaults filled in; ValueError on a bad one."""
    unknown = sorted(set(params) - set(TURN_PAIR_DEFAULTS))
    if unknown:
        raise ValueError(f"recipe.data_params: unknown keys {unknown} for recipe.data=turn_pairs; valid: "
                         f"{', '.join(TURN_PAIR_DEFAULTS)}")
    out = {**TURN_PAIR_DEFAULTS, **params}
    for key, low in (("candidates", 2), ("pairs_per_state", 1)):
        if isinstance(out[key], bool) or not isinstance(out[key], int) or out[key] < low:
            raise ValueError(f"recipe.data_params.{key} must be an int >= {low}, got {out[key]!r}")
    path = out["trajectories"]
    if path is not None and not (isinstance(path, str) and Path(path).is_file()):
        raise ValueError(f"recipe.data_params.trajectories must be an episode file (unipo episodes --out FILE), got "
                         f"{path!r}" + (": no such file" if isinstance(path, str) else ""))
    return out


def collect_turn_pairs(collector, *, seed: int, step: int):
    """The collector's step for `recipe.data = turn_pairs` (see the module docstring): the step's episodes, the
    critic's `prepare` on them, then candidate actions at each of the policy's turn states, ranked by the critic's
    `baseline`, as (chosen, rejected) pairs with targets 1 / 0."""
    from unipo.agents import collect_episodes
    from unipo.collect import RolloutBatch, _interleave
    from unipo.envs.base import get_env

    critic = collector.critic
    if critic is None:
        raise ValueError(f"recipe {collector.recipe.name}: recipe.data=turn_pairs ranks candidate actions with the "
                         f"recipe's stateful baseline (recipe.baseline), and the collector was given none")
    if collector.world_size > 1 and collector.gather is None:
        raise ValueError("recipe.data=turn_pairs trains its critic inside collection: a multi-process collector "
                         "needs `gather` (the trainer passes unipo.distributed.gather_batch)")
    params = turn_pair_params(collector.recipe.data_params)
    if params["trajectories"]:  # offline: the step's problems of a recorded file, replayed (unipo.episode_files)
        from unipo.episode_files import offline_episodes

        episodes, stats = offline_episodes(collector, params["trajectories"], seed=seed, step=step)
    else:
        episodes, stats = collect_episodes(collector, seed=seed, step=step)
    # Every rank's critic learns from every rank's episodes (the same global batch, the same seeded shuffles), so
    # the replicas stay equal; each rank then ranks the candidates at its own turn states.
    every = collector.gather(episodes) if collector.world_size > 1 else episodes
    stats = {**stats, **critic.prepare(every)}
    states = episodes.rows(~episodes.off_policy) if len(episodes) else episodes
    if len(states) == 0:
        return collector._empty(), {**stats, "rollout/pairs": 0.0, "rollout/turn_states": 0.0}
    k, cfg, device = params["candidates"], collector.cfg, collector.device
    env_cls = get_env(collector.env or "guess_number")
    room = _remaining_budget(states, env_cls.max_episode_tokens).repeat_interleave(k)
    prompts = [states.prompt_ids[i][states.prompt_mask[i].bool()].tolist() for i in range(len(states))]
    gen = collector.engine.generate(prompts, group_size=k,
                                    max_new_tokens=min(cfg.max_new_tokens or env_cls.max_action_tokens,
                                                       int(room.max())),
                                    eos_token_id=collector.eos_id, pad_token_id=collector.pad_id,
                                    temperature=cfg.temperature, top_p=cfg.top_p, generator=collector.generator)
    # an action may not outrun its episode's token budget (as `unipo.agents.play_episodes` cuts it)
    keep = torch.arange(gen.completion_ids.shape[1], device=device)[None] < room[:, None]
    mask = gen.completion_mask * keep
    ids = torch.where(mask.bool(), gen.completion_ids, torch.full_like(gen.completion_ids, collector.pad_id))
    rows = len(ids)
    state_of_row = torch.arange(len(states), device=device).repeat_interleave(k)
    zeros = torch.zeros(rows, dtype=torch.bool, device=device)
    candidates = RolloutBatch(
        prompt_ids=gen.prompt_ids, prompt_mask=gen.prompt_mask, completion_ids=ids, completion_mask=mask,
        sampling_logp=gen.sampling_logp * mask, rewards=torch.zeros(rows, device=device), correct=zeros,
        group_ids=state_of_row, prompt_index=state_of_row.clone(), off_policy=zeros.clone(),
        truncated=gen.truncated.to(device) | (gen.completion_mask.sum(1) > room), answer_ids=state_of_row * 0,
        hinted=zeros.clone(), texts=collector.tokenizer.batch_decode(ids, skip_special_tokens=True),
        prompts=[states.prompts[i] for i in state_of_row.tolist()],
        references=[states.references[i] for i in state_of_row.tolist()])
    scores = critic.baseline(candidates).view(len(states), k)
    chosen, rejected = candidate_pairs(scores, params["pairs_per_state"], collector.generator)
    offset = (torch.arange(len(states), device=device) * k)[:, None]
    chosen, rejected = (chosen + offset).reshape(-1), (rejected + offset).reshape(-1)
    n = len(chosen)
    batch = _interleave(candidates.rows(chosen), candidates.rows(rejected), torch.ones(n, device=device),
                        torch.zeros(n, device=device), torch.arange(n, device=device))
    flat = scores.reshape(-1)
    stats.update({"rollout/pairs": float(n), "rollout/turn_states": float(len(states)),
                  "rollout/tied_pairs": float((flat[chosen] == flat[rejected]).sum()),
                  "critic/score_mean": float(flat.mean()), "critic/pair_gap": float((flat[chosen] - flat[rejected])
                                                                                   .mean())})
    return batch, stats


def _remaining_budget(turns, max_episode_tokens: int) -> torch.Tensor:
    """[N] the tokens each turn's episode had left for that turn's action: the budget less its earlier actions."""
    lengths = turns.completion_mask.sum(1)
    episode, turn = turns.episode_ids, turns.turn_index
    earlier = (episode[:, None] == episode[None, :]) & (turn[None, :] < turn[:, None])  # [N, N]: j before i
    return (max_episode_tokens - (earlier * lengths[None, :]).sum(1)).clamp(min=1)
