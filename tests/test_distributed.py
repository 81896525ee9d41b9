"""Multi-process training (unipo.distributed) with 2 gloo processes under torchrun.

Marked `multiprocess`: the README's test command leaves them out (each launch starts two Python processes);
CI runs them in their own timed step (`pytest -m multiprocess`). Every launch has a timeout, so a rank that
hangs (a collective one rank skipped, a destructor at exit) fails the test instead of stalling CI.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

pytestmark = pytest.mark.multiprocess

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = Path(__file__).resolve().parent / "distributed_learn.py"
LAUNCH_TIMEOUT_S = 300
# Gradients of N processes against one, relative to the largest gradient entry. float32 sums the same terms in
# another order (and, with two optimizer steps, AdamW's first step amplifies that): measured up to 2.2e-5.
TOLERANCE = 1e-4
RECIPES = ("grpo", "dapo", "reinforce_pp", "high_entropy", "luffy_paper", "ppo", "mt_grpo", "epo", "archer")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR",
                                                              "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    return env


def _run(command: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    try:
        done = subprocess.run(command, cwd=cwd, env=_env(), capture_output=True, text=True,
                              timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired as timeout:
        pytest.fail(f"{' '.join(command)} did not finish in {LAUNCH_TIMEOUT_S} s (a hang):\n{timeout.stderr}")
    assert done.returncode == 0, f"{' '.join(command)} exited {done.returncode}:\n{done.stderr[-4000:]}"
    return done


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]


def _relative(a: dict, b: dict) -> float:
    """max |a - b| over every tensor, over the largest |b| entry."""
    scale = max(float(t.abs().max()) for t in b.values())
    return max(float((a[k] - b[k]).abs().max()) for k in b) / scale


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one_process")
    _run([sys.executable, str(SCRIPT), str(out)])
    return out


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_compute_the_one_process_update(mode, one_process, tmp_path):
    """The same rows, split over 2 ranks (whole groups each): the last optimizer step's gradients and the updated
    weights equal one process's. And the check can fail: the *naive* split (each rank normalising, computing
    batch statistics and quotas over its own rows, then averaging, as DDP over rank-local losses would) differs
    by far more than the tolerance in every case."""
    _run(_torchrun(str(SCRIPT), str(tmp_path), f"parallel={mode}"))
    if mode == "fsdp":  # ArCHer's critic copies the whole policy: refused under FSDP, in one line
        assert (tmp_path / "archer.fsdp_refusal.txt").read_text() == (
            "recipe.baseline=archer_critic copies the whole policy and samples from it on every rank: FSDP shards "
            "it; use parallel=ddp")
    for name in RECIPES:
        if mode == "fsdp" and name in ("ppo", "archer"):
            continue  # FSDP refuses a value head (TrainConfig) and ArCHer's critic
        single = load_file(str(one_process / f"{name}.grad.safetensors"))
        parallel = load_file(str(tmp_path / f"{name}.grad.safetensors"))
        naive = load_file(str(one_process / f"{name}.naive.safetensors"))
        assert _relative(parallel, single) < TOLERANCE, name
        assert _relative(naive, single) > 10 * TOLERANCE, f"{name}: the naive split would pass too"
        weights = load_file(str(tmp_path / f"{name}.weights.safetensors"))
        reference = load_file(str(one_process / f"{name}.weights.safetensors"))
        lr = 1e-3  # distributed_learn's; AdamW moves a weight by at most ~lr per step
        assert max(float((weights[k] - reference[k]).abs().max()) for k in reference) < 0.5 * lr, name


def _train(*args: str, nproc: int, cwd: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "unipo", "train", *args]
    if nproc > 1:
        command.insert(4, f"--nproc={nproc}")
    return _run(command, cwd=cwd)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_checkpoint_at_two_processes_resumes_at_one(mode, tmp_path):
    """`unipo train --nproc 2` writes a full checkpoint (rank 0; FSDP gathers the shards); one process resumes from
    it, and its weights load as a plain model. Both processes exit (no hang at shutdown)."""
    run = tmp_path / "run"
    common = ["--recipe", "grpo", "--task", "sort", "--out", str(run)]
    settings = ["save_every=2", "rollout.prompts_per_step=4", "rollout.group_size=4", "eval_problems=4",
                f"parallel={mode}"]
    _train(*common, "--steps", "2", *settings, nproc=2, cwd=tmp_path)
    assert (run / "checkpoint-2" / "model.safetensors").is_file()
    config = json.loads((run / "checkpoint-2" / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"]  # not FSDP's wrapper class
    _train("--resume", "--out", str(run), "--steps", "3", nproc=1, cwd=tmp_path)
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    assert (run / "checkpoint-3").is_dir()


def test_resume_at_two_processes_from_one(tmp_path):
    """The other way: a one-process checkpoint continues at 2 processes under FSDP (its optimizer state loaded
    into the shards)."""
    run = tmp_path / "run"
    settings = ["save_every=1", "rollout.prompts_per_step=4", "rollout.group_size=4", "eval_problems=4",
                "parallel=fsdp"]
    _train("--recipe", "dapo", "--task", "sort", "--out", str(run), "--steps", "1", *settings, nproc=1,
           cwd=tmp_path)
    _train("--resume", "--out", str(run), "--steps", "2", nproc=2, cwd=tmp_path)
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]


@pytest.mark.parametrize("mode", ["ddp", "fsdp", "ddp-offline"])
def test_sweet_rl_critic_replicas_learn_from_every_ranks_episodes(mode, tmp_path):
    """SWEET-RL's critic learns inside collection: at 2 processes (DDP) each rank's critic is given the global batch
    of episodes (both ranks' rows), fresh or replayed from a recorded file, and after the step the replicas are
    bit-identical and have moved. FSDP refuses the recipe in one line."""
    extra = []
    if mode == "ddp-offline":  # a recorded file of a scripted player (some episodes succeed)
        from tests.test_episode_files import recorded_file
        from unipo.models import load_model

        recorded_file(load_model("tiny", device="cpu")[1], tmp_path / "episodes.jsonl", problems=4, group=4)
        extra = [f"trajectories={tmp_path / 'episodes.jsonl'}"]
    _run(_torchrun(str(SCRIPT.parent / "sweet_distributed.py"), str(tmp_path), f"parallel={mode.split('-')[0]}",
                   *extra), cwd=ROOT)
    if mode == "fsdp":
        assert (tmp_path / "sweet.fsdp_refusal.txt").read_text() == (
            "recipe.baseline=sweet_critic copies the whole policy and samples from it on every rank: FSDP shards "
            "it; use parallel=ddp")
        return
    result = json.loads((tmp_path / "sweet.json").read_text())
    assert min(result["collected"]) > 0 and result["prepared"] == [sum(result["collected"])] * 2
    assert result["replicas_equal"] and result["moved"] > 0 and result["critic_pairs"] > 0
