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
