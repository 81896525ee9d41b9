"""Every mistake is one clear line: `error: ...` on stderr and exit code 2, checked before anything expensive.

The table runs the real entry point (`unipo.cli.main`, what the `unipo` script calls) in this process on each
mistake and asserts the exit code and that the whole output is exactly one non-empty line naming the problem
(the key, value or path). None of them trains: each fails while the config is built or in the check before
training (`unipo.cli.preflight`), except the diverging run at the end, which trains two tiny steps.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from unipo.cli import main
from unipo.config import TrainConfig, apply_overrides, config_keys
from unipo.models import PromptTooLongError, build_tiny_model, save_model
from unipo.recipes import get_recipe
from unipo.rollout import NonFiniteLogitsError, generate, policy_logprobs
from unipo.runs import RunFolder


def run_cli(capsys, *args: str) -> tuple[int, list[str]]:
    """(exit code, non-empty output lines, stdout and stderr together) of `unipo ARGS`."""
    with pytest.raises(SystemExit) as exited:
        main([str(a) for a in args])
    captured = capsys.readouterr()
    lines = [line for line in (captured.out + captured.err).splitlines() if line.strip()]
    code = exited.value.code
    return (0 if code is None else code), lines


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Model folders (good, truncated weights, broken config.json, no tokenizer) and data files."""
    root = tmp_path_factory.mktemp("inputs")
    model, tokenizer = build_tiny_model()
    save_model(model, tokenizer, root / "good")
    for name in ("truncated", "badconfig", "notokenizer"):
        save_model(model, tokenizer, root / name)
    weights = root / "truncated" / "model.safetensors"
    with open(weights, "r+b") as fh:
        fh.truncate(weights.stat().st_size // 2)
    (root / "badconfig" / "config.json").write_text('{"model_type": "qwen2", ')
    for file in (root / "notokenizer").iterdir():
        if "token" in file.name:
            file.unlink()
    (root / "data_dir").mkdir()
    (root / "empty.jsonl").write_text("")

    def jsonl(name: str, prompts: list[str]) -> None:
        (root / name).write_text("".join(json.dumps({"prompt": p, "answer": "1"}) + "\n" for p in prompts))

    from unipo.tasks.base import split_of

    train_only = [p for p in (f"what is {i}?" for i in range(200)) if split_of(p) == "train"][:20]
    jsonl("no_test.jsonl", train_only)
    both = [f"what is {i}?" for i in range(200)]
    jsonl("long_prompt.jsonl", both[:40] + ["x" * 2000 + f" {i}" for i in range(40)])
    jsonl("huge_prompt.jsonl", both[:40] + ["x" * 30000 + f" {i}" for i in range(40)])
    (root / "a_file").write_text("not a folder")
    return root


CONFIG_CASES = [
    (["optim.lr=abc"], r"optim\.lr must be a finite number > 0, got 'abc'"),
    (["optim.lr=.inf"], r"optim\.lr must be a finite number > 0, got inf"),
    (["optim.lr=nan"], r"optim\.lr must be a finite number > 0, got nan"),
    (["rollout.group_size=2.5"], r"rollout\.group_size must be an int >= 1, got 2\.5"),
    (["device=tpu"], r"device must be auto, cpu, cuda, cuda:N or mps, got 'tpu'"),
    (["eval_problems=0"], r"eval_problems must be an int >= 1, got 0"),
    (["save_every=abc"], r"save_every must be an int >= 0, got 'abc'"),
    (["optim.grad_clip=-1"], r"optim\.grad_clip must be a number > 0 \(inf: no clipping\), got -1"),
    (["max_bad_steps=0"], r"max_bad_steps must be an int >= 1, got 0"),
    (["bf16=maybe"], r"bf16 must be true or false, got 'maybe'"),
    (["eval_every=-1"], r"eval_every must be an int >= 0, got -1"),
    (["--steps", "0"], r"steps must be an int >= 1, got 0"),
    (["steps=0"], r"steps must be an int >= 1, got 0"),
    (["recipe.selection=nosuch"], r"recipe\.selection must be a list of selection names .*got 'nosuch'"),
    (["--recipe", "luffy", "rollout.group_size=1"], r"rollout\.group_size=1 leaves no rollouts.*expert_per_group=1"),
    (["optim.lr=[1,"], r"optim\.lr: '\[1,' is not a valid value"),
    (["rollout=4"], r"config key 'rollout' is a section"),
    (["recipe.loss_params.eps_lo=0.1"], r"recipe\.loss_params\.eps_lo: .*unknown params \['eps_lo'\]"),
]


@pytest.mark.parametrize("args, message", CONFIG_CASES, ids=[" ".join(a) for a, _ in CONFIG_CASES])
def test_a_bad_config_value_is_one_line_naming_the_key(args, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, lines = run_cli(capsys, "train", *args)
    assert code == 2, lines
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: ") and re.search(message, lines[0]), lines[0]
    assert not (tmp_path / "runs").exists(), "nothing may be written before the config is valid"


PATH_CASES = [  # (args with {root} for the fixture folder, what the line must say)
    (["train", "--model", "mycheckpoint"], r"model folder 'mycheckpoint' does not exist \(a hub id is org/name"),
    (["train", "--model", "./runs/nothing"], r"model folder './runs/nothing' does not exist"),
    (["train", "--model", "{root}/truncated"], r"truncated.*model\.safetensors is damaged: it is truncated"),
    (["train", "--model", "{root}/badconfig"], r"badconfig.*config\.json is not valid JSON"),
    (["train", "--model", "{root}/notokenizer"], r"notokenizer.* has no tokenizer files"),
    (["eval", "--model", "{root}/truncated", "--n", "2"], r"truncated.*model\.safetensors is damaged"),
    (["eval", "--model", "mycheckpoint"], r"model folder 'mycheckpoint' does not exist"),
    (["train", "--task", "jsonl:{root}/data_dir"], r"data_dir'?: is a directory"),
    (["train", "--task", "jsonl:{root}/missing.jsonl"], r"missing\.jsonl'?: no such file or directory"),
    (["train", "--task", "jsonl:{root}/empty.jsonl"], r"empty\.jsonl: the 'test' split is empty \(0 problems"),
    (["train", "--task", "jsonl:{root}/no_test.jsonl"], r"no_test\.jsonl: the 'test' split is empty \(20 problems"),
    (["eval", "--model", "tiny", "--task", "jsonl:{root}/no_test.jsonl"], r"the 'test' split is empty"),
    (["train", "--task", "jsonl:{root}/long_prompt.jsonl"],
     r"40 of 80 prompts do not fit the model's context: the longest has 2003 tokens.* over the model's 512 positions"),
    (["train", "--task", "jsonl:{root}/huge_prompt.jsonl"], r"longest has 30003 tokens.*512 positions"),
    (["eval", "--model", "tiny", "--task", "jsonl:{root}/huge_prompt.jsonl", "--n", "50"],  # while sampling
     r"prompts do not fit the model's context: the longest has 30003 tokens"),
    (["train", "--out", "{root}/a_file"], r"a_file.* is a file"),
    (["eval", "--model", "tiny", "--n", "0"], r"--n must be >= 1, got 0"),
    (["eval", "--model", "tiny", "--k", "1,x"], r"--k must list positive integers"),
]


@pytest.mark.parametrize("args, message", PATH_CASES, ids=[" ".join(a) for a, _ in PATH_CASES])
def test_a_bad_model_data_or_output_path_is_one_line_naming_it(args, message, folders, capsys, tmp_path,
                                                                 monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, lines = run_cli(capsys, *(a.format(root=folders) for a in args))
    assert code == 2, lines
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: ") and re.search(message, lines[0]), lines[0]
    assert "Traceback" not in lines[0]


def _unwritable_folder(tmp_path) -> str | None:
    """A folder this process cannot write in: a read-only one, or (root writes anywhere else) /sys."""
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        return str(locked)
    try:
        os.rmdir(tempfile.mkdtemp(dir="/sys"))
    except OSError:
        return "/sys"
    return None


def test_an_out_folder_that_cannot_be_written_is_one_line(capsys, tmp_path, monkeypatch):
    folder = _unwritable_folder(tmp_path)
    if folder is None:
        pytest.skip("no folder here is unwritable for this user")
    monkeypatch.chdir(tmp_path)
    code, lines = run_cli(capsys, "train", "--out", f"{folder}/run")
    assert code == 2 and len(lines) == 1, lines
    assert re.search(rf"--out '{folder}/run': cannot write in '{folder}' \(", lines[0]), lines[0]


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_full_disk_is_one_line(capsys, tmp_path, monkeypatch):
    """Writing to /dev/full fails with the operating system's real ENOSPC, as a full disk does mid-run."""
    def write_to_a_full_disk(config):
        with open("/dev/full", "w") as fh:
            fh.write("x" * 100_000)

    monkeypatch.setattr("unipo.cli.preflight", write_to_a_full_disk)
    monkeypatch.chdir(tmp_path)
    code, lines = run_cli(capsys, "train")
    assert code == 2 and len(lines) == 1, lines
    assert lines[0] == "error: no space left on device: free some space or choose another --out"


def test_an_internal_error_is_a_traceback_exit_1_and_says_it_is_a_bug(capsys, tmp_path, monkeypatch):
    def bug(config):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr("unipo.cli.preflight", bug)
    monkeypatch.chdir(tmp_path)
    code, lines = run_cli(capsys, "train")
    assert code == 1
    assert lines[0].startswith("Traceback") and "ZeroDivisionError: a bug" in lines
    assert "this is a bug in unipo" in lines[-1] and "report it" in lines[-1]


def test_a_usage_error_of_the_command_line_stays_exit_2(capsys):
    code, lines = run_cli(capsys, "eval", "--no-such-option")
    assert code == 2 and any("No such option" in line for line in lines)


def test_a_diverging_run_stops_in_one_line_and_its_metrics_stay_json(capsys, tmp_path, monkeypatch):
    """lr = 1e30: the first update blows the weights up, the second step's loss is NaN. The run stops with a line
    that names no internal parameter, and metrics.jsonl stays strict JSON (NaN written as null and listed)."""
    monkeypatch.chdir(tmp_path)
    code, lines = run_cli(capsys, "train", "--recipe", "sft", "--steps", "3", "--out", "run", "optim.lr=1e30",
                          "max_bad_steps=1", "rollout.prompts_per_step=2", "eval_problems=2")
    assert code == 2, lines
    assert lines[-1].startswith("error: ") and "non-finite" in lines[-1], lines
    assert "check_finite" not in "\n".join(lines) and "Traceback" not in "\n".join(lines)
    text = (tmp_path / "run" / "metrics.jsonl").read_text()
    records = [json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} is not JSON")) for line in
               text.splitlines()]
    assert records[0].get("nonfinite") is None and math.isfinite(records[0]["loss"])
    assert records[-1]["loss"] is None and "loss" in records[-1]["nonfinite"]


def test_generate_stops_on_nan_logits_instead_of_crashing_in_multinomial():
    model, _ = build_tiny_model()
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))
    for greedy in (False, True):
        with pytest.raises(NonFiniteLogitsError, match="lower optim.lr"):
            generate(model, [[5, 6, 7]], group_size=2, max_new_tokens=4, eos_token_id=1, pad_token_id=0,
                     greedy=greedy)


def test_prompts_past_the_context_are_refused_before_any_compute():
    model, _ = build_tiny_model()
    with pytest.raises(PromptTooLongError, match=r"1 of 2 prompts .* longest has 500 tokens plus a completion "
                                                 r"budget of 20, over the model's 512 positions"):
        generate(model, [[5] * 10, [5] * 500], group_size=1, max_new_tokens=20, eos_token_id=1, pad_token_id=0)
    ids = torch.full((1, 400), 5)
    with pytest.raises(PromptTooLongError, match="prompt \\+ completion row"):
        policy_logprobs(model, ids, torch.ones_like(ids), ids[:, :200], torch.ones_like(ids[:, :200]))


def test_run_folder_writes_nan_and_inf_as_null_and_lists_them(tmp_path):
    run = RunFolder(tmp_path / "run")
    run.append("metrics.jsonl", {"step": 1, "loss": math.nan, "kl": math.inf, "ok": 0.5, "x": {"y": -math.inf}})
    line = (tmp_path / "run" / "metrics.jsonl").read_text()
    record = json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))
    assert record == {"step": 1, "loss": None, "kl": None, "ok": 0.5, "x": {"y": None},
                      "nonfinite": ["loss", "kl", "x.y"]}


BASE = TrainConfig(recipe=get_recipe("luffy"))
KEYS = config_keys(BASE)
PARAM_FIELDS = [k for k in KEYS if k.endswith("_params")] + ["lora"]
YAMLISH = ["0", "1", "-1", "2.5", "1e30", ".inf", "-.inf", "nan", ".nan", "true", "false", "maybe", "abc", "",
           "~", "[]", "{}", "[1, 2]", "{a: 1}", "[cppo]", "cppo", "2001-01-01", "'x'", "[1,", "{", "!!binary aGk=",
           "&a [*a]", "0x10", "1_000", "99999999999999999999999", "1e-300", "[0.1, 1.5]", "{keep: 0}", "? a",
           "{keep: abc}", "[[1]]", "\"a\\nb\""]


@given(st.dictionaries(
    st.one_of(st.sampled_from(KEYS), st.text(max_size=12),
              st.builds("{}.{}".format, st.sampled_from(PARAM_FIELDS),
                        st.one_of(st.sampled_from(["eps_low", "eps_high", "keep", "cppo", "r", "alpha"]),
                                  st.text(max_size=4)))),
    st.one_of(st.sampled_from(YAMLISH), st.text(max_size=15), st.integers().map(str), st.floats().map(str)),
    max_size=3))
def test_the_config_parser_raises_nothing_but_one_line_value_errors(overrides):
    try:
        config = apply_overrides(BASE, overrides)
    except ValueError as error:
        assert "\n" not in str(error), str(error)
    else:
        assert isinstance(config, TrainConfig)


def test_overrides_apply_together_so_their_order_does_not_matter():
    """group_size=1 alone leaves luffy no rollouts; with expert_in_addition it is valid, in either order."""
    for order in (["rollout.group_size", "recipe.expert_in_addition"],
                  ["recipe.expert_in_addition", "rollout.group_size"]):
        values = {"rollout.group_size": "1", "recipe.expert_in_addition": "true"}
        config = apply_overrides(BASE, {key: values[key] for key in order})
        assert config.rollout.group_size == 1 and config.recipe.expert_in_addition is True
    with pytest.raises(ValueError, match="no rollouts"):
        apply_overrides(BASE, {"rollout.group_size": "1"})
