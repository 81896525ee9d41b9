"""gymnasium environments as text (unipo.envs.gymnasium_text): FrozenLake's rendering, the strict action parser,
the breadth-first expert against an exhaustive search of the grid, seeded problems, the context budget, training
through the Trainer and the command line, and the one-line errors (gymnasium missing, no expert, bad ids)."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from unipo.agents import render
from unipo.cli import app
from unipo.config import OptimConfig, RolloutConfig, TrainConfig
from unipo.envs import ENVIRONMENTS, get_env
from unipo.envs.gymnasium_text import FrozenLake, gym_environment
from unipo.models import TINY_MAX_POSITIONS, build_char_tokenizer
from unipo.recipes import get_recipe
from unipo.tasks.base import Problem, split_of
from unipo.trainer import Trainer

MOVES = {"left": (0, -1), "down": (1, 0), "right": (0, 1), "up": (-1, 0)}  # FrozenLake's actions 0..3, in order


def lake(rows: list[str], seed: int = 0) -> Problem:
    return Problem(prompt="", answer="", demonstration=None,
                   meta={"kwargs": {"desc": rows, "is_slippery": False}, "seed": seed})


def play(env_cls, problem, actions):
    env = env_cls()
    first = env.reset(problem)
    return env, first, [env.step(a) for a in actions]


def shortest_by_exhaustive_search(rows: list[str], longest: int) -> int | None:
    """The fewest moves from S to G over every sequence of moves, walking the grid by hand (moves into a wall stay
    put, a hole ends the walk): an independent check of gymnasium's transition table and the expert. `where` is the
    set of cells that some sequence of `length` moves, still walking, ends on."""
    n, where = len(rows), {(0, 0)}
    for length in range(1, longest + 1):
        where = {(min(max(r + dr, 0), n - 1), min(max(c + dc, 0), n - 1)) for r, c in where
                 for dr, dc in MOVES.values()}
        if any(rows[r][c] == "G" for r, c in where):
            return length
        where = {(r, c) for r, c in where if rows[r][c] != "H"}
    return None


# -- rendering and parsing -------------------------------------------------------------------------------------
def test_frozen_lake_draws_the_map_with_the_player():
    rows = ["SFF", "FHF", "FFG"]
    env, first, steps = play(FrozenLake, lake(rows), ["down", "right"])
    assert first == "Walk to G, avoid H: left, down, right or up.\n@FF\nFHF\nFFG"
    # down (0,0)->(1,0); right into the hole (1,1) ends the episode, no reward
    assert steps[0] == ("SFF\n@HF\nFFG", 0.0, False, {"tool_errors": 0})
    assert steps[1] == ("SFF\nF@F\nFFG", 0.0, True, {"tool_errors": 0})
    assert env.outcome() == 0.0 and not env.success()
    env, _, steps = play(FrozenLake, lake(rows), ["down", "down", "right", "right"])
    assert [s[1:3] for s in steps] == [(0.0, False), (0.0, False), (0.0, False), (1.0, True)]
    assert steps[-1][0] == "SFF\nFHF\nFF@" and env.outcome() == 1.0
    env, _, steps = play(FrozenLake, lake(rows), ["up", "left"])  # into the walls: the player stays put
    assert [s[0] for s in steps] == ["@FF\nFHF\nFFG"] * 2


@pytest.mark.parametrize("text, action", [("left", 0), ("down", 1), ("right", 2), ("up", 3), ("  Down\n", 1),
                                          ("RIGHT", 2), ("Up ", 3), ("0", 0), ("3", 3), (" 2\n", 2)])
def test_actions_are_a_word_or_the_number(text, action):
    assert FrozenLake.parse_action(text) == action


@pytest.mark.parametrize("text", ["", " ", "go left", "down down", "lef", "left.", "4", "-1", "+1", "01x", "1.0",
                                  "\u0661",  # ARABIC-INDIC DIGIT ONE: int() reads it, the parser must not
                                  "le ft", "downup"])
def test_anything_else_is_an_invalid_action_counted_and_the_episode_goes_on(text):
    assert FrozenLake.parse_action(text) is None
    rows = ["SFF", "FFF", "FFG"]
    env, _, steps = play(FrozenLake, lake(rows), [text, "right", text, "right", "down", "down"])
    assert steps[0] == steps[2] == ("invalid action", 0.0, False, {"tool_errors": 1})
    assert steps[1][0] == "S@F\nFFF\nFFG"  # the invalid action did not move the player
    assert env.invalid_actions == 2 and steps[-1][1:3] == (1.0, True) and env.success()


# -- problems and the expert -----------------------------------------------------------------------------------
def test_sample_is_seeded_and_splits_are_disjoint():
    first, again = FrozenLake.sample(16, seed=7), FrozenLake.sample(16, seed=7)
    assert first == again and [p.meta for p in first] == [p.meta for p in again]
    assert first != FrozenLake.sample(16, seed=8)
    test = FrozenLake.sample(4, seed=7, split="test")
    assert {split_of(p.prompt) for p in first} == {"train"} and {split_of(p.prompt) for p in test} == {"test"}
    assert len({p.prompt for p in first}) > 8  # many different maps
    # the prompt is the map: replaying a problem gives the same first observation
    assert all(FrozenLake().reset(p) == p.prompt for p in first + test)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_expert_takes_a_shortest_path_and_solves_every_problem(seed):
    problems = FrozenLake.sample(8, seed=seed) + FrozenLake.sample(4, seed=seed, split="test")
    for problem in problems:
        actions = FrozenLake.demonstrate(problem)
        assert problem.answer == " ".join(actions)
        assert len(actions) == shortest_by_exhaustive_search(problem.meta["kwargs"]["desc"], FrozenLake.max_turns)
        env, _, steps = play(FrozenLake, problem, actions)
        assert env.outcome() == 1.0 and steps[-1][2] and not any(s[2] for s in steps[:-1])
        # the actions fit the tiny model's budgets (one token per character, + EOS)
        assert max(len(a) + 1 for a in actions) <= FrozenLake.max_action_tokens
        assert sum(len(a) + 1 for a in actions) <= FrozenLake.max_episode_tokens


def test_the_expert_takes_a_shortest_path_on_maps_with_many_holes():
    from gymnasium.envs.toy_text.frozen_lake import generate_random_map

    lengths = []
    for seed in range(40):
        rows = generate_random_map(size=6, p=0.6, seed=seed)  # 6x6, holes with probability 0.4: detours
        actions = FrozenLake.demonstrate(lake(rows))
        assert len(actions) == shortest_by_exhaustive_search(rows, 36), rows
        assert play(FrozenLake, lake(rows), actions)[0].success()
        lengths.append(len(actions))
    assert max(lengths) > 10  # some maps needed a detour (10 moves: straight down and right)


def test_a_detour_around_holes():
    rows = ["SFFF", "HHHF", "FFFF", "FHHG"]
    assert FrozenLake.demonstrate(lake(rows)) == ["right"] * 3 + ["down"] * 3  # only way: along the top, then down
    with pytest.raises(ValueError, match="no sequence of actions solves"):
        FrozenLake.demonstrate(lake(["SHF", "HFF", "FFG"]))  # walled in by holes


def test_the_longest_episode_fits_the_tiny_models_context():
    tokenizer = build_char_tokenizer()
    for env_cls in (FrozenLake, gym_environment("Taxi-v4"), gym_environment("Blackjack-v1")):
        problem = env_cls.sample(1, seed=0)[0]
        env = env_cls()
        first = env.reset(problem)
        # the worst case: every action is an invalid one of the full action budget
        actions = ["x" * (env_cls.max_action_tokens - 1)] * (env_cls.max_turns - 1)
        observations = [env.step(a)[0] for a in actions]
        text = render(tokenizer, first, actions, observations)
        assert len(tokenizer(text)["input_ids"]) + env_cls.max_action_tokens <= TINY_MAX_POSITIONS, env_cls.name


# -- gym:<id>: any gymnasium environment -----------------------------------------------------------------------
def test_any_gymnasium_id_with_its_numbers_as_actions():
    taxi = get_env("gym:Taxi-v4")
    assert taxi is gym_environment("Taxi-v4") and taxi.name == "gym:Taxi-v4" and taxi.has_expert
    assert (taxi.n_actions, taxi.max_turns, taxi.max_action_tokens) == (6, 20, 2)
    for problem in taxi.sample(4, seed=0):
        state = int(problem.prompt.splitlines()[-1])
        assert problem.prompt == f"Taxi-v4, actions 0-5:\n{state}"
        assert taxi.parse_action("5") == 5 and taxi.parse_action("6") is None and taxi.parse_action("pickup") is None
        actions = taxi.demonstrate(problem)
        env, _, steps = play(taxi, problem, actions)
        assert env.success() and steps[-1][1] == 20.0  # the drop-off's reward
        assert all(s[1] == -1.0 for s in steps[:-1])  # a shortest plan: no illegal pick-up or drop-off (-10)
    blackjack = get_env("gym:Blackjack-v1")
    assert not blackjack.has_expert and not get_env("gym:FrozenLake-v1").has_expert  # no table / slippery
    with pytest.raises(ValueError, match="gym:Blackjack-v1 has no expert demonstrations"):
        blackjack.demonstrate(blackjack.sample(1, seed=0)[0])
    # a seeded game: the same problem and actions give the same episode
    problem = blackjack.sample(1, seed=3)[0]
    assert play(blackjack, problem, ["1", "1", "0"])[2] == play(blackjack, problem, ["1", "1", "0"])[2]


@pytest.mark.parametrize("name, message", [
    ("gym:Nope-v0", "environment gym:Nope-v0: Environment `Nope` doesn't exist"),
    ("gym:Pendulum-v1", "only Discrete action spaces can be said as text"),
])
def test_bad_gymnasium_ids_are_one_line_errors(name, message):
    with pytest.raises(ValueError, match=message) as caught:
        get_env(name)
    assert "\n" not in str(caught.value)


def test_a_recipe_that_replays_demonstrations_refuses_an_environment_without_an_expert():
    recipe = dataclasses.replace(get_recipe("multiturn_grpo"), expert_per_group=1)
    TrainConfig(recipe=recipe, env="frozen_lake", rollout=RolloutConfig(group_size=4))
    TrainConfig(recipe=recipe, env="gym:Taxi-v4", rollout=RolloutConfig(group_size=4))
    with pytest.raises(ValueError, match="replays expert demonstrations .* environment gym:Blackjack-v1 has none"):
        TrainConfig(recipe=recipe, env="gym:Blackjack-v1", rollout=RolloutConfig(group_size=4))


# -- gymnasium is optional -------------------------------------------------------------------------------------
def test_without_gymnasium_asking_for_its_environments_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "gymnasium", None)  # `import gymnasium` now raises ImportError
    gym_environment.cache_clear()
    try:
        for name in ("frozen_lake", "gym:Taxi-v4"):
            with pytest.raises(ValueError, match=r"needs the gymnasium package, which is not installed: "
                                                 r"pip install 'unipo\[envs\]'"):
                get_env(name)
        with pytest.raises(ValueError, match="environment frozen_lake needs the gymnasium package"):
            TrainConfig(recipe=get_recipe("multiturn_grpo"), env="frozen_lake")
        assert "frozen_lake" in ENVIRONMENTS  # still listed: the class is registered without the package
    finally:
        gym_environment.cache_clear()


def test_importing_unipo_does_not_import_gymnasium():
    code = ("import sys, unipo, unipo.envs, unipo.cli; unipo.envs.get_env('guess_number'); "
            "assert 'gymnasium' not in sys.modules, 'gymnasium imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


# -- training --------------------------------------------------------------------------------------------------
def params(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def test_multiturn_grpo_trains_on_frozen_lake_through_the_trainer():
    # A random model's actions are all invalid and its episodes all fail: alone, every advantage would be 0 and
    # nothing would change. One replayed demonstration per group (which succeeds) gives the group both outcomes.
    recipe = dataclasses.replace(get_recipe("multiturn_grpo"), expert_per_group=1)
    trainer = Trainer(TrainConfig(recipe=recipe, env="frozen_lake", steps=2, seed=0, device="cpu", eval_problems=1,
                                  rollout=RolloutConfig(prompts_per_step=2, group_size=4),
                                  optim=OptimConfig(lr=1e-3)), progress=False)
    before = params(trainer.model)
    history = trainer.fit()
    for record in history:
        assert math.isfinite(record["loss"]) and record["loss"] != 0.0, record
        # the model's 3 episodes per group: 8 invalid actions each, none solved
        assert (record["env/episodes"], record["env/success"], record["env/turns_mean"]) == (6, 0.0, 8.0), record
        assert record["env/tool_errors"] == 48
    assert any(not torch.equal(a, b) for a, b in zip(before, params(trainer.model)))


def test_train_on_frozen_lake_from_the_command_line(tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "--recipe", "multiturn_grpo", "--env", "frozen_lake", "--steps", "2",
                                      "--out", str(out), "rollout.prompts_per_step=2", "rollout.group_size=2",
                                      "eval_problems=2", "save_every=0"])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert all(math.isfinite(r["loss"]) and r["env/episodes"] == 4 for r in records)
    transcript = json.loads((out / "transcripts.jsonl").read_text().splitlines()[0])
    assert transcript["prompt"].startswith("Walk to G, avoid H") and transcript["turns"]


def test_the_docs_example_wraps_cliff_walking():
    from unipo.envs.gymnasium_text import GymTextEnvironment

    class CliffWalking(GymTextEnvironment):  # docs/agents.md's example (not registered here)
        name, env_id, n_actions = "cliff_walking", "CliffWalking-v1", 4
        action_words = ("up", "right", "down", "left")
        header = "Walk from S to G along the cliff: up, right, down or left.\n"
        max_turns, max_action_tokens, max_episode_tokens = 16, 6, 96

        def render(self, observation):
            row, col = divmod(int(observation), 12)
            return f"row {row} col {col}"

        @staticmethod
        def solved(reward, terminated):
            return bool(terminated)

    problem = CliffWalking.sample(1, seed=0)[0]
    assert problem.prompt.endswith("\nrow 3 col 0")
    actions = CliffWalking.demonstrate(problem)
    assert actions == ["up"] + ["right"] * 11 + ["down"]  # along the cliff's edge: 13 moves
    env, _, steps = play(CliffWalking, problem, ["right"] + actions)
    assert steps[0] == ("row 3 col 0", -100.0, False, {"tool_errors": 0})  # into the cliff: back to the start
    assert steps[-1][:3] == ("row 3 col 11", -1.0, True) and env.success()
