"""unipo.reward_model: the Bradley–Terry loss, where the score is read, training on pairs from the sort task
(held-out pairwise accuracy), the folder format and its errors, and the scorer the RL trainer can use."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from unipo.models import build_tiny_model
from unipo.pairs import PairDataError, PreferencePair
from unipo.reward_model import (
    CONFIG_FILE,
    HEAD_FILE,
    RewardModel,
    RewardModelError,
    RewardModelScorer,
    bradley_terry_loss,
    encode_rows,
    load_reward_model,
    pairwise_accuracy,
    save_reward_model,
    score_texts,
    train_reward_model,
)
from unipo.tasks.base import get_task

SORT = get_task("sort")


def sort_pairs(split: str, n: int, seed: int) -> list[PreferencePair]:
    """Pairs from sort problems: chosen = the correct answer, rejected = a near miss the task's verifier scores
    0 (the input order, one number changed, or the answer shuffled)."""
    rng = random.Random(f"{split}|{seed}")
    pairs = []
    for problem in SORT.sample(n, seed=seed, split=split):
        numbers = problem.answer.split()
        kind = rng.randrange(3)
        if kind == 0:
            wrong = problem.prompt[len("sort "):-1].split()
        elif kind == 1:
            wrong = list(numbers)
            index = rng.randrange(len(wrong))
            wrong[index] = str((int(wrong[index]) + rng.randint(1, 9)) % 10)
        else:
            wrong = rng.sample(numbers, len(numbers))
        rejected = " ".join(wrong)
        if SORT.score(problem, rejected) == 0.0:
            assert SORT.score(problem, problem.answer) == 1.0
            pairs.append(PreferencePair(problem.prompt, problem.answer, rejected, source=f"sort {split}"))
    return pairs


@pytest.fixture(scope="module")
def trained():
    """A reward model trained 30 steps on 300 train-split sort pairs; metrics and held-out accuracy."""
    model, tokenizer = build_tiny_model()
    rm = RewardModel(model, seed=0)
    train, held_out = sort_pairs("train", 300, seed=0), sort_pairs("test", 150, seed=1)
    before = pairwise_accuracy(rm, tokenizer, held_out)
    metrics = train_reward_model(rm, tokenizer, train, steps=30, lr=1e-3, batch_size=16, seed=0)
    return rm, tokenizer, metrics, before, pairwise_accuracy(rm, tokenizer, held_out), held_out


def test_bradley_terry_loss_hand_values():
    # −log σ(0) = log 2; −log σ(2) = log(1 + e^−2); −log σ(−30) ≈ 30 (no overflow)
    loss = bradley_terry_loss(torch.tensor([1.0, 3.0, -10.0]), torch.tensor([1.0, 1.0, 20.0]))
    expected = (math.log(2) + math.log1p(math.exp(-2)) + 30 + math.log1p(math.exp(-30))) / 3
    assert abs(float(loss) - expected) < 1e-5


def test_the_score_is_read_at_the_last_token_whatever_the_padding():
    model, tokenizer = build_tiny_model()
    rm = RewardModel(model, seed=1).eval()
    prompts, answers = ["sort 3 1:", "sort 10 2 7 4:"], ["1 3", "2 4 7 10 and more"]
    ids, mask = encode_rows(tokenizer, prompts, answers)  # right-padded
    assert mask[0].sum() < mask.shape[1] and ids[0, -1] == tokenizer.pad_token_id
    with torch.no_grad():
        right = rm(ids, mask)
        left = rm(torch.stack([ids[0].roll(int(mask.shape[1] - mask[0].sum())), ids[1]]),
                  torch.stack([mask[0].roll(int(mask.shape[1] - mask[0].sum())), mask[1]]))
        for row in range(2):
            alone = ids[row, : int(mask[row].sum())][None]
            assert alone[0, -1] == tokenizer.eos_token_id  # the answer's EOS is the token read
            hidden = model.get_decoder()(input_ids=alone).last_hidden_state[:, -1]
            by_hand = hidden @ rm.head.weight[0] + rm.head.bias
            torch.testing.assert_close(right[row], by_hand[0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(left[row], by_hand[0], rtol=1e-5, atol=1e-5)


def test_training_on_sort_pairs_lowers_the_loss_and_ranks_held_out_pairs(trained):
    rm, tokenizer, metrics, before, after, held_out = trained
    assert len(held_out) >= 120 and all(p.source == "sort test" for p in held_out)
    losses = metrics["losses"]
    assert len(losses) == metrics["rm/steps"] == 30 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5, losses  # measured: ~0.69 -> ~0.3
    # measured (seed 0): 0.50 untrained -> 0.87 after 30 steps of 16 pairs; seeds 1, 2 of the tiny model and
    # head give 0.71 -> 0.94 and 0.47 -> 0.85
    assert after > 0.75 and after - before > 0.2, (before, after)
    assert not rm.training


def test_training_is_deterministic_for_a_seed():
    pairs = sort_pairs("train", 40, seed=5)
    runs = []
    for _ in range(2):
        model, tokenizer = build_tiny_model()
        runs.append(train_reward_model(RewardModel(model), tokenizer, pairs, steps=2, lr=1e-3, batch_size=8,
                                       seed=3)["losses"])
    assert runs[0] == runs[1]


def test_save_load_round_trip_gives_identical_scores(trained, tmp_path):
    rm, tokenizer, *_, held_out = trained
    save_reward_model(rm, tokenizer, tmp_path / "rm")
    files = {p.relative_to(tmp_path / "rm").as_posix() for p in (tmp_path / "rm").rglob("*") if p.is_file()}
    assert {CONFIG_FILE, HEAD_FILE, "backbone/model.safetensors", "backbone/config.json"} <= files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pkl", ".pickle"))]  # no pickle anywhere
    prompts = [p.prompt for p in held_out[:20]]
    completions = [p.chosen for p in held_out[:20]]
    in_memory = RewardModelScorer.from_model(rm, tokenizer)(prompts, completions)
    scorer = RewardModelScorer(tmp_path / "rm")
    assert scorer(prompts, completions) == in_memory  # bit-identical
    assert scorer([], []) == []
    r_a, r_b = scorer(["sort 3 1:"] * 2, ["1 3", "3 1"])
    assert abs(scorer.prefer("sort 3 1:", "1 3", "3 1") - 1 / (1 + math.exp(r_b - r_a))) < 1e-6
    assert pairwise_accuracy(scorer.model, scorer.tokenizer, held_out) == pairwise_accuracy(rm, tokenizer, held_out)


def _break(folder, how: str) -> None:
    if how == "no config":
        (folder / CONFIG_FILE).unlink()
    elif how == "bad json":
        (folder / CONFIG_FILE).write_text("{not json")
    elif how == "other format":
        (folder / CONFIG_FILE).write_text(json.dumps({"format": "something else"}))
    elif how == "future version":
        config = json.loads((folder / CONFIG_FILE).read_text())
        (folder / CONFIG_FILE).write_text(json.dumps({**config, "version": 99}))
    elif how == "no head":
        (folder / HEAD_FILE).unlink()
    elif how == "corrupt head":
        (folder / HEAD_FILE).write_bytes(b"\x00" * 20)
    elif how == "head of another size":
        config = json.loads((folder / CONFIG_FILE).read_text())
        (folder / CONFIG_FILE).write_text(json.dumps({**config, "hidden_size": 64}))
    elif how == "no backbone":
        for path in sorted((folder / "backbone").iterdir()):
            path.unlink()
        (folder / "backbone").rmdir()
    elif how == "damaged backbone":
        (folder / "backbone" / "config.json").write_text("{")


BREAKAGES = {"no config": "has no reward_model.json", "bad json": "reward_model.json is not valid JSON",
             "other format": "not a unipo reward-model config", "future version": "format version 99",
             "no head": "has no head.safetensors", "corrupt head": "head.safetensors cannot be read",
             "head of another size": "expected weight [1, 64]", "no backbone": "has no backbone/ folder",
             "damaged backbone": "config.json"}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model, tokenizer = build_tiny_model()
    folder = tmp_path_factory.mktemp("saved") / "rm"
    save_reward_model(RewardModel(model), tokenizer, folder)
    return folder


@pytest.mark.parametrize("how", sorted(BREAKAGES))
def test_a_bad_folder_is_one_line(saved, tmp_path, how):
    import shutil

    folder = tmp_path / "rm"
    shutil.copytree(saved, folder)
    _break(folder, how)
    with pytest.raises(RewardModelError) as info:
        load_reward_model(folder)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"reward model folder {str(folder)!r}: ") and \
        BREAKAGES[how] in message, message


def test_a_missing_folder_is_one_line(tmp_path):
    with pytest.raises(RewardModelError, match=r"^reward model folder '.*nowhere': no such folder$"):
        RewardModelScorer(tmp_path / "nowhere")


def test_ties_count_half_and_scorer_input_checks():
    model, tokenizer = build_tiny_model()
    rm = RewardModel(model)
    torch.nn.init.zeros_(rm.head.weight)  # every score 0: every pair a tie
    pairs = sort_pairs("train", 10, seed=2)
    assert pairwise_accuracy(rm, tokenizer, pairs) == 0.5
    assert score_texts(rm, tokenizer, ["sort 1 2:"], [""]).tolist() == [0.0]  # an empty completion still scores
    scorer = RewardModelScorer.from_model(rm, tokenizer)
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        scorer(["a", "b"], ["c"])
    with pytest.raises(ValueError, match="completion 0 is a int"):
        scorer(["a"], [3])
    with pytest.raises(PairDataError, match="^x: chosen and rejected encode to the same token ids$"):
        train_reward_model(rm, tokenizer, [PreferencePair("p", "é", "ü", source="x")], steps=1, lr=1e-3,
                           batch_size=1, seed=0)
    with pytest.raises(TypeError, match="trains a RewardModel"):
        train_reward_model(model, tokenizer, pairs, steps=1, lr=1e-3, batch_size=2, seed=0)
