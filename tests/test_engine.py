"""The rollout-engine slot (`rollout.engine`, unipo.engine) in the default install: the native engine, the settings
and their one-line errors, the trainer's weight pushes. The vLLM engine's own tests need vLLM: tests_vllm/."""

from __future__ import annotations

import dataclasses
import importlib.util
import re

import pytest
import torch
from typer.testing import CliRunner

import unipo.engine as engine_module
from unipo.cli import app
from unipo.config import ROLLOUT_ENGINES, OptimConfig, RolloutConfig, TrainConfig, apply_overrides
from unipo.engine import ENGINES, build_engine, check_engine, logprob_mismatch
from unipo.engine.native import NativeEngine
from unipo.models import build_tiny_model
from unipo.recipes import get_recipe
from unipo.rollout import generate
from unipo.trainer import Trainer


def config(**rollout) -> TrainConfig:
    return TrainConfig(recipe=get_recipe("grpo"), task="addition", model="tiny", steps=3, seed=0,
                       rollout=RolloutConfig(prompts_per_step=2, group_size=4, max_new_tokens=8, **rollout),
                       optim=OptimConfig(lr=1e-3), eval_problems=4, save_every=0)


def test_the_registry_and_the_config_name_the_same_engines():
    assert tuple(ENGINES) == ROLLOUT_ENGINES
    assert RolloutConfig().engine == "native"


@pytest.mark.parametrize("key, value, message", [
    ("rollout.engine", "sglang", r"rollout.engine must be one of native, vllm, got 'sglang'"),
    ("rollout.vllm_kv_cache_gib", "0", r"rollout.vllm_kv_cache_gib must be a finite number > 0"),
    ("rollout.vllm_max_model_len", "0", r"rollout.vllm_max_model_len must be an int >= 1"),
    ("rollout.vllm_gpu_memory_utilization", "1.5", r"rollout.vllm_gpu_memory_utilization must be a number in"),
])
def test_engine_settings_are_checked_in_one_line(key, value, message):
    with pytest.raises(ValueError, match=message) as error:
        apply_overrides(config(), {key: value})
    assert "\n" not in str(error.value)


def test_engine_settings_override():
    changed = apply_overrides(config(), {"rollout.engine": "vllm", "rollout.vllm_kv_cache_gib": "0.5",
                                         "rollout.vllm_max_model_len": "256"})
    assert (changed.rollout.engine, changed.rollout.vllm_kv_cache_gib, changed.rollout.vllm_max_model_len) == (
        "vllm", 0.5, 256)


def _vllm_installed(monkeypatch, installed: bool):
    real = importlib.util.find_spec
    spec = real("torch")  # any spec: "found"
    monkeypatch.setattr(engine_module.importlib.util, "find_spec",
                        lambda name, *a: (spec if installed else None) if name == "vllm" else real(name, *a))


def test_vllm_missing_is_one_line_saying_how_to_install(monkeypatch):
    _vllm_installed(monkeypatch, False)
    with pytest.raises(ValueError, match=r"rollout.engine=vllm needs vLLM, which is not installed: pip install") as e:
        check_engine(config(engine="vllm"))
    assert "\n" not in str(e.value) and "docs/vllm.md" in str(e.value)
    check_engine(config())  # the native engine needs nothing


@pytest.mark.parametrize("change, message", [
    (dict(lora={"r": 4}), r"does not take a LoRA model"),
    (dict(device="mps"), r"runs on CUDA or CPU, not mps"),
])
def test_vllm_refuses_what_it_cannot_run(monkeypatch, change, message):
    _vllm_installed(monkeypatch, True)
    with pytest.raises(ValueError, match=message):
        check_engine(dataclasses.replace(config(engine="vllm"), **change))


def test_vllm_refuses_a_multi_process_run(monkeypatch):
    _vllm_installed(monkeypatch, True)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"one training process"):
        check_engine(config(engine="vllm"))


def test_cli_says_so_before_any_model_loads(monkeypatch, tmp_path):
    _vllm_installed(monkeypatch, False)
    monkeypatch.chdir(tmp_path)

    def no_load(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("unipo.trainer.load_model", no_load)
    result = CliRunner().invoke(app, ["train", "--steps", "1", "rollout.engine=vllm"])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert re.search(r"rollout.engine=vllm needs vLLM", lines[0])


def test_native_engine_is_unipos_sampler():
    model, tokenizer = build_tiny_model("tiny")
    prompts = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in ("1+2=", "30+4=")]
    kwargs = dict(group_size=3, max_new_tokens=10, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id, temperature=0.8, top_p=0.9)
    engine = build_engine(config(), model, tokenizer, torch.device("cpu"))
    assert isinstance(engine, NativeEngine) and engine.logp_exact
    ours = engine.generate(prompts, generator=torch.Generator().manual_seed(3), **kwargs)
    direct = generate(model, prompts, generator=torch.Generator().manual_seed(3), **kwargs)
    for field in dataclasses.fields(ours):
        assert torch.equal(getattr(ours, field.name), getattr(direct, field.name)), field.name


class RecordingEngine(NativeEngine):
    """The native sampler, recording each weight push and claiming inexact log-probs (as vLLM does)."""

    logp_exact = False

    def __init__(self, model, trainer_step):
        super().__init__(model)
        self.pushes, self.trainer_step = [], trainer_step

    def sync(self, model):
        self.pushes.append(self.trainer_step())
        super().sync(model)


def test_trainer_samples_with_its_engine_and_pushes_after_each_update():
    trainer = Trainer(config(), progress=False)
    assert isinstance(trainer.engine, NativeEngine) and trainer.collector.engine is trainer.engine
    assert trainer._sampler_logp_exact()  # fp32 and top_p = 1: the native sampler's log-probs are pi_old's
    engine = RecordingEngine(trainer.model, lambda: trainer.step)
    trainer.engine = trainer.collector.engine = engine
    assert not trainer._sampler_logp_exact()  # an engine with other kernels never stands in for pi_old
    for _ in range(3):
        trainer.train_step()
    assert engine.pushes == [1, 2]  # before steps 2 and 3: the policy learned in steps 1 and 2; none before 1


def test_logprob_mismatch_over_the_masked_tokens():
    sampled = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, 0.0, 0.0]])
    trainer = torch.tensor([[-1.1, -2.0, -9.0], [-0.2, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    got = logprob_mismatch(sampled, trainer, mask)
    assert got["rollout/logprob_diff_max"] == pytest.approx(0.3)
    assert got["rollout/logprob_diff_mean"] == pytest.approx((0.1 + 0.0 + 0.3) / 3)
    assert logprob_mismatch(sampled, trainer, torch.zeros_like(mask)) == {
        "rollout/logprob_diff_max": 0.0, "rollout/logprob_diff_mean": 0.0}
