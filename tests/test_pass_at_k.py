"""Tests for the pass@k maths in unipo.evaluation against brute-force subset enumeration."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from unipo.evaluation import pass_at_k, pass_at_k_table


def brute_force_pass_at_k(samples: list[bool], k: int) -> float:
    """Fraction of all k-subsets of the samples that contain at least one correct sample."""
    subsets = list(itertools.combinations(range(len(samples)), k))
    hits = sum(1 for subset in subsets if any(samples[i] for i in subset))
    return hits / len(subsets)


# A fixed table: 5 problems, 6 to 8 samples each, correct counts 2, 0, 5, 1, 8.
TABLE = [
    [True, False, False, True, False, False],
    [False] * 7,
    [True, True, False, True, True, True],
    [False, False, True, False, False, False, False, False],
    [True] * 8,
]


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 6])
def test_table_matches_brute_force(k: int) -> None:
    expected = sum(brute_force_pass_at_k(samples, k) for samples in TABLE) / len(TABLE)
    assert pass_at_k_table(TABLE, [k])[k] == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_every_n_c_k_matches_brute_force(n: int) -> None:
    for c in range(n + 1):
        # correct samples scattered, not bunched, to make the enumeration honest
        samples = [i * (c + 1) // (n + 1) != (i + 1) * (c + 1) // (n + 1) for i in range(n)]
        assert sum(samples) == c
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(brute_force_pass_at_k(samples, k), abs=1e-12)


def test_hand_computed() -> None:
    # pass@1 = c/n
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    # n=5, c=2, k=2: 1 − C(3,2)/C(5,2) = 1 − 3/10 = 0.7
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)
    # n − c < k: every subset hits a correct sample
    assert pass_at_k(4, 3, 2) == 1.0
    assert pass_at_k(4, 0, 4) == 0.0
    # table: problems (n=4, c=1) and (n=4, c=2); k=2: (1 − 3/6 + 1 − 1/6)/2 = (0.5 + 0.8333)/2
    table = pass_at_k_table([[True, False, False, False], [True, True, False, False]], [1, 2])
    assert table[1] == pytest.approx(0.375)
    assert table[2] == pytest.approx((0.5 + 5 / 6) / 2)


def test_large_n_is_stable_and_exact() -> None:
    # C(1000, 100) overflows a float; the product form must still match exact rationals
    for n, c, k in [(200, 13, 50), (1000, 7, 100), (1000, 900, 100)]:
        exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
        assert pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-12, abs=1e-15)


@given(n=st.integers(1, 60), data=st.data())
def test_bounded_and_monotone(n: int, data) -> None:
    c = data.draw(st.integers(0, n))
    k = data.draw(st.integers(1, n))
    value = pass_at_k(n, c, k)
    assert 0.0 <= value <= 1.0
    if k < n:
        assert pass_at_k(n, c, k + 1) >= value - 1e-12
    if c < n:
        assert pass_at_k(n, c + 1, k) >= value - 1e-12


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k(3, 1, 4)
    with pytest.raises(ValueError, match="c must"):
        pass_at_k(3, 4, 1)
    with pytest.raises(ValueError, match="c must"):
        pass_at_k(3, -1, 1)
    with pytest.raises(ValueError, match="k must"):
        pass_at_k(3, 1, 0)
    with pytest.raises(ValueError, match="int"):
        pass_at_k(3.0, 1, 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="problem 1"):
        pass_at_k_table([[True, False, True], [False]], [2])
    with pytest.raises(ValueError, match="at least one problem"):
        pass_at_k_table([], [1])
    with pytest.raises(ValueError, match="at least one k"):
        pass_at_k_table([[True]], [])
