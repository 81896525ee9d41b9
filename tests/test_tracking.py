"""Experiment tracking: TensorBoard events and a W&B offline run mirror metrics.jsonl; `unipo watch`."""

from __future__ import annotations

import json
import math
import shutil
import time

import pytest
from typer.testing import CliRunner

from unipo.cli import app
from unipo.config import TrainConfig
from unipo.recipes import get_recipe
from unipo.runs import RunFolder
from unipo.tracking import wandb_mode

runner = CliRunner()
SMALL = ["rollout.prompts_per_step=2", "rollout.group_size=2", "eval_problems=4", "rollout.max_new_tokens=8"]


def tensorboard_scalars(folder) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def test_log_names_are_checked_and_normalised():
    config = TrainConfig(recipe=get_recipe("grpo"), log="tensorboard, wandb")
    assert config.log == ("jsonl", "tensorboard", "wandb")
    assert TrainConfig(recipe=get_recipe("grpo"), log=["wandb", "jsonl"]).log == ("jsonl", "wandb")
    assert TrainConfig(recipe=get_recipe("grpo")).log == ("jsonl",)
    for bad in ("tb", ["tensorboard", 3], 5):
        with pytest.raises(ValueError, match=r"^log must be some of jsonl, tensorboard, wandb"):
            TrainConfig(recipe=get_recipe("grpo"), log=bad)


def test_tensorboard_events_equal_metrics_jsonl_and_watch_shows_the_run(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    monkeypatch.setenv("COLUMNS", "160")  # rich's width: a table row per line
    out = tmp_path / "run"
    trained = runner.invoke(app, ["train", "--task", "sort", "--steps", "2", "--out", str(out), "eval_every=1",
                                  "log=tensorboard", *SMALL])
    assert trained.exit_code == 0, trained.output
    logged = tensorboard_scalars(out / "tb")
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    expected = {}
    for record in metrics:
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                expected.setdefault(key, {})[int(record["step"])] = value
    for record in evals:
        for key, value in record.items():
            if key != "step":
                expected.setdefault(f"eval/{key}", {})[record["step"]] = value
    assert {"reward_mean", "loss", "kl", "entropy", "clip_frac", "eval/accuracy"} <= set(expected)
    assert set(logged) == set(expected)
    for tag, values in expected.items():
        assert logged[tag].keys() == values.keys(), tag
        for step, value in values.items():
            assert math.isclose(logged[tag][step], value, rel_tol=1e-6, abs_tol=1e-7), (tag, step)

    shown = runner.invoke(app, ["watch", str(out), "--once"])
    assert shown.exit_code == 0, shown.output
    assert "step 2/2 (finished" in shown.output and "grpo on sort" in shown.output
    row = next(line for line in shown.output.splitlines() if line.startswith("reward_mean "))
    assert f"{metrics[-1]['reward_mean']:.4g}" in row
    assert "eval/accuracy (step 2)" in shown.output
    # a folder with tb/ in it is still a run folder: --overwrite may empty it
    again = runner.invoke(app, ["train", "--task", "sort", "--steps", "1", "--out", str(out), "--overwrite", *SMALL])
    assert again.exit_code == 0, again.output
    assert not (out / "tb").exists()


def test_a_resumed_run_replaces_the_events_after_its_checkpoint(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    first = runner.invoke(app, ["train", "--task", "sort", "--steps", "2", "--out", str(out), "save_every=1",
                                "log=tensorboard", *SMALL])
    assert first.exit_code == 0, first.output
    (out / "latest").unlink()
    shutil.rmtree(out / "checkpoint-2")  # the run resumes from step 1 and logs step 2 again
    resumed = runner.invoke(app, ["train", "--resume", "--out", str(out), "--steps", "3"])
    assert resumed.exit_code == 0, resumed.output
    events = EventAccumulator(str(out / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3]  # step 2 once: the first run's was purged
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e.value for e in events.Scalars("entropy")] == pytest.approx([m["entropy"] for m in metrics])


def test_a_nonfinite_value_is_left_out_of_the_trackers(tmp_path):
    pytest.importorskip("tensorboard")
    run = RunFolder(tmp_path / "r")
    run.write_config(TrainConfig(recipe=get_recipe("grpo"), log="tensorboard"))
    run.append("metrics.jsonl", {"step": 1, "loss": float("nan"), "reward_mean": 0.5})
    run.append("metrics.jsonl", {"step": 2, "loss": 0.25, "reward_mean": 0.75})
    run.close_trackers()
    assert tensorboard_scalars(tmp_path / "r" / "tb") == {"reward_mean": {1: 0.5, 2: 0.75}, "loss": {2: 0.25}}


def test_wandb_writes_an_offline_run_into_the_run_folder(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc: no credentials
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    assert wandb_mode() == "offline"
    run = RunFolder(tmp_path / "r")
    run.write_config(TrainConfig(recipe=get_recipe("grpo"), log="wandb"))
    run.append("metrics.jsonl", {"step": 1, "reward_mean_marker": 0.5})
    run.append("eval.jsonl", {"step": 1, "accuracy": 0.25})
    run.close_trackers()
    offline = list((tmp_path / "r" / "wandb").glob("offline-run-*"))
    run_id = (tmp_path / "r" / "wandb" / "unipo-run-id").read_text().strip()
    assert len(offline) == 1 and offline[0].name.endswith(run_id)
    history = next(offline[0].glob("run-*.wandb"))
    deadline = time.monotonic() + 30  # W&B's service writes the file in the background, after finish() returns
    while b"eval/accuracy" not in history.read_bytes() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert b"reward_mean_marker" in history.read_bytes() and b"eval/accuracy" in history.read_bytes()


def test_a_tracker_that_is_not_installed_is_one_line_before_the_model_loads(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    monkeypatch.setattr("unipo.models.load_model", lambda *a, **k: pytest.fail("the model loaded"))
    result = runner.invoke(app, ["train", "--steps", "1", "--out", str(tmp_path / "r"), "log=wandb"])
    assert result.exit_code == 2, result.output
    assert result.output.strip() == ("error: log=wandb needs the wandb package, which is not installed: "
                                     "pip install 'unipo[track]' (or pip install wandb)")
    assert not (tmp_path / "r").exists()


def test_watch_of_a_folder_that_is_not_a_run_is_one_line(tmp_path):
    result = runner.invoke(app, ["watch", str(tmp_path), "--once"])
    assert result.exit_code == 2 and result.output.strip() == f"error: {tmp_path} is not a run folder (no config.yaml)"
