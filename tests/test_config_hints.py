"""An unknown config key names the key it was probably meant to be."""

from __future__ import annotations

import pytest

from unipo.config import TrainConfig, apply_overrides
from unipo.recipes import get_recipe

CONFIG = TrainConfig(recipe=get_recipe("grpo"))


@pytest.mark.parametrize("key, hint", [("reward", "rollout.reward"), ("rollout.temprature", "rollout.temperature"),
                                       ("lr", "optim.lr"), ("recipe.kl_coeff", "recipe.kl_coef")])
def test_a_misplaced_or_misspelt_key_gets_a_suggestion(key, hint):
    expected = rf"unknown config key .{key}. \(did you mean {hint}( or [a-z._]+)?\?\); valid:"
    with pytest.raises(ValueError, match=expected):
        apply_overrides(CONFIG, {key: "1"})


def test_a_key_like_no_other_gets_only_the_list():
    with pytest.raises(ValueError, match=r"unknown config key 'zzz'; valid: "):
        apply_overrides(CONFIG, {"zzz": "1"})
