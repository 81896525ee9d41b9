"""Baselines that carry state across steps: PPO's value head, and the stateful baselines a recipe names.

The maths (GAE, the clipped value loss, the Beta tracker update) lives in `unipo.core`;
these classes only hold the state and move it in and out of checkpoints.

A stateful baseline (`Recipe.baseline`, registered in `BASELINES`) is one object per run with this protocol
(`StatefulBaseline`), every hook with the step's whole (global) batch, so it is the same on every rank:

    setup(model=, tokenizer=, device=, seed=)  once, before the first step (a learned critic builds its network)
    prepare(batch) -> metrics                 after collection, before the batch's inputs are computed (a critic
                                              that learns from this step's rollouts first: ArCHer's order)
    baseline(batch) -> [B]                    the `baseline` batch input, per row
    observe(batch, kl=) -> metrics            after the policy update (SPO's tracker learns from the rewards)
    state_dict() / load_state_dict(state)     checkpoints: nested dicts of tensors and plain values, no pickle
"""

from __future__ import annotations

import torch
from torch import nn

from unipo.core.advantages import value_tracker_mean, value_tracker_update
from unipo.core.registry import Registry

# Stateful baselines a recipe can choose (`Recipe.baseline`): built once per run, fed each step's rollouts,
# saved in checkpoints. The value head is PPO's own critic (`Recipe.value_coef`), trained by the loss.
BASELINES: Registry = Registry("baseline")


class ValueHead(nn.Module):
    """V(s_t) from the policy's last hidden state at the position that predicts token t.

    Zero-initialised, so PPO starts with V = 0 (GAE's advantages then equal the returns) and
    the value loss rather than a random head decides what the critic learns first.
    """

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # (B, T, H) -> (B, T)
        return self.linear(hidden.to(self.linear.weight.dtype)).squeeze(-1)


class StatefulBaseline:
    """The protocol of a stateful baseline (see the module docstring); every hook but `baseline` may be left as is.
    `needs_whole_model`: it copies the policy or samples from it on every rank (a replica per rank under DDP), so
    `TrainConfig` refuses it with parallel=fsdp, which shards the policy in place."""

    needs_whole_model = False

    def setup(self, *, model, tokenizer, device: torch.device, seed: int) -> None:
        """Called once by the trainer before the first step."""

    def prepare(self, batch) -> dict[str, float]:
        """Learn from the step's batch before its advantages are computed; returns metrics to log."""
        return {}

    def baseline(self, batch) -> torch.Tensor:
        """[B]: the `baseline` batch input of each row."""
        raise NotImplementedError

    def observe(self, batch, *, kl: float) -> dict[str, float]:
        """Learn from the step's batch after the policy update (`kl`: the update's approximate KL)."""
        return {}

    def state_dict(self) -> dict:
        raise NotImplementedError

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError


@BASELINES.register("spo_tracker")
class PromptValueTracker(StatefulBaseline):
    """SPO (arXiv 2509.13232): a Beta(alpha, beta) posterior of each prompt's success rate.

    Prompts never seen before start at the prior Beta(prior, prior) (v = 0.5); the authors' verl
    recipe uses Beta(0.5, 0.5) (recipe/spo/spo_ray_trainer.py @4b2b3643) when it has no offline pass
    rates, which a generated task does not have. Open choice: the forgetting
    rate's divergence D is the step's approximate KL to the sampling policy (SPO measures it
    per prompt on that prompt's last response); with one update epoch D = 0 and the forgetting
    rate is the upper clip, rho_max.
    """

    def __init__(self, *, prior: float = 1.0) -> None:
        self.prior = prior
        self.state: dict[str, tuple[float, float]] = {}

    def baseline(self, batch) -> torch.Tensor:
        alpha, beta = self._lookup(batch.prompts, batch.rewards.device)
        return value_tracker_mean(alpha, beta)

    def observe(self, batch, *, kl: float) -> dict[str, float]:
        """The rollouts' rewards update their prompts' posteriors (expert rows are not the policy's)."""
        on = (~batch.off_policy).nonzero().squeeze(1).tolist()
        self.update([batch.prompts[i] for i in on], batch.rewards[on], kl)
        return {}

    def update(self, prompts: list[str], rewards: torch.Tensor, kl: float) -> None:
        alpha, beta = self._lookup(prompts, rewards.device)
        alpha, beta = value_tracker_update(alpha, beta, rewards.clamp(0, 1).to(alpha.dtype),
                                           torch.full_like(alpha, kl))
        for prompt, a, b in zip(prompts, alpha.tolist(), beta.tolist()):
            self.state[prompt] = (a, b)

    def state_dict(self) -> dict:
        return dict(self.state)

    def load_state_dict(self, state: dict) -> None:
        self.state = {prompt: tuple(ab) for prompt, ab in state.items()}

    def _lookup(self, prompts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
        pairs = [self.state.get(p, (self.prior, self.prior)) for p in prompts]
        return (torch.tensor([a for a, _ in pairs], device=device, dtype=torch.float32),
                torch.tensor([b for _, b in pairs], device=device, dtype=torch.float32))
