"""`unipo train --config FILE`: a run's config.yaml or `recipes show NAME --yaml` starts a run; flags and key=value
override it; every mistake in the file is one line naming the file and the key."""

from __future__ import annotations

import dataclasses
import re

import pytest
from typer.testing import CliRunner

import unipo.cli as cli
from unipo.cli import app
from unipo.config import RolloutConfig, TrainConfig, load_config_file
from unipo.recipes import RECIPES, get_recipe
from unipo.runs import RunFolder

runner = CliRunner()


@pytest.fixture
def started(monkeypatch):
    """`unipo train` up to the run's start: the config it would train with, without training."""
    configs = []

    class Stop(Exception):
        pass

    def start_run(config, **_):
        configs.append(config)
        raise Stop

    monkeypatch.setattr("unipo.trainer.start_run", start_run)
    monkeypatch.setattr(cli, "USER_ERRORS", cli.USER_ERRORS + (Stop,))
    return configs


def test_a_runs_config_yaml_reads_back_as_the_same_config(tmp_path):
    config = TrainConfig(recipe=get_recipe("chord"), task="sort:k=3", steps=7, seed=3, out=str(tmp_path / "a"),
                         rollout=RolloutConfig(group_size=4, max_new_tokens=12), lora={"r": 4},
                         log="tensorboard")
    RunFolder(tmp_path / "a").write_config(config)
    assert load_config_file(tmp_path / "a" / "config.yaml") == config


@pytest.mark.parametrize("name", list(RECIPES))
def test_recipes_show_yaml_is_a_config_file_of_that_recipe(name, tmp_path):
    shown = runner.invoke(app, ["recipes", "show", name, "--yaml"])
    assert shown.exit_code == 0, shown.output
    (tmp_path / "c.yaml").write_text(shown.output)
    assert load_config_file(tmp_path / "c.yaml") == TrainConfig(recipe=get_recipe(name))


def test_typed_options_and_key_values_override_the_file(tmp_path, started):
    file = tmp_path / "run.yaml"
    file.write_text("recipe: {name: dapo, kl_coef: 0.05}\ntask: sort\nsteps: 9\nseed: 4\n"
                    "rollout: {group_size: 4, prompts_per_step: 2}\n")
    runner.invoke(app, ["train", "--config", str(file), "--out", str(tmp_path / "o")])
    first = started[-1]
    assert (first.recipe.name, first.recipe.kl_coef, first.recipe.loss) == ("dapo", 0.05, "dual_clip")
    assert (first.task, first.steps, first.seed, first.rollout.group_size) == ("sort", 9, 4, 4)
    # options left at their defaults do not override the file; typed ones and key=value do
    runner.invoke(app, ["train", "--config", str(file), "--steps", "2", "--task", "addition", "--out",
                        str(tmp_path / "o"), "rollout.group_size=3", "recipe.kl_coef=0.1"])
    second = started[-1]
    assert (second.task, second.steps, second.seed, second.rollout.group_size, second.recipe.kl_coef) == \
        ("addition", 2, 4, 3, 0.1)
    # --recipe replaces the file's recipe section
    runner.invoke(app, ["train", "--config", str(file), "--recipe", "luffy", "--out", str(tmp_path / "o")])
    assert started[-1].recipe == get_recipe("luffy") and started[-1].steps == 9
    # no out in the file: a fresh folder named after the recipe and the task
    runner.invoke(app, ["train", "--config", str(file)])
    assert re.fullmatch(r"runs/dapo-sort-\d{8}-\d{6}", started[-1].out)
    assert dataclasses.replace(started[-1], out=None) == dataclasses.replace(first, out=None)


@pytest.mark.parametrize("text, message", [
    ("steps: [1\n", r"run\.yaml: not valid YAML: .*\(line 2, column 1\)"),
    ("- steps\n", r"run\.yaml: expected a mapping of key: value at the top, got a list"),
    ("rollout:\n  groupsize: 4\n",
     r"run\.yaml: unknown config key 'rollout\.groupsize' \(did you mean rollout\.group_size\?\); valid: "),
    ("stepz: 4\n", r"run\.yaml: unknown config key 'stepz'"),
    ("steps: four\n", r"run\.yaml: steps must be an int >= 1, got 'four'"),
    ("optim: {lr: -1}\n", r"run\.yaml: optim\.lr must be a finite number > 0, got -1"),
    ("rollout: 4\n", r"run\.yaml: config key 'rollout' is a section, not a value"),
    ("recipe: nope\n", r"run\.yaml: unknown recipe 'nope'; valid: "),
    ("recipe: {name: lufy, kl_coef: 0.1}\n", r"run\.yaml: recipe 'lufy' is not a registered recipe, so the file "
                                             r"must give every recipe key \(missing: summary, paper, family and"),
    ("recipe: {name: dapo, loss_params: {eps: 1}}\n", r"run\.yaml: recipe\.name, recipe\.loss_params: .*unknown "
                                                      r"params \['eps'\]"),
    ("log: [tensorboard, mlflow]\n", r"run\.yaml: log must be some of jsonl, tensorboard, wandb"),
])
def test_a_mistake_in_the_file_is_one_line_naming_the_file_and_key(text, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run.yaml").write_text(text)
    with pytest.raises(ValueError) as error:
        load_config_file("run.yaml")
    assert re.search(message, str(error.value)) and "\n" not in str(error.value), str(error.value)
    result = runner.invoke(app, ["train", "--config", "run.yaml"])
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert re.search(message, result.output), result.output


def test_a_missing_file_and_config_with_resume_are_one_line(tmp_path):
    missing = runner.invoke(app, ["train", "--config", str(tmp_path / "none.yaml")])
    assert missing.exit_code == 2 and "none.yaml' does not exist" in missing.output
    both = runner.invoke(app, ["train", "--config", "x.yaml", "--resume", "--out", str(tmp_path)])
    assert both.exit_code == 2 and "--config starts a new one" in both.output
    (tmp_path / "empty.yaml").write_text("# nothing set\n")
    assert load_config_file(tmp_path / "empty.yaml") == TrainConfig(recipe=get_recipe("grpo"))
