"""The hybrid-vs-on-policy study's core function on a minimal configuration (seconds)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "hybrid_vs_onpolicy.py"


def load_study():
    spec = importlib.util.spec_from_file_location("hybrid_vs_onpolicy", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_study_minimal_run_writes_table_json_and_plot(tmp_path):
    study = load_study()
    cfg = study.StudyConfig(recipes=("grpo", "luffy"), seeds=(0,), steps=2, prompts_per_step=2, group_size=4,
                            warm_steps=2, warm_prompts=8, eval_problems=4, curve_points=1, workers=1,
                            out=str(tmp_path))
    summary = study.run_study(cfg, progress=False, command="test")

    rows = {row["recipe"]: row for row in summary["table"]}
    assert list(rows) == ["warm start (step 0)", "grpo", "luffy"]
    for row in rows.values():
        assert row["n_seeds"] == 1 and not row["errors"]
        for key in ("accuracy", "pass@1", "pass@8", "response_len_mean", "train_seconds"):
            assert math.isfinite(row[key]) and math.isfinite(row[f"{key}_std"]), (row["recipe"], key)
        assert 0.0 <= row["accuracy"] <= 1.0 and 0.0 <= row["pass@1"] <= row["pass@8"] <= 1.0
    assert {(r["recipe"], r["seed"], r["steps_done"]) for r in summary["runs"]} == {("grpo", 0, 2), ("luffy", 0, 2)}
    assert [p["step"] for p in summary["curves"]["grpo"]] == [0, 2]

    # Every run started from the one saved warm start.
    assert (tmp_path / "hybrid_vs_onpolicy" / "warmstart-seed0" / "config.json").exists()
    written = json.loads((tmp_path / "hybrid_vs_onpolicy.json").read_text())
    assert [row["recipe"] for row in written["table"]] == list(rows)
    assert written["settings"]["steps"] == 2 and written["group_composition"]["luffy"].startswith("3 rollouts")
    table = study.markdown_table(summary)
    assert table.count("\n") == 1 + len(rows) and "| luffy | hybrid |" in table
    assert (tmp_path / "hybrid_vs_onpolicy.png").stat().st_size > 0
    assert "| grpo |" in (tmp_path / "hybrid_vs_onpolicy.md").read_text()


def test_study_cli_flags():
    study = load_study()
    cfg, _ = study.parse_args(["--quick", "--seeds", "3", "--steps", "7", "--recipes", "grpo,sft", "--out", "x"])
    assert cfg.seeds == (0, 1, 2) and cfg.steps == 7 and cfg.recipes == ("grpo", "sft") and cfg.out == "x"
    cfg, _ = study.parse_args(["--seeds", "5,"])
    assert cfg.seeds == (5,) and cfg.recipes == study.DEFAULT_RECIPES
