"""Write tests/golden/<name>.json from the authors' official code of the hybrid-policy methods.

Run OUTSIDE the package, against snapshots of the official repositories (nothing of them is
copied into unipo; only the numbers they produce are stored):

    python tests/golden/make_golden_official.py --refs /tmp/ref

`--refs` holds one folder per repository, named owner+name, each with the files listed in
SOURCES at the commit given there (e.g. extracted with `git archive <commit> <paths>`). The
official functions are loaded from those files with importlib; their heavy framework imports
(tensordict, transformers, trl, wandb) are replaced by empty stand-ins, which the functions used
here never touch. Every input is seeded float64. The test reading these files is
tests/test_golden_official.py; it never imports the official code.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib.util
import io
import json
import random
import sys
import types
from pathlib import Path

import numpy as np
import torch

SOURCES = {
    "luffy": {
        "repo": "ElliottYan/LUFFY",
        "commit": "01f4ae066249e6965ce0d5512ccdf99a12895c74",
        "files": {
            "loss": ("luffy/verl/verl/mix_src/mix_core_alg.py", "compute_token_on_off_policy_loss"),
            "advantage": ("luffy/verl/verl/trainer/ppo/core_algos.py", "compute_grpo_outcome_advantage"),
            "advantage_split": ("luffy/verl/verl/mix_src/mix_core_alg.py", "compute_grpo_outcome_advantage_split"),
            "script": ("exp_scripts/train.sh", None),
        },
    },
    "rl_plus": {
        "repo": "YihongDong/RL-PLUS",
        "commit": "eb4aa4d4e2d7ce206056f9d7740138bfc94fad8f",
        "files": {
            "loss": ("rl_plus/verl/verl/recipe/rlplus_core_alg.py", "compute_token_on_off_policy_loss"),
            "advantage": ("rl_plus/verl/verl/trainer/ppo/core_algos.py", "compute_grpo_outcome_advantage"),
            "advantage_split": ("rl_plus/verl/verl/recipe/rlplus_core_alg.py", "compute_grpo_outcome_advantage_split"),
            "script": ("exp_scripts/train_RL-PLUS.sh", None),
        },
    },
    "chord": {
        "repo": "modelscope/Trinity-RFT",
        "commit": "041433056e9067e35a42a3943ecbaf89bef24518",
        "files": {
            "mu": ("trinity/algorithm/policy_loss_fn/chord_policy_loss.py", "mu_schedule_function"),
            "phi": ("trinity/algorithm/policy_loss_fn/chord_policy_loss.py", "phi_function"),
            "sft_phi": ("trinity/algorithm/policy_loss_fn/chord_policy_loss.py", "SFTPhiLossFn.__call__"),
            "masked_mean": ("trinity/algorithm/utils.py", "masked_mean"),
            "config": ("examples/mix_chord/mix_chord.yaml", None),
        },
    },
    "calibrl": {
        "repo": "zhh6425/CalibRL",
        "commit": "0efd799160ec69a3c212e75ba4eb6334c721b8ec",
        "files": {
            "advantage": ("src/core_algos.py", "compute_mix_grpo_outcome_advantage"),
            "loss": ("src/core_algos.py", "compute_mix_policy_loss"),
            "combine": ("src/dp_actor.py", "DataParallelPPOActor.update_policy (policy_loss + 0.1 * guided_loss)"),
            "script": ("src/examples/run_qwen25vl7b_virl_mix_policy.sh", None),
        },
    },
    "gtpo": {
        "repo": "winstonsmith1897/GTPO",
        "commit": "5d33811e8ea1cf76c665db65b247cef9d1e436dd",
        "files": {
            "loss": ("gtpo/gtpo_training.py", "UnslothEfficientGTPO.forward"),
            "conflicts": ("gtpo/gtpo_training.py", "build_conflict_mask"),
            "entropy": ("gtpo/gtpo_training.py", "compute_completion_stats"),
            "advantage": ("gtpo/gtpo_training.py", "_UnslothGTPOTrainer._prepare_inputs (rewards - group mean)"),
            "config": ("config.yaml", None),
        },
    },
}

OUT = Path(__file__).resolve().parent


def _folder(refs: Path, key: str) -> Path:
    return refs / SOURCES[key]["repo"].replace("/", "+")


def _source(key: str) -> dict:
    entry = SOURCES[key]
    return {"repo": entry["repo"], "commit": entry["commit"],
            "files": {k: {"path": p, "function": f} for k, (p, f) in entry["files"].items()}}


def _stub(name: str, **attrs: object) -> types.ModuleType:
    module = types.ModuleType(name)
    for key, value in attrs.items():
        setattr(module, key, value)
    sys.modules[name] = module
    return module


def _load(path: Path, name: str) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _framework_stubs() -> None:
    class _Placeholder:
        pass

    _stub("tensordict", TensorDict=_Placeholder)
    _stub("transformers", PreTrainedTokenizer=_Placeholder)
    _stub("transformers.generation")
    _stub("transformers.generation.logits_process", TemperatureLogitsWarper=_Placeholder,
          TopKLogitsWarper=_Placeholder, TopPLogitsWarper=_Placeholder)


def _load_verl_module(folder: Path, verl_root: str, file: str, name: str) -> types.ModuleType:
    """`file` of a verl fork, with `verl.utils.torch_functional` bound to that fork's own copy."""
    _stub("verl")
    _stub("verl.utils")
    torch_functional = _load(folder / verl_root / "verl/utils/torch_functional.py", f"{name}_torch_functional")
    sys.modules["verl.utils.torch_functional"] = torch_functional
    sys.modules["verl.utils"].torch_functional = torch_functional
    return _load(folder / file, name)


def t2l(x: torch.Tensor) -> list:
    return x.detach().to(torch.float64).tolist()


def write(name: str, payload: dict) -> None:
    path = OUT / f"{name}.json"
    path.write_text(json.dumps(payload, indent=None, separators=(",", ":")) + "\n")
    print(f"wrote {path} ({path.stat().st_size} bytes)")


# --------------------------------------------------------------------------------------------
# shared inputs: 8 rows in 2 groups of 3 rollouts + 1 expert trace (rows 3 and 6), ragged lengths


B, T = 8, 6
LENGTHS = [6, 4, 5, 6, 3, 6, 5, 2]
GROUPS = [0, 0, 0, 0, 1, 1, 1, 1]
OFF_POLICY = [False, False, False, True, False, False, True, False]
# group 0 rollouts 1, 0.05, 0.5 (0.5 is "correct" for CalibRL's > 0.1 but below its group mean);
# group 1 rollouts all 0 (a constant on-policy group); every expert trace scores 1.
REWARDS = [1.0, 0.05, 0.5, 1.0, 0.0, 0.0, 1.0, 0.0]
# per-row advantages for the loss-only checks: positive, negative and zero, experts included
ROW_ADVANTAGES = [1.2, -0.7, 0.0, 0.9, -1.5, 0.4, -0.3, 0.6]


def shared_inputs(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    mask = (torch.arange(T)[None, :] < torch.tensor(LENGTHS)[:, None]).to(torch.float64)
    prob = 0.02 + 0.96 * torch.rand(B, T, generator=gen, dtype=torch.float64)
    logp = prob.log()
    old_logp = (logp + 0.3 * torch.randn(B, T, generator=gen, dtype=torch.float64)).clamp(max=-1e-3)
    off = torch.tensor(OFF_POLICY)
    return {
        "mask": mask,
        "logp": logp,
        "old_logp": old_logp,
        "off_policy": off,
        "advantages": torch.tensor(ROW_ADVANTAGES, dtype=torch.float64)[:, None] * mask,
        "rewards": torch.tensor(REWARDS, dtype=torch.float64),
        "group_ids": torch.tensor(GROUPS),
    }


def token_level_rewards(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The reward on each row's last valid token (verl's token_level_rewards)."""
    out = torch.zeros_like(mask)
    last = mask.sum(1).long() - 1
    out[torch.arange(mask.shape[0]), last] = rewards
    return out


def _one_hot_per_token(fn, mask: torch.Tensor) -> torch.Tensor:
    """Per-token loss of a token-mean loss: evaluate it with one valid token at a time."""
    out = torch.zeros_like(mask)
    for i in range(mask.shape[0]):
        for t in range(mask.shape[1]):
            if mask[i, t] > 0:
                single = torch.zeros_like(mask)
                single[i, t] = 1.0
                out[i, t] = fn(single).detach()
    return out


# --------------------------------------------------------------------------------------------
# LUFFY and RL-PLUS (the same verl-fork loss with a different off-policy ratio)


def make_verl_hybrid(refs: Path, key: str, verl_root: str, strategy: dict) -> None:
    folder = _folder(refs, key)
    files = SOURCES[key]["files"]
    core = _load_verl_module(folder, verl_root, files["advantage"][0], f"{key}_core_algos")
    mix = _load_verl_module(folder, verl_root, files["loss"][0], f"{key}_mix_core_alg")
    x = shared_inputs(seed=11)
    prefix_mask = x["off_policy"][:, None].expand(B, T) & (x["mask"] > 0)
    cases = []
    for remove_clip in (True, False):
        for remove_token_mean in (True, False):
            def call(logp, eos_mask, remove_clip=remove_clip, remove_token_mean=remove_token_mean):
                with contextlib.redirect_stdout(io.StringIO()):
                    return mix.compute_token_on_off_policy_loss(
                        old_log_prob=x["old_logp"], log_prob=logp, advantages=x["advantages"], eos_mask=eos_mask,
                        cliprange=0.2, clip_upper_bound=1.0, prefix_mask=prefix_mask,
                        loss_remove_token_mean=remove_token_mean, loss_remove_clip=remove_clip, **strategy)
            logp = x["logp"].clone().requires_grad_(True)
            out = call(logp, x["mask"])
            out["pg_loss"].backward()
            per_token = _one_hot_per_token(
                lambda single: call(x["logp"], single, remove_token_mean=False)["pg_loss"], x["mask"])
            cases.append({
                "loss_remove_clip": remove_clip, "loss_remove_token_mean": remove_token_mean,
                "pg_loss": float(out["pg_loss"].detach()), "grad_logp": t2l(logp.grad),
                "per_token_loss": t2l(per_token),
                "on_pg_clipfrac": float(out["on_pg_clipfrac"]),
            })
    tlr = token_level_rewards(x["rewards"], x["mask"])
    index = np.array([f"prompt{g}" for g in GROUPS], dtype=object)
    advantages = {}
    for use_std in (False, True):
        adv, _ = core.compute_grpo_outcome_advantage(tlr, x["mask"], index, use_std=use_std)
        split, _ = mix.compute_grpo_outcome_advantage_split(tlr, x["mask"], index, ~x["off_policy"], use_std=use_std)
        advantages[f"grpo_use_std_{use_std}"] = t2l(adv[:, 0])
        advantages[f"grpo_split_use_std_{use_std}"] = t2l(split[:, 0])
    # the released script end to end: group advantage (all rows, no std) -> loss (no clip, sum / T)
    group_advantage, _ = core.compute_grpo_outcome_advantage(tlr, x["mask"], index, use_std=False)
    logp = x["logp"].clone().requires_grad_(True)
    with contextlib.redirect_stdout(io.StringIO()):
        out = mix.compute_token_on_off_policy_loss(
            old_log_prob=x["old_logp"], log_prob=logp, advantages=group_advantage, eos_mask=x["mask"],
            cliprange=0.2, clip_upper_bound=1.0, prefix_mask=prefix_mask, loss_remove_token_mean=True,
            loss_remove_clip=True, **strategy)
    out["pg_loss"].backward()
    pipeline = {"pg_loss": float(out["pg_loss"]), "grad_logp": t2l(logp.grad)}
    write(key, {
        "source": _source(key),
        "settings": {"cliprange": 0.2, "clip_upper_bound": 1.0, **strategy,
                     "released_script": "loss_remove_clip=True, loss_remove_token_mean=True, grpo_use_std=False, "
                                        "adv_estimator=grpo (all rows of the group), entropy_coeff=0.001"},
        "inputs": {k: t2l(v) if v.is_floating_point() else v.tolist() for k, v in x.items()},
        "cases": cases,
        "advantages": advantages,
        "released_script_pipeline": pipeline,
    })


# --------------------------------------------------------------------------------------------
# CHORD (Trinity-RFT)


def make_chord(refs: Path) -> None:
    folder = _folder(refs, "chord")

    class _Registry:
        def register_module(self, name):
            return lambda cls: cls

    class _PolicyLossFn:
        def __init__(self, backend: str = "verl") -> None:
            self.backend = backend

    _stub("trinity")
    _stub("trinity.algorithm")
    _stub("trinity.algorithm.policy_loss_fn")
    _stub("trinity.algorithm.policy_loss_fn.policy_loss_fn", POLICY_LOSS_FN=_Registry(), PolicyLossFn=_PolicyLossFn)
    _stub("trinity.algorithm.policy_loss_fn.ppo_policy_loss", PPOPolicyLossFn=None)
    _stub("trinity.algorithm.policy_loss_fn.sft_loss", SFTLossFn=None)
    _load(folder / "trinity/algorithm/utils.py", "trinity.algorithm.utils")
    chord = _load(folder / SOURCES["chord"]["files"]["mu"][0], "trinity_chord_policy_loss")

    schedules = []
    steps = sorted(set(range(0, 701, 25)) | {1, 199, 200, 201, 399, 400, 599, 600, 601})
    # the example config (mix_chord.yaml) and the values its comments give for CHORD-mu and CHORD-phi
    for warmup, decay, peak, valley in ((200, 400, 0.5, 0.02), (0, 200, 0.9, 0.05), (0, 0, 0.1, 0.1),
                                        (50, 0, 0.3, 0.1)):
        schedules.append({"warmup_steps": warmup, "decay_steps": decay, "mu_peak": peak, "mu_valley": valley,
                          "steps": steps,
                          "mu": [float(chord.mu_schedule_function(s, warmup, decay, peak, valley)) for s in steps]})

    x = shared_inputs(seed=23)
    phi = chord.phi_function(torch.exp(x["logp"]))
    sft = []
    for token_level in (True, False):
        logp = x["logp"].clone().requires_grad_(True)
        loss, _ = chord.SFTPhiLossFn(use_token_level_loss=token_level)(logp, x["mask"])
        loss.backward()
        sft.append({"use_token_level_loss": token_level, "loss": float(loss), "grad_logp": t2l(logp.grad)})
    write("chord", {
        "source": {**_source("chord"), "note": "the snapshot was too large to fetch whole: chord_policy_loss.py "
                   "was taken from the stored copy of the repository at this commit, trinity/algorithm/utils.py "
                   "(masked_mean) at b458e2c26ff13b2f538ecbc819a2e0a40e98fc73, the only stored version"},
        "schedules": schedules,
        "inputs": {"logp": t2l(x["logp"]), "mask": t2l(x["mask"])},
        "phi": t2l(phi),
        "sft_phi": sft,
    })


# --------------------------------------------------------------------------------------------
# CalibRL


def make_calibrl(refs: Path) -> None:
    folder = _folder(refs, "calibrl")
    core = _load_verl_module(folder, ".", SOURCES["calibrl"]["files"]["advantage"][0], "calibrl_core_algos")
    x = shared_inputs(seed=37)
    tlr = token_level_rewards(x["rewards"], x["mask"])
    pref_mask = x["off_policy"][:, None].expand(B, T) & (x["mask"] > 0)
    index = np.array([f"prompt{g}" for g in GROUPS], dtype=object)
    cases = []
    for norm_by_std in (False, True):
        random.seed(0)
        adv = core.compute_mix_grpo_outcome_advantage(
            tlr, x["mask"], pref_mask, x["old_logp"], index, norm_adv_by_std_in_grpo=norm_by_std,
            mixup_policy="random", mixup_ratio=1.0)
        case = {"norm_adv_by_std_in_grpo": norm_by_std, "advantages": t2l(adv["advantages"][:, 0]),
                "pass_sample_mask": adv["pass_sample_mask"][:, 0].tolist(),
                "pref_log_prob": t2l(adv["pref_log_prob"]), "keep_indices": list(adv["keep_indices"])}
        for point, start in (("at_old", x["old_logp"]), ("off_old", x["logp"])):
            logp = start.clone().requires_grad_(True)
            out = core.compute_mix_policy_loss(
                old_log_prob=x["old_logp"], log_prob=logp, pref_log_prob=adv["pref_log_prob"],
                advantages=adv["advantages"], response_mask=x["mask"], pref_mask=pref_mask,
                pass_sample_mask=adv["pass_sample_mask"], cliprange=0.2, clip_ratio_c=3.0,
                mix_policy_loss="expert-guided", loss_agg_mode="token-mean")
            total = out["pg_loss"] + 0.1 * out["guided_loss"]  # src/dp_actor.py: policy_loss + 0.1 * guided_loss
            total.backward()
            pg_grad = torch.autograd.grad(
                core.compute_mix_policy_loss(
                    old_log_prob=x["old_logp"], log_prob=logp, pref_log_prob=adv["pref_log_prob"],
                    advantages=adv["advantages"], response_mask=x["mask"], pref_mask=pref_mask,
                    pass_sample_mask=adv["pass_sample_mask"], cliprange=0.2, clip_ratio_c=3.0,
                    mix_policy_loss="expert-guided", loss_agg_mode="token-mean")["pg_loss"], logp)[0]
            case[point] = {"logp": t2l(start), "pg_loss": float(out["pg_loss"]),
                           "guided_loss": float(out["guided_loss"]), "total_loss": float(total),
                           "grad_logp": t2l(logp.grad), "pg_grad_logp": t2l(pg_grad)}
        cases.append(case)
    write("calibrl", {
        "source": _source("calibrl"),
        "settings": {"cliprange": 0.2, "clip_ratio_c": 3.0, "mix_policy_loss": "expert-guided",
                     "loss_agg_mode": "token-mean", "guided_weight": 0.1, "leaky_relu_slope": 0.5,
                     "pass_threshold": "score > 0.1",
                     "released_script": "norm_adv_by_std_in_grpo=False, loss_agg_mode=token-mean, entropy_coeff=0"},
        "inputs": {k: t2l(v) if v.is_floating_point() else v.tolist() for k, v in x.items()},
        "cases": cases,
    })


# --------------------------------------------------------------------------------------------
# GTPO


GTPO_IDS = [  # prompt 0: rollouts 0-3, prompt 1: rollouts 4-7; 0 is padding
    [1, 2, 3, 4, 5, 2],
    [1, 2, 4, 4, 5, 2],
    [1, 2, 4, 1, 0, 0],
    [1, 3, 4, 1, 5, 0],
    [2, 2, 3, 0, 0, 0],
    [2, 2, 3, 0, 0, 0],
    [3, 1, 2, 5, 5, 1],
    [2, 4, 1, 3, 0, 0],
]
GTPO_REWARDS = [[1.0, 0.0, 1.0, 0.0], [1.0, 0.0, 0.5, 0.5]]
GTPO_LOGIT_SCALE = [6.0, 4.0, 0.4, 6.0, 3.0, 5.0, 0.5, 4.0]  # rows 2 and 6 have high entropy


def _gtpo_namespace(path: Path) -> dict:
    """The module-level constants, functions and the autograd class of gtpo_training.py, without its
    trl/unsloth imports (none of them is used by these pieces)."""
    tree = ast.parse(path.read_text())
    wanted = {"ENT_THRESHOLD", "ENT_SCALE", "W_RAW", "PAD_ID", "EPS", "compute_completion_stats",
              "build_conflict_mask", "gtpo_compute_loss", "UnslothEfficientGTPO"}
    body = []
    for node in tree.body:
        names = set()
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names = {node.name}
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names = {node.target.id}
        elif isinstance(node, ast.Assign):
            names = {t.id for t in node.targets if isinstance(t, ast.Name)}
        if names & wanted:
            body.append(node)
    namespace = {"torch": torch, "Tuple": tuple, "wandb": types.SimpleNamespace(run=None), "np": np,
                 "print": lambda *a, **k: None, "__name__": "gtpo_official"}
    exec(compile(ast.Module(body=body, type_ignores=[]), str(path), "exec"), namespace)
    build_conflict_mask = namespace["build_conflict_mask"]

    def build_conflict_mask_float32(*args, **kwargs):
        # It mixes default-dtype constants into float32 buffers, so it only runs under the float32
        # default it was written for; its outputs (0/1/2/4 weights and counts) are exact either way.
        default = torch.get_default_dtype()
        torch.set_default_dtype(torch.float32)
        try:
            return build_conflict_mask(*args, **kwargs)
        finally:
            torch.set_default_dtype(default)

    namespace["build_conflict_mask"] = build_conflict_mask_float32  # forward() looks it up here too
    return namespace


def make_gtpo(refs: Path) -> None:
    folder = _folder(refs, "gtpo")
    ns = _gtpo_namespace(folder / SOURCES["gtpo"]["files"]["loss"][0])
    ns["PAD_ID"] = 0  # the official value (128004) is a Llama-3 id; our toy vocabulary pads with 0
    n_prompts, group, length, vocab = 2, 4, T, 6
    ids = torch.tensor(GTPO_IDS)
    mask = (ids != 0).to(torch.float64)
    int_mask = (ids != 0).long()  # TRL's completion_mask is an integer tensor (build_conflict_mask needs it)
    gen = torch.Generator().manual_seed(53)
    logits = torch.randn(B, length + 1, vocab, generator=gen, dtype=torch.float64)
    logits = logits * torch.tensor(GTPO_LOGIT_SCALE, dtype=torch.float64)[:, None, None]
    rewards = torch.tensor(GTPO_REWARDS, dtype=torch.float64)
    advantages = rewards - rewards.mean(dim=1, keepdim=True)  # _prepare_inputs: rewards - group mean (no std)

    # intermediate values, from the same official functions forward() calls
    entropies = torch.zeros(n_prompts, group)
    deltas, n_conflicts, conflicts = [], [], []
    for b in range(n_prompts):
        rows = slice(b * group, (b + 1) * group)
        for g in range(group):
            i = b * group + g
            entropies[b, g], _ = ns["compute_completion_stats"](logits[i, :-1], logits[i, :-1], ids[i], int_mask[i])
        delta, conflict, n_conflict = ns["build_conflict_mask"](
            ids[rows], int_mask[rows], advantages[b] > 0, advantages[b] < 0, vocab)
        deltas.append(delta)
        conflicts.append(conflict)
        n_conflicts.append(n_conflict)
    shaped = torch.where(entropies <= ns["ENT_THRESHOLD"], advantages - ns["ENT_SCALE"] * entropies,
                         torch.zeros_like(advantages))

    # the loss and its gradient through the official autograd Function; hidden states = logits, lm_head = I
    compile_fn = torch.compile
    torch.compile = lambda *args, **kwargs: args[0] if args and callable(args[0]) else (lambda fn: fn)
    try:
        hidden = logits.view(n_prompts, group, length + 1, vocab).clone().requires_grad_(True)
        loss, _, _ = ns["UnslothEfficientGTPO"].apply(
            hidden, hidden.detach().clone(), torch.eye(vocab, dtype=torch.float64), ids.view(n_prompts, group, length),
            int_mask.view(n_prompts, group, length), advantages, rewards, 0.0, None, 1)
        loss.sum().backward()
    finally:
        torch.compile = compile_fn
    grad_logits = hidden.grad.view(B, length + 1, vocab)[:, :-1]
    log_softmax = torch.log_softmax(logits[:, :-1], dim=-1)
    logp = log_softmax.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    # the loss depends on the logits only through logp of the chosen token: dL/dlogits = g·(onehot − softmax)
    prob = log_softmax.exp()
    chosen = prob.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    grad_logp = grad_logits.gather(-1, ids.unsqueeze(-1)).squeeze(-1) / (1 - chosen)
    rebuilt = grad_logp.unsqueeze(-1) * (torch.nn.functional.one_hot(ids, vocab) - prob)
    assert torch.allclose(rebuilt, grad_logits, rtol=1e-9, atol=1e-12), "gradient is not through logp alone"
    # per-token entropy as compute_completion_stats computes it (its mean over the row is what it returns)
    token_entropy = -(prob * torch.log(prob.clamp_min(ns["EPS"]))).sum(-1)

    write("gtpo", {
        "source": _source("gtpo"),
        "settings": {"ENT_THRESHOLD": ns["ENT_THRESHOLD"], "ENT_SCALE": ns["ENT_SCALE"], "W_RAW": ns["W_RAW"],
                     "PAD_ID": "0 here (patched; 128004 upstream)", "aggregation": "sum over completions of "
                     "(token mean of -A*delta*ratio) / n_conflict"},
        "inputs": {"token_ids": ids.tolist(), "mask": t2l(mask), "rewards": t2l(rewards.reshape(-1)),
                   "group_ids": [b for b in range(n_prompts) for _ in range(group)],
                   "logp": t2l(logp), "entropy": t2l(token_entropy)},
        "advantages_raw": t2l(advantages.reshape(-1)),
        "completion_entropy": t2l(entropies.reshape(-1)),
        "advantages_shaped": t2l(shaped.reshape(-1)),
        "delta": t2l(torch.cat(deltas)),
        "conflict": t2l(torch.cat(conflicts)),
        "n_conflict": torch.cat(n_conflicts).tolist(),
        "loss": float(loss.sum()),
        "grad_logp": t2l(grad_logp * mask),
    })


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--refs", type=Path, default=Path("/tmp/ref"))
    args = parser.parse_args()
    torch.set_default_dtype(torch.float64)
    _framework_stubs()
    make_verl_hybrid(args.refs, "luffy", "luffy/verl", {"off_cliprange": 0.2, "off_policy_reshape": "p_div_p_0.1"})
    make_verl_hybrid(args.refs, "rl_plus", "rl_plus/verl", {"off_policy_strategy": "RL-PLUS"})
    make_chord(args.refs)
    make_calibrl(args.refs)
    make_gtpo(args.refs)


if __name__ == "__main__":
    main()
