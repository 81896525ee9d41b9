"""A recipe's slots, the batch inputs their functions declare, and the check run when a recipe is built.

Each slot of the unified estimator is a registry (advantage, policy loss, selection, mixer, and the
entropy regulariser: `entropy_choice`, outside `slot_choices`' fixed order). A
function registered there receives its registry's shared arguments plus exactly the batch inputs it
declared at registration (`Registry.register(name, inputs=...)`). `INPUTS` is the one table of what
the trainer can provide; the trainer builds these tensors (see `Trainer._provider`) and nothing else.

`check_recipe` runs when a `Recipe` is built (so a bad override fails before any model loads): every
name must be registered, every param known and every required one given, every declared input one
the trainer provides, and each slot function is run once on a small synthetic batch, so a bad param
value (eps_low = 2, a negative threshold) is one clear error at start-up, not a crash at step 40.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from unipo.archer import ArcherCritic  # noqa: F401  (registers ArCHer's critic, archer_critic, and its advantage)
from unipo.core import hybrid  # noqa: F401  (registers the hybrid losses and the calibrl advantage)
from unipo.core.advantages import ADVANTAGE_ESTIMATORS, compute_advantages
from unipo.core.entropy import ENTROPY_REGULARISERS, compute_entropy_term
from unipo.core.losses import AGGREGATIONS, POLICY_LOSSES, compute_policy_loss
from unipo.core.pairwise import PAIRWISE_LOSSES, is_pairwise  # (registers the preference losses)
from unipo.core.registry import Registry
from unipo.core.selection import SELECTIONS, compute_selection
from unipo.core.tree import TREE_INPUTS  # noqa: F401  (registers Tree-GRPO's advantage)
from unipo.core.turns import EPISODE_INPUTS  # noqa: F401  (registers the multi-turn credit estimators)
from unipo.critics import BASELINES
from unipo.mixing import MIXERS
from unipo.sweet import SweetCritic  # noqa: F401  (registers SWEET-RL's critic baseline, sweet_critic)

if TYPE_CHECKING:
    from unipo.config import Recipe

# Every batch input a slot function may declare, with what the trainer hands it.
INPUTS: Mapping[str, str] = {
    "mask": "[B, T] float completion mask",
    "token_ids": "[B, T] completion token ids",
    "off_policy": "[B] bool: the row is an expert trace, not a rollout",
    "rewards": "[B] the rows' rewards, on the recipe's reward scale",
    "truncated": "[B] bool: the completion hit the generation budget",
    "answer_ids": "[B] cluster id of the extracted final answer",
    "strata": "[B] Stratified GRPO's strata: response length in buckets of 4 tokens",
    "step": "int, the training step",
    "total_steps": "int, the run's steps",
    "logp": "[B, T] log-probs of the rows under pi_old, the policy that sampled them",
    "expert_logp": "[B, T] pi_old log-probs of the row's group expert trace (zeros without one)",
    "entropy": "[B, T] next-token entropy: pi_old's for advantages and selections, the current policy's "
               "(detached) for a loss",
    "values": "[B, T] the value head's V(s_t) under pi_old",
    "baseline": "[B] the recipe's stateful baseline's value of each row (unipo.critics; SPO: the prompt's Beta "
                "tracker mean)",
    "ref_logp": "[B, T] log-probs under the frozen reference policy",
    # multi-turn episodes, one row per turn (unipo.agents); a single-turn batch's rows are one-turn episodes
    "episode_ids": "[B] the row's episode (a single-turn batch: the row itself)",
    "turn_index": "[B] the row's turn in its episode, from 0 (single-turn: 0)",
    "turn_rewards": "[B] the environment's reward for the row's turn (single-turn: the row's reward)",
    "episode_rewards": "[B] the row's episode's final (outcome) reward (single-turn: the row's reward)",
    "info_gain": "[B] IGPO's information gain of the turn: the rise in pi's probability of the gold answer "
                 "(computed only for a recipe that declares it; single-turn: 0)",
    "tree_ids": "[B] the search tree of the row's episode (recipe.data=tree_episodes, unipo.trees; otherwise each "
                "episode is its own tree)",
    "entropy_history": "[B] EPO's historical entropy of the row's turn index: the mean over the steps so far (this "
                       "one included) of each step's token-mean pi_old entropy at that turn (NaN: none yet; the "
                       "trainer's state, unipo.update.EntropyHistory)",
}

# Keyword arguments every function of a registry takes from the caller (not params, not declared inputs).
_SHARED = {
    "advantage estimator": (),
    "policy loss": (),
    "selection": ("rewards", "advantages", "entropy", "group_ids"),
    "mixer": ("rewards", "prompt_index", "off_policy", "step", "total_steps"),
    "entropy regulariser": ("denominator", "max_len"),
}


@dataclass(frozen=True)
class SlotChoice:
    """One slot of a recipe: the registry, the chosen name and its params."""

    registry: Registry
    name: str
    params: Mapping[str, Any]

    @property
    def inputs(self) -> tuple[str, ...]:
        return self.registry.inputs(self.name)


def slot_choices(recipe: Recipe) -> list[SlotChoice]:
    """The recipe's advantage, loss, selections (in order) and mixer."""
    choices = [SlotChoice(ADVANTAGE_ESTIMATORS, recipe.advantage, recipe.advantage_params),
               SlotChoice(POLICY_LOSSES, recipe.loss, recipe.loss_params)]
    choices += [SlotChoice(SELECTIONS, name, recipe.selection_params.get(name, {})) for name in recipe.selection]
    return choices + [SlotChoice(MIXERS, recipe.mixer, recipe.mixer_params)]


def entropy_choice(recipe: Recipe) -> SlotChoice:
    """The recipe's entropy regulariser (applied when `recipe.entropy_coef` is not 0; unipo.core.entropy)."""
    return SlotChoice(ENTROPY_REGULARISERS, recipe.entropy_regulariser, recipe.entropy_params)


def recipe_inputs(recipe: Recipe) -> frozenset[str]:
    """Every batch input the recipe's slot functions (and its entropy regulariser) declared."""
    return frozenset(name for choice in [*slot_choices(recipe), entropy_choice(recipe)] for name in choice.inputs)


def check_recipe(recipe: Recipe) -> None:
    """ValueError (one line, naming the recipe and the slot) unless every slot of `recipe` can run."""
    if recipe.aggregation not in AGGREGATIONS:
        raise ValueError(f"recipe {recipe.name}: unknown aggregation {recipe.aggregation!r}; "
                         f"valid: {', '.join(AGGREGATIONS)}")
    stray = sorted(set(recipe.selection_params) - set(recipe.selection))
    if stray:
        raise ValueError(f"recipe {recipe.name}: selection_params for {stray}, which are not in selection "
                         f"{list(recipe.selection)}")
    for choice in [*slot_choices(recipe), entropy_choice(recipe)]:
        try:
            choice.registry.check_params(choice.name, choice.params, shared=_SHARED[choice.registry.kind])
            unknown = sorted(set(choice.inputs) - set(INPUTS))
            if unknown:
                raise ValueError(f"declares inputs {unknown} that the trainer does not provide")
        except ValueError as error:
            raise ValueError(f"recipe {recipe.name}: {error}") from None
    from unipo.config import PAIR_SOURCES

    if is_pairwise(recipe.loss) != (recipe.data in PAIR_SOURCES):
        raise ValueError(f"recipe {recipe.name}: a preference loss trains on (chosen, rejected) pairs, and pairs are "
                         f"only trained by one: recipe.loss={recipe.loss!r} with recipe.data={recipe.data!r} (pair "
                         f"sources: {', '.join(PAIR_SOURCES)}; preference losses: {', '.join(PAIRWISE_LOSSES)})")
    if "values" in recipe_inputs(recipe) and not recipe.value_coef > 0:
        raise ValueError(f"recipe {recipe.name}: advantage {recipe.advantage!r} reads the value head's values; "
                         f"set recipe.value_coef > 0 to train one")
    if "baseline" in recipe_inputs(recipe) and recipe.baseline == "none":
        raise ValueError(f"recipe {recipe.name}: advantage {recipe.advantage!r} reads a stateful baseline; "
                         f"set recipe.baseline (valid: {', '.join(BASELINES)})")
    if recipe.baseline != "none":
        try:
            BASELINES.check_params(recipe.baseline, recipe.baseline_params)
            BASELINES.get(recipe.baseline)(**recipe.baseline_params)
        except (ValueError, TypeError) as error:
            raise ValueError(f"recipe {recipe.name}: {error}") from None
    try:
        _dry_run(recipe)
    except (ValueError, TypeError) as error:
        raise ValueError(f"recipe {recipe.name}: {error}") from None


def _synthetic_inputs(expert_rows: bool) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor]:
    """A batch of 2 groups x 3 rows, 4 tokens, with ragged masks (and one expert row per group)."""
    gen = torch.Generator().manual_seed(0)
    rows, width = 6, 4
    mask = (torch.arange(width)[None] < torch.tensor([4, 2, 3, 4, 1, 3])[:, None]).float()
    logp = -torch.rand(rows, width, generator=gen) * mask
    off_policy = torch.tensor([False, False, True] * 2) if expert_rows else torch.zeros(rows, dtype=torch.bool)
    inputs = {
        "mask": mask, "token_ids": torch.randint(0, 5, (rows, width), generator=gen), "off_policy": off_policy,
        "truncated": torch.tensor([True, False, False, False, False, False]),
        "answer_ids": torch.tensor([0, 1, 0, 2, 2, 3]), "strata": torch.tensor([0, 0, 1, 1, 0, 1]),
        "step": 1, "total_steps": 10, "logp": logp, "expert_logp": logp.roll(1, 0),
        "entropy": torch.rand(rows, width, generator=gen) * mask, "values": torch.zeros(rows, width),
        "baseline": torch.full((rows,), 0.5), "ref_logp": logp - 0.1 * mask,
        "rewards": torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 1.0]),
        # two episodes per group: rows (0, 1) and (3, 4) are turns 0 and 1 of one episode each
        "episode_ids": torch.tensor([0, 0, 1, 2, 2, 3]), "turn_index": torch.tensor([0, 1, 0, 0, 1, 0]),
        "turn_rewards": torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0]),
        "episode_rewards": torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0, 1.0]),
        "info_gain": torch.tensor([0.25, 0.0, 0.0, -0.1, 0.0, 0.0]),
        "tree_ids": torch.tensor([0, 0, 0, 1, 1, 2]),  # group 0's two episodes in one tree, group 1's in two
        "entropy_history": torch.tensor([0.5, 0.4, float("nan"), 0.5, 0.4, 0.5]),  # row 2's turn: none yet
    }
    rewards = inputs["rewards"]
    group_ids = torch.tensor([0, 0, 0, 1, 1, 1])
    return inputs, rewards, group_ids


def _dry_run(recipe: Recipe) -> None:
    inputs, rewards, group_ids = _synthetic_inputs(recipe.data != "on_policy")

    def declared(choice_registry: Registry, name: str, drop: tuple[str, ...] = ()) -> dict[str, Any]:
        return {k: inputs[k] for k in choice_registry.inputs(name) if k not in drop}

    advantages = compute_advantages(recipe.advantage, rewards, group_ids, **recipe.advantage_params,
                                    **declared(ADVANTAGE_ESTIMATORS, recipe.advantage))
    for name in recipe.selection:
        compute_selection(name, inputs["mask"], rewards=rewards, advantages=advantages, entropy=inputs["entropy"],
                          group_ids=group_ids, **recipe.selection_params.get(name, {}),
                          **declared(SELECTIONS, name, drop=("entropy",)))
    if is_pairwise(recipe.loss):  # rows (0, 1), (2, 3), (4, 5) are (chosen, rejected) pairs; rewards in [0, 1]
        POLICY_LOSSES.get(recipe.loss)(inputs["logp"].clone().requires_grad_(), inputs["logp"], advantages,
                                       inputs["mask"], **recipe.loss_params, **declared(POLICY_LOSSES, recipe.loss))
    else:
        compute_policy_loss(recipe.loss, inputs["logp"].clone().requires_grad_(), inputs["logp"] + 0.05, advantages,
                            inputs["mask"], recipe.aggregation, max_len=8, **recipe.loss_params,
                            **declared(POLICY_LOSSES, recipe.loss))
    MIXERS.get(recipe.mixer)(rewards=rewards, prompt_index=group_ids, off_policy=inputs["off_policy"], step=1,
                             total_steps=10, **recipe.mixer_params)
    compute_entropy_term(recipe.entropy_regulariser, inputs["entropy"].clone().requires_grad_(), inputs["mask"],
                         recipe.aggregation, max_len=8, **recipe.entropy_params,
                         **declared(ENTROPY_REGULARISERS, recipe.entropy_regulariser))
