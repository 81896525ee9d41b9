"""Preference losses as policy-loss slots: the pairwise path of the one trainer.

Each preference loss of `unipo.core.preference` (dpo, ipo, robust_dpo, rpo, slic, tr_dpo, sppo) is
registered here in the policy-loss registry (`POLICY_LOSSES`) under its own name, as an adapter flagged
`pairwise` (`is_pairwise(name)`), so a recipe picks it as `recipe.loss` and `recipe.loss_params` like any
other loss, and the slot check (`unipo.slots.check_recipe`) knows its params. The adapter's contract is not
the per-token one of the other losses:

    fn(logp, old_logp, advantages, mask, *, ref_logp, rewards, beta, length_norm, **variant params)
        -> (SUM over the pairs of the per-pair loss, metrics averaged over the pairs)

Rows come in pairs: rows 2j and 2j+1 of the [B, T] inputs are pair j's chosen and rejected answers (the
collector's layout, `unipo.collect`; the update never splits a pair). Per row, the log-probs are summed
over the completion mask (the DPO paper's log pi(y|x)); `length_norm=True` takes the per-token mean
instead, which is what TRL feeds its IPO loss (`ipo` defaults to it, as TRL does; every other loss to the
sum). `rewards` carry the preference targets: 1/0 for judged or offline pairs, and for SPPO the rows'
estimated win rates P(y > pi), which become `chosen_win_prob` / `rejected_win_prob`. RPO's and SLiC's NLL
term is the chosen row's per-token mean NLL (computed here, from the same forward).

Also here: the `preference_centred` advantage (A = r - 1/2 for preference-probability rewards, Nash-MD-PG).

The caller divides the sum by the number of pairs of the whole mini-batch (all ranks), so micro-batch
accumulation and the multi-process update stay exact (`unipo.update`). `old_logp` and `advantages` are
ignored: a preference loss needs neither pi_old nor an advantage.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from unipo.core.advantages import ADVANTAGE_ESTIMATORS
from unipo.core.losses import POLICY_LOSSES
from unipo.core.preference import PREFERENCE_LOSSES, compute_preference_loss

PAIRWISE_LOSSES = ("dpo", "ipo", "robust_dpo", "rpo", "slic", "tr_dpo", "sppo")
PAIRWISE_INPUTS = ("ref_logp", "rewards")
# variant inputs the adapter computes from the rows instead of taking them as params
_COMPUTED = ("chosen_nll", "chosen_win_prob", "rejected_win_prob")
_LENGTH_NORM_DEFAULT = {"ipo": True}  # TRL's IPO averages log-probs over tokens; the rest sum them


def is_pairwise(name: str) -> bool:
    """True when the policy loss `name` is a preference loss over (chosen, rejected) row pairs."""
    return name in POLICY_LOSSES and bool(getattr(POLICY_LOSSES.get(name), "pairwise", False))


def sequence_logps(logp: torch.Tensor, mask: torch.Tensor, length_norm: bool) -> torch.Tensor:
    """[B] per-row log-prob of the completion: the sum over `mask`, or the per-token mean (`length_norm`)."""
    mask = mask.to(logp.dtype)
    total = (logp * mask).sum(1)
    return total / mask.sum(1).clamp(min=1) if length_norm else total


def pairwise_loss(name: str, logp: torch.Tensor, mask: torch.Tensor, ref_logp: torch.Tensor | None,
                  rewards: torch.Tensor | None, *, beta: float, length_norm: bool,
                  **params: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(sum over pairs of the per-pair loss, metrics) of interleaved (chosen, rejected) rows."""
    if ref_logp is None:
        raise ValueError(f"preference loss {name!r} needs the reference's log-probs (ref_logp)")
    if logp.shape[0] == 0 or logp.shape[0] % 2:
        raise ValueError(f"preference loss {name!r} needs whole (chosen, rejected) row pairs, got {logp.shape[0]} rows")
    seq = sequence_logps(logp, mask, length_norm)
    ref = sequence_logps(ref_logp.to(logp.dtype), mask, length_norm)
    accepted = {p.name for p in inspect.signature(PREFERENCE_LOSSES.get(name)).parameters.values()
                if p.kind is p.KEYWORD_ONLY}
    extra: dict[str, torch.Tensor] = {}
    if "chosen_nll" in accepted:  # per-token mean NLL of the chosen answer (TRL's rpo_alpha normalisation)
        extra["chosen_nll"] = -sequence_logps(logp, mask, True)[0::2]
    if "chosen_win_prob" in accepted:
        if rewards is None:
            raise ValueError(f"preference loss {name!r} reads the rows' win rates (rewards)")
        targets = rewards.to(logp.dtype)
        extra["chosen_win_prob"], extra["rejected_win_prob"] = targets[0::2], targets[1::2]
    mean, metrics = compute_preference_loss(name, seq[0::2], seq[1::2], ref[0::2], ref[1::2], beta,
                                            check_finite=False, **params, **extra)
    return mean * (logp.shape[0] // 2), metrics


def _register(name: str) -> None:
    variant = [p for p in inspect.signature(PREFERENCE_LOSSES.get(name)).parameters.values()
               if p.kind is p.KEYWORD_ONLY and p.name not in _COMPUTED]
    positional = [inspect.Parameter(k, inspect.Parameter.POSITIONAL_OR_KEYWORD)
                  for k in ("logp", "old_logp", "advantages", "mask")]
    keyword = [inspect.Parameter("ref_logp", inspect.Parameter.KEYWORD_ONLY, default=None),
               inspect.Parameter("rewards", inspect.Parameter.KEYWORD_ONLY, default=None),
               inspect.Parameter("beta", inspect.Parameter.KEYWORD_ONLY),
               inspect.Parameter("length_norm", inspect.Parameter.KEYWORD_ONLY,
                                 default=_LENGTH_NORM_DEFAULT.get(name, False))]
    signature = inspect.Signature(positional + keyword + variant)

    def adapter(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        given = dict(bound.arguments)
        logp, mask = given.pop("logp"), given.pop("mask")
        for unused in ("old_logp", "advantages"):
            given.pop(unused)
        ref_logp, rewards = given.pop("ref_logp"), given.pop("rewards")
        return pairwise_loss(name, logp, mask, ref_logp, rewards, **given)

    adapter.__signature__ = signature  # type: ignore[attr-defined]
    adapter.__name__ = f"pairwise_{name}"
    adapter.__doc__ = (f"The preference loss {name!r} (unipo.core.preference) on (chosen, rejected) row pairs; "
                       f"see unipo.core.pairwise.")
    adapter.pairwise = True  # type: ignore[attr-defined]
    POLICY_LOSSES.register(name, inputs=PAIRWISE_INPUTS)(adapter)


for _name in PAIRWISE_LOSSES:
    _register(_name)


@ADVANTAGE_ESTIMATORS.register("preference_centred")
def preference_centred_advantages(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """A_i = r_i - 1/2, for rewards that are preference probabilities P(y_i > y'_i) (Nash-MD-PG, arXiv 2312.00886:
    the policy gradient of the preference against the mixture policy, centred at a tie). No group baseline."""
    if rewards.dim() != 1:
        raise ValueError(f"preference_centred takes [B] rewards, got shape {list(rewards.shape)}")
    return rewards - 0.5
