"""unipo's hybrid-policy functions against the authors' official code, in float64 at rtol 1e-6.

The files tests/golden/{luffy,rl_plus,chord,calibrl,gtpo}.json were written by
tests/golden/make_golden_official.py from the official repositories (each file's `source` names
the repository, commit, file and function); this module never imports that code.

Compared: per-token losses, aggregated losses, the gradient d loss / d logp, advantages, CHORD's
μ schedule and φ weights, GTPO's conflict weights and entropies. Where unipo splits one official
function over two slots (RL-PLUS's exploration weight in the advantage, CalibRL's guided term as
an advantage), the composition is compared, at π = π_old where the split is exact.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch

from unipo.core.advantages import compute_advantages
from unipo.core.hybrid import calibrl_advantage, chord_mu_schedule, chord_phi_weights
from unipo.core.losses import POLICY_LOSSES, aggregate, compute_policy_loss
from unipo.core.selection import compute_selection

F64 = torch.float64
GOLDEN = Path(__file__).parent / "golden"


@functools.cache
def golden(name: str) -> dict:
    return json.loads((GOLDEN / f"{name}.json").read_text())


def t(values, dtype=F64) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


def close(got: torch.Tensor, want, *, rtol: float = 1e-6, atol: float = 1e-12) -> None:
    torch.testing.assert_close(got.detach().to(F64), want if isinstance(want, torch.Tensor) else t(want),
                               rtol=rtol, atol=atol)


def shared_inputs(name: str) -> dict[str, torch.Tensor]:
    x = golden(name)["inputs"]
    return {
        "logp": t(x["logp"]), "old_logp": t(x["old_logp"]), "mask": t(x["mask"]),
        "advantages": t(x["advantages"]), "rewards": t(x["rewards"]),
        "off_policy": torch.tensor(x["off_policy"]), "group_ids": torch.tensor(x["group_ids"]),
    }


def test_sources_are_recorded() -> None:
    for name in ("luffy", "rl_plus", "chord", "calibrl", "gtpo"):
        source = golden(name)["source"]
        assert "/" in source["repo"] and len(source["commit"]) == 40
        assert all(entry["path"] for entry in source["files"].values())


# --------------------------------------------------------------------------------------------
# LUFFY and RL-PLUS: ElliottYan/LUFFY and YihongDong/RL-PLUS, compute_token_on_off_policy_loss


HYBRID_PARAMS = {"luffy": {"shaping_gamma": 0.1}, "rl_plus": {"explore_gamma": 0.5}}


def _hybrid_loss(name: str, x: dict, logp: torch.Tensor, advantages: torch.Tensor, **params) -> torch.Tensor:
    per_token, _ = POLICY_LOSSES.get(name)(logp, x["old_logp"], advantages, x["mask"], off_policy=x["off_policy"],
                                           **params)
    return per_token


def _verl_aggregate(per_token: torch.Tensor, mask: torch.Tensor, remove_token_mean: bool) -> torch.Tensor:
    if remove_token_mean:
        # the scripts' loss_remove_token_mean=True: Σ L·m / T. unipo's seq_mean_token_sum_norm divides
        # by B·T, so the official value is B times it (a constant factor).
        return aggregate(per_token, mask, "seq_mean_token_sum_norm") * mask.shape[0]
    return aggregate(per_token, mask, "token_mean")


@pytest.mark.parametrize("name", ["luffy", "rl_plus"])
@pytest.mark.parametrize("case", range(4))
def test_hybrid_loss_matches_official(name: str, case: int) -> None:
    x, want = shared_inputs(name), golden(name)["cases"][case]
    params = {**HYBRID_PARAMS[name], "clip_on_policy": not want["loss_remove_clip"]}
    per_token = _hybrid_loss(name, x, x["logp"], x["advantages"], **params)
    close(per_token, want["per_token_loss"])
    logp = x["logp"].clone().requires_grad_(True)
    loss = _verl_aggregate(_hybrid_loss(name, x, logp, x["advantages"], **params), x["mask"],
                           want["loss_remove_token_mean"])
    close(loss, want["pg_loss"])
    loss.backward()
    close(logp.grad, want["grad_logp"])


@pytest.mark.parametrize("name", ["luffy", "rl_plus"])
def test_hybrid_loss_defaults_are_the_released_scripts(name: str) -> None:
    x = shared_inputs(name)
    released = next(c for c in golden(name)["cases"] if c["loss_remove_clip"] and c["loss_remove_token_mean"])
    params = {"explore_gamma": 0.5} if name == "rl_plus" else {}  # RL-PLUS's weight, here in the loss
    per_token = _hybrid_loss(name, x, x["logp"], x["advantages"], **params)
    close(per_token, released["per_token_loss"])


@pytest.mark.parametrize("name", ["luffy", "rl_plus"])
def test_group_advantages_match_official(name: str) -> None:
    x, want = shared_inputs(name), golden(name)["advantages"]
    # the scripts' adv_estimator=grpo over every row of the group, expert traces included
    close(compute_advantages("dr_grpo", x["rewards"], x["group_ids"]), want["grpo_use_std_False"])
    close(compute_advantages("grpo", x["rewards"], x["group_ids"]), want["grpo_use_std_True"])
    for use_std in (False, True):
        for on_policy_stats, key in ((False, "grpo"), (True, "grpo_split")):
            got = compute_advantages("rl_plus_explore", x["rewards"], x["group_ids"], logp=x["logp"], mask=x["mask"],
                                     gamma=0.0, off_policy=x["off_policy"], norm_by_std=use_std,
                                     on_policy_stats=on_policy_stats)
            close(got[:, 0], want[f"{key}_use_std_{use_std}"])


@pytest.mark.parametrize("name", ["luffy", "rl_plus"])
def test_released_script_pipeline_matches_official(name: str) -> None:
    """Rewards -> advantage -> loss -> Σ/T as the released scripts run it (one update: π_old fixed)."""
    x, want = shared_inputs(name), golden(name)["released_script_pipeline"]
    logp = x["logp"].clone().requires_grad_(True)
    if name == "luffy":
        advantages = compute_advantages("dr_grpo", x["rewards"], x["group_ids"])
    else:  # the exploration weight from the current log-probs, in the advantage slot
        advantages = compute_advantages("rl_plus_explore", x["rewards"], x["group_ids"], logp=logp.detach(),
                                        mask=x["mask"], gamma=0.5, off_policy=x["off_policy"])
    per_token = _hybrid_loss(name, x, logp, advantages)
    loss = _verl_aggregate(per_token, x["mask"], remove_token_mean=True)
    close(loss, want["pg_loss"])
    loss.backward()
    close(logp.grad, want["grad_logp"])


# --------------------------------------------------------------------------------------------
# CHORD: modelscope/Trinity-RFT, mu_schedule_function, phi_function, SFTPhiLossFn


def test_chord_mu_schedule_matches_official() -> None:
    for schedule in golden("chord")["schedules"]:
        got = [chord_mu_schedule(step, mu_peak=schedule["mu_peak"], mu_valley=schedule["mu_valley"],
                                 warmup_steps=schedule["warmup_steps"], decay_steps=schedule["decay_steps"])
               for step in schedule["steps"]]
        close(t(got), schedule["mu"], rtol=1e-12)


def test_chord_phi_and_sft_loss_match_official() -> None:
    data = golden("chord")
    logp, mask = t(data["inputs"]["logp"]), t(data["inputs"]["mask"])
    phi = chord_phi_weights(logp)
    close(phi, data["phi"])
    for case in data["sft_phi"]:
        lp = logp.clone().requires_grad_(True)
        agg = "token_mean" if case["use_token_level_loss"] else "seq_mean_token_mean"
        loss, _ = compute_policy_loss("sft", lp, lp.detach(), torch.ones(lp.shape[0], dtype=F64), mask, agg,
                                      weights=chord_phi_weights(lp))
        close(loss, case["loss"])  # Trinity's masked_mean adds 1e-8 to the token count: ~1e-9 relative
        loss.backward()
        close(lp.grad, case["grad_logp"])


# --------------------------------------------------------------------------------------------
# CalibRL: zhh6425/CalibRL, compute_mix_grpo_outcome_advantage, compute_mix_policy_loss


def _expert_row_logp(logp: torch.Tensor, group_ids: torch.Tensor, off_policy: torch.Tensor) -> torch.Tensor:
    """Each row gets its group's expert row (what the trainer passes as `expert_logp`)."""
    expert_of = {int(g): i for i, (g, off) in enumerate(zip(group_ids.tolist(), off_policy.tolist())) if off}
    return torch.stack([logp[expert_of[int(g)]] for g in group_ids.tolist()])


@pytest.mark.parametrize("case", range(2))
def test_calibrl_matches_official(case: int) -> None:
    x, want = shared_inputs("calibrl"), golden("calibrl")["cases"][case]
    norm_by_std = want["norm_adv_by_std_in_grpo"]
    on = ~x["off_policy"]
    on_mask = x["mask"] * on[:, None]  # the code drops expert rows from the loss and its denominator
    expert_logp = _expert_row_logp(x["old_logp"], x["group_ids"], x["off_policy"])
    close(expert_logp, want["pref_log_prob"])
    assert (x["rewards"] > 0.1).tolist() == want["pass_sample_mask"]

    # the group advantage alone (guide_coef 0) on the rollouts; expert rows get 0 here
    plain = calibrl_advantage(x["rewards"], x["group_ids"], logp=x["old_logp"], expert_logp=expert_logp,
                              off_policy=x["off_policy"], norm_by_std=norm_by_std, guide_coef=0.0)
    close(plain[on][:, 0], t(want["advantages"])[on])
    assert (plain[x["off_policy"]] == 0).all()

    # the PPO part away from π_old: the code's loss is dual-clip (c = 3), token mean over rollouts
    logp = x["logp"].clone().requires_grad_(True)
    pg_loss, _ = compute_policy_loss("dual_clip", logp, x["old_logp"], plain, on_mask, "token_mean",
                                     clip_ratio_c=3.0)
    close(pg_loss, want["off_old"]["pg_loss"])
    close(torch.autograd.grad(pg_loss, logp)[0], want["off_old"]["pg_grad_logp"])

    # PPO + 0.1·guided term at π = π_old: the calibrated advantage has the same gradient
    calibrated = compute_advantages("calibrl", x["rewards"], x["group_ids"], logp=x["old_logp"],
                                    expert_logp=expert_logp, off_policy=x["off_policy"], norm_by_std=norm_by_std)
    for loss_name, params in (("dual_clip", {"clip_ratio_c": 3.0}), ("ppo_clip", {})):
        logp = x["old_logp"].clone().requires_grad_(True)
        loss, _ = compute_policy_loss(loss_name, logp, x["old_logp"], calibrated, on_mask, "token_mean", **params)
        close(torch.autograd.grad(loss, logp)[0], want["at_old"]["grad_logp"])


@pytest.mark.parametrize("case", range(2))
@pytest.mark.parametrize("point", ["at_old", "off_old"])
def test_calibrl_loss_matches_official_at_and_away_from_pi_old(case: int, point: str) -> None:
    """The `calibrl` loss (dual clip + 0.1·guided term, differentiated through log π_θ) equals the code's
    pg_loss + 0.1·guided_loss in value and gradient, also away from π_old (every mini-batch update)."""
    x, want = shared_inputs("calibrl"), golden("calibrl")["cases"][case]
    on_mask = x["mask"] * (~x["off_policy"])[:, None]
    expert_logp = _expert_row_logp(x["old_logp"], x["group_ids"], x["off_policy"])
    plain = calibrl_advantage(x["rewards"], x["group_ids"], logp=x["old_logp"], expert_logp=expert_logp,
                              off_policy=x["off_policy"], norm_by_std=want["norm_adv_by_std_in_grpo"], guide_coef=0.0)
    logp = t(want[point]["logp"]).requires_grad_(True)
    loss, metrics = compute_policy_loss("calibrl", logp, x["old_logp"], plain[:, 0], on_mask, "token_mean",
                                        expert_logp=expert_logp, rewards=x["rewards"])
    close(loss, want[point]["total_loss"])
    close(torch.autograd.grad(loss, logp)[0], want[point]["grad_logp"])
    close(metrics["guided_mean"], want[point]["guided_loss"])


def test_calibrl_defaults_are_the_released_script() -> None:
    x, want = shared_inputs("calibrl"), golden("calibrl")["cases"][0]
    assert want["norm_adv_by_std_in_grpo"] is False  # src/examples/run_qwen25vl7b_virl_mix_policy.sh
    expert_logp = _expert_row_logp(x["old_logp"], x["group_ids"], x["off_policy"])
    calibrated = calibrl_advantage(x["rewards"], x["group_ids"], logp=x["old_logp"], expert_logp=expert_logp,
                                   off_policy=x["off_policy"])
    logp = x["old_logp"].clone().requires_grad_(True)
    loss, _ = compute_policy_loss("ppo_clip", logp, x["old_logp"], calibrated, x["mask"] * ~x["off_policy"][:, None])
    close(torch.autograd.grad(loss, logp)[0], want["at_old"]["grad_logp"])


# --------------------------------------------------------------------------------------------
# GTPO: winstonsmith1897/GTPO, UnslothEfficientGTPO.forward, build_conflict_mask


def gtpo_inputs() -> dict[str, torch.Tensor]:
    x = golden("gtpo")["inputs"]
    return {"token_ids": torch.tensor(x["token_ids"]), "mask": t(x["mask"]), "rewards": t(x["rewards"]),
            "group_ids": torch.tensor(x["group_ids"]), "logp": t(x["logp"]), "entropy": t(x["entropy"])}


def test_gtpo_advantage_matches_official() -> None:
    x, want = gtpo_inputs(), golden("gtpo")
    close((x["entropy"] * x["mask"]).sum(1) / x["mask"].sum(1), want["completion_entropy"])
    close(compute_advantages("dr_grpo", x["rewards"], x["group_ids"]), want["advantages_raw"])
    shaped = compute_advantages("gtpo", x["rewards"], x["group_ids"], entropy=x["entropy"], mask=x["mask"])
    close(shaped, want["advantages_shaped"])


def test_gtpo_conflict_weights_match_official() -> None:
    x, want = gtpo_inputs(), golden("gtpo")
    shaped = compute_advantages("gtpo", x["rewards"], x["group_ids"], entropy=x["entropy"], mask=x["mask"])
    common = {"rewards": x["rewards"], "advantages": shaped, "entropy": x["entropy"], "group_ids": x["group_ids"],
              "token_ids": x["token_ids"]}
    delta = compute_selection("gtpo", x["mask"], divide_by_conflicts=False, entropy_threshold=None, **common)
    close(delta, t(want["delta"]) * x["mask"])
    n_conflict = t(want["n_conflict"]).clamp(min=1)
    calm = t(want["completion_entropy"]) <= 0.7
    weights = compute_selection("gtpo", x["mask"], **common)
    close(weights, t(want["delta"]) * x["mask"] / n_conflict[:, None] * calm[:, None])


def test_gtpo_loss_and_gradient_match_official() -> None:
    """Official: Σ over completions of (token mean of −A·δ·ρ) / n_conflict, at ρ = 1."""
    x, want = gtpo_inputs(), golden("gtpo")
    shaped = compute_advantages("gtpo", x["rewards"], x["group_ids"], entropy=x["entropy"], mask=x["mask"])
    weights = compute_selection("gtpo", x["mask"], rewards=x["rewards"], advantages=shaped, entropy=x["entropy"],
                                group_ids=x["group_ids"], token_ids=x["token_ids"])
    logp = x["logp"].clone().requires_grad_(True)
    per_token, _ = POLICY_LOSSES.get("ppo_clip")(logp, x["logp"], shaped, x["mask"])
    loss = ((per_token * weights * x["mask"]).sum(1) / x["mask"].sum(1)).sum()
    close(loss, want["loss"])
    loss.backward()
    close(logp.grad, want["grad_logp"])
