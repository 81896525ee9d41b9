"""The trainer: one loop for every recipe.

    collect (rollouts, expert rows, rewards) -> advantages -> mixer weights -> selection
    -> K epochs of micro-batched forward/backward with gradient accumulation -> AdamW step
    -> log, evaluate, checkpoint

Every algorithmic choice is a registry look-up by the recipe's slot names; the loop names no
algorithm. Tensors a slot's function asks for by parameter name (`off_policy`, `entropy`,
`answer_ids`, ...) are handed to it from the batch: see `_batch_inputs`.
"""

from __future__ import annotations

import copy
import inspect
import math
import random
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from unipo.collect import RolloutBatch, RolloutCollector
from unipo.config import TrainConfig
from unipo.core.advantages import ADVANTAGE_ESTIMATORS, compute_advantages, gae_returns
from unipo.core.kl import kl_estimate
from unipo.core.losses import POLICY_LOSSES, aggregate, aggregation_denominator, compute_policy_loss, value_loss
from unipo.core.selection import SELECTIONS, compute_selection
from unipo.critics import PromptValueTracker, ValueHead
from unipo.mixing import MIXERS
from unipo.models import load_model, pick_device
from unipo.rollout import policy_logprobs
from unipo.runs import RunFolder
from unipo.tasks.base import get_task


def _accepted(fn: Callable) -> set[str]:
    """Names of the keyword parameters a registered function declares."""
    return set(inspect.signature(fn).parameters)


def _batch_inputs(fn: Callable, available: dict[str, Any]) -> dict[str, Any]:
    """The batch tensors `fn` asks for by name (and only those)."""
    wanted = _accepted(fn)
    return {k: v for k, v in available.items() if k in wanted}


@dataclass(frozen=True)
class _LossPlan:
    """What every micro-batch and epoch of one update shares: per-token weights [B, T] of the RL and SFT
    losses (0 = not trained on), their masks, and the full-batch normalisers that make micro-batched
    gradients sum to the full batch's."""

    mask: torch.Tensor
    rl_tokens: torch.Tensor
    sft_tokens: torch.Tensor
    rl_mask: torch.Tensor
    sft_mask: torch.Tensor
    rl_den: torch.Tensor
    sft_den: torch.Tensor
    value_den: torch.Tensor
    has_rl: bool
    has_sft: bool
    learns: bool  # any RL or SFT token, or a value head to fit
    ref_logp: torch.Tensor | None


# Metrics logged under their own name; every other one a loss function reports goes under "actor/".
_PLAIN_METRICS = ("loss", "kl", "entropy", "sft_loss", "grad_norm", "value_loss", "clip_frac")


def _update_metrics(totals: dict[str, torch.Tensor], epochs: int, token_frac: torch.Tensor) -> dict[str, Any]:
    """Per-epoch means of the accumulated update metrics (the gradient norm: the last epoch's)."""
    named = {(k if k in _PLAIN_METRICS else f"actor/{k}"): v if k == "grad_norm" else v / epochs
             for k, v in totals.items()}
    named.setdefault("kl", 0.0)
    named.setdefault("clip_frac", 0.0)
    named["select/token_frac"] = token_frac
    return named


@dataclass
class StepResult:
    metrics: dict[str, float]
    skipped: bool


class Trainer:
    def __init__(self, config: TrainConfig, *, model=None, tokenizer=None, run: RunFolder | None = None,
                 progress: bool = True) -> None:
        self.config, self.recipe, self.progress = config, config.recipe, progress
        self._validate_names()
        random.seed(config.seed)
        torch.manual_seed(config.seed)
        self.device = pick_device(config.device)
        if model is None:
            model, tokenizer = load_model(config.model, device=self.device, lora=config.lora)
        self.model, self.tokenizer = model.to(self.device), tokenizer
        self.task = get_task(config.task)
        self.max_new_tokens = config.rollout.max_new_tokens or self.task.max_new_tokens
        self.reference = self._frozen_copy(model) if self.recipe.needs_reference else None
        self.value_head = (ValueHead(model.config.hidden_size).to(self.device)
                           if self.recipe.value_coef > 0 else None)
        self.tracker = PromptValueTracker()
        params = [p for p in self.trainable_modules_parameters()]
        # fused: one kernel for all parameters (the same update, ~6x faster than the per-tensor loop on a CPU)
        self.optimizer = torch.optim.AdamW(params, lr=config.optim.lr, betas=config.optim.betas,
                                           weight_decay=config.optim.weight_decay,
                                           fused=self.device.type in ("cpu", "cuda"))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.generator = torch.Generator(device=self.device).manual_seed(config.seed)
        self.collector = RolloutCollector(self.model, tokenizer, self.task, self.recipe, config.rollout,
                                          max_new_tokens=self.max_new_tokens, device=self.device,
                                          generator=self.generator)
        self.run = run
        self.step = 0
        self.bad_steps = 0
        self.history: list[dict[str, float]] = []

    # -- set-up ----------------------------------------------------------------------------
    def trainable_modules_parameters(self):
        yield from (p for p in self.model.parameters() if p.requires_grad)
        if self.value_head is not None:
            yield from self.value_head.parameters()

    def _validate_names(self) -> None:
        r = self.recipe
        ADVANTAGE_ESTIMATORS.get(r.advantage)
        POLICY_LOSSES.get(r.loss)
        MIXERS.get(r.mixer)
        for name in r.selection:
            SELECTIONS.get(name)
        aggregation_denominator(torch.ones(1, 1), r.aggregation)  # raises on an unknown mode

    @staticmethod
    def _frozen_copy(model):
        ref = copy.deepcopy(model).eval()
        for p in ref.parameters():
            p.requires_grad_(False)
        return ref

    def _lr_factor(self, step: int) -> float:
        o, total = self.config.optim, max(1, self.config.steps)
        if o.warmup_steps and step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        progress = min(1.0, (step - o.warmup_steps) / max(1, total - o.warmup_steps))
        if o.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * progress))
        if o.schedule == "linear":
            return 1.0 - progress
        return 1.0

    def autocast(self):
        if not self.config.bf16:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    # -- one step --------------------------------------------------------------------------
    def train_step(self) -> StepResult:
        started = time.perf_counter()
        self.model.eval()
        with self.autocast():
            batch, rollout_stats = self.collector.collect(seed=self.config.seed, step=self.step)
        generated = time.perf_counter()
        if len(batch) == 0:
            self.step += 1
            return StepResult({"step": self.step, **rollout_stats, "skipped": 1.0}, skipped=True)

        self.model.train()
        behaviour = self._behaviour_pass(batch)
        advantages = self._advantages(batch, behaviour)
        rl_weight, sft_weight, mix_metrics = self._mix(batch)
        selection = self._selection(batch, advantages, behaviour)
        update_metrics, finite = self._update(batch, advantages, selection, rl_weight, sft_weight, behaviour)
        if "baseline" in _accepted(ADVANTAGE_ESTIMATORS.get(self.recipe.advantage)):
            on = (~batch.off_policy).nonzero().squeeze(1).tolist()
            self.tracker.update([batch.prompts[i] for i in on], batch.rewards[on],
                                float(update_metrics.get("actor/approx_kl", 0.0)))
        done = time.perf_counter()

        self.step += 1
        on = ~batch.off_policy
        has_rollouts = bool(on.any())  # an SFT step has none: its rollout statistics are null

        def over_rollouts(values: torch.Tensor):
            return values[on].float().mean() if has_rollouts else None

        metrics = {
            "step": self.step,
            "reward_mean": over_rollouts(batch.rewards),
            "accuracy": over_rollouts(batch.correct),
            "response_len_mean": over_rollouts(batch.completion_mask.sum(1)),
            "tokens_per_s": batch.completion_mask.sum() / (done - started),  # all completion tokens trained on
            "step_seconds": done - started,
            "generation_seconds": generated - started,
            "update_seconds": done - generated,
            "lr": self.scheduler.get_last_lr()[0],
            "rollout/reward_errors": batch.reward_errors,
            "rollout/truncated_frac": over_rollouts(batch.truncated),
            **rollout_stats, **mix_metrics, **update_metrics,
        }
        metrics = {k: None if v is None else float(v) for k, v in metrics.items()}
        if not finite:
            self.bad_steps += 1
            metrics["skipped"] = 1.0
        else:
            self.bad_steps = 0
        return StepResult(metrics, skipped=not finite)

    # -- slots -----------------------------------------------------------------------------
    def _available(self, batch: RolloutBatch, behaviour: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Batch tensors a slot function may ask for by parameter name."""
        lengths = batch.completion_mask.sum(1)
        available = {
            "mask": batch.completion_mask.float(),
            "token_ids": batch.completion_ids,
            "off_policy": batch.off_policy,
            "truncated": batch.truncated,
            "answer_ids": batch.answer_ids,
            "lengths": lengths,
            # Stratified GRPO's strata: trajectories of like structure. Our analogue is the
            # response length in buckets of 4 tokens (the paper: number of search calls).
            "strata": torch.div(lengths, 4, rounding_mode="floor"),
            "step": self.step,
            "total_steps": self.config.steps,
            **behaviour,
        }
        if "baseline" in _accepted(ADVANTAGE_ESTIMATORS.get(self.recipe.advantage)):
            available["baseline"] = self.tracker.baseline(batch.prompts, self.device)  # SPO's tracker
        if "logp" in behaviour:
            available["expert_logp"] = _expert_row_values(behaviour["logp"], batch)
        return available

    def _needs_behaviour(self) -> set[str]:
        """What the no-grad pass over the batch must produce (old log-probs, entropy)."""
        r, needs = self.recipe, set()
        advantage_inputs = _accepted(ADVANTAGE_ESTIMATORS.get(r.advantage))
        if r.epochs > 1 or advantage_inputs & {"logp", "expert_logp"}:
            needs.add("logp")  # also: the ratio's denominator must stay fixed across epochs
        if r.selection:
            needs.add("entropy")
        if self.value_head is not None:
            needs.add("values")
        return needs

    @torch.no_grad()
    def _behaviour_pass(self, batch: RolloutBatch) -> dict[str, torch.Tensor]:
        needs = self._needs_behaviour()
        if not needs:
            return {}
        out = self._forward(self.model, batch, slice(None), need_entropy="entropy" in needs,
                            need_hidden="values" in needs)
        result = {"logp": out.logp}
        if "entropy" in needs:
            result["entropy"] = out.entropy
        if "values" in needs:
            result["values"] = self.value_head(out.hidden) * batch.completion_mask
        return result

    def _advantages(self, batch: RolloutBatch, behaviour) -> torch.Tensor:
        fn = ADVANTAGE_ESTIMATORS.get(self.recipe.advantage)
        extra = _batch_inputs(fn, self._available(batch, behaviour))
        params = {**self.recipe.advantage_params, **extra}
        return compute_advantages(self.recipe.advantage, batch.rewards, batch.group_ids, **params)

    def _mix(self, batch: RolloutBatch):
        fn = MIXERS.get(self.recipe.mixer)
        return fn(rewards=batch.rewards, prompt_index=batch.prompt_index, off_policy=batch.off_policy,
                  step=self.step, total_steps=self.config.steps, **self.recipe.mixer_params)

    def _selection(self, batch: RolloutBatch, advantages, behaviour) -> torch.Tensor:
        weights = batch.completion_mask.float()
        available = self._available(batch, behaviour)
        for name in self.recipe.selection:
            fn = SELECTIONS.get(name)
            extra = {k: v for k, v in _batch_inputs(fn, available).items() if k not in ("mask", "entropy")}
            weights = weights * compute_selection(
                name, batch.completion_mask.float(), rewards=batch.rewards, advantages=advantages,
                entropy=behaviour.get("entropy"), group_ids=batch.group_ids,
                **{**self.recipe.selection_params.get(name, {}), **extra})
        return weights

    # -- the update ------------------------------------------------------------------------
    def _forward(self, model, batch: RolloutBatch, rows, *, need_entropy: bool, need_hidden: bool = False):
        return policy_logprobs(model, batch.prompt_ids[rows], batch.prompt_mask[rows],
                               batch.completion_ids[rows], batch.completion_mask[rows],
                               temperature=self.config.rollout.temperature, need_entropy=need_entropy,
                               return_hidden=need_hidden)

    def _loss_plan(self, batch: RolloutBatch, selection, rl_weight, sft_weight) -> _LossPlan:
        r = self.recipe
        mask = batch.completion_mask.float()
        rl_tokens = selection * rl_weight[:, None]
        sft_tokens = mask * sft_weight[:, None]
        rl_mask, sft_mask = mask * (rl_tokens > 0), mask * (sft_tokens > 0)
        has_rl, has_sft = bool(rl_mask.any()), bool(sft_mask.any())
        learns = has_rl or has_sft or self.value_head is not None
        return _LossPlan(
            mask=mask, rl_tokens=rl_tokens, sft_tokens=sft_tokens, rl_mask=rl_mask, sft_mask=sft_mask,
            rl_den=aggregation_denominator(rl_mask, r.aggregation, max_len=self.max_new_tokens),
            sft_den=aggregation_denominator(sft_mask, "token_mean"),
            value_den=aggregation_denominator(mask, "token_mean"),
            has_rl=has_rl, has_sft=has_sft, learns=learns,
            ref_logp=self._reference_logp(batch) if self.reference is not None and learns else None)

    def _micro_batch_loss(self, batch: RolloutBatch, rows: slice, plan: _LossPlan, advantages: torch.Tensor,
                          behaviour: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss of rows `rows`, already divided by the full batch's normalisers (so summing the
        micro-batches' gradients gives the full batch's), and its detached metrics."""
        r, max_len = self.recipe, self.max_new_tokens
        with self.autocast():
            out = self._forward(self.model, batch, rows, need_entropy=True,  # entropy is logged every step
                                need_hidden=self.value_head is not None)
        logp = out.logp.float()
        old = behaviour["logp"][rows] if "logp" in behaviour else logp.detach()  # one epoch: the ratio is 1
        rl_mask, mask = plan.rl_mask[rows], plan.mask[rows]
        loss = logp.new_zeros(())
        metrics: dict[str, torch.Tensor] = {}
        if plan.has_rl:
            want = _accepted(POLICY_LOSSES.get(r.loss))
            extra = {k: v for k, v in {"off_policy": batch.off_policy[rows], "entropy": out.entropy.detach(),
                                       "ref_logp": None if plan.ref_logp is None else plan.ref_logp[rows]}.items()
                     if k in want and v is not None}
            rl_loss, metrics = compute_policy_loss(
                r.loss, logp, old, advantages[rows], rl_mask, r.aggregation, weights=plan.rl_tokens[rows],
                denominator=plan.rl_den, max_len=max_len, **{**r.loss_params, **extra})
            loss = loss + rl_loss
        if plan.has_sft:
            sft_weights = plan.sft_tokens[rows] * self._sft_token_weights(logp)
            sft_loss, _ = compute_policy_loss("sft", logp, old, torch.ones_like(logp[:, 0]), plan.sft_mask[rows],
                                              "token_mean", weights=sft_weights, denominator=plan.sft_den)
            loss = loss + sft_loss
            metrics["sft_loss"] = sft_loss.detach()
        if plan.ref_logp is not None and r.kl_coef:
            kl = aggregate(kl_estimate(logp, plan.ref_logp[rows], r.kl_estimator), rl_mask, r.aggregation,
                           denominator=plan.rl_den, max_len=max_len)
            loss = loss + r.kl_coef * kl
            metrics["kl"] = kl.detach()
        if r.entropy_coef:
            loss = loss - r.entropy_coef * aggregate(out.entropy, rl_mask, r.aggregation,
                                                     denominator=plan.rl_den, max_len=max_len)
        if self.value_head is not None:
            old_values = behaviour["values"][rows]
            returns = gae_returns(advantages[rows], old_values)
            v_loss, v_metrics = value_loss(self.value_head(out.hidden), old_values, returns, mask)
            v_loss = aggregate(v_loss, mask, "token_mean", denominator=plan.value_den)
            loss = loss + r.value_coef * v_loss
            metrics.update({"value_loss": v_loss.detach(), **v_metrics})
        on_policy_tokens = mask * (~batch.off_policy[rows])[:, None]
        metrics["entropy"] = (out.entropy.detach() * on_policy_tokens).sum() / on_policy_tokens.sum().clamp(min=1)
        return loss, metrics

    def _update(self, batch, advantages, selection, rl_weight, sft_weight, behaviour):
        """K epochs over the batch in micro-batches, one optimizer step per epoch; returns (metrics, finite)."""
        r, o = self.recipe, self.config.optim
        plan = self._loss_plan(batch, selection, rl_weight, sft_weight)
        if not plan.learns:
            # Selection or gating left no token to learn from: no update, and say so.
            self.scheduler.step()
            return {"loss": 0.0, "kl": 0.0, "clip_frac": 0.0, "entropy": 0.0, "select/token_frac": 0.0}, True
        totals: dict[str, torch.Tensor] = {}
        finite = True
        for _ in range(r.epochs):
            self.optimizer.zero_grad(set_to_none=True)
            for start in range(0, len(batch), o.micro_batch_size):
                rows = slice(start, start + o.micro_batch_size)
                loss, metrics = self._micro_batch_loss(batch, rows, plan, advantages, behaviour)
                loss.backward()
                totals["loss"] = totals.get("loss", 0.0) + loss.detach()  # already full-batch normalised
                share = (min(start + o.micro_batch_size, len(batch)) - start) / len(batch)
                for k, v in metrics.items():
                    totals[k] = totals.get(k, 0.0) + share * v.detach()
            totals["grad_norm"], stepped = self._optimizer_step(totals["loss"])
            finite = finite and stepped
        self.scheduler.step()
        token_frac = plan.rl_mask.sum() / plan.mask.sum().clamp(min=1)
        return _update_metrics(totals, r.epochs, token_frac), finite

    def _optimizer_step(self, loss: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """Clip and step, unless the loss or the gradient is not finite (then drop the gradient)."""
        parameters = list(self.trainable_modules_parameters())
        grad_norm = torch.nn.utils.clip_grad_norm_(parameters, self.config.optim.grad_clip)
        if torch.isfinite(grad_norm) and torch.isfinite(loss):
            self.optimizer.step()
            return grad_norm, True
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm, False

    def _sft_token_weights(self, logp: torch.Tensor) -> torch.Tensor | float:
        """CHORD-phi (arXiv 2508.11408): weight SFT tokens by p(1-p) when the mixer asks."""
        if self.recipe.sft_weighting == "uniform":
            return 1.0
        from unipo.core.hybrid import chord_phi_weights

        return chord_phi_weights(logp)

    @torch.no_grad()
    def _reference_logp(self, batch: RolloutBatch) -> torch.Tensor:
        parts = []
        for start in range(0, len(batch), self.config.optim.micro_batch_size):
            rows = slice(start, start + self.config.optim.micro_batch_size)
            with self.autocast():
                parts.append(self._forward(self.reference, batch, rows, need_entropy=False).logp.float())
        return torch.cat(parts)

    # -- the run ---------------------------------------------------------------------------
    def fit(self) -> list[dict[str, float]]:
        """Train until `config.steps`, logging, evaluating and checkpointing as configured."""
        from tqdm.auto import tqdm

        cfg = self.config
        bar = tqdm(total=cfg.steps, initial=self.step, desc=f"{self.recipe.name} on {cfg.task}",
                   disable=not self.progress, dynamic_ncols=True, leave=False)
        while self.step < cfg.steps:
            result = self.train_step()
            self.history.append(result.metrics)
            if self.run:
                self.run.append("metrics.jsonl", result.metrics)
            bar.update(1)
            bar.set_postfix({k: f"{result.metrics[k]:.3f}" for k in ("reward_mean", "accuracy", "loss")
                             if result.metrics.get(k) is not None})
            if self.bad_steps >= cfg.max_bad_steps:
                bar.close()
                raise NonFiniteLossError(
                    f"{self.bad_steps} steps in a row had a non-finite loss or gradient (step {self.step}); "
                    f"stopped, the last good checkpoint is kept")
            if result.skipped:
                continue  # never checkpoint or evaluate a state that just failed
            if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.steps:
                self.evaluate()
            if self.run and cfg.save_every and self.step % cfg.save_every == 0:
                self.save()
        bar.close()
        if self.run:
            self.save()
        return self.history

    def evaluate(self, n: int | None = None, ks: tuple[int, ...] = (1, 4)) -> dict[str, float]:
        from unipo.evaluation import evaluate_model

        result = evaluate_model(self.model, self.tokenizer, self.task, n=n or self.config.eval_problems,
                                ks=ks, seed=self.config.seed, max_new_tokens=self.max_new_tokens,
                                temperature=self.config.rollout.temperature)
        record = {"step": self.step, **result}
        if self.run:
            self.run.append("eval.jsonl", record)
        return record

    # -- checkpoints -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "bad_steps": self.bad_steps,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "python_rng": random.getstate(),
            "value_head": None if self.value_head is None else self.value_head.state_dict(),
            "tracker": dict(self.tracker.state),
        }

    def save(self) -> None:
        assert self.run is not None
        if self.reference is not None and not (self.run.path / "reference").exists():
            self.reference.save_pretrained(self.run.path / "reference")
            self.tokenizer.save_pretrained(self.run.path / "reference")
        self.run.save_checkpoint(self.step, self.model, self.tokenizer, self.state_dict())

    def load_state(self, state: dict[str, Any]) -> None:
        self.step, self.bad_steps = state["step"], state["bad_steps"]
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])
        if self.value_head is not None:
            self.value_head.load_state_dict(state["value_head"])
        self.tracker.state = dict(state["tracker"])


def _expert_row_values(values: torch.Tensor, batch: RolloutBatch) -> torch.Tensor:
    """(B, T): each row gets its prompt's expert row of `values` (zeros where it has none)."""
    n_prompts = int(batch.prompt_index.max()) + 1
    expert_of_prompt = torch.full((n_prompts,), -1, dtype=torch.long, device=values.device)
    expert_rows = batch.off_policy.nonzero().squeeze(1)
    expert_of_prompt[batch.prompt_index[expert_rows]] = expert_rows
    source = expert_of_prompt[batch.prompt_index]
    return torch.where((source >= 0)[:, None], values[source.clamp(min=0)], torch.zeros_like(values))


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps with a NaN/inf loss or gradient."""


def start_run(config: TrainConfig, *, progress: bool = True) -> Trainer:
    """A trainer for a new run, writing into `config.out` (if set)."""
    run = RunFolder(config.out) if config.out else None
    if run:
        run.write_config(config)
    return Trainer(config, run=run, progress=progress)


def resume_run(out: str, *, steps: int | None = None, progress: bool = True) -> Trainer:
    """A trainer that continues the run in `out` from its latest checkpoint."""
    import dataclasses

    run = RunFolder(out)
    config = run.read_config()
    if steps is not None:
        config = dataclasses.replace(config, steps=steps)
        run.write_config(config)
    checkpoint = run.latest_checkpoint()
    if checkpoint is None:
        raise FileNotFoundError(f"no checkpoint to resume from in {out}")
    device = pick_device(config.device)
    model, tokenizer = load_model(str(checkpoint), device=device)
    trainer = Trainer(config, model=model, tokenizer=tokenizer, run=run, progress=progress)
    if trainer.reference is not None and (run.path / "reference").exists():
        trainer.reference = trainer._frozen_copy(load_model(str(run.path / "reference"), device=device)[0])
    state = torch.load(checkpoint / "trainer_state.pt", weights_only=False)
    trainer.load_state(state)
    run.truncate_after("metrics.jsonl", trainer.step)
    run.truncate_after("eval.jsonl", trainer.step)
    return trainer
