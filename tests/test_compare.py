"""`unipo compare`: recipes from one shared warm start per seed; the table, the plot and the JSON agree."""

from __future__ import annotations

import json
import math
import re

import pytest
from typer.testing import CliRunner

from unipo.cli import app
from unipo.compare import CompareConfig, markdown_table, summarise

runner = CliRunner()
CELL = re.compile(r"([+-]?\d+(?:\.\d+)?) ± (\d+(?:\.\d+)?)")


def test_compare_via_the_cli_writes_the_table_the_plot_and_the_json(tmp_path):
    out = tmp_path / "cmp"
    result = runner.invoke(app, ["compare", "--recipes", "grpo,luffy,chord", "--seeds", "2", "--steps", "20",
                                 "--quick", "--task", "sort:k=3", "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "compare.json").read_text())
    assert (out / "compare.png").stat().st_size > 10_000
    printed = [line for line in result.output.splitlines() if line.startswith("| ")][1:]  # the rows
    assert printed == (out / "compare.md").read_text().split("\n\n")[2].splitlines()[2:]
    assert [line.split(" | ")[0] for line in printed] == ["| warm start (step 0)", "| grpo", "| luffy", "| chord"]

    # every run trained 20 steps from its seed's one saved warm start
    assert sorted((r["recipe"], r["seed"], r["steps_done"], r["error"]) for r in summary["runs"]) == sorted(
        (r, s, 20, None) for r in ("grpo", "luffy", "chord") for s in (0, 1))
    assert [w["seed"] for w in summary["warm_starts"]] == [0, 1]
    assert all((out / "warm_starts" / f"warmstart-seed{s}" / "config.json").exists() for s in (0, 1))
    assert [p["step"] for p in summary["curves"]["luffy"]] == [0, 5, 10, 15, 20]

    # the printed table's numbers are the JSON's, rounded
    rows = {row["recipe"]: row for row in summary["table"]}
    keys = ["accuracy", "pass@1", "pass@8", "response_len_mean", "clip_frac", "train_seconds", "gain", "delta"]
    for line in printed:
        cells = [c.strip() for c in line.strip("| ").split(" | ")]
        row = rows[cells[0]]
        for key, cell in zip(keys, cells[2:]):
            match = CELL.fullmatch(cell)
            if match is None:
                assert cell in ("-", "n/a", "0 (baseline)"), cell
                continue
            digits = len(match[1].partition(".")[2])
            assert float(match[1]) == round(row[key], digits) and float(match[2]) == round(row[f"{key}_std"], digits)
    # paired by seed: the difference of each seed's two runs, then mean and spread
    final = {(r["recipe"], r["seed"]): r["final"]["accuracy"] for r in summary["runs"]}
    diffs = [final["luffy", s] - final["grpo", s] for s in (0, 1)]
    assert rows["luffy"]["delta"] == pytest.approx(sum(diffs) / 2)
    assert rows["luffy"]["delta_std"] == pytest.approx(abs(diffs[0] - diffs[1]) / math.sqrt(2))
    assert rows["grpo"]["delta"] == 0.0 and summary["baseline"] == "grpo"


def _run(recipe: str, seed: int, accuracy: float) -> dict:
    final = {"accuracy": accuracy, "pass@1": accuracy, "pass@8": accuracy, "response_len_mean": 8.0}
    return {"recipe": recipe, "seed": seed, "family": "x", "final": final, "curve": [{"step": 4, **final}],
            "history": [{"accuracy": accuracy}], "train_seconds": 1.0, "steps_done": 4, "error": None}


def test_paired_differences_against_a_named_baseline():
    cfg = CompareConfig(recipes=("grpo", "luffy"), seeds=(0, 1, 2), steps=4, baseline="luffy")
    warm = [{"seed": s, "eval": {"accuracy": a}, "train_seconds": 0.0, "steps": 1} for s, a in enumerate((.1, .2, .3))]
    runs = [_run("grpo", s, a) for s, a in enumerate((.5, .2, .6))] + \
        [_run("luffy", s, a) for s, a in enumerate((.4, .4, .4))]
    summary = summarise(cfg, warm, runs, 1.0, "test")
    rows = {row["recipe"]: row for row in summary["table"]}
    # grpo - luffy per seed: +0.1, -0.2, +0.2 -> mean 0.0333, sample std 0.2082
    assert rows["grpo"]["delta"] == pytest.approx(0.1 / 3)
    assert rows["grpo"]["delta_std"] == pytest.approx(0.208166, abs=1e-6)
    assert rows["grpo"]["gain"] == pytest.approx((0.4 + 0.0 + 0.3) / 3)  # against each seed's own warm start
    assert summary["curves"]["grpo"][0] == {"step": 0, "accuracy": pytest.approx(0.2), "std": pytest.approx(0.1),
                                            "n": 3}
    table = markdown_table(summary)
    assert "| grpo | x | 0.433 ± 0.208 |" in table and "Δacc vs luffy" in table and "| luffy |" in table


@pytest.mark.parametrize("args, message", [
    (["--recipes", "grpo,nope"], r"unknown recipe\(s\) \['nope'\]"),
    (["--baseline", "dapo"], r"--baseline 'dapo' is not among the recipes"),
    (["--seeds", "x"], r"--seeds must be N or a comma-separated list"),
    (["rollout.group_size=zero"], r"rollout.group_size must be an int"),
    (["--task", "nope"], r"unknown task"),
])
def test_mistakes_are_one_line_before_anything_runs(args, message, tmp_path):
    result = runner.invoke(app, ["compare", "--out", str(tmp_path / "c"), *args])
    assert result.exit_code == 2, result.output
    assert re.search(message, result.output) and result.output.count("\n") == 1, result.output
    assert not (tmp_path / "c").exists()
