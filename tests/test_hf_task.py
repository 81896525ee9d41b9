"""The hf: task: problems from a `datasets` dataset on disk (parquet, save_to_disk), via the CLI and --config."""

from __future__ import annotations

import json
import pickle
import re

import pytest
import yaml
from typer.testing import CliRunner

from unipo.cli import app
from unipo.models import build_char_tokenizer, format_prompt
from unipo.tasks.base import get_task, split_of
from unipo.tasks.hf import Conversation

datasets = pytest.importorskip("datasets")
runner = CliRunner()
SMALL = ["rollout.prompts_per_step=2", "rollout.group_size=2", "eval_problems=4", "rollout.max_new_tokens=8"]


def sort_rows(n: int = 40) -> list[dict]:
    return [{"question": f"sort {i % 7} {i % 5}:", "answer": " ".join(sorted([str(i % 7), str(i % 5)])),
             "id": i} for i in range(n)]


@pytest.fixture
def parquet(tmp_path):
    path = tmp_path / "data" / "x.parquet"
    path.parent.mkdir()
    datasets.Dataset.from_list(sort_rows()).to_parquet(str(path))
    return path


def test_train_three_steps_from_a_parquet_file_via_the_cli_and_via_a_config_file(parquet, tmp_path):
    spec = f"hf:{parquet}:prompt=question,answer=answer"
    trained = runner.invoke(app, ["train", "--task", spec, "--steps", "3", "--out", str(tmp_path / "cli"), *SMALL])
    assert trained.exit_code == 0, trained.output
    assert [json.loads(line)["step"] for line in (tmp_path / "cli" / "metrics.jsonl").read_text().splitlines()] \
        == [1, 2, 3]
    # the run's config.yaml starts the second run: same task, new folder
    config = yaml.safe_load((tmp_path / "cli" / "config.yaml").read_text())
    assert config["task"] == spec
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump({**config, "out": str(tmp_path / "from-config")}))
    again = runner.invoke(app, ["train", "--config", str(config_file)])
    assert again.exit_code == 0, again.output
    assert len((tmp_path / "from-config" / "metrics.jsonl").read_text().splitlines()) == 3
    assert yaml.safe_load((tmp_path / "from-config" / "config.yaml").read_text())["task"] == spec


def test_columns_splits_and_the_evaluation_split(tmp_path, parquet, capsys):
    task = get_task(f"hf:{parquet}:prompt=question,answer=answer")
    assert task.max_new_tokens == 3 + 16 and task.sample(1, seed=0)[0].demonstration == task.sample(1, seed=0)[0].answer
    # no test split: evaluation uses the training prompts (said once), nothing held out
    assert sorted(p.prompt for p in task._splits["test"]) == sorted(p.prompt for p in task._splits["train"])
    assert len(task._splits["train"]) == 40 and "no 'test' split" in capsys.readouterr().err
    hashed = get_task(f"hf:{parquet}:prompt=question,answer=answer,eval_split=hash")
    assert hashed._splits["test"] and all(split_of(p.prompt) == "test" for p in hashed._splits["test"])
    assert len(hashed._splits["train"]) + len(hashed._splits["test"]) == 40

    folder = tmp_path / "saved"  # save_to_disk with train/test splits: test is the evaluation split by default
    rows = sort_rows()
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:30]),
                          "test": datasets.Dataset.from_list(rows[30:])}).save_to_disk(str(folder))
    saved = get_task(f"hf:{folder}:prompt=question,answer=answer")
    assert {p.prompt for p in saved.sample(10, seed=0, split="test")} <= {r["question"] for r in rows[30:]}
    assert len(saved._splits["train"]) == 30 and len(saved.problems) == 40
    # a bare .parquet path is an hf task (here without its column names)
    with pytest.raises(ValueError, match=r"^hf:.*x\.parquet: split 'train' has no prompt column 'prompt'"):
        get_task(str(parquet))


@pytest.mark.parametrize("spec, message", [
    ("hf:{p}:prompt=q,answer=answer", r"has no prompt column 'q' \(columns: question, answer, id\)"),
    ("hf:{p}:prompt=question,answer=answer,demonstration=d", r"has no demonstration column 'd'"),
    ("hf:{p}:prompt=question,answer=answer,split=validation", r"no split 'validation' \(splits: train\)"),
    ("hf:{p}:prompt=question,answer=answer,eval_split=dev", r"no split 'dev' to evaluate on"),
    ("hf:{p}:prompt=id,answer=answer", r"row 0: prompt column 'id' must hold text or a list of chat messages"),
    ("hf:{empty}.parquet:prompt=question,answer=answer", r"the dataset has no rows"),
    ("hf:/nonexistent/data.parquet", r"hf:/nonexistent/data.parquet: no such file or folder"),
    ("hf:{p}:prompt=question,answer=answer,colour=red", r"unknown parameter\(s\) \['colour'\]"),
])
def test_a_bad_dataset_or_column_is_one_line(spec, message, parquet, tmp_path):
    empty = tmp_path / "empty"  # a data file with no rows
    datasets.Dataset.from_dict({"question": [], "answer": []}).to_parquet(f"{empty}.parquet")
    with pytest.raises(ValueError) as error:
        get_task(spec.format(p=parquet, empty=empty))
    assert re.search(message, str(error.value)) and "\n" not in str(error.value), str(error.value)
    result = runner.invoke(app, ["train", "--task", spec.format(p=parquet, empty=empty), "--steps", "1",
                                 "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and result.output.count("\n") == 1 and "error:" in result.output, result.output


def test_conversational_prompts_go_through_the_chat_template(tmp_path):
    rows = [{"messages": [{"role": "system", "content": "Answer briefly."},
                          {"role": "user", "content": f"sort {i} 3:"}],
             "answer": " ".join(sorted([str(i), "3"])),
             "completion": [{"role": "assistant", "content": f"<answer>{i} 3</answer>"}]} for i in range(10)]
    path = tmp_path / "chat.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    task = get_task(f"hf:{path}:prompt=messages,answer=answer,demonstration=completion")
    problem = task.sample(1, seed=0)[0]
    assert isinstance(problem.prompt, Conversation) and problem.prompt.messages[0]["role"] == "system"
    assert problem.demonstration.startswith("<answer>")
    tokenizer = build_char_tokenizer()
    assert format_prompt(tokenizer, problem.prompt) == problem.prompt  # no template: the turns' text
    tokenizer.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}<assistant>{% endif %}")
    templated = format_prompt(tokenizer, problem.prompt)
    assert templated.startswith("<system>Answer briefly.\n<user>sort ") and templated.endswith("<assistant>")
    hinted = problem.prompt + " hint"  # GHPO's hint lands at the end of the user turn
    assert hinted.messages[-1]["content"].endswith(":" + " hint") and hinted.messages[0] == problem.prompt.messages[0]
    assert pickle.loads(pickle.dumps(problem)).prompt.messages == problem.prompt.messages
    # the reward sandbox gets a task without the data, which still scores
    worker = pickle.loads(pickle.dumps(task))
    assert worker.problems == [] and worker.score(problem, f"<answer>{problem.answer}</answer>") == 1.0
