import dataclasses

import pytest

from unipo.config import Recipe, TrainConfig, apply_overrides, dump_yaml, from_dict, to_dict
from unipo.recipes import RECIPES, get_recipe


def test_overrides_reach_nested_fields_and_parse_yaml_scalars():
    config = TrainConfig(recipe=get_recipe("grpo"))
    new = apply_overrides(config, {"rollout.group_size": "4", "optim.lr": "3e-4", "recipe.kl_coef": "0.01",
                                   "recipe.loss_params.eps_high": "0.3", "bf16": "true"})
    assert new.rollout.group_size == 4 and new.optim.lr == 3e-4 and new.recipe.kl_coef == 0.01
    assert new.recipe.loss_params["eps_high"] == 0.3 and new.recipe.loss_params["eps_low"] == 0.2
    assert new.bf16 is True
    assert config.rollout.group_size == 8, "overrides must not mutate the original"


def test_unknown_override_key_lists_valid_keys():
    config = TrainConfig(recipe=get_recipe("grpo"))
    with pytest.raises(ValueError, match=r"unknown config key 'rollout.groupsize'.*rollout.group_size"):
        apply_overrides(config, {"rollout.groupsize": "4"})


def test_configs_are_frozen_including_params():
    recipe = get_recipe("grpo")
    with pytest.raises(dataclasses.FrozenInstanceError):
        recipe.loss = "cispo"
    with pytest.raises(TypeError):
        recipe.loss_params["eps_low"] = 0.5


@pytest.mark.parametrize("name", list(RECIPES))
def test_every_recipe_round_trips_through_yaml(name):
    import yaml

    config = TrainConfig(recipe=RECIPES[name])
    again = from_dict(TrainConfig, yaml.safe_load(dump_yaml(config)))
    assert to_dict(again) == to_dict(config)


def test_recipe_validation():
    with pytest.raises(ValueError, match="data must be one of"):
        Recipe(name="x", data="offline")
    with pytest.raises(ValueError, match="expert_per_group"):
        Recipe(name="x", expert_per_group=1)


def test_unknown_recipe_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown recipe 'grpoo'; valid: .*grpo"):
        get_recipe("grpoo")


@pytest.mark.parametrize(("override", "message"), [
    ({"recipe.loss": "ppo_clipp"}, r"recipe grpo: unknown policy loss 'ppo_clipp'; valid: .*ppo_clip"),
    ({"recipe.loss_params.eps_lo": "0.1"}, r"policy loss 'ppo_clip': unknown params \['eps_lo'\]"),
    ({"recipe.loss_params.eps_low": "2"}, r"recipe grpo: eps_low must be < 1.0, got 2"),
    ({"recipe.aggregation": "mean"}, r"unknown aggregation 'mean'"),
    ({"recipe.selection": "[cppo]", "recipe.selection_params.cppo": "{keep: 0}"}, r"keep as a count must be >= 1"),
    ({"recipe.mixer": "hpt", "recipe.mixer_params.threshold": "-1"}, r"threshold must be >= 0"),
    ({"recipe.advantage": "single_stream"}, r"reads a stateful baseline; set recipe.baseline"),
    ({"recipe.advantage": "gae"}, r"reads the value head's values; set recipe.value_coef"),
    ({"recipe.mini_batches": "0"}, r"mini_batches must be an int >= 1"),
])
def test_every_slot_is_checked_when_the_recipe_is_built(override, message):
    """A bad name, param or param value fails in one line when the config is built, before any model loads."""
    with pytest.raises(ValueError, match=message):
        apply_overrides(TrainConfig(recipe=get_recipe("grpo")), override)


def test_a_slot_function_must_accept_the_inputs_it_declares():
    from unipo.core.registry import Registry

    registry = Registry("policy loss")
    with pytest.raises(ValueError, match=r"declares inputs \['entropy'\] it does not accept"):
        registry.register("bad", inputs=("entropy",))(lambda logp, old_logp, advantages, mask: None)
    registry.register("good", inputs=("entropy",))(lambda logp, old_logp, advantages, mask, *, entropy=None: None)
    assert registry.inputs("good") == ("entropy",)
    with pytest.raises(ValueError, match=r"needs the batch inputs \['entropy'\]"):
        registry.register("strict", inputs=("entropy",))(lambda logp, *, entropy: None)
        registry.check_inputs("strict", {})
