"""Preference recipes on the one trainer (issue 12): offline pairs, online / self-play pairs, the pairwise path of
the update, the moving reference and its checkpoints. Tiny model, seconds per test."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from unipo.config import OptimConfig, RolloutConfig, TrainConfig
from unipo.recipes import RECIPES, get_recipe
from unipo.tasks.base import TASKS, Problem, Task
from unipo.trainer import Trainer, resume_run, start_run
from unipo.update import mini_batch_rows

PREFERENCE_RECIPES = ["dpo", "ipo", "robust_dpo", "rpo", "slic", "tr_dpo", "online_dpo", "iterative_dpo", "spin",
                      "sppo", "dno"]


class ParityTask(Task):
    """Reward 1 when the completion's first character has an even code point (a random model: about half), so
    a prompt's samples rarely all tie; the demonstration is "0"."""

    name = "pref_parity"
    max_new_tokens = 4
    scorer_is_safe = True

    def sample(self, n, *, seed, split="train"):
        offset = 0 if split == "train" else 1000
        return [Problem(prompt=f"{(seed * 7 + i) % 97 + offset}?", answer="0", demonstration="0 1")
                for i in range(n)]

    def score(self, problem, completion):
        return float(bool(completion) and ord(completion[0]) % 2 == 0)


if ParityTask.name not in TASKS:
    TASKS.register(ParityTask.name)(lambda **_: ParityTask())


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    rows = [{"prompt": f"{i}?", "chosen": f"{i % 3} a", "rejected": f"b {i}"} for i in range(6)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def config_for(recipe: str, pairs: str | None = None, *, steps: int = 3, micro: int = 64, out=None,
               **recipe_changes) -> TrainConfig:
    r = dataclasses.replace(get_recipe(recipe), **recipe_changes) if recipe_changes else get_recipe(recipe)
    return TrainConfig(recipe=r, task=ParityTask.name, model="tiny", steps=steps, seed=0, out=out,
                       rollout=RolloutConfig(prompts_per_step=4, group_size=4),
                       optim=OptimConfig(lr=1e-3, micro_batch_size=micro), eval_problems=4,
                       pairs=pairs if r.data == "pairs" else None)


def snapshot(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def test_the_catalogue_has_every_preference_recipe_with_its_paper():
    for name in PREFERENCE_RECIPES:
        r = RECIPES.get(name)
        assert "arXiv" in r.paper and r.summary and r.notes and r.needs_reference, name


@pytest.mark.parametrize("recipe", PREFERENCE_RECIPES)
def test_each_preference_recipe_trains_three_steps(recipe, pairs_file):
    trainer = Trainer(config_for(recipe, pairs_file), progress=False)
    before = snapshot(trainer.model)
    history = trainer.fit()
    assert len(history) == 3
    for record in history:
        assert math.isfinite(record["loss"]), record
        assert record["rollout/pairs"] > 0 and "pref/reward_margin" in record and "pref/accuracy" in record
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))


def test_first_step_losses_are_the_hand_values_at_the_reference(pairs_file):
    """At step 1 the policy is the reference: h = 0, so DPO's loss is log 2 and IPO's (0 - 1/(2*0.1))^2 = 25."""
    for recipe, expected in (("dpo", math.log(2.0)), ("ipo", 25.0)):
        record = Trainer(config_for(recipe, pairs_file, steps=1), progress=False).fit()[0]
        assert record["loss"] == pytest.approx(expected, rel=1e-5)
        assert record["pref/reward_margin"] == pytest.approx(0.0, abs=1e-6)


def _margins(trainer: Trainer, batch) -> torch.Tensor:
    """beta * [(log pi - log ref)(chosen) - (...)(rejected)] of each pair of `batch`, summed over tokens."""
    from unipo.rollout import policy_logprobs

    beta = trainer.recipe.loss_params["beta"]
    mask = batch.completion_mask.float()
    with torch.no_grad():
        ratio = [(policy_logprobs(m, batch.prompt_ids, batch.prompt_mask, batch.completion_ids, batch.completion_mask)
                  .logp * mask).sum(1) for m in (trainer.model, trainer.reference)]
    r = beta * (ratio[0] - ratio[1])
    return r[0::2] - r[1::2]


def test_dpo_margin_on_its_training_pairs_grows_over_30_steps(pairs_file):
    config = dataclasses.replace(config_for("dpo", pairs_file, steps=30),
                                 rollout=RolloutConfig(prompts_per_step=6, group_size=4))
    trainer = Trainer(config, progress=False)
    batch, _ = trainer.collector.collect(seed=0, step=0)  # 6 of 6 pairs, drawn without replacement
    assert len(batch) == 12
    start = _margins(trainer, batch)
    assert torch.allclose(start, torch.zeros_like(start), atol=1e-6)  # the policy is the reference
    trainer.config = dataclasses.replace(config, steps=10)
    trainer.fit()
    early = _margins(trainer, batch)
    trainer.config = config
    trainer.fit()
    late = _margins(trainer, batch)
    print(f"DPO mean margin on its 6 training pairs: step 0 {start.mean():.4f}, step 10 {early.mean():.4f}, "
          f"step 30 {late.mean():.4f}")
    assert late.mean() > early.mean() > 0.1
    assert bool((late > 0).all())


def test_spin_pairs_are_the_demonstration_then_an_own_sample():
    trainer = Trainer(config_for("spin"), progress=False)
    batch, stats = trainer.collector.collect(seed=0, step=0)
    assert len(batch) == 8 and stats["rollout/pairs"] == 4
    chosen, rejected = batch.rows(torch.arange(0, 8, 2)), batch.rows(torch.arange(1, 8, 2))
    assert chosen.texts == ["0 1"] * 4 and bool(chosen.off_policy.all())
    assert not bool(rejected.off_policy.any())
    assert bool((rejected.sampling_logp * rejected.completion_mask).lt(0).any())  # its sampler's log-probs kept
    assert torch.equal(chosen.group_ids, rejected.group_ids) and torch.equal(batch.group_ids, batch.prompt_index)
    assert chosen.rewards.tolist() == [1.0] * 4 and rejected.rewards.tolist() == [0.0] * 4
    assert chosen.prompts == rejected.prompts
    # the chosen row is the demonstration encoded as the SFT path does: text ids + EOS
    tok = trainer.tokenizer
    ids = tok("0 1", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert chosen.completion_ids[0, :len(ids)].tolist() == ids and int(chosen.completion_mask[0].sum()) == len(ids)


def _recorded_samples(collector) -> list:
    """The collector's `_sample` results, recorded as it collects."""
    sampled, original = [], collector._sample

    def recording(*args, **kwargs):
        sampled.append(original(*args, **kwargs))
        return sampled[-1]

    collector._sample = recording
    return sampled


def test_sppo_targets_are_the_win_rates_measured_on_the_samples():
    trainer = Trainer(config_for("sppo"), progress=False)
    sampled = _recorded_samples(trainer.collector)
    batch, stats = trainer.collector.collect(seed=0, step=0)
    (rows,) = sampled
    g, kept = 4, 0
    for i in range(len(rows) // g):
        texts = rows.texts[i * g:(i + 1) * g]
        rates = _hand_win_rates(texts)
        if max(rates) == min(rates):
            continue
        pair = batch.rows((batch.group_ids == kept).nonzero().squeeze(1))
        assert pair.texts == [texts[rates.index(max(rates))], texts[rates.index(min(rates))]]
        assert pair.rewards.tolist() == pytest.approx([max(rates), min(rates)])
        kept += 1
    assert kept == stats["rollout/pairs"] == len(batch) // 2 and kept > 0
    assert stats["rollout/tied_prompts"] == len(rows) // g - kept


def _hand_win_rates(texts: list[str]) -> list[float]:
    """By hand: P(y_a > y_b) = 1, 1/2, 0 by the task's scores; a sample's win rate = its mean over the others."""
    score = [ParityTask().score(None, t) for t in texts]
    n = len(texts)
    return [sum(1.0 if score[a] > score[b] else 0.5 if score[a] == score[b] else 0.0 for b in range(n) if b != a)
            / (n - 1) for a in range(n)]


# With 0/1 task scores and 5 candidates the best-worst win-rate gap is always 2.5/4 = 0.625 (by hand): a 0.7 margin
# drops every pair, 0.5 none.
@pytest.mark.parametrize("margin", [0.0, 0.7])
def test_dno_pairs_come_from_samples_and_the_demonstration_with_a_margin(margin):
    trainer = Trainer(config_for("dno", pair_min_margin=margin), progress=False)
    sampled = _recorded_samples(trainer.collector)
    batch, stats = trainer.collector.collect(seed=1, step=0)
    (rows,) = sampled
    g, kept, small = 4, 0, 0
    for i in range(len(rows) // g):
        texts = rows.texts[i * g:(i + 1) * g] + ["0 1"]  # the samples, then the demonstration
        rates = _hand_win_rates(texts)
        gap = max(rates) - min(rates)
        if gap == 0 or gap < margin:
            small += gap > 0
            continue
        pair = batch.rows((batch.group_ids == kept).nonzero().squeeze(1))
        top = rates.index(max(rates))
        assert pair.texts == [texts[top], texts[rates.index(min(rates))]]
        assert pair.off_policy.tolist() == [top == g, False]  # the demonstration is an off-policy row
        kept += 1
    assert kept == stats["rollout/pairs"] and stats["rollout/small_margin_prompts"] == small
    assert (kept > 0 and small == 0) if margin == 0.0 else (kept == 0 and small > 0)  # the filter acted


def test_online_dpo_pairs_judged_best_over_worst_with_targets_one_zero():
    trainer = Trainer(config_for("online_dpo"), progress=False)
    batch, _ = trainer.collector.collect(seed=0, step=0)
    task = ParityTask()
    assert len(batch) > 0 and not bool(batch.off_policy.any())
    for j in range(len(batch) // 2):
        assert task.score(None, batch.texts[2 * j]) > task.score(None, batch.texts[2 * j + 1])
    assert batch.rewards.tolist() == [1.0, 0.0] * (len(batch) // 2)


def test_mini_batches_never_split_a_pair():
    gen = torch.Generator().manual_seed(0)
    for n_pairs in range(1, 12):
        for parts in (1, 2, 3, 5):
            rows = mini_batch_rows(2 * n_pairs, parts, gen, unit=2)
            assert sorted(torch.cat(rows).tolist()) == list(range(2 * n_pairs))
            for part in rows:
                assert torch.equal(part[0::2] + 1, part[1::2]) and bool((part[0::2] % 2 == 0).all())


def test_micro_batches_hold_whole_pairs_and_accumulation_is_exact(pairs_file):
    """micro_batch_size 3 (rounded to 2) and 64 give the same gradient on one batch, 3 mini-batches of pairs
    each forwarded as whole pairs."""
    config = config_for("dpo", pairs_file, steps=1)
    trainer = Trainer(config, progress=False)
    trainer.train_step()  # move the policy off the reference, so the gradient is not DPO's at h = 0
    batch, _ = trainer.collector.collect(seed=0, step=1)
    chunks, grads = [], []
    forward = trainer.update.forward

    def recording(rows, **kwargs):
        chunks.append(rows.clone())
        return forward(rows, **kwargs)

    trainer.update.forward = recording
    trainer.optimizer.step = lambda: grads[-1].append([p.grad.clone() for p in trainer.model.parameters()])
    for micro, mini in ((64, 1), (3, 1), (3, 2)):
        grads.append([])
        trainer.update.config = dataclasses.replace(config, optim=dataclasses.replace(config.optim,
                                                                                     micro_batch_size=micro))
        trainer.update.recipe = dataclasses.replace(config.recipe, mini_batches=mini)
        chunks.clear()
        trainer.learn(batch)
        for rows in chunks:
            assert len(rows) % 2 == 0 and torch.equal(batch.group_ids[rows[0::2]], batch.group_ids[rows[1::2]])
        if micro == 3:
            assert max(len(c) for c in chunks) == 2
    (full,), (accumulated,), halves = grads
    assert any(g.abs().sum() > 0 for g in full)
    for a, b in zip(full, accumulated):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    assert len(halves) == 2  # two mini-batches: two optimizer steps of 2 pairs each


def test_tr_dpo_reference_moves_softly_every_tau_steps(pairs_file):
    params = {"alpha": 0.25, "tau": 2}
    trainer = Trainer(config_for("tr_dpo", pairs_file, steps=4, reference_update_params=params), progress=False)
    reference = snapshot(trainer.reference)
    trainer.train_step()
    assert all(torch.equal(a, b) for a, b in zip(reference, trainer.reference.parameters()))  # step 1: not due
    record = trainer.train_step().metrics
    assert record["ref/updated"] == 1.0
    expected = [0.25 * p.detach() + 0.75 * r for p, r in zip(trainer.model.parameters(), reference)]
    for want, got in zip(expected, trainer.reference.parameters()):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-7)
    assert any(not torch.equal(a, b) for a, b in zip(reference, trainer.reference.parameters()))


def test_spin_reference_becomes_the_previous_iterate(pairs_file):
    trainer = Trainer(config_for("spin", reference_update_params={"tau": 2}), progress=False)
    initial = snapshot(trainer.reference)
    trainer.train_step()
    assert all(torch.equal(a, b) for a, b in zip(initial, trainer.reference.parameters()))
    trainer.train_step()
    assert all(torch.equal(a, b) for a, b in zip(trainer.model.parameters(), trainer.reference.parameters()))


def test_resume_restores_the_moving_reference(tmp_path, pairs_file):
    out = str(tmp_path / "run")
    params = {"alpha": 0.5, "tau": 1}
    config = dataclasses.replace(config_for("tr_dpo", pairs_file, steps=2, out=out, reference_update_params=params),
                                 save_every=1)  # reference/ is written at the first checkpoint, then kept
    trainer = start_run(config, progress=False)
    initial = snapshot(trainer.reference)
    trainer.fit()
    moved = snapshot(trainer.reference)
    assert any(not torch.equal(a, b) for a, b in zip(initial, moved))
    resumed = resume_run(out, steps=3, progress=False)
    assert resumed.step == 2
    for a, b in zip(moved, resumed.reference.parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    resumed.fit()  # and it trains on from there
    assert resumed.step == 3


def test_pair_settings_are_checked_when_built(pairs_file):
    with pytest.raises(ValueError, match="does not read preference pairs"):
        dataclasses.replace(config_for("grpo"), pairs=pairs_file)
    with pytest.raises(ValueError, match="preference loss trains on"):
        dataclasses.replace(get_recipe("grpo"), loss="dpo", loss_params={"beta": 0.1})
    with pytest.raises(ValueError, match="preference loss trains on"):
        dataclasses.replace(get_recipe("dpo"), data="on_policy")
    with pytest.raises(ValueError, match="missing params \\['beta'\\]"):
        dataclasses.replace(get_recipe("dpo"), loss_params={})
    with pytest.raises(ValueError, match="eta"):
        dataclasses.replace(get_recipe("sppo"), loss_params={"beta": 0.1, "eta": -1.0})
    with pytest.raises(ValueError, match="unknown keys \\['alpha'\\]"):
        dataclasses.replace(get_recipe("spin"), reference_update_params={"alpha": 0.5})
    with pytest.raises(ValueError, match="group_size"):
        dataclasses.replace(config_for("online_dpo"), rollout=RolloutConfig(group_size=1))
    with pytest.raises(ValueError, match="oracle must be"):
        dataclasses.replace(config_for("online_dpo"), oracle="judge")
    with pytest.raises(ValueError, match="need recipe.data=online_pairs or self_play"):
        dataclasses.replace(get_recipe("spin"), pair_min_margin=0.5)


def test_the_cli_trains_dpo_on_a_pairs_file(tmp_path, pairs_file):
    from typer.testing import CliRunner

    from unipo.cli import app

    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "--recipe", "dpo", "--data", pairs_file, "--task", ParityTask.name,
                                      "--steps", "2", "--out", str(out), "rollout.prompts_per_step=2",
                                      "eval_problems=2"])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["rollout/pairs"] for r in records] == [2.0, 2.0] and records[0]["loss"] == pytest.approx(math.log(2))
    missing = CliRunner().invoke(app, ["train", "--recipe", "dpo", "--task", ParityTask.name, "--steps", "1",
                                       "--out", str(tmp_path / "other")])
    assert missing.exit_code != 0 and "--data FILE" in missing.output


@pytest.mark.multiprocess
def test_two_processes_compute_the_one_process_pairwise_update(tmp_path, pairs_file):
    """5 pairs over 2 ranks (3 + 2, micro-batches of one pair, a one-row padding chunk on rank 1): the ranks'
    gradients add up to one process's, and the naive split (each rank its own pair mean) would not."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    script = str(Path(__file__).resolve().parent / "pairwise_distributed.py")
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    for command in ([sys.executable, script, str(tmp_path), pairs_file],
                    [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", script,
                     str(tmp_path), pairs_file, "parallel=ddp"]):
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-4000:]
    single, parallel, naive = (load_file(str(tmp_path / f"{n}.grad.safetensors")) for n in ("single", "parallel",
                                                                                           "naive"))

    def relative(a, b):
        return max(float((a[k] - b[k]).abs().max()) for k in b) / max(float(t.abs().max()) for t in b.values())

    assert relative(parallel, single) < 1e-4
    assert relative(naive, single) > 1e-2


def test_bad_pair_data_is_one_line_before_training(tmp_path):
    from typer.testing import CliRunner

    from unipo.cli import app

    cases = {"missing.jsonl": ('{"prompt": "x", "chosen": "a"}\n', "missing.jsonl:1: missing field 'rejected'"),
             "long.jsonl": (json.dumps({"prompt": "x", "chosen": "a" * 600, "rejected": "b"}) + "\n",
                            "1 of 1 preference pairs do not fit the model's context")}
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        result = CliRunner().invoke(app, ["train", "--recipe", "dpo", "--data", str(tmp_path / name), "--task",
                                          ParityTask.name, "--steps", "1", "--out", str(tmp_path / f"run-{name}")])
        assert result.exit_code == 2 and message in result.output, result.output
        assert not (tmp_path / f"run-{name}").exists()  # nothing started


def test_the_mixture_sampler_draws_from_the_token_level_geometric_mixture():
    from unipo.mixture import generate_mixture
    from unipo.models import load_model
    from unipo.rollout import _hf_logits, generate

    torch.manual_seed(0)
    model, tok = load_model("tiny")
    torch.manual_seed(1)
    reference, _ = load_model("tiny")
    prompts = [tok(p, add_special_tokens=False)["input_ids"] for p in ("12?", "7 + 5?")]
    kw = dict(group_size=3, max_new_tokens=6, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    for beta, alone in ((0.0, model), (1.0, reference)):  # the ends are the plain samplers, draw for draw
        plain = generate(alone, prompts, generator=torch.Generator().manual_seed(5), **kw)
        mixed = generate_mixture(model, reference, prompts, beta=beta, generator=torch.Generator().manual_seed(5), **kw)
        assert torch.equal(plain.completion_ids, mixed.completion_ids)
        torch.testing.assert_close(plain.sampling_logp, mixed.sampling_logp)
    mixed = generate_mixture(model, reference, prompts, beta=0.3, generator=torch.Generator().manual_seed(5), **kw)
    with torch.no_grad():
        parts = [torch.log_softmax(_hf_logits(m, mixed.prompt_ids, mixed.prompt_mask, mixed.completion_ids,
                                              mixed.completion_mask, False)[0].float(), -1) for m in (model, reference)]
    by_hand = torch.log_softmax(0.7 * parts[0] + 0.3 * parts[1], -1).gather(-1, mixed.completion_ids[..., None])[..., 0]
    live = mixed.completion_mask.bool()
    torch.testing.assert_close(mixed.sampling_logp[live], by_hand[live], rtol=1e-4, atol=1e-5)


def test_nash_md_rewards_are_the_oracle_against_mixture_samples_and_it_trains():
    trainer = Trainer(config_for("nash_md", steps=3), progress=False)
    batch, stats = trainer.collector.collect(seed=0, step=0)
    mixture = trainer.collector._mixture_texts
    assert len(batch) == len(mixture) == 16 and not bool(batch.off_policy.any())
    task = ParityTask()
    by_hand = [1.0 if task.score(None, a) > task.score(None, b) else 0.5 if task.score(None, a) == task.score(
        None, b) else 0.0 for a, b in zip(batch.texts, mixture)]
    assert batch.rewards.tolist() == by_hand and len(set(by_hand)) > 1
    before = snapshot(trainer.model)
    history = trainer.fit()
    assert all(math.isfinite(r["loss"]) for r in history) and all(r["kl"] is not None for r in history)
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))


def test_preference_centred_advantage_by_hand():
    from unipo.core.advantages import compute_advantages

    rewards = torch.tensor([1.0, 0.5, 0.0, 0.25])
    out = compute_advantages("preference_centred", rewards, torch.tensor([0, 0, 1, 1]))
    assert out.tolist() == [0.5, 0.0, -0.5, -0.25]


def test_evaluation_reports_the_win_rate_against_the_reference(pairs_file):
    trainer = Trainer(config_for("dpo", pairs_file, steps=20), progress=False)
    start = trainer.evaluate(n=8)
    # the policy is the reference and both sample with the same seed: the same answers, every problem a tie
    assert (start["vs_reference/win_rate"], start["vs_reference/tied"]) == (0.5, 1.0)
    trainer.fit()
    after = trainer.evaluate(n=8)
    assert 0.0 <= after["vs_reference/win_rate"] <= 1.0
    assert after["vs_reference/won"] + after["vs_reference/tied"] + after["vs_reference/lost"] == pytest.approx(1.0)
    assert not any(k.startswith("vs_reference/") for k in Trainer(config_for("grpo"), progress=False).evaluate(n=2))
