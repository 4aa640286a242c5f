"""The statistics of comparing runs: a mean with its 95% interval, and a difference with its interval and p-value.

A research result is a difference between runs (a trick, an optimizer, a width), and one run a side cannot tell a
difference from the noise of the seed. These are the two figures rafale's tables and `rafale compare` give:

    summarize([3.91, 3.93, 3.90])        -> Summary(n=3, mean=3.913, sd=0.015, low=3.875, high=3.951)
    difference({0: 3.91, 1: 3.93, 2: 3.90}, {0: 3.95, 1: 3.96, 2: 3.92})
                                          -> paired by seed: A - B = -0.030 [-0.060, 0.000], p = 0.051

The interval of a mean is Student's t interval (the runs' seeds are the sample). A difference is paired by seed
when both sides ran the same seeds (each seed fixes the data order and the initial draw, so the pairs share that
noise and the test is stronger): a t-test on the per-seed differences. Otherwise it is Welch's t-test (unequal
variances). With one run on a side there is no interval: the difference is given alone and said to be so.
scipy.stats computes the tests; it is imported when a test runs, so `rafale --help` never loads it.
"""

import math
from dataclasses import dataclass

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Summary:
    """Runs of one arm: n, mean, standard deviation (n - 1), and the 95% t interval of the mean (None below 2)."""
    n: int
    mean: float
    sd: float | None
    low: float | None
    high: float | None

    def text(self, digits: int = 4) -> str:
        """'3.9134 ± 0.0381 (n=3)': the mean and the interval's half-width; 'n=1' says there is no interval."""
        if self.low is None:
            return f"{self.mean:.{digits}f} (n=1, no interval)"
        return f"{self.mean:.{digits}f} ± {(self.high - self.low) / 2:.{digits}f} (n={self.n})"


@dataclass(frozen=True)
class Difference:
    """A - B for two arms: the difference of the means, its 95% interval and p-value (two-sided), and the test."""
    a: Summary
    b: Summary
    estimate: float
    low: float | None
    high: float | None
    p_value: float | None
    test: str  # "paired t-test over n seeds", "Welch's t-test", or "no interval (one run on a side)"

    @property
    def distinguishable(self) -> bool | None:
        """Whether the interval excludes zero (p < 0.05); None without an interval."""
        if self.p_value is None:
            return None
        return self.p_value < 1 - CONFIDENCE

    def verdict(self, lower_is_better: bool = True, names: tuple[str, str] = ("A", "B")) -> str:
        """One clause a table or a reader can quote: which arm is better (called by `names`), or that they are
        not distinguishable."""
        n = f"n={self.a.n}" if self.a.n == self.b.n else f"n={self.a.n} and {self.b.n}"
        if self.distinguishable is None:
            return "no interval: one run on a side cannot tell a difference from the seed's noise"
        if not self.distinguishable:
            return f"not distinguishable at {n} (p = {self.p_value:.2g})"
        better = names[0] if (self.estimate < 0) == lower_is_better else names[1]
        return f"{better} is better (p = {self.p_value:.2g}, {n})"


def t_quantile(df: float) -> float:
    """Student's t quantile at (1 + CONFIDENCE) / 2 with df degrees of freedom (4.303 at df=2)."""
    from scipy import stats
    return float(stats.t.ppf((1 + CONFIDENCE) / 2, df))


def summarize(values) -> Summary:
    """The mean of `values` (one per seed) with its 95% t interval."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("summarize: no values")
    n, mean = len(values), sum(values) / len(values)
    if n == 1:
        return Summary(1, mean, None, None, None)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile(n - 1) * sd / math.sqrt(n)
    return Summary(n, mean, sd, mean - half, mean + half)


def difference(a: dict, b: dict) -> Difference:
    """A - B from {seed: value} of each arm: paired by seed when both arms ran the same seeds (2 or more),
    Welch's t-test when their seeds differ (2 or more runs a side), no interval with one run on a side."""
    from scipy import stats
    summary_a, summary_b = summarize(a.values()), summarize(b.values())
    estimate = summary_a.mean - summary_b.mean
    if set(a) == set(b) and len(a) >= 2:
        seeds = sorted(a, key=str)
        diffs = [a[s] - b[s] for s in seeds]
        spread = summarize(diffs)
        if spread.sd == 0:  # every seed moved by exactly the same amount: t is infinite (or 0/0 when it is 0)
            p = 1.0 if estimate == 0 else 0.0
        else:
            p = float(stats.ttest_rel([a[s] for s in seeds], [b[s] for s in seeds]).pvalue)
        return Difference(summary_a, summary_b, estimate, spread.low, spread.high, p,
                          f"paired t-test over {len(seeds)} seeds")
    if len(a) < 2 or len(b) < 2:
        return Difference(summary_a, summary_b, estimate, None, None, None, "no interval (one run on a side)")
    va, vb = summary_a.sd ** 2 / summary_a.n, summary_b.sd ** 2 / summary_b.n
    if va + vb == 0:
        p = 1.0 if estimate == 0 else 0.0
        return Difference(summary_a, summary_b, estimate, estimate, estimate, p, "Welch's t-test")
    df = (va + vb) ** 2 / (va ** 2 / (summary_a.n - 1) + vb ** 2 / (summary_b.n - 1))
    half = t_quantile(df) * math.sqrt(va + vb)
    p = float(stats.ttest_ind(list(a.values()), list(b.values()), equal_var=False).pvalue)
    return Difference(summary_a, summary_b, estimate, estimate - half, estimate + half, p, "Welch's t-test")
