"""unipo against golden values computed by verl 0.9.1 and TRL 1.16.0, in float64 at rtol 1e-6.

The files in tests/golden/ were written by tests/golden/make_golden_reference.py, which imports the
reference code (verl's `core_algos` and `torch_functional`, TRL's `trl.trainer.utils`) in an
environment of its own; its docstring says how to rebuild them. This module imports neither verl nor
TRL, so it runs anywhere the project does. Each test id starts with the reference function.

Compared: loss values, per-token losses (on the completion mask; verl does not zero padding), the
gradient d loss / d logp, metrics defined the same way on both sides, advantages, returns, KL
estimates and log-probs / entropies with their gradients w.r.t. the logits.

Where unipo differs from verl by a documented choice, the tests check the case where the two
coincide and pin the exact relation otherwise:
- groups of one: unipo's advantage is 0; verl's loop GRPO gives r/(1 + eps) (mean 0, std 1) and its
  loop RLOO gives r itself (verl's vectorised RLOO gives 0, as unipo).
- REINFORCE++-baseline: verl whitens the centred rewards over tokens (masked_whiten: mean and
  unbiased variance over the B·L tokens, rsqrt(var + 1e-8)); unipo divides by the unbiased std over
  the B sequences plus eps. With one token per row and unipo's eps = 0 they agree; with equal
  lengths L, verl = unipo · sqrt((B·L − 1) / (L·(B − 1))); ragged lengths weight rows by length in verl.
- the row count of the seq-mean modes when a row is all-masked: seq-mean-token-sum-norm divides
  Σ L·m by T_max times the non-empty rows in verl (unless agg_loss gets global_batch_size) and by
  all B rows in unipo, so verl = unipo · B / B_nonempty; seq-mean-token-mean with global_batch_size = B
  (what verl's trainer passes) divides by all B rows in verl and by the non-empty rows in unipo, so
  verl = unipo · B_nonempty / B. Without all-masked rows, or with the other setting, they are equal.
- verl's "vanilla" loss always applies the dual clip (clip_ratio_c, default 3), so the golden
  ppo_clip / clip_higher cases were made with clip_ratio_c = 1e9.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from unipo.core.advantages import compute_advantages, gae_returns
from unipo.core.kl import kl_estimate
from unipo.core.logprobs import entropy_from_logits, selective_log_softmax
from unipo.core.losses import POLICY_LOSSES, aggregate, aggregation_denominator, compute_policy_loss, value_loss

F64 = torch.float64
RTOL = 1e-6
ATOL = 1e-12  # only so that an exact 0 on one side may meet a rounding residue on the other
GOLDEN = Path(__file__).resolve().parent / "golden"
VERSIONS = {"verl": "0.9.1", "trl": "1.16.0"}
FILES = ("verl_advantages.json", "verl_policy_losses.json", "verl_agg_loss.json", "verl_kl_penalty.json",
         "verl_value_loss.json", "trl_verl_logprobs.json")  # written by tests/golden/make_golden_reference.py
AGG = {"token-mean": "token_mean", "seq-mean-token-mean": "seq_mean_token_mean",
       "seq-mean-token-sum-norm": "seq_mean_token_sum_norm"}


@functools.cache
def _golden(name: str) -> dict[str, Any]:
    return json.loads((GOLDEN / name).read_text())


def _t(value: Any) -> torch.Tensor:
    return torch.tensor(value, dtype=F64)


def _check(actual: torch.Tensor, expected: torch.Tensor | float, what: str) -> None:
    expected = torch.as_tensor(expected, dtype=F64)
    torch.testing.assert_close(actual.detach().to(F64), expected, rtol=RTOL, atol=ATOL,
                               msg=lambda m: f"{what}: {m}")


def _params(cases: list[dict[str, Any]], *, ids=lambda c: c["id"]) -> list[Any]:
    return [pytest.param(c, id=f"{c['reference']}[{ids(c)}]") for c in cases]


def test_golden_files_name_their_source() -> None:
    for name in FILES:
        path = GOLDEN / name
        data = _golden(name)
        sources = data["source"] if isinstance(data["source"], list) else [data["source"]]
        for source in sources:
            assert source["version"] == VERSIONS[source["package"]], (path.name, source)
        assert path.stat().st_size < 32_000, path.name


# --------------------------------------------------------------------------------------------
# advantages

_ADV = _golden("verl_advantages.json")
_OUTCOME = _ADV["outcome"]
_MATCHING_OUTCOME = [c for c in _OUTCOME["cases"] if c["id"] != "reinforce_pp_equal_len5"]


def _unipo_outcome(unipo: dict[str, Any], rewards: list[float], group_ids: list[int]) -> torch.Tensor:
    return compute_advantages(unipo["name"], _t(rewards), torch.tensor(group_ids), **unipo["params"])


@pytest.mark.parametrize("case", _params(_MATCHING_OUTCOME))
def test_outcome_advantages(case: dict[str, Any]) -> None:
    adv = _unipo_outcome(case["unipo"], _OUTCOME["rewards"], _OUTCOME["group_ids"])
    mask = _t(case["mask"])
    _check(adv[:, None] * mask, case["advantages"], f"{case['id']} advantages")


@pytest.mark.parametrize("case", _params([c for c in _OUTCOME["cases"] if c["id"] == "reinforce_pp_equal_len5"]))
def test_reinforce_pp_equal_lengths_differ_by_the_token_bessel_factor(case: dict[str, Any]) -> None:
    """verl: unbiased variance over B·L tokens; unipo: over B sequences. Equal lengths L give
    var_verl = var_unipo · L·(B − 1) / (B·L − 1)."""
    adv = _unipo_outcome(case["unipo"], _OUTCOME["rewards"], _OUTCOME["group_ids"])
    batch, length = _t(case["mask"]).shape
    factor = math.sqrt((batch * length - 1) / (length * (batch - 1)))
    _check(adv[:, None].expand(batch, length) * factor, case["advantages"], "reinforce_pp equal lengths")
    assert abs(factor - 1) > 1e-3  # a real difference, not rounding


_SINGLETON = _ADV["singleton_groups"]
_SINGLETON_VERL = {"grpo": lambda r: r / (1 + 1e-6), "rloo": lambda r: r, "rloo_vectorized": lambda r: 0 * r}


@pytest.mark.parametrize("case", _params(_SINGLETON["cases"]))
def test_singleton_groups(case: dict[str, Any]) -> None:
    """Rows of groups of two or more match; a group of one is 0 in unipo (its docstring's
    convention), while verl's loop estimators return r / (1 + eps) (GRPO) or r (RLOO)."""
    group_ids = torch.tensor(_SINGLETON["group_ids"])
    rewards = _t(_SINGLETON["rewards"])
    adv = _unipo_outcome(case["unipo"], _SINGLETON["rewards"], _SINGLETON["group_ids"])
    expected = _t(case["advantages"])[:, 0]
    alone = (group_ids[:, None] == group_ids[None, :]).sum(1) == 1
    _check(adv[~alone], expected[~alone], "rows of groups with several samples")
    assert torch.equal(adv[alone], torch.zeros(int(alone.sum()), dtype=F64))
    _check(_SINGLETON_VERL[case["id"]](rewards[alone]), expected[alone], "verl's singleton convention")


_GAE = _ADV["gae"]


@pytest.mark.parametrize("case", _params(_GAE["cases"]))
def test_gae(case: dict[str, Any]) -> None:
    """verl returns whitened advantages and returns = raw advantages + values; unipo's `gae` gives the
    raw advantages (0 off the mask), `gae_returns` the returns. Compared on the mask."""
    mask, values = _t(_GAE["mask"]), _t(_GAE["values"])
    on = mask > 0
    adv = compute_advantages("gae", _t(case["rewards"]), torch.arange(mask.shape[0]), values=values, mask=mask,
                             gamma=case["gamma"], lam=case["lam"])
    returns = _t(case["returns"])
    _check(adv[on], (returns - values)[on], "raw GAE advantages")
    _check(gae_returns(adv, values)[on], returns[on], "returns")
    assert torch.equal(adv[~on], torch.zeros(int((~on).sum()), dtype=F64))


# --------------------------------------------------------------------------------------------
# policy losses

_LOSSES = _golden("verl_policy_losses.json")
_LOSS_PARAMS = [
    pytest.param(case, variant, id=f"{case['reference']}[{case['id']}]-unipo.{variant['name']}")
    for case in _LOSSES["cases"] for variant in case["unipo"]
]


def _loss_inputs(case: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    inputs = _LOSSES["inputs"]
    adv = _t(inputs["seq_advantages"] if case["advantages"] == "seq" else inputs["token_advantages"])
    return _t(inputs["logp"]), _t(inputs["old_logp"]), adv, _t(inputs["mask"])


@pytest.mark.parametrize(("case", "variant"), _LOSS_PARAMS)
def test_policy_loss(case: dict[str, Any], variant: dict[str, Any]) -> None:
    logp, old_logp, adv, mask = _loss_inputs(case)
    name, params = variant["name"], variant["params"]
    logp.requires_grad_(True)

    per_token, metrics = POLICY_LOSSES.get(name)(logp, old_logp, adv, mask, **params)
    expected_per_token = torch.where(mask > 0, _t(case["per_token_loss"]), torch.zeros_like(mask))
    _check(per_token, expected_per_token, "per-token loss")
    for key, value in case["metrics"].items():
        _check(metrics[key], value, f"metric {key}")

    loss, _ = compute_policy_loss(name, logp, old_logp, adv, mask, AGG[case["agg"]], **params)
    (grad,) = torch.autograd.grad(loss, logp)
    _check(loss, case["loss"], "loss")
    _check(grad, case["grad_logp"], "d loss / d logp")


def test_policy_loss_inputs_exercise_every_branch() -> None:
    """The golden batch is not a degenerate one: the variants really differ on it."""
    cases = {c["id"]: c for c in _LOSSES["cases"]}
    mask = _t(_LOSSES["inputs"]["mask"])
    assert 0 < cases["ppo_clip"]["metrics"]["clip_frac"] < 1
    assert cases["clip_higher"]["metrics"]["clip_frac"] < cases["ppo_clip"]["metrics"]["clip_frac"]
    assert cases["dual_clip"]["metrics"]["dual_clip_frac"] > 0
    assert 0 < cases["gspo"]["metrics"]["clip_frac"] < 1
    assert 0 < cases["cispo"]["metrics"]["clip_frac"] < 1
    for a, b in (("ppo_clip", "clip_higher"), ("ppo_clip", "dual_clip"), ("cispo", "gpg")):
        assert abs(cases[a]["loss"] - cases[b]["loss"]) > 1e-3, (a, b)
    assert (mask.sum(1) == 0).any() and (mask.sum(1) == mask.shape[1]).any()  # ragged, with an empty row
    grad = _t(cases["ppo_clip"]["grad_logp"])
    assert ((grad == 0) & (mask > 0)).any() and ((grad != 0) & (mask > 0)).any()  # clipped and live tokens


# --------------------------------------------------------------------------------------------
# aggregation

_AGG = _golden("verl_agg_loss.json")


@pytest.mark.parametrize("case", _params([c for c in _AGG["cases"] if "verl_over_unipo" not in c["unipo"]]))
def test_agg_loss(case: dict[str, Any]) -> None:
    loss_mat = _t(_AGG["inputs"]["loss_mat"]).requires_grad_(True)
    mask = _t(_AGG["inputs"]["masks"][case["mask"]])
    mode, max_len = case["unipo"]["mode"], case["unipo"].get("max_len")
    loss = aggregate(loss_mat, mask, mode, max_len=max_len)
    (grad,) = torch.autograd.grad(loss, loss_mat)
    _check(loss, case["loss"], "loss")
    _check(grad, case["grad_loss_mat"], "d loss / d loss_mat")
    # the gradient-accumulation path: the full batch's denominator passed to each micro-batch
    denominator = aggregation_denominator(mask, mode, max_len)
    halves = [aggregate(loss_mat[rows], mask[rows], mode, denominator=denominator, max_len=max_len)
              for rows in (slice(0, 3), slice(3, None))]
    _check(halves[0] + halves[1], case["loss"], "micro-batched loss")


@pytest.mark.parametrize("case", _params([c for c in _AGG["cases"] if "verl_over_unipo" in c["unipo"]]))
def test_agg_loss_row_count_with_an_empty_row(case: dict[str, Any]) -> None:
    """With an all-masked row the two count rows differently:
    - seq-mean-token-sum-norm: verl (no global_batch_size) divides by the non-empty rows, unipo by all B
      (a constant normaliser by design);
    - seq-mean-token-mean with global_batch_size = B (what verl's trainer passes): verl divides by all B,
      unipo by the non-empty rows (an empty row has no token mean).
    """
    loss_mat = _t(_AGG["inputs"]["loss_mat"]).requires_grad_(True)
    mask = _t(_AGG["inputs"]["masks"][case["mask"]])
    batch, nonempty = mask.shape[0], int((mask.sum(1) > 0).sum())
    assert nonempty < batch
    factor = {"B/B_nonempty": batch / nonempty, "B_nonempty/B": nonempty / batch}[case["unipo"]["verl_over_unipo"]]
    loss = aggregate(loss_mat, mask, case["unipo"]["mode"])
    (grad,) = torch.autograd.grad(loss, loss_mat)
    _check(loss * factor, case["loss"], f"loss times {case['unipo']['verl_over_unipo']}")
    _check(grad * factor, case["grad_loss_mat"], f"gradient times {case['unipo']['verl_over_unipo']}")


# --------------------------------------------------------------------------------------------
# KL penalties, value loss

_KL = _golden("verl_kl_penalty.json")


@pytest.mark.parametrize("case", _params(_KL["cases"], ids=lambda c: f"{c['id']}-unipo.{c['unipo']}"))
def test_kl_penalty(case: dict[str, Any]) -> None:
    inputs = _KL["inputs"]
    logp = _t(inputs["logp"]).requires_grad_(True)
    kl = kl_estimate(logp, _t(inputs["ref_logp"]), case["unipo"])
    (grad,) = torch.autograd.grad((_t(inputs["weights"]) * kl).sum(), logp)
    _check(kl, case["kl"], "KL estimate")
    _check(grad, case["grad_weighted_sum"], "d sum(w * kl) / d logp")


_VALUE = _golden("verl_value_loss.json")


@pytest.mark.parametrize("case", _params(_VALUE["cases"]))
def test_value_loss(case: dict[str, Any]) -> None:
    inputs = _VALUE["inputs"]
    vpreds = _t(inputs["vpreds"]).requires_grad_(True)
    mask = _t(inputs["mask"])
    per_token, metrics = value_loss(vpreds, _t(inputs["values"]), _t(inputs["returns"]), mask, clip=case["clip"])
    loss = aggregate(per_token, mask, AGG[case["agg"]])
    (grad,) = torch.autograd.grad(loss, vpreds)
    _check(loss, case["loss"], "loss")
    _check(grad, case["grad_vpreds"], "d loss / d vpreds")
    _check(metrics["value_clip_frac"], case["value_clip_frac"], "value_clip_frac")


# --------------------------------------------------------------------------------------------
# log-probs and entropies from logits

_LOGPROBS = _golden("trl_verl_logprobs.json")


@pytest.mark.parametrize("chunk_rows", [None, 1], ids=["one_chunk", "chunked"])
@pytest.mark.parametrize("case", _params(_LOGPROBS["cases"]))
def test_logprobs_and_entropy(case: dict[str, Any], chunk_rows: int | None) -> None:
    inputs = _LOGPROBS["inputs"]
    logits = _t(inputs["logits"]).requires_grad_(True)
    tau = case["temperature"]
    if case["quantity"] == "logp":
        values = selective_log_softmax(logits, torch.tensor(inputs["ids"]), temperature=tau, chunk_rows=chunk_rows)
    else:
        values = entropy_from_logits(logits, temperature=tau, chunk_rows=chunk_rows)
    (grad,) = torch.autograd.grad((_t(inputs["weights"]) * values).sum(), logits)
    _check(values, case["values"], case["quantity"])
    _check(grad, case["grad_weighted_sum"], f"d sum(w * {case['quantity']}) / d logits")
