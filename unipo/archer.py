"""ArCHer's utterance-level critic (arXiv 2402.19446) as a stateful baseline: `archer_critic` (unipo.critics).

Each training step, before the advantages (`prepare`):
1. every turn of the step's batch becomes a transition (s_t, a_t, r_t, s_{t+1}, done_t) in a replay buffer
   (`unipo.core.archer.episode_transitions`: s_t is the row's prompt, the conversation so far; a_t its completion;
   s_{t+1} the prompt of the episode's next turn; the last turn is terminal; r_t the turn's reward plus, on the
   last turn, the episode's outcome);
2. `critic_steps` gradient steps, each on `critic_batch` transitions drawn uniformly with replacement from the
   buffer: twin Q heads regress on r + gamma (1 - done) Vbar_i(s'), twin V heads on Qbar_i(s, a~) with a~ a fresh
   action of the current policy (sampled once per step for all the step's draws: the policy does not change while
   the critic learns), then the target critic moves by tau (`unipo.core.archer`);
then `baseline(batch)` gives each row min(Q_1, Q_2)(s_t, a_t) - min(V_1, V_2)(s_t) under the updated critic, which
the `archer` advantage estimator hands to the loss.

The network follows the authors' DoubleCritic (YifeiZhou02/ArCHer @7c771a76, archer/models/critic.py): one
encoder reads the state and, separately, the action; each Q head is an MLP (2H -> H -> H -> 1, ReLU) of their
concatenated encodings, each V head an MLP (H -> H -> H -> 1) of the state's; the encoder is trained with the heads
(their `detach_model=False`). Their encoder is roberta-base with its own tokenizer; ours reads the policy's token
ids directly: `backbone="copy"` is a copy of the policy's weights when the run starts (a decoder: a sequence's
encoding is its last token's final hidden state, the one position that has read all of it; left truncation to the
backbone's context, as their tokenizer truncates), `backbone="tiny"` a fresh random decoder of the embedded tiny
model's shape over the policy's vocabulary (cheap for a large policy). `train_backbone=False` freezes the encoder
(only the heads learn). The critic has its own AdamW (no weight decay: the authors' Adam), gradient-norm clip and
random streams (buffer draws, fresh actions), all in its checkpoint state with the buffer.

Processes: under torchrun with DDP each rank trains its own replica of the critic on the global batch with the same
random streams, so the replicas agree and no critic traffic is needed (tests/test_distributed.py checks the update
at 2 processes against one); FSDP is refused (the critic copies and samples from the whole policy).
"""

from __future__ import annotations

import copy
import math
from array import array
from dataclasses import dataclass
from numbers import Real

import torch
from torch import nn

from unipo.core.archer import (
    critic_advantage,
    critic_loss,
    double_min,
    episode_transitions,
    soft_update_target,
    td_targets,
)
from unipo.critics import BASELINES, StatefulBaseline

BACKBONES = ("copy", "tiny")


@dataclass(frozen=True)
class Transition:
    """Token ids as int32 arrays: 4 bytes a token, where a list of Python ints costs about 36 (a full buffer of long
    conversations is large)."""

    state: array  # s_t: the conversation so far (token ids of the row's prompt)
    action: array  # a_t: the model's action (its completion tokens)
    reward: float  # r_t
    next_state: array  # s_{t+1} (empty when done)
    done: bool

    @classmethod
    def of(cls, state, action, reward: float, next_state, done: bool) -> Transition:
        return cls(array("i", state), array("i", action), float(reward), array("i", next_state), bool(done))


class ReplayBuffer:
    """The last `capacity` transitions, overwritten oldest first (the authors' ring buffer, `archer/data/utils.py`);
    draws are uniform over the slots held, with replacement."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.slots: list[Transition] = []
        self.inserted = 0  # transitions ever added; the next one goes to slot inserted % capacity

    def __len__(self) -> int:
        return len(self.slots)

    def __getitem__(self, index: int) -> Transition:
        return self.slots[index]

    def add(self, transitions: list[Transition]) -> None:
        for transition in transitions:
            if len(self.slots) < self.capacity:
                self.slots.append(transition)
            else:
                self.slots[self.inserted % self.capacity] = transition
            self.inserted += 1

    def sample(self, n: int, generator: torch.Generator) -> list[int]:
        """n slot indices, uniform with replacement (the authors' `randint(0, size) % max_size` favours the oldest
        slots once the buffer has wrapped; this does not)."""
        return torch.randint(len(self.slots), (n,), generator=generator).tolist()

    def longest_action(self) -> int:
        return max((len(t.action) for t in self.slots), default=1)

    def state_dict(self) -> dict:
        """Flat tensors (the token ids of each field concatenated, with their lengths), no pickle."""
        def flat(name: str) -> dict[str, torch.Tensor]:
            seqs, ids = [getattr(t, name) for t in self.slots], array("i")
            for seq in seqs:
                ids.extend(seq)
            return {f"{name}_ids": torch.frombuffer(ids, dtype=torch.int32).clone() if ids else
                    torch.zeros(0, dtype=torch.int32),
                    f"{name}_lengths": torch.tensor([len(s) for s in seqs], dtype=torch.long)}

        return {"capacity": self.capacity, "inserted": self.inserted, **flat("state"), **flat("action"),
                **flat("next_state"), "reward": torch.tensor([t.reward for t in self.slots], dtype=torch.float64),
                "done": torch.tensor([t.done for t in self.slots], dtype=torch.bool)}

    def load_state_dict(self, state: dict) -> None:
        def unflat(name: str) -> list[array]:
            ids = array("i", state[f"{name}_ids"].to(torch.int32).numpy().tobytes())
            ends = state[f"{name}_lengths"].cumsum(0).tolist()
            return [ids[end - n:end] for end, n in zip(ends, state[f"{name}_lengths"].tolist())]

        self.capacity, self.inserted = int(state["capacity"]), int(state["inserted"])
        self.slots = [Transition.of(s, a, r, n, d) for s, a, r, n, d in zip(
            unflat("state"), unflat("action"), state["reward"].tolist(), unflat("next_state"),
            state["done"].tolist(), strict=True)]


def _mlp(inputs: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, 1))


class DoubleCritic(nn.Module):
    """Q_1, Q_2 (state, action) and V_1, V_2 (state) heads over one decoder encoder (see the module docstring)."""

    def __init__(self, backbone: nn.Module, hidden: int, pad_token_id: int, context: int | None) -> None:
        super().__init__()
        self.backbone, self.pad_token_id, self.context = backbone, pad_token_id, context
        self.q1, self.q2 = _mlp(2 * hidden, hidden), _mlp(2 * hidden, hidden)
        self.v1, self.v2 = _mlp(hidden, hidden), _mlp(hidden, hidden)

    def encode(self, sequences: list[list[int]], device: torch.device) -> torch.Tensor:
        """[N, H] float32: each sequence's last-token final hidden state (left-padded, the oldest tokens cut past
        the context)."""
        from unipo.lean_decoder import lean_decoder, positions_from_mask
        from unipo.rollout import pad_sequences

        keep = self.context or max(map(len, sequences))
        # each distinct sequence once (every episode of a problem starts from the same state)
        index: dict[tuple[int, ...], int] = {}
        owner = torch.tensor([index.setdefault(tuple(s[-keep:]) or (self.pad_token_id,), len(index))
                              for s in sequences], device=device)
        ids, mask = pad_sequences([list(s) for s in index], self.pad_token_id, left=True, device=device)
        lean = lean_decoder(self.backbone)  # the same maths as the HF forward, cheaper on a small model
        if lean is not None:
            hidden = lean.prefill(ids, mask, padded=not bool(mask.all()))[0][:, -1]
        else:
            body = self.backbone.get_decoder() if hasattr(self.backbone, "get_decoder") else self.backbone
            hidden = body(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask)
                          ).last_hidden_state[:, -1]
        return hidden.float().index_select(0, owner)

    def forward(self, states: list[list[int]], actions: list[list[int]], device: torch.device
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(Q_1, Q_2, V_1, V_2), each [N]."""
        state, action = self.encode(states, device), self.encode(actions, device)
        pair = torch.cat([state, action], dim=1)
        return self.q1(pair)[:, 0], self.q2(pair)[:, 0], self.v1(state)[:, 0], self.v2(state)[:, 0]

    def values(self, states: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(V_1, V_2), each [N]."""
        state = self.encode(states, device)
        return self.v1(state)[:, 0], self.v2(state)[:, 0]


@BASELINES.register("archer_critic")
class ArcherCritic(StatefulBaseline):
    """ArCHer's off-policy turn critic (see the module docstring). Params (the authors' values in
    scripts/config/*.yaml @7c771a76 in brackets): `lr` [2e-5 with roberta-base], `gamma` [0.95], `tau` [0.1],
    `critic_steps` gradient steps per training step [epochs: 50], `critic_batch` transitions per step [batch_size 8 x
    grad_accum_steps 32 = 256], `max_grad_norm` [1.0], `capacity` [100000], `temperature` of the fresh actions (the
    rollout temperature) [1.0], `backbone` ("copy" | "tiny"), `train_backbone` [True].

    Under torchrun every rank keeps a whole replica: `prepare` and `baseline` get the global batch (`Trainer.learn`),
    draws and fresh actions come from streams seeded alike and a DDP policy is whole on every rank, so the replicas
    stay equal without communicating (FSDP, which shards the policy, is refused by `TrainConfig`)."""

    needs_whole_model = True  # its backbone copies the policy, its fresh actions sample from it

    def __init__(self, *, backbone: str = "copy", train_backbone: bool = True, lr: float = 2e-5,
                 gamma: float = 0.95, tau: float = 0.1, critic_steps: int = 50, critic_batch: int = 256,
                 max_grad_norm: float = 1.0, capacity: int = 100_000, temperature: float = 1.0) -> None:
        if backbone not in BACKBONES:
            raise ValueError(f"archer_critic: backbone must be one of {', '.join(BACKBONES)}, got {backbone!r}")
        if not isinstance(train_backbone, bool):
            raise ValueError(f"archer_critic: train_backbone must be true or false, got {train_backbone!r}")
        for name, value, ok, what in (
                ("lr", lr, lambda x: x > 0, "> 0"), ("gamma", gamma, lambda x: 0 <= x <= 1, "in [0, 1]"),
                ("tau", tau, lambda x: 0 < x <= 1, "in (0, 1]"),
                ("max_grad_norm", max_grad_norm, lambda x: x > 0, "> 0"),
                ("temperature", temperature, lambda x: x > 0, "> 0")):
            if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or not ok(value):
                raise ValueError(f"archer_critic: {name} must be a finite number {what}, got {value!r}")
        for name, value in (("critic_steps", critic_steps), ("critic_batch", critic_batch), ("capacity", capacity)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"archer_critic: {name} must be an int >= 1, got {value!r}")
        self.backbone, self.train_backbone, self.lr, self.gamma, self.tau = backbone, train_backbone, lr, gamma, tau
        self.critic_steps, self.critic_batch, self.max_grad_norm = critic_steps, critic_batch, max_grad_norm
        self.temperature = temperature
        self.buffer = ReplayBuffer(capacity)

    # -- set-up --------------------------------------------------------------------------------
    def setup(self, *, model, tokenizer, device: torch.device, seed: int) -> None:
        from unipo.models import TINY_SIZES, context_length

        self.policy, self.device = model, torch.device(device)
        self.eos = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos
        with torch.random.fork_rng(devices=[]):  # the heads' (and a tiny backbone's) init never moves the run's RNG
            torch.manual_seed(seed)
            if self.backbone == "copy":
                backbone = copy.deepcopy(model)
                if hasattr(backbone, "merge_and_unload"):  # a LoRA policy: its merged weights, all trainable
                    backbone = backbone.merge_and_unload()
            else:
                from transformers import Qwen2Config, Qwen2ForCausalLM

                backbone = Qwen2ForCausalLM(Qwen2Config(
                    vocab_size=model.get_input_embeddings().weight.shape[0], tie_word_embeddings=True,
                    max_position_embeddings=context_length(model) or 512, pad_token_id=self.pad, **TINY_SIZES["tiny"]))
            backbone = backbone.to(device=self.device, dtype=torch.float32).eval()
            backbone.requires_grad_(self.train_backbone)
            hidden = backbone.get_input_embeddings().weight.shape[1]
            self.critic = DoubleCritic(backbone, hidden, self.pad, context_length(backbone)).to(self.device).eval()
        self.target = copy.deepcopy(self.critic).requires_grad_(False)  # the authors' soft_update(tau=1) at start
        self.learned = [name for name, p in self.critic.named_parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW([p for p in self.critic.parameters() if p.requires_grad], lr=self.lr,
                                           weight_decay=0.0)
        self.sample_rng = torch.Generator().manual_seed(seed)
        self.action_rng = torch.Generator(device=self.device).manual_seed(seed + 1)

    # -- the hooks ----------------------------------------------------------------------------
    def prepare(self, batch) -> dict[str, float]:
        """Add the batch's turns to the buffer, then `critic_steps` critic steps (see the module docstring)."""
        self.buffer.add(self.transitions(batch))
        draws = [self.buffer[i] for i in self.buffer.sample(self.critic_steps * self.critic_batch, self.sample_rng)]
        fresh = self.policy_actions([t.state for t in draws])
        totals: dict[str, float] = {}
        for k in range(self.critic_steps):
            part = slice(k * self.critic_batch, (k + 1) * self.critic_batch)
            for key, value in self.critic_step(draws[part], fresh[part]).items():
                totals[key] = totals.get(key, 0.0) + value / self.critic_steps
        return {**{f"critic/{k}": v for k, v in totals.items()}, "critic/replay_size": float(len(self.buffer))}

    @torch.no_grad()
    def baseline(self, batch) -> torch.Tensor:
        """[B]: min(Q_1, Q_2)(s_t, a_t) - min(V_1, V_2)(s_t) of each row under the current critic."""
        states, actions = _row_states(batch), _row_actions(batch)
        parts = []
        for start in range(0, len(states), self.critic_batch):
            part = slice(start, start + self.critic_batch)
            parts.append(critic_advantage(*self.critic(states[part], actions[part], self.device)))
        return torch.cat(parts).to(batch.rewards.device) if parts else batch.rewards.new_zeros(0)

    def state_dict(self) -> dict:
        return {"critic": {k: v.detach().clone() for k, v in self.critic.state_dict().items()},
                "target": {k: v.detach().clone() for k, v in self.target.state_dict().items()},
                "optimizer": copy.deepcopy(self.optimizer.state_dict()), "buffer": self.buffer.state_dict(),
                "sample_rng": self.sample_rng.get_state(), "action_rng": self.action_rng.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.critic.load_state_dict(state["critic"])
        self.target.load_state_dict(state["target"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.buffer.load_state_dict(state["buffer"])
        self.sample_rng.set_state(state["sample_rng"])
        self.action_rng.set_state(state["action_rng"])

    # -- the pieces ---------------------------------------------------------------------------
    def transitions(self, batch) -> list[Transition]:
        """The batch's rows as transitions (a single-turn batch: each row a one-step episode, r = its reward)."""
        if batch.episode_ids is None:
            rewards, next_row = batch.rewards, torch.full((len(batch),), -1, dtype=torch.long)
        else:
            rewards, next_row, _ = episode_transitions(batch.episode_ids, batch.turn_index, batch.turn_rewards,
                                                       batch.episode_rewards)
        states, actions = _row_states(batch), _row_actions(batch)
        return [Transition.of(states[i], actions[i], r, states[n] if n >= 0 else [], n < 0)
                for i, (r, n) in enumerate(zip(rewards.tolist(), next_row.tolist()))]

    def policy_actions(self, states: list[list[int]]) -> list[list[int]]:
        """One action of the current policy for each state (no gradient), at most as long as the longest action in
        the buffer (the rollouts' budget, which the critic does not see, bounds every stored action)."""
        from unipo.rollout import generate

        was_training = self.policy.training
        self.policy.eval()
        try:
            actions = []
            for start in range(0, len(states), self.critic_batch):
                gen = generate(self.policy, states[start:start + self.critic_batch], group_size=1,
                               max_new_tokens=self.buffer.longest_action(), eos_token_id=self.eos,
                               pad_token_id=self.pad, temperature=self.temperature, generator=self.action_rng)
                lengths = gen.completion_mask.sum(1).tolist()
                actions += [row[:n] for row, n in zip(gen.completion_ids.tolist(), lengths)]
        finally:
            self.policy.train(was_training)
        return actions

    def critic_step(self, transitions: list[Transition], fresh: list[list[int]]) -> dict[str, float]:
        """One gradient step of the twin Q and V heads (and the encoder), then the target's soft update."""
        states = [t.state for t in transitions]
        rewards = torch.tensor([t.reward for t in transitions], device=self.device)
        done = torch.tensor([t.done for t in transitions], device=self.device)
        with torch.no_grad():
            next_v1, next_v2 = torch.zeros_like(rewards), torch.zeros_like(rewards)
            live = (~done).nonzero().squeeze(1)
            if len(live):  # a terminal s' is never read (its value is multiplied by 0)
                values = self.target.values([transitions[i].next_state for i in live.tolist()], self.device)
                next_v1[live], next_v2[live] = values
            y1, y2 = td_targets(rewards, done, next_v1, self.gamma), td_targets(rewards, done, next_v2, self.gamma)
            z1, z2, _, _ = self.target(states, fresh, self.device)
        q1, q2, v1, v2 = self.critic(states, [t.action for t in transitions], self.device)
        loss = critic_loss((q1, q2), (v1, v2), (y1, y2), (z1, z2))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        learned = [p for p in self.critic.parameters() if p.requires_grad]
        grad_norm = torch.nn.utils.clip_grad_norm_(learned, self.max_grad_norm)
        self.optimizer.step()
        online = dict(self.critic.named_parameters())
        target = dict(self.target.named_parameters())
        soft_update_target([target[n] for n in self.learned], [online[n] for n in self.learned], self.tau)
        q1, q2, v1, v2 = q1.detach(), q2.detach(), v1.detach(), v2.detach()
        return {"loss": float(loss.detach()), "q_mean": float(double_min(q1, q2).mean()),
                "v_mean": float(double_min(v1, v2).mean()), "target_mean": float((y1 + y2).mean() / 2),
                "td_error": float(((q1 - y1).abs() + (q2 - y2).abs()).mean() / 2), "grad_norm": float(grad_norm)}


def _row_states(batch) -> list[list[int]]:
    return [ids[mask.bool()].tolist() for ids, mask in zip(batch.prompt_ids, batch.prompt_mask)]


def _row_actions(batch) -> list[list[int]]:
    return [ids[mask.bool()].tolist() for ids, mask in zip(batch.completion_ids, batch.completion_mask)]
