"""A Bradley–Terry reward model: a causal LM backbone with a scalar head, trained on preference pairs.

Model. r(x, y) = w·h + b, where h is the backbone's final hidden state (after its last norm) at the last
non-pad token of [prompt ids | answer ids]. Prompt and answer are encoded exactly as for the policy
(`unipo.pairs.encode_prompt` / `encode_answer`: a plain answer ends with EOS), so the score is read at the
EOS and has seen the whole answer.

Training. Bradley–Terry: P(y_w ≻ y_l | x) = σ(r(x, y_w) − r(x, y_l)); `train_reward_model` minimises the
mean −log σ(r_w − r_l) over minibatches of pairs with AdamW (a ranked list contributes its best and worst
answer). The scores have no fixed offset (only differences are trained); `RewardModelScorer` returns them raw,
and `prefer(prompt, a, b)` gives the model's P(a ≻ b), the preference oracle form.

Folder (`save_reward_model` / `load_reward_model`): `backbone/` (the LM and tokenizer via
`unipo.models.save_model`, safetensors), `head.safetensors` (weight [1, H], bias [1]) and `reward_model.json`
(format, version, hidden size). No pickle anywhere. A folder that is not one raises RewardModelError, one line.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from unipo.lean_decoder import positions_from_mask
from unipo.models import ModelSourceError, load_model, save_model
from unipo.pairs import PairDataError, PreferencePair, Text, encode_answer, encode_prompt
from unipo.rollout import pad_sequences

FORMAT, VERSION = "unipo.reward_model", 1
CONFIG_FILE, HEAD_FILE, BACKBONE_DIR = "reward_model.json", "head.safetensors", "backbone"


class RewardModelError(ValueError):
    """A reward-model folder that cannot be loaded (one line naming the folder and what is wrong)."""


class RewardModel(nn.Module):
    """`backbone` (a Hugging Face causal LM, peft-wrapped or not) + a linear head [H -> 1].

    The head is drawn from N(0, 1/H) with `seed` (weight) and zero bias, so an untrained model already ranks
    answers by a random direction of the hidden state rather than tying them all.
    """

    def __init__(self, backbone: nn.Module, *, seed: int = 0) -> None:
        super().__init__()
        self.backbone = backbone
        hidden = backbone.get_output_embeddings().weight.shape[1]
        self.head = nn.Linear(hidden, 1)
        with torch.random.fork_rng(devices=[]):  # never perturb the caller's RNG stream
            torch.manual_seed(seed)
            nn.init.normal_(self.head.weight, std=1.0 / math.sqrt(hidden))
        nn.init.zeros_(self.head.bias)
        self.head.to(next(backbone.parameters()).device)

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Scores [N] of rows `input_ids` [N, L] (left or right padded; `attention_mask` 1 on tokens)."""
        if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
            raise ValueError(f"input_ids [N, L] and attention_mask must match, got {list(input_ids.shape)} and "
                             f"{list(attention_mask.shape)}")
        if not bool(attention_mask.bool().any(dim=1).all()):
            raise ValueError("every row needs at least one token (attention_mask has an all-zero row)")
        hidden = self.backbone.get_decoder()(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=positions_from_mask(attention_mask),
            use_cache=False).last_hidden_state  # [N, L, H], after the final norm
        # last non-pad position of each row: argmax of mask·(1..L) (works for either padding side)
        columns = torch.arange(1, input_ids.shape[1] + 1, device=input_ids.device)
        last = (attention_mask.long() * columns).argmax(dim=1)
        read = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # [N, H]
        return self.head(read.to(self.head.weight.dtype)).squeeze(-1)


# ------------------------------------------------------------------------------------------------ encoding


def encode_rows(tokenizer, prompts: Sequence[Text], answers: Sequence[Text], *, sources: Sequence[str] | None = None,
                device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """[prompt ids | answer ids] per row, right-padded: `ids` [N, L] and `mask` [N, L]."""
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    if not prompts:
        raise ValueError("no rows to score")
    sources = sources or [f"row {i}" for i in range(len(prompts))]
    rows = [encode_prompt(tokenizer, p, where=w) + encode_answer(tokenizer, p, a, where=w)
            for p, a, w in zip(prompts, answers, sources)]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return pad_sequences(rows, pad_id, left=False, device=device)


def _pair_rows(pairs: Sequence[PreferencePair]) -> tuple[list[Text], list[Text], list[str]]:
    """Interleaved rows (chosen_i, rejected_i) of `pairs`: prompts, answers, sources."""
    prompts = [p.prompt for p in pairs for _ in range(2)]
    answers = [a for p in pairs for a in (p.chosen, p.rejected)]
    return prompts, answers, [p.source for p in pairs for _ in range(2)]


def score_texts(rm: RewardModel, tokenizer, prompts: Sequence[Text], answers: Sequence[Text], *,
                batch_size: int = 32) -> torch.Tensor:
    """r(x, y) for each (prompt, answer), float32 [N] on the CPU, in `batch_size` rows per forward (no grad)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    was_training = rm.training
    rm.eval()
    out = []
    try:
        with torch.no_grad():
            for start in range(0, len(prompts), batch_size):
                ids, mask = encode_rows(tokenizer, prompts[start:start + batch_size],
                                        answers[start:start + batch_size], device=rm.device)
                out.append(rm(ids, mask).float().cpu())
    finally:
        rm.train(was_training)
    return torch.cat(out) if out else torch.zeros(0)


# ------------------------------------------------------------------------------------------------ training


def bradley_terry_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> torch.Tensor:
    """Mean over pairs of −log σ(r_w − r_l), the negative log-likelihood of the Bradley–Terry model."""
    return -F.logsigmoid(chosen_scores - rejected_scores).mean()


def train_reward_model(
    rm: RewardModel,
    tokenizer,
    pairs: Sequence[PreferencePair],
    *,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    weight_decay: float = 0.0,
    max_grad_norm: float | None = 1.0,
) -> dict[str, Any]:
    """Train `rm` in place for `steps` AdamW steps of `batch_size` pairs each on the Bradley–Terry loss.

    Pairs are visited in seeded random order, epoch after epoch (a new permutation each pass), so a run is
    deterministic for (rm, pairs, seed). Gradients are clipped to `max_grad_norm` (None: no clipping).
    Returns {"rm/loss": mean loss of the last min(10, steps) steps, "rm/loss_first": loss of step 1,
    "rm/accuracy": fraction of last-step pairs with r_w > r_l, "rm/margin": their mean r_w − r_l,
    "rm/steps", "losses": the loss of every step}. `rm` is left in eval mode.
    """
    if not isinstance(rm, RewardModel):
        raise TypeError(f"train_reward_model trains a RewardModel (wrap the LM: RewardModel(model)), got "
                        f"{type(rm).__name__}")
    for name, value in (("steps", steps), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    if not pairs:
        raise ValueError("train_reward_model needs at least one pair")
    prompts, answers, sources = _pair_rows(pairs)
    encoded = [encode_prompt(tokenizer, p, where=w) + encode_answer(tokenizer, p, a, where=w)
               for p, a, w in zip(prompts, answers, sources)]  # encoded once, rows 2i / 2i+1
    for index in range(len(pairs)):
        if encoded[2 * index] == encoded[2 * index + 1]:  # e.g. characters the tokenizer maps to one <unk>
            raise PairDataError(f"{pairs[index].source}: chosen and rejected encode to the same token ids")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW([p for p in rm.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)
    order: list[int] = []
    losses: list[float] = []
    rm.train()
    for _ in range(steps):
        while len(order) < batch_size:  # refill with the next epoch's permutation
            order += torch.randperm(len(pairs), generator=generator).tolist()
        batch, order = order[:batch_size], order[batch_size:]
        rows = [encoded[2 * i + k] for i in batch for k in (0, 1)]
        ids, mask = pad_sequences(rows, pad_id, left=False, device=rm.device)
        scores = rm(ids, mask).view(len(batch), 2)
        loss = bradley_terry_loss(scores[:, 0], scores[:, 1])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(rm.parameters(), max_grad_norm)
        optimizer.step()
        losses.append(float(loss.detach()))
        if not math.isfinite(losses[-1]):
            raise FloatingPointError(f"reward-model loss is {losses[-1]} at step {len(losses)}: lower lr")
    rm.eval()
    margin = (scores[:, 0] - scores[:, 1]).detach()
    tail = losses[-min(10, steps):]
    return {"rm/loss": sum(tail) / len(tail), "rm/loss_first": losses[0],
            "rm/accuracy": float((margin > 0).float().mean()), "rm/margin": float(margin.mean()),
            "rm/steps": steps, "losses": losses}


def pairwise_accuracy(rm: RewardModel, tokenizer, pairs: Sequence[PreferencePair], *, batch_size: int = 32) -> float:
    """Fraction of `pairs` the model orders right, r(x, chosen) > r(x, rejected); an exact tie counts ½
    (a model that ties everything scores 0.5, chance, not 0)."""
    if not pairs:
        raise ValueError("pairwise_accuracy needs at least one pair")
    prompts, answers, _ = _pair_rows(pairs)
    scores = score_texts(rm, tokenizer, prompts, answers, batch_size=batch_size).view(len(pairs), 2)
    wins = (scores[:, 0] > scores[:, 1]).float() + 0.5 * (scores[:, 0] == scores[:, 1]).float()
    return float(wins.mean())


# ------------------------------------------------------------------------------------------------- folders


def save_reward_model(rm: RewardModel, tokenizer, path: str | os.PathLike[str]) -> None:
    """Write `rm` to the folder `path` (created): backbone/, head.safetensors, reward_model.json."""
    from safetensors.torch import save_file

    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    save_model(rm.backbone, tokenizer, folder / BACKBONE_DIR)
    head = {"weight": rm.head.weight.detach().cpu().contiguous(), "bias": rm.head.bias.detach().cpu().contiguous()}
    save_file(head, os.fspath(folder / HEAD_FILE))
    config = {"format": FORMAT, "version": VERSION, "hidden_size": int(rm.head.weight.shape[1]),
              "backbone": BACKBONE_DIR, "head": HEAD_FILE, "read_at": "last non-pad token of [prompt | answer]",
              "answer_encoding": "unipo.pairs.encode_prompt + encode_answer (plain answers end with EOS)"}
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")


def load_reward_model(path: str | os.PathLike[str], *, device: str | torch.device = "cpu"
                      ) -> tuple[RewardModel, Any]:
    """(RewardModel in eval mode, tokenizer) from a folder written by `save_reward_model`; RewardModelError
    (one line) when the folder is missing, incomplete, of another format or inconsistent."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(os.path.expanduser(os.fspath(path)))
    where = f"reward model folder {os.fspath(path)!r}"
    if not folder.is_dir():
        raise RewardModelError(f"{where}: no such folder")
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise RewardModelError(f"{where}: has no {CONFIG_FILE} (not written by save_reward_model)")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise RewardModelError(f"{where}: {CONFIG_FILE} is not valid JSON ({error})") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise RewardModelError(f"{where}: {CONFIG_FILE} is not a unipo reward-model config")
    if config.get("version") != VERSION:
        raise RewardModelError(f"{where}: format version {config.get('version')!r}, this unipo reads {VERSION}")
    head_path = folder / HEAD_FILE
    if not head_path.is_file():
        raise RewardModelError(f"{where}: has no {HEAD_FILE}")
    try:
        head = load_file(os.fspath(head_path))
    except (SafetensorError, OSError) as error:
        raise RewardModelError(f"{where}: {HEAD_FILE} cannot be read ({error})") from None
    hidden = config.get("hidden_size")
    shapes = {k: list(v.shape) for k, v in head.items()}
    if shapes != {"weight": [1, hidden], "bias": [1]}:
        raise RewardModelError(f"{where}: {HEAD_FILE} holds {shapes}, expected weight [1, {hidden}] and bias [1]")
    if not (folder / BACKBONE_DIR).is_dir():
        raise RewardModelError(f"{where}: has no {BACKBONE_DIR}/ folder")
    try:
        backbone, tokenizer = load_model(folder / BACKBONE_DIR, device=device)
    except ModelSourceError as error:
        raise RewardModelError(f"{where}: {error}") from None
    rm = RewardModel(backbone)
    if rm.head.weight.shape[1] != hidden:
        raise RewardModelError(f"{where}: the backbone's hidden size is {rm.head.weight.shape[1]}, the head's {hidden}")
    with torch.no_grad():
        rm.head.weight.copy_(head["weight"])
        rm.head.bias.copy_(head["bias"])
    return rm.eval(), tokenizer


class RewardModelScorer:
    """A trained reward model as a reward: `scorer(prompts, completions) -> list[float]`.

    Prompts are raw task prompts (or message lists) and completions the decoded answers, both encoded as the
    policy's (`encode_prompt` / `encode_answer`; a plain completion gets EOS appended, also one that was cut
    at max_new_tokens). Scores are the model's raw r(x, y): unbounded, meaningful in differences; a caller
    that needs [0, 1] maps them itself (σ(r − baseline), a rank in the group...). `prefer(prompt, a, b)` is
    the Bradley–Terry P(a ≻ b) = σ(r(x, a) − r(x, b)).
    """

    def __init__(self, path: str | os.PathLike[str], *, device: str | torch.device = "cpu",
                 batch_size: int = 32) -> None:
        self.model, self.tokenizer = load_reward_model(path, device=device)
        self.batch_size = batch_size
        self.path = os.fspath(path)

    @classmethod
    def from_model(cls, rm: RewardModel, tokenizer, *, batch_size: int = 32) -> RewardModelScorer:
        """A scorer around a model in memory (no folder), e.g. one being trained alongside the policy."""
        scorer = cls.__new__(cls)
        scorer.model, scorer.tokenizer, scorer.batch_size, scorer.path = rm, tokenizer, batch_size, None
        return scorer

    def __call__(self, prompts: Sequence[Text], completions: Sequence[str]) -> list[float]:
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        if not prompts:
            return []
        bad = [i for i, c in enumerate(completions) if not isinstance(c, (str, tuple))]
        if bad:
            raise ValueError(f"completion {bad[0]} is a {type(completions[bad[0]]).__name__}, not text")
        return score_texts(self.model, self.tokenizer, list(prompts), list(completions),
                           batch_size=self.batch_size).tolist()

    def prefer(self, prompt: Text, a: str, b: str) -> float:
        """P(a ≻ b | prompt) = σ(r(x, a) − r(x, b)) under the model."""
        r_a, r_b = self([prompt, prompt], [a, b])
        return float(torch.sigmoid(torch.tensor(r_a - r_b, dtype=torch.float64)))  # no overflow for any gap
