"""paired_difference: the confidence interval for two accuracies on the same items (Newcombe 1998, method 10),
against a published example, exact coverage by enumeration, a seeded paired bootstrap, and its input checks."""
from __future__ import annotations

import math

import numpy as np
import pytest

from sari_ray.eval_stats import paired_difference

pytestmark = pytest.mark.unit


def _pairs(both: int, before_only: int, after_only: int, neither: int) -> tuple[list[bool], list[bool]]:
    before = [True] * both + [True] * before_only + [False] * after_only + [False] * neither
    after = [True] * both + [False] * before_only + [True] * after_only + [False] * neither
    return before, after


def test_published_example_cavo_2012():
    """Fagerland, Lydersen & Laake (2014; their book's chapter 8 and R package `contingencytables`): complete
    response before / after consolidation therapy, table [[59, 6], [16, 80]] (rows: before), estimate
    before - after = -0.0621, Newcombe square-and-add 95% CI -0.1186 to -0.0046. Here diff = after - before."""
    r = paired_difference(*_pairs(59, 6, 16, 80))
    assert r["n"] == 161 and r["counts"] == {"both": 59, "before_only": 6, "after_only": 16, "neither": 80}
    assert r["before"] == pytest.approx(65 / 161) and r["after"] == pytest.approx(75 / 161)
    assert r["diff"] == pytest.approx(10 / 161)
    assert r["ci_low"] == pytest.approx(0.0046, abs=5e-5) and r["ci_high"] == pytest.approx(0.1186, abs=5e-5)
    assert r["method"] == "newcombe-square-and-add" and r["confidence"] == 0.95
    swapped = paired_difference(*reversed(_pairs(59, 6, 16, 80)))  # the other order mirrors the interval
    assert swapped["diff"] == pytest.approx(-r["diff"])
    assert (swapped["ci_low"], swapped["ci_high"]) == pytest.approx((-r["ci_high"], -r["ci_low"]))


@pytest.mark.parametrize("table", [(10, 0, 0, 0), (0, 0, 0, 10), (5, 0, 0, 5), (400, 0, 0, 600), (1, 0, 0, 0)])
def test_all_concordant_gives_zero_difference_with_an_interval_around_it(table):
    r = paired_difference(*_pairs(*table))
    assert r["diff"] == 0.0
    assert r["ci_low"] < 0.0 < r["ci_high"]  # never a zero-width interval (Wald on discordant pairs would be)
    assert r["ci_low"] == pytest.approx(-r["ci_high"])
    assert -1.0 <= r["ci_low"] and r["ci_high"] <= 1.0


def test_interval_contains_estimate_narrows_with_n_and_widens_with_confidence():
    small = paired_difference(*_pairs(10, 2, 5, 3))
    large = paired_difference(*_pairs(100, 20, 50, 30))
    assert small["ci_low"] < small["diff"] < small["ci_high"]
    assert large["ci_high"] - large["ci_low"] < small["ci_high"] - small["ci_low"]
    r90 = paired_difference(*_pairs(10, 2, 5, 3), confidence=0.90)
    r99 = paired_difference(*_pairs(10, 2, 5, 3), confidence=0.99)
    assert r99["ci_low"] < small["ci_low"] < r90["ci_low"] and r90["ci_high"] < small["ci_high"] < r99["ci_high"]


def test_extreme_tables_stay_in_range():
    for table in [(0, 0, 7, 0), (0, 7, 0, 0), (0, 3, 4, 0), (0, 0, 1, 0)]:
        r = paired_difference(*_pairs(*table))
        assert -1.0 <= r["ci_low"] <= r["diff"] <= r["ci_high"] <= 1.0, (table, r)
    assert paired_difference(*_pairs(0, 0, 7, 0))["diff"] == 1.0


def _log_multinomial(table, probs) -> float:
    n = sum(table)
    return (math.lgamma(n + 1) - sum(math.lgamma(x + 1) for x in table)
            + sum(x * math.log(p) for x, p in zip(table, probs) if x))


@pytest.mark.parametrize("probs", [(0.4, 0.1, 0.2, 0.3), (0.25, 0.25, 0.25, 0.25), (0.1, 0.3, 0.1, 0.5),
                                   (0.6, 0.05, 0.05, 0.3), (0.7, 0.02, 0.1, 0.18)])
def test_exact_coverage_by_enumerating_every_table(probs):
    """Coverage of the true difference, summed exactly over all tables of n = 20 paired items (1771 tables)."""
    n, truth = 20, probs[2] - probs[1]
    coverage = 0.0
    for both in range(n + 1):
        for before_only in range(n + 1 - both):
            for after_only in range(n + 1 - both - before_only):
                table = (both, before_only, after_only, n - both - before_only - after_only)
                r = paired_difference(*_pairs(*table))
                if r["ci_low"] <= truth <= r["ci_high"]:
                    coverage += math.exp(_log_multinomial(table, probs))
    assert 0.94 <= coverage <= 0.999, coverage  # nominal 0.95; measured 0.951 .. 0.995 at these points


def test_agrees_with_a_large_seeded_paired_bootstrap():
    """At n = 2000 the interval and a paired percentile bootstrap (resampling items, 20,000 replicates) agree."""
    rng = np.random.default_rng(0)
    cells = rng.choice(4, size=2000, p=[0.5, 0.12, 0.18, 0.2])  # both / before only / after only / neither
    table = tuple(int((cells == i).sum()) for i in range(4))
    r = paired_difference(*_pairs(*table))
    boot = rng.multinomial(2000, np.array(table) / 2000, size=20_000)  # resampled items, as counts per cell
    diffs = (boot[:, 2] - boot[:, 1]) / 2000
    lo, hi = np.quantile(diffs, [0.025, 0.975])
    assert r["ci_low"] == pytest.approx(lo, abs=0.003) and r["ci_high"] == pytest.approx(hi, abs=0.003)


def test_inputs_are_checked():
    with pytest.raises(ValueError, match=r"no items \(n = 0\)"):
        paired_difference([], [])
    with pytest.raises(ValueError, match="got 3 before and 2 after"):
        paired_difference([True, False, True], [True, False])
    with pytest.raises(ValueError, match=r"after\[1\] = 2"):
        paired_difference([True, False], [1, 2])
    with pytest.raises(ValueError, match=r"before\[0\] = None"):
        paired_difference([None], [True])
    with pytest.raises(ValueError, match=r"before\[0\] = 'yes'"):
        paired_difference(["yes"], [True])
    for level in (0, 1, 1.5, -0.1):
        with pytest.raises(ValueError, match="confidence"):
            paired_difference([True], [False], confidence=level)


def test_ints_and_numpy_verdicts_read_as_bools():
    before, after = _pairs(5, 2, 3, 4)
    expected = paired_difference(before, after)
    assert paired_difference([int(x) for x in before], [int(x) for x in after]) == expected
    assert paired_difference(np.array(before), np.array(after, dtype=np.int64)) == expected
