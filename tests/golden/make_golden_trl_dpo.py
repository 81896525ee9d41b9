"""Write tests/golden/trl_dpo.json: TRL 1.16.0 `DPOTrainer` losses and their gradients on fixed batches.

tests/test_golden_dpo.py compares unipo's preference losses (`unipo.core.preference`) against these
numbers; it imports neither TRL nor this file, so CI needs no TRL.

How the values are produced: a real `trl.DPOTrainer` is built from a `DPOConfig` per case (loss_type,
beta, label_smoothing, loss_weights as a user would set them), on a throwaway random Qwen2 model and a
one-row dataset that only satisfy its constructor. Its own `_compute_loss` is then called with a
stand-in policy and a stand-in reference whose forward returns chosen per-token log-probs instead of
running a network: row r of the [2B, S-1] per-token tensor holds the whole sequence log-prob on its first
completion position and 0 elsewhere, so TRL's sum over the sequence gives exactly the batch value, and
the completion mask gives TRL the completion lengths (its IPO, sigmoid_norm and sft use them). The policy
tensor is a float64 leaf, so d loss / d (sequence log-prob) is read off its gradient. Nothing of TRL is
copied; its installed code computes every stored number.

Run it in an environment with trl==1.16.0 and transformers 5 (the project venv has both; CI need not):

    .venv/bin/python tests/golden/make_golden_trl_dpo.py          # or /tmp/refenv-verl/bin/python

Inputs are seeded float64 rounded to 6 decimals and read back from their JSON form before use, so the
test feeds unipo exactly the numbers TRL saw. Outputs are stored with 15 significant digits.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

OUT = Path(__file__).resolve().parent / "trl_dpo.json"
F64 = torch.float64
TRL_VERSION = "1.16.0"


# --------------------------------------------------------------------------------------------
# inputs


def _round(x: torch.Tensor) -> list:
    return (torch.round(x.to(F64) * 1e6) / 1e6).tolist()


def _out(x: torch.Tensor | float) -> Any:
    if isinstance(x, torch.Tensor):
        x = x.detach().to(F64)
        return _out(float(x)) if x.dim() == 0 else [_out(v) for v in x]
    value = float(x)
    assert math.isfinite(value), value
    return float(f"{value:.15g}")


def _batch(seed: int, size: int, *, chosen_length: int | None = None) -> dict[str, list]:
    """Sequence log-prob sums (policy and reference, chosen and rejected) and completion lengths.

    The reference sits within a few nats of the policy, as after a few optimizer steps; pair 0 has a
    large positive margin and pair 1 a large negative one (log-sigmoid's saturated ends), the rest are
    moderate, so the hinge is active on some pairs and not on others for beta in {0.1, 1}.
    """
    gen = torch.Generator().manual_seed(seed)
    lengths = lambda: torch.randint(1, 25, (size,), generator=gen)  # noqa: E731
    chosen_len = lengths() if chosen_length is None else torch.full((size,), chosen_length)
    rejected_len = lengths()
    per_token = lambda n: -(0.2 + 2.3 * torch.rand(size, generator=gen, dtype=F64)) * n  # noqa: E731
    chosen, rejected = per_token(chosen_len), per_token(rejected_len)
    ref_chosen = chosen + 2.5 * torch.randn(size, generator=gen, dtype=F64)
    ref_rejected = rejected + 2.5 * torch.randn(size, generator=gen, dtype=F64)
    ref_chosen[0], ref_rejected[0] = chosen[0] - 20.0, rejected[0] + 25.0  # margin about +45 nats
    ref_chosen[1], ref_rejected[1] = chosen[1], rejected[1] - 42.0  # margin -42 nats
    ref_chosen, ref_rejected = ref_chosen.clamp(max=-0.1), ref_rejected.clamp(max=-0.1)  # log-probs stay < 0
    return {
        "chosen_logps": _round(chosen), "rejected_logps": _round(rejected),
        "ref_chosen_logps": _round(ref_chosen), "ref_rejected_logps": _round(ref_rejected),
        "chosen_lengths": chosen_len.tolist(), "rejected_lengths": rejected_len.tolist(),
    }


# --------------------------------------------------------------------------------------------
# TRL


class _FixedLogProbs:
    """Stands in for the policy or the reference: returns the given per-token log-probs, whatever the input."""

    def __init__(self, per_token: torch.Tensor) -> None:
        self.per_token = per_token
        width = per_token.shape[1]
        self.extras = dict(entropy=torch.zeros(per_token.shape[0], width, dtype=F64),
                           mean_logits=torch.zeros(per_token.shape[0], width, dtype=F64),
                           is_top1=torch.zeros(per_token.shape[0], width, dtype=torch.bool))

    def __call__(self, **kwargs: Any) -> SimpleNamespace:
        assert kwargs.get("fused_lm_head") is True
        return SimpleNamespace(log_probs=self.per_token, **self.extras)


def _layout(batch: dict[str, list]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """TRL's [chosen rows; rejected rows] layout: completion mask [2B, S] (prompt of 2 tokens, then the
    completion, then padding) and per-token policy / reference log-probs [2B, S-1] (shifted by one)."""
    lengths = batch["chosen_lengths"] + batch["rejected_lengths"]
    prompt, width = 2, 2 + max(lengths) + 1
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, prompt:prompt + n] = 1
    first = prompt - 1  # the shifted position that predicts the first completion token

    def per_token(chosen: list[float], rejected: list[float]) -> torch.Tensor:
        values = torch.zeros(len(lengths), width - 1, dtype=F64)
        values[:, first] = torch.tensor(chosen + rejected, dtype=F64)
        return values

    policy = per_token(batch["chosen_logps"], batch["rejected_logps"])
    reference = per_token(batch["ref_chosen_logps"], batch["ref_rejected_logps"])
    return mask, policy, reference, torch.tensor(first)


def _tiny_trainer(workdir: str, **config: Any):
    """A DPOTrainer whose configuration is the case's; its model and data only satisfy the constructor."""
    from datasets import Dataset
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM
    from trl import DPOConfig, DPOTrainer

    vocab = {"<pad>": 0, "<eos>": 1, **{c: 2 + i for i, c in enumerate("abcdefgh ")}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>")
    torch.manual_seed(0)
    shape = Qwen2Config(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, pad_token_id=0, eos_token_id=1)
    model, reference = Qwen2ForCausalLM(shape), Qwen2ForCausalLM(shape)
    data = Dataset.from_dict({"prompt": ["ab"], "chosen": ["cd"], "rejected": ["ef"]})
    args = DPOConfig(output_dir=workdir, report_to="none", use_cpu=True, bf16=False, **config)
    return DPOTrainer(model=model, ref_model=reference, args=args, train_dataset=data, processing_class=tokenizer)


def trl_case(batch: dict[str, list], **config: Any) -> dict[str, Any]:
    """TRL's loss, d loss / d sequence log-prob (chosen, rejected) and its reward metrics on `batch`."""
    mask, policy, reference, first = _layout(batch)
    size = len(batch["chosen_logps"])
    with tempfile.TemporaryDirectory() as workdir:
        trainer = _tiny_trainer(workdir, **config)
        assert not trainer.precompute_ref_logps and trainer.ld_alpha is None and not trainer.use_weighting
        trainer.ref_model = _FixedLogProbs(reference)
        leaf = policy.clone().requires_grad_(True)
        inputs = {"input_ids": torch.ones_like(mask), "attention_mask": torch.ones_like(mask), "completion_mask": mask}
        loss = trainer._compute_loss(_FixedLogProbs(leaf), inputs, False)
        (grad,) = torch.autograd.grad(loss, leaf)
        metrics = trainer._metrics["train" if trainer.model.training else "eval"]
        # every completion position of a row has the same derivative (TRL sums them); read the first
        shifted = mask[:, 1:].bool()
        row_grad = grad[:, int(first)]
        assert torch.allclose(torch.where(shifted, grad, row_grad[:, None]), row_grad[:, None].expand_as(grad)), \
            "per-token gradients differ within a row"
        return {
            "loss": _out(loss),
            "grad_chosen_logps": _out(row_grad[:size]), "grad_rejected_logps": _out(row_grad[size:]),
            "metrics": {key: _out(metrics[key][-1]) for key in
                        ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")},
        }


# --------------------------------------------------------------------------------------------
# cases: (id, batch, DPOConfig fields). tests/test_golden_dpo.py maps each id onto a unipo loss.

CASES: list[tuple[str, str, dict[str, Any]]] = [
    ("sigmoid_b0.1", "ragged", {"loss_type": ["sigmoid"], "beta": 0.1}),
    ("sigmoid_b0.5", "ragged", {"loss_type": ["sigmoid"], "beta": 0.5}),
    ("hinge_b0.1", "ragged", {"loss_type": ["hinge"], "beta": 0.1}),
    ("hinge_b1.0", "ragged", {"loss_type": ["hinge"], "beta": 1.0}),
    ("ipo_b0.1", "ragged", {"loss_type": ["ipo"], "beta": 0.1}),
    ("ipo_b1.0", "ragged", {"loss_type": ["ipo"], "beta": 1.0}),
    ("robust_b0.1_ls0.2", "ragged", {"loss_type": ["robust"], "beta": 0.1, "label_smoothing": 0.2}),
    ("robust_b0.5_ls0.0", "ragged", {"loss_type": ["robust"], "beta": 0.5, "label_smoothing": 0.0}),
    ("robust_b0.3_ls0.45", "ragged", {"loss_type": ["robust"], "beta": 0.3, "label_smoothing": 0.45}),
    ("sppo_hard_b0.1", "ragged", {"loss_type": ["sppo_hard"], "beta": 0.1}),
    ("sppo_hard_b0.5", "ragged", {"loss_type": ["sppo_hard"], "beta": 0.5}),
    ("sigmoid_norm_b0.1", "ragged", {"loss_type": ["sigmoid_norm"], "beta": 0.1}),
    ("sigmoid_sft_b0.1_w0.7", "equal_chosen", {"loss_type": ["sigmoid", "sft"], "beta": 0.1,
                                               "loss_weights": [1.0, 0.7]}),
    ("hinge_sft_b0.2_w0.3", "equal_chosen", {"loss_type": ["hinge", "sft"], "beta": 0.2,
                                             "loss_weights": [1.0, 0.3]}),
]


def main() -> None:
    import datasets
    import trl

    datasets.disable_progress_bars()
    assert trl.__version__ == TRL_VERSION, f"expected trl {TRL_VERSION}, found {trl.__version__}"
    batches = {"ragged": _batch(1201, 8), "equal_chosen": _batch(1202, 6, chosen_length=7)}
    # the JSON form is what both sides read
    batches = json.loads(json.dumps(batches))
    cases = []
    for case_id, batch_name, config in CASES:
        result = trl_case(batches[batch_name], **config)
        cases.append({"id": case_id, "batch": batch_name, "dpo_config": config, **result})
        print(f"{case_id:24s} loss {result['loss']:.10g}")
    payload = {
        "source": {"package": "trl", "version": importlib.metadata.version("trl"), "class": "trl.DPOTrainer",
                   "method": "_compute_loss", "transformers": importlib.metadata.version("transformers"),
                   "torch": torch.__version__, "generator": "tests/golden/make_golden_trl_dpo.py"},
        "notes": "Per-pair inputs are sequence log-prob sums; lengths are completion token counts. grad_* = d loss / "
                 "d sequence log-prob of the policy (TRL's mean over pairs). metrics are TRL's logged rewards/*.",
        "batches": batches,
        "cases": cases,
    }
    OUT.write_text(json.dumps(payload, separators=(",", ":")) + "\n")
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
