"""unipo.pairs: the pair record, JSONL and `datasets` readers, bad-row errors, tokenisation layout, and pairs
made from a verifiable task."""

from __future__ import annotations

import json
import logging
import random
import re

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from unipo.models import build_char_tokenizer, build_tiny_model, format_prompt
from unipo.pairs import (
    MadePairs,
    Message,
    PairDataError,
    PreferencePair,
    encode_answer,
    encode_prompt,
    load_pairs,
    make_pairs,
    pair_from_row,
    tokenize_pairs,
    write_pairs_jsonl,
)
from unipo.rollout import policy_logprobs
from unipo.tasks.base import GeneratedTask, Problem, get_task

datasets = pytest.importorskip("datasets")

TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}|{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_model()


def chat_tokenizer():
    tokenizer = build_char_tokenizer()
    tokenizer.chat_template = TEMPLATE
    return tokenizer


def write_lines(path, lines: list[object]) -> None:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))


def one_line_error(call) -> str:
    with pytest.raises(PairDataError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message, message
    return message


# --------------------------------------------------------------------------------------------------- record


def test_pair_and_ranked_list_records():
    pair = PreferencePair("sort 3 1:", "1 3", "3 1", source="s")
    assert not pair.is_listwise and pair.answers() == ("1 3", "3 1") and pair.relevance() == (1.0, 0.0)
    # ranks: lower is better; ties among the best -> the first, among the worst -> the last
    ranked = PreferencePair("p", responses=["a", "b", "c", "d"], ranks=[2, 1, 3, 3])
    assert (ranked.chosen, ranked.rejected) == ("b", "d")
    assert ranked.responses == ("a", "b", "c", "d") and ranked.relevance() == (1.0, 2.0, 0.0, 0.0)
    assert ranked.is_listwise and hash(ranked) == hash(PreferencePair("p", responses=("a", "b", "c", "d"),
                                                                        ranks=(2, 1, 3, 3)))
    # meta takes no part in equality
    assert PreferencePair("p", "a", "b", meta={"x": 1}) == PreferencePair("p", "a", "b")


@given(st.lists(st.integers(-5, 5), min_size=2, max_size=6))
def test_ranked_list_best_and_worst_are_extreme_ranks(ranks):
    assume(len(set(ranks)) > 1)
    responses = [f"answer {i}" for i in range(len(ranks))]
    pair = PreferencePair("p", responses=responses, ranks=ranks)
    assert ranks[responses.index(pair.chosen)] == min(ranks)
    assert ranks[responses.index(pair.rejected)] == max(ranks)
    labels = pair.relevance()
    assert min(labels) == 0 and labels[responses.index(pair.chosen)] == max(labels)


# ------------------------------------------------------------------------------------------------- JSONL


def test_jsonl_round_trip_keeps_pairs_lists_messages_and_meta(tmp_path):
    pairs = [
        PreferencePair("sort 3 1:", "1 3", "3 1", meta={"chosen_reward": 1.0}),
        PreferencePair("p", responses=("x", "y", "z"), ranks=(3, 1, 2)),
        PreferencePair((Message("system", "be brief"), Message("user", "hi")),
                       (Message("assistant", "hello"),), (Message("assistant", "go away"),)),
        PreferencePair((Message("user", "hi"),), "plain answer", "other answer"),  # raw completions of a chat prompt
    ]
    path = tmp_path / "out" / "pairs.jsonl"
    assert write_pairs_jsonl(pairs, path) == 4
    data = load_pairs(path)
    assert list(data) == pairs and data.skipped == () and len(data) == 4
    assert data[0].meta == {"chosen_reward": 1.0} and data[0].source == f"{path}:1"
    assert json.loads(path.read_text().splitlines()[2])["chosen"] == [{"role": "assistant", "content": "hello"}]


@given(st.text(min_size=1, max_size=20), st.text(min_size=1, max_size=20), st.text(min_size=1, max_size=20))
def test_any_valid_text_pair_round_trips(tmp_path_factory, prompt, chosen, rejected):
    assume(prompt.strip() and chosen.strip() and rejected.strip() and chosen != rejected)
    path = tmp_path_factory.mktemp("rt") / "p.jsonl"
    pair = PreferencePair(prompt, chosen, rejected)
    write_pairs_jsonl([pair], path)
    assert list(load_pairs(path)) == [pair]


BAD_ROWS = [
    ({"prompt": "p", "chosen": "a", "rejected": "a"}, "chosen equals rejected"),
    ({"prompt": "p", "chosen": "  ", "rejected": "a"}, "chosen is empty"),
    ({"prompt": "", "chosen": "b", "rejected": "a"}, "prompt is empty"),
    ({"prompt": "p", "chosen": "a"}, "missing field 'rejected'"),
    ({"prompt": "p", "chosen": "a", "rejected": None}, "missing field 'rejected'"),
    ({"chosen": "a", "rejected": "b"}, "missing field 'prompt'"),
    ({"prompt": "p", "answer": "a"}, "missing field 'chosen'"),
    ({"prompt": "p", "responses": ["a", "b", "c"], "ranks": [1, 2]}, "2 ranks for 3 responses"),
    ({"prompt": "p", "responses": ["a"], "ranks": [1]}, "at least 2 responses"),
    ({"prompt": "p", "responses": ["a", "b"], "ranks": [1, 1]}, "all 2 ranks are equal"),
    ({"prompt": "p", "responses": ["a", "b", "a"], "ranks": [1, 2, 3]}, r"responses\[0\] and responses\[2\] are"),
    ({"prompt": "p", "responses": ["a", "b"], "ranks": [1, "2"]}, r"ranks\[1\] must be a finite number"),
    ({"prompt": "p", "responses": ["a", "b"], "ranks": [1, True]}, r"ranks\[1\] must be a finite number"),
    ({"prompt": "p", "responses": ["a", "b"], "ranks": "1 2"}, "must be lists"),
    ({"prompt": "p", "chosen": "a", "rejected": "b", "responses": ["a", "b"], "ranks": [1, 2]}, "give one form"),
    ({"prompt": "p", "chosen": 3, "rejected": "b"}, "chosen must be a string or a list"),
    ({"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": 5}],
      "rejected": "b"}, r"chosen\[0\] content must be a string, got int"),
    ({"prompt": [{"role": "user", "content": ["image", "text"]}], "chosen": "a", "rejected": "b"},
     r"prompt\[0\] content must be a string, got list"),
    ({"prompt": [{"role": "user"}], "chosen": "a", "rejected": "b"}, r"prompt\[0\] has no 'content'"),
    ({"prompt": [{"role": "user", "content": "x", "tool_calls": [1]}], "chosen": "a", "rejected": "b"},
     "only text messages"),
    ({"prompt": [], "chosen": "a", "rejected": "b"}, "prompt is an empty message list"),
    ({"prompt": "p", "chosen": [{"role": "assistant", "content": "a"}], "rejected": "b"},
     "chosen is a message list but the prompt is plain text"),
    ([1, 2], "a row must be a JSON object, got list"),
    ('"hello"', "a row must be a JSON object, got str"),
    ('{"prompt": "p", "chosen": ', "bad JSON"),
    ('{"prompt": "p", "responses": ["a", "b"], "ranks": [NaN, 1]}', r"ranks\[0\] must be a finite number"),
]


@pytest.mark.parametrize(("row", "reason"), BAD_ROWS, ids=[r for _, r in BAD_ROWS])
def test_each_bad_jsonl_row_is_one_line_naming_file_and_line(tmp_path, row, reason):
    path = tmp_path / "pairs.jsonl"
    write_lines(path, [{"prompt": "ok", "chosen": "a", "rejected": "b"}, "", row])  # the bad row is line 3
    message = one_line_error(lambda: load_pairs(path))
    assert message.startswith(f"{path}:3: ") and re.search(reason, message), message


def test_every_bad_row_is_counted_and_skip_invalid_reports_what_it_dropped(tmp_path, caplog):
    path = tmp_path / "pairs.jsonl"
    write_lines(path, [{"prompt": "p", "chosen": "a", "rejected": "a"}, {"prompt": "p", "chosen": "a", "rejected": "b"},
                       {"prompt": "p"}])
    with path.open("ab") as file:
        file.write(b'{"prompt": "\xff"}\n')  # not UTF-8
    message = one_line_error(lambda: load_pairs(path))
    assert message.startswith(f"{path}:1: chosen equals rejected") and "2 more bad row(s)" in message
    with caplog.at_level(logging.WARNING, logger="unipo.pairs"):
        data = load_pairs(path, skip_invalid=True)
    assert [p.chosen for p in data] == ["a"] and len(data.skipped) == 3
    assert [line.split(": ")[0] for line in data.skipped] == [f"{path}:1", f"{path}:3", f"{path}:4"]
    assert data.skipped[2] == f"{path}:4: not UTF-8 (byte 13)"
    assert "skipped 3 bad row(s) of 4" in caplog.text
    write_lines(path, [{"prompt": "p", "chosen": "a", "rejected": "a"}])
    assert "no preference pairs (1 bad row(s) skipped)" in one_line_error(lambda: load_pairs(path, skip_invalid=True))


def test_bad_sources_are_one_line(tmp_path):
    assert "no such file" in one_line_error(lambda: load_pairs(tmp_path / "absent.jsonl"))
    assert "no such file" in one_line_error(lambda: load_pairs(tmp_path / "absent.parquet"))
    assert "no such file or folder" in one_line_error(lambda: load_pairs("./nowhere/at/all"))
    (tmp_path / "notes.txt").write_text("hi")
    assert "not a .jsonl/.json/.parquet" in one_line_error(lambda: load_pairs(tmp_path / "notes.txt"))
    (tmp_path / "empty").mkdir()
    assert "not a dataset folder" in one_line_error(lambda: load_pairs(tmp_path / "empty"))
    (tmp_path / "broken.parquet").write_text("not parquet")
    assert "cannot be read as parquet" in one_line_error(lambda: load_pairs(tmp_path / "broken.parquet"))


# ---------------------------------------------------------------------------------------------- datasets


ROWS = [{"question": f"sort {i} 1:", "good": f"1 {i}", "bad": f"{i} 1", "score": i} for i in range(2, 6)]


def test_datasets_sources_with_a_column_mapping(tmp_path):
    mapping = {"prompt_field": "question", "chosen_field": "good", "rejected_field": "bad"}
    expected = [PreferencePair(r["question"], r["good"], r["bad"]) for r in ROWS]
    dataset = datasets.Dataset.from_list(ROWS)
    dataset.to_parquet(str(tmp_path / "p.parquet"))
    dataset.to_json(str(tmp_path / "p.json"))
    dataset.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": dataset, "test": dataset.select([0])}).save_to_disk(str(tmp_path / "dict"))
    for source in (tmp_path / "p.parquet", tmp_path / "p.json", tmp_path / "saved", dataset):
        data = load_pairs(source, **mapping)
        assert list(data) == expected and data[1].meta == {"score": 3}, source
    assert list(load_pairs(tmp_path / "dict", split="test", **mapping)) == expected[:1]
    in_memory = datasets.DatasetDict({"train": dataset})
    assert list(load_pairs(in_memory, **mapping)) == expected and load_pairs(in_memory, **mapping)[0].source == \
        "DatasetDict[train] row 0"
    assert "no split 'dev' (splits: train, test)" in one_line_error(
        lambda: load_pairs(tmp_path / "dict", split="dev", **mapping))
    assert load_pairs(tmp_path / "p.parquet", **mapping)[2].source == f"{tmp_path / 'p.parquet'} row 2"


def test_a_column_that_does_not_exist_is_one_line_listing_the_columns(tmp_path):
    dataset = datasets.Dataset.from_list(ROWS)
    dataset.to_parquet(str(tmp_path / "p.parquet"))
    message = one_line_error(lambda: load_pairs(tmp_path / "p.parquet", prompt_field="question", chosen_field="good"))
    assert "no column 'rejected' (columns: question, good, bad, score)" in message
    assert "no column 'prompt'" in one_line_error(lambda: load_pairs(dataset))
    assert "no column 'ranks'" in one_line_error(
        lambda: load_pairs(dataset.rename_column("good", "responses"), prompt_field="question"))


def test_bad_dataset_rows_name_the_row(tmp_path):
    rows = [dict(r) for r in ROWS]
    rows[2]["bad"] = rows[2]["good"]
    rows[3]["good"] = None
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "p.parquet"))
    mapping = {"prompt_field": "question", "chosen_field": "good", "rejected_field": "bad"}
    message = one_line_error(lambda: load_pairs(tmp_path / "p.parquet", **mapping))
    assert message == f"{tmp_path / 'p.parquet'} row 2: chosen equals rejected, so the pair states no preference " \
                      f"(1 more bad row(s); fix them or pass skip_invalid=True)"
    data = load_pairs(tmp_path / "p.parquet", skip_invalid=True, **mapping)
    assert len(data) == 2 and data.skipped[1] == f"{tmp_path / 'p.parquet'} row 3: missing field 'good'"


def test_conversational_parquet_with_arrow_unified_message_keys(tmp_path):
    # Arrow gives every message struct the union of keys ("name" here), absent ones as null: tolerated
    rows = [{"prompt": [{"role": "user", "content": "hi", "name": None}],
             "chosen": [{"role": "assistant", "content": "hello", "name": None}],
             "rejected": [{"role": "assistant", "content": "bye", "name": None}]},
            {"prompt": [{"role": "user", "content": "yo", "name": "bob"}],
             "chosen": [{"role": "assistant", "content": "hey", "name": None}],
             "rejected": [{"role": "assistant", "content": "no", "name": None}]}]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "c.parquet"))
    message = one_line_error(lambda: load_pairs(tmp_path / "c.parquet"))
    assert message.startswith(f"{tmp_path / 'c.parquet'} row 1: prompt[0] has keys ['name']"), message
    (first,) = load_pairs(tmp_path / "c.parquet", skip_invalid=True)
    assert first.prompt == (Message("user", "hi"),) and first.chosen == (Message("assistant", "hello"),)


def test_a_hub_id_is_handed_to_load_dataset(monkeypatch):
    calls = []

    def fake_load_dataset(name, split=None, **kwargs):
        calls.append((name, split, kwargs))
        return datasets.Dataset.from_list([{"prompt": "p", "chosen": "a", "rejected": "b"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    data = load_pairs("someone/prefs", split="train_prefs")
    assert calls == [("someone/prefs", "train_prefs", {})] and data[0].source == "someone/prefs[train_prefs] row 0"

    def unreachable(name, split=None, **kwargs):
        raise ConnectionError("Couldn't reach 'someone/prefs' on the Hub (LocalEntryNotFoundError)\nmore detail")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    message = one_line_error(lambda: load_pairs("someone/prefs"))
    assert message.startswith("someone/prefs: not a local path; as a hub dataset it cannot be loaded: ConnectionError")


# ------------------------------------------------------------------------------------------------ tokens


def test_batch_layout_matches_the_rl_and_sft_encodings():
    tokenizer = build_char_tokenizer()
    pairs = [PreferencePair("sort 3 1:", "1 3", "3 1"), PreferencePair("sort 10 2 7:", "2 7 10", "7")]
    batch = tokenize_pairs(tokenizer, pairs)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    ids = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert len(batch) == 2 and batch.list_size == 2 and batch.prompt_ids.shape == (4, 12)
    # rows interleave: chosen 0, rejected 0, chosen 1, rejected 1; prompts left-padded, answers right-padded + EOS
    for row, (prompt, answer) in enumerate([("sort 3 1:", "1 3"), ("sort 3 1:", "3 1"), ("sort 10 2 7:", "2 7 10"),
                                            ("sort 10 2 7:", "7")]):
        p = ids(format_prompt(tokenizer, prompt))
        assert batch.prompt_ids[row, -len(p):].tolist() == p and batch.prompt_mask[row].sum() == len(p)
        assert set(batch.prompt_ids[row, :-len(p)].tolist()) <= {pad}
        a = ids(answer) + [eos]
        assert batch.completion_ids[row, :len(a)].tolist() == a and batch.completion_mask[row].sum() == len(a)
    assert batch.labels.tolist() == [[1.0, 0.0], [1.0, 0.0]]
    assert batch.chosen_index.tolist() == [0, 0] and batch.rejected_index.tolist() == [1, 1]
    assert batch.lengths().tolist() == [[4, 4], [7, 2]]
    # sums and means over each answer's tokens, hand-checked on a constant per-token log-prob
    token_logp = -0.5 * torch.ones(4, 7) + 100.0 * (1 - batch.completion_mask)  # padding must not count
    chosen, rejected = batch.pair(batch.sequence_logps(token_logp))
    assert chosen.tolist() == [-2.0, -3.5] and rejected.tolist() == [-2.0, -1.0]
    assert batch.pair(batch.mean_logps(token_logp))[0].tolist() == [-0.5, -0.5]


def test_ranked_lists_batch_item_major_with_labels():
    batch = tokenize_pairs(build_char_tokenizer(), [PreferencePair("p", responses=("a", "bb", "c"), ranks=(2, 1, 3)),
                                                    PreferencePair("q", responses=("x", "y", "z"), ranks=(1, 1, 2))])
    assert batch.prompt_ids.shape[0] == 6 and batch.list_size == 3
    assert batch.labels.tolist() == [[1.0, 2.0, 0.0], [1.0, 1.0, 0.0]]
    assert batch.chosen_index.tolist() == [1, 0] and batch.rejected_index.tolist() == [2, 2]
    values = torch.arange(6.0).view(2, 3)
    assert [t.tolist() for t in batch.pair(values)] == [[1.0, 3.0], [2.0, 5.0]]


def test_the_interleaved_batch_scores_each_answer_as_if_alone(tiny):
    """policy_logprobs on the pair batch (the lean forward shares each item's prompt) gives every answer the
    log-prob it gets scored on its own."""
    model, tokenizer = tiny
    pairs = [PreferencePair("sort 3 1:", "1 3", "3 1 9"), PreferencePair("sort 10 2 7 4:", "2 4 7 10", "2 7")]
    batch = tokenize_pairs(tokenizer, pairs)
    with torch.no_grad():
        out = policy_logprobs(model, batch.prompt_ids, batch.prompt_mask, batch.completion_ids, batch.completion_mask)
        chosen, rejected = batch.pair(batch.sequence_logps(out.logp))
        for index, pair in enumerate(pairs):
            for answer, value in ((pair.chosen, chosen[index]), (pair.rejected, rejected[index])):
                alone = tokenize_pairs(tokenizer, [PreferencePair(pair.prompt, answer, answer + "!")])
                single = policy_logprobs(model, alone.prompt_ids[:1], alone.prompt_mask[:1],
                                         alone.completion_ids[:1], alone.completion_mask[:1])
                torch.testing.assert_close(value, single.logp.sum(), rtol=1e-5, atol=1e-5)


def test_tokenisation_refuses_what_it_cannot_encode_faithfully():
    tokenizer = build_char_tokenizer()
    # characters outside the alphabet are one unknown token: the two answers would be the same ids
    assert "two answers encode to the same token ids" in one_line_error(
        lambda: tokenize_pairs(tokenizer, [PreferencePair("p", "é", "ü", source="f.jsonl:4")]))
    too_long = [PreferencePair("prompt", "abc", "d", source="f:2")]
    assert one_line_error(lambda: tokenize_pairs(tokenizer, too_long, max_length=9)) == \
        "f:2: prompt + answer is 10 tokens, over max_length=9"
    mixed = [PreferencePair("p", "a", "b"), PreferencePair("p", responses=("a", "b", "c"), ranks=(1, 2, 3))]
    assert "one batch needs one list size" in one_line_error(lambda: tokenize_pairs(tokenizer, mixed))
    chat = PreferencePair((Message("user", "hi"),), (Message("assistant", "a"),), (Message("assistant", "b"),),
                          source="c.jsonl:1")
    assert one_line_error(lambda: tokenize_pairs(tokenizer, [chat])) == \
        "c.jsonl:1: conversational pair but the tokenizer has no chat template"


def test_conversational_pairs_go_through_the_chat_template():
    tokenizer = chat_tokenizer()
    ids = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    prompt = (Message("system", "sort"), Message("user", "3 1"))
    assert encode_prompt(tokenizer, prompt) == ids("<system>sort|<user>3 1|<assistant>")
    # the assistant continuation, closed by the template's own end of turn; no EOS appended
    assert encode_answer(tokenizer, prompt, (Message("assistant", "1 3"),)) == ids("1 3|")
    # a plain answer to a chat prompt is the raw completion, ended by EOS as the policy samples it
    assert encode_answer(tokenizer, prompt, "1 3") == ids("1 3") + [tokenizer.eos_token_id]
    # plain prompts are formatted as the RL trainer formats them: one user turn
    assert encode_prompt(tokenizer, "sort 3 1:") == ids("<user>sort 3 1:|<assistant>")
    # a template that renders the prompt alone differently from the prompt inside a longer chat
    tokenizer.chat_template = TEMPLATE.replace("prompt %}<assistant>", "prompt %}<reply>")
    message = one_line_error(lambda: encode_answer(tokenizer, prompt, (Message("assistant", "x"),), where="r 3"))
    assert message.startswith("r 3: the chat template renders prompt + answer with a different prefix")


# ---------------------------------------------------------------------------------------- made from tasks


class FirstCharTask(GeneratedTask):
    """Reward 1 when the completion starts with a digit (a random tiny model does so now and then);
    graded: the fraction of digits among the first 4 characters."""

    name = "first_char"
    scorer_is_safe = True
    max_new_tokens = 6

    def __init__(self, graded: bool = False) -> None:
        self.graded = graded

    def generate(self, rng: random.Random, split: str) -> Problem:
        return Problem(prompt=f"say {rng.randint(0, 999)}:", answer="", demonstration=None)

    def score(self, problem: Problem, completion: str) -> float:
        if self.graded:
            return sum(c.isdigit() for c in completion[:4]) / 4
        return float(completion[:1].isdigit())


def test_make_pairs_correct_vs_incorrect(tiny, tmp_path):
    model, tokenizer = tiny
    task = FirstCharTask()
    made = make_pairs(model, tokenizer, task, n_prompts=12, group_size=8, seed=3)
    log = made.log
    assert isinstance(made, MadePairs) and log["pairs"] == len(made.pairs) > 0
    assert log["pairs"] + log["no_pair"] == log["prompts"] == 12 and log["samples"] == 96
    assert log["no_pair"] == log["all_blank"] + log["all_correct"] + log["none_correct"] and "all_tied" not in log
    for pair in made.pairs:
        problem = Problem(pair.prompt, "", None)
        assert task.score(problem, pair.chosen) == 1.0 == pair.meta["chosen_reward"]
        assert task.score(problem, pair.rejected) == 0.0 == pair.meta["rejected_reward"]
        assert pair.chosen.strip() and pair.rejected.strip()
    # deterministic for the seed, and written/read back as JSONL
    assert make_pairs(model, tokenizer, task, n_prompts=12, group_size=8, seed=3).pairs == made.pairs
    made.write_jsonl(tmp_path / "made.jsonl")
    assert tuple(load_pairs(tmp_path / "made.jsonl")) == made.pairs


def test_make_pairs_best_vs_worst_and_the_log_of_prompts_without_a_pair(tiny):
    model, tokenizer = tiny
    made = make_pairs(model, tokenizer, FirstCharTask(graded=True), n_prompts=6, group_size=6, seed=0,
                      rule="best_vs_worst")
    assert made.pairs and all(p.meta["chosen_reward"] > p.meta["rejected_reward"] for p in made.pairs)
    assert made.log["pairs"] + made.log["no_pair"] == 6
    assert made.log["no_pair"] == made.log["all_blank"] + made.log["all_tied"] and "none_correct" not in made.log
    # a random tiny model never sorts: every prompt lacks a correct sample, and the log says so
    sort = get_task("sort")
    none = make_pairs(model, tokenizer, sort, n_prompts=4, group_size=4, seed=0)
    assert none.pairs == () and none.log["no_pair"] == 4 == none.log["none_correct"] + none.log["all_blank"]
    assert none.log["mean_reward"] == 0.0
    with pytest.raises(ValueError, match="rule must be one of"):
        make_pairs(model, tokenizer, sort, n_prompts=1, group_size=2, seed=0, rule="random")
    with pytest.raises(ValueError, match="group_size must be >= 2"):
        make_pairs(model, tokenizer, sort, n_prompts=1, group_size=1, seed=0)


def test_pair_from_row_defaults():
    pair = pair_from_row({"prompt": "p", "chosen": "a", "rejected": "b", "id": 7}, "row 0")
    assert pair.meta == {"id": 7} and pair.source == "row 0"


def test_a_task_chat_prompt_becomes_messages():
    """A task prompt that carries chat turns (a str with `.messages`, as `unipo.tasks.hf.Conversation`) is stored
    as its messages, so it is written to JSONL and templated as turns, not as its flattened text."""

    class Chat(str):
        messages = ({"role": "system", "content": "be brief"}, {"role": "user", "content": "sort 3 1:"})

    pair = PreferencePair(Chat("be brief\n\nsort 3 1:"), "1 3", "3 1")
    assert pair.prompt == (Message("system", "be brief"), Message("user", "sort 3 1:"))
    assert encode_prompt(chat_tokenizer(), pair.prompt) == encode_prompt(chat_tokenizer(), Chat("x"))
