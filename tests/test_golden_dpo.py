"""unipo's preference losses against TRL 1.16.0's `DPOTrainer`, loss and gradient, to 1e-5 relative.

tests/golden/trl_dpo.json was written by tests/golden/make_golden_trl_dpo.py, which runs TRL's own
`DPOTrainer._compute_loss` on fixed float64 batches of sequence log-prob sums (its docstring says how);
this module imports no TRL. Each golden case is a `DPOConfig` (loss_type, beta, label_smoothing,
loss_weights); MAPPING below says which unipo loss, params and inputs reproduce it. Where the two
libraries define a loss differently the mapping is explicit and the difference is pinned by a test:

- ipo: TRL divides each sequence log-ratio by its completion length before the square (its IPO is
  length-normalised, a choice it reports confirming with the IPO authors); unipo's `ipo` takes whatever
  per-sequence log-probs it is given, so the parity inputs are per-token means, log π / |y|.
- sigmoid_norm: TRL's length-normalised DPO is unipo's `dpo` on the same per-token means.
- hinge: TRL's relu(1 − β·Δ) is unipo's `slic` with delta = 1 and lam = 0 (unipo adds the SLiC-HF
  NLL regulariser on top; TRL gets it as `loss_type=["hinge", "sft"]`).
- sppo_hard: TRL sums the winner and loser squares, (ρ_w − 1/(2β))² + (ρ_l + 1/(2β))²; unipo's `sppo`
  averages them, as the SPPO authors' code does (uclaml/SPPO, loss `(loss_w + loss_l) / 2`, the
  sample mean of Eq. 4.7's expectation over the two answers), with η explicit. So TRL's sppo_hard =
  2 × unipo's sppo with η = 1/β and win probabilities (1, 0).
- ["sigmoid", "sft"] with weights [1, α] is RPO; TRL's sft term is the token mean of −log π over every
  chosen token of the batch, unipo's `rpo` takes a per-pair chosen NLL (the per-token mean of the pair)
  and averages over pairs. They agree when all chosen answers have one length (the golden batch
  "equal_chosen"); with ragged lengths TRL weights long answers more.
- robust: the same formula on both sides (label_smoothing = unipo's label_noise).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from unipo.core.preference import compute_preference_loss

F64 = torch.float64
RTOL = 1e-5
ATOL = 1e-12  # only so that an exact 0 on one side may meet a rounding residue on the other
GOLDEN = Path(__file__).resolve().parent / "golden" / "trl_dpo.json"
INPUTS = ("chosen_logps", "rejected_logps", "ref_chosen_logps", "ref_rejected_logps")


@functools.cache
def golden() -> dict[str, Any]:
    return json.loads(GOLDEN.read_text())


def per_token_mean(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """log π(y|x) / |y| for all four inputs (differentiable in the policy sums)."""
    chosen_len, rejected_len = batch["chosen_lengths"], batch["rejected_lengths"]
    return {"chosen_logps": batch["chosen_logps"] / chosen_len,
            "rejected_logps": batch["rejected_logps"] / rejected_len,
            "ref_chosen_logps": batch["ref_chosen_logps"] / chosen_len,
            "ref_rejected_logps": batch["ref_rejected_logps"] / rejected_len}


def chosen_nll(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-token mean NLL of each chosen answer, the `chosen_nll` unipo's rpo and slic expect."""
    return -batch["chosen_logps"] / batch["chosen_lengths"]


# unipo side of each golden case: (loss name, params from the batch, inputs are per-token means?, scale)
Mapping = tuple[str, Callable[[dict[str, torch.Tensor], float], dict[str, Any]], bool, float]


def _dpo(batch, beta):
    return {}


def _hinge(batch, beta):
    return {"delta": 1.0, "lam": 0.0, "chosen_nll": torch.zeros_like(batch["chosen_logps"])}


def _sppo_hard(batch, beta):
    ones = torch.ones_like(batch["chosen_logps"])
    return {"eta": 1.0 / beta, "chosen_win_prob": ones, "rejected_win_prob": 0.0 * ones}


def _robust(noise):
    return lambda batch, beta: {"label_noise": noise}


def _rpo(alpha):
    return lambda batch, beta: {"alpha": alpha, "chosen_nll": chosen_nll(batch)}


def _slic(lam):
    return lambda batch, beta: {"delta": 1.0, "lam": lam, "chosen_nll": chosen_nll(batch)}


MAPPING: dict[str, list[Mapping]] = {
    "sigmoid_b0.1": [("dpo", _dpo, False, 1.0), ("tr_dpo", _dpo, False, 1.0)],
    "sigmoid_b0.5": [("dpo", _dpo, False, 1.0), ("tr_dpo", _dpo, False, 1.0)],
    "hinge_b0.1": [("slic", _hinge, False, 1.0)],
    "hinge_b1.0": [("slic", _hinge, False, 1.0)],
    "ipo_b0.1": [("ipo", _dpo, True, 1.0)],
    "ipo_b1.0": [("ipo", _dpo, True, 1.0)],
    "robust_b0.1_ls0.2": [("robust_dpo", _robust(0.2), False, 1.0)],
    "robust_b0.5_ls0.0": [("robust_dpo", _robust(0.0), False, 1.0), ("dpo", _dpo, False, 1.0)],
    "robust_b0.3_ls0.45": [("robust_dpo", _robust(0.45), False, 1.0)],
    "sppo_hard_b0.1": [("sppo", _sppo_hard, False, 2.0)],
    "sppo_hard_b0.5": [("sppo", _sppo_hard, False, 2.0)],
    "sigmoid_norm_b0.1": [("dpo", _dpo, True, 1.0)],
    "sigmoid_sft_b0.1_w0.7": [("rpo", _rpo(0.7), False, 1.0)],
    "hinge_sft_b0.2_w0.3": [("slic", _slic(0.3), False, 1.0)],
}

CASES = [(case, index) for case in MAPPING for index in range(len(MAPPING[case]))]


def case_of(case_id: str) -> dict[str, Any]:
    (case,) = [c for c in golden()["cases"] if c["id"] == case_id]
    return case


def batch_of(case: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {key: torch.tensor(value, dtype=F64) for key, value in golden()["batches"][case["batch"]].items()}


def unipo_loss(case: dict[str, Any], mapping: Mapping) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """unipo's loss, d loss / d (policy chosen, rejected sequence log-prob sums) and metrics for one case."""
    name, params_of, means, scale = mapping
    batch = batch_of(case)
    chosen = batch["chosen_logps"].clone().requires_grad_(True)
    rejected = batch["rejected_logps"].clone().requires_grad_(True)
    batch.update(chosen_logps=chosen, rejected_logps=rejected)
    beta = case["dpo_config"]["beta"]
    inputs = per_token_mean(batch) if means else {key: batch[key] for key in INPUTS}
    loss, metrics = compute_preference_loss(name, *(inputs[key] for key in INPUTS), beta, **params_of(batch, beta))
    loss = scale * loss
    grad_chosen, grad_rejected = torch.autograd.grad(loss, (chosen, rejected))
    return loss.detach(), grad_chosen, grad_rejected, metrics


def relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return float(((ours - theirs).abs() / theirs.abs().clamp(min=ATOL / RTOL)).max())


def test_golden_file_is_trl_1_16_and_every_case_is_mapped():
    source = golden()["source"]
    assert (source["package"], source["version"], source["method"]) == ("trl", "1.16.0", "_compute_loss")
    assert sorted(c["id"] for c in golden()["cases"]) == sorted(MAPPING)
    # the loss types named in the acceptance are all here
    covered = {t for c in golden()["cases"] for t in c["dpo_config"]["loss_type"]}
    assert {"sigmoid", "ipo", "robust", "hinge", "sppo_hard"} <= covered


@pytest.mark.parametrize(("case_id", "index"), CASES, ids=[f"{c}->{MAPPING[c][i][0]}" for c, i in CASES])
def test_loss_and_gradient_match_trl(case_id: str, index: int):
    case = case_of(case_id)
    loss, grad_chosen, grad_rejected, _ = unipo_loss(case, MAPPING[case_id][index])
    for ours, key in ((loss, "loss"), (grad_chosen, "grad_chosen_logps"), (grad_rejected, "grad_rejected_logps")):
        theirs = torch.tensor(case[key], dtype=F64)
        torch.testing.assert_close(ours, theirs, rtol=RTOL, atol=ATOL, msg=lambda m, key=key: f"{case_id} {key}: {m}")


@pytest.mark.parametrize("case_id", [c for c in MAPPING if not MAPPING[c][0][2]])
def test_reward_metrics_match_trl(case_id: str):
    """With sequence sums as inputs, unipo's pref/* metrics are TRL's rewards/* (β·log-ratio means)."""
    case = case_of(case_id)
    *_, metrics = unipo_loss(case, MAPPING[case_id][0])
    pairs = {"rewards/chosen": "pref/chosen_reward", "rewards/rejected": "pref/rejected_reward",
             "rewards/margins": "pref/reward_margin", "rewards/accuracies": "pref/accuracy"}
    for theirs, ours in pairs.items():
        expected = torch.tensor(case["metrics"][theirs], dtype=F64)
        torch.testing.assert_close(metrics[ours], expected, rtol=RTOL, atol=ATOL)


def test_the_golden_cases_exercise_both_sides_of_every_kink():
    """The batch is not degenerate: hinge is active on some pairs and flat on others, and the DPO margins
    reach log-sigmoid's saturated ends."""
    grads = torch.tensor(case_of("hinge_b1.0")["grad_chosen_logps"])
    assert (grads == 0).any() and (grads != 0).any()
    batch = batch_of(case_of("sigmoid_b0.5"))
    chosen_ratio = batch["chosen_logps"] - batch["ref_chosen_logps"]
    margin = 0.5 * (chosen_ratio - (batch["rejected_logps"] - batch["ref_rejected_logps"]))
    assert margin.max() > 15 and margin.min() < -15


# --------------------------------------------------------------------------------------------
# the documented differences, pinned: each mapping above is needed, not decoration


def test_ipo_on_sequence_sums_is_not_trls_ipo():
    case = case_of("ipo_b0.1")
    loss, *_ = unipo_loss(case, ("ipo", _dpo, False, 1.0))
    assert relative_error(loss, torch.tensor(case["loss"], dtype=F64)) > 0.05


def test_sppo_hard_is_twice_unipos_sppo():
    case = case_of("sppo_hard_b0.5")
    loss, grad_chosen, *_ = unipo_loss(case, ("sppo", _sppo_hard, False, 1.0))
    torch.testing.assert_close(2 * loss, torch.tensor(case["loss"], dtype=F64), rtol=RTOL, atol=ATOL)
    expected = torch.tensor(case["grad_chosen_logps"], dtype=F64)
    torch.testing.assert_close(2 * grad_chosen, expected, rtol=RTOL, atol=ATOL)


def test_rpo_differs_from_trls_sft_term_when_chosen_lengths_differ():
    """TRL's sft term is a token mean over the batch, unipo's a mean of per-pair token means: on the ragged
    batch (chosen lengths 3..22) the two differ; the "equal_chosen" batch is where they coincide."""
    ragged = batch_of(case_of("sigmoid_b0.1"))
    token_mean = -ragged["chosen_logps"].sum() / ragged["chosen_lengths"].sum()
    pair_mean = chosen_nll(ragged).mean()
    assert abs(float(token_mean - pair_mean)) > 0.05
    equal = batch_of(case_of("sigmoid_sft_b0.1_w0.7"))
    torch.testing.assert_close(-equal["chosen_logps"].sum() / equal["chosen_lengths"].sum(), chosen_nll(equal).mean())
