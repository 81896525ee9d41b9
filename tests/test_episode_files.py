"""Recorded episode files (unipo.episode_files) and SWEET-RL trained from one offline."""

from __future__ import annotations

import dataclasses
import json
import random

import pytest
import torch
from typer.testing import CliRunner

from tests.scripted_engine import ScriptedEngine
from tests.test_sweet import RankByNumber
from unipo.agents import run_episodes
from unipo.cli import app
from unipo.collect import RolloutCollector
from unipo.config import RolloutConfig, TrainConfig
from unipo.envs.games import GuessNumber
from unipo.episode_files import episode_record, read_episode_file, step_problems, write_episodes
from unipo.models import load_model
from unipo.recipes import get_recipe


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny", device="cpu")


def recorded_file(tokenizer, path, *, problems=3, group=2):
    """Episodes of a scripted player that guesses 8, then 4 or 12, then a random number (seeded): some succeed."""
    guesses = random.Random(0)

    def policy(text: str) -> str:
        said = text.count("\n> ")
        return ["8", "4" if guesses.random() < 0.5 else "12"][said] if said < 2 else str(guesses.randint(1, 15))

    drawn = GuessNumber.sample(problems, seed=1, split="train")
    episodes = run_episodes(ScriptedEngine(tokenizer, policy), tokenizer, GuessNumber, drawn, group, max_new_tokens=4)
    write_episodes(path, [episode_record("guess_number", e.group, e) for e in episodes])
    return episodes


def offline_collector(tiny, path, *, prompts=2, **params):
    model, tokenizer = tiny
    recipe = get_recipe("sweet_rl")
    recipe = dataclasses.replace(recipe, data_params={"candidates": 2, "pairs_per_state": 1, "trajectories": str(path),
                                                      **params})
    return RolloutCollector(model, tokenizer, None, recipe, RolloutConfig(prompts_per_step=prompts, group_size=2),
                            max_new_tokens=4, device=torch.device("cpu"), generator=torch.Generator().manual_seed(0),
                            engine=ScriptedEngine(tokenizer, lambda text: "5"), env="guess_number",
                            critic=RankByNumber())


def test_step_problems_covers_the_file_once_per_pass_in_seeded_orders():
    steps = [step_problems(5, 2, seed=3, step=s) for s in range(5)]  # 10 draws: two passes over 5 problems
    flat = [i for step in steps for i in step]
    assert sorted(flat[:5]) == sorted(flat[5:]) == list(range(5)) and flat[:5] != flat[5:]
    assert steps == [step_problems(5, 2, seed=3, step=s) for s in range(5)]  # the same seed, the same order
    # one stream, however it is cut into steps (7 draws over 3 problems: passes of 3, 3 and a third's first 1)
    assert step_problems(3, 7, seed=0, step=0) == [step_problems(3, 1, seed=0, step=s)[0] for s in range(7)]


def test_offline_sweet_rl_trains_from_the_files_episodes_replayed(tiny, tmp_path):
    """Each step, the critic learns from the file's episodes of the step's problems (the recorded actions, replayed:
    the environment's observations, turn rewards and outcomes), and the pairs are ranked at their turn states."""
    model, tokenizer = tiny
    path = tmp_path / "episodes.jsonl"
    recorded = recorded_file(tokenizer, path)
    assert 0 < sum(e.success for e in recorded) < len(recorded)
    collector = offline_collector(tiny, path)
    batch, stats = collector.collect(seed=0, step=0)
    seen = collector.critic.prepared[0]
    chosen = step_problems(3, 2, seed=0, step=0)
    expected = [e for i in chosen for e in recorded if e.group == i]
    assert seen.texts == [t.action for e in expected for t in e.turns]  # the recorded actions, problem by problem
    assert seen.turn_rewards.tolist() == [t.reward for e in expected for t in e.turns]
    assert seen.episode_rewards.tolist() == [e.outcome for e in expected for _ in e.turns]
    assert seen.prompt_index.tolist() == [g for g, i in enumerate(chosen) for e in recorded if e.group == i
                                          for _ in e.turns]
    assert seen.references == [e.problem.answer for e in expected for _ in e.turns]
    assert not bool(seen.off_policy.any())  # the policy's turn states: candidates are drawn at every one
    assert stats["rollout/turn_states"] == len(seen) and len(batch) == 2 * len(seen)
    assert stats["env/episodes"] == len(expected) and stats["rollout/generation_rounds"] == 0.0


def test_a_replay_that_disagrees_with_the_file_and_malformed_files_are_one_line_errors(tiny, tmp_path):
    model, tokenizer = tiny
    path = tmp_path / "episodes.jsonl"
    recorded_file(tokenizer, path, problems=1, group=1)
    record = json.loads(path.read_text())
    record["outcome"] = 1.0 - record["outcome"]
    path.write_text(json.dumps(record) + "\n")
    with pytest.raises(ValueError, match=r"line 1: replaying its actions in guess_number gives outcome"):
        offline_collector(tiny, path, prompts=1).collect(seed=0, step=0)
    cases = [("not json\n", "line 1: not JSON"), (json.dumps({"env": "guess_number"}) + "\n", "line 1: missing "
             "problem_id, problem, actions, outcome, success"),
             (json.dumps({**record, "env": "calculator"}) + "\n", "an episode of 'calculator', and this run's"),
             (json.dumps({**record, "actions": []}) + "\n", "actions must be a non-empty list of strings"),
             (json.dumps(record) + "\n" + json.dumps({**record, "problem": {**record["problem"], "answer": "99"}}),
              "line 2: problem_id 0 was another problem on an earlier line"), ("\n", "no episodes")]
    for text, message in cases:
        path.write_text(text)
        with pytest.raises(ValueError, match=message):
            read_episode_file(path, "guess_number")
    with pytest.raises(ValueError, match="recipe.data_params.trajectories must be an episode file"):
        TrainConfig(recipe=dataclasses.replace(get_recipe("sweet_rl"), data_params={"trajectories": "/nope.jsonl"}),
                    env="guess_number")


def test_unipo_episodes_records_a_file_that_sweet_rl_trains_on(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    made = runner.invoke(app, ["episodes", "--env", "guess_number", "--out", "data/ep.jsonl", "--problems", "3",
                               "--group", "2"])
    assert made.exit_code == 0, made.output
    lines = (tmp_path / "data" / "ep.jsonl").read_text().splitlines()
    assert len(lines) == 6 and [json.loads(line)["problem_id"] for line in lines] == [0, 0, 1, 1, 2, 2]
    assert "wrote 6 episodes of 3 problems to data/ep.jsonl (success " in made.output
    bad = runner.invoke(app, ["episodes", "--env", "guess_number", "--out", "data"])
    assert bad.exit_code == 2 and "is a folder" in bad.output
    trained = runner.invoke(app, ["train", "--recipe", "sweet_rl", "--env", "guess_number", "--steps", "1",
                                  "--out", "run", "recipe.data_params.trajectories=data/ep.jsonl",
                                  "recipe.data_params.candidates=2", "rollout.prompts_per_step=2", "eval_problems=2"])
    assert trained.exit_code == 0, trained.output
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["env/episodes"] == 4.0 and metrics[0]["rollout/pairs"] > 0
    missing = runner.invoke(app, ["train", "--recipe", "sweet_rl", "--env", "guess_number",
                                  "recipe.data_params.trajectories=nope.jsonl"])
    assert missing.exit_code == 2 and "no such file" in missing.output
