"""benchmarks/agents.py: its summary on hand-computed numbers, and one unit end to end on a minimal budget."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCHMARKS))  # the script imports its sibling `machine`
    try:
        spec = importlib.util.spec_from_file_location("agents_benchmark", BENCHMARKS / "agents.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(BENCHMARKS))


def unit(env, seed, init, sft, after):
    return {"env": env, "seed": seed, "init": {"accuracy": init}, "sft": {"accuracy": sft},
            "after": {r: {"accuracy": v} for r, v in after.items()}}


def test_summary_table_and_sentences_follow_the_numbers(bench):
    units = [unit("guess_number", 1, 0.0, 0.5, {"a": 0.25, "b": 1.0}),
             unit("guess_number", 0, 0.0, 0.5, {"a": 0.75, "b": 1.0})]
    lines, sentences = bench.summarise(units, ["a", "b"], n_eval=64)
    assert lines[2] == "| guess_number | 0.000 | 0.500 | 0.500 | 1.000 | 0.00/0.50/0.75/1.00; 0.00/0.50/0.25/1.00 |"
    # a: differences +0.25 and -0.25: over seeds std 0.3536 / sqrt(2) = 0.25, larger than the binomial
    # sqrt(2/2) * sqrt(0.5 * 0.5 / 64) = 0.0625, so the noise is 2 * 0.25.
    assert "+ a: 0.500 (+0.000 vs the warm start; up in 1, down in 1 of 2 seeds; within the noise" in sentences[1]
    assert ", 0.500: two standard errors" in sentences[1]
    # b: differences +0.5 twice (no spread over seeds): binomial at the pooled 0.75, smoothed (48 + 1) / 66:
    # sqrt(0.742424 * 0.257576 / 64) = 0.05466, the noise 0.109.
    assert "+ b: 1.000 (+0.500 vs the warm start; up in 2, down in 0 of 2 seeds; beyond the noise" in sentences[2]
    assert ", 0.109: two standard errors" in sentences[2]


def test_one_unit_runs_end_to_end(bench):
    settings = {"sft_steps": 1, "eval": 2, "sft_prompts": 2, "sft_lr": 5e-4, "recipes": "multiturn_grpo",
                "rl_steps": 1, "prompts": 2, "group": 2, "lr": 5e-4}
    threads = torch.get_num_threads()
    try:
        result = bench.run_unit("guess_number", 0, settings, threads=1)
    finally:
        torch.set_num_threads(threads)  # run_unit sets the worker's threads; this process goes on with its own
    assert set(result["after"]) == {"multiturn_grpo"} and set(result["seconds"]) == {"sft", "multiturn_grpo"}
    for evaluation in (result["init"], result["sft"], result["after"]["multiturn_grpo"]):
        assert 0.0 <= evaluation["accuracy"] <= 1.0 and evaluation["env/turns_mean"] >= 1
