"""Write the golden JSON files that tests/test_golden_parity.py compares unipo against.

The values come from the reference implementations themselves, IMPORTED and called here (no code of
theirs is copied): verl's `verl.trainer.ppo.core_algos` (advantages, policy losses, `agg_loss`,
`kl_penalty`, `compute_value_loss`) and `verl.utils.torch_functional`, and TRL's standalone
`trl.trainer.utils` functions (`selective_log_softmax`, `entropy_from_logits`,
`selective_log_softmax_and_entropy`). The test itself imports neither package, so CI needs neither.

Run it in its own environment, never the project's venv (verl pins other transformers versions):

    python3 -m venv /tmp/refenv-verl
    /tmp/refenv-verl/bin/pip install torch==2.13.0              # the CPU wheel
    /tmp/refenv-verl/bin/pip install --no-deps verl==0.9.1 tensordict==0.10.0 \
        codetiming pyvers orjson cloudpickle importlib_metadata zipp
    /tmp/refenv-verl/bin/pip install trl==1.16.0 numpy omegaconf
    /tmp/refenv-verl/bin/python tests/golden/make_golden_reference.py

verl is installed without its dependencies: `verl/__init__.py` imports `verl.protocol`, which imports
ray, and `verl.utils.profiler` imports `verl.single_controller` (ray again) only to decorate a
profiling class. `_load_verl` therefore registers two stand-ins in `sys.modules`, in this process
only: the package object `verl` (so that its `__init__` with the ray import is not run; submodules
load from the installed files as usual) and `verl.single_controller.base.decorator` (an identity
`register` and a `Dispatch.ONE_TO_ALL`; nothing in the loss maths uses them). Everything that
computes a golden value is verl's own installed code.

All inputs are seeded float64, rounded to 6 decimals and read back from their JSON form before
they are used, so the test feeds unipo exactly the numbers the references saw. Outputs are stored
with 15 significant digits.
"""

from __future__ import annotations

import enum
import importlib.metadata
import importlib.util
import json
import math
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import torch

OUT = Path(__file__).resolve().parent
F64 = torch.float64


# --------------------------------------------------------------------------------------------
# loading the references


def _load_verl() -> tuple[Any, Any, Any]:
    """(core_algos, torch_functional, ActorConfig) from the installed verl, without ray."""
    spec = importlib.util.find_spec("verl")
    if spec is None or spec.submodule_search_locations is None:
        raise SystemExit("verl is not installed in this interpreter; see this file's docstring")
    package = types.ModuleType("verl")
    package.__path__ = list(spec.submodule_search_locations)
    package.__file__ = spec.origin
    sys.modules["verl"] = package

    class Dispatch(enum.Enum):
        ONE_TO_ALL = 0

    decorator = types.ModuleType("verl.single_controller.base.decorator")
    decorator.Dispatch = Dispatch
    decorator.register = lambda **kwargs: (lambda fn: fn)
    for name in ("verl.single_controller", "verl.single_controller.base"):
        stub = types.ModuleType(name)
        stub.__path__ = []
        sys.modules[name] = stub
    sys.modules["verl.single_controller.base.decorator"] = decorator

    import verl.trainer.ppo.core_algos as core_algos
    import verl.utils.torch_functional as torch_functional
    from verl.workers.config import ActorConfig

    assert "ray" not in sys.modules, "loading verl's core_algos pulled in ray"
    return core_algos, torch_functional, ActorConfig


def _source(package: str, module: str) -> dict[str, str]:
    return {"package": package, "version": importlib.metadata.version(package), "module": module,
            "torch": torch.__version__, "generator": "tests/golden/make_golden_reference.py"}


# --------------------------------------------------------------------------------------------
# JSON helpers


def _inputs(x: torch.Tensor) -> list:
    """Round to 6 decimals and return the JSON form (read back by `_t`)."""
    return (torch.round(x.to(F64) * 1e6) / 1e6).tolist()


def _t(value: Any, dtype: torch.dtype = F64) -> torch.Tensor:
    return torch.tensor(value, dtype=dtype)


def _out(x: torch.Tensor | float) -> Any:
    """15 significant digits; nested lists for tensors."""
    if isinstance(x, torch.Tensor):
        x = x.detach().to(F64)
        if x.dim() == 0:
            return _out(float(x))
        return [_out(v) for v in x]
    value = float(x)
    assert math.isfinite(value), value
    return float(f"{value:.15g}")


def _write(name: str, payload: dict[str, Any]) -> None:
    path = OUT / name
    path.write_text(json.dumps(payload, separators=(",", ":")) + "\n")
    print(f"wrote {path.relative_to(OUT.parents[1])} ({path.stat().st_size} bytes)")


def _grad_of(fn, x: torch.Tensor) -> tuple[Any, torch.Tensor]:
    """(fn's output, d fn / d x) for a 0-dim output; x is cloned as a fresh leaf."""
    leaf = x.clone().requires_grad_(True)
    out = fn(leaf)
    (grad,) = torch.autograd.grad(out if out.dim() == 0 else out.sum(), leaf, allow_unused=True)
    return out, torch.zeros_like(x) if grad is None else grad


# --------------------------------------------------------------------------------------------
# advantages


def advantages(core_algos: Any) -> None:
    gen = torch.Generator().manual_seed(101)
    groups = [0, 0, 0, 1, 1, 2, 2, 3, 3]
    rewards = [1.0, 0.0, 1.0, 0.5, 0.5, 0.0, 0.0, 0.37, 0.81]  # groups 1 and 2 are constant
    lengths = [5, 3, 0, 4, 5, 2, 1, 5, 3]  # row 2 is all-masked
    batch, horizon = len(groups), 5
    mask = _t([[1.0 if t < n else 0.0 for t in range(horizon)] for n in lengths])
    r = _t(rewards)

    def token_rewards(m: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        # each reward on its row's last valid token; an all-masked row keeps its reward at t=0
        # so that it still enters the group statistics (verl sums rewards over T, ignoring the mask)
        positions = torch.arange(m.shape[1]).expand_as(m)
        last = torch.where(m > 0, positions, torch.zeros_like(positions)).amax(1)
        return torch.zeros_like(m).scatter(1, last[:, None], r[:, None])

    index = np.array(groups)
    cases = []

    def outcome(case_id: str, reference: str, fn, m: torch.Tensor, unipo: dict[str, Any], **kwargs: Any) -> None:
        adv, ret = fn(token_level_rewards=token_rewards(m, r), response_mask=m, index=index, **kwargs)
        assert torch.equal(adv, ret)
        cases.append({"id": case_id, "reference": reference, "reference_kwargs": kwargs, "unipo": unipo,
                      "mask": m.tolist(), "advantages": _out(adv)})

    ca = "verl.trainer.ppo.core_algos."
    outcome("grpo", ca + "compute_grpo_outcome_advantage", core_algos.compute_grpo_outcome_advantage, mask,
            {"name": "grpo", "params": {"eps": 1e-6}}, epsilon=1e-6, norm_adv_by_std_in_grpo=True)
    outcome("dr_grpo", ca + "compute_grpo_outcome_advantage", core_algos.compute_grpo_outcome_advantage, mask,
            {"name": "dr_grpo", "params": {}}, epsilon=1e-6, norm_adv_by_std_in_grpo=False)
    outcome("rloo", ca + "compute_rloo_outcome_advantage", core_algos.compute_rloo_outcome_advantage, mask,
            {"name": "rloo", "params": {}})
    outcome("rloo_vectorized", ca + "compute_rloo_vectorized_outcome_advantage",
            core_algos.compute_rloo_vectorized_outcome_advantage, mask, {"name": "rloo", "params": {}})
    # REINFORCE++-baseline: verl whitens over tokens, unipo over sequences. They coincide for
    # one token per row (T=1); for equal lengths L they differ by the Bessel factor only.
    for case_id, width in (("reinforce_pp_T1", 1), ("reinforce_pp_equal_len5", 5)):
        outcome(case_id, ca + "compute_reinforce_plus_plus_baseline_outcome_advantage",
                core_algos.compute_reinforce_plus_plus_baseline_outcome_advantage, torch.ones(batch, width, dtype=F64),
                {"name": "reinforce_pp", "params": {"eps": 0.0}}, epsilon=1e-6)

    # singleton groups (a documented difference: unipo gives 0, verl's loop versions do not)
    singleton = {"group_ids": [0, 0, 0, 1, 2], "rewards": [1.0, 0.0, 0.0, 0.7, 0.0]}
    s_index, s_r = np.array(singleton["group_ids"]), _t(singleton["rewards"])
    s_mask = torch.ones(5, 3, dtype=F64)
    s_tokens = torch.zeros_like(s_mask)
    s_tokens[:, -1] = s_r
    for case_id, reference, fn, unipo in (
        ("grpo", "compute_grpo_outcome_advantage", core_algos.compute_grpo_outcome_advantage, "grpo"),
        ("rloo", "compute_rloo_outcome_advantage", core_algos.compute_rloo_outcome_advantage, "rloo"),
        ("rloo_vectorized", "compute_rloo_vectorized_outcome_advantage",
         core_algos.compute_rloo_vectorized_outcome_advantage, "rloo"),
    ):
        adv, _ = fn(token_level_rewards=s_tokens, response_mask=s_mask, index=s_index)
        singleton.setdefault("cases", []).append(
            {"id": case_id, "reference": ca + reference, "unipo": {"name": unipo, "params": {}},
             "mask": s_mask.tolist(), "advantages": _out(adv)})

    # GAE: token rewards everywhere (also on masked tokens, which both sides must ignore), a mask
    # with a hole, an all-masked row; and an outcome reward on each row's last valid token.
    gae_mask = _t([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 1, 1], [0, 0, 0, 0, 0, 0]])
    values = _t(_inputs(torch.randn(4, 6, generator=gen, dtype=F64)))
    dense = _t(_inputs(0.5 * torch.randn(4, 6, generator=gen, dtype=F64)))
    outcome_r = _t([1.0, -0.5, 0.8, 0.3])
    gae_cases = []
    for case_id, rewards_json, tokens, gamma, lam in (
        ("dense_rewards", dense.tolist(), dense, 0.99, 0.95),
        ("outcome_reward", outcome_r.tolist(), token_rewards(gae_mask, outcome_r) * (gae_mask.sum(1, True) > 0),
         1.0, 1.0),
    ):
        adv, ret = core_algos.compute_gae_advantage_return(
            token_level_rewards=tokens, values=values, response_mask=gae_mask, gamma=gamma, lam=lam)
        # verl returns whitened advantages and returns = raw advantages + values: check that reading
        # raw = returns - values is right before storing it
        raw = ret - values
        from verl.utils.torch_functional import masked_whiten

        assert torch.allclose(masked_whiten(raw, gae_mask), adv, rtol=0, atol=1e-12)
        gae_cases.append({"id": case_id, "reference": ca + "compute_gae_advantage_return",
                          "rewards": rewards_json, "gamma": gamma, "lam": lam,
                          "whitened_advantages": _out(adv), "returns": _out(ret)})

    _write("verl_advantages.json", {
        "source": _source("verl", "verl.trainer.ppo.core_algos"),
        "notes": "advantages are [B, T] (verl multiplies by the mask). Outcome cases: token_level_rewards hold each "
                 "reward on the row's last valid token (t=0 for the all-masked row). GAE: returns = raw advantages "
                 "+ values; verl's advantages are whitened over the mask.",
        "outcome": {"group_ids": groups, "rewards": rewards, "cases": cases},
        "singleton_groups": singleton,
        "gae": {"mask": gae_mask.tolist(), "values": values.tolist(), "cases": gae_cases},
    })


# --------------------------------------------------------------------------------------------
# policy losses


def _policy_inputs() -> dict[str, Any]:
    gen = torch.Generator().manual_seed(202)
    lengths_mask = [
        [1, 1, 1, 1, 1, 1],
        [1, 1, 1, 1, 0, 0],
        [1, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0],  # all-masked
        [1, 1, 0, 1, 1, 0],  # a hole
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 1, 0],
    ]
    mask = _t(lengths_mask)
    batch, horizon = mask.shape
    logp = -(0.05 + 2.95 * torch.rand(batch, horizon, generator=gen, dtype=F64))
    # log ratio d = logp - old_logp per row: large spreads clip, tiny ones stay inside GSPO's range
    scale = _t([0.35, 1e-4, 0.6, 0.3, 0.25, 2e-4, 0.5])[:, None]
    log_ratio = scale * torch.randn(batch, horizon, generator=gen, dtype=F64)
    log_ratio[0, 2] = math.log(1.25)  # A > 0, between 1 + 0.2 and 1 + 0.28: clip_higher differs from ppo_clip
    log_ratio[4, 0] = 0.23
    log_ratio[2, 0] = 1.3  # A < 0, ratio 3.7 > c = 3: dual-clipped
    log_ratio[6, 1] = 1.25  # A < 0, ratio 3.5: dual-clipped
    log_ratio[6, 2] = 0.5  # A < 0, ratio 1.65: unclipped branch wins, keeps its gradient
    log_ratio[6, 3] = -0.5  # A < 0, ratio 0.61: clipped
    seq_adv = _t([1.2, -0.7, -1.5, 0.4, 0.9, 0.35, -0.8])
    token_adv = seq_adv[:, None] + 0.6 * torch.randn(batch, horizon, generator=gen, dtype=F64)
    return {
        "mask": mask.tolist(),
        "logp": _inputs(logp),
        "old_logp": _inputs(logp - log_ratio),  # old = current + noise
        "seq_advantages": seq_adv.tolist(),
        "token_advantages": _inputs(token_adv),
    }


def policy_losses(core_algos: Any, actor_config: Any) -> None:
    inputs = _policy_inputs()
    mask, logp, old = _t(inputs["mask"]), _t(inputs["logp"]), _t(inputs["old_logp"])
    seq_adv, token_adv = _t(inputs["seq_advantages"]), _t(inputs["token_advantages"])
    batch, horizon = mask.shape

    captured: dict[str, torch.Tensor] = {}
    original_agg = core_algos.agg_loss

    def recording_agg_loss(loss_mat, *args, **kwargs):  # records verl's per-token loss, then aggregates
        captured["loss_mat"] = loss_mat.detach().clone()
        return original_agg(loss_mat, *args, **kwargs)

    cases = []

    def run(case_id: str, verl_name: str, config: dict[str, Any], adv_kind: str, agg: str,
            unipo: list[dict[str, Any]], metrics: dict[str, str] | None = None) -> None:
        cfg = actor_config(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, **config)
        fn = core_algos.get_policy_loss_fn(verl_name)
        adv = seq_adv[:, None].expand(batch, horizon).clone() if adv_kind == "seq" else token_adv
        verl_metrics: dict[str, Any] = {}

        def loss_of(lp: torch.Tensor) -> torch.Tensor:
            loss, m = fn(old_log_prob=old, log_prob=lp, advantages=adv, response_mask=mask,
                         loss_agg_mode=agg, config=cfg)
            verl_metrics.update(m)
            return loss

        core_algos.agg_loss = recording_agg_loss
        try:
            loss, grad = _grad_of(loss_of, logp)
        finally:
            core_algos.agg_loss = original_agg
        cases.append({
            "id": case_id,
            "reference": f"verl.trainer.ppo.core_algos.get_policy_loss_fn({verl_name!r})",
            "reference_config": config, "advantages": adv_kind, "agg": agg, "unipo": unipo,
            "loss": _out(loss), "per_token_loss": _out(captured["loss_mat"]), "grad_logp": _out(grad),
            "metrics": {k: _out(verl_metrics[v]) for k, v in (metrics or {}).items()},
        })

    no_dual = 1e9  # verl's "vanilla" always applies the dual clip; a huge c switches it off
    clip_frac = {"clip_frac": "actor/pg_clipfrac"}
    run("ppo_clip", "vanilla", {"clip_ratio": 0.2, "clip_ratio_low": 0.2, "clip_ratio_high": 0.2,
                                "clip_ratio_c": no_dual},
        "seq", "token-mean", [{"name": "ppo_clip", "params": {"eps_low": 0.2, "eps_high": 0.2}}], clip_frac)
    run("ppo_clip_token_adv", "vanilla", {"clip_ratio": 0.2, "clip_ratio_low": 0.2, "clip_ratio_high": 0.2,
                                          "clip_ratio_c": no_dual},
        "token", "seq-mean-token-mean", [{"name": "ppo_clip", "params": {}}], clip_frac)
    run("clip_higher", "vanilla", {"clip_ratio": 0.2, "clip_ratio_low": 0.2, "clip_ratio_high": 0.28,
                                   "clip_ratio_c": no_dual},
        "seq", "token-mean", [{"name": "clip_higher", "params": {"eps_low": 0.2, "eps_high": 0.28}},
                              {"name": "ppo_clip", "params": {"eps_low": 0.2, "eps_high": 0.28}}], clip_frac)
    run("dual_clip", "vanilla", {"clip_ratio": 0.2, "clip_ratio_low": 0.2, "clip_ratio_high": 0.2,
                                 "clip_ratio_c": 3.0},
        "seq", "token-mean", [{"name": "dual_clip", "params": {"clip_ratio_c": 3.0}}],
        {"dual_clip_frac": "actor/pg_clipfrac_lower"})
    # global_batch_size = B, as verl's trainer sets it (the mini-batch's sequence count, empty rows included):
    # seq-mean-token-sum-norm then divides by B * T like unipo, with the all-masked row in the batch
    run("dual_clip_token_adv", "vanilla", {"clip_ratio": 0.2, "clip_ratio_low": 0.2, "clip_ratio_high": 0.28,
                                           "clip_ratio_c": 3.0, "global_batch_info": {"global_batch_size": batch}},
        "token", "seq-mean-token-sum-norm", [{"name": "dual_clip", "params": {"eps_high": 0.28, "clip_ratio_c": 3.0}}],
        {"dual_clip_frac": "actor/pg_clipfrac_lower"})
    gspo_params = {"eps_low": 3e-4, "eps_high": 4e-4}
    gspo_config = {"clip_ratio": 3e-4, "clip_ratio_low": 3e-4, "clip_ratio_high": 4e-4}
    run("gspo", "gspo", gspo_config, "seq", "seq-mean-token-mean",
        [{"name": "gspo", "params": gspo_params}, {"name": "gspo_token", "params": gspo_params}], clip_frac)
    run("gspo_token_mean", "gspo", gspo_config, "seq", "token-mean",
        [{"name": "gspo", "params": gspo_params}, {"name": "gspo_token", "params": gspo_params}], clip_frac)
    run("gspo_token_adv", "gspo", gspo_config, "token", "seq-mean-token-mean",
        [{"name": "gspo_token", "params": gspo_params}], clip_frac)
    run("cispo", "cispo", {"clip_ratio": 0.2, "clip_ratio_low": 0.2, "clip_ratio_high": 0.28},
        "seq", "token-mean", [{"name": "cispo", "params": {"eps_low": 0.2, "eps_high": 0.28}}], clip_frac)
    # clip_ratio_low = 1: a lower bound of 0, i.e. none (a ratio is > 0), unipo's eps_low=None
    run("cispo_no_lower_bound", "cispo", {"clip_ratio": 0.28, "clip_ratio_low": 1.0, "clip_ratio_high": 0.28},
        "token", "token-mean", [{"name": "cispo", "params": {"eps_low": None, "eps_high": 0.28}}], clip_frac)
    run("gpg", "gpg", {}, "seq", "token-mean", [{"name": "reinforce", "params": {}}])

    _write("verl_policy_losses.json", {
        "source": _source("verl", "verl.trainer.ppo.core_algos"),
        "notes": "per_token_loss is verl's loss matrix before agg_loss (recorded by wrapping agg_loss); off the mask "
                 "it is not zeroed, compare on the mask. grad_logp = d loss / d logp. verl's 'vanilla' loss always "
                 "applies the dual clip, so ppo_clip/clip_higher cases pass clip_ratio_c=1e9.",
        "inputs": inputs,
        "cases": cases,
    })


# --------------------------------------------------------------------------------------------
# aggregation


def aggregation(core_algos: Any) -> None:
    gen = torch.Generator().manual_seed(303)
    loss_mat = _t(_inputs(torch.randn(6, 5, generator=gen, dtype=F64)))
    masks = {
        "with_empty_row": [[1.0 if t < n else 0.0 for t in range(5)] for n in (5, 2, 0, 3, 1, 4)],
        "no_empty_row": [[1.0 if t < n else 0.0 for t in range(5)] for n in (5, 2, 1, 3, 1, 4)],
    }
    cases = []
    for case_id, mode, mask_name, kwargs, unipo in (
        ("token_mean", "token-mean", "with_empty_row", {}, {"mode": "token_mean"}),
        ("seq_mean_token_mean", "seq-mean-token-mean", "with_empty_row", {}, {"mode": "seq_mean_token_mean"}),
        ("seq_mean_token_sum_norm", "seq-mean-token-sum-norm", "no_empty_row", {},
         {"mode": "seq_mean_token_sum_norm"}),
        ("seq_mean_token_sum_norm_scale16", "seq-mean-token-sum-norm", "no_empty_row", {"loss_scale_factor": 16},
         {"mode": "seq_mean_token_sum_norm", "max_len": 16}),
        ("seq_mean_token_sum_norm_global_batch", "seq-mean-token-sum-norm", "with_empty_row",
         {"global_batch_size": 6}, {"mode": "seq_mean_token_sum_norm"}),
        ("seq_mean_token_mean_global_batch", "seq-mean-token-mean", "no_empty_row", {"global_batch_size": 6},
         {"mode": "seq_mean_token_mean"}),
        ("seq_mean_token_sum", "seq-mean-token-sum", "no_empty_row", {}, {"mode": "seq_mean_token_sum"}),
        # documented differences in the row count when a row is all-masked (verl_over_unipo: the exact ratio)
        ("seq_mean_token_sum_norm_empty_row", "seq-mean-token-sum-norm", "with_empty_row", {},
         {"mode": "seq_mean_token_sum_norm", "verl_over_unipo": "B/B_nonempty"}),
        ("seq_mean_token_mean_global_batch_empty_row", "seq-mean-token-mean", "with_empty_row",
         {"global_batch_size": 6}, {"mode": "seq_mean_token_mean", "verl_over_unipo": "B_nonempty/B"}),
    ):
        mask = _t(masks[mask_name])
        loss, grad = _grad_of(lambda lm: core_algos.agg_loss(lm, mask, mode, **kwargs), loss_mat)
        cases.append({"id": case_id, "reference": "verl.trainer.ppo.core_algos.agg_loss", "loss_agg_mode": mode,
                      "mask": mask_name, "reference_kwargs": kwargs, "unipo": unipo,
                      "loss": _out(loss), "grad_loss_mat": _out(grad)})
    _write("verl_agg_loss.json", {
        "source": _source("verl", "verl.trainer.ppo.core_algos"),
        "inputs": {"loss_mat": loss_mat.tolist(), "masks": masks},
        "cases": cases,
    })


# --------------------------------------------------------------------------------------------
# KL penalties and the value loss


def kl_and_value(core_algos: Any) -> None:
    gen = torch.Generator().manual_seed(404)
    logp = -(0.05 + 2.95 * torch.rand(3, 6, generator=gen, dtype=F64))
    # k1 = logp - ref_logp in [-2, 2] (verl clamps its k3 to [-10, 10]; k3 <= e^2 - 3 = 4.4 here), with a few
    # |k1| ~ 1e-4 (unipo's series branch; verl's exp(-k1) + k1 - 1 still has ~1e-8 relative accuracy there)
    k1 = 4.0 * torch.rand(3, 6, generator=gen, dtype=F64) - 2.0
    k1[0, :3] = _t([2e-4, -3e-4, 8e-4])
    k1[1, 0] = 2.0
    k1[1, 1] = -2.0
    weights = _inputs(torch.rand(3, 6, generator=gen, dtype=F64))
    inputs = {"logp": _inputs(logp), "ref_logp": _inputs(logp - k1), "weights": weights}
    lp, ref, w = _t(inputs["logp"]), _t(inputs["ref_logp"]), _t(weights)
    cases = []
    for mode, unipo_kind in (("kl", "k1"), ("mse", "k2"), ("low_var_kl", "k3")):
        values, _ = _grad_of(lambda x: core_algos.kl_penalty(x, ref, mode), lp)
        _, grad = _grad_of(lambda x: (w * core_algos.kl_penalty(x, ref, mode)).sum(), lp)
        cases.append({"id": mode, "reference": f"verl.trainer.ppo.core_algos.kl_penalty({mode!r})",
                      "unipo": unipo_kind, "kl": _out(values), "grad_weighted_sum": _out(grad)})
    _write("verl_kl_penalty.json", {
        "source": _source("verl", "verl.trainer.ppo.core_algos"),
        "notes": "grad_weighted_sum = d sum(weights * kl) / d logp. Inputs keep |logp - ref_logp| <= 2, inside verl's "
                 "clamps (k3 to [-10, 10], its exponent to [-20, 20]).",
        "inputs": inputs, "cases": cases,
    })

    gen = torch.Generator().manual_seed(505)
    mask = [[1.0 if t < n else 0.0 for t in range(5)] for n in (5, 3, 0, 4)]
    old_values = torch.randn(4, 5, generator=gen, dtype=F64)
    vinputs = {
        "mask": mask,
        "vpreds": _inputs(old_values + 0.4 * torch.randn(4, 5, generator=gen, dtype=F64)),
        "values": _inputs(old_values),
        "returns": _inputs(old_values + torch.randn(4, 5, generator=gen, dtype=F64)),
    }
    vp, old_v, ret, m = _t(vinputs["vpreds"]), _t(vinputs["values"]), _t(vinputs["returns"]), _t(mask)
    vcases = []
    for agg in ("token-mean", "seq-mean-token-mean"):
        clipfrac = {}

        def loss_of(x: torch.Tensor) -> torch.Tensor:
            loss, frac = core_algos.compute_value_loss(x, ret, old_v, m, cliprange_value=0.2, loss_agg_mode=agg)
            clipfrac["value"] = frac
            return loss

        loss, grad = _grad_of(loss_of, vp)
        vcases.append({"id": agg, "reference": "verl.trainer.ppo.core_algos.compute_value_loss", "clip": 0.2,
                       "agg": agg, "loss": _out(loss), "grad_vpreds": _out(grad),
                       "value_clip_frac": _out(clipfrac["value"])})
    _write("verl_value_loss.json", {
        "source": _source("verl", "verl.trainer.ppo.core_algos"), "inputs": vinputs, "cases": vcases,
    })


# --------------------------------------------------------------------------------------------
# log-probs and entropies from logits (TRL and verl)


def logprobs(torch_functional: Any) -> None:
    from trl.trainer import utils as trl_utils

    gen = torch.Generator().manual_seed(606)
    batch, horizon, vocab = 2, 4, 9
    inputs = {
        "logits": _inputs(2.0 * torch.randn(batch, horizon, vocab, generator=gen, dtype=F64)),
        "ids": torch.randint(0, vocab, (batch, horizon), generator=gen).tolist(),
        "weights": _inputs(torch.rand(batch, horizon, generator=gen, dtype=F64) - 0.3),
    }
    logits, ids, w = _t(inputs["logits"]), torch.tensor(inputs["ids"]), _t(inputs["weights"])
    cases = []

    def add(case_id: str, package: str, reference: str, quantity: str, fn, temperature: float) -> None:
        values, _ = _grad_of(fn, logits)
        _, grad = _grad_of(lambda x: (w * fn(x)).sum(), logits)
        cases.append({"id": case_id, "package": package, "reference": reference, "quantity": quantity,
                      "temperature": temperature, "values": _out(values), "grad_weighted_sum": _out(grad)})

    trl_u = "trl.trainer.utils."
    for tau in (1.0, 0.7):
        add(f"trl_selective_log_softmax_t{tau}", "trl", trl_u + "selective_log_softmax", "logp",
            lambda x, tau=tau: trl_utils.selective_log_softmax(x, ids, temperature=tau), tau)
    add("trl_entropy_from_logits", "trl", trl_u + "entropy_from_logits", "entropy",
        lambda x: trl_utils.entropy_from_logits(x), 1.0)
    for quantity, pick in (("logp", 0), ("entropy", 1)):
        add(f"trl_selective_log_softmax_and_entropy_{quantity}_t0.7", "trl",
            trl_u + "selective_log_softmax_and_entropy", quantity,
            lambda x, pick=pick: trl_utils.selective_log_softmax_and_entropy(x, ids, temperature=0.7)[pick], 0.7)
    vf = "verl.utils.torch_functional."
    add("verl_logprobs_from_logits", "verl", vf + "logprobs_from_logits", "logp",
        lambda x: torch_functional.logprobs_from_logits(x, ids), 1.0)
    add("verl_entropy_from_logits", "verl", vf + "entropy_from_logits", "entropy",
        lambda x: torch_functional.entropy_from_logits(x), 1.0)
    _write("trl_verl_logprobs.json", {
        "source": [_source("trl", "trl.trainer.utils"), _source("verl", "verl.utils.torch_functional")],
        "notes": "grad_weighted_sum = d sum(weights * values) / d logits.",
        "inputs": inputs, "cases": cases,
    })


def main() -> None:
    torch.manual_seed(0)
    core_algos, torch_functional, actor_config = _load_verl()
    advantages(core_algos)
    policy_losses(core_algos, actor_config)
    aggregation(core_algos)
    kl_and_value(core_algos)
    logprobs(torch_functional)


if __name__ == "__main__":
    main()
