"""`unipo plot`: the panels people read, one PNG per run and an overlay of several; missing metrics are noted."""

from __future__ import annotations

import json

import matplotlib.pyplot as plt
import pytest
from PIL import Image
from typer.testing import CliRunner

from unipo.cli import app
from unipo.config import TrainConfig
from unipo.plots import figure, load, plot_runs
from unipo.recipes import get_recipe
from unipo.runs import RunFolder

runner = CliRunner()
FULL = ("reward_mean", "loss", "kl", "actor/approx_kl", "entropy", "clip_frac", "response_len_mean")


def make_run(path, recipe="grpo", steps=12, keys=FULL, evals=(0, 6, 12)):
    """A run folder as the trainer leaves it (config, metrics, evaluations), without training."""
    run = RunFolder(path)
    run.write_config(TrainConfig(recipe=get_recipe(recipe), task="sort", steps=steps))
    for step in range(1, steps + 1):
        run.append("metrics.jsonl", {"step": float(step), **{key: step / 100 + i for i, key in enumerate(keys)}})
    for step in evals:
        run.append("eval.jsonl", {"step": step, "accuracy": step / 20, "pass@4": 0.9})
    return path


def panels(fig) -> dict[str, object]:
    return {ax.get_title(): ax for ax in fig.axes if ax.get_title()}


def test_a_run_gets_every_panel_with_held_out_accuracy_from_step_0(tmp_path):
    fig = figure([load(make_run(tmp_path / "a", recipe="cppo"))], smooth=1)
    try:
        shown = panels(fig)
        assert list(shown) == ["reward", "held-out accuracy", "loss", "KL", "entropy", "clip fraction",
                               "response length"]
        held_out = shown["held-out accuracy"].get_lines()[0]
        assert list(held_out.get_xdata()) == [0, 6, 12] and list(held_out.get_ydata()) == [0, 0.3, 0.6]
        reward = shown["reward"].get_lines()[0]
        assert list(reward.get_xdata()) == list(range(1, 13)) and reward.get_ydata()[-1] == pytest.approx(0.12)
        kl_lines = shown["KL"].get_lines()  # to the reference (cppo has one) and old -> new policy
        assert [line.get_ydata()[0] for line in kl_lines] == pytest.approx([2.01, 3.01])
        summary = "".join(t.get_text() for ax in fig.axes for t in ax.texts)
        assert "cppo on sort" in summary and "held-out 0.000 (step 0) -> 0.600 (step 12)" in summary
    finally:
        plt.close(fig)


def test_metrics_a_run_did_not_log_are_skipped_with_a_note(tmp_path):
    path = make_run(tmp_path / "a", keys=("reward_mean", "loss", "entropy"), evals=())
    notes: list[str] = []
    fig = figure([load(path)], notes=notes)
    try:
        assert list(panels(fig)) == ["reward", "loss", "entropy"]  # nothing drawn empty
    finally:
        plt.close(fig)
    assert notes == ["a: no held-out accuracy panel (accuracy not in eval.jsonl)",
                     "a: no KL panel (kl or actor/approx_kl not in metrics.jsonl)",
                     "a: no clip fraction panel (clip_frac not in metrics.jsonl)",
                     "a: no response length panel (response_len_mean not in metrics.jsonl)"]
    # grpo has no reference model: its logged kl (always 0) is not drawn as a KL to one
    fig = figure([load(make_run(tmp_path / "b"))])
    try:
        assert len(panels(fig)["KL"].get_lines()) == 1
    finally:
        plt.close(fig)


def test_several_runs_give_one_png_each_and_an_overlay_named_after_them(tmp_path):
    a, b = make_run(tmp_path / "runs" / "grpo-1"), make_run(tmp_path / "runs" / "luffy-1", recipe="luffy", steps=8)
    fig = figure([load(a), load(b)])
    try:
        assert [t.get_text() for t in fig.legends[0].get_texts()] == ["grpo-1", "luffy-1"]
        assert len(panels(fig)["held-out accuracy"].get_lines()) == 2  # one per run
    finally:
        plt.close(fig)
    result = runner.invoke(app, ["plot", str(a), str(b)])
    assert result.exit_code == 0, result.output
    overlay = tmp_path / "runs" / "curves-grpo-1-vs-luffy-1.png"
    assert result.output.split() == [str(a / "curves.png"), str(b / "curves.png"), str(overlay)]
    for png in (a / "curves.png", b / "curves.png", overlay):
        assert Image.open(png).size[0] > 1500  # the 4-column grid
    # --out names the overlay; the notes go to stderr
    c = make_run(tmp_path / "c", keys=("reward_mean",), evals=())
    result = runner.invoke(app, ["plot", str(a), str(c), "--out", str(tmp_path / "both.png")])
    assert result.exit_code == 0 and (tmp_path / "both.png").is_file()
    assert "note: c: no loss panel (loss or sft_loss not in metrics.jsonl)" in result.output


def test_plot_of_a_folder_without_logs_is_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no metrics.jsonl records to plot"):
        plot_runs([tmp_path / "empty"])
    result = runner.invoke(app, ["plot", str(tmp_path / "empty")])
    assert result.exit_code == 2 and result.output.count("\n") == 1


def test_null_values_are_gaps_not_zeros(tmp_path):
    run = RunFolder(tmp_path / "a")
    for step, loss in ((1, 0.5), (2, float("nan")), (3, 0.25)):
        run.append("metrics.jsonl", {"step": step, "loss": loss})
    assert json.loads((tmp_path / "a" / "metrics.jsonl").read_text().splitlines()[1])["loss"] is None
    fig = figure([load(tmp_path / "a")], smooth=1)
    try:
        values = list(panels(fig)["loss"].get_lines()[0].get_ydata())
        assert values[0] == 0.5 and values[1] != values[1] and values[2] == 0.25
    finally:
        plt.close(fig)
