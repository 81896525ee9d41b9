"""Loss parity with TRL: unipo's `grpo`, `dapo` and `dr_grpo` recipes against TRL's `GRPOTrainer` loss types of
the same names, on one shared batch.

Both sides get the same model weights, prompts, completions (of different lengths), advantages and old
log-probs (the current ones plus noise, so that ratios move off 1 and clipping is exercised). unipo's loss and
gradient come from its trainer's own update (`Trainer.learn` with one update, optimizer step disabled, no
clipping); TRL's from `GRPOTrainer._compute_loss` followed by `backward`, in fp32 (TRL's config defaults to bf16
autocast, on a CPU too, so it is switched off). Used by `vs_trl.py` and `tests/test_trl_parity.py`.
"""

from __future__ import annotations

import copy
import dataclasses
import tempfile

import torch

# unipo recipe -> TRL loss settings with the same clipping range (DAPO's clip-higher: 0.2 below, 0.28 above)
CASES = {
    "grpo": {"loss_type": "grpo", "epsilon": 0.2},
    "dapo": {"loss_type": "dapo", "epsilon": 0.2, "epsilon_high": 0.28},
    "dr_grpo": {"loss_type": "dr_grpo", "epsilon": 0.2},
}
PROMPTS, GROUP, NEW_TOKENS, SEED = 4, 4, 8, 0


def shared_batch(model, tokenizer):
    """Prompt/completion tensors, advantages [B] and old log-probs [B, T] for PROMPTS x GROUP rows."""
    from unipo.rollout import left_pad, policy_logprobs

    texts = ["12+34=", "5+6=", "70+8=", "123+45="]
    prompt_ids, prompt_mask = left_pad([tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts
                                        for _ in range(GROUP)], tokenizer.pad_token_id)
    gen = torch.Generator().manual_seed(SEED)
    rows = PROMPTS * GROUP
    completion_ids = torch.randint(3, len(tokenizer), (rows, NEW_TOKENS), generator=gen)
    lengths = torch.randint(2, NEW_TOKENS + 1, (rows,), generator=gen)
    completion_mask = (torch.arange(NEW_TOKENS)[None] < lengths[:, None]).long()
    completion_ids = completion_ids.masked_fill(completion_mask == 0, tokenizer.pad_token_id)
    advantages = torch.randn(rows, generator=gen)
    with torch.no_grad():
        current = policy_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask).logp
    old = (current + 0.3 * torch.randn(current.shape, generator=gen)) * completion_mask
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
            "completion_mask": completion_mask, "advantages": advantages, "old_per_token_logps": old}


def unipo_loss(model, tokenizer, recipe: str, batch, bf16: bool = False) -> tuple[float, dict[str, torch.Tensor]]:
    """The loss and gradients of one update of unipo's trainer on `batch` (bf16: with its autocast option)."""
    from unipo.collect import RolloutBatch
    from unipo.config import OptimConfig, RolloutConfig, TrainConfig
    from unipo.recipes import get_recipe
    from unipo.trainer import Trainer

    # one update on the whole batch, like TRL's single `_compute_loss` call
    one_update = dataclasses.replace(get_recipe(recipe), mini_batches=1, epochs=1)
    config = TrainConfig(recipe=one_update, task="addition", device="cpu", steps=1, bf16=bf16,
                         rollout=RolloutConfig(prompts_per_step=PROMPTS, group_size=GROUP, max_new_tokens=NEW_TOKENS),
                         optim=OptimConfig(grad_clip=float("inf"), micro_batch_size=PROMPTS * GROUP))
    trainer = Trainer(config, model=model, tokenizer=tokenizer, progress=False)
    trainer.optimizer.step = lambda *a, **k: None  # keep the gradients, leave the weights alone
    rows = len(batch["advantages"])
    zeros = torch.zeros(rows)
    prompt_index = torch.arange(rows) // GROUP
    rollout = RolloutBatch(
        prompt_ids=batch["prompt_ids"], prompt_mask=batch["prompt_mask"], completion_ids=batch["completion_ids"],
        completion_mask=batch["completion_mask"], sampling_logp=batch["old_per_token_logps"], rewards=zeros,
        correct=zeros.bool(), group_ids=prompt_index, prompt_index=prompt_index, off_policy=zeros.bool(),
        truncated=zeros.bool(), answer_ids=zeros.long(), hinted=zeros.bool(), texts=[""] * rows,
        prompts=[""] * rows)
    model.train()
    trainer.scheduler.step = lambda *a, **k: None
    # the given advantages replace the recipe's (TRL's loss takes them as they are)
    trainer._advantages = lambda *a, **k: batch["advantages"]
    metrics, _ = trainer.learn(rollout, old_logp=batch["old_per_token_logps"])
    return float(metrics["loss"]), {n: p.grad.clone() for n, p in model.named_parameters()}


class TrlLosses:
    """One `GRPOTrainer` on its own copy of the model; `loss` sets the loss type and clipping range as its
    `__init__` would (`loss_type`, `epsilon_low`, `epsilon_high`) and runs `_compute_loss` + `backward`."""

    def __init__(self, model, tokenizer, rows: int) -> None:
        from datasets import Dataset
        from trl import GRPOConfig, GRPOTrainer

        with tempfile.TemporaryDirectory() as output_dir:
            # bf16=False: GRPOConfig defaults to bf16 autocast, on a CPU too; the comparison is in fp32
            args = GRPOConfig(output_dir=output_dir, per_device_train_batch_size=rows, num_generations=GROUP,
                              max_completion_length=NEW_TOKENS, beta=0.0, use_cpu=True, bf16=False, report_to=[],
                              save_strategy="no")
            self.trainer = GRPOTrainer(model=model, reward_funcs=lambda completions, **_: [0.0] * len(completions),
                                       args=args, train_dataset=Dataset.from_list([{"prompt": "1+1="}] * rows),
                                       processing_class=tokenizer)
        self.trainer.current_gradient_accumulation_steps = 1  # set by the training loop, which we do not run

    def loss(self, settings: dict, batch) -> tuple[float, dict[str, torch.Tensor]]:
        trainer = self.trainer
        trainer.loss_type = settings["loss_type"]
        trainer.epsilon_low = settings["epsilon"]
        trainer.epsilon_high = settings.get("epsilon_high", settings["epsilon"])
        trainer.model.train()
        trainer.model.zero_grad(set_to_none=True)
        loss = trainer._compute_loss(trainer.model, {**batch, "num_items_in_batch": batch["completion_mask"].sum()})
        loss.backward()
        return float(loss.detach()), {n: p.grad.clone() for n, p in trainer.model.named_parameters()}


def _relative(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return float((ours - theirs).norm() / theirs.norm().clamp(min=1e-30))


def run_parity(model, tokenizer) -> dict[str, dict[str, float]]:
    """{recipe: {"loss_unipo", "loss_trl", "loss_rel", "grad_rel"}} for every case, each side on its own copy."""
    model = model.float().eval()
    batch = shared_batch(model, tokenizer)
    trl = TrlLosses(copy.deepcopy(model), tokenizer, rows=len(batch["advantages"]))
    results = {}
    for recipe, settings in CASES.items():
        ours, our_grads = unipo_loss(copy.deepcopy(model), tokenizer, recipe, batch)
        theirs, their_grads = trl.loss(settings, batch)
        names = sorted(their_grads)
        flat = [torch.cat([g[n].flatten() for n in names]) for g in (our_grads, their_grads)]
        results[recipe] = {"loss_unipo": ours, "loss_trl": theirs,
                           "loss_rel": abs(ours - theirs) / max(abs(theirs), 1e-30),
                           "grad_rel": _relative(*flat)}
    return results


def parity_table(results: dict[str, dict[str, float]], tolerance: float = 1e-5) -> list[str]:
    """Markdown rows: recipe vs TRL loss type, both losses, relative differences, pass/fail."""
    lines = ["| unipo recipe | TRL loss_type | unipo loss | TRL loss | loss rel. diff | grad rel. diff | |",
             "|---|---|---:|---:|---:|---:|---|"]
    for recipe, r in results.items():
        ok = r["loss_rel"] <= tolerance and r["grad_rel"] <= tolerance
        lines.append(f"| {recipe} | {CASES[recipe]['loss_type']} | {r['loss_unipo']:.8f} | {r['loss_trl']:.8f} | "
                     f"{r['loss_rel']:.1e} | {r['grad_rel']:.1e} | {'pass' if ok else 'FAIL'} |")
    return lines
