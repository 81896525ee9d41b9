"""Multi-turn episodes (unipo.agents, unipo.core.turns): the per-turn row layout keeps environment tokens out of
every loss, the credit slots give their documented advantages on a hand-computed example, and the command runs."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from tests.scripted_engine import SAMPLED_LOGP, ScriptedEngine
from unipo.agents import episode_stats, episodes_to_batch, information_gain, render, run_episodes
from unipo.cli import app
from unipo.core.advantages import compute_advantages
from unipo.core.losses import compute_policy_loss
from unipo.core.turns import discounted_turn_returns
from unipo.envs.games import Calculator, GuessNumber
from unipo.envs.tools import ToolRunner
from unipo.models import load_model
from unipo.rollout import policy_logprobs
from unipo.tasks.base import Problem

F64 = torch.float64


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny", device="cpu")


def binary_search_episode(tokenizer, target: int = 3):
    problem = Problem(prompt=GuessNumber.sample(1, seed=0)[0].prompt, answer=str(target),
                      demonstration=None, meta={"target": target})
    script = GuessNumber.demonstrate(problem)  # 8, 4, 2, 3
    engine = ScriptedEngine(tokenizer, lambda text: script[text.count("\n> ") - 1])
    episodes = run_episodes(engine, tokenizer, GuessNumber, [problem], 1, max_new_tokens=4)
    return episodes, script


def test_rows_are_turns_and_completions_are_only_the_models_own_tokens(tiny):
    _, tokenizer = tiny
    episodes, script = binary_search_episode(tokenizer)
    batch = episodes_to_batch(episodes, tokenizer, torch.device("cpu"))
    assert len(batch) == len(script) == 4 and episodes[0].success
    eos = tokenizer.eos_token_id
    for t, action in enumerate(script):
        own = tokenizer(action, add_special_tokens=False)["input_ids"] + [eos]
        assert batch.completion_ids[t][batch.completion_mask[t].bool()].tolist() == own
        assert torch.equal(batch.sampling_logp[t], SAMPLED_LOGP * batch.completion_mask[t].float())
        prompt = tokenizer.decode(batch.prompt_ids[t][batch.prompt_mask[t].bool()])
        observations = [e.observation for e in episodes[0].turns[:t]]
        assert prompt == render(tokenizer, episodes[0].first_observation, script[:t], observations)
    assert batch.episode_ids.tolist() == [0] * 4 and batch.turn_index.tolist() == [0, 1, 2, 3]
    assert batch.turn_rewards.tolist() == [1.0] * 4 and batch.episode_rewards.tolist() == [1.0] * 4
    assert int(batch.completion_mask.sum()) == sum(len(a) + 1 for a in script)  # no observation token trained


def _sequence_and_env_positions(tokenizer, first_observation, turns, prompt_upto: int):
    """The built-in-format token sequence [prompt of turn `prompt_upto` | its action + EOS] and the positions of
    environment text in it (the first observation and every observation), by character (the char tokenizer)."""
    text, env = first_observation, list(range(len(first_observation)))
    for turn in turns[:prompt_upto]:
        text += f"\n> {turn.action}\n"
        env += list(range(len(text), len(text) + len(turn.observation)))
        text += turn.observation
    text += "\n> "
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids, env


def _loss_grad_on_positions(model, ids: list[int], n_prompt: int) -> torch.Tensor:
    """d loss / d log pi(token j | tokens < j) for every position j >= 1 of `ids`, where the loss is the trainer's
    (ppo_clip, seq_mean_token_mean, advantage 1) over the row's completion positions j >= n_prompt."""
    x = torch.tensor([ids])
    logits = model(input_ids=x).logits[0, :-1].float()
    full = torch.log_softmax(logits, -1).gather(1, x[0, 1:, None]).squeeze(1)  # position j at index j - 1
    leaf = full.detach().requires_grad_()
    completion = leaf[n_prompt - 1:][None]
    loss, _ = compute_policy_loss("ppo_clip", completion, completion.detach(), torch.ones(1),
                                  torch.ones_like(completion), "seq_mean_token_mean", eps_low=0.2, eps_high=0.2)
    loss.backward()
    return torch.cat([torch.zeros(1), leaf.grad])  # index = position


def test_environment_tokens_get_exactly_zero_gradient(tiny):
    model, tokenizer = tiny
    episodes, script = binary_search_episode(tokenizer)
    batch = episodes_to_batch(episodes, tokenizer, torch.device("cpu"))
    turns, eos = episodes[0].turns, tokenizer.eos_token_id
    for t in range(len(turns)):
        prompt, env = _sequence_and_env_positions(tokenizer, episodes[0].first_observation, turns, t)
        own = tokenizer(script[t], add_special_tokens=False)["input_ids"] + [eos]
        grad = _loss_grad_on_positions(model, prompt + own, len(prompt))
        assert env and torch.all(grad[env] == 0), t  # exactly zero, every environment token
        assert torch.all(grad[len(prompt):] != 0), t  # and every token of the model's own action is trained
        # the positions trained are the trainer's: its forward over row t gives the same log-probs there
        with torch.no_grad():
            row = policy_logprobs(model, batch.prompt_ids[t:t + 1], batch.prompt_mask[t:t + 1],
                                  batch.completion_ids[t:t + 1], batch.completion_mask[t:t + 1]).logp
            x = torch.tensor([prompt + own])
            full = torch.log_softmax(model(input_ids=x).logits[0, :-1].float(), -1).gather(1, x[0, 1:, None])
        torch.testing.assert_close(row[0][batch.completion_mask[t].bool()], full[len(prompt) - 1:, 0],
                                   rtol=1e-4, atol=1e-5)
    # The check can fail: the naive layout (the whole conversation after the first observation as one completion)
    # trains on the observations, and the same check sees non-zero gradient there.
    first = episodes[0].first_observation
    whole, env = _sequence_and_env_positions(tokenizer, first, turns, len(turns))
    n_prompt = len(tokenizer(first, add_special_tokens=False)["input_ids"])
    grad = _loss_grad_on_positions(model, whole + [eos], n_prompt)
    assert torch.any(grad[[p for p in env if p >= n_prompt]] != 0)


# -- credit slots ---------------------------------------------------------------------------------------------
# One problem, two episodes. Episode 0: 2 turns, turn rewards (1, 1), outcome 1. Episode 1: 3 turns, turn rewards
# (0, 1, 0), outcome 0. Rows in a shuffled order, to show nothing depends on it.
ORDER = [3, 0, 4, 2, 1]
EPISODE = torch.tensor([0, 0, 1, 1, 1])[ORDER]
TURN = torch.tensor([0, 1, 0, 1, 2])[ORDER]
TURN_R = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0], dtype=F64)[ORDER]
OUTCOME = torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0], dtype=F64)[ORDER]
S = 1 / math.sqrt(2)  # two values a != b: (a - mean) / std = +-(|a-b|/2) / (|a-b|/sqrt 2) = +-1/sqrt 2 (eps aside)
HAND = {
    # outcome advantage: +S for each turn of episode 0, -S for each of episode 1 (each episode counted once)
    "episode_outcome": ({}, [S, S, -S, -S, -S]),
    # A^O + A^T on turns before the last: turn 0 rewards (1, 0) -> +-S; turn 1 of episode 1 ties nobody (episode 0's
    # turn 1 is its last, but still in the turn-1 statistics: rewards (1, 1) -> 0); last turns get A^O alone
    "mt_grpo": ({"turn_coef": 1.0}, [2 * S, S, -2 * S, -S, -S]),
    # gamma 0.5: G = r_t + 0.5 r_(t+1) + ... + 0.5^(T-1-t) * outcome.
    # episode 0: G0 = 1 + .5 * 1 + .5 * 1 = 2, G1 = 1 + 1 = 2; episode 1: G0 = 0 + .5 + 0 = .5, G1 = 1, G2 = 0.
    # per turn index: t0 (2, .5) -> +-S; t1 (2, 1) -> +-S; t2 (0) alone -> 0
    "turn_discounted": ({"gamma": 0.5}, [S, S, -S, -S, 0.0]),
}


@pytest.mark.parametrize("name", sorted(HAND))
def test_credit_slots_give_the_hand_computed_advantages(name):
    params, expected = HAND[name]
    inputs = {"episode_ids": EPISODE, "episode_rewards": OUTCOME}
    if name != "episode_outcome":
        inputs.update(turn_index=TURN, turn_rewards=TURN_R)
    got = compute_advantages(name, OUTCOME.clone(), torch.zeros(5, dtype=torch.long), **params, **inputs)
    want = torch.tensor(expected, dtype=F64)[ORDER]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)  # eps = 1e-6 in the std's denominator


def test_discounted_turn_returns_by_hand():
    returns = discounted_turn_returns(EPISODE, TURN, TURN_R, OUTCOME, 0.5)
    torch.testing.assert_close(returns, torch.tensor([2.0, 2.0, 0.5, 1.0, 0.0], dtype=F64)[ORDER])


@pytest.mark.parametrize("name", [*sorted(HAND), "igpo"])
def test_on_one_turn_episodes_each_slot_is_grpo(name):
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.5], dtype=F64)
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    inputs = {"episode_ids": torch.arange(6), "episode_rewards": rewards}
    if name in ("mt_grpo", "turn_discounted"):
        inputs.update(turn_index=torch.zeros(6, dtype=torch.long), turn_rewards=rewards)
    if name == "igpo":
        inputs.update(turn_index=torch.zeros(6, dtype=torch.long), info_gain=torch.zeros(6, dtype=F64))
    got = compute_advantages(name, rewards, groups, **HAND.get(name, ({},))[0], **inputs)
    expected = compute_advantages("grpo", rewards, groups)
    if name == "turn_discounted":  # gamma^0 * outcome + the turn reward: 2r, the same after standardising
        expected = compute_advantages("grpo", 2 * rewards, groups)
    torch.testing.assert_close(got, expected)


# -- tool errors in episodes, and the command ------------------------------------------------------------------
def test_tool_errors_are_counted_and_the_episode_still_succeeds(tiny):
    _, tokenizer = tiny
    problem = Calculator.sample(1, seed=5)[0]
    script = ["<tool>calc(expression=1+)</tool>", *Calculator.demonstrate(problem)]
    engine = ScriptedEngine(tokenizer, lambda text: script[text.count("\n> ") - 1])

    class Env(Calculator):
        def __init__(self) -> None:
            super().__init__(runner=RUNNER)

    RUNNER = ToolRunner(timeout_s=2.0)
    try:
        episodes = run_episodes(engine, tokenizer, Env, [problem], 2, max_new_tokens=40)
    finally:
        RUNNER.close()
    stats = episode_stats(episodes)
    assert stats == {"env/turns_mean": 3.0, "env/success": 1.0, "env/tool_errors": 2.0, "env/episodes": 2.0}
    assert [t.observation for t in episodes[0].turns] == ["tool error: malformed call (syntax error)",
                                                          f"= {problem.answer}", "correct"]


def test_train_multiturn_grpo_on_guess_number_from_the_command_line(tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "--recipe", "multiturn_grpo", "--env", "guess_number", "--steps", "3",
                                      "--out", str(out), "rollout.prompts_per_step=2", "rollout.group_size=2",
                                      "rollout.max_new_tokens=2", "eval_problems=2", "save_every=0"])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all({"env/turns_mean", "env/success", "env/tool_errors"} <= r.keys() for r in records)
    transcripts = [json.loads(line) for line in (out / "transcripts.jsonl").read_text().splitlines()]
    assert len(transcripts) == 2 and transcripts[0]["turns"] and "observation" in transcripts[0]["turns"][0]
    assert json.loads((out / "eval.jsonl").read_text().splitlines()[-1])["env/episodes"] == 2


def test_env_needs_a_multiturn_recipe():
    from unipo.config import TrainConfig
    from unipo.recipes import get_recipe

    with pytest.raises(ValueError, match="recipe grpo is single-turn"):
        TrainConfig(recipe=get_recipe("grpo"), env="guess_number")
    with pytest.raises(ValueError, match="unknown environment 'nope'; valid: calculator, frozen_lake, guess_number"):
        TrainConfig(recipe=get_recipe("mt_grpo"), env="nope")


def test_igpo_gives_the_hand_computed_advantages():
    # turn rewards: episode 0 (IG .2, then its outcome 1), episode 1 (IG 0, IG .4, then its outcome 0)
    info_gain = torch.tensor([0.2, 0.9, 0.0, 0.4, 0.9], dtype=F64)[ORDER]  # a last turn's IG is not read
    rewards = [0.2, 1.0, 0.0, 0.4, 0.0]
    mean = sum(rewards) / 5
    std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / 4)
    z = [(r - mean) / (std + 1e-6) for r in rewards]
    expected = torch.tensor([z[0] + z[1], z[1], z[2] + z[3] + z[4], z[3] + z[4], z[4]], dtype=F64)[ORDER]
    got = compute_advantages("igpo", OUTCOME.clone(), torch.zeros(5, dtype=torch.long), episode_ids=EPISODE,
                             turn_index=TURN, info_gain=info_gain, episode_rewards=OUTCOME, gamma=1.0)
    torch.testing.assert_close(got, expected)


def test_information_gain_is_the_rise_in_the_gold_answers_probability(tiny):
    model, tokenizer = tiny
    episodes, _ = binary_search_episode(tokenizer)
    information_gain(model, tokenizer, episodes, torch.device("cpu"))
    answer = tokenizer("3", add_special_tokens=False)["input_ids"]
    p = []
    with torch.no_grad():
        for turn in episodes[0].turns:  # turn k's prompt is the conversation after k turns
            x = torch.tensor([turn.prompt_ids + answer])
            logp = torch.log_softmax(model(input_ids=x).logits[0, -len(answer) - 1:-1].float(), -1)
            p.append(math.exp(logp.gather(1, torch.tensor(answer)[:, None]).mean()))
    got = [turn.info_gain for turn in episodes[0].turns]
    assert got == pytest.approx([p[1] - p[0], p[2] - p[1], p[3] - p[2], 0.0], abs=1e-5)
    assert any(g != 0 for g in got[:3])


def test_resume_drops_transcripts_written_after_the_checkpoint(tmp_path):
    out = tmp_path / "run"
    common = ["--out", str(out), "rollout.prompts_per_step=2", "rollout.group_size=2", "rollout.max_new_tokens=2",
              "eval_problems=2"]
    first = CliRunner().invoke(app, ["train", "--recipe", "mt_grpo", "--env", "guess_number", "--steps", "1",
                                     *common])
    assert first.exit_code == 0, first.output
    with (out / "transcripts.jsonl").open("a") as fh:  # as if a run had evaluated past its last checkpoint
        fh.write(json.dumps({"step": 9, "turns": []}) + "\n")
    again = CliRunner().invoke(app, ["train", "--resume", "--out", str(out), "--steps", "2"])
    assert again.exit_code == 0, again.output
    steps = [json.loads(line)["step"] for line in (out / "transcripts.jsonl").read_text().splitlines()]
    assert steps == [1, 1, 2, 2]


def test_a_chat_template_is_given_the_tool_schemas_and_tool_results_as_tool_messages():
    """With a chat template, an environment's tools reach the template as JSON schemas (from the tool's signature and
    docstring) and a tool's result is a `tool` message; without one, the built-in format is unchanged."""
    from unipo.agents import expert_episodes, tool_schemas
    from unipo.envs.tools import register_tool
    from unipo.models import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    plain = expert_episodes(tokenizer, Calculator, Calculator.sample(1, seed=0), 1)[0]
    problem = plain.problem
    assert tokenizer.decode(plain.turns[1].prompt_ids) == (
        f'{problem.prompt}\n> {Calculator.demonstrate(problem)[0]}\n= {problem.answer}\n> ')
    tokenizer.chat_template = (
        "{% if tools %}[tools:{% for t in tools %} {{ t['function']['name'] }}({{ "
        "t['function']['parameters']['required'] | join(',') }}): {{ t['function']['description'] }}{% endfor %}]\n"
        "{% endif %}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}")
    episode = expert_episodes(tokenizer, Calculator, [problem], 1)[0]
    schema = tool_schemas(("calc",))[0]["function"]
    assert schema["parameters"]["properties"]["expression"]["type"] == "string"
    call = Calculator.demonstrate(problem)[0]
    assert tokenizer.decode(episode.turns[1].prompt_ids) == (
        f"[tools: calc(expression): {schema['description']}]\n<user>{problem.prompt}\n<assistant>{call}\n"
        f"<tool>= {problem.answer}\n<assistant>")
    assert [t.observation_role for t in episode.turns] == ["tool", "user"]

    def undocumented(x: int) -> float:
        return float(x)

    with pytest.raises(ValueError, match="tool undocumented: document it"):
        register_tool(undocumented)

    def unannotated(x: int):
        """No return type.

        Args:
            x: a number
        """
        return x

    with pytest.raises(ValueError, match="tool unannotated: annotate what it returns: -> float, -> int or -> str"):
        register_tool(unannotated)


def scripted_calculator(tokenizer, *, pad_first_call: int = 0, alternate: bool = True):
    """A scripted calculator player: with `alternate`, on a problem with an odd first factor, every second episode
    (by how often it has seen that first prompt) calls calc("1+1") and so fails; all others call the product and
    answer its value. A first call padded with `pad_first_call` spaces is cut off at the action budget (the call
    itself still runs)."""
    import collections
    import re

    seen = collections.Counter()

    def policy(text: str) -> str:
        a, b = map(int, re.search(r"What is (\d+)\*(\d+)\?", text).groups())
        if "\n= " not in text:  # the first turn: no tool result yet
            seen[text] += 1
            if alternate and a % 2 and seen[text] % 2 == 0:
                return '<tool>calc("1+1")</tool>'
            return f'<tool>calc("{a}*{b}")</tool>' + " " * pad_first_call
        return str(a * b)

    return ScriptedEngine(tokenizer, policy)


def calculator_collector(tiny, recipe, engine, *, prompts=3, group=2, tries=3):
    from unipo.collect import RolloutCollector
    from unipo.config import RolloutConfig

    model, tokenizer = tiny
    rollout = RolloutConfig(prompts_per_step=prompts, group_size=group, max_resample_tries=tries)
    return RolloutCollector(model, tokenizer, None, recipe, rollout, max_new_tokens=32, device=torch.device("cpu"),
                            generator=torch.Generator().manual_seed(0), engine=engine, env="calculator")


def test_dynamic_sampling_keeps_only_problems_whose_episodes_disagree_and_refills(tiny):
    """DAPO's filter on episodes: problems whose own episodes all succeed (an even first factor, here) are dropped;
    more problems are drawn, round by round, until the step has its 3 problems of mixed success; each kept problem's
    episodes form one group, numbered 0, 1, 2 in the order they were kept. Off, the first draw is the batch."""
    import dataclasses

    from unipo.collect import _mix_seed
    from unipo.recipes import get_recipe

    recipe = get_recipe("multiturn_grpo")
    plain, plain_stats = calculator_collector(tiny, recipe, scripted_calculator(tiny[1])).collect(seed=5, step=2)
    first_draw = Calculator.sample(3, seed=_mix_seed(5, 2, 0), split="train")
    assert plain.prompts[::2] == [p.prompt for p in first_draw for _ in range(2)]  # 2 turns an episode
    assert plain_stats["rollout/generation_rounds"] == 1.0 and plain_stats["rollout/groups_kept"] == 3.0

    recipe = dataclasses.replace(recipe, dynamic_sampling=True)
    # (5, 2): the first draw has one even first factor; (1, 2) and (2, 0): a later round keeps its problem 0 as group
    # 1 or 2 while that round's problems 1 and 2 are still to be looked at (the renumbering must not mix them up)
    for seed, step in ((5, 2), (1, 2), (2, 0)):
        batch, stats = calculator_collector(tiny, recipe, scripted_calculator(tiny[1])).collect(seed=seed, step=step)
        expected, rounds = [], 0
        while len(expected) < 3 and rounds <= 3:
            draw = Calculator.sample(3, seed=_mix_seed(seed, step, rounds), split="train")
            expected += [p for p in draw if int(p.meta["expression"].split("*")[0]) % 2][:3 - len(expected)]
            rounds += 1
        assert rounds > 1 and len(expected) == 3
        assert stats["rollout/generation_rounds"] == float(rounds) and stats["rollout/groups_kept"] == 3.0
        assert batch.prompt_index.unique().tolist() == [0, 1, 2]
        for group, problem in enumerate(expected):
            rows = (batch.prompt_index == group).nonzero().flatten().tolist()
            assert len(rows) == 4 and {batch.prompts[r] for r in rows} == {problem.prompt}  # 2 episodes x 2 turns
            assert sorted(set(batch.correct[rows].tolist())) == [False, True]  # one episode solved it, one did not
        assert stats["env/episodes"] == 2.0 * 3 * rounds


def test_zero_truncated_zeroes_the_outcome_of_an_episode_with_an_action_cut_off(tiny):
    """An episode whose first action ran past the 32-token action budget (the call inside it still ran) and then
    answered right: success (the environment's), but outcome 0 under `zero_truncated`; 1 without."""
    import dataclasses

    from unipo.recipes import get_recipe

    recipe = get_recipe("multiturn_grpo")
    for zero, reward in ((False, 1.0), (True, 0.0)):
        engine = scripted_calculator(tiny[1], pad_first_call=20, alternate=False)
        batch, _ = calculator_collector(tiny, dataclasses.replace(recipe, zero_truncated=zero), engine,
                                        prompts=1, group=1).collect(seed=0, step=0)
        assert batch.truncated.tolist() == [True, False] and batch.correct.tolist() == [True, True]
        assert batch.rewards.tolist() == [reward, reward] and batch.turn_rewards.tolist() == [1.0, 1.0]


def test_dynamic_sampling_and_zero_truncated_are_refused_for_trees_and_turn_pairs():
    import dataclasses

    from unipo.config import RolloutConfig, TrainConfig
    from unipo.recipes import get_recipe

    for name in ("tree_grpo", "sweet_rl"):
        for flag in ("dynamic_sampling", "zero_truncated"):
            recipe = dataclasses.replace(get_recipe(name), **{flag: True})
            with pytest.raises(ValueError, match=f"recipe.{flag}=true is not built for recipe.data="):
                TrainConfig(recipe=recipe, env="guess_number", rollout=RolloutConfig(prompts_per_step=2, group_size=8))


def test_critics_that_copy_the_policy_are_refused_under_fsdp_when_the_config_is_built():
    """ArCHer's and SWEET-RL's critics copy the whole policy and sample from it on every rank (replicas under DDP):
    parallel=fsdp, which shards the policy in place, is refused in one line before any model loads."""
    from unipo.config import TrainConfig
    from unipo.recipes import get_recipe

    for name, baseline in (("archer", "archer_critic"), ("sweet_rl", "sweet_critic")):
        TrainConfig(recipe=get_recipe(name), env="guess_number", parallel="ddp")
        with pytest.raises(ValueError, match=f"recipe.baseline={baseline} copies the whole policy and samples from "
                                             f"it on every rank: FSDP shards it; use parallel=ddp"):
            TrainConfig(recipe=get_recipe(name), env="guess_number", parallel="fsdp")
