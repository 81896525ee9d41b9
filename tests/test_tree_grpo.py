"""Tree-GRPO (unipo.trees, unipo.core.tree): trees share their prefixes, grow to the documented counts in one
generate call per turn round, keep environment tokens out of the loss, give the hand-computed advantages, and the
recipe trains from Python and from the command line."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import random
import statistics

import pytest
import torch
from typer.testing import CliRunner

from tests.scripted_engine import ScriptedEngine
from unipo.agents import episodes_to_batch, render, run_episodes
from unipo.cli import app
from unipo.config import OptimConfig, RolloutConfig, TrainConfig, apply_overrides
from unipo.core.advantages import compute_advantages
from unipo.core.losses import compute_policy_loss
from unipo.envs.games import GuessNumber
from unipo.models import load_model
from unipo.recipes import get_recipe
from unipo.rollout import policy_logprobs
from unipo.trainer import Trainer
from unipo.trees import TreeShape, grow_trees, tree_input, tree_shape, tree_stats

F64 = torch.float64


def RandomGuesser(tokenizer, seed: int = 0) -> ScriptedEngine:
    """An engine whose every action is a random guess 1..15 (seeded)."""
    rng = random.Random(seed)
    return ScriptedEngine(tokenizer, lambda _: str(rng.randint(1, 15)))


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny", device="cpu")


def grow(tokenizer, env_cls=GuessNumber, shape=TreeShape(trees=2, expansions=2, rounds=2, keep=3), problems=3,
         seed=0):
    engine = RandomGuesser(tokenizer, seed)
    rollout = grow_trees(engine, tokenizer, env_cls, env_cls.sample(problems, seed=seed), shape,
                         rng=random.Random(seed), max_new_tokens=4)
    return rollout, engine


# -- the tree structure ------------------------------------------------------------------------------------------
def test_trees_share_prefixes_and_grow_the_documented_counts(tiny):
    _, tokenizer = tiny
    shape = TreeShape(trees=2, expansions=2, rounds=2, keep=3)
    rollout, engine = grow(tokenizer, shape=shape)
    n_trees, episodes = 3 * shape.trees, rollout.episodes
    # every tree grows 1 + L * N = 5 leaves (episodes); K = 3 of each are kept
    assert len(episodes) == n_trees * shape.leaves == 30
    assert len(rollout.leaves) == n_trees * shape.keep and rollout.trees == [t for t in range(n_trees)
                                                                             for _ in range(shape.keep)]
    # the first P*M episodes are the trees' first chains; then each round's branches, N per tree in tree order
    tree_of = list(range(n_trees)) + [t for _ in range(shape.rounds) for t in range(n_trees)
                                      for _ in range(shape.expansions)]
    assert all(s == 0 for s in rollout.starts[:n_trees])
    seen = set()  # Turn objects grown so far
    shared = 0
    for e, (episode, start) in enumerate(zip(episodes, rollout.starts)):
        assert episode.group == tree_of[e] // shape.trees  # the problem's advantage group
        if start:  # a branch: the first `start` turns ARE an earlier episode's of the same tree, at a non-leaf node
            sources = [s for s in range(e) if tree_of[s] == tree_of[e] and len(episodes[s].turns) > start
                       and all(a is b for a, b in zip(episodes[s].turns[:start], episode.turns[:start]))]
            assert sources, e
            shared += 1
        assert not any(id(t) in seen for t in episode.turns[start:])  # the rest was newly sampled
        seen |= {id(t) for t in episode.turns}
        # each new turn was sampled on the whole conversation so far, the shared prefix included
        for t in range(start, len(episode.turns)):
            text = render(tokenizer, episode.first_observation, [x.action for x in episode.turns[:t]],
                          [x.observation for x in episode.turns[:t]])
            assert episode.turns[t].prompt_ids == tokenizer(text, add_special_tokens=False)["input_ids"]
        # the environment went on from the replayed prefix: a fresh replay of all the actions agrees
        env = GuessNumber()
        assert env.reset(episode.problem) == episode.first_observation
        for turn in episode.turns:
            assert env.step(turn.action)[:2] == (turn.observation, turn.reward)
        assert env.outcome() == episode.outcome
    assert shared > 0
    # the kept leaves: K distinct grown episodes of each tree
    index = [next(e for e, x in enumerate(episodes) if x is leaf) for leaf in rollout.leaves]
    assert len(set(index)) == len(index) and [tree_of[e] for e in index] == rollout.trees
    # one generate call per turn round: every generated turn was one prompt of one call, and no call held more
    # than the live episodes of a round (P*M chains, then P*M*N branches)
    stats = tree_stats(rollout)
    assert sum(engine.calls) == stats["tree/nodes"] == sum(len(e.turns) - s for e, s in zip(episodes,
                                                                                              rollout.starts))
    assert engine.calls[0] == n_trees and max(engine.calls) == n_trees * shape.expansions
    assert len(engine.calls) <= (1 + shape.rounds) * GuessNumber.max_turns
    assert stats["tree/leaves"] == 30 and stats["env/episodes"] == 18


def test_one_turn_episodes_leave_only_the_root_to_expand(tiny):
    """The expansion candidates are the root and the non-leaf nodes: with one-turn episodes every node is a leaf, so
    every expansion is a fresh episode of the tree."""
    class OneGuess(GuessNumber):
        max_turns = 1

    rollout, _ = grow(tiny[1], env_cls=OneGuess, shape=TreeShape(trees=2, expansions=3, rounds=1, keep=4))
    assert len(rollout.episodes) == 3 * 2 * 4 and all(s == 0 for s in rollout.starts)
    assert all(len(e.turns) == 1 for e in rollout.episodes)


def test_same_seed_same_trees(tiny):
    a, _ = grow(tiny[1], seed=3)
    b, _ = grow(tiny[1], seed=3)
    assert a.starts == b.starts and [[t.action for t in e.turns] for e in a.episodes] == [
        [t.action for t in e.turns] for e in b.episodes]


def test_replaying_a_nondeterministic_environment_is_an_error(tiny):
    counter = itertools.count()

    class Moody(GuessNumber):  # its answers depend on how many it gave before, in any episode
        def step(self, action):
            return f"lower {next(counter)}", 0.0, False, {}

    with pytest.raises(ValueError, match="environment guess_number is not deterministic: replaying"):
        grow(tiny[1], env_cls=Moody, shape=TreeShape(trees=1, expansions=8, rounds=1, keep=1), problems=1)


def test_the_batch_repeats_shared_turns_per_leaf_and_names_each_rows_tree(tiny):
    _, tokenizer = tiny
    rollout, _ = grow(tokenizer)
    batch = episodes_to_batch(rollout.leaves, tokenizer, torch.device("cpu"))
    batch.tree_ids = torch.tensor(rollout.trees)[batch.episode_ids]
    assert len(batch) == sum(len(e.turns) for e in rollout.leaves)  # a shared turn is a row of every leaf below it
    rows = [(e, t) for e, leaf in enumerate(rollout.leaves) for t in range(len(leaf.turns))]
    for r, (e, t) in enumerate(rows):
        turn = rollout.leaves[e].turns[t]
        assert batch.completion_ids[r][batch.completion_mask[r].bool()].tolist() == turn.completion_ids
        assert int(batch.tree_ids[r]) == rollout.trees[e] and int(batch.group_ids[r]) == rollout.trees[e] // 2
    assert torch.equal(tree_input(batch), batch.tree_ids)
    batch.tree_ids = None  # an `episodes` batch: each episode its own tree
    assert torch.equal(tree_input(batch), batch.episode_ids)


def test_environment_tokens_get_zero_gradient_in_a_branch(tiny):
    """Every row of a branch leaf (its shared prefix turns included) trains exactly the model's own action tokens:
    the loss's gradient with respect to the log-probs of the whole conversation is zero at every observation token
    and non-zero at every action token, and the trainer's forward over the row gives those same log-probs."""
    model, tokenizer = tiny
    rollout, _ = grow(tokenizer)
    leaf = next(e for e, s in zip(rollout.episodes, rollout.starts) if s >= 2)
    batch = episodes_to_batch([leaf], tokenizer, torch.device("cpu"))
    eos = tokenizer.eos_token_id
    for t, turn in enumerate(leaf.turns):
        text, env = leaf.first_observation, list(range(len(leaf.first_observation)))  # char tokenizer: char = token
        for x in leaf.turns[:t]:
            text += f"\n> {x.action}\n"
            env += list(range(len(text), len(text) + len(x.observation)))
            text += x.observation
        prompt = tokenizer(text + "\n> ", add_special_tokens=False)["input_ids"]
        assert prompt == turn.prompt_ids
        own = tokenizer(turn.action, add_special_tokens=False)["input_ids"] + [eos]
        assert own == turn.completion_ids
        ids = torch.tensor([prompt + own])
        with torch.no_grad():
            full = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1).gather(1, ids[0, 1:, None])[:, 0]
        leaf_logp = full.clone().requires_grad_()
        completion = leaf_logp[len(prompt) - 1:][None]
        loss, _ = compute_policy_loss("dual_clip", completion, completion.detach(), torch.ones(1),
                                      torch.ones_like(completion), "token_mean", eps_low=0.2, eps_high=0.2,
                                      clip_ratio_c=3.0)
        loss.backward()
        grad = torch.cat([torch.zeros(1), leaf_logp.grad])  # index = position in the sequence
        assert torch.all(grad[env] == 0) and torch.all(grad[len(prompt):] != 0), t
        with torch.no_grad():
            row = policy_logprobs(model, batch.prompt_ids[t:t + 1], batch.prompt_mask[t:t + 1],
                                  batch.completion_ids[t:t + 1], batch.completion_mask[t:t + 1]).logp
        torch.testing.assert_close(row[0][batch.completion_mask[t].bool()], full[len(prompt) - 1:],
                                   rtol=1e-4, atol=1e-5)


# -- the advantage ---------------------------------------------------------------------------------------------
# One problem, two trees. Tree 0: a chain e0 (3 turns), a branch e1 sharing its first turn (3 turns), a branch e2
# sharing its first two (3 turns); outcomes 1, 0, 0. Tree 1: e3 (2 turns) and a root expansion e4 (1 turn), both 1.
# Rows are the leaves' turns, shared turns repeated, in a shuffled order.
LEAVES = {0: (0, 3, 1.0), 1: (0, 3, 0.0), 2: (0, 3, 0.0), 3: (1, 2, 1.0), 4: (1, 1, 1.0)}  # e: (tree, turns, R)
ROWS = [(e, t) for e, (_, n, _) in LEAVES.items() for t in range(n)]
ORDER = [7, 2, 10, 0, 5, 8, 1, 11, 3, 6, 9, 4]
EPISODE = torch.tensor([ROWS[i][0] for i in ORDER])
TREE = torch.tensor([LEAVES[int(e)][0] for e in EPISODE])
OUTCOME = torch.tensor([LEAVES[int(e)][2] for e in EPISODE], dtype=F64)
# inter-tree, over the 5 leaves (1, 0, 0, 1, 1): mean 0.6, unbiased var (3 * 0.16 + 2 * 0.36) / 4 = 0.3
INTER = {1.0: 0.4 / math.sqrt(0.3), 0.0: -0.6 / math.sqrt(0.3)}
# intra-tree: tree 0 (1, 0, 0): mean 1/3, var ((2/3)^2 + 2 (1/3)^2) / 2 = 1/3 -> 2/sqrt 3 and -1/sqrt 3; tree 1 ties
INTRA = {0: {1.0: 2 / math.sqrt(3), 0.0: -1 / math.sqrt(3)}, 1: {1.0: 0.0}}
HAND = {(1.0, 1.0): [INTER[LEAVES[int(e)][2]] + INTRA[LEAVES[int(e)][0]][LEAVES[int(e)][2]] for e in EPISODE],
        (1.0, 0.0): [INTER[LEAVES[int(e)][2]] for e in EPISODE],
        (0.0, 1.0): [INTRA[LEAVES[int(e)][0]][LEAVES[int(e)][2]] for e in EPISODE]}


@pytest.mark.parametrize("coefs", sorted(HAND))
def test_tree_grpo_gives_the_hand_computed_advantages(coefs):
    got = compute_advantages("tree_grpo", OUTCOME.clone(), torch.zeros(12, dtype=torch.long), episode_ids=EPISODE,
                             episode_rewards=OUTCOME, tree_ids=TREE, inter_coef=coefs[0], intra_coef=coefs[1])
    torch.testing.assert_close(got, torch.tensor(HAND[coefs], dtype=F64), rtol=1e-5, atol=1e-6)  # eps = 1e-6
    # e.g. the winning leaf of tree 0: 0.4/sqrt(.3) + 2/sqrt(3) = 1.8850
    if coefs == (1.0, 1.0):
        assert float(got[EPISODE == 0][0]) == pytest.approx(1.8850, abs=1e-4)


def _loop_reference(groups, trees, episodes, outcomes, eps=1e-6):
    """float64 loops: per leaf, (R - mean) / (stdev + eps) over the group's leaves plus over the tree's leaves."""
    leaf = {}
    for g, tree, e, r in zip(groups, trees, episodes, outcomes):
        leaf[(g, e)] = (tree, r)

    def standardised(members, r):
        values = [leaf[m][1] for m in members]
        if len(values) < 2 or len(set(values)) == 1:
            return 0.0
        return (r - statistics.fmean(values)) / (statistics.stdev(values) + eps)

    out = []
    for g, tree, e, r in zip(groups, trees, episodes, outcomes):
        same_group = [k for k in leaf if k[0] == g]
        same_tree = [k for k in same_group if leaf[k][0] == tree]
        out.append(standardised(same_group, r) + standardised(same_tree, r))
    return out


def test_tree_grpo_matches_a_float64_loop_on_random_forests():
    rng = random.Random(0)
    for _ in range(20):
        rows = []
        for g in range(rng.randint(1, 4)):
            for e in range(rng.randint(1, 7)):
                tree, r = rng.randint(0, 2), rng.choice([0.0, 0.5, 1.0])
                rows += [(g, tree, e, r)] * rng.randint(1, 4)
        rng.shuffle(rows)
        groups, trees, episodes, outcomes = (list(c) for c in zip(*rows))
        got = compute_advantages("tree_grpo", torch.tensor(outcomes, dtype=F64), torch.tensor(groups),
                                 episode_ids=torch.tensor(episodes), episode_rewards=torch.tensor(outcomes, dtype=F64),
                                 tree_ids=torch.tensor(trees))
        torch.testing.assert_close(got, torch.tensor(_loop_reference(groups, trees, episodes, outcomes),
                                                     dtype=F64))


def test_without_trees_tree_grpo_is_multiturn_grpo_and_on_single_turns_grpo():
    # each episode its own tree (unipo.trees.tree_input's fallback): the intra-tree term vanishes
    got = compute_advantages("tree_grpo", OUTCOME.clone(), torch.zeros(12, dtype=torch.long), episode_ids=EPISODE,
                             episode_rewards=OUTCOME, tree_ids=EPISODE)
    torch.testing.assert_close(got, compute_advantages("episode_outcome", OUTCOME.clone(),
                                                       torch.zeros(12, dtype=torch.long), episode_ids=EPISODE,
                                                       episode_rewards=OUTCOME))
    rewards, groups = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.5], dtype=F64), torch.tensor([0, 0, 0, 1, 1, 1])
    got = compute_advantages("tree_grpo", rewards, groups, episode_ids=torch.arange(6), episode_rewards=rewards,
                             tree_ids=torch.arange(6))
    torch.testing.assert_close(got, compute_advantages("grpo", rewards, groups))


def test_an_episode_in_two_trees_is_an_error():
    with pytest.raises(ValueError, match="every row of an episode must name the same tree"):
        compute_advantages("tree_grpo", OUTCOME.clone(), torch.zeros(12, dtype=torch.long), episode_ids=EPISODE,
                           episode_rewards=OUTCOME, tree_ids=torch.arange(12))


# -- configuration -----------------------------------------------------------------------------------------------
def test_tree_shape_follows_the_group_size_and_bad_shapes_fail_in_one_line():
    assert tree_shape({}, 8) == TreeShape(trees=2, expansions=3, rounds=1, keep=4)  # every leaf kept
    assert tree_shape({"trees": 4, "rounds": 0}, 4).keep == 1
    recipe = get_recipe("tree_grpo")
    config = TrainConfig(recipe=recipe)
    assert config.env == "guess_number"
    assert apply_overrides(config, {"recipe.data_params.rounds": "2", "rollout.group_size": "12"}).recipe.data_params[
        "rounds"] == 2
    cases = {
        "rollout.group_size=7: tree rollouts keep the same number of leaves": {"rollout.group_size": "7"},
        r"rollout.group_size=16 keeps 8 leaves of each of 2 trees, but a tree grows 1 \+ rounds x expansions = 4":
            {"rollout.group_size": "16"},
        r"unknown keys \['depth'\] for recipe.data=tree_episodes": {"recipe.data_params.depth": "2"},
        r"recipe.data_params.trees=0: must be an integer >= 1": {"recipe.data_params.trees": "0"},
        "tree rollouts .* have no expert rows": {"recipe.expert_per_group": "1"},
        "inter_coef and intra_coef are both 0": {"recipe.advantage_params.inter_coef": "0",
                                                 "recipe.advantage_params.intra_coef": "0"},
    }
    for message, overrides in cases.items():
        with pytest.raises(ValueError, match=message) as error:
            apply_overrides(config, overrides)
        assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="recipe.data_params=.* is only read by recipe.data=tree_episodes"):
        dataclasses.replace(get_recipe("multiturn_grpo"), data_params={"trees": 2})


# -- training ----------------------------------------------------------------------------------------------------
def test_tree_grpo_trains_three_steps_on_guess_number():
    config = TrainConfig(recipe=get_recipe("tree_grpo"), env="guess_number", model="tiny", steps=3, seed=0,
                         rollout=RolloutConfig(prompts_per_step=2, group_size=4, max_new_tokens=2),
                         optim=OptimConfig(lr=1e-3), eval_problems=2)
    trainer = Trainer(config, progress=False)
    before = [p.detach().clone() for p in trainer.model.parameters() if p.requires_grad]
    history = trainer.fit()
    assert len(history) == 3
    for record in history:
        assert math.isfinite(record["loss"]), record
        assert record["env/episodes"] == 2 * 4 and record["tree/leaves"] == 2 * 2 * 4
        assert record["tree/nodes"] <= record["tree/leaves"] * GuessNumber.max_turns
    after = [p.detach() for p in trainer.model.parameters() if p.requires_grad]
    assert any(not torch.equal(a, b) for a, b in zip(before, after))


def test_train_tree_grpo_from_the_command_line(tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "--recipe", "tree_grpo", "--env", "guess_number", "--steps", "2",
                                      "--out", str(out), "rollout.prompts_per_step=2", "rollout.group_size=4",
                                      "rollout.max_new_tokens=2", "eval_problems=2", "save_every=0"])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert all({"env/turns_mean", "env/success", "tree/nodes", "tree/leaves"} <= r.keys() for r in records)
    transcripts = [json.loads(line) for line in (out / "transcripts.jsonl").read_text().splitlines()]
    assert transcripts and transcripts[0]["turns"]


def test_run_episodes_is_unchanged_by_the_split_into_play_episodes(tiny):
    """run_episodes = fresh environments + play_episodes: a G-episode group is still G independent chains."""
    _, tokenizer = tiny
    engine = RandomGuesser(tokenizer, 1)
    episodes = run_episodes(engine, tokenizer, GuessNumber, GuessNumber.sample(2, seed=1), 3, max_new_tokens=4)
    assert [e.group for e in episodes] == [0, 0, 0, 1, 1, 1] and engine.calls[0] == 6
    assert len({id(t) for e in episodes for t in e.turns}) == sum(len(e.turns) for e in episodes)
