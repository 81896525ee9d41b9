"""The policy update: one generation batch -> `epochs` passes of `mini_batches` optimizer steps.

    for each epoch:
        shuffle the rows, split them into `mini_batches` parts
        for each part:  zero grads; for each micro-batch: loss / part's normalisers -> backward
                        clip, then step (or skip: a non-finite or an exactly-zero gradient)

pi_old is fixed for the whole update (`old_logp`, the policy that sampled the rows), so from the
second optimizer step on the ratio pi_theta / pi_old moves off 1 and the recipe's clip, trust
region or importance weight acts. With one update per batch the ratio is exactly 1 and `old_logp`
is the current log-prob, detached.

Each mini-batch is normalised on its own (its token count, its sequence count, its rows x T_max),
as verl and TRL do, and gradient accumulation inside it stays exact: every micro-batch divides by
the mini-batch's denominator, so the micro-batch gradients sum to the mini-batch's gradient.

In a multi-process run (`unipo.distributed`) the batch and its mini-batches are global: every rank
computes the same denominators from the whole mini-batch, runs forwards and backwards on its own rows
only, and the ranks' gradients add up to the one-process gradient of that mini-batch.

The entropy term (`recipe.entropy_coef` times the recipe's entropy regulariser, `unipo.core.entropy`) is aggregated
like the RL loss, over its tokens and with its denominators. `EntropyHistory` is EPO's running per-turn entropy,
state the trainer holds and feeds once per step (the `entropy_history` batch input).

A pairwise (preference) loss (`unipo.core.pairwise`) takes the pairwise path: rows 2j, 2j+1 of the batch are
pair j's (chosen, rejected); mini-batches shuffle whole pairs, micro-batches hold whole pairs (their size is
rounded down to an even number, at least 2), and each micro-batch's loss is its pairs' summed loss divided by
the number of pairs of the whole (global) mini-batch, so accumulation and the ranks' sum stay exact. The
reference's log-probs (`LossPlan.ref_logp`) are recomputed every step, before the update, from the current
(frozen, or moving: `recipe.reference_update`) reference; not cached across steps.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from unipo.config import TrainConfig
from unipo.core.advantages import gae_returns
from unipo.core.entropy import accumulate_turn_history, compute_entropy_term, history_per_row, turn_entropy_means
from unipo.core.hybrid import chord_phi_weights
from unipo.core.kl import kl_estimate
from unipo.core.losses import POLICY_LOSSES, aggregate, aggregation_denominator, compute_policy_loss, value_loss
from unipo.core.pairwise import is_pairwise
from unipo.distributed import Parallel
from unipo.slots import SlotChoice, entropy_choice


@dataclass(frozen=True)
class LossPlan:
    """What every update of one batch shares: per-token weights [B, T] of the RL and SFT losses (0 = not
    trained on), their masks, pi_old's log-probs and the reference's."""

    mask: torch.Tensor
    rl_tokens: torch.Tensor
    sft_tokens: torch.Tensor
    rl_mask: torch.Tensor
    sft_mask: torch.Tensor
    has_rl: bool
    has_sft: bool
    learns: bool  # any RL or SFT token, or a value head to fit
    old_logp: torch.Tensor | None  # None: one update, the ratio is exactly 1
    ref_logp: torch.Tensor | None

    def denominators(self, rows: torch.Tensor, aggregation: str, max_len: int) -> dict[str, torch.Tensor]:
        """The normalisers of one mini-batch (`rows`), shared by all its micro-batches."""
        return {"rl": aggregation_denominator(self.rl_mask[rows], aggregation, max_len=max_len),
                "sft": aggregation_denominator(self.sft_mask[rows], "token_mean"),
                "value": aggregation_denominator(self.mask[rows], "token_mean"),
                "pairs": torch.tensor(len(rows) // 2, dtype=self.mask.dtype, device=self.mask.device)}


def mini_batch_rows(n_rows: int, mini_batches: int, generator: torch.Generator | None, *,
                    unit: int = 1) -> list[torch.Tensor]:
    """Row indices of each mini-batch: a random permutation split into `mini_batches` near-equal parts (all
    rows in one part when `mini_batches` is 1), each part sorted so that a group's rows stay adjacent (the
    forward then runs their shared prompt once). `unit` = 2 (pairwise losses): rows u*k .. u*k + u - 1 move
    together, so a (chosen, rejected) pair is never split."""
    n_units = n_rows // unit
    parts = min(mini_batches, n_units)
    if parts <= 1:
        return [torch.arange(n_rows)]
    order = torch.randperm(n_units, generator=generator)
    return [(part.sort().values[:, None] * unit + torch.arange(unit)).reshape(-1)
            for part in torch.tensor_split(order, parts)]


# Metrics logged under their own name; every other one a loss function reports goes under "actor/".
_PLAIN_METRICS = ("loss", "kl", "entropy", "sft_loss", "grad_norm", "value_loss", "clip_frac")


class PolicyUpdate:
    """Runs the update of one batch for a trainer: `PolicyUpdate(...)(batch, advantages, ...)`."""

    def __init__(self, config: TrainConfig, *, forward: Callable, parameters: Callable, optimizer,
                 loss: SlotChoice, value_head, max_len: int, parallel: Parallel | None = None,
                 forward_module=None) -> None:
        self.config, self.recipe = config, config.recipe
        self.forward, self.parameters, self.optimizer = forward, parameters, optimizer
        self.loss, self.value_head, self.max_len = loss, value_head, max_len
        self.parallel = parallel or Parallel()
        self.forward_module = forward_module  # DDP's wrapper (its no_sync) in a multi-process run
        self.pairwise = is_pairwise(loss.name)  # rows come in (chosen, rejected) pairs (unipo.core.pairwise)
        self.entropy = entropy_choice(self.recipe)  # the entropy regulariser (unipo.core.entropy)

    def plan(self, batch, selection: torch.Tensor, rl_weight: torch.Tensor, sft_weight: torch.Tensor,
             old_logp: torch.Tensor | None, reference_logp: Callable[[], torch.Tensor] | None, *,
             correction: torch.Tensor | None = None) -> LossPlan:
        """`correction`: the rollout correction's per-token weights (a token it zeroes still counts in the
        normalisers, as in TRL's masked importance sampling)."""
        mask = batch.completion_mask.float()
        rl_tokens = selection * rl_weight[:, None]
        sft_tokens = mask * sft_weight[:, None]
        rl_mask, sft_mask = mask * (rl_tokens > 0), mask * (sft_tokens > 0)
        if correction is not None:
            rl_tokens = rl_tokens * correction
        has_rl, has_sft = bool(rl_mask.any()), bool(sft_mask.any())
        learns = has_rl or has_sft or self.value_head is not None
        return LossPlan(mask=mask, rl_tokens=rl_tokens, sft_tokens=sft_tokens, rl_mask=rl_mask, sft_mask=sft_mask,
                        has_rl=has_rl, has_sft=has_sft, learns=learns,
                        old_logp=old_logp,
                        ref_logp=reference_logp() if reference_logp is not None and learns else None)

    def __call__(self, batch, plan: LossPlan, advantages: torch.Tensor, inputs: dict[str, Any],
                 generator: torch.Generator | None, origin: torch.Tensor | None = None) -> tuple[dict[str, Any], bool]:
        """All updates of one batch; returns (metrics averaged over the updates, every update finite).
        `origin[i]` is the rank holding row i (all zeros in one process)."""
        if not plan.learns:
            # Selection or gating left no token to learn from: no update, and say so.
            return {"loss": 0.0, "kl": 0.0, "clip_frac": 0.0, "entropy": 0.0, "select/token_frac": 0.0,
                    "actor/updates": 0.0, "actor/skipped_updates": float(self.recipe.updates_per_batch)}, True
        r, micro, parallel = self.recipe, self.config.optim.micro_batch_size, self.parallel
        unit = 2 if self.pairwise else 1
        micro = max(unit, micro - micro % unit)  # whole pairs in every micro-batch
        if origin is None:
            origin = torch.zeros(len(batch), dtype=torch.long, device=plan.mask.device)
        totals: dict[str, torch.Tensor] = {}
        maxima: dict[str, torch.Tensor] = {}
        finite, updates, skipped, attempted = True, 0, 0, 0
        grad_norms, losses = [], []
        for _ in range(r.epochs):
            for rows in mini_batch_rows(len(batch), r.mini_batches, generator, unit=unit):
                denominators = plan.denominators(rows, r.aggregation, self.max_len)  # the whole mini-batch's
                self.optimizer.zero_grad(set_to_none=True)
                loss_total = plan.mask.new_zeros(())
                chunks = parallel.micro_batches(rows, origin, micro)
                for i, (micro_rows, real) in enumerate(chunks):
                    with parallel.sync_gradients(self.forward_module, last=i == len(chunks) - 1):
                        loss, metrics = self.micro_batch_loss(batch, micro_rows, plan, denominators, advantages,
                                                              inputs)
                        (loss * (parallel.loss_scale if real else 0.0)).backward()
                    # a padding chunk (another rank's row, run so that the collectives match) counts 0
                    share = len(micro_rows) / len(rows) if real else 0.0
                    if real:
                        loss_total = loss_total + loss.detach()  # already normalised by the whole mini-batch
                    for k, v in metrics.items():
                        if k.endswith("_max"):  # a maximum over the update, not a mean
                            maxima[k] = torch.maximum(maxima[k], v.detach()) if k in maxima else v.detach()
                        else:
                            totals[k] = totals.get(k, 0.0) + share * v.detach()
                parallel.average_gradients([p for p in self.value_head.parameters()] if self.value_head else [])
                loss_total = parallel.all_reduce_(loss_total)  # each rank's share of the mini-batch's loss
                losses.append(loss_total)
                grad_norm, outcome = self.optimizer_step(loss_total)
                grad_norms.append(grad_norm)
                finite = finite and outcome != "non_finite"
                updates += outcome == "stepped"
                skipped += outcome == "no_signal"
                attempted += 1
        totals = {k: parallel.all_reduce_(torch.as_tensor(totals[k]).clone()) / attempted for k in sorted(totals)}
        maxima = {k: parallel.all_reduce_(maxima[k].clone(), "max") for k in sorted(maxima)}
        totals = {**totals, "loss": torch.stack(losses).mean(), **maxima}
        metrics = {(k if k in _PLAIN_METRICS or k.startswith("pref/") else f"actor/{k}"): v for k, v in totals.items()}
        metrics.setdefault("kl", 0.0)
        metrics.setdefault("clip_frac", 0.0)
        metrics["grad_norm"] = torch.stack([g.float() for g in grad_norms]).mean()
        metrics["select/token_frac"] = plan.rl_mask.sum() / plan.mask.sum().clamp(min=1)
        metrics["actor/updates"] = float(updates)
        metrics["actor/skipped_updates"] = float(skipped)
        return metrics, finite

    def micro_batch_loss(self, batch, rows: torch.Tensor, plan: LossPlan, denominators: dict[str, torch.Tensor],
                         advantages: torch.Tensor, inputs: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        """The loss of `rows`, divided by their mini-batch's normalisers, and its detached metrics."""
        r, max_len = self.recipe, self.max_len
        if self.pairwise and len(rows) % 2:
            # a padding chunk of one row (another rank's mini-batch is larger; its loss counts 0): pair it with itself
            rows = rows.repeat_interleave(2)
        out = self.forward(rows, need_entropy=True, need_hidden=self.value_head is not None)  # entropy: logged
        logp = out.logp.float()
        old = plan.old_logp[rows] if plan.old_logp is not None else logp.detach()
        rl_mask, mask = plan.rl_mask[rows], plan.mask[rows]
        loss = logp.new_zeros(())
        metrics: dict[str, torch.Tensor] = {}
        if plan.has_rl and self.pairwise:
            # Pairwise: rows 2j, 2j+1 are a (chosen, rejected) pair of one group; per-row log-probs over the whole
            # completion; the pairs' summed loss over the whole mini-batch's pair count.
            if not bool((batch.group_ids[rows][0::2] == batch.group_ids[rows][1::2]).all()):
                raise RuntimeError("a micro-batch split a (chosen, rejected) pair")  # a bug, never the user's
            declared = {"ref_logp": None if plan.ref_logp is None else plan.ref_logp[rows],
                        "rewards": _rows(inputs["rewards"], rows)}
            pair_sum, metrics = POLICY_LOSSES.get(r.loss)(logp, old, advantages[rows], mask, **r.loss_params,
                                                          **declared)
            loss = loss + pair_sum / denominators["pairs"].clamp(min=1)
        elif plan.has_rl:
            # A loss reads the current policy's entropy (detached) and the reference of these rows; every
            # other declared input is a batch input restricted to the rows.
            local = {"entropy": out.entropy.detach(),
                     "ref_logp": None if plan.ref_logp is None else plan.ref_logp[rows]}
            declared = {k: local[k] if k in local else _rows(inputs[k], rows) for k in self.loss.inputs}
            rl_loss, metrics = compute_policy_loss(
                r.loss, logp, old, advantages[rows], rl_mask, r.aggregation, weights=plan.rl_tokens[rows],
                denominator=denominators["rl"], max_len=max_len, check_finite=False,  # optimizer_step's guard
                **{**r.loss_params, **declared})
            loss = loss + rl_loss
        if plan.has_sft:
            phi = chord_phi_weights(logp) if r.sft_weighting == "phi" else 1.0  # CHORD-phi: p(1-p) per token
            sft_loss, _ = compute_policy_loss("sft", logp, old, torch.ones_like(logp[:, 0]), plan.sft_mask[rows],
                                              "token_mean", weights=plan.sft_tokens[rows] * phi,
                                              denominator=denominators["sft"], check_finite=False)
            loss = loss + sft_loss
            metrics["sft_loss"] = sft_loss.detach()
        if plan.ref_logp is not None and r.kl_coef:
            kl = aggregate(kl_estimate(logp, plan.ref_logp[rows], r.kl_estimator, check_finite=False), rl_mask,
                           r.aggregation, denominator=denominators["rl"], max_len=max_len)
            loss = loss + r.kl_coef * kl
            metrics["kl"] = kl.detach()
        if r.entropy_coef:
            # the entropy slot: `bonus` is agg(H); a regulariser reads its declared inputs for these rows
            declared = {k: _rows(inputs[k], rows) for k in self.entropy.inputs}
            term, entropy_metrics = compute_entropy_term(
                self.entropy.name, out.entropy, rl_mask, r.aggregation, denominator=denominators["rl"],
                max_len=max_len, **self.entropy.params, **declared)
            loss = loss - r.entropy_coef * term
            metrics.update({k: v.detach() for k, v in entropy_metrics.items()})
        if self.value_head is not None:
            old_values = inputs["values"][rows]
            returns = gae_returns(advantages[rows], old_values)
            v_loss, v_metrics = value_loss(self.value_head(out.hidden), old_values, returns, mask)
            v_loss = aggregate(v_loss, mask, "token_mean", denominator=denominators["value"])
            loss = loss + r.value_coef * v_loss
            metrics.update({"value_loss": v_loss.detach(), **v_metrics})
        on_policy_tokens = mask * (~batch.off_policy[rows])[:, None]
        metrics["entropy"] = (out.entropy.detach() * on_policy_tokens).sum() / on_policy_tokens.sum().clamp(min=1)
        return loss, metrics

    def optimizer_step(self, loss: torch.Tensor) -> tuple[torch.Tensor, str]:
        """Clip and step. Not stepped: a non-finite loss or gradient ("non_finite": the gradient is dropped),
        or an exactly-zero gradient ("no_signal": no token carried signal, and AdamW's momentum and weight
        decay would otherwise still move every weight)."""
        parameters = list(self.parameters())
        grad_norm = torch.nn.utils.clip_grad_norm_(parameters, self.config.optim.grad_clip)
        if hasattr(grad_norm, "full_tensor"):  # FSDP: the norm over every rank's shards
            grad_norm = grad_norm.full_tensor()
        if not (torch.isfinite(grad_norm) and torch.isfinite(loss)):
            self.optimizer.zero_grad(set_to_none=True)
            return grad_norm, "non_finite"
        if grad_norm == 0:
            self.optimizer.zero_grad(set_to_none=True)
            return grad_norm, "no_signal"
        self.optimizer.step()
        return grad_norm, "stepped"


class EntropyHistory:
    """EPO's historical entropy (`unipo.core.entropy`): for each turn index k, the mean over the training steps so
    far of each step's token-mean pi_old entropy at turn k (the authors' running average, this step included).

    The trainer feeds it once per step, before the update, with pi_old's entropy of the step's whole (global)
    batch, so it is the same on every rank and whatever the micro-batching; `observe` returns H̄ of each row (the
    `entropy_history` batch input). The state is float64 per-turn sums and step counts, saved in checkpoints."""

    def __init__(self) -> None:
        self.sums = torch.zeros(0, dtype=torch.float64)
        self.counts = torch.zeros(0, dtype=torch.float64)

    def observe(self, entropy: torch.Tensor, mask: torch.Tensor, turn_index: torch.Tensor) -> torch.Tensor:
        """Add one step (`mask`: its on-policy tokens) and return [B] H̄ of each row's turn (NaN: none yet)."""
        means, present = turn_entropy_means(entropy.double(), mask.double(), turn_index)
        self.sums, self.counts = accumulate_turn_history(self.sums, self.counts, means.cpu(), present.cpu())
        return history_per_row(self.sums, self.counts, turn_index.cpu()).to(entropy.device, torch.float32)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"sums": self.sums.clone(), "counts": self.counts.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.sums = state["sums"].to("cpu", torch.float64).clone()
        self.counts = state["counts"].to("cpu", torch.float64).clone()


def _rows(value: Any, rows: torch.Tensor) -> Any:
    """`value` restricted to `rows` when it is per-row (a tensor), else as is (step counts)."""
    return value[rows] if isinstance(value, torch.Tensor) else value
