"""LoRA checkpoints name their base model so that they load from any directory."""

from __future__ import annotations

import json

import pytest
import torch

from unipo.config import RolloutConfig, TrainConfig
from unipo.models import load_model, save_model
from unipo.recipes import get_recipe
from unipo.trainer import resume_run, start_run

pytest.importorskip("peft")


def test_a_lora_run_on_a_relative_base_path_loads_and_resumes_from_elsewhere(tmp_path, monkeypatch):
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(work)
    save_model(*load_model("tiny", device="cpu"), "base")
    config = TrainConfig(recipe=get_recipe("grpo"), task="sort", model="base", steps=1, out="run", device="cpu",
                         lora={"r": 2}, rollout=RolloutConfig(prompts_per_step=2, group_size=2, max_new_tokens=6))
    trainer = start_run(config, progress=False)
    trainer.fit()
    checkpoint = work / "run" / "checkpoint-1"
    assert json.loads((checkpoint / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        str(work / "base")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        expected = trainer.model(ids).logits

    monkeypatch.chdir(elsewhere)  # "base" means nothing here
    model, _ = load_model(str(checkpoint), device="cpu")
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected)
    resumed = resume_run(str(work / "run"), steps=2, progress=False)
    resumed.fit()
    assert resumed.step == 2 and (work / "run" / "checkpoint-2" / "adapter_config.json").is_file()


def test_a_lora_adapter_on_the_embedded_tiny_model_names_it(tmp_path):
    model, tokenizer = load_model("tiny", device="cpu", lora={"r": 2})
    with torch.no_grad():  # a non-trivial adapter (LoRA's B starts at zero)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.fill_(0.01)
    save_model(model, tokenizer, tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny"
    again, _ = load_model(str(tmp_path / "adapter"), device="cpu")
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits)
