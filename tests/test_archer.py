"""ArCHer (unipo.core.archer, unipo.archer): the critic's maths by hand, its replay buffer, that it fits a known return,
its checkpoint state, and the recipe end to end (a resumed run equals the uninterrupted one)."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tests.test_agents import _sequence_and_env_positions, binary_search_episode
from tests.test_runs import outcome
from tests.test_trainer import TIMING_KEYS, small_config
from unipo.agents import episodes_to_batch, run_episodes
from unipo.archer import ArcherCritic, ReplayBuffer, Transition
from unipo.cli import app
from unipo.core.advantages import compute_advantages
from unipo.core.archer import critic_advantage, critic_loss, episode_transitions, soft_update_target, td_targets
from unipo.core.losses import compute_policy_loss
from unipo.engine.native import NativeEngine
from unipo.envs.games import GuessNumber
from unipo.models import load_model
from unipo.recipes import get_recipe
from unipo.runs import load_trainer_state, save_trainer_state
from unipo.trainer import Trainer, resume_run, start_run

F64 = torch.float64
CPU = torch.device("cpu")
CHEAP = {"critic_steps": 2, "critic_batch": 16, "lr": 1e-3}  # a critic that costs little in the end-to-end tests


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny", device="cpu")


@pytest.fixture(scope="module")
def episodes_batch(tiny):
    """Sampled guess_number episodes of the tiny model: 3 problems x 2 episodes."""
    model, tokenizer = tiny
    episodes = run_episodes(NativeEngine(model), tokenizer, GuessNumber, GuessNumber.sample(3, seed=0), 2,
                            max_new_tokens=4, generator=torch.Generator().manual_seed(0))
    return episodes_to_batch(episodes, tokenizer, CPU)


def critic_for(tiny, seed: int = 0, **params) -> ArcherCritic:
    model, tokenizer = tiny
    critic = ArcherCritic(**{**CHEAP, **params})
    critic.setup(model=model, tokenizer=tokenizer, device=CPU, seed=seed)
    return critic


# -- the maths by hand ----------------------------------------------------------------------------------------------
# Episode 0: 2 turns, turn rewards (1, 0), outcome 1. Episode 1: 3 turns, turn rewards (0, 1, 0.5), outcome 0.
# Rows shuffled: nothing may depend on their order.
ORDER = [3, 0, 4, 2, 1]
EPISODE = torch.tensor([0, 0, 1, 1, 1])[ORDER]
TURN = torch.tensor([0, 1, 0, 1, 2])[ORDER]
TURN_R = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5], dtype=F64)[ORDER]
OUTCOME = torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0], dtype=F64)[ORDER]


def test_transitions_and_td_targets_by_hand():
    rewards, next_row, done = episode_transitions(EPISODE, TURN, TURN_R, OUTCOME)
    # unshuffled: r = (1, 0 + 1 | 0, 1, 0.5 + 0); s' of (e, t) is (e, t + 1); each episode's last turn is terminal
    torch.testing.assert_close(rewards, torch.tensor([1.0, 1.0, 0.0, 1.0, 0.5], dtype=F64)[ORDER])
    assert done.tolist() == [[False, True, False, False, True][i] for i in ORDER]
    position = {(int(e), int(t)): row for row, (e, t) in enumerate(zip(EPISODE, TURN))}
    for row, (e, t) in enumerate(zip(EPISODE.tolist(), TURN.tolist())):
        assert next_row[row] == position.get((e, t + 1), -1)
    # y = r + gamma (1 - done) Vbar(s'), gamma = 0.9, Vbar(s') = 2, 9 (terminal: never read), 3, 4, 9
    next_values = torch.tensor([2.0, 9.0, 3.0, 4.0, 9.0], dtype=F64)[ORDER]
    expected = torch.tensor([1 + 0.9 * 2, 1.0, 0 + 0.9 * 3, 1 + 0.9 * 4, 0.5], dtype=F64)[ORDER]
    torch.testing.assert_close(td_targets(rewards, done, next_values, 0.9), expected)
    torch.testing.assert_close(td_targets(rewards, done, next_values, 0.0), rewards)


def test_advantage_is_min_q_minus_min_v_raw():
    q1, q2 = torch.tensor([1.0, 5.0, -1.0]), torch.tensor([2.0, 3.0, -2.0])
    v1, v2 = torch.tensor([0.5, 4.0, 0.0]), torch.tensor([1.5, 1.0, 1.0])
    torch.testing.assert_close(critic_advantage(q1, q2, v1, v2), torch.tensor([1 - 0.5, 3 - 1.0, -2 - 0.0]))
    baseline = torch.tensor([0.5, 2.0, -2.0])
    got = compute_advantages("archer", torch.zeros(3), torch.zeros(3, dtype=torch.long), baseline=baseline, step=3)
    assert torch.equal(got, baseline)  # not normalised, not centred
    warm = compute_advantages("archer", torch.zeros(3), torch.zeros(3, dtype=torch.long), baseline=baseline, step=1,
                              warmup_steps=2)
    assert torch.equal(warm, torch.zeros(3))
    centred = compute_advantages("archer", torch.zeros(3), torch.zeros(3, dtype=torch.long), baseline=baseline,
                                 step=3, center=True)  # an option, not the authors'
    torch.testing.assert_close(centred, baseline - 0.5 / 3)


def test_critic_loss_and_soft_update_by_hand():
    q, v = (torch.tensor([1.0, 2.0]), torch.tensor([0.0, 0.0])), (torch.tensor([3.0]), torch.tensor([-1.0]))
    y, z = (torch.tensor([0.0, 0.0]), torch.tensor([1.0, 1.0])), (torch.tensor([1.0]), torch.tensor([1.0]))
    # (1 + 4) / 2 + (1 + 1) / 2 + 4 + 4
    assert float(critic_loss(q, v, y, z)) == pytest.approx(2.5 + 1.0 + 4.0 + 4.0)
    target, online = [torch.tensor([1.0, 2.0])], [torch.tensor([3.0, 6.0])]
    soft_update_target(target, online, 0.25)  # 0.25 * online + 0.75 * target
    torch.testing.assert_close(target[0], torch.tensor([1.5, 3.0]))
    soft_update_target(target, online, 1.0)
    assert torch.equal(target[0], online[0])
    with pytest.raises(ValueError, match=r"tau must be a number in \(0, 1\], got 0"):
        soft_update_target(target, online, 0)


def test_critic_and_actor_losses_equal_the_authors_code():
    """tests/golden/archer.json: the authors' ArcherTrainer.critic_loss and actor_loss (@7c771a76), run outside the
    repo on stub networks (its `generator` says how); ours on the same numbers."""
    g = json.loads((Path(__file__).parent / "golden" / "archer.json").read_text())
    t = {k: torch.tensor(g[k]) for k in ("q1", "q2", "v1", "v2", "tq1", "tq2", "logp_sum")}
    reward, done, rows = torch.tensor(g["reward"]), torch.tensor(g["done"]), torch.tensor(g["next_row"])
    y = [td_targets(reward, done, torch.tensor(g[f"{k}_of_observation"])[rows], g["gamma"]) for k in ("tv1", "tv2")]
    ours = critic_loss((t["q1"], t["q2"]), (t["v1"], t["v2"]), (y[0], y[1]), (t["tq1"], t["tq2"]))
    assert float(ours) == pytest.approx(sum(g["their_losses"].values()), abs=1e-6)
    for i, name in enumerate(("q1", "q2")):  # each Q head on its own target twin
        assert float(((t[name] - y[i]) ** 2).mean()) == pytest.approx(g["their_losses"][f"{name}.loss"], abs=1e-6)
    # the actor: -mean(A * sum of the action's log-probs), A from the current critic, any split over tokens
    per_token = (t["logp_sum"] / 3)[:, None].expand(4, 3).contiguous()
    advantage = critic_advantage(t["q1"], t["q2"], t["v1"], t["v2"])
    loss, _ = compute_policy_loss("reinforce", per_token, per_token, advantage, torch.ones(4, 3), "seq_mean_token_sum")
    assert float(loss) == pytest.approx(g["their_pg_loss"], abs=1e-6)


@pytest.mark.parametrize("params, message", [
    ({"gamma": 1.5}, "gamma must be a finite number in [0, 1], got 1.5"),
    ({"tau": 0.0}, "tau must be a finite number in (0, 1], got 0.0"),
    ({"critic_batch": 0}, "critic_batch must be an int >= 1, got 0"),
    ({"backbone": "roberta"}, "backbone must be one of copy, tiny, got 'roberta'"),
])
def test_bad_critic_params_fail_when_the_recipe_is_built(params, message):
    with pytest.raises(ValueError, match="recipe archer: archer_critic: " + re.escape(message)):
        dataclasses.replace(get_recipe("archer"), baseline_params=params)


# -- the replay buffer ----------------------------------------------------------------------------------------------
def _transition(i: int) -> Transition:
    return Transition.of([i, i + 1], [i], float(i), [] if i % 2 else [i, 7], bool(i % 2))


def test_replay_buffer_evicts_the_oldest_and_samples_by_seed():
    buffer = ReplayBuffer(capacity=3)
    buffer.add([_transition(i) for i in range(5)])
    assert len(buffer) == 3 and buffer.inserted == 5
    assert [buffer[k].reward for k in range(3)] == [3.0, 4.0, 2.0]  # slots 0, 1 overwritten by the 4th and 5th
    draws = [buffer.sample(200, torch.Generator().manual_seed(s)) for s in (1, 1, 2)]
    assert draws[0] == draws[1] != draws[2]
    assert {0, 1, 2} == set(draws[0]) and all(40 < draws[0].count(k) < 95 for k in range(3))  # uniform over slots
    again = ReplayBuffer(capacity=99)
    again.load_state_dict(buffer.state_dict())
    assert again.slots == buffer.slots and again.capacity == 3 and again.inserted == 5
    again.add([_transition(5)])  # goes to slot 5 % 3 = 2, as it would have in the original
    assert again[2].reward == 5.0


# -- the critic -----------------------------------------------------------------------------------------------------
def test_the_critic_fits_the_discounted_return_of_a_fixed_replay(tiny):
    """A deterministic policy (its fresh action is the replayed one): the fixed point of both heads is the discounted
    return. Episode A: r = (0, 2), so Q = (0 + 0.5 * 2, 2) = (1, 2); episode B: one turn, r = 0.5."""
    critic = critic_for(tiny, gamma=0.5, tau=0.2, lr=3e-3)
    s0, s1, s2 = [40, 41, 42], [40, 41, 42, 43, 44], [50, 51]
    replay = [Transition.of(s0, [60], 0.0, s1, False), Transition.of(s1, [61], 2.0, [], True),
              Transition.of(s2, [62], 0.5, [], True)]
    critic.buffer.add(replay)
    for _ in range(150):
        metrics = critic.critic_step(replay, [t.action for t in replay])
    with torch.no_grad():
        q1, q2, v1, v2 = critic.critic([t.state for t in replay], [t.action for t in replay], CPU)
    for estimate in (q1, q2, v1, v2):
        torch.testing.assert_close(estimate, torch.tensor([1.0, 2.0, 0.5]), atol=0.05, rtol=0)
    assert metrics["td_error"] < 0.05


def test_checkpoint_round_trip_continues_identically(tiny, episodes_batch, tmp_path):
    first = critic_for(tiny)
    first.prepare(episodes_batch)
    save_trainer_state(tmp_path, {"tracker": first.state_dict()})  # safetensors + JSON, as a run's checkpoint
    second = critic_for(tiny, seed=5)  # another init and other random streams: everything must come from the state
    second.load_state_dict(load_trainer_state(tmp_path)["tracker"])
    a, b = first.prepare(episodes_batch), second.prepare(episodes_batch)
    assert a == b and a["critic/replay_size"] == 2 * len(episodes_batch)
    assert torch.equal(first.baseline(episodes_batch), second.baseline(episodes_batch))
    assert all(torch.equal(x, y) for x, y in zip(first.critic.parameters(), second.critic.parameters()))


def test_the_baseline_of_a_row_is_its_own_turns_advantage_batched_or_alone(tiny, episodes_batch):
    """baseline(batch)[i] = min(Q1, Q2)(s_i, a_i) - min(V1, V2)(s_i) of row i's unpadded prompt and completion, the
    same whether the rows are padded together (and identical states encoded once) or run one at a time."""
    critic = critic_for(tiny)
    critic.prepare(episodes_batch)
    got = critic.baseline(episodes_batch)
    b = episodes_batch
    alone = []
    with torch.no_grad():
        for i in range(len(b)):
            state, action = b.prompt_ids[i][b.prompt_mask[i].bool()], b.completion_ids[i][b.completion_mask[i].bool()]
            alone.append(critic_advantage(*critic.critic([state.tolist()], [action.tolist()], CPU))[0])
    alone = torch.stack(alone)
    torch.testing.assert_close(got, alone, rtol=1e-4, atol=1e-5)
    assert got.std() > 0


def test_environment_tokens_get_exactly_zero_gradient_under_the_critics_advantage(tiny):
    """The actor's loss (reinforce, seq_mean_token_sum) with the critic's advantage: d loss / d log pi is exactly 0 at
    every environment token and -A at each token of the model's own action."""
    model, tokenizer = tiny
    episodes, script = binary_search_episode(tokenizer)
    batch = episodes_to_batch(episodes, tokenizer, CPU)
    critic = critic_for(tiny)
    critic.prepare(batch)
    advantages = critic.baseline(batch)
    assert torch.all(advantages != 0)
    turns, eos = episodes[0].turns, tokenizer.eos_token_id
    for t in range(len(turns)):
        prompt, env = _sequence_and_env_positions(tokenizer, episodes[0].first_observation, turns, t)
        own = tokenizer(script[t], add_special_tokens=False)["input_ids"] + [eos]
        grad = _actor_grad_on_positions(model, prompt + own, len(prompt), advantages[t:t + 1])
        assert env and torch.all(grad[env] == 0), t
        torch.testing.assert_close(grad[len(prompt):], torch.full((len(own),), -float(advantages[t])))


def _actor_grad_on_positions(model, ids: list[int], n_prompt: int, advantage: torch.Tensor) -> torch.Tensor:
    """d loss / d log pi(token j | tokens < j) for every position j >= 1 of `ids`, the loss being the recipe's actor
    loss (reinforce, seq_mean_token_sum) over the row's completion positions j >= n_prompt."""
    x = torch.tensor([ids])
    with torch.no_grad():
        full = torch.log_softmax(model(input_ids=x).logits[0, :-1].float(), -1).gather(1, x[0, 1:, None]).squeeze(1)
    leaf = full.requires_grad_()
    completion = leaf[n_prompt - 1:][None]
    loss, _ = compute_policy_loss("reinforce", completion, completion.detach(), advantage,
                                  torch.ones_like(completion), "seq_mean_token_sum")
    loss.backward()
    return torch.cat([torch.zeros(1), leaf.grad])  # index = position


# -- the recipe -----------------------------------------------------------------------------------------------------
def archer_config(steps: int, **overrides):
    """The recipe with a cheap critic, and the actor learning from the first step (no warm-up)."""
    config = small_config("archer", steps=steps, **overrides)
    return dataclasses.replace(config, recipe=dataclasses.replace(config.recipe, baseline_params=CHEAP,
                                                                  advantage_params={"warmup_steps": 0}))


def test_archer_trains_on_guess_number():
    trainer = Trainer(archer_config(3), progress=False)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    history = trainer.fit()
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in history)
    assert all({"critic/loss", "critic/q_mean", "critic/v_mean", "critic/td_error", "critic/replay_size"} <= r.keys()
               for r in history)
    sizes = [r["critic/replay_size"] for r in history]
    assert sizes == sorted(sizes) and sizes[0] > 0  # every step's turns join the buffer
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))


def test_a_resumed_archer_run_equals_the_uninterrupted_one(tmp_path):
    out = tmp_path / "run"
    trainer = start_run(archer_config(3, out=str(out), save_every=1), progress=False)
    trainer.fit()
    uninterrupted = outcome(trainer, out)
    shutil.rmtree(out / "checkpoint-3")
    resumed = resume_run(str(out), progress=False)
    assert resumed.step == 2
    resumed.fit()
    again = outcome(resumed, out)
    critic_a, critic_b = uninterrupted.pop("tracker"), again.pop("tracker")
    assert again["metrics"] == uninterrupted["metrics"] and again["step"] == 3
    assert all(torch.equal(x, y) for x, y in zip(again["weights"], uninterrupted["weights"], strict=True))
    _assert_same_state(critic_a, critic_b)


def _assert_same_state(a, b) -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _assert_same_state(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same_state(x, y)
    else:
        assert a == b


def test_train_archer_from_the_command_line(tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "--recipe", "archer", "--env", "guess_number", "--steps", "2",
                                      "--out", str(out), "rollout.prompts_per_step=2", "rollout.group_size=2",
                                      "recipe.baseline_params.critic_steps=1", "recipe.baseline_params.critic_batch=8",
                                      "eval_problems=2", "save_every=0"])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and all("critic/loss" in r for r in records)
    assert {k for k in records[0] if k not in TIMING_KEYS} >= {"critic/replay_size", "loss"}
