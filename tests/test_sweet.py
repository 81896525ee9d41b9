"""SWEET-RL (unipo.sweet, unipo.core.sweet): the critic's Bradley-Terry objective and advantage on hand-computed and
golden numbers, the authors' pair rules, the privileged text reaching the critic and never the policy, the critic's
checkpoint state, and the recipe training end to end."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from typer.testing import CliRunner

import unipo.rollout
from unipo.agents import episodes_to_batch, run_episodes
from unipo.cli import app
from unipo.collect import RolloutCollector
from unipo.config import OptimConfig, RolloutConfig, TrainConfig
from unipo.core.sweet import bradley_terry_loss, candidate_pairs, trajectory_pairs, trajectory_scores, turn_advantages
from unipo.critics import StatefulBaseline
from unipo.envs.games import GuessNumber
from unipo.models import load_model
from unipo.recipes import get_recipe
from unipo.rollout import Generation, pad_sequences, policy_logprobs
from unipo.runs import load_trainer_state, save_trainer_state
from unipo.sweet import PRIVILEGED_TEMPLATE, SweetCritic, turn_pair_params
from unipo.tasks.base import Problem
from unipo.trainer import Trainer

F64 = torch.float64


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny", device="cpu")


# -- the maths --------------------------------------------------------------------------------------------------
def test_turn_advantage_is_the_scaled_mean_log_ratio_by_hand():
    logp = torch.tensor([[-1.0, -2.0, -9.0], [-0.5, -9.0, -9.0], [-9.0, -9.0, -9.0]], dtype=F64)
    ref = torch.tensor([[-1.5, -1.0, 0.0], [-0.25, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]])
    got = turn_advantages(logp, ref, mask, beta=0.1)
    # row 0: mean(-1, -2) - mean(-1.5, -1) = -1.5 + 1.25 = -0.25; row 1: -0.5 + 0.25; row 2: no tokens
    torch.testing.assert_close(got, torch.tensor([0.1 * -0.25, 0.1 * -0.25, 0.0], dtype=F64))


def test_trajectory_score_is_the_token_weighted_mean_log_ratio_by_hand():
    # episode 0: turns of 2 and 1 tokens; episode 1: one turn of 4 tokens
    logp_sums = torch.tensor([-3.0, -1.0, -2.0], dtype=F64)
    ref_sums = torch.tensor([-2.0, -1.5, -4.0], dtype=F64)
    counts = torch.tensor([2.0, 1.0, 4.0], dtype=F64)
    scores = trajectory_scores(logp_sums, ref_sums, counts, torch.tensor([0, 0, 1]), 2)
    torch.testing.assert_close(scores, torch.tensor([(-1.0 + 0.5) / 3, 2.0 / 4], dtype=F64))
    loss = bradley_terry_loss(scores[:1], scores[1:], beta=0.1)
    expected = math.log1p(math.exp(-0.1 * (-0.5 / 3 - 0.5)))  # -log sigma(x) = log(1 + e^-x)
    assert float(loss) == pytest.approx(expected, rel=1e-12)


# Golden numbers from the authors' critic loss: collab_openrlhf @87259d4b, DPOTrainer.concatenated_forward with
# mean_log_prob=True and OpenRLHF's DPOLoss(beta=0.1), run outside the repo on random float64 logits (seed 0) for
# one chosen and one rejected trajectory of 2 and 3 assistant turns; these are its per-turn log-prob sums.
GOLDEN = {"row_logp_sums": [-9.53385739722123, -10.339848529857628, -4.9051073423827525, -1.3768095626469727,
                            -12.385535799703026],
          "row_ref_sums": [-11.178899862927647, -8.611371626792135, -4.462593803762274, -3.650953083296828,
                           -12.785759314210317],
          "row_tokens": [3, 4, 2, 1, 4], "row_episode": [0, 0, 1, 1, 1], "beta": 0.1, "loss": 0.7098216942174775,
          "chosen_score": -0.011919205337010805, "rejected_score": 0.31883621379095245}


def test_critic_loss_matches_the_authors_code():
    g = GOLDEN
    scores = trajectory_scores(torch.tensor(g["row_logp_sums"], dtype=F64), torch.tensor(g["row_ref_sums"], dtype=F64),
                               torch.tensor(g["row_tokens"], dtype=F64), torch.tensor(g["row_episode"]), 2)
    assert scores.tolist() == pytest.approx([g["chosen_score"], g["rejected_score"]], abs=1e-14)
    assert float(bradley_terry_loss(scores[:1], scores[1:], g["beta"])) == pytest.approx(g["loss"], abs=1e-14)


def test_critic_loss_gradient_check():
    counts = torch.tensor([2.0, 1.0, 4.0, 3.0], dtype=F64)
    episode = torch.tensor([0, 0, 1, 2])
    ref = torch.tensor([-2.0, -1.5, -4.0, -0.5], dtype=F64)

    def loss(logp_sums):
        s = trajectory_scores(logp_sums, ref, counts, episode, 3)
        return bradley_terry_loss(s[[0, 0]], s[[1, 2]], beta=0.7).sum()

    assert torch.autograd.gradcheck(loss, (torch.tensor([-3.0, -1.0, -2.0, -4.0], dtype=F64, requires_grad=True),))
    # and the analytic gradient of one pair: d/dlogp_r of -log sigma(beta (S0 - S1)) = -beta sigma(-x) / n_e(r) * sign
    x = torch.tensor([-3.0, -1.0, -2.0, 0.0], dtype=F64, requires_grad=True)
    s = trajectory_scores(x, ref, counts, episode, 3)
    bradley_terry_loss(s[:1], s[1:2], beta=0.7).sum().backward()
    margin = 0.7 * float((s[0] - s[1]).detach())
    weight = 0.7 / (1 + math.exp(margin))
    assert x.grad.tolist() == pytest.approx([-weight / 3, -weight / 3, weight / 4, 0.0], rel=1e-12)


def test_trajectory_pairs_follow_the_authors_rule():
    # group 0: best 1.0 first at index 1 (index 2 ties it: neither chosen again nor rejected), worse: 0 and 3;
    # group 1: best 0.5 < 1, no success: no pair; group 2: best 1 at 6 vs 7
    rewards = torch.tensor([0.0, 1.0, 1.0, 0.5, 0.5, 0.0, 1.0, 0.2])
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2])
    chosen, rejected = trajectory_pairs(rewards, groups)
    assert chosen.tolist() == [1, 1, 6] and rejected.tolist() == [0, 3, 7]
    chosen, rejected = trajectory_pairs(rewards, groups, min_chosen_reward=0.5)
    assert chosen.tolist() == [1, 1, 4, 6] and rejected.tolist() == [0, 3, 5, 7]


def test_candidate_pairs_draw_from_the_top_and_bottom_halves():
    scores = torch.tensor([[0.3, -1.0, 2.0, 0.1, 5.0, -3.0], [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    chosen, rejected = candidate_pairs(scores, 400, torch.Generator().manual_seed(0))
    top, bottom = {0, 2, 4}, {1, 3, 5}  # ranks 3..5 and 0..2 of row 0
    assert set(chosen[0].tolist()) == top and set(rejected[0].tolist()) == bottom
    assert bool((scores[0, chosen[0]] > scores[0, rejected[0]]).all())
    # ties (row 1): the stable ranking keeps index order; the upper-half draw is chosen
    assert set(chosen[1].tolist()) == {3, 4, 5} and set(rejected[1].tolist()) == {0, 1, 2}
    # two candidates: always (better, worse)
    chosen, rejected = candidate_pairs(torch.tensor([[2.0, -1.0]]), 5, torch.Generator().manual_seed(1))
    assert chosen.tolist() == [[0] * 5] and rejected.tolist() == [[1] * 5]
    with pytest.raises(ValueError, match="K >= 2"):
        candidate_pairs(torch.zeros(2, 1), 1)


# -- the critic ------------------------------------------------------------------------------------------------
class ScriptedEngine:
    """Sample g of each prompt is the action str(g + 1) (a one-sample call: "1"), log-prob -0.25 per token."""

    logp_exact = True

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.prompts = tokenizer, []

    def generate(self, prompts, *, group_size, max_new_tokens, eos_token_id, pad_token_id, **_):
        self.prompts += prompts
        rows = [self.tokenizer(str(g + 1), add_special_tokens=False)["input_ids"][:max_new_tokens] + [eos_token_id]
                for _ in prompts for g in range(group_size)]
        prompt_ids, prompt_mask = pad_sequences([p for p in prompts for _ in range(group_size)], pad_token_id,
                                                left=True)
        ids, mask = pad_sequences(rows, pad_token_id, left=False)
        return Generation(prompt_ids, prompt_mask, ids, mask, -0.25 * mask.float(), torch.zeros(len(rows)).bool())


def guess_episodes(tokenizer, targets, actions):
    """One episode per target (groups: 0, 0, 1, ...), the model's actions scripted per episode."""
    problems = [Problem(prompt=GuessNumber.sample(1, seed=0)[0].prompt, answer=str(t), demonstration=None,
                        meta={"target": t}) for t in targets]

    class Engine(ScriptedEngine):
        def generate(self, prompts, *, group_size, max_new_tokens, eos_token_id, pad_token_id, **_):
            texts = [self.tokenizer.decode(p) for p in prompts]
            rows = [self.tokenizer(actions[k][t.count("\n> ") - 1], add_special_tokens=False)["input_ids"]
                    + [eos_token_id] for k, t in zip(self.live, texts)]
            prompt_ids, prompt_mask = pad_sequences(prompts, pad_token_id, left=True)
            ids, mask = pad_sequences(rows, pad_token_id, left=False)
            return Generation(prompt_ids, prompt_mask, ids, mask, -0.25 * mask.float(), torch.zeros(len(rows)).bool())

    episodes = []
    for k, problem in enumerate(problems):
        engine = Engine(tokenizer)
        engine.live = [k]
        episodes += run_episodes(engine, tokenizer, GuessNumber, [problem], 1, max_new_tokens=4)
        episodes[-1].group = k // 2
    return episodes


@pytest.fixture()
def critic(tiny):
    model, tokenizer = tiny
    made = SweetCritic(lr=1e-2, epochs=2, pairs_per_update=1)
    made.setup(model=model, tokenizer=tokenizer, device=torch.device("cpu"), seed=0)
    return made


def hand_batch(tokenizer):
    """Group 0: episode 0 finds 3 (8, 4, 3), episode 1 fails (5 x 1); group 1: episode 2 finds 8, episode 3 fails."""
    episodes = guess_episodes(tokenizer, [3, 3, 8, 8], [["8", "4", "3"], ["1"] * 5, ["8"], ["9", "7", "1", "1", "1"]])
    assert [e.success for e in episodes] == [True, False, True, False]
    return episodes_to_batch(episodes, tokenizer, torch.device("cpu"))


def test_critic_reads_the_reference_before_the_conversation(critic, tiny):
    _, tokenizer = tiny
    batch = hand_batch(tokenizer)
    ids, mask = critic.critic_prompts(batch, torch.arange(len(batch)))
    for r in range(len(batch)):
        prefix = tokenizer(PRIVILEGED_TEMPLATE.format(reference=batch.references[r]), add_special_tokens=False)
        own = batch.prompt_ids[r][batch.prompt_mask[r].bool()].tolist()
        assert ids[r][mask[r].bool()].tolist() == prefix["input_ids"] + own
    assert batch.references == ["3"] * 8 + ["8"] * 6


def test_critic_advantage_is_the_scaled_mean_log_ratio_of_the_critic(critic, tiny):
    _, tokenizer = tiny
    batch = hand_batch(tokenizer)
    rows = torch.arange(len(batch))
    ids, mask = critic.critic_prompts(batch, rows)
    with torch.no_grad():
        own = policy_logprobs(critic.critic, ids, mask, batch.completion_ids, batch.completion_mask).logp.double()
    m = batch.completion_mask.double()
    expected = 0.1 * ((own * m).sum(1) / m.sum(1) - (batch.sampling_logp.double() * m).sum(1) / m.sum(1))
    torch.testing.assert_close(critic.baseline(batch).double(), expected, rtol=1e-5, atol=1e-6)
    critic.ranking_reference = "critic_reference"  # the critic starts as its reference: every advantage is 0
    assert critic.baseline(batch).abs().max() < 1e-6


def test_critic_learns_the_preferred_trajectory_and_its_state_round_trips(critic, tiny, tmp_path):
    model, tokenizer = tiny
    batch = hand_batch(tokenizer)
    before = [p.detach().clone() for p in critic.critic.parameters()]
    episode_scores = []
    for _ in range(3):
        metrics = critic.prepare(batch)
        assert metrics["critic/pairs"] == 2 and metrics["critic/updates"] == 4  # 2 epochs x 2 pairs of 1
        episode_scores.append(critic.baseline(batch))
    assert metrics["critic/loss"] < math.log(2)  # started at log 2 (critic == reference), learned
    assert any(not torch.equal(a, b) for a, b in zip(before, critic.critic.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(before, critic.reference.parameters()))  # the reference is frozen
    # the pair batch of turn_pairs has no episode rows: nothing to learn
    assert critic.prepare(dataclasses.replace(batch, episode_ids=None)) == {}
    save_trainer_state(tmp_path, {"tracker": critic.state_dict()})  # safetensors + JSON, as a checkpoint is
    again = SweetCritic(lr=1e-2, epochs=2, pairs_per_update=1)
    other = load_model("tiny", device="cpu")[0]  # a resumed run's policy is not the critic's initial model
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.1)
    again.setup(model=other, tokenizer=tokenizer, device=torch.device("cpu"), seed=5)
    again.load_state_dict(load_trainer_state(tmp_path)["tracker"])
    torch.testing.assert_close(again.baseline(batch), critic.baseline(batch), rtol=0, atol=0)
    assert again.updates == critic.updates == 12
    # the same next update: AdamW's moments and the pair shuffle came back too
    assert again.prepare(batch) == critic.prepare(batch)
    for a, b in zip(again.critic.parameters(), critic.critic.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# -- the data source ---------------------------------------------------------------------------------------------
class RankByNumber(StatefulBaseline):
    """A stand-in critic: a candidate's score is the number it says; records what `prepare` saw."""

    def __init__(self) -> None:
        self.prepared = []

    def prepare(self, batch):
        self.prepared.append(batch)
        return {"critic/pairs": 0.0}

    def baseline(self, batch):
        return torch.tensor([float(t) for t in batch.texts])


def test_turn_pairs_rank_candidates_at_every_turn_state(tiny):
    model, tokenizer = tiny
    recipe = dataclasses.replace(get_recipe("sweet_rl"), data_params={"candidates": 4, "pairs_per_state": 3})
    rollout = RolloutConfig(prompts_per_step=2, group_size=2)
    ranker, engine = RankByNumber(), ScriptedEngine(tokenizer)
    collector = RolloutCollector(model, tokenizer, None, recipe, rollout, max_new_tokens=4, device=torch.device("cpu"),
                                 generator=torch.Generator().manual_seed(0), engine=engine, env="guess_number",
                                 critic=ranker)
    batch, stats = collector.collect(seed=0, step=0)
    episodes = ranker.prepared[0]  # the critic saw the step's episodes first: 4 episodes guessing "1"
    assert episodes.episode_ids is not None and len(episodes) == stats["rollout/turn_states"]
    assert len(batch) == 2 * 3 * len(episodes) and stats["rollout/pairs"] == 3 * len(episodes)
    texts = batch.texts
    assert set(texts[0::2]) <= {"3", "4"} and set(texts[1::2]) <= {"1", "2"}  # upper half vs lower half of 1..4
    assert batch.rewards.tolist() == [1.0, 0.0] * (len(batch) // 2)
    assert batch.episode_ids is None and not bool(batch.off_policy.any())
    for j in range(len(batch) // 2):  # pair j: both rows hold its state's conversation, the policy's own prompt
        state = j // 3
        for row in (2 * j, 2 * j + 1):
            assert batch.prompt_ids[row][batch.prompt_mask[row].bool()].tolist() == \
                episodes.prompt_ids[state][episodes.prompt_mask[state].bool()].tolist()
    assert stats["critic/pair_gap"] == pytest.approx(float(sum(int(a) - int(b) for a, b in
                                                               zip(texts[0::2], texts[1::2]))) / (len(batch) // 2))


def contains(row: list[int], part: list[int]) -> bool:
    return any(row[i:i + len(part)] == part for i in range(len(row) - len(part) + 1))


def small_config(**rollout) -> TrainConfig:
    recipe = get_recipe("sweet_rl")
    recipe = dataclasses.replace(recipe, baseline_params={**recipe.baseline_params, "lr": 1e-2},
                                 data_params={"candidates": 2, "pairs_per_state": 1})
    return TrainConfig(recipe=recipe, model="tiny", steps=3, seed=0, env="guess_number",
                       rollout=RolloutConfig(**{"prompts_per_step": 2, "group_size": 2, "max_new_tokens": 2,
                                                **rollout}),
                       optim=OptimConfig(lr=1e-3), eval_problems=2)


def test_privileged_text_reaches_the_critic_and_never_the_policy(monkeypatch):
    trainer = Trainer(small_config(), progress=False)
    critic, tokenizer = trainer.tracker, trainer.tokenizer
    template = tokenizer(PRIVILEGED_TEMPLATE.split("{")[0].strip(), add_special_tokens=False)["input_ids"]
    seen = []  # (which model, prompt rows)
    real = unipo.rollout.policy_logprobs

    def spy(model, prompt_ids, prompt_mask, *args, **kwargs):
        who = "critic" if model is critic.critic else "critic_reference" if model is critic.reference else "other"
        seen.append((who, [ids[m.bool()].tolist() for ids, m in zip(prompt_ids, prompt_mask)]))
        return real(model, prompt_ids, prompt_mask, *args, **kwargs)

    monkeypatch.setattr(unipo.rollout, "policy_logprobs", spy)
    sampled = []
    generate = trainer.engine.generate

    def record(prompts, **kwargs):
        sampled.extend(prompts)
        return generate(prompts, **kwargs)

    monkeypatch.setattr(trainer.engine, "generate", record)
    batch, _ = trainer.collector.collect(seed=0, step=0)
    critic_rows = [row for who, rows in seen if who == "critic" for row in rows]
    assert critic_rows and all(contains(row, template) for row in critic_rows)  # every critic row reads it
    answers = {tokenizer.decode(row) for row in critic_rows}
    assert all(any(f"answer is: {secret}." in text for secret in range(1, 16)) for text in answers)
    assert sampled and not any(contains(row, template) for row in sampled)  # never in what the policy acts on
    trained = [ids[m.bool()].tolist() for ids, m in zip(batch.prompt_ids, batch.prompt_mask)]
    assert trained and not any(contains(row, template) for row in trained)  # nor in what it is trained on


def test_sweet_rl_trains_three_steps_on_guess_number():
    trainer = Trainer(small_config(), progress=False)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    critic_before = [p.detach().clone() for p in trainer.tracker.critic.parameters()]
    history = trainer.fit()
    assert len(history) == 3
    for record in history:
        assert math.isfinite(record["loss"]) and record["rollout/pairs"] > 0, record
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
    critic_moved = any(not torch.equal(a, b) for a, b in zip(critic_before, trainer.tracker.critic.parameters()))
    assert critic_moved == (sum(r["critic/updates"] for r in history) > 0)


class CoinTurns(GuessNumber):
    """Two turns; success when the last action starts with a character of even code point (a random model: about
    half its episodes), so the critic has trajectory pairs from the first step."""

    name, max_turns, max_action_tokens, max_episode_tokens = "coin_turns", 2, 2, 4

    def step(self, action):
        self.last = action
        return "again", 0.0, False, {}

    def outcome(self):
        return float(bool(self.last) and ord(self.last[0]) % 2 == 0)


def test_the_critic_learns_inside_the_trainer(monkeypatch):
    from unipo.envs.base import ENVIRONMENTS

    monkeypatch.setitem(ENVIRONMENTS._entries, "coin_turns", CoinTurns)  # for this test only
    trainer = Trainer(dataclasses.replace(small_config(group_size=4), env="coin_turns", steps=2), progress=False)
    critic_before = [p.detach().clone() for p in trainer.tracker.critic.parameters()]
    history = trainer.fit()
    # 4 epochs of mini-batches of 8 trajectory pairs (the authors' critic settings)
    assert all(r["critic/pairs"] > 0 and r["critic/updates"] == 4 * math.ceil(r["critic/pairs"] / 8)
               for r in history), history
    assert all(math.isfinite(r["critic/loss"]) and math.isfinite(r["loss"]) for r in history)
    assert any(not torch.equal(a, b) for a, b in zip(critic_before, trainer.tracker.critic.parameters()))
    assert trainer.tracker.updates == sum(r["critic/updates"] for r in history)


def test_train_sweet_rl_from_the_command_line_and_resume(tmp_path):
    out = tmp_path / "run"
    common = ["--out", str(out), "rollout.prompts_per_step=1", "rollout.group_size=2", "rollout.max_new_tokens=2",
              "recipe.data_params.candidates=2", "recipe.data_params.pairs_per_state=1", "eval_problems=1"]
    result = CliRunner().invoke(app, ["train", "--recipe", "sweet_rl", "--env", "guess_number", "--steps", "2",
                                      *common])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert all({"env/success", "rollout/pairs", "critic/score_mean", "pref/chosen_nll"} <= r.keys() for r in records)
    again = CliRunner().invoke(app, ["train", "--resume", "--out", str(out), "--steps", "3"])
    assert again.exit_code == 0, again.output
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 3


def test_turn_pairs_settings_are_checked():
    recipe = get_recipe("sweet_rl")
    with pytest.raises(ValueError, match="set recipe.baseline"):
        dataclasses.replace(recipe, baseline="none", baseline_params={})
    with pytest.raises(ValueError, match=r"unknown keys \['k'\]"):
        dataclasses.replace(recipe, data_params={"k": 2})
    with pytest.raises(ValueError, match="candidates must be an int >= 2"):
        turn_pair_params({"candidates": 1})
    with pytest.raises(ValueError, match="rollout.group_size=1"):
        TrainConfig(recipe=recipe, rollout=RolloutConfig(group_size=1))
    with pytest.raises(ValueError, match="ranking_reference"):
        dataclasses.replace(recipe, baseline_params={"ranking_reference": "policy"})
    assert TrainConfig(recipe=recipe).env == "guess_number"
