"""Precision and memory settings: `model_dtype`, `bf16` autocast and `gradient_checkpointing`."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from unipo.config import OptimConfig, RolloutConfig, TrainConfig, apply_overrides
from unipo.lean_decoder import lean_decoder
from unipo.recipes import get_recipe
from unipo.tasks.base import TASKS, Problem, Task
from unipo.trainer import Trainer

# the tests disable the optimizer step (to compare gradients on unmoved weights); torch warns about that
pytestmark = pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")


class ParityCoinTask(Task):
    """Reward 1 when the completion's first character has an even code point (every group has variance)."""

    name = "precision_coin"
    max_new_tokens = 6
    scorer_is_safe = True

    def sample(self, n, *, seed, split="train"):
        return [Problem(prompt=f"{(seed * 7 + i) % 97}?", answer="0", demonstration="0 1 2") for i in range(n)]

    def score(self, problem, completion):
        return float(bool(completion) and ord(completion[0]) % 2 == 0)


if ParityCoinTask.name not in TASKS:
    TASKS.register(ParityCoinTask.name)(lambda **_: ParityCoinTask())


def _config(recipe: str = "grpo", **overrides) -> TrainConfig:
    config = TrainConfig(recipe=get_recipe(recipe), task=ParityCoinTask.name, model="tiny", steps=1, seed=0,
                         rollout=RolloutConfig(prompts_per_step=4, group_size=4),
                         optim=OptimConfig(lr=1e-3, grad_clip=float("inf")))
    return dataclasses.replace(config, **overrides)


def _batch(config: TrainConfig):
    trainer = Trainer(config, progress=False)
    trainer.model.eval()
    batch, _ = trainer.collector.collect(seed=config.seed, step=0)
    return batch


def _grads_after_learn(config: TrainConfig, batch) -> list[torch.Tensor]:
    """The gradient of one `Trainer.learn` on `batch` (the optimizer step is disabled: weights stay put)."""
    trainer = Trainer(config, progress=False)
    trainer.update.optimizer.step = lambda *a, **k: None
    trainer.learn(batch)
    return [p.grad.detach().float().clone() for p in trainer.model.parameters() if p.requires_grad]


# ----------------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("key, value, allowed", [
    ("model_dtype", "fp64", "one of float32, bfloat16, float16"),
    ("model_dtype", 16, "one of float32, bfloat16, float16"),
    ("gradient_checkpointing", "yes", "true or false"),
    ("gradient_checkpointing", 1, "true or false"),
])
def test_bad_values_are_one_line_naming_key_value_and_allowed(key, value, allowed):
    with pytest.raises(ValueError) as error:
        _config(**{key: value})
    message = str(error.value)
    assert "\n" not in message and message.startswith(key) and repr(value) in message and allowed in message


def test_settings_parse_from_overrides():
    config = apply_overrides(_config(), {"model_dtype": "bfloat16", "gradient_checkpointing": "true"})
    assert config.model_dtype == "bfloat16" and config.gradient_checkpointing is True
    assert _config().model_dtype == "float32" and _config().gradient_checkpointing is False


# ------------------------------------------------------------------------------------------------- model_dtype
def test_model_dtype_is_the_dtype_weights_and_adamw_state_are_stored_in():
    trainer = Trainer(_config(model_dtype="bfloat16"), progress=False)
    assert {p.dtype for p in trainer.model.parameters()} == {torch.bfloat16}
    trainer.fit()
    moments = [t for state in trainer.optimizer.state.values() for k, t in state.items() if k != "step"]
    assert moments and {t.dtype for t in moments} == {torch.bfloat16}


def test_sampler_logprobs_are_not_exact_below_float32():
    assert Trainer(_config(), progress=False)._sampler_logp_exact()
    for low in ({"model_dtype": "bfloat16"}, {"model_dtype": "float16"}, {"bf16": True}):
        assert not Trainer(_config(**low), progress=False)._sampler_logp_exact(), low


# Measured on the tiny model (SFT loss on the demonstrations, 4.8577 nats in float32): bf16 autocast differs by
# 3.9e-5 relative, bfloat16 weights by 6.9e-6. The tolerance, 2e-2 relative, leaves room for other CPUs' kernels
# (bf16 keeps 8 mantissa bits, ~4e-3 per rounding).
BF16_LOSS_RTOL = 2e-2


@pytest.mark.parametrize("low", [{"bf16": True}, {"model_dtype": "bfloat16"}], ids=["autocast", "weights"])
def test_bf16_loss_is_close_to_float32(low):
    base = _config("sft")
    batch = _batch(base)
    losses = {}
    for name, config in (("fp32", base), ("low", dataclasses.replace(base, **low))):
        trainer = Trainer(config, progress=False)
        trainer.update.optimizer.step = lambda *a, **k: None
        metrics, finite = trainer.learn(batch)
        assert finite
        losses[name] = float(metrics["loss"])
    assert losses["fp32"] > 1.0  # a random model's NLL: a real loss, not a constant
    assert abs(losses["low"] - losses["fp32"]) <= BF16_LOSS_RTOL * abs(losses["fp32"]), losses


# --------------------------------------------------------------------------------------- gradient checkpointing
def test_checkpointing_keeps_the_lean_forward_and_is_train_mode_only():
    trainer = Trainer(_config(gradient_checkpointing=True), progress=False)
    model = trainer.model
    model.train()
    lean = lean_decoder(model)
    assert lean is not None and all(lean.checkpointed)
    model.eval()  # sampling: nothing is recomputed
    assert not any(lean_decoder(model).checkpointed)


def _assert_checkpointing_keeps_the_gradients(base) -> None:
    batch = _batch(base)
    plain = _grads_after_learn(base, batch)
    checkpointed = _grads_after_learn(dataclasses.replace(base, gradient_checkpointing=True), batch)
    assert any(g.abs().sum() > 0 for g in plain)
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("recipe", ["grpo", "sft"])
def test_checkpointing_gives_the_same_gradients(recipe):
    _assert_checkpointing_keeps_the_gradients(_config(recipe))


def test_checkpointing_on_the_hf_forward_gives_the_same_gradients():
    """LoRA models run HF's own forward (no lean decoder): HF's checkpointing applies there."""
    _assert_checkpointing_keeps_the_gradients(_config("grpo", lora={"r": 2}))
