"""The trainer: one loop for every recipe.

    collect (rollouts, expert rows, rewards) -> batch inputs (pi_old log-probs, entropy, values)
    -> advantages -> mixer weights -> selection -> the update (epochs x mini-batches of optimizer
    steps, see `unipo.update`) -> log, evaluate, checkpoint

Every algorithmic choice is a registry look-up by the recipe's slot names; the loop names no
algorithm. A slot function gets exactly the batch inputs it declared when it registered, from one
provider table (`Trainer._provider`, documented in `unipo.slots.INPUTS`).
"""

from __future__ import annotations

import copy
import math
import random
import re
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from unipo.agents import episode_input
from unipo.collect import RolloutBatch, RolloutCollector
from unipo.config import EPISODE_SOURCES, PAIR_SOURCES, TrainConfig
from unipo.core.advantages import compute_advantages
from unipo.core.correction import rollout_correction
from unipo.core.preference import hard_update_due, soft_update_reference
from unipo.core.selection import compute_selection
from unipo.core.turns import EPISODE_INPUTS
from unipo.critics import BASELINES, ValueHead
from unipo.distributed import Parallel, from_environment, gather_batch
from unipo.engine import build_engine, logprob_mismatch
from unipo.mixing import MIXERS
from unipo.models import load_model, pick_device
from unipo.rollout import policy_logprobs
from unipo.runs import RunFolder
from unipo.slots import recipe_inputs, slot_choices
from unipo.tasks.base import SystemPrompted, get_task
from unipo.trees import tree_input
from unipo.update import EntropyHistory, PolicyUpdate

PREFERENCE_DATA = (*PAIR_SOURCES, "nash_md")  # recipes whose evaluation adds the win rate against the reference


@dataclass
class StepResult:
    metrics: dict[str, float]
    skipped: bool


class Trainer:
    def __init__(self, config: TrainConfig, *, model=None, tokenizer=None, run: RunFolder | None = None,
                 progress: bool = True) -> None:
        # The recipe was checked slot by slot when it was built (unipo.slots.check_recipe): nothing below
        # can fail on a recipe name or param after the model has loaded.
        self.config, self.recipe, self.progress = config, config.recipe, progress
        self.inputs_needed = recipe_inputs(self.recipe)
        random.seed(config.seed)
        torch.manual_seed(config.seed)
        # torchrun's processes: each a rank of one data-parallel run (unipo.distributed); else one process.
        self.parallel: Parallel = from_environment(config.parallel)
        self.device = self.parallel.device(pick_device(config.device))
        if model is None:
            model, tokenizer = load_model(config.model, device=self.device, dtype=config.model_dtype,
                                          lora=config.lora)
        self.model, self.tokenizer = model.to(self.device), tokenizer
        if config.gradient_checkpointing:
            # Only train-mode forwards with gradients recompute (HF's layers and the lean decoder alike): sampling
            # and the no-grad passes run as before. Non-reentrant: inputs need not require grad (LoRA, frozen
            # embeddings), and the lean decoder's prompt keys/values keep their gradients (unipo.lean_decoder).
            kwargs = {"use_reentrant": False}
            if hasattr(model, "activation_checkpointing_enable"):  # its name from transformers 5 on
                model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        self.task = get_task(config.task)
        if config.system_prompt:
            self.task = SystemPrompted(self.task, config.system_prompt)
        self.max_new_tokens = config.rollout.max_new_tokens or self.task.max_new_tokens
        self.reference = self._frozen_copy(model) if self.recipe.needs_reference else None  # a replica per rank
        self.value_head = (ValueHead(model.config.hidden_size).to(self.device)
                           if self.recipe.value_coef > 0 else None)
        # The training forward: DDP around it, or FSDP2 shards the model in place (after the reference copy).
        self.forward_module = self.parallel.wrap(self.model, self.device)
        self.tracker = (BASELINES.get(self.recipe.baseline)(**self.recipe.baseline_params)
                        if self.recipe.baseline != "none" else None)  # a stateful baseline (unipo.critics)
        if self.tracker is not None:
            self.tracker.setup(model=self.model, tokenizer=tokenizer, device=self.device, seed=config.seed)
        # EPO's running per-turn entropy, when the recipe's entropy regulariser reads it (unipo.update)
        self.entropy_history = EntropyHistory() if "entropy_history" in self.inputs_needed else None
        params = [p for p in self.trainable_modules_parameters()]
        # fused: one kernel for all parameters (the same update, ~6x faster than the per-tensor loop on a CPU);
        # FSDP's sharded parameters take the foreach path.
        self.optimizer = torch.optim.AdamW(params, lr=config.optim.lr, betas=config.optim.betas,
                                           weight_decay=config.optim.weight_decay,
                                           fused=self.device.type in ("cpu", "cuda") and not self.parallel.fsdp)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.generator = torch.Generator(device=self.device).manual_seed(config.seed)
        self.engine = build_engine(config, self.model, tokenizer, self.device)  # who samples (unipo.engine)
        self._engine_synced = self.scheduler.last_epoch  # the engine holds the weights of this many updates
        self.collector = RolloutCollector(self.model, tokenizer, self.task, self.recipe, config.rollout,
                                          max_new_tokens=self.max_new_tokens, device=self.device,
                                          generator=self.generator,
                                          shard=(self.parallel.rank, self.parallel.world_size), engine=self.engine,
                                          pairs=config.pairs, oracle=config.oracle, reference=self.reference,
                                          env=config.env, critic=self.tracker,  # (turn_pairs ranks with it)
                                          gather=(lambda batch: gather_batch(batch, self.parallel)[0])
                                          if self.parallel.active else None)
        self.update = PolicyUpdate(config, forward=self._policy_forward, parameters=self.trainable_modules_parameters,
                                   optimizer=self.optimizer, loss=slot_choices(self.recipe)[1],
                                   value_head=self.value_head, max_len=self.max_new_tokens,
                                   parallel=self.parallel, forward_module=self.forward_module)
        # Every rank of a multi-process run knows the run folder (it takes part in checkpoints: FSDP gathers the
        # weights), and rank 0 alone writes to it.
        self.checkpointing = run is not None
        self.run = run if self.parallel.is_main else None
        self.step = 0
        self.bad_steps = 0
        self.saved_step: int | None = None  # the step of the last checkpoint written or resumed from
        self.history: list[dict[str, float]] = []
        self._batch: RolloutBatch | None = None  # the batch being trained on (read by `_policy_forward`)
        self._origin: torch.Tensor | None = None  # the rank that holds each of its rows

    # -- set-up ----------------------------------------------------------------------------
    def trainable_modules_parameters(self):
        yield from (p for p in self.model.parameters() if p.requires_grad)
        if self.value_head is not None:
            yield from self.value_head.parameters()

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
        with self.autocast(), self.parallel.full_weights(self.model):
            if self.scheduler.last_epoch != self._engine_synced:  # the policy learned since the engine's last push
                self.engine.sync(self.model)
                self._engine_synced = self.scheduler.last_epoch
            batch, rollout_stats = self.collector.collect(seed=self.config.seed, step=self.step)
        batch, origin = gather_batch(batch, self.parallel)  # every rank: the global batch (unipo.distributed)
        generated = time.perf_counter()
        if len(batch) == 0:
            self.step += 1
            return StepResult({"step": self.step, **rollout_stats, "skipped": 1.0}, skipped=True)

        update_metrics, finite = self.learn(batch, origin=origin)
        done = time.perf_counter()

        self.step += 1
        if finite:
            update_metrics.update(self._refresh_reference())
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
            **rollout_stats, **update_metrics,
        }
        metrics = {k: None if v is None else float(v) for k, v in metrics.items()}
        if not finite:
            self.bad_steps += 1
            metrics["skipped"] = 1.0
        else:
            self.bad_steps = 0
        return StepResult(metrics, skipped=not finite)

    def learn(self, batch: RolloutBatch, *, old_logp: torch.Tensor | None = None,
              origin: torch.Tensor | None = None) -> tuple[dict[str, Any], bool]:
        """Everything after collection for one batch: batch inputs -> advantages -> mixer -> selection ->
        the update (epochs x mini-batches of optimizer steps) -> the stateful baseline's `observe`. Returns
        (metrics, finite). (A stateful baseline's `prepare` runs first.)
        `old_logp` replaces pi_old's log-probs (for parity checks against other trainers). In a multi-process
        run `batch` is the global batch and `origin[i]` the rank that holds row i (its forwards run there)."""
        self.model.train()
        self._batch = batch
        self._origin = origin if origin is not None else torch.zeros(len(batch), dtype=torch.long,
                                                                     device=batch.rewards.device)
        try:
            baseline_stats = self.tracker.prepare(batch) if self.tracker is not None else {}
            inputs, behaviour_logp, input_stats = self._provider(batch)
            input_stats = {**baseline_stats, **input_stats}
            advantages = self._advantages(batch, inputs)
            rl_weight, sft_weight, mix_metrics = self._mix(batch)
            selection = self._selection(batch, advantages, inputs)
            correction, correction_stats = self._rollout_correction(batch, behaviour_logp)
            input_stats = {**input_stats, **correction_stats}
            if old_logp is None and self.recipe.updates_per_batch > 1:
                old_logp = behaviour_logp  # else one update: pi_old is the current policy, the ratio exactly 1
            plan = self.update.plan(batch, selection, rl_weight, sft_weight, old_logp,
                                    self._reference_logp if self.reference is not None else None,
                                    correction=correction)
            shuffle = torch.Generator().manual_seed(_mix_seed(self.config.seed, self.step))
            update_metrics, finite = self.update(batch, plan, advantages, inputs, shuffle, self._origin)
        finally:
            self._batch, self._origin = None, None
        with warnings.catch_warnings():  # the schedule counts generation steps, stepped or skipped
            warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()` before"))
            self.scheduler.step()
        if self.tracker is not None:  # a stateful baseline learns from this step's rollouts
            update_metrics = {**update_metrics, **self.tracker.observe(
                batch, kl=float(update_metrics.get("actor/approx_kl", 0.0)))}
        return {**input_stats, **mix_metrics, **update_metrics}, finite

    # -- batch inputs ----------------------------------------------------------------------
    def _sampler_logp_exact(self) -> bool:
        """The sampler's log-probs are pi_old's exactly when it drew from the full tempered softmax in
        float32: the same temperature as the loss's forward (always), no top-p renormalisation, no bf16
        autocast and float32 weights (`model_dtype`; in lower precision the incremental decode rounds
        differently from the full forward)."""
        full_precision = (not self.config.bf16 and self.config.model_dtype == "float32"
                          and all(p.dtype == torch.float32 for p in self.model.parameters()))
        return self.config.rollout.top_p >= 1.0 and full_precision and self.engine.logp_exact

    def _provider(self, batch: RolloutBatch) -> tuple[dict[str, Any], torch.Tensor | None, dict[str, float]]:
        """The batch inputs the recipe's slots declared, pi_old's log-probs when the update needs them
        (more than one optimizer step per batch, or a slot reads `logp`), and where those came from.

        pi_old's log-probs come from the sampler for sampled rows when they are exact (see
        `_sampler_logp_exact`), else from a no-grad pass under the loss's autocast; expert rows (never
        sampled) always take the pass. A pass that runs anyway (for entropy or values) serves every row.

        With an engine whose log-probs are not the trainer's (vLLM), the pass always runs: its log-probs are
        pi_old, their distance to the engine's is logged (`rollout/logprob_diff_max`, `_mean`), and the rollout
        correction (`rollout.correction`, unipo.core.correction) weighs each token by their ratio.
        """
        needed = self.inputs_needed
        measure = not self.engine.logp_exact
        needs_old = (self.recipe.updates_per_batch > 1 or bool(needed & {"logp", "expert_logp"}) or measure
                     or self.config.rollout.correction != "none")
        need_entropy, need_values = bool(needed & {"entropy", "entropy_history"}), self.value_head is not None
        sampled = ~batch.off_policy
        full_pass = need_entropy or need_values or (needs_old and not self._sampler_logp_exact())
        behaviour: dict[str, torch.Tensor] = {}
        if full_pass:
            behaviour = self._behaviour_pass(batch, torch.arange(len(batch), device=self.device),
                                             need_entropy=need_entropy, need_values=need_values)
        old_logp = behaviour.get("logp")
        from_sampler = 0.0
        if needs_old and old_logp is None:
            old_logp = batch.sampling_logp.clone()
            if bool((~sampled).any()):
                expert = (~sampled).nonzero().squeeze(1)
                old_logp[expert] = self._behaviour_pass(batch, expert, need_entropy=False, need_values=False)["logp"]
            from_sampler = float(sampled.float().mean())
        lengths = batch.completion_mask.sum(1)
        providers = {
            "mask": lambda: batch.completion_mask.float(),
            "token_ids": lambda: batch.completion_ids,
            "off_policy": lambda: batch.off_policy,
            "rewards": lambda: batch.rewards,
            "truncated": lambda: batch.truncated,
            "answer_ids": lambda: batch.answer_ids,
            # Stratified GRPO's strata: trajectories of like structure. Our analogue is the response
            # length in buckets of 4 tokens (the paper: number of search calls).
            "strata": lambda: torch.div(lengths, 4, rounding_mode="floor"),
            "step": lambda: self.step,
            "total_steps": lambda: self.config.steps,
            "logp": lambda: old_logp,
            "expert_logp": lambda: _expert_row_values(old_logp, batch),
            "entropy": lambda: behaviour["entropy"],
            # once per step: this step's pi_old entropy (on-policy tokens, whole batch) joins the running history
            "entropy_history": lambda: self.entropy_history.observe(
                behaviour["entropy"], batch.completion_mask * sampled[:, None], episode_input(batch, "turn_index")),
            "values": lambda: behaviour["values"],
            "baseline": lambda: self.tracker.baseline(batch),  # the recipe's stateful baseline (unipo.critics)
            # multi-turn episodes (unipo.agents): one row per turn; a single-turn row is a one-turn episode
            **{name: (lambda name=name: episode_input(batch, name)) for name in EPISODE_INPUTS},
            "tree_ids": lambda: tree_input(batch),  # Tree-GRPO's trees (unipo.trees); else one tree per episode
        }
        # ref_logp is computed once per step by the update plan (only when there is something to learn).
        inputs = {name: providers[name]() for name in sorted(needed - {"ref_logp"})}
        if need_values:
            inputs["values"] = behaviour["values"]
        stats = {"rollout/old_logp_from_sampler": from_sampler} if needs_old else {}
        if measure:
            on_policy_tokens = batch.completion_mask * sampled[:, None]
            stats.update(logprob_mismatch(batch.sampling_logp, old_logp, on_policy_tokens))
        return inputs, old_logp, stats

    def _rollout_correction(self, batch: RolloutBatch, old_logp: torch.Tensor | None
                            ) -> tuple[torch.Tensor | None, dict[str, float]]:
        """Per-token importance weights pi_old / pi_sampler of the sampled rows (`rollout.correction`), or None."""
        r = self.config.rollout
        if r.correction == "none":
            return None, {}
        on_policy_tokens = batch.completion_mask * (~batch.off_policy)[:, None]
        return rollout_correction(old_logp, batch.sampling_logp, on_policy_tokens, r.correction,
                                  r.correction_max, r.correction_min)

    @torch.no_grad()
    def _behaviour_pass(self, batch: RolloutBatch, rows: torch.Tensor, *, need_entropy: bool,
                        need_values: bool) -> dict[str, torch.Tensor]:
        """pi_old's log-probs (and entropy, values) of `rows`, under the same autocast as the loss's forward.
        Each rank runs its own rows (FSDP: the same number of forwards on every rank), and the per-row results
        are summed into the global batch."""
        parts: list[dict[str, torch.Tensor]] = []
        done: list[torch.Tensor] = []
        chunks = self.parallel.micro_batches(rows, self._origin, self.config.optim.micro_batch_size,
                                             equal_counts=self.parallel.fsdp)
        for chunk, real in chunks:
            with self.autocast():
                out = self._forward(self.model, batch, chunk, need_entropy=need_entropy, need_hidden=need_values)
            if not real:
                continue
            part = {"logp": out.logp.float()}
            if need_entropy:
                part["entropy"] = out.entropy.float()
            if need_values:
                part["values"] = self.value_head(out.hidden) * batch.completion_mask[chunk]
            parts.append(part)
            done.append(chunk)
        keys = ["logp"] + ["entropy"] * need_entropy + ["values"] * need_values
        return self._of_all_ranks(parts, done, rows, batch, keys)

    def _of_all_ranks(self, parts: list[dict[str, torch.Tensor]], done: list[torch.Tensor], rows: torch.Tensor,
                      batch: RolloutBatch, keys: list[str]) -> dict[str, torch.Tensor]:
        """The [len(rows), T] values of `rows`, in their order, from the parts each rank computed for its own
        rows (`done`, the rows of each part)."""
        if not self.parallel.active:
            return {k: torch.cat([p[k] for p in parts]) for k in keys}
        local = torch.cat(done) if done else rows[:0]
        empty = torch.zeros((0, batch.completion_ids.shape[1]), device=self.device)
        return {k: self.parallel.fill_rows(torch.cat([p[k] for p in parts]) if parts else empty, local,
                                           len(batch))[rows] for k in keys}

    # -- slots -----------------------------------------------------------------------------
    def _advantages(self, batch: RolloutBatch, inputs: dict[str, Any]) -> torch.Tensor:
        choice = slot_choices(self.recipe)[0]
        return compute_advantages(choice.name, batch.rewards, batch.group_ids, **choice.params,
                                  **{k: inputs[k] for k in choice.inputs})

    def _mix(self, batch: RolloutBatch):
        fn = MIXERS.get(self.recipe.mixer)
        return fn(rewards=batch.rewards, prompt_index=batch.prompt_index, off_policy=batch.off_policy,
                  step=self.step, total_steps=self.config.steps, **self.recipe.mixer_params)

    def _selection(self, batch: RolloutBatch, advantages, inputs: dict[str, Any]) -> torch.Tensor:
        weights = batch.completion_mask.float()
        for choice in slot_choices(self.recipe)[2:-1]:
            declared = {k: inputs[k] for k in choice.inputs if k != "entropy"}
            weights = weights * compute_selection(
                choice.name, batch.completion_mask.float(), rewards=batch.rewards, advantages=advantages,
                entropy=inputs.get("entropy"), group_ids=batch.group_ids, **choice.params, **declared)
        return weights

    # -- forward passes --------------------------------------------------------------------
    def _forward(self, model, batch: RolloutBatch, rows, *, need_entropy: bool, need_hidden: bool = False):
        return policy_logprobs(model, batch.prompt_ids[rows], batch.prompt_mask[rows],
                               batch.completion_ids[rows], batch.completion_mask[rows],
                               temperature=self.config.rollout.temperature, need_entropy=need_entropy,
                               return_hidden=need_hidden)

    def _policy_forward(self, rows: torch.Tensor, *, need_entropy: bool, need_hidden: bool):
        """The training forward of `rows` of the current batch (gradients flow), under autocast, through the
        data-parallel module (`unipo.distributed.PolicyForward`, wrapped by DDP or over FSDP's shards)."""
        batch = self._batch
        with self.autocast():
            return self.forward_module(batch.prompt_ids[rows], batch.prompt_mask[rows], batch.completion_ids[rows],
                                       batch.completion_mask[rows], temperature=self.config.rollout.temperature,
                                       need_entropy=need_entropy, return_hidden=need_hidden)

    @torch.no_grad()
    def _reference_logp(self) -> torch.Tensor:
        """The reference's log-probs of the batch (each rank its own rows; the reference is a plain replica)."""
        batch = self._batch
        parts, done = [], []
        every_row = torch.arange(len(batch), device=self.device)
        for rows, _ in self.parallel.micro_batches(every_row, self._origin, self.config.optim.micro_batch_size,
                                                   equal_counts=False):
            with self.autocast():
                parts.append({"logp": self._forward(self.reference, batch, rows, need_entropy=False).logp.float()})
            done.append(rows)
        return self._of_all_ranks(parts, done, every_row, batch, ["logp"])["logp"]

    def _refresh_reference(self) -> dict[str, float]:
        """A moving reference (`recipe.reference_update`), after the step's update: every tau steps,
        pi_ref <- alpha*pi + (1-alpha)*pi_ref (soft, TR-DPO) or pi_ref <- pi (hard: alpha = 1; TR-DPO's hard
        update, SPIN's and iterative DPO's previous iterate). Returns `ref/updated` (1 on the steps it moved)."""
        schedule = self.recipe.reference_schedule
        if schedule is None or self.reference is None:
            return {}
        alpha, tau = schedule
        if not hard_update_due(self.step, tau):
            return {"ref/updated": 0.0}
        with self.parallel.full_weights(self.model):
            soft_update_reference(list(self.reference.parameters()), list(self.model.parameters()), alpha)
        return {"ref/updated": 1.0}

    # -- the run ---------------------------------------------------------------------------
    def fit(self) -> list[dict[str, float]]:
        """Train until `config.steps`, logging, evaluating and checkpointing as configured.

        With a run folder, the run holds its lock (`RunFolder.lock`) until fit returns or raises, and a checkpoint
        is written every `save_every` steps and at the end (unless one was just written at that step)."""
        from tqdm.auto import tqdm

        cfg = self.config
        if self.run:
            self.run.lock()  # held since start_run/resume_run; taken here for a trainer built another way
        bar = tqdm(total=cfg.steps, initial=self.step, desc=f"{self.recipe.name} on {cfg.env or cfg.task}",
                   disable=not (self.progress and self.parallel.is_main), dynamic_ncols=True, leave=False)
        try:
            while self.step < cfg.steps:
                result = self.train_step()
                self.history.append(result.metrics)
                if self.run:
                    self.run.append("metrics.jsonl", result.metrics)
                bar.update(1)
                bar.set_postfix({k: f"{result.metrics[k]:.3f}" for k in ("reward_mean", "accuracy", "loss")
                                 if result.metrics.get(k) is not None})
                if self.bad_steps >= cfg.max_bad_steps:
                    raise NonFiniteLossError(
                        f"{self.bad_steps} steps in a row had a non-finite loss or gradient (step {self.step}); "
                        f"stopped, the last good checkpoint is kept")
                if result.skipped:
                    continue  # never checkpoint or evaluate a state that just failed
                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.steps:
                    self.evaluate()
                if self.checkpointing and cfg.save_every and self.step % cfg.save_every == 0:
                    self.save()
            if self.checkpointing and self.saved_step != self.step:
                self.save()
        finally:
            bar.close()
            if self.run:
                self.run.unlock()
        return self.history

    def evaluate(self, n: int | None = None, ks: tuple[int, ...] = (1, 4)) -> dict[str, float]:
        from unipo.evaluation import evaluate_model

        result = None
        with self.parallel.full_weights(self.model):  # rank 0 evaluates; the others wait for its numbers
            if self.parallel.is_main and self.recipe.data in EPISODE_SOURCES:  # success, env/ metrics, transcripts
                from unipo.agents import evaluate_episodes

                result = evaluate_episodes(self, n or self.config.eval_problems)
            elif self.parallel.is_main:
                result = evaluate_model(self.model, self.tokenizer, self.task, n=n or self.config.eval_problems,
                                        ks=ks, seed=self.config.seed, max_new_tokens=self.max_new_tokens,
                                        temperature=self.config.rollout.temperature)
                if self.reference is not None and self.recipe.data in PREFERENCE_DATA:
                    result.update(self._win_rate_vs_reference(n or self.config.eval_problems))
            result = self.parallel.broadcast_object(result)
        record = {"step": self.step, **result}
        if self.run:
            self.run.append("eval.jsonl", record)
        return record

    def _win_rate_vs_reference(self, n: int) -> dict[str, float]:
        """Preference recipes: the oracle's mean P(policy > reference) on held-out prompts (`unipo.oracles`), one
        sample each; against the current reference (the initial policy unless the recipe moves it)."""
        from unipo.oracles import build_oracle, win_rate_against

        prefer = self.collector._oracle or build_oracle(self.config.oracle, self.task)
        with self.autocast():
            result = win_rate_against(self.model, self.reference, self.tokenizer, self.task, prefer, n=n,
                                      seed=self.config.seed, max_new_tokens=self.max_new_tokens,
                                      temperature=self.config.rollout.temperature)
        return {f"vs_reference/{k}": v for k, v in result.items()}

    # -- checkpoints -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything a resume needs besides the weights: tensors (optimizer moments, RNG states as uint8, the value
        head) and plain values (steps, scheduler, Python RNG, the stateful baseline's state, EPO's entropy history),
        saved by `unipo.runs` without pickle. The optimizer state is always in the one-process layout (FSDP gathers
        it: every rank calls this)."""
        return {
            "step": self.step,
            "bad_steps": self.bad_steps,
            "optimizer": self.parallel.full_optimizer_state(self.model, self.optimizer),
            "scheduler": self.scheduler.state_dict(),
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "python_rng": random.getstate(),
            "value_head": None if self.value_head is None else dict(self.value_head.state_dict()),
            "tracker": {} if self.tracker is None else self.tracker.state_dict(),
            "entropy_history": None if self.entropy_history is None else self.entropy_history.state_dict(),
            # a moving reference is part of the state (the run folder's reference/ is written once, at the first save)
            "reference": ({k: v.detach().clone() for k, v in self.reference.state_dict().items()}
                          if self.reference is not None and self.recipe.reference_schedule is not None else None),
        }

    def save(self) -> None:
        """checkpoint-<step> in the run folder (and the reference model, once: a moving reference is also saved in
        each checkpoint's trainer state, so a resume restores the reference of that step): safetensors and JSON,
        no pickle.
        Every rank calls it (FSDP gathers the shards); rank 0 writes."""
        assert self.checkpointing
        weights, state = self.parallel.full_model_state(self.model), self.state_dict()
        if self.run is not None:
            if self.reference is not None:
                self.run.save_reference(self.reference, self.tokenizer)
            self.run.save_checkpoint(self.step, self.model, self.tokenizer, state, weights=weights)
        self.parallel.barrier()  # nobody runs ahead of a checkpoint that may yet fail
        self.saved_step = self.step

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()`'s output (as `unipo.runs.load_trainer_state` reads it back)."""
        self.step, self.bad_steps = int(state["step"]), int(state["bad_steps"])
        self.parallel.load_optimizer_state(self.model, self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])
        if self.value_head is not None:
            self.value_head.load_state_dict(state["value_head"])
        if self.tracker is not None:
            self.tracker.load_state_dict(state["tracker"])
        if self.entropy_history is not None and state.get("entropy_history") is not None:
            self.entropy_history.load_state_dict(state["entropy_history"])
        if self.reference is not None and state.get("reference") is not None:
            self.reference.load_state_dict({k: v.to(self.device) for k, v in state["reference"].items()})


def _mix_seed(seed: int, step: int) -> int:
    """The mini-batch shuffle's seed for a step: reproducible, and the same after a resume."""
    return (seed * 1_000_003 + step) * 31 + 7


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


def start_run(config: TrainConfig, *, progress: bool = True, overwrite: bool = False) -> Trainer:
    """A trainer for a new run, writing into `config.out` (if set).

    The folder is locked for the run's life (until `fit` ends), and must hold nothing: a folder with files in it
    is refused (RunFolderError) unless `overwrite`, which empties it first (only a unipo run folder's files).
    Under torchrun, rank 0 claims the folder and the other ranks follow (or stop, if it could not)."""
    if not config.out:
        return Trainer(config, progress=progress)
    parallel = from_environment(config.parallel)
    run = RunFolder(config.out)
    created = parallel.main_first(lambda: run.claim_new(overwrite=overwrite))
    try:
        trainer = Trainer(config, run=run, progress=progress)
    except BaseException:
        if parallel.is_main:
            run.release_new(created)
        raise
    if parallel.is_main:
        run.write_config(config)
    return trainer


def resume_run(out: str, *, steps: int | None = None, progress: bool = True,
               given: dict[str, Any] | None = None, overrides: dict[str, str] | None = None) -> Trainer:
    """A trainer that continues the run in the folder `out` from its newest checkpoint that verifies.

    `out` is the run: the `out` written in its config.yaml is not used (a copied or moved run folder resumes
    where it is). `steps` is the total to reach. `given` (recipe name, task, model, seed) and `overrides`
    (key=value) must equal the saved config, else RunFolderError names each difference. Before loading, stale
    temporary files are removed and a partial last line of the jsonl logs cut (each with a warning); a checkpoint
    whose manifest does not verify is skipped with a warning naming it and why. Checkpoints are full, so a run
    resumes at any number of processes (rank 0 checks and repairs the folder; every rank loads)."""
    import dataclasses

    from unipo.config import apply_overrides, from_dict, to_dict
    from unipo.runs import RunFolderError, load_trainer_state, settings_differences, verify, warn

    parallel = from_environment("ddp")  # the process group; the saved config's mode applies in the Trainer
    run = RunFolder(out)

    def prepare() -> tuple[TrainConfig, str]:
        if not run.is_run():
            raise RunFolderError(f"{out} is not a run folder (no config.yaml)")
        run.lock()
        try:
            saved = run.read_config()
            config = dataclasses.replace(saved, out=str(out))
            differences = settings_differences(config, given or {}, dict(overrides or {}))
            if differences:
                raise RunFolderError(f"--resume continues {out} with its saved settings, and these differ: "
                                     f"{'; '.join(differences)} (drop them, or start a new run in another folder)")
            if "steps" in (overrides or {}):
                config = apply_overrides(config, {"steps": overrides["steps"]})
            if steps is not None:
                config = dataclasses.replace(config, steps=steps)
            run.remove_stale()
            for name in ("metrics.jsonl", "eval.jsonl", "transcripts.jsonl"):  # (transcripts: episode recipes)
                run.repair_log(name)
            skipped: list[str] = []
            checkpoint = run.latest_checkpoint(skipped)
            for line in skipped:
                warn(f"{out}: {line}")
            if checkpoint is None:
                why = "every checkpoint failed verification" if skipped else "a run writes its first checkpoint " \
                    f"at step {config.save_every or config.steps} (save_every)"
                raise RunFolderError(f"no intact checkpoint to resume from in {out} ({why}); start it again with "
                                     f"--overwrite")
            if config.recipe.needs_reference:
                problem = verify(run.path / "reference")
                if problem is not None:
                    raise RunFolderError(f"{run.path / 'reference'}: {problem}; the run cannot resume without its "
                                         f"reference model")
            if config != saved:
                run.write_config(config)
        except BaseException:
            run.unlock()
            raise
        return config, str(checkpoint)

    prepared = parallel.main_first(prepare)
    # the other ranks get rank 0's checked settings as plain data (the config holds read-only mappings)
    plain, checkpoint = parallel.broadcast_object(None if prepared is None else (to_dict(prepared[0]), prepared[1]))
    config = from_dict(TrainConfig, plain)
    try:
        device = parallel.device(pick_device(config.device))
        model, tokenizer = load_model(checkpoint, device=device, dtype=config.model_dtype)
        trainer = Trainer(config, model=model, tokenizer=tokenizer, run=run, progress=progress)
        if trainer.reference is not None:
            trainer.reference = trainer._frozen_copy(
                load_model(str(run.path / "reference"), device=device, dtype=config.model_dtype)[0])
        trainer.load_state(load_trainer_state(Path(checkpoint)))
        trainer.saved_step = trainer.step
        if parallel.is_main:
            run.truncate_after("metrics.jsonl", trainer.step)
            run.truncate_after("eval.jsonl", trainer.step)
            run.truncate_after("transcripts.jsonl", trainer.step)
    except BaseException:
        if parallel.is_main:
            run.unlock()
        raise
    return trainer
