"""unipo's grpo / dapo / dr_grpo losses and gradients equal TRL's GRPOTrainer loss types of the same names on one
shared batch (same weights, completions, advantages and old log-probs), to 1e-5 relative.

TRL is the optional `bench` extra: without it this test is skipped. The comparison itself lives in
benchmarks/trl_parity.py, which benchmarks/vs_trl.py also reports."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("trl")
pytest.importorskip("datasets")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from trl_parity import CASES, run_parity  # noqa: E402

from unipo.models import build_tiny_model  # noqa: E402


def test_losses_and_gradients_match_trl() -> None:
    model, tokenizer = build_tiny_model("tiny", alphabet="0123456789+=")
    results = run_parity(model, tokenizer)
    assert set(results) == set(CASES)
    for recipe, r in results.items():
        assert r["loss_rel"] < 1e-5, (recipe, r)
        assert r["grad_rel"] < 1e-5, (recipe, r)
        assert abs(r["loss_trl"]) > 1e-4, (recipe, r)  # a real, non-vanishing loss was compared
