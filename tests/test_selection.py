"""Token and sample selection (unipo.core.selection) against hand-computed cases and loop references.

Every name in SELECTIONS needs an entry in REFERENCES (a plain-Python float64 reference) and in
RANDOM_PARAMS (how to draw its params), or the registry test fails.
"""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from unipo.core.selection import (
    SELECTIONS,
    compute_selection,
    d3s_schedule,
    informative_groups,
    overlong_reward_penalty,
)

# --------------------------------------------------------------------------------------------
# loop references (plain Python, float64)


def exact_ceil(fraction: float, count: int) -> int:
    """ceil(fraction · count) in exact rational arithmetic (the decimal the user wrote)."""
    return math.ceil(Fraction(str(fraction)) * count)


def lists(batch):
    mask = [[bool(v) for v in row] for row in (batch["mask"] != 0).tolist()]
    adv = batch["advantages"].double().tolist()
    if batch["advantages"].dim() == 1:
        seq_adv, tok_adv = adv, [[a] * len(mask[0]) for a in adv]
    else:
        tok_adv = adv
        seq_adv = []
        for i, row in enumerate(adv):
            values = [a for a, m in zip(row, mask[i]) if m]
            seq_adv.append(sum(values) / len(values) if values else 0.0)
    return mask, seq_adv, tok_adv


def row_mean(values, mask_row):
    picked = [v for v, m in zip(values, mask_row) if m]
    return sum(picked) / len(picked) if picked else 0.0


def groups_of(group_ids):
    members = {}
    for i, g in enumerate(group_ids):
        members.setdefault(g, []).append(i)
    return members


def top_tokens(score, allowed, fraction):
    """Set of (i, t): the ceil(fraction·N) allowed tokens with largest score, ties row-major."""
    cells = [(i, t) for i in range(len(allowed)) for t in range(len(allowed[0])) if allowed[i][t]]
    cells.sort(key=lambda c: (-score[c[0]][c[1]], c[0], c[1]))
    return set(cells[: exact_ceil(fraction, len(cells))])


def ref_none(batch):
    mask, _, _ = lists(batch)
    return [[1.0 if m else 0.0 for m in row] for row in mask]


def ref_dynamic_sampling(batch):
    mask, _, _ = lists(batch)
    rewards, gids = batch["rewards"].tolist(), batch["group_ids"].tolist()
    out = []
    for i, row in enumerate(mask):
        distinct = {rewards[j] for j in range(len(gids)) if gids[j] == gids[i]}
        out.append([1.0 if (m and len(distinct) > 1) else 0.0 for m in row])
    return out


def ref_overlong_filter(batch, truncated):
    mask, _, _ = lists(batch)
    return [[1.0 if (m and not truncated[i]) else 0.0 for m in row] for i, row in enumerate(mask)]


def ref_high_entropy_tokens(batch, rho=0.2):
    mask, _, _ = lists(batch)
    keep = top_tokens(batch["entropy"].double().tolist(), mask, rho)
    return [[1.0 if (i, t) in keep else 0.0 for t in range(len(mask[0]))] for i in range(len(mask))]


def ref_cppo(batch, keep=0.5, scope="group"):
    mask, seq_adv, _ = lists(batch)
    kept_rows = set()
    groups = groups_of(batch["group_ids"].tolist()) if scope == "group" else {0: list(range(len(mask)))}
    for members in groups.values():
        k = min(keep, len(members)) if isinstance(keep, int) else exact_ceil(keep, len(members))
        ranked = sorted(members, key=lambda i: (-abs(seq_adv[i]), i))
        kept_rows.update(ranked[:k])
    return [[1.0 if (m and i in kept_rows) else 0.0 for m in row] for i, row in enumerate(mask)]


def population_variance(values):
    mean = sum(values) / len(values)
    return sum((v - mean) ** 2 for v in values) / len(values)


def brute_force_max_variance(members, values, k):
    """All size-k subsets; the max-variance ones (every subset within 1e-12 of the best)."""
    scored = [(population_variance([values[i] for i in c]), set(c)) for c in itertools.combinations(members, k)]
    best = max(v for v, _ in scored)
    return best, [s for v, s in scored if v >= best - 1e-12]


def ref_d3s(batch, sample_ratio=0.5, token_ratio=0.2, scope="group"):
    mask, seq_adv, tok_adv = lists(batch)
    gids = batch["group_ids"].tolist() if scope == "group" else [0] * len(mask)
    kept_rows = set()
    for members in groups_of(gids).values():
        _, best = brute_force_max_variance(members, seq_adv, exact_ceil(sample_ratio, len(members)))
        assert len(best) == 1, "reference needs a unique max-variance subset"
        kept_rows |= best[0]
    entropy = batch["entropy"].double().tolist()
    score = [[abs(tok_adv[i][t]) * entropy[i][t] for t in range(len(mask[0]))] for i in range(len(mask))]
    allowed = [[m and i in kept_rows for m in row] for i, row in enumerate(mask)]
    keep = top_tokens(score, allowed, token_ratio)
    return [[1.0 if (i, t) in keep else 0.0 for t in range(len(mask[0]))] for i in range(len(mask))]


def ref_gtpo(batch, token_ids, entropy_threshold=0.7, positive_conflict_weight=2.0, conflict_scope="runs",
             divide_by_conflicts=True, sign_from="rewards"):
    mask, seq_adv, _ = lists(batch)
    gids, tokens = batch["group_ids"].tolist(), token_ids.tolist()
    if sign_from == "rewards":  # r − group mean, 0 for a group of equal rewards
        rewards = batch["rewards"].double().tolist()
        sign = []
        for i in range(len(mask)):
            members = [rewards[j] for j in range(len(mask)) if gids[j] == gids[i]]
            sign.append(0.0 if len(set(members)) == 1 else rewards[i] - sum(members) / len(members))
    else:
        sign = seq_adv
    entropy = batch["entropy"].double().tolist() if batch["entropy"] is not None else None

    def place(j, t, from_end):  # position from the start, or number of later valid tokens
        return sum(mask[j][t + 1:]) if from_end else t

    def matches(i, t, from_end):
        same = [j for j in range(len(mask)) if gids[j] == gids[i] and any(
            mask[j][s] and tokens[j][s] == tokens[i][t] and place(j, s, from_end) == place(i, t, from_end)
            for s in range(len(mask[j])))]
        return any(sign[j] > 0 for j in same) and any(sign[j] < 0 for j in same)

    def run(i, from_end):
        order = [t for t, m in enumerate(mask[i]) if m]
        found = set()
        for t in (reversed(order) if from_end else order):
            if not matches(i, t, from_end):
                break
            found.add(t)
        return found

    out = []
    for i, row in enumerate(mask):
        if conflict_scope == "any":
            leading = {t for t, m in enumerate(row) if m and matches(i, t, False)}
            trailing = set()
        else:
            leading, trailing = run(i, False), run(i, True)
        conflicts = (leading | trailing) if sign[i] != 0 else set()
        weights = []
        for t, m in enumerate(row):
            if not m:
                weights.append(0.0)
            elif t in conflicts and sign[i] < 0:
                weights.append(0.0)
            elif t in conflicts and sign[i] > 0:
                weights.append(positive_conflict_weight ** ((t in leading) + (t in trailing)))
            else:
                weights.append(1.0)
        if divide_by_conflicts:
            weights = [w / max(len(conflicts), 1) for w in weights]
        if entropy_threshold is not None and row_mean(entropy[i], row) > entropy_threshold:
            weights = [0.0] * len(row)
        out.append(weights)
    return out


def ref_egsw(batch, alpha=0.1, temperature=1.0):
    mask, seq_adv, _ = lists(batch)
    entropy = batch["entropy"].double().tolist()
    sequence_weight = [0.0] * len(mask)
    for members in groups_of(batch["group_ids"].tolist()).values():
        live = [i for i in members if any(mask[i])]
        logits = {i: (seq_adv[i] + alpha * row_mean(entropy[i], mask[i])) / temperature for i in live}
        top = max(logits.values(), default=0.0)
        exps = {i: math.exp(z - top) for i, z in logits.items()}
        for i in live:
            sequence_weight[i] = len(live) * exps[i] / sum(exps.values())
    return [[sequence_weight[i] if m else 0.0 for m in row] for i, row in enumerate(mask)]


REFERENCES = {
    "none": ref_none,
    "dynamic_sampling": ref_dynamic_sampling,
    "overlong_filter": ref_overlong_filter,
    "high_entropy_tokens": ref_high_entropy_tokens,
    "cppo": ref_cppo,
    "d3s": ref_d3s,
    "gtpo": ref_gtpo,
    "egsw": ref_egsw,
}

# params drawn for the random comparison (the d3s ratio keeps >= 2 rows in groups of >= 2,
# so the max-variance subset is unique)
RANDOM_PARAMS = {
    "none": lambda b, g: [{}],
    "dynamic_sampling": lambda b, g: [{}],
    "overlong_filter": lambda b, g: [{"truncated": torch.rand(b, generator=g) < 0.3}],
    "high_entropy_tokens": lambda b, g: [{}, {"rho": 0.35}, {"rho": 1.0}],
    "cppo": lambda b, g: [{}, {"keep": 2}, {"keep": 0.75}, {"keep": 0.5, "scope": "batch"}],
    "d3s": lambda b, g: [{"sample_ratio": 0.6}, {"sample_ratio": 0.6, "token_ratio": 0.5, "scope": "batch"}],
    "gtpo": lambda b, g: [
        {"token_ids": torch.randint(0, 3, (b, 6), generator=g)},  # the authors' code
        {"token_ids": torch.randint(0, 2, (b, 6), generator=g)},
        {  # the paper's text, signs from the given advantages
            "token_ids": torch.randint(0, 3, (b, 6), generator=g),
            "conflict_scope": "any", "divide_by_conflicts": False, "sign_from": "advantages",
        },
        {
            "token_ids": torch.randint(0, 2, (b, 6), generator=g),
            "entropy_threshold": None,
            "positive_conflict_weight": 1.5,
            "conflict_scope": "any", "divide_by_conflicts": False, "sign_from": "advantages",
        },
        {
            "token_ids": torch.randint(0, 2, (b, 6), generator=g),
            "entropy_threshold": None, "positive_conflict_weight": 3.0, "sign_from": "advantages",
        },
    ],
    "egsw": lambda b, g: [{}, {"alpha": 0.7, "temperature": 0.5}],
}


def random_batch(seed: int, *, token_advantages: bool, float_mask: bool, batch: int = 12, length: int = 6):
    g = torch.Generator().manual_seed(seed)
    group_ids = torch.randint(0, 4, (batch,), generator=g) * 7 - 3  # arbitrary, non-contiguous ids
    mask = torch.rand(batch, length, generator=g) < 0.75
    mask[0] = False  # an all-masked row
    rewards = torch.randint(0, 3, (batch,), generator=g).double()
    shape = (batch, length) if token_advantages else (batch,)
    return {
        "mask": mask.double() if float_mask else mask,
        "rewards": rewards,
        "advantages": torch.randn(shape, generator=g, dtype=torch.float64),
        "entropy": torch.rand(batch, length, generator=g, dtype=torch.float64) * 1.4,
        "group_ids": group_ids,
    }, g


def select(name, batch, **params):
    return compute_selection(
        name,
        batch["mask"],
        rewards=batch["rewards"],
        advantages=batch["advantages"],
        entropy=batch["entropy"],
        group_ids=batch["group_ids"],
        **params,
    )


# --------------------------------------------------------------------------------------------
# registry-wide tests


def test_every_selection_has_a_reference():
    assert set(SELECTIONS) == set(REFERENCES) == set(RANDOM_PARAMS)


@pytest.mark.parametrize("name", sorted(SELECTIONS))
@pytest.mark.parametrize("seed", range(4))
def test_matches_loop_reference(name, seed):
    batch, g = random_batch(seed, token_advantages=seed % 2 == 1, float_mask=seed >= 2)
    for params in RANDOM_PARAMS[name](batch["mask"].shape[0], g):
        got = select(name, batch, **params)
        assert got.shape == batch["mask"].shape and got.dtype == torch.float64
        want = torch.tensor(REFERENCES[name](batch, **params), dtype=torch.float64)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=f"{name} {params}")


@pytest.mark.parametrize("name", sorted(SELECTIONS))
def test_zero_off_mask_nonnegative_and_detached(name):
    batch, g = random_batch(11, token_advantages=False, float_mask=False)
    batch["advantages"].requires_grad_(True)
    batch["entropy"].requires_grad_(True)
    for params in RANDOM_PARAMS[name](batch["mask"].shape[0], g):
        weights = select(name, batch, **params)
        assert not weights.requires_grad
        assert (weights[~batch["mask"]] == 0).all() and (weights >= 0).all()


@pytest.mark.parametrize("name", sorted(SELECTIONS))
def test_nan_input_rejected_unless_disabled(name):
    batch, g = random_batch(3, token_advantages=False, float_mask=False)
    params = RANDOM_PARAMS[name](batch["mask"].shape[0], g)[0]
    batch["entropy"][1, 1] = math.nan
    with pytest.raises(ValueError, match="non-finite"):
        select(name, batch, **params)
    batch["entropy"][1, 1] = 0.5
    batch["advantages"][2] = math.inf
    with pytest.raises(ValueError, match="non-finite"):
        select(name, batch, **params)
    compute_selection(  # the caller may opt out of the check
        name, batch["mask"], rewards=batch["rewards"], advantages=batch["advantages"], entropy=batch["entropy"],
        group_ids=batch["group_ids"], check_finite=False, **params,
    )


def test_shape_and_param_errors():
    batch, _ = random_batch(0, token_advantages=False, float_mask=False)
    with pytest.raises(ValueError, match="unknown selection 'nope'"):
        select("nope", batch)
    with pytest.raises(ValueError, match=r"unknown params \['rhoo'\]"):
        select("high_entropy_tokens", batch, rhoo=0.1)
    with pytest.raises(ValueError, match=r"needs the batch inputs \['token_ids'\]"):
        select("gtpo", batch)
    with pytest.raises(ValueError, match=r"rewards must be \[B\]"):
        select("none", {**batch, "rewards": batch["rewards"][:-1]})
    with pytest.raises(ValueError, match="shape mismatch"):
        select("none", {**batch, "advantages": batch["advantages"].unsqueeze(1).expand(-1, 3)})
    with pytest.raises(ValueError, match="group_ids must be an integer"):
        select("none", {**batch, "group_ids": batch["group_ids"].double()})
    with pytest.raises(ValueError, match="needs the token entropy"):
        select("high_entropy_tokens", {**batch, "entropy": None})
    with pytest.raises(ValueError, match="rho must be in"):
        select("high_entropy_tokens", batch, rho=1.5)
    with pytest.raises(ValueError, match="keep as a count"):
        select("cppo", batch, keep=0)
    with pytest.raises(ValueError, match="truncated must be a bool"):
        select("overlong_filter", batch, truncated=torch.zeros(12))
    with pytest.raises(ValueError, match="token_ids must be an integer"):
        select("gtpo", batch, token_ids=torch.zeros(12, 6))


# --------------------------------------------------------------------------------------------
# hand-computed cases

MASK = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 1]], dtype=torch.bool)
GROUPS = torch.tensor([5, 5, 9, 9])


def hand(name, rewards, advantages, entropy=None, **params):
    return compute_selection(
        name, MASK, rewards=rewards, advantages=advantages, entropy=entropy, group_ids=GROUPS, **params
    )


def test_hand_none_and_dynamic_sampling():
    rewards, adv = torch.tensor([1.0, 0.0, 1.0, 1.0]), torch.tensor([0.7, -0.7, 0.0, 0.0])
    assert hand("none", rewards, adv).tolist() == MASK.double().tolist()
    # group 5 rewards {1, 0} differ -> kept; group 9 rewards {1, 1} are equal -> dropped
    assert hand("dynamic_sampling", rewards, adv).tolist() == [[1, 1, 0], [1, 1, 1], [0, 0, 0], [0, 0, 0]]
    assert informative_groups(rewards, GROUPS).tolist() == [True, True, False, False]
    # a group of one is never informative
    assert informative_groups(torch.tensor([1.0, 0.0]), torch.tensor([0, 1])).tolist() == [False, False]


def test_hand_overlong_filter():
    rewards, adv = torch.zeros(4), torch.zeros(4)
    weights = hand("overlong_filter", rewards, adv, truncated=torch.tensor([False, True, False, False]))
    assert weights.tolist() == [[1, 1, 0], [0, 0, 0], [1, 0, 0], [1, 1, 1]]


def test_hand_high_entropy_tokens():
    # 9 valid tokens; ρ = 0.2 -> ceil(1.8) = 2 kept: the two largest entropies 0.9 (row 1, t=2)
    # and 0.8 (row 3, t=0). ρ = 0.3 -> ceil(2.7) = 3: the next largest is a tie at 0.5 between
    # (0,1) and (3,2); row-major order keeps (0,1).
    entropy = torch.tensor([[0.1, 0.5, 9.0], [0.2, 0.3, 0.9], [0.4, 9.0, 9.0], [0.8, 0.05, 0.5]])
    rewards, adv = torch.zeros(4), torch.zeros(4)
    kept = hand("high_entropy_tokens", rewards, adv, entropy).nonzero().tolist()
    assert kept == [[1, 2], [3, 0]]  # masked tokens (entropy 9.0) never count
    kept = hand("high_entropy_tokens", rewards, adv, entropy, rho=0.3).nonzero().tolist()
    assert kept == [[0, 1], [1, 2], [3, 0]]
    # 0.2 · 15 = 3.0000000000000004 in floating point, but exactly 3 tokens must be kept
    wide = torch.ones(3, 5, dtype=torch.bool)
    weights = compute_selection(
        "high_entropy_tokens", wide, rewards=torch.zeros(3), advantages=torch.zeros(3),
        entropy=torch.arange(15.0).reshape(3, 5), group_ids=torch.zeros(3, dtype=torch.long),
    )
    assert weights.sum() == 3 and weights[2, 2:].sum() == 3


def test_hand_cppo():
    # group 5: |A| = 0.7, 0.2 -> keep=1 keeps row 0; group 9: |A| = 0.1, 0.3 -> keeps row 3
    rewards, adv = torch.zeros(4), torch.tensor([0.7, -0.2, 0.1, -0.3])
    assert hand("cppo", rewards, adv, keep=1).tolist() == [[1, 1, 0], [0, 0, 0], [0, 0, 0], [1, 1, 1]]
    assert hand("cppo", rewards, adv, keep=5).tolist() == MASK.double().tolist()  # count larger than the group
    # fraction 0.5 of a group of 2 = 1 row; ties in |A| go to the lower row index
    tied = torch.tensor([0.4, -0.4, 0.1, 0.1])
    assert hand("cppo", rewards, tied, keep=0.5).tolist() == [[1, 1, 0], [0, 0, 0], [1, 0, 0], [0, 0, 0]]
    # scope="batch" (the authors' code): the 2 largest |A| of all 4 rows, wherever their group
    assert hand("cppo", rewards, adv, keep=0.5, scope="batch").tolist() == [[1, 1, 0], [0, 0, 0], [0, 0, 0],
                                                                           [1, 1, 1]]
    assert hand("cppo", rewards, tied, keep=0.5, scope="batch").tolist() == [[1, 1, 0], [1, 1, 1], [0, 0, 0],
                                                                            [0, 0, 0]]


def test_hand_d3s():
    # One group of 4 with A = [-1, 0, 0.1, 2]; keep ceil(0.5·4) = 2 rows with max variance:
    # {-1, 2} (variance 2.25) beats every other pair, e.g. {0.1, 2} (0.9025). Token level
    # (token_ratio 0.5 of the 5 valid tokens of rows 0 and 3 -> 3 tokens) by |A|·H:
    # row 0: 1·[0.5, 0.2] = [0.5, 0.2]; row 3: 2·[0.1, 0.4, 0.3] = [0.2, 0.8, 0.6]
    # -> keep (3,1) 0.8, (3,2) 0.6, (0,0) 0.5.
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 1]], dtype=torch.bool)
    entropy = torch.tensor([[0.5, 0.2, 0.0], [0.9, 0.9, 0.9], [0.9, 0.0, 0.0], [0.1, 0.4, 0.3]])
    weights = compute_selection(
        "d3s", mask, rewards=torch.zeros(4), advantages=torch.tensor([-1.0, 0.0, 0.1, 2.0]), entropy=entropy,
        group_ids=torch.zeros(4, dtype=torch.long), sample_ratio=0.5, token_ratio=0.5,
    )
    assert weights.tolist() == [[1, 0, 0], [0, 0, 0], [0, 0, 0], [0, 1, 1]]


def test_hand_gtpo():
    # Group 5: row 0 (A>0) tokens [7, 8, -], row 1 (A<0) tokens [7, 9, 8]. Position 0 holds 7 in
    # both -> conflict: positive row weight 2, negative row 0. Position 1: 8 vs 9, no conflict
    # (the 8 at row 1, t=2 is another position). Group 9: row 2 (A=0) and row 3 (A<0): no
    # positive row, no conflict. Row 3 has mean entropy 0.8 > 0.7 -> dropped.
    token_ids = torch.tensor([[7, 8, 0], [7, 9, 8], [7, 0, 0], [7, 8, 8]])
    entropy = torch.tensor([[0.1, 0.2, 5.0], [0.3, 0.3, 0.3], [0.1, 5.0, 5.0], [0.8, 0.8, 0.8]])
    # (The paper's text: conflicts anywhere, signs from the advantages, no division by the count.)
    weights = hand("gtpo", torch.zeros(4), torch.tensor([1.0, -1.0, 0.0, -0.5]), entropy, token_ids=token_ids,
                   conflict_scope="any", divide_by_conflicts=False, sign_from="advantages")
    assert weights.tolist() == [[2, 1, 0], [0, 1, 1], [1, 0, 0], [0, 0, 0]]


def test_hand_gtpo_authors_code():
    # Defaults = the authors' code: signs from r − group mean (the advantages given are ignored),
    # conflicts only in the leading run (same position) and the trailing run (same distance from
    # the last valid token), weight 2 per run on positive rows, 0 on negative rows, each row
    # divided by its number of conflict tokens.
    # Group 0, rewards [1, 0, 1]: rows 0, 2 positive, row 1 negative.
    #   row 0 [5, 6, 7]: leading {t0} (5 at 0 in row 1), trailing {t2} (last token 7 in row 1)
    #                    -> [2, 1, 2] / 2 conflicts = [1, .5, 1]
    #   row 1 [5, 8, 7]: leading {t0}, trailing {t2} -> [0, 1, 0] / 2 = [0, .5, 0]
    #   row 2 [9, 7]:    no leading run (9 vs 5); trailing {t1} (last 7, as row 1's last) -> [1, 2] / 1;
    #                    the paper's any-position rule would not match it (row 1 has 8 at t1)
    # Group 1, rewards [1, 0], identical [4, 4]: every token is in both runs -> 2·2 = 4 on the
    # positive row, / 2 conflicts = 2; 0 on the negative row.
    mask = torch.tensor([[1, 1, 1], [1, 1, 1], [1, 1, 0], [1, 1, 0], [1, 1, 0]], dtype=torch.bool)
    token_ids = torch.tensor([[5, 6, 7], [5, 8, 7], [9, 7, 0], [4, 4, 0], [4, 4, 0]])
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0])
    weights = compute_selection("gtpo", mask, rewards=rewards, advantages=torch.zeros(5), entropy=torch.zeros(5, 3),
                                group_ids=torch.tensor([0, 0, 0, 1, 1]), token_ids=token_ids)
    assert weights.tolist() == [[1, 0.5, 1], [0, 0.5, 0], [1, 2, 0], [2, 2, 0], [0, 0, 0]]


def test_hand_egsw():
    # α = 0 and T = 1: group 5 has A = [ln 3, 0] -> softmax [3/4, 1/4], times group size 2 -> [1.5, 0.5];
    # group 9 has A = [0, 0] -> [1, 1]. Weights in a group average 1.
    adv = torch.tensor([math.log(3.0), 0.0, 0.0, 0.0], dtype=torch.float64)
    weights = hand("egsw", torch.zeros(4), adv, torch.rand(4, 3, dtype=torch.float64), alpha=0.0)
    want = torch.tensor([[1.5, 1.5, 0], [0.5, 0.5, 0.5], [1, 0, 0], [1, 1, 1]], dtype=torch.float64)
    torch.testing.assert_close(weights, want)
    # α = 1: row 0 mean entropy (0.2 + 0.4)/2 = 0.3, row 1 0.3 -> the entropy terms cancel in group 5
    entropy = torch.tensor([[0.2, 0.4, 0.0], [0.3, 0.3, 0.3], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    weights = hand("egsw", torch.zeros(4), adv, entropy, alpha=1.0)
    # group 9: logits 1 and 0 -> 2·e/(e+1) and 2/(e+1)
    e = math.e
    want = [[1.5, 1.5, 0], [0.5, 0.5, 0.5], [2 * e / (e + 1), 0, 0], [2 / (e + 1)] * 3]
    torch.testing.assert_close(weights, torch.tensor(want, dtype=torch.float64))


def test_overlong_reward_penalty_hand_and_loop():
    # max 10, cache 4: 0 up to length 6, then (6 − L)/4, −1 from 10 on
    got = overlong_reward_penalty(torch.tensor([1, 6, 7, 8, 10, 12]), max_len=10, cache_len=4)
    assert got.tolist() == [0.0, 0.0, -0.25, -0.5, -1.0, -1.0]
    lengths = torch.randint(0, 40, (50,))
    want = [0.0 if n <= 20 else (-1.0 if n > 32 else (20 - n) / 12) for n in lengths.tolist()]
    got = overlong_reward_penalty(lengths.double(), 32, 12)
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64))
    with pytest.raises(ValueError):
        overlong_reward_penalty(lengths, max_len=4, cache_len=5)


def test_d3s_schedule():
    assert d3s_schedule(0, 100) == (0.5, 0.2)
    assert d3s_schedule(50, 100) == pytest.approx((0.75, 0.6))
    assert d3s_schedule(100, 100) == d3s_schedule(500, 100) == (1.0, 1.0)
    ends = dict(sample_ratio_start=0.2, sample_ratio_end=0.6, token_ratio_start=0.1, token_ratio_end=0.3)
    assert d3s_schedule(10, 20, **ends) == pytest.approx((0.4, 0.2))
    with pytest.raises(ValueError):
        d3s_schedule(-1, 10)
    with pytest.raises(ValueError):
        d3s_schedule(1, 10, sample_ratio_start=0.0)


# --------------------------------------------------------------------------------------------
# property tests


@st.composite
def grouped_rewards(draw):
    sizes = draw(st.lists(st.integers(1, 5), min_size=1, max_size=5))
    group_ids = [g for g, size in enumerate(sizes) for _ in range(size)]
    rewards = draw(st.lists(st.sampled_from([0.0, 0.5, 1.0]), min_size=len(group_ids), max_size=len(group_ids)))
    order = draw(st.permutations(range(len(group_ids))))  # rows of a group need not be adjacent
    return torch.tensor([rewards[i] for i in order]), torch.tensor([group_ids[i] for i in order])


@given(grouped_rewards())
def test_dynamic_sampling_keeps_exactly_the_non_constant_groups(data):
    rewards, group_ids = data
    mask = torch.ones(len(rewards), 2, dtype=torch.bool)
    weights = compute_selection(
        "dynamic_sampling", mask, rewards=rewards, advantages=torch.zeros(len(rewards)), group_ids=group_ids
    )
    for g in group_ids.unique():
        rows = group_ids == g
        kept = bool((weights[rows] == 1).all())
        assert kept == (len(set(rewards[rows].tolist())) > 1)
        assert kept or bool((weights[rows] == 0).all())


@given(
    st.integers(1, 8), st.integers(1, 8), st.sampled_from([0.0, 0.05, 0.1, 0.2, 1 / 3, 0.5, 0.9, 1.0]),
    st.integers(0, 2**31 - 1), st.booleans(),
)
def test_high_entropy_tokens_keeps_ceil_rho_n_highest(batch, length, rho, seed, coarse):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(batch, length, generator=g) < 0.7
    entropy = torch.rand(batch, length, generator=g)
    if coarse:  # many exact ties
        entropy = (entropy * 3).floor() / 3
    weights = compute_selection(
        "high_entropy_tokens", mask, rewards=torch.zeros(batch), advantages=torch.zeros(batch), entropy=entropy,
        group_ids=torch.zeros(batch, dtype=torch.long), rho=rho,
    )
    kept = weights > 0
    n_valid = int(mask.sum())
    assert int(kept.sum()) == exact_ceil(rho, n_valid)  # ceil(ρ·N), never floor
    assert not (kept & ~mask).any()
    if kept.any() and (mask & ~kept).any():  # every kept token is at least as uncertain as every dropped one
        assert entropy[kept].min() >= entropy[mask & ~kept].max()


@given(
    grouped_rewards(),
    st.one_of(st.integers(1, 6), st.sampled_from([0.1, 0.25, 0.5, 0.6, 1.0])),
    st.integers(0, 2**31 - 1),
)
def test_cppo_keeps_k_largest_abs_advantage_per_group(data, keep, seed):
    _, group_ids = data
    batch = len(group_ids)
    advantages = torch.randn(batch, generator=torch.Generator().manual_seed(seed))
    weights = compute_selection(
        "cppo", torch.ones(batch, 3, dtype=torch.bool), rewards=torch.zeros(batch), advantages=advantages,
        group_ids=group_ids, keep=keep,
    )
    kept_rows = weights[:, 0] > 0
    for g in group_ids.unique():
        rows = group_ids == g
        size = int(rows.sum())
        k = min(keep, size) if isinstance(keep, int) else exact_ceil(keep, size)
        assert int(kept_rows[rows].sum()) == k
        if k < size:
            assert advantages[rows & kept_rows].abs().min() >= advantages[rows & ~kept_rows].abs().max()


@given(grouped_rewards(), st.sampled_from([0.2, 0.4, 0.5, 0.75, 1.0]), st.integers(0, 2**31 - 1))
def test_d3s_sample_level_reaches_the_brute_force_max_variance(data, ratio, seed):
    _, group_ids = data
    batch = len(group_ids)
    advantages = torch.randn(batch, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    if seed % 3 == 0:
        advantages = advantages.round()  # ties
    weights = compute_selection(
        "d3s", torch.ones(batch, 2, dtype=torch.bool), rewards=torch.zeros(batch), advantages=advantages,
        entropy=torch.ones(batch, 2, dtype=torch.float64), group_ids=group_ids, sample_ratio=ratio, token_ratio=1.0,
    )
    kept_rows = weights[:, 0] > 0
    values = advantages.tolist()
    for g in group_ids.unique().tolist():
        members = [i for i in range(batch) if group_ids[i] == g]
        k = exact_ceil(ratio, len(members))
        chosen = [i for i in members if kept_rows[i]]
        assert len(chosen) == k
        best, _ = brute_force_max_variance(members, values, k)
        assert population_variance([values[i] for i in chosen]) == pytest.approx(best, abs=1e-9)
