"""Run folders: the folder is the run, never clobbered, locked while in use; checkpoints verified by a manifest,
resumed without pickle, and a resumed run equals the uninterrupted one bit for bit (seconds per test)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tests.test_trainer import TIMING_KEYS, small_config
from unipo.cli import app
from unipo.runs import RunFolder, RunFolderError, load_trainer_state, verify
from unipo.trainer import Trainer, resume_run, start_run

TESTS = Path(__file__).resolve().parent
STEPS, SAVE_EVERY = 5, 2  # checkpoints at steps 2 and 4 and at the end (5); keep_checkpoints=2 leaves 4 and 5


def config(out, *, steps=STEPS, save_every=SAVE_EVERY, **overrides):
    return small_config(steps=steps, out=str(out), save_every=save_every, **overrides)


def outcome(trainer: Trainer, out) -> dict:
    """What must be identical between a resumed and an uninterrupted run: the logged metrics (timings aside),
    the weights, and the optimizer's and RNGs' state."""
    logged = RunFolder(out).read("metrics.jsonl")
    state = trainer.state_dict()
    moments = [(k, name, v.clone()) for k, s in state["optimizer"]["state"].items() for name, v in s.items()]
    return {"metrics": [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in logged],
            "weights": [p.detach().clone() for p in trainer.model.parameters()],
            "moments": moments, "rng": (state["generator"].clone(), state["torch_rng"].clone(), state["python_rng"]),
            "value_head": [v.clone() for v in (state["value_head"] or {}).values()], "tracker": state["tracker"],
            "scheduler": state["scheduler"], "step": trainer.step}


def assert_same(a: dict, b: dict) -> None:
    assert a["step"] == b["step"]
    assert a["metrics"] == b["metrics"]  # exact: every float logged is the same
    assert all(torch.equal(x, y) for x, y in zip(a["weights"], b["weights"], strict=True))
    assert [(k, n) for k, n, _ in a["moments"]] == [(k, n) for k, n, _ in b["moments"]]
    assert all(torch.equal(x, y) for (_, _, x), (_, _, y) in zip(a["moments"], b["moments"]))
    assert torch.equal(a["rng"][0], b["rng"][0]) and torch.equal(a["rng"][1], b["rng"][1])
    assert a["rng"][2] == b["rng"][2]
    assert all(torch.equal(x, y) for x, y in zip(a["value_head"], b["value_head"], strict=True))
    assert a["tracker"] == b["tracker"] and a["scheduler"] == b["scheduler"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """An uninterrupted run of STEPS steps (its folder and its outcome); tests work on copies of the folder."""
    out = tmp_path_factory.mktemp("finished") / "run"
    trainer = start_run(config(out), progress=False)
    trainer.fit()
    return out, outcome(trainer, out)


def copy_of(finished, tmp_path, name="run") -> Path:
    target = tmp_path / name
    shutil.copytree(finished[0], target)
    return target


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def cli(*args: str):
    return CliRunner().invoke(app, list(args))


def one_line(result) -> str:
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


# -- the folder is the run -------------------------------------------------------------------------------
def test_resume_of_a_copied_run_works_and_never_touches_the_original(finished, tmp_path):
    original = copy_of(finished, tmp_path, "original")
    before = snapshot(original)
    copy = tmp_path / "copy"
    shutil.copytree(original, copy)
    result = cli("train", "--resume", "--out", str(copy), "--steps", "6")
    assert result.exit_code == 0, result.output
    assert snapshot(original) == before  # byte for byte: config, logs, checkpoints, latest
    assert [r["step"] for r in RunFolder(copy).read("metrics.jsonl")] == [1, 2, 3, 4, 5, 6]
    assert RunFolder(copy).latest_checkpoint().name == "checkpoint-6"
    assert RunFolder(copy).read_config().out == str(copy)  # informational, now where the run is


def test_resume_of_a_moved_run_from_another_directory(finished, tmp_path, monkeypatch):
    old = copy_of(finished, tmp_path, "old")
    (tmp_path / "new").mkdir()
    shutil.move(old, tmp_path / "new" / "run")
    monkeypatch.chdir(tmp_path / "new")
    resumed = resume_run("run", steps=6, progress=False)  # a relative path, another working directory
    resumed.fit()
    assert not old.exists()  # the config's old `out` is neither used nor recreated
    assert [r["step"] for r in RunFolder(tmp_path / "new" / "run").read("metrics.jsonl")] == [1, 2, 3, 4, 5, 6]


def test_resume_of_a_folder_that_is_not_a_run_creates_nothing(tmp_path):
    with pytest.raises(RunFolderError, match="not a run folder"):
        resume_run(str(tmp_path / "nowhere"), progress=False)
    assert not (tmp_path / "nowhere").exists()


# -- never clobbered, one run at a time -----------------------------------------------------------------
def test_a_new_run_into_a_used_folder_is_refused(finished, tmp_path):
    run = copy_of(finished, tmp_path)
    before = snapshot(run)
    with pytest.raises(RunFolderError, match="already holds a run"):
        start_run(config(run), progress=False)
    result = cli("train", "--task", "coin", "--steps", "1", "--out", str(run))
    assert result.exit_code == 2
    assert "already holds a run" in one_line(result) and "--resume" in result.output and "--overwrite" in result.output
    assert snapshot(run) == before


def test_overwrite_empties_a_run_folder_first_and_refuses_a_foreign_one(finished, tmp_path):
    run = copy_of(finished, tmp_path)
    result = cli("train", "--task", "coin", "--steps", "2", "--out", str(run), "--overwrite",
                 "rollout.prompts_per_step=4", "rollout.group_size=4", "eval_problems=4")
    assert result.exit_code == 0, result.output
    assert [r["step"] for r in RunFolder(run).read("metrics.jsonl")] == [1, 2]
    assert [p.name for _, p in RunFolder(run).checkpoints()] == ["checkpoint-2"]
    assert RunFolder(run).read_config().steps == 2

    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    result = cli("train", "--task", "coin", "--steps", "1", "--out", str(other), "--overwrite")
    assert result.exit_code == 2 and "not a unipo run folder" in one_line(result)
    assert (other / "notes.txt").read_text() == "mine"


HOLD_LOCK = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.ftruncate(fd, 0)
os.write(fd, str(os.getpid()).encode())
print("locked", flush=True)
time.sleep(120)
"""


def test_a_run_into_a_folder_another_process_holds_is_refused(finished, tmp_path):
    fresh, used = tmp_path / "fresh", copy_of(finished, tmp_path)
    fresh.mkdir()
    holders = [subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(folder / ".lock")], stdout=subprocess.PIPE,
                                text=True) for folder in (fresh, used)]
    try:
        assert all(h.stdout.readline().strip() == "locked" for h in holders)
        with pytest.raises(RunFolderError, match=rf"{fresh} is in use by another run \(pid {holders[0].pid}\)"):
            start_run(config(fresh), progress=False)
        with pytest.raises(RunFolderError, match=rf"in use by another run \(pid {holders[1].pid}\)"):
            resume_run(str(used), steps=6, progress=False)
        for args in (["--task", "coin", "--out", str(fresh)], ["--resume", "--out", str(used)]):
            result = cli("train", *args)
            assert result.exit_code == 2 and "in use by another run" in one_line(result)
        assert [p.name for p in fresh.iterdir()] == [".lock"]
    finally:
        for h in holders:
            h.kill()
            h.wait()
    start_run(config(fresh, steps=1), progress=False).fit()  # the holder is gone: the folder is free
    assert RunFolder(fresh).latest_checkpoint().name == "checkpoint-1"


def test_the_lock_is_held_for_the_run_and_released_after(tmp_path):
    out = tmp_path / "run"
    trainer = start_run(config(out, steps=1), progress=False)
    with pytest.raises(RunFolderError, match="in use"):
        RunFolder(out).lock()  # a second claim, even from this process, while the run lives
    trainer.fit()
    second = RunFolder(out)
    second.lock()  # fit ended: released
    second.unlock()


# -- verified checkpoints and fallback ------------------------------------------------------------------
def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGE = {
    "truncated model": (lambda c: _truncate(c / "model.safetensors"), "model.safetensors has"),
    "truncated state": (lambda c: _truncate(c / "trainer_state.safetensors"), "trainer_state.safetensors has"),
    "flipped byte": (lambda c: _flip_byte(c / "model.safetensors"), "does not match its sha256"),
    "missing file": (lambda c: (c / "trainer_state.json").unlink(), "trainer_state.json is missing"),
    "bad manifest": (lambda c: (c / "manifest.json").write_text('{"files": '), "manifest.json is unreadable"),
    "no manifest": (lambda c: (c / "manifest.json").unlink(), "no manifest.json"),
    "missing checkpoint": (lambda c: shutil.rmtree(c), None),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_resume_falls_back_to_the_previous_intact_checkpoint(finished, tmp_path, capfd, damage):
    run = copy_of(finished, tmp_path)
    harm, reason = DAMAGE[damage]
    harm(run / "checkpoint-5")
    resumed = resume_run(str(run), progress=False)
    err = capfd.readouterr().err
    if reason is not None:
        skipped = [line for line in err.splitlines() if "skipped checkpoint-5" in line]
        assert len(skipped) == 1 and reason in skipped[0], err
    assert resumed.step == 4
    resumed.fit()
    assert_same(outcome(resumed, run), finished[1])
    assert verify(run / "checkpoint-5", 5) is None and (run / "latest").read_text() == "checkpoint-5"


@pytest.mark.parametrize("recipe", ["ppo", "single_stream", "cppo", "luffy"])
def test_stateful_recipes_resume_bit_for_bit(tmp_path, recipe):
    """The value head (ppo), SPO's tracker (single_stream), the reference model (cppo) and mixed expert rows
    (luffy) survive the safetensors + JSON round trip: resumed from checkpoint-2, step 3 is the uninterrupted one."""
    out = tmp_path / "run"
    trainer = start_run(small_config(recipe, steps=3, out=str(out), save_every=1), progress=False)
    trainer.fit()
    uninterrupted = outcome(trainer, out)
    if recipe == "ppo":
        assert uninterrupted["value_head"] and any(v.abs().sum() > 0 for v in uninterrupted["value_head"])
    if recipe == "single_stream":
        assert uninterrupted["tracker"]
    shutil.rmtree(out / "checkpoint-3")
    resumed = resume_run(str(out), progress=False)
    assert resumed.step == 2
    if recipe == "cppo":
        assert verify(out / "reference") is None
    resumed.fit()
    assert_same(outcome(resumed, out), uninterrupted)


def test_no_intact_checkpoint_is_one_clear_error(finished, tmp_path):
    run = copy_of(finished, tmp_path)
    for _, checkpoint in RunFolder(run).checkpoints():
        (checkpoint / "manifest.json").unlink()
    with pytest.raises(RunFolderError, match=r"no intact checkpoint .* \(every checkpoint failed verification\)"):
        resume_run(str(run), progress=False)
    for _, checkpoint in RunFolder(run).checkpoints():
        shutil.rmtree(checkpoint)
    with pytest.raises(RunFolderError, match=r"no intact checkpoint .* its first checkpoint at step 2 \(save_every\)"):
        resume_run(str(run), progress=False)


def test_a_partial_last_log_line_is_cut_on_resume(finished, tmp_path, capfd):
    run = copy_of(finished, tmp_path)
    shutil.rmtree(run / "checkpoint-5")
    with open(run / "metrics.jsonl", "a") as fh:  # a kill in the middle of writing step 6's line
        fh.write('{"step": 6, "reward_me')
    assert [r["step"] for r in RunFolder(run).read("metrics.jsonl")] == [1, 2, 3, 4, 5]  # readers skip it
    resumed = resume_run(str(run), progress=False)
    err = capfd.readouterr().err
    assert "metrics.jsonl: removed a partial last line" in err
    assert (run / "metrics.jsonl").read_text().endswith("}\n")
    resumed.fit()
    assert_same(outcome(resumed, run), finished[1])


def test_a_damaged_log_line_in_the_middle_names_file_and_line(finished, tmp_path):
    run = copy_of(finished, tmp_path)
    lines = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
    lines[1] = "garbage\n"
    (run / "metrics.jsonl").write_text("".join(lines))
    with pytest.raises(RunFolderError, match=r"metrics.jsonl:2 is not a JSON record"):
        resume_run(str(run), progress=False)


def test_stale_temporary_folders_are_removed_on_resume(finished, tmp_path, capfd):
    run = copy_of(finished, tmp_path)
    stale = [run / ".checkpoint-6.k3j2h1", run / ".reference.abc123", run / ".checkpoint-4.deleted-x9"]
    for folder in stale:
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"half a file")
    (run / ".metrics.jsonl.tmp").write_text("{}")
    resumed = resume_run(str(run), progress=False)
    assert "removed 4 stale temporary entries" in capfd.readouterr().err
    assert not any(p.exists() for p in stale) and not (run / ".metrics.jsonl.tmp").exists()
    assert resumed.step == 5


def test_pruning_never_deletes_the_checkpoint_just_written(finished, tmp_path):
    """A run written into a used folder without start_run (as a library user may): the old checkpoints 4 and 5
    are a future this run discards; before, pruning kept them and deleted the new checkpoint-1 (`latest` dangled)."""
    run = copy_of(finished, tmp_path)
    Trainer(config(run, steps=2, save_every=1), run=RunFolder(run), progress=False).fit()
    assert [p.name for _, p in RunFolder(run).checkpoints()] == ["checkpoint-1", "checkpoint-2"]
    assert RunFolder(run).latest_checkpoint().name == "checkpoint-2" == (run / "latest").read_text()


# -- kill -9 inside save_checkpoint --------------------------------------------------------------------
KILLED_RUN = """
import os, signal, sys
sys.path.insert(0, sys.argv[1])
import torch
torch.set_num_threads(1)
import unipo.runs as runs
from test_trainer import small_config
from unipo.trainer import start_run

out, point = sys.argv[2], sys.argv[3]
owner = runs.RunFolder if point == "_prune" else runs
real = getattr(owner, point)

def dying(*args):
    text = " ".join(map(str, args))
    if ".checkpoint-4." in text or args[-1] == 4:  # checkpoint-4's write (or, for _prune, its last stage)
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*args)

setattr(owner, point, dying)
start_run(small_config(steps=5, out=out, save_every=2), progress=False).fit()
"""

# kill points inside RunFolder.save_checkpoint, in order, and the checkpoint the resume must start from
KILL_POINTS = {"save_trainer_state": 2,  # the model is written, the trainer state not yet
               "write_manifest": 2,  # every file written, no manifest
               "_install": 2,  # the manifest written, not renamed into place
               "_prune": 4}  # renamed and `latest` written, older checkpoints not pruned yet


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_kill_9_inside_a_checkpoint_write_then_resume_equals_the_uninterrupted_run(finished, tmp_path, point):
    out = tmp_path / "run"
    killed = subprocess.run([sys.executable, "-c", KILLED_RUN, str(TESTS), str(out), point],
                            cwd=TESTS.parent, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    resumed = resume_run(str(out), progress=False)
    assert resumed.step == KILL_POINTS[point]
    assert not list(out.glob(".checkpoint-*"))
    resumed.fit()
    assert_same(outcome(resumed, out), finished[1])


def test_a_failed_rename_inside_a_checkpoint_write_then_resume_equals_the_uninterrupted_run(
        finished, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real = os.replace

    def full_disk(src, dst):
        if Path(src).name.startswith(".checkpoint-4."):
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(OSError, match="No space left"):
        start_run(config(out), progress=False).fit()
    monkeypatch.setattr(os, "replace", real)
    assert list(out.glob(".checkpoint-4.*")) and RunFolder(out).latest_checkpoint().name == "checkpoint-2"
    resumed = resume_run(str(out), progress=False)
    resumed.fit()
    assert_same(outcome(resumed, out), finished[1])


# -- no pickle --------------------------------------------------------------------------------------------
class Payload:
    """Unpickling this calls open(path, "w"): a file appears when a pickle is loaded."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def test_a_crafted_pickle_in_a_run_folder_is_never_loaded(finished, tmp_path, monkeypatch, capfd):
    probe = tmp_path / "probe-created"
    torch.save({"step": 5, "payload": Payload(str(probe))}, tmp_path / "probe.pt")
    torch.load(tmp_path / "probe.pt", weights_only=False)
    assert probe.exists()  # the payload works: what the old resume did would have run it

    run = copy_of(finished, tmp_path)
    marker = tmp_path / "pwned"
    crafted = {"step": 5, "payload": Payload(str(marker))}
    torch.save(crafted, run / "checkpoint-5" / "trainer_state.pt")  # next to an intact checkpoint's files
    old_style = run / "checkpoint-9"  # a checkpoint as the old unipo wrote it
    shutil.copytree(run / "checkpoint-4", old_style)
    for name in ("manifest.json", "trainer_state.json", "trainer_state.safetensors"):
        (old_style / name).unlink()
    torch.save(crafted, old_style / "trainer_state.pt")

    def no_torch_load(*args, **kwargs):
        raise AssertionError("resume called torch.load")

    monkeypatch.setattr(torch, "load", no_torch_load)
    resumed = resume_run(str(run), progress=False)
    err = capfd.readouterr().err
    assert "skipped checkpoint-9: no manifest.json (a checkpoint of an older unipo" in err
    assert "skipped checkpoint-5: it holds trainer_state.pt, which its manifest.json does not list" in err
    assert resumed.step == 4 and not marker.exists()
    resumed.fit()
    assert not marker.exists()
    assert_same(outcome(resumed, run), finished[1])


def test_the_trainer_state_round_trips_exactly_through_safetensors_and_json(tmp_path):
    from unipo.runs import save_trainer_state

    state = {"step": 3, "rng": (3, tuple(range(5)), None), "opt": {0: {"m": torch.randn(3), "step": torch.tensor(2.0)}},
             "groups": [{"betas": (0.9, 0.99), "params": [0, 1]}], "tracker": {"$t": (1.5, 0.5), "7?": (1.0, 2.0)},
             "g": torch.ByteTensor([1, 2, 3]), "nan": float("inf")}
    save_trainer_state(tmp_path, state)
    back = load_trainer_state(tmp_path)
    assert back.keys() == state.keys() and back["rng"] == state["rng"] and back["groups"] == state["groups"]
    assert back["tracker"] == state["tracker"] and back["nan"] == float("inf")
    assert torch.equal(back["opt"][0]["m"], state["opt"][0]["m"]) and back["opt"][0]["step"].shape == ()
    assert torch.equal(back["g"], state["g"]) and back["g"].dtype == torch.uint8
    with pytest.raises(TypeError, match="cannot be saved"):
        save_trainer_state(tmp_path, {"x": object()})


# -- --resume keeps the saved settings -----------------------------------------------------------------
def test_resume_with_different_settings_is_an_error_naming_each(finished, tmp_path):
    run = copy_of(finished, tmp_path)
    before = snapshot(run)
    result = cli("train", "--resume", "--out", str(run), "--recipe", "dapo", "--seed", "3", "optim.lr=0.5",
                 "rollout.group_size=4")
    assert result.exit_code == 2
    line = one_line(result)
    assert "--recipe: saved 'grpo', given 'dapo'" in line and "--seed: saved 0, given 3" in line
    assert "optim.lr: saved 0.001, given 0.5" in line and "group_size" not in line  # an equal value is fine
    result = cli("train", "--resume", "--out", str(run), "rollout.groupsize=4")
    assert result.exit_code == 2 and "unknown config key 'rollout.groupsize'" in one_line(result)
    result = cli("train", "--resume", "--out", str(run), "--overwrite")
    assert result.exit_code == 2 and "exclude each other" in one_line(result)
    assert snapshot(run) == before

    result = cli("train", "--resume", "--out", str(run), "--recipe", "grpo", "--task", "coin", "--seed", "0",
                 "optim.lr=1e-3", "--steps", "6")
    assert result.exit_code == 0, result.output
    assert [r["step"] for r in RunFolder(run).read("metrics.jsonl")] == [1, 2, 3, 4, 5, 6]
    assert json.loads((run / "checkpoint-6" / "manifest.json").read_text())["step"] == 6
