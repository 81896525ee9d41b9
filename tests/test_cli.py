"""The `unipo` command: bad input gives one line and exit code 2; good input does its job."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from unipo.cli import app
from unipo.recipes import RECIPES

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, list(args))


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--recipe", "nope"], r"unknown recipe 'nope'; valid: .*grpo"),
        (["train", "--task", "nope"], r"unknown task 'nope'; valid: .*addition"),
        (["train", "rollout.groupsize=4"],
         r"unknown config key 'rollout.groupsize' \(did you mean rollout.group_size\?\); valid: "),
        (["train", "notakeyvalue"], r"expected key=value"),
        (["train", "--model", "/nonexistent/model", "--steps", "1"], r"/nonexistent/model"),
        (["eval", "--model", "/nonexistent/model"], r"/nonexistent/model"),
        (["recipes", "show", "nope"], r"unknown recipe 'nope'"),
        (["train", "--resume"], r"--resume needs --out"),
        (["plot", "/nonexistent/run"], r"no metrics"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(args, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run(*args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert re.search(message, lines[0]), lines[0]


def test_nproc_checks_the_settings_before_it_launches_torchrun(tmp_path, monkeypatch):
    """`--nproc N` with a bad setting is one line from this process, not a traceback from each of torchrun's ranks;
    good settings launch torchrun (here a stand-in that records the call)."""
    import unipo.cli

    launched = []
    monkeypatch.setattr(unipo.cli, "launch_torchrun", lambda nproc: launched.append(nproc) or 0)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.chdir(tmp_path)
    bad = run("train", "--recipe", "archer", "--env", "guess_number", "--nproc", "2", "checkpoint_every=3")
    assert bad.exit_code == 2 and launched == []
    assert [line for line in bad.output.splitlines() if line.strip()][0].startswith(
        "error: unknown config key 'checkpoint_every'")
    assert run("train", "--recipe", "nope", "--nproc", "2").exit_code == 2 and launched == []
    good = run("train", "--recipe", "archer", "--env", "guess_number", "--nproc", "2", "save_every=3")
    assert good.exit_code == 0 and launched == [2] and not (tmp_path / "runs").exists()


def test_recipes_table_lists_every_recipe_and_show_prints_its_slots():
    listing = run("recipes")
    assert listing.exit_code == 0
    for name in RECIPES:
        assert name in listing.output
    shown = run("recipes", "show", "dapo")
    assert shown.exit_code == 0
    config = yaml.safe_load(shown.output)
    assert config["loss"] == "dual_clip" and config["dynamic_sampling"] is True and config["mini_batches"] == 16
    assert config["loss_params"] == {"eps_low": 0.2, "eps_high": 0.28, "clip_ratio_c": 10.0}


def test_train_then_eval_then_plot_then_resume(tmp_path):
    out = tmp_path / "run"
    trained = run("train", "--recipe", "grpo", "--task", "addition", "--steps", "2", "--out", str(out),
                  "rollout.prompts_per_step=2", "rollout.group_size=2", "eval_problems=4")
    assert trained.exit_code == 0, trained.output
    assert (out / "curves.png").exists() and (out / "checkpoint-2").is_dir()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["rollout"]["group_size"] == 2 and config["recipe"]["name"] == "grpo"

    evaluated = run("eval", "--model", str(out / "checkpoint-2"), "--task", "addition", "--n", "4", "--k", "1,2")
    assert evaluated.exit_code == 0, evaluated.output
    assert "pass@2" in evaluated.output

    plotted = run("plot", str(out), "--out", str(tmp_path / "p.png"))
    assert plotted.exit_code == 0 and Path(tmp_path / "p.png").stat().st_size > 1000

    resumed = run("train", "--resume", "--out", str(out), "--steps", "3")
    assert resumed.exit_code == 0, resumed.output
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]


def test_readme_test_command_is_what_ci_runs():
    root = Path(__file__).resolve().parents[1]
    readme_lines = (root / "README.md").read_text().splitlines()
    commands = [line for line in readme_lines[:4] if line.startswith("python3 -m venv")]
    assert len(commands) == 2, "the README must open with the demo and test commands"
    assert "unipo demo" in commands[0]
    assert commands[1] in (root / ".ci" / "run").read_text()


def test_docs_recipes_md_is_generated_from_the_code():
    root = Path(__file__).resolve().parents[1]
    from unipo.recipes import catalogue_markdown

    assert (root / "docs" / "recipes.md").read_text() == catalogue_markdown(), \
        "docs/recipes.md is stale: regenerate it with `unipo recipes --markdown > docs/recipes.md`"
