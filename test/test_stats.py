"""rafale.stats against scipy's own intervals and hand counts: a mean's 95% t interval, a paired and a Welch
difference, and the cases with no interval."""

import math

import pytest
from scipy import stats as scipy_stats

from rafale.stats import difference, summarize


def test_a_mean_s_interval_is_student_s_t_interval():
    s = summarize([1.0, 2.0, 3.0])
    # by hand: mean 2, sd 1, t(0.975, df=2) = 4.30265273 (printed tables), half-width 4.3027 / sqrt(3)
    assert (s.n, s.mean, s.sd) == (3, 2.0, 1.0)
    assert s.low == pytest.approx(2 - 4.30265273 / math.sqrt(3), abs=1e-8)
    assert s.high == pytest.approx(2 + 4.30265273 / math.sqrt(3), abs=1e-8)
    assert s.text(2) == "2.00 ± 2.48 (n=3)"
    one = summarize([3.5])
    assert (one.n, one.mean, one.sd, one.low, one.high) == (1, 3.5, None, None, None)
    assert "no interval" in one.text()
    with pytest.raises(ValueError):
        summarize([])


def test_the_same_seeds_are_paired_and_agree_with_scipy_s_paired_interval():
    a = {0: 3.91, 1: 3.93, 2: 3.90, 3: 3.95}
    b = {0: 3.95, 1: 3.96, 2: 3.92, 3: 3.99}
    d = difference(a, b)
    reference = scipy_stats.ttest_rel(list(a.values()), list(b.values()))
    ci = reference.confidence_interval(0.95)
    assert d.test == "paired t-test over 4 seeds"
    assert d.estimate == pytest.approx(-0.0325, abs=1e-12)  # hand count: (-0.04 - 0.03 - 0.02 - 0.04) / 4
    assert (d.low, d.high) == (pytest.approx(ci.low, abs=1e-12), pytest.approx(ci.high, abs=1e-12))
    assert d.p_value == pytest.approx(reference.pvalue, rel=1e-9)
    assert d.distinguishable and d.verdict().startswith("A is better")
    # unpaired, the same numbers are noise: the seeds' own spread (0.05) hides a shift of 0.03
    welch = difference(a, {s + 10: v for s, v in b.items()})
    assert welch.test == "Welch's t-test" and not welch.distinguishable
    assert welch.verdict().startswith("not distinguishable at n=4")


def test_different_seeds_get_welch_s_test_as_scipy_computes_it():
    a = {0: 1.0, 1: 1.2, 2: 0.9}
    b = {5: 1.5, 6: 1.9, 7: 1.4, 8: 1.7, 9: 1.6}
    d = difference(a, b)
    reference = scipy_stats.ttest_ind(list(a.values()), list(b.values()), equal_var=False)
    ci = reference.confidence_interval(0.95)
    assert d.test == "Welch's t-test"
    assert d.estimate == pytest.approx(1.0333333333 - 1.62, abs=1e-9)
    assert (d.low, d.high) == (pytest.approx(ci.low, abs=1e-12), pytest.approx(ci.high, abs=1e-12))
    assert d.p_value == pytest.approx(reference.pvalue, rel=1e-9)
    assert d.verdict() == f"A is better (p = {d.p_value:.2g}, n=3 and 5)"


def test_one_run_a_side_gives_the_difference_with_no_interval():
    d = difference({0: 3.9}, {0: 3.8})
    assert d.estimate == pytest.approx(0.1) and d.low is None and d.p_value is None
    assert d.distinguishable is None and "no interval" in d.verdict()
    assert difference({0: 3.9}, {1: 3.8, 2: 3.7}).test == "no interval (one run on a side)"


def test_identical_arms_are_not_distinguishable_and_a_constant_shift_is():
    same = difference({0: 1.0, 1: 2.0}, {0: 1.0, 1: 2.0})
    assert same.p_value == 1.0 and not same.distinguishable
    shifted = difference({0: 1.0, 1: 2.0}, {0: 1.5, 1: 2.5})
    assert shifted.p_value == 0.0 and (shifted.low, shifted.high) == (-0.5, -0.5)
