"""Tests of unipo.core.advantages: hand-computed cases, plain-loop float64 references, gradchecks,
analytic GAE ground truth and hypothesis properties. Every registered name is parametrized, so a
new estimator without a hand case, a reference and case parameters fails here."""

from __future__ import annotations

import math
import random
from collections import defaultdict

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from unipo.core import advantages
from unipo.core.advantages import (
    ADVANTAGE_ESTIMATORS,
    compute_advantages,
    gae_returns,
    value_tracker_mean,
    value_tracker_update,
)

F64 = torch.float64
EPS = 1e-6
# Names registered by this module; other modules (e.g. hybrid's calibrl) test their own entries.
NAMES = sorted(name for name, fn in ADVANTAGE_ESTIMATORS.items() if fn.__module__ == advantages.__name__)
NOT_GROUP_RELATIVE = {"gae", "single_stream"}  # no group baseline: the group properties do not apply
ENTROPY_SHAPED = {"gtpo"}  # A − 0.1·H̄: a constant group is not 0 by design
GROUP_NAMES = [name for name in NAMES if name not in NOT_GROUP_RELATIVE | ENTROPY_SHAPED]
T = 3  # tokens per row in token-level cases


# ------------------------------------------------------------------------------------------
# Plain-loop float64 references (independent of the vectorised code)
# ------------------------------------------------------------------------------------------


def _members(ids: list[int]) -> dict[int, list[int]]:
    rows: dict[int, list[int]] = defaultdict(list)
    for i, key in enumerate(ids):
        rows[key].append(i)
    return rows


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def _std(xs: list[float]) -> float:
    if len(xs) < 2:
        return 0.0
    m = _mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def _standardised(r: list[float], rows: list[int], eps: float = EPS) -> dict[int, float]:
    xs = [r[i] for i in rows]
    if len(set(xs)) == 1:
        return {i: 0.0 for i in rows}
    m, s = _mean(xs), _std(xs)
    return {i: (r[i] - m) / (s + eps) for i in rows}


def ref_grpo(r, ids, p):
    out = [0.0] * len(r)
    for rows in _members(ids).values():
        for i, a in _standardised(r, rows).items():
            out[i] = a
    return out


def ref_dr_grpo(r, ids, p):
    out = [0.0] * len(r)
    for rows in _members(ids).values():
        xs = [r[i] for i in rows]
        for i in rows:
            out[i] = 0.0 if len(set(xs)) == 1 else r[i] - _mean(xs)
    return out


def ref_rloo(r, ids, p):
    out = [0.0] * len(r)
    for rows in _members(ids).values():
        for i in rows:
            others = [r[j] for j in rows if j != i]
            out[i] = r[i] - _mean(others) if others and len({r[j] for j in rows}) > 1 else 0.0
    return out


def ref_reinforce_pp(r, ids, p):
    x = ref_dr_grpo(r, ids, p)
    m, s = _mean(x), _std(x)
    return [(v - m) / (s + EPS) for v in x]


def ref_bnpo(r, ids, p):
    groups = _members(ids)
    means = {g: _mean([r[i] for i in rows]) for g, rows in groups.items()}
    fitted = [means[g] for g, rows in groups.items() if len(rows) > 1]
    a_n = b_n = 1.0
    if len(fitted) >= 2 and _std(fitted) > 0:
        m, v = _mean(fitted), _std(fitted) ** 2
        common = m * (1 - m) / v - 1
        a_n, b_n = max(1.0, 1 + m * common / 3), max(1.0, 1 + (1 - m) * common / 3)

    def xlogy(a: float, x: float) -> float:
        return 0.0 if a == 0 else (a * math.log(x) if x > 0 else -math.inf)

    out = [0.0] * len(r)
    for g, rows in groups.items():
        if len({r[i] for i in rows}) == 1:
            continue
        q = means[g]
        log_beta_fn = math.lgamma(a_n) + math.lgamma(b_n) - math.lgamma(a_n + b_n)
        log_pdf = xlogy(a_n - 1, q) + xlogy(b_n - 1, 1 - q) - log_beta_fn
        weight = min(math.exp(-log_pdf), 1e6)
        for i in rows:
            out[i] = (r[i] - q) * weight
    return out


def ref_stratified(r, ids, p):
    out = [0.0] * len(r)
    strata = p["strata"].tolist()
    for rows in _members(ids).values():
        overall = _standardised(r, rows)
        for k in {strata[i] for i in rows}:
            within = _standardised(r, [i for i in rows if strata[i] == k])
            for i, a in within.items():
                out[i] = p["alpha"] * a + (1 - p["alpha"]) * overall[i]
    return out


def ref_seed_grpo(r, ids, p):
    base = ref_grpo(r, ids, p)
    answers = p["answer_ids"].tolist()
    out = [0.0] * len(r)
    for rows in _members(ids).values():
        n = len(rows)
        counts: dict[int, int] = defaultdict(int)
        for i in rows:
            counts[answers[i]] += 1
        entropy = -sum(c / n * math.log(c / n) for c in counts.values())
        scale = 1 - p["alpha"] * entropy / math.log(n) if n > 1 else 1.0
        for i in rows:
            out[i] = base[i] * scale
    return out


def _on_policy_stats(r, ids, p):
    """r − mean (/ std) with the statistics over each group's on-policy rows (a zero std counts as 1);
    0 on the on-policy rows of a group with one on-policy value and on every row of a constant group."""
    on = [not flag for flag in p["off_policy"].tolist()]
    out = [0.0] * len(r)
    for rows in _members(ids).values():
        xs = [r[i] for i in rows if on[i]]
        m = _mean(xs) if xs else 0.0
        s = _std(xs) if p.get("norm_by_std") else 0.0
        for i in rows:
            if len({r[j] for j in rows}) == 1 or (on[i] and len(set(xs)) == 1):
                continue
            out[i] = (r[i] - m) / ((s if s > 0 else 1.0) + EPS) if p.get("norm_by_std") else r[i] - m
    return out


def ref_rl_plus_explore(r, ids, p):
    if p.get("on_policy_stats") and p.get("off_policy") is not None:
        base = _on_policy_stats(r, ids, p)
    else:
        base = ref_grpo(r, ids, p) if p.get("norm_by_std") else ref_dr_grpo(r, ids, p)
    logp, mask = p["logp"].tolist(), p["mask"].tolist()
    rows = p["off_policy"].tolist() if p.get("off_policy") is not None else [a > 0 for a in base]
    out = []
    for i, a in enumerate(base):
        line = []
        for t, lp in enumerate(logp[i]):
            weight = (1 - math.exp(lp)) ** p["gamma"] if rows[i] else 1.0
            line.append(a * weight * float(mask[i][t]))
        out.append(line)
    return out


def ref_gtpo(r, ids, p):
    base = ref_grpo(r, ids, p) if p.get("norm_by_std") else ref_dr_grpo(r, ids, p)
    entropy, mask = p["entropy"].tolist(), p["mask"].tolist()
    scale, threshold = p.get("entropy_scale", 0.1), p.get("entropy_threshold", 0.7)
    out = []
    for i, a in enumerate(base):
        valid = [h for h, m in zip(entropy[i], mask[i]) if m]
        mean_entropy = sum(valid) / len(valid) if valid else 0.0
        out.append(0.0 if threshold is not None and mean_entropy > threshold else a - scale * mean_entropy)
    return out


def ref_a_star(r, ids, p):
    ref_r = p["ref_rewards"].tolist() if "ref_rewards" in p else r
    ref_ids = p["ref_group_ids"].tolist() if "ref_rewards" in p else ids
    beta = p["beta"]
    out = []
    for i, key in enumerate(ids):
        samples = [ref_r[j] for j in range(len(ref_r)) if ref_ids[j] == key]
        v_star = beta * math.log(sum(math.exp(x / beta) for x in samples) / len(samples))
        out.append(r[i] - v_star)
    return out


def ref_single_stream(r, ids, p):
    x = [ri - bi for ri, bi in zip(r, p["baseline"].tolist())]
    m, s = _mean(x), _std(x)
    return [(v - m) / (s + EPS) for v in x]


def ref_gae(r, ids, p):
    values, mask = p["values"].tolist(), p["mask"].tolist()
    gamma, lam = p.get("gamma", 1.0), p.get("lam", 1.0)
    out = []
    for b, row_values in enumerate(values):
        valid = [t for t, m in enumerate(mask[b]) if m]
        token_r = list(r[b]) if isinstance(r[b], list) else [0.0] * len(row_values)
        if not isinstance(r[b], list) and valid:
            token_r[valid[-1]] = r[b]
        line = [0.0] * len(row_values)
        next_value, running = 0.0, 0.0
        for t in reversed(valid):
            running = token_r[t] + gamma * next_value - row_values[t] + gamma * lam * running
            line[t], next_value = running, row_values[t]
        out.append(line)
    return out


REFERENCES = {
    "grpo": ref_grpo,
    "dr_grpo": ref_dr_grpo,
    "rloo": ref_rloo,
    "reinforce_pp": ref_reinforce_pp,
    "bnpo": ref_bnpo,
    "stratified": ref_stratified,
    "seed_grpo": ref_seed_grpo,
    "rl_plus_explore": ref_rl_plus_explore,
    "gtpo": ref_gtpo,
    "a_star": ref_a_star,
    "single_stream": ref_single_stream,
    "gae": ref_gae,
}


# ------------------------------------------------------------------------------------------
# Case factories
# ------------------------------------------------------------------------------------------


def _params_for(name: str, batch: int, gen: torch.Generator, dtype: torch.dtype = F64) -> dict:
    """Params an estimator needs for a batch of `batch` rows (KeyError for an unknown name: add it)."""
    keys = lambda high: torch.randint(0, high, (batch,), generator=gen)  # noqa: E731
    probs = torch.rand(batch, T, generator=gen, dtype=dtype) * 0.98 + 0.01
    mask = torch.rand(batch, T, generator=gen) > 0.3
    factories = {
        "grpo": lambda: {},
        "dr_grpo": lambda: {},
        "rloo": lambda: {},
        "reinforce_pp": lambda: {},
        "bnpo": lambda: {},
        "stratified": lambda: {"strata": keys(2), "alpha": 0.3},
        "seed_grpo": lambda: {"answer_ids": keys(3), "alpha": 0.6},
        "rl_plus_explore": lambda: {"logp": probs.log(), "mask": mask, "gamma": 0.5,
                                    "off_policy": torch.rand(batch, generator=gen) > 0.5,
                                    "norm_by_std": bool(torch.rand(1, generator=gen) > 0.5),
                                    "on_policy_stats": bool(torch.rand(1, generator=gen) > 0.5)},
        "gtpo": lambda: {"entropy": torch.rand(batch, T, generator=gen, dtype=dtype) * 1.2, "mask": mask,
                         **({"entropy_threshold": None, "norm_by_std": True, "entropy_scale": 0.3}
                            if bool(torch.rand(1, generator=gen) > 0.5) else {})},
        "a_star": lambda: {"beta": 0.7},
        "single_stream": lambda: {"baseline": torch.rand(batch, generator=gen, dtype=dtype)},
        "gae": lambda: {"values": torch.randn(batch, T, generator=gen, dtype=dtype), "mask": mask,
                        "gamma": 0.9, "lam": 0.8},
    }
    return factories[name]()


def _random_case(name: str, seed: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    sizes = [rng.randint(1, 5) for _ in range(rng.randint(1, 4))]
    group_ids = torch.tensor([7 * g + 3 for g, size in enumerate(sizes) for _ in range(size)])
    group_ids = group_ids[torch.randperm(len(group_ids), generator=gen)]  # groups need not be contiguous
    batch = len(group_ids)
    if name == "bnpo" or rng.random() < 0.5:  # small value sets make ties and constant groups common
        choices = [0.0, 1.0] if name == "bnpo" else [0.0, 0.5, 1.0, 2.0]
        rewards = torch.tensor([rng.choice(choices) for _ in range(batch)], dtype=F64)
    else:
        rewards = torch.randn(batch, generator=gen, dtype=F64)
    return rewards, group_ids, _params_for(name, batch, gen)


def _expected(name: str, rewards: torch.Tensor, group_ids: torch.Tensor, params: dict) -> torch.Tensor:
    return torch.tensor(REFERENCES[name](rewards.tolist(), group_ids.tolist(), params), dtype=F64)


# ------------------------------------------------------------------------------------------
# Hand-computed cases: (rewards, group_ids, params, expected)
# ------------------------------------------------------------------------------------------

_SQRT3 = math.sqrt(3)
HAND_CASES = {
    # group 0 = [1, 0, 0, 1]: mean 0.5, unbiased std sqrt(4 * 0.25 / 3) = sqrt(1/3); group 1 has one row.
    "grpo": ([1.0, 0.0, 0.0, 1.0, 5.0], [0, 0, 0, 0, 1], {},
             [0.5 / (math.sqrt(1 / 3) + EPS), -0.5 / (math.sqrt(1 / 3) + EPS),
              -0.5 / (math.sqrt(1 / 3) + EPS), 0.5 / (math.sqrt(1 / 3) + EPS), 0.0]),
    # group 0 = [1, 0, 0]: mean 1/3; group 1 has one row.
    "dr_grpo": ([1.0, 0.0, 0.0, 3.0], [0, 0, 0, 1], {}, [2 / 3, -1 / 3, -1 / 3, 0.0]),
    # 1 - (0 + 0)/2 = 1; 0 - (1 + 0)/2 = -0.5 (twice); group of one -> 0.
    "rloo": ([1.0, 0.0, 0.0, 3.0], [0, 0, 0, 1], {}, [1.0, -0.5, -0.5, 0.0]),
    # centred x = [0.5, -0.5, 0, 0]; batch std = sqrt((0.25 + 0.25) / 3) = sqrt(1/6).
    "reinforce_pp": ([1.0, 0.0, 2.0, 2.0], [0, 0, 1, 1], {},
                     [0.5 / (math.sqrt(1 / 6) + EPS), -0.5 / (math.sqrt(1 / 6) + EPS), 0.0, 0.0]),
    # p = [0.5, 0.75, 0.25]: mean 0.5, var 0.0625, m(1-m)/v - 1 = 3, a = b = 1.5 -> a_N = b_N = 1.5.
    # Beta(1.5, 1.5) pdf = (8/pi) sqrt(p(1-p)): 1/f(0.5) = pi/4, 1/f(0.25) = 1/f(0.75) = pi/(2 sqrt 3).
    "bnpo": ([1.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0], [0, 0, 1, 1, 1, 1, 2, 2, 2, 2], {},
             [math.pi / 8, -math.pi / 8] + [0.25 * math.pi / (2 * _SQRT3)] * 3 + [-0.75 * math.pi / (2 * _SQRT3)]
             + [-0.25 * math.pi / (2 * _SQRT3)] * 3 + [0.75 * math.pi / (2 * _SQRT3)]),
    # group [1, 0, 1, 1]: mean .75, std .5 -> A_GN = [.5, -1.5, .5, .5]; stratum 0 = [1, 0]: std sqrt(.5)
    # -> A_SAN = [+-.5/sqrt(.5)], stratum 1 = [1, 1] constant -> 0; blend alpha = .5.
    "stratified": ([1.0, 0.0, 1.0, 1.0], [0, 0, 0, 0], {"strata": torch.tensor([0, 0, 1, 1]), "alpha": 0.5},
                   [0.5 * 0.5 / (math.sqrt(0.5) + EPS) + 0.5 * 0.25 / (0.5 + EPS),
                    -0.5 * 0.5 / (math.sqrt(0.5) + EPS) - 0.5 * 0.75 / (0.5 + EPS),
                    0.5 * 0.25 / (0.5 + EPS), 0.5 * 0.25 / (0.5 + EPS)]),
    # grpo = +-0.5/sqrt(1/3); answers {7: 2, 3: 1, 5: 1}: SE = 1.5 ln 2, SE_max = ln 4 -> scale 1 - .5 * .75.
    "seed_grpo": ([1.0, 1.0, 0.0, 0.0, 2.0], [0, 0, 0, 0, 1],
                  {"answer_ids": torch.tensor([7, 7, 3, 5, 1]), "alpha": 0.5},
                  [0.625 * 0.5 / (math.sqrt(1 / 3) + EPS)] * 2 + [-0.625 * 0.5 / (math.sqrt(1 / 3) + EPS)] * 2 + [0.0]),
    # r - mean = +-0.5 (the authors' script: no std); row 0 is positive: weights sqrt(1 - .75) = .5
    # and sqrt(1 - .19) = .9.
    "rl_plus_explore": ([1.0, 0.0], [0, 0],
                        {"logp": torch.tensor([[0.75, 0.19], [0.5, 0.5]], dtype=F64).log(),
                         "mask": torch.tensor([[1, 1], [1, 0]]), "gamma": 0.5},
                        [[0.5 * 0.5, 0.9 * 0.5], [-0.5, 0.0]]),
    # group [1, 0, 0]: r - mean = [2/3, -1/3, -1/3]; mean entropies [.3, .5, .9]: row 2 is above 0.7 -> 0;
    # group [1, 1] is constant: 0 - 0.1 * [.2, .4].
    "gtpo": ([1.0, 0.0, 0.0, 1.0, 1.0], [0, 0, 0, 1, 1],
             {"entropy": torch.tensor([[0.2, 0.4], [0.5, 9.0], [0.9, 0.9], [0.2, 0.2], [0.4, 0.4]], dtype=F64),
              "mask": torch.tensor([[1, 1], [1, 0], [1, 1], [1, 1], [1, 1]])},
             [2 / 3 - 0.03, -1 / 3 - 0.05, 0.0, -0.02, -0.04]),
    # beta = 1: V*(g0) = log((e + 1)/2); constant group g1 -> V* = 2 -> 0.
    "a_star": ([1.0, 0.0, 2.0, 2.0], [0, 0, 1, 1], {"beta": 1.0},
               [1 - math.log((math.e + 1) / 2), -math.log((math.e + 1) / 2), 0.0, 0.0]),
    # x = r - v = [.5, -.5, .25, -.25]: mean 0, std sqrt(.625 / 3).
    "single_stream": ([1.0, 0.0, 1.0, 0.0], [0, 1, 2, 3],
                      {"baseline": torch.tensor([0.5, 0.5, 0.75, 0.25], dtype=F64)},
                      [x / (math.sqrt(0.625 / 3) + EPS) for x in (0.5, -0.5, 0.25, -0.25)]),
    # gamma = lam = .5, reward 1 on the last valid token. Row 0, V = [.2, .4, .8]: delta = [0, 0, .2]
    # -> A2 = .2, A1 = .25 * .2 = .05, A0 = .25 * .05. Row 1 skips the hole: V = [.2, -, .8]
    # -> A2 = .2, A0 = (.5 * .8 - .2) + .25 * .2 = .25. Row 2 is all masked.
    "gae": ([1.0, 1.0, 1.0], [0, 0, 0],
            {"values": torch.tensor([[0.2, 0.4, 0.8], [0.2, 9.0, 0.8], [1.0, 1.0, 1.0]], dtype=F64),
             "mask": torch.tensor([[1, 1, 1], [1, 0, 1], [0, 0, 0]]), "gamma": 0.5, "lam": 0.5},
            [[0.0125, 0.05, 0.2], [0.25, 0.0, 0.2], [0.0, 0.0, 0.0]]),
}


# ------------------------------------------------------------------------------------------
# Per-name tests
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_hand_computed_case(name: str) -> None:
    if name not in HAND_CASES:
        pytest.fail(f"no hand-computed case for advantage estimator {name!r}")
    rewards, group_ids, params, expected = HAND_CASES[name]
    got = compute_advantages(name, torch.tensor(rewards, dtype=F64), torch.tensor(group_ids), **params)
    torch.testing.assert_close(got, torch.tensor(expected, dtype=F64), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_matches_loop_reference_on_random_inputs(name: str) -> None:
    if name not in REFERENCES:
        pytest.fail(f"no loop reference for advantage estimator {name!r}")
    for seed in range(25):
        rewards, group_ids, params = _random_case(name, seed)
        got = compute_advantages(name, rewards, group_ids, **params)
        torch.testing.assert_close(got, _expected(name, rewards, group_ids, params), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_non_finite_rewards_raise(name: str) -> None:
    rewards, group_ids, params = _random_case(name, seed=0)
    for bad in (math.nan, math.inf):
        rewards[0] = bad
        with pytest.raises(ValueError, match="non-finite"):
            compute_advantages(name, rewards, group_ids, **params)


def test_check_finite_false_skips_the_check() -> None:
    rewards = torch.tensor([1.0, math.nan, 0.0, 1.0])
    out = compute_advantages("dr_grpo", rewards, torch.tensor([0, 0, 1, 1]), check_finite=False)
    assert out.shape == (4,)


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="unknown advantage estimator 'nope'.*grpo.*rloo"):
        compute_advantages("nope", torch.zeros(2), torch.zeros(2, dtype=torch.long))


def test_shape_mismatches_name_the_shapes() -> None:
    rewards = torch.zeros(4)
    with pytest.raises(ValueError, match=r"group_ids must be \[B\]=\[4\], got shape \[3\]"):
        compute_advantages("grpo", rewards, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"values\[4, 5\], mask\[4, 6\]"):
        compute_advantages(
            "gae", rewards, torch.zeros(4, dtype=torch.long), values=torch.zeros(4, 5), mask=torch.ones(4, 6)
        )
    with pytest.raises(ValueError, match=r"baseline must be \[B\]=\[4\], got shape \[2\]"):
        compute_advantages("single_stream", rewards, torch.zeros(4, dtype=torch.long), baseline=torch.zeros(2))
    with pytest.raises(ValueError, match=r"rewards must be \[B\], got shape \[4, 2\]"):
        compute_advantages("grpo", torch.zeros(4, 2), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="group_ids must be an integer tensor"):
        compute_advantages("grpo", rewards, torch.zeros(4))


# ------------------------------------------------------------------------------------------
# Gradients
# ------------------------------------------------------------------------------------------

GRAD_PARAMS = {
    "grpo": {},
    "dr_grpo": {},
    "rloo": {},
    "reinforce_pp": {},
    "stratified": {"strata": torch.tensor([0, 0, 1, 1, 1, 0, 0, 1, 1]), "alpha": 0.4},
    "a_star": {"beta": 0.5},
    "single_stream": {"baseline": torch.linspace(0.1, 0.9, 9, dtype=F64)},
}


@pytest.mark.parametrize("name", sorted(GRAD_PARAMS))
def test_gradcheck_wrt_rewards(name: str) -> None:
    gen = torch.Generator().manual_seed(3)
    rewards = torch.randn(9, generator=gen, dtype=F64, requires_grad=True)  # distinct: no constant group
    group_ids = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1, 1])
    assert torch.autograd.gradcheck(lambda r: compute_advantages(name, r, group_ids, **GRAD_PARAMS[name]), (rewards,))


def test_gradcheck_a_star_wrt_reference_rewards() -> None:
    rewards = torch.tensor([0.3, -0.2, 1.1], dtype=F64)
    ref = torch.tensor([0.5, 0.1, -0.4, 2.0, 0.0], dtype=F64, requires_grad=True)
    ref_ids = torch.tensor([4, 4, 9, 9, 9])
    def advantages(ref_rewards: torch.Tensor) -> torch.Tensor:
        return compute_advantages(
            "a_star", rewards, torch.tensor([4, 9, 9]), beta=0.3, ref_rewards=ref_rewards, ref_group_ids=ref_ids
        )

    assert torch.autograd.gradcheck(advantages, (ref,))


def test_gradcheck_gae_wrt_values_and_token_rewards() -> None:
    gen = torch.Generator().manual_seed(5)
    values = torch.randn(3, 4, generator=gen, dtype=F64, requires_grad=True)
    token_rewards = torch.randn(3, 4, generator=gen, dtype=F64, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 1, 1], [1, 1, 1, 1]])
    def advantages(rewards: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        group_ids = torch.zeros(3, dtype=torch.long)
        return compute_advantages("gae", rewards, group_ids, values=values, mask=mask, gamma=0.9, lam=0.7)

    assert torch.autograd.gradcheck(advantages, (token_rewards, values))


# ------------------------------------------------------------------------------------------
# Estimator-specific behaviour
# ------------------------------------------------------------------------------------------


def test_gae_lambda_one_gives_discounted_monte_carlo_returns() -> None:
    # SB3-style ground truth: with lam = 1 the returns A + V are the discounted reward-to-go for
    # any values; with a constant value c and one terminal reward R: A_t = gamma^(L-1-t) R - c.
    gamma, c, reward, length = 0.9, 0.7, 2.0, 5
    values = torch.full((1, 6), c, dtype=F64)
    mask = torch.tensor([[1] * length + [0]])
    adv = compute_advantages("gae", torch.tensor([reward], dtype=F64), torch.zeros(1, dtype=torch.long),
                             values=values, mask=mask, gamma=gamma, lam=1.0)
    expected = [gamma ** (length - 1 - t) * reward - c for t in range(length)] + [0.0]
    torch.testing.assert_close(adv, torch.tensor([expected], dtype=F64))
    torch.testing.assert_close(gae_returns(adv, values)[0, :length], torch.tensor(expected[:length], dtype=F64) + c)


def test_gae_lambda_zero_is_one_step_td_error() -> None:
    gen = torch.Generator().manual_seed(1)
    values, token_rewards = torch.randn(2, 4, generator=gen, dtype=F64), torch.randn(2, 4, generator=gen, dtype=F64)
    adv = compute_advantages("gae", token_rewards, torch.zeros(2, dtype=torch.long), values=values,
                             mask=torch.ones(2, 4), gamma=0.8, lam=0.0)
    next_values = torch.cat([values[:, 1:], torch.zeros(2, 1, dtype=F64)], dim=1)  # V after the last token is 0
    torch.testing.assert_close(adv, token_rewards + 0.8 * next_values - values)


def test_stratified_with_alpha_zero_is_grpo_and_one_is_grpo_per_stratum() -> None:
    rewards, group_ids, params = _random_case("stratified", seed=11)
    grpo = compute_advantages("grpo", rewards, group_ids)
    strata = params["strata"]
    torch.testing.assert_close(compute_advantages("stratified", rewards, group_ids, strata=strata, alpha=0.0), grpo)
    per_stratum = compute_advantages("grpo", rewards, group_ids * 10 + strata)
    torch.testing.assert_close(
        compute_advantages("stratified", rewards, group_ids, strata=strata, alpha=1.0), per_stratum
    )


def test_bnpo_degenerate_batch_falls_back_to_group_baseline_without_nan() -> None:
    # Every group of >= 2 has p = 0.5, so var(p) = 0: the Beta fit is undefined and f = 1 (A = r - p).
    # The group of one (p = 1) is left out of the fit and gets 0.
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0])
    out = compute_advantages("bnpo", rewards, torch.tensor([0, 0, 1, 1, 2, 2, 2, 2, 3]))
    torch.testing.assert_close(out, torch.tensor([0.5, -0.5, -0.5, 0.5, 0.5, -0.5, -0.5, 0.5, 0.0]))


def test_seed_grpo_all_answers_equal_keeps_grpo_and_all_distinct_scales_by_one_minus_alpha() -> None:
    rewards, group_ids = torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=F64), torch.zeros(4, dtype=torch.long)
    grpo = compute_advantages("grpo", rewards, group_ids)
    same = compute_advantages("seed_grpo", rewards, group_ids, answer_ids=torch.zeros(4, dtype=torch.long), alpha=0.8)
    distinct = compute_advantages("seed_grpo", rewards, group_ids, answer_ids=torch.arange(4), alpha=0.8)
    torch.testing.assert_close(same, grpo)
    torch.testing.assert_close(distinct, 0.2 * grpo)


def test_rl_plus_explore_weights_off_policy_rows_and_detaches_logp() -> None:
    logp = torch.tensor([[-0.1, -2.0], [-0.5, -0.3]], dtype=F64, requires_grad=True)
    rows = torch.tensor([False, True])  # the expert row here has the negative advantage
    params = {"logp": logp, "mask": torch.ones(2, 2), "gamma": 2.0, "off_policy": rows}
    rewards, group_ids = torch.tensor([1.0, 0.0], dtype=F64), torch.zeros(2, dtype=torch.long)
    out = compute_advantages("rl_plus_explore", rewards, group_ids, **params)
    expected = _expected("rl_plus_explore", rewards, group_ids, params)
    torch.testing.assert_close(out, expected)
    assert not out.requires_grad  # sg(pi): no gradient flows through the exploration weight


def test_a_star_with_reference_samples() -> None:
    # beta = 1: V*(g4) = log(mean(e^1, e^1)) = 1, V*(g9) = log(mean(e^0, e^0)) = 0.
    rewards, ref_rewards = torch.tensor([1.0, 0.0, 2.0, 2.0], dtype=F64), torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=F64)
    ids = torch.tensor([4, 4, 9, 9])
    out = compute_advantages("a_star", rewards, ids, beta=1.0, ref_rewards=ref_rewards, ref_group_ids=ids)
    torch.testing.assert_close(out, torch.tensor([0.0, -1.0, 2.0, 2.0], dtype=F64))
    with pytest.raises(ValueError, match="no reference rewards"):
        compute_advantages("a_star", torch.zeros(2), torch.tensor([4, 5]), beta=1.0,
                           ref_rewards=torch.zeros(2), ref_group_ids=torch.tensor([4, 4]))


def test_value_tracker_update_and_mean() -> None:
    # kl = 0 -> rho = 2^0 = 1, clipped to 0.96; kl = 0.06 -> rho = 0.5, clipped to 0.875.
    alpha, beta = value_tracker_update(torch.tensor([2.0, 1.0]), torch.tensor([2.0, 3.0]),
                                       torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.06]))
    torch.testing.assert_close(alpha, torch.tensor([0.96 * 2 + 1, 0.875 * 1]))
    torch.testing.assert_close(beta, torch.tensor([0.96 * 2, 0.875 * 3 + 1]))
    torch.testing.assert_close(value_tracker_mean(alpha, beta), torch.tensor([2.92 / 4.84, 0.875 / 4.5]))


# ------------------------------------------------------------------------------------------
# Properties
# ------------------------------------------------------------------------------------------

# 0.9 (float32) and 0.1, 0.7 (float64) in a group of 3 have a mean with a rounding residue.
_reward_values = st.sampled_from([0.0, 1.0, 0.5, -2.0, 0.1, 0.7, 0.9, 1e3, -1e-3])
_groups = st.lists(st.lists(_reward_values, min_size=1, max_size=6), min_size=1, max_size=5)


def _flatten(groups: list[list[float]], dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    rewards = torch.tensor([r for g in groups for r in g], dtype=dtype)
    group_ids = torch.tensor([i for i, g in enumerate(groups) for _ in g])
    return rewards, group_ids


@given(groups=_groups)
def test_zero_sum_within_each_group(groups: list[list[float]]) -> None:
    rewards, group_ids = _flatten(groups)
    for name in ("grpo", "dr_grpo", "rloo"):
        out = compute_advantages(name, rewards.double(), group_ids)
        sums = torch.zeros(len(groups), dtype=F64).index_add(0, group_ids, out)
        scale = 1.0 if name != "dr_grpo" and name != "rloo" else max(1.0, rewards.abs().max().item())
        torch.testing.assert_close(sums, torch.zeros_like(sums), rtol=0, atol=1e-9 * scale)


@given(
    groups=_groups,
    constant=st.lists(_reward_values, min_size=1, max_size=3),
    size=st.integers(1, 4),
    seed=st.integers(0, 99),
)
@example(groups=[[0.0, 1.0]], constant=[0.9, 0.1, 0.7], size=3, seed=0)
def test_constant_and_single_groups_get_exactly_zero(
    groups: list[list[float]], constant: list[float], size: int, seed: int
) -> None:
    # Constant groups of `size` rows (size 1 = a group of one) next to arbitrary groups.
    for dtype in (torch.float32, F64):
        rewards, group_ids = _flatten(groups + [[value] * size for value in constant], dtype)
        flat_rows = group_ids >= len(groups)
        for name in GROUP_NAMES:
            params = _params_for(name, len(rewards), torch.Generator().manual_seed(seed), dtype=dtype)
            out = compute_advantages(name, rewards, group_ids, **params)
            assert torch.isfinite(out).all(), name
            assert torch.equal(out[flat_rows], torch.zeros_like(out[flat_rows])), (name, dtype)
