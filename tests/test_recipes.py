"""Each recipe's defining mechanism, observed in one step on the tiny model."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

import tests.test_trainer  # noqa: F401  (registers the "coin" test task)
from unipo.config import OptimConfig, RolloutConfig, TrainConfig
from unipo.recipes import RECIPES, get_recipe
from unipo.tasks.base import TASKS, Problem, Task
from unipo.trainer import Trainer


class HardOrEasyTask(Task):
    """Prompts "easy<i>" always score 1; prompts "hard<i>" score 1 only when the scored text
    starts with the demonstration "Z" (a random model almost never writes it; a GHPO hint does)."""

    name = "hard_or_easy"
    max_new_tokens = 3
    scorer_is_safe = True  # a pure function of the text: scored in-process

    def sample(self, n, *, seed, split="train"):
        return [Problem(prompt=f"{'easy' if i % 2 else 'hard'}{seed}-{i}", answer="Z", demonstration="Z")
                for i in range(n)]

    def score(self, problem, completion):
        return 1.0 if problem.prompt.startswith("easy") else float(completion.startswith("Z"))


if HardOrEasyTask.name not in TASKS:
    TASKS.register(HardOrEasyTask.name)(lambda **_: HardOrEasyTask())


def make_trainer(recipe: str, task: str = "coin", prompts: int = 6, group: int = 4, **recipe_overrides) -> Trainer:
    recipe_config = dataclasses.replace(get_recipe(recipe), **recipe_overrides)
    config = TrainConfig(recipe=recipe_config, task=task, steps=4, seed=1,
                         rollout=RolloutConfig(prompts_per_step=prompts, group_size=group),
                         optim=OptimConfig(lr=1e-3), eval_problems=4)
    return Trainer(config, progress=False)


def groups_of(batch) -> dict[int, torch.Tensor]:
    return {int(g): (batch.group_ids == g).nonzero().squeeze(1) for g in batch.group_ids.unique()}


def test_dynamic_sampling_keeps_only_groups_whose_rewards_differ():
    trainer = make_trainer("dapo", prompts=6, group=3)
    batch, stats = trainer.collector.collect(seed=0, step=0)
    assert stats["rollout/generation_rounds"] >= 1
    assert len(groups_of(batch)) == 6
    for rows in groups_of(batch).values():
        assert batch.rewards[rows].unique().numel() > 1
    # without dynamic sampling, constant groups do occur with groups of 3 at p ~ 1/2
    plain = make_trainer("grpo", prompts=6, group=3)
    constant = 0
    for step in range(4):
        b, _ = plain.collector.collect(seed=0, step=step)
        constant += sum(b.rewards[rows].unique().numel() == 1 for rows in groups_of(b).values())
    assert constant > 0


def test_high_entropy_trains_on_the_top_fifth_of_tokens():
    trainer = make_trainer("high_entropy")
    metrics = trainer.train_step().metrics
    # ceil(0.2 * N) of N completion tokens reach the loss
    assert 0.2 <= metrics["select/token_frac"] <= 0.2 + 1 / 24 + 1e-6


def test_luffy_groups_hold_one_expert_trace_sharing_the_group_baseline():
    trainer = make_trainer("luffy", group=4)
    batch, _ = trainer.collector.collect(seed=0, step=0)
    for rows in groups_of(batch).values():
        assert int(batch.off_policy[rows].sum()) == 1 and len(rows) == 4
    expert = batch.off_policy.nonzero().squeeze(1)
    assert all(batch.texts[i] == "0" for i in expert)  # the task's demonstration
    assert torch.all(batch.sampling_logp[expert] == 0)


@pytest.mark.parametrize("recipe", ["chord", "hpt", "ahpo", "sft_then_rl"])
def test_expert_rows_stay_out_of_the_rollouts_group(recipe):
    trainer = make_trainer(recipe)
    batch, _ = trainer.collector.collect(seed=0, step=0)
    assert torch.all(batch.group_ids[batch.off_policy] < 0)
    assert torch.all(batch.group_ids[~batch.off_policy] >= 0)


def test_ghpo_hints_only_groups_where_every_rollout_failed():
    trainer = make_trainer("ghpo", task="hard_or_easy", prompts=6, group=4)
    batch, _ = trainer.collector.collect(seed=0, step=0)
    for rows in groups_of(batch).values():
        prompt = batch.prompts[int(rows[0])]
        hinted = batch.hinted[rows]
        if prompt.startswith("easy"):
            assert not hinted.any(), "a group with successes must not get a hint"
        else:
            assert hinted.all(), "an all-fail group is re-rolled with a hint"
            for i in rows.tolist():
                # the hint sits in the user message after GHPO's sentence; the scored text is the completion alone
                prompt_text = trainer.tokenizer.decode(batch.prompt_ids[i][batch.prompt_mask[i].bool()])
                assert prompt_text.endswith(trainer.recipe.hint_template.format(hint="Z")), prompt_text
                assert batch.rewards[i] == float(batch.texts[i].startswith("Z"))


def test_hpt_gate_sends_failed_prompts_to_sft_and_others_to_rl():
    trainer = make_trainer("hpt", task="hard_or_easy", prompts=6, group=3)
    batch, _ = trainer.collector.collect(seed=0, step=0)
    rl_weight, sft_weight, _ = trainer._mix(batch)
    for i in range(len(batch)):
        all_failed = not batch.correct[(batch.prompt_index == batch.prompt_index[i]) & ~batch.off_policy].any()
        if batch.off_policy[i]:
            assert sft_weight[i] == float(all_failed) and rl_weight[i] == 0
        else:
            assert rl_weight[i] == float(not all_failed) and sft_weight[i] == 0


def test_chord_mu_decays_over_the_run():
    trainer = make_trainer("chord")
    mus = []
    for _ in range(4):
        mus.append(trainer.train_step().metrics["mix/mu"])
    assert mus[0] > mus[-1] and all(a >= b for a, b in zip(mus, mus[1:]))


def test_sft_then_rl_switches_stage():
    trainer = make_trainer("sft_then_rl", mixer_params={"sft_steps": 2})
    stages = [trainer.train_step().metrics["mix/sft_stage"] for _ in range(4)]
    assert stages == [1.0, 1.0, 0.0, 0.0]


def test_ppo_value_loss_decreases_on_a_fixed_batch():
    trainer = make_trainer("ppo", epochs=1)
    batch, _ = trainer.collector.collect(seed=0, step=0)
    losses = []
    for _ in range(8):
        metrics, finite = trainer.learn(batch)
        assert finite
        losses.append(float(metrics["value_loss"]))
    assert losses[-1] < 0.7 * losses[0], losses


def test_single_stream_baseline_tracks_each_prompt():
    trainer = make_trainer("single_stream", group=1, mini_batches=1)  # one update: D = 0, rho at its cap 0.96
    trainer.train_step()
    assert len(trainer.tracker.state) == 6
    for alpha, beta in trainer.tracker.state.values():
        assert alpha + beta == pytest.approx(0.96 * 1 + 1)  # rho * prior mass (Beta(0.5, 0.5)) + one observation


def test_every_recipe_documents_its_paper_and_mechanism():
    for recipe in RECIPES.values():
        assert recipe.summary and recipe.paper, recipe.name
        assert re.search(r"arXiv \d{4}\.\d{4,5}", recipe.paper), f"{recipe.name} cites no arXiv id: {recipe.paper!r}"


def test_the_citation_check_rejects_a_paper_without_an_arxiv_id():
    with pytest.raises(AssertionError, match="cites no arXiv id"):
        for recipe in [dataclasses.replace(get_recipe("grpo"), paper="DHPO (seed 000)")]:
            assert re.search(r"arXiv \d{4}\.\d{4,5}", recipe.paper), f"{recipe.name} cites no arXiv id"


def test_dapo_overlong_penalty_spares_answers_that_end_in_time():
    """DAPO's soft punishment covers the last 20% of the budget: a finished answer of a few
    tokens keeps its full reward; only completions running into the buffer lose some."""
    from unipo.core.selection import overlong_reward_penalty

    trainer = make_trainer("dapo", task="addition")  # budget 6 tokens: the buffer is the last 2
    assert trainer.max_new_tokens == 6
    penalty = overlong_reward_penalty(torch.tensor([3, 4, 5, 6]), 6, 2)
    assert penalty.tolist() == [0.0, 0.0, -0.5, -1.0]
    batch, _ = trainer.collector.collect(seed=0, step=0)
    lengths = batch.completion_mask.sum(1)
    raw = batch.correct.float()  # addition scores 0/1
    expected = raw + overlong_reward_penalty(lengths, 6, 2)
    torch.testing.assert_close(batch.rewards, expected)
