"""`rafale law RUNS...`: a scaling law fitted to finished runs, and checked on runs it did not see.

    rafale law runs/law                              fit L(N, D) to every complete run under runs/law
    rafale law runs/law --holdout 'law-hs128-*'      fit without those runs, then predict them
    rafale law runs/a runs/b --bits-per-byte         runs with different tokenizers: a law of bits per byte

The law is Chinchilla's (Hoffmann et al. 2022, approach 3):

    L(N, D) = E + A / N^alpha + B / D^beta

N the non-embedding parameters, D the tokens trained on, L the final validation loss (each run's summary.json).
Fitted as the paper does: the Huber loss (delta 1e-3) between log L and the prediction's log, written
log L = LSE(a - alpha log N, b - beta log D, e) with A = e^a, B = e^b, E = e^e, minimized by scipy's L-BFGS-B from
the best starting points of the paper's grid, within bounds (BOUNDS) that keep alpha and beta in [0.001, 3] and
every exp finite. Each parameter gets a 95% interval from a bootstrap over the runs: runs drawn with replacement,
each resample fitted as the full fit is, from the best grid points for its own draw (refitting from the full fit's
point instead left every resample where that point was: E = 5.9e-14 [5.9e-14, 5.9e-14] on runs made with E = 0.8),
and the 2.5th and 97.5th percentiles of the fits. bench/law_coverage.py measures how often those intervals cover a
known law's parameters.

An interval is printed as "not determined", not as numbers, when the full fit's value sits on a bound, when more
than 2.5% of the bootstrap fits do (the box, not the runs, then sets the interval), or when its ends are more than
100x apart (the fits disagree by orders of magnitude: `A 4.49e+18 [15.1, 2.68e+289]`); a and b are determined where
alpha and beta both are.

Compute: a run's training FLOPs are C = flops_per_token * D, from the model's own count (3x the forward's matmul
FLOPs: the backward multiplies twice as much; summary.json's flops_per_token). For the compute-optimal split that
count is fitted over the runs' sizes as flops_per_token = k N^gamma (gamma is near 1 for big models, where 6N
dominates; the vocabulary projection and attention make it smaller for tiny ones). Minimizing L(N, D) at fixed
C = k N^gamma D gives N_opt ~ C^a and D_opt ~ C^b with a = beta / (alpha + gamma beta), b = alpha / (alpha +
gamma beta), which are Chinchilla's beta / (alpha + beta) and alpha / (alpha + beta) at gamma = 1.

What the runs cannot tell is said, not printed: A and alpha need 3 sizes, B and beta 3 budgets (one size gives the
law in D alone, E' = E + A/N^alpha). Refused before any fit: fewer distinct (N, D) than one more than the law's
parameters (as many fit any law of the family exactly), points on one line in (log N, log D) (D = k N^g, along
which A/N^alpha and B/D^beta move together), and runs of other data, tokenizers (but with --bits-per-byte) or
tasks, naming the difference. law.md and law.png are written only after a fit succeeds (temporary names, then
renamed); runs not complete are left out and listed.
"""

import argparse
import fnmatch
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rafale.errors import RafaleError
from rafale.run_folder.plots import plain_log_axis, pyplot
from rafale.run_folder import data_identity, read_summary
from rafale.commands.runs import run_folders

HUBER_DELTA = 1e-3
# the starting points of Hoffmann et al. (appendix D.2): every combination, the best few by the objective kept
GRID = {"e": np.arange(-1, 1.01, 0.5), "a": np.arange(0, 25.1, 5), "alpha": np.arange(0, 2.01, 0.5),
        "b": np.arange(0, 25.1, 5), "beta": np.arange(0, 2.01, 0.5)}
STARTS = 8  # the full fit's L-BFGS-B runs from the best this many grid points
RESAMPLE_STARTS = 3  # a resample's, from its own grid (in 48 resamples, each of the best 8 led to one minimum)
# the fit's box, on theta = (e, a, alpha, b, beta) with E = e^e and a, b centred on the runs (a = the log of
# A/N^alpha at their mean log N; see fit_theta). The exponents stay positive (a negative one is a loss that grows
# with size or data, and 0 makes the term a second constant) and at most 3, past any reported language-model law.
# E from 2e-9 to 2e4, each term at the runs' centre from 1e-13 (absent) to 2e4: every exp stays finite. A
# parameter the data leave on a bound is "not determined" (interval_verdicts).
BOUNDS = {"e": (-20.0, 10.0), "a": (-30.0, 10.0), "alpha": (1e-3, 3.0), "b": (-30.0, 10.0), "beta": (1e-3, 3.0)}
THETA = ("e", "a", "alpha", "b", "beta")
ONE_LINE = 0.01  # points whose spread across their best line in (log N, log D) is under 1% of that along it
UNDETERMINED_SPAN = 100  # an interval whose ends are further apart than this factor is "not determined"
MIN_DISTINCT = 3  # sizes for A and alpha, budgets for B and beta: 3 values for a power law with an offset
PARAMETERS = ("E", "A", "alpha", "B", "beta")


class LawError(RafaleError):
    pass


@dataclass
class Point:
    """One run, as the law sees it."""
    name: str
    N: int  # non-embedding parameters
    D: int  # tokens trained on
    flops_per_token: int
    target: float  # the final validation loss, or bits per byte

    @property
    def C(self) -> float:
        return self.flops_per_token * self.D


# ----------------------------------------------------------------------------------------------------
# reading the runs


def read_points(paths: list[Path], bits_per_byte: bool = False) -> tuple[list[Point], list[str]]:
    """(the complete runs under `paths` as points, 'name (why)' for each run left out). Refuses runs whose data,
    tokenizer (unless bits_per_byte) or task differ, naming the difference."""
    points, left_out, identities = [], [], {}
    for run_dir in run_folders(paths):
        summary = read_summary(run_dir) or {}
        status = summary.get("status")
        if status != "complete":
            how = f"stopped by {summary['stopped_by']}" if summary.get("stopped_by") else (status or "no summary.json")
            left_out.append(f"{run_dir.name} ({how} at batch {summary.get('batches', 0)})")
            continue
        metric = "BitsPerByte" if bits_per_byte else "LanguageCrossEntropy"
        target = summary.get("validation", {}).get(metric)
        if summary.get("non_embedding_parameters") is None or summary.get("flops_per_token") is None:
            left_out.append(f"{run_dir.name} (its summary.json has no non_embedding_parameters or flops_per_token: "
                            "trained before rafale recorded them, or a model without a FLOPs count)")
            continue
        if target is None:
            left_out.append(f"{run_dir.name} (no final validation {metric})")
            continue
        identities[run_dir.name] = data_identity(run_dir, with_tokenizer=not bits_per_byte)
        points.append(Point(run_dir.name, summary["non_embedding_parameters"], summary["tokens"],
                            summary["flops_per_token"], target))
    check_same(identities, bits_per_byte)
    return points, left_out


def check_same(identities: dict[str, dict], bits_per_byte: bool) -> None:
    if not identities:
        return
    first_name, first = next(iter(identities.items()))
    for name, identity in identities.items():
        differ = [key for key in sorted(first.keys() | identity.keys()) if first.get(key) != identity.get(key)]
        if not differ:
            continue
        what = "; ".join(f"{key}: {first.get(key)!r} in {first_name}, {identity.get(key)!r} in {name}" for key in differ)
        hint = ("; fit them on bits per byte with --bits-per-byte, which a tokenizer does not change"
                if not bits_per_byte and set(differ) <= {"tokenizer", "data.tokenizer", "data.vocab_size"} else "")
        raise LawError(f"these runs cannot share a law: {what}{hint}")


def select(points: list[Point], patterns: list[str]) -> tuple[list[Point], list[Point]]:
    """(the points no pattern names, the ones some does): a run's name or a shell pattern of names."""
    held = [p for p in points if any(fnmatch.fnmatchcase(p.name, pattern) for pattern in patterns)]
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(p.name, pattern) for p in points):
            raise LawError(f"--holdout {pattern}: no complete run is named so; the runs are "
                           f"{', '.join(p.name for p in points)}")
    return [p for p in points if p not in held], held


# ----------------------------------------------------------------------------------------------------
# the fit


@dataclass
class Law:
    """A fitted law. `sides`: 'N' and 'D' for the whole law; one of them for a law in that variable alone, whose
    E is then the other term's constant too. params: E, A, alpha, B, beta (None for what the runs cannot tell)."""
    sides: tuple[str, ...]
    params: dict
    fixed: dict  # for a one-sided law: the N or D every run had

    def predict(self, N, D):
        N, D = np.asarray(N, dtype=float), np.asarray(D, dtype=float)
        p, loss = self.params, self.params["E"]
        # A / N^alpha as exp(log A - alpha log N): a bootstrap fit can reach A = 1e290 and alpha = 55, whose power
        # alone overflows while the term itself is small (A = 0 gives exp(-inf) = 0)
        with np.errstate(divide="ignore"):
            if "N" in self.sides:
                loss = loss + np.exp(np.log(p["A"]) - p["alpha"] * np.log(N))
            if "D" in self.sides:
                loss = loss + np.exp(np.log(p["B"]) - p["beta"] * np.log(D))
        return loss


def huber(r: np.ndarray, delta: float = HUBER_DELTA) -> np.ndarray:
    a = np.abs(r)
    return np.where(a <= delta, 0.5 * r ** 2, delta * (a - 0.5 * delta))


def grid_starts(log_n, log_d, log_l, weights, sides: tuple[str, ...], keep: int = STARTS) -> np.ndarray:
    """The `keep` grid points (rows of e, a, alpha, b, beta) with the lowest weighted objective, evaluated all at
    once."""
    axes = [GRID["e"], GRID["a"] if "N" in sides else [0.0], GRID["alpha"] if "N" in sides else [0.0],
            GRID["b"] if "D" in sides else [0.0], GRID["beta"] if "D" in sides else [0.0]]
    starts = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 5)
    objective = (weights * huber(log_predictions(starts, log_n, log_d, sides) - log_l)).sum(1)
    return starts[np.argsort(objective)[:keep]]


def log_predictions(theta: np.ndarray, log_n, log_d, sides) -> np.ndarray:
    """log L for each row of theta (e, a, alpha, b, beta) at each point: LSE of the law's terms' logs."""
    e, a, alpha, b, beta = (theta[:, i:i + 1] for i in range(5))
    terms = [np.broadcast_to(e, (len(theta), len(log_n)))]
    if "N" in sides:
        terms.append(a - alpha * log_n)
    if "D" in sides:
        terms.append(b - beta * log_d)
    return np.logaddexp.reduce(np.stack(terms), axis=0)


def objective_and_gradient(theta: np.ndarray, log_n, log_d, log_l, weights, sides) -> tuple[float, np.ndarray]:
    """The weighted Huber loss of the log predictions at theta (e, a, alpha, b, beta), and its gradient (a side the
    law lacks has a zero gradient). Both divided by delta^2, which moves no minimum: the loss of a 0.3% residual is
    then ~3, not 3e-6, so L-BFGS-B's stopping tests (an absolute floor of 1 on the loss's scale) do not stop it at
    the first step. Written out term by term: a bootstrap calls it ~10^5 times on a dozen points."""
    e, a, alpha, b, beta = theta
    by_n = a - alpha * log_n if "N" in sides else np.full_like(log_l, -np.inf)  # log(A / N^alpha)
    by_d = b - beta * log_d if "D" in sides else np.full_like(log_l, -np.inf)  # log(B / D^beta)
    top = np.maximum(np.maximum(by_n, by_d), e)
    share_e, share_n, share_d = np.exp(e - top), np.exp(by_n - top), np.exp(by_d - top)
    total = share_e + share_n + share_d
    residual = top + np.log(total) - log_l  # log-sum-exp of the terms, minus log L
    size = np.abs(residual)
    loss = np.where(size <= HUBER_DELTA, 0.5 * residual ** 2, HUBER_DELTA * (size - 0.5 * HUBER_DELTA))
    slope = weights * np.clip(residual, -HUBER_DELTA, HUBER_DELTA) / total  # Huber's derivative x d LSE / d term
    by_n_slope, by_d_slope = slope * share_n, slope * share_d
    gradient = np.array([slope @ share_e, by_n_slope.sum(), -(by_n_slope @ log_n), by_d_slope.sum(),
                         -(by_d_slope @ log_d)])
    return float(weights @ loss) / HUBER_DELTA ** 2, gradient / HUBER_DELTA ** 2


def free_coordinates(sides) -> list[int]:
    """The indices of theta (e, a, alpha, b, beta) the law fits: e, and a, alpha for N, b, beta for D."""
    return [0] + ([1, 2] if "N" in sides else []) + ([3, 4] if "D" in sides else [])


def fit_theta(points: list[Point], sides, weights=None,
              starts: int = STARTS) -> tuple[np.ndarray, set[str]]:
    """The best theta (e, a, alpha, b, beta) of scipy's L-BFGS-B within BOUNDS, run from each of the best grid
    points for these weights (a bootstrap resample's counts: each resample starts from its own grid, as the full
    fit does), and the parameters it left on a bound (at_bounds). A LawError when no start reaches a finite loss.

    L-BFGS-B works on a and b centred on the runs: a - alpha mean(log N) is the log of A/N^alpha at the runs' mean
    size (and so for b), which does not move when alpha does; on a itself the valley along a = alpha log N costs
    L-BFGS-B several times the iterations. BOUNDS' a and b are those centred values."""
    from scipy.optimize import minimize  # here, not at the top: only `rafale law` pays for scipy's import

    log_n, log_d = np.log([p.N for p in points]), np.log([p.D for p in points])
    log_l = np.log([p.target for p in points])
    weights = np.ones(len(points)) if weights is None else np.asarray(weights, dtype=float)
    centre_n, centre_d = log_n.mean(), log_d.mean()
    free = free_coordinates(sides)

    def loss(x):
        theta = np.zeros(5)
        theta[free] = x
        value, gradient = objective_and_gradient(theta, log_n - centre_n, log_d - centre_d, log_l, weights, sides)
        return value, gradient[free]

    best, best_value = None, math.inf
    for start in grid_starts(log_n, log_d, log_l, weights, sides, starts):
        start = start - np.array([0, start[2] * centre_n, 0, start[4] * centre_d, 0])  # to centred a, b
        start = np.clip(start, *np.array([BOUNDS[k] for k in THETA]).T)
        result = minimize(loss, start[free], method="L-BFGS-B", jac=True, bounds=[BOUNDS[THETA[i]] for i in free],
                          options={"maxiter": 2000, "ftol": 1e-12, "gtol": 1e-8})
        if np.isfinite(result.fun) and np.all(np.isfinite(result.x)) and result.fun < best_value:
            best, best_value = result.x, result.fun
    if best is None:
        raise LawError(f"the fit failed: no start of L-BFGS-B reached a finite loss on these {len(points)} runs")
    centred = np.zeros(5)
    centred[free] = best
    theta = centred + np.array([0, centred[2] * centre_n, 0, centred[4] * centre_d, 0])
    return theta, at_bounds(centred, sides)


def as_params(theta: np.ndarray, sides) -> dict:
    """E, A, alpha, B, beta from theta (e, a, alpha, b, beta); BOUNDS keep every exp finite. e on its lower bound
    is E = 0: the loss has no floor the runs can see (E >= 0 is the law's own bound, not the box's)."""
    E, A, B = (float(np.exp(v)) for v in (theta[0], theta[1], theta[3]))
    E = 0.0 if theta[0] <= BOUNDS["e"][0] else E
    alpha, beta = float(theta[2]), float(theta[4])
    return {"E": E, "A": A if "N" in sides else None, "alpha": alpha if "N" in sides else None,
            "B": B if "D" in sides else None, "beta": beta if "D" in sides else None}


def at_bounds(theta: np.ndarray, sides) -> set[str]:
    """The parameters (E, A, alpha, B, beta) whose theta coordinate sits on one of BOUNDS: the box, not the data,
    chose them. But for E = 0 (e on its lower bound), a value the law allows: the interval then starts at 0."""
    names = dict(zip(THETA, PARAMETERS))
    return {names[THETA[i]] for i in free_coordinates(sides)
            if any(abs(theta[i] - bound) <= 1e-6 * max(1.0, abs(bound)) for bound in BOUNDS[THETA[i]])
            and not (i == 0 and theta[0] <= BOUNDS["e"][0] + 1e-6 * abs(BOUNDS["e"][0]))}


def what_the_runs_tell(points: list[Point]) -> tuple[tuple[str, ...], list[str]]:
    """(the sides of the law these runs determine, a sentence for each parameter they cannot). A LawError, before
    any fit, when they determine neither side, when they have too few distinct (N, D) points for the parameters
    (at least one more than the parameters), or when their points lie on one line in (log N, log D)."""
    sizes, budgets = len({p.N for p in points}), len({p.D for p in points})
    sides = tuple(side for side, count in (("N", sizes), ("D", budgets)) if count >= MIN_DISTINCT)
    said = []
    if sizes < MIN_DISTINCT:
        said.append(f"A and alpha (and E apart from A/N^alpha): the runs have {sizes} size{'s' * (sizes != 1)}, a "
                    f"power law with an offset needs at least {MIN_DISTINCT}")
    if budgets < MIN_DISTINCT:
        said.append(f"B and beta (and E apart from B/D^beta): the runs have {budgets} token budget"
                    f"{'s' * (budgets != 1)}, a power law with an offset needs at least {MIN_DISTINCT}")
    one_side = (sizes == 1 and "D" in sides) or (budgets == 1 and "N" in sides)
    if len(sides) < 2 and not one_side:
        raise LawError("these runs cannot determine a law: " + "; ".join(said) + ". Add sizes or budgets "
                       "(cooldown branches give budgets cheaply: training.cooldowns)")
    check_enough_points(points, sides)
    if len(sides) == 2:
        check_not_one_line(points)
    return sides, said


def check_enough_points(points: list[Point], sides) -> None:
    """At least one distinct (N, D) more than the law has parameters: with as many, any law of the family passes
    through every point exactly, so neither the fit nor a bootstrap of it can tell how well it holds."""
    distinct, names = len({(p.N, p.D) for p in points}), law_parameters(sides)
    if distinct < len(names) + 1:
        raise LawError(f"these runs cannot determine a law: {distinct} distinct (N, D) points for the "
                       f"{len(names)} parameters {', '.join(names)}; a fit needs at least {len(names) + 1}, one more "
                       "than its parameters. Add runs: e.g. 3 sizes x 3 budgets (cooldown branches give budgets "
                       "cheaply: training.cooldowns)")


def law_parameters(sides) -> list[str]:
    return ["E"] + (["A", "alpha"] if "N" in sides else []) + (["B", "beta"] if "D" in sides else [])


def check_not_one_line(points: list[Point]) -> None:
    """Refuses points on one line in (log N, log D) (D = k N^g, e.g. D = 20 N): along it A/N^alpha and B/D^beta
    change together, and any split of the loss between them fits. The test: the points' spread across their best
    line (the smaller singular value of the centred log design) under ONE_LINE of their spread along it."""
    design = np.log([[p.N, p.D] for p in {(p.N, p.D): p for p in points}.values()]).astype(float)
    centred = design - design.mean(0)
    along, across = np.linalg.svd(centred, compute_uv=False)
    if across < ONE_LINE * along:
        g, log_k = np.polyfit(design[:, 0], design[:, 1], 1)
        raise LawError(f"these runs cannot separate N from D: their (N, D) points lie on one line in log space "
                       f"(D = {math.exp(log_k):.3g} N^{g:.3g}), along which A/N^alpha and B/D^beta change together. "
                       "Add runs off that line: several budgets for each size, e.g. 3 sizes x 3 budgets (cooldown "
                       "branches give budgets cheaply: training.cooldowns)")


def on_one_line(points: list[Point]) -> bool:
    try:
        check_not_one_line(points)
    except LawError:
        return True
    return False


@dataclass
class Fit:
    law: Law
    intervals: dict  # parameter or exponent -> (2.5th, 97.5th percentile) over the bootstrap fits
    not_determined: list[str]  # a sentence for each parameter the runs cannot tell
    samples: list[Law]  # the bootstrap fits
    undetermined: dict  # parameter or exponent -> why the runs do not determine it (interval_verdicts)

    def prediction_interval(self, N, D) -> tuple[float, float]:
        values = [float(s.predict(N, D)) for s in self.samples]
        return float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))


def fit_law(points: list[Point], bootstrap: int = 200, seed: int = 0) -> Fit:
    """The law, with a 95% bootstrap interval for each parameter and exponent. Each resample (runs drawn with
    replacement: a run's weight in the loss is how often it was drawn) is fitted as the full fit is, from the best
    grid points for its own weights. A resample that loses a size or budget the law needs, or whose points fall on
    one line, is drawn again (at most 5x as many draws as fits)."""
    sides, said = what_the_runs_tell(points)
    theta, point_at_bounds = fit_theta(points, sides)
    fixed = {} if len(sides) == 2 else ({"N": points[0].N} if sides == ("D",) else {"D": points[0].D})
    law = Law(sides, as_params(theta, sides), fixed)
    rng, samples, bound_hits, tries = np.random.default_rng(seed), [], [], 0
    while len(samples) < bootstrap and tries < 5 * bootstrap:
        tries += 1
        counts = np.bincount(rng.integers(0, len(points), len(points)), minlength=len(points))
        chosen = [p for p, c in zip(points, counts) if c]
        if any(len({getattr(p, side) for p in chosen}) < MIN_DISTINCT for side in sides) or (
                len(sides) == 2 and on_one_line(chosen)):
            continue
        sample, sample_at_bounds = fit_theta(points, sides, weights=counts, starts=RESAMPLE_STARTS)
        params = as_params(sample, sides)
        samples.append(Law(sides, params | exponents(params, points), fixed))
        bound_hits.append(sample_at_bounds)
    intervals = {}
    for key in samples[0].params if samples else []:
        values = [s.params[key] for s in samples if s.params[key] is not None]
        if values:
            intervals[key] = (float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5)))
    law.params |= exponents(law.params, points)
    undetermined = interval_verdicts(intervals, bound_hits, point_at_bounds)
    return Fit(law, intervals, said, samples, undetermined)


def interval_verdicts(intervals: dict, bound_hits: list[set[str]], point_at_bounds: set[str]) -> dict[str, str]:
    """Which intervals the runs do not determine, and why: the full fit's value sits on a bound of the fit; or more
    than 2.5% of the bootstrap fits do (the box then cuts the interval, which would be the box's, not the data's);
    or its ends are more than UNDETERMINED_SPAN times apart (the fits disagree by orders of magnitude). a and b,
    made of alpha and beta, are determined only where both are."""
    verdicts = {}
    for key in PARAMETERS:
        share = np.mean([key in hits for hits in bound_hits]) if bound_hits else 0.0
        if key in point_at_bounds:
            verdicts[key] = "the fit sits on its bound"
        elif share > 0.025:
            verdicts[key] = f"{share:.0%} of the bootstrap fits sit on the fit's bound"
        elif key in intervals and intervals[key][0] > 0 and intervals[key][1] > UNDETERMINED_SPAN * intervals[key][0]:
            verdicts[key] = (f"the bootstrap fits range over more than {UNDETERMINED_SPAN}x "
                             f"({intervals[key][0]:.3g} to {intervals[key][1]:.3g})")
    for key in ("a", "b"):
        if "alpha" in verdicts or "beta" in verdicts:
            verdicts[key] = "alpha or beta is not determined"
    return verdicts


def flops_relation(points: list[Point]) -> tuple[float, float]:
    """(k, gamma) of flops_per_token = k N^gamma, least squares in logs over the runs' sizes (gamma 1, k the mean
    ratio, with one size)."""
    sizes = sorted({(p.N, p.flops_per_token) for p in points})
    n, f = np.log([s[0] for s in sizes]), np.log([s[1] for s in sizes])
    if len(sizes) == 1:
        return float(math.exp(f[0] - n[0])), 1.0
    gamma, log_k = np.polyfit(n, f, 1)
    return float(math.exp(log_k)), float(gamma)


def exponents(params: dict, points: list[Point]) -> dict:
    """a and b of N_opt ~ C^a, D_opt ~ C^b (see the module's docstring), None without the whole law."""
    if params.get("alpha") is None or params.get("beta") is None:
        return {"a": None, "b": None}
    _, gamma = flops_relation(points)
    alpha, beta = params["alpha"], params["beta"]
    return {"a": beta / (alpha + gamma * beta), "b": alpha / (alpha + gamma * beta)}


def compute_optimal(law: Law, points: list[Point], flops) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(N_opt, D_opt, L_opt) at each of `flops`, on the runs' FLOPs relation."""
    p, (k, gamma) = law.params, flops_relation(points)
    flops = np.asarray(flops, dtype=float)
    alpha, beta = p["alpha"], p["beta"]
    n_opt = (alpha * p["A"] / (gamma * beta * p["B"])) ** (1 / (alpha + gamma * beta)) * (flops / k) ** (
        beta / (alpha + gamma * beta))
    d_opt = flops / (k * n_opt ** gamma)
    return n_opt, d_opt, law.predict(n_opt, d_opt)


# ----------------------------------------------------------------------------------------------------
# what a person reads


def describe_law(fit: Fit, points: list[Point], what: str) -> str:
    law, intervals = fit.law, fit.intervals
    k, gamma = flops_relation(points)
    sizes, budgets = sorted({p.N for p in points}), sorted({p.D for p in points})
    def span(values, one, many):
        return (f"1 {one}, {values[0]:,}" if len(values) == 1 else f"{len(values)} {many}, {values[0]:,} to "
                f"{values[-1]:,}")

    lines = [f"{what} = E + A/N^alpha + B/D^beta, fitted to {len(points)} runs ({span(sizes, 'size', 'sizes')} "
             f"non-embedding parameters; {span(budgets, 'budget', 'budgets')} tokens); "
             + (f"95% intervals from {len(fit.samples)} bootstrap fits" if fit.samples else "no intervals")]
    for key in PARAMETERS + ("a", "b"):
        value = law.params.get(key)
        if value is None:
            continue
        label = key
        if key == "E" and len(law.sides) == 1:
            other = "A/N^alpha" if "D" in law.sides else "B/D^beta"
            label = f"E + {other} ({_fixed_text(law)})"
        if key in fit.undetermined:  # no number: a value the box or the resample chose is not the runs'
            lines.append(f"  {label:<10} not determined: {fit.undetermined[key]}")
            continue
        interval = f"[{intervals[key][0]:.5g}, {intervals[key][1]:.5g}]" if key in intervals else "[no interval]"
        note = {"a": "  N_opt ~ C^a", "b": "  D_opt ~ C^b"}.get(key, "")
        lines.append(f"  {label:<10} {value:12.5g}   {interval}{note}")
    if law.params.get("a") is not None:
        lines.append(f"  compute: C = flops_per_token x D, flops_per_token = {k:.4g} N^{gamma:.3f} over these sizes "
                     f"(3x the forward's matmul FLOPs); a = beta/(alpha + {gamma:.3f} beta), b = alpha/(alpha + "
                     f"{gamma:.3f} beta)")
    for sentence in fit.not_determined:
        lines.append(f"  not determined: {sentence}")
    return "\n".join(lines)


def table(points: list[Point], fit: Fit, held: list[Point], what: str) -> str:
    """A markdown table of the runs: N, D, C, the measured value, the law's (with its 95% interval for a held-out
    run) and the error."""
    law = fit.law
    lines = [f"| run | N | D | C (FLOPs) | {what} | law | error |", "|---|---|---|---|---|---|---|"]
    for p in sorted(points + held, key=lambda p: (p.N, p.D)):
        predicted = float(law.predict(p.N, p.D)) if not law.fixed or _same_fixed(law, p) else math.nan
        error = (predicted - p.target) / p.target
        mark = " (held out)" if p in held else ""
        interval = fit.prediction_interval(p.N, p.D) if p in held and fit.samples else None
        shown = f"{predicted:.4f}" + (f" [{interval[0]:.4f}, {interval[1]:.4f}]" if interval else "")
        lines.append(f"| {p.name}{mark} | {p.N:,} | {p.D:,} | {p.C:.3g} | {p.target:.4f} | {shown} | {error:+.2%} |")
    return "\n".join(lines)


def _fixed_text(law: Law) -> str:
    return ", ".join(f"{side} = {value:,}" for side, value in law.fixed.items())


def _same_fixed(law: Law, p: Point) -> bool:
    return all(getattr(p, side) == value for side, value in law.fixed.items())


def write_law(out: Path, text: str, points: list[Point], law: Law, held: list[Point], what: str) -> tuple[Path, Path]:
    """`out`.md (text) and `out`.png (law_figure), each written to a temporary name and renamed only once both are
    written: a failure leaves neither, and an earlier law.md and law.png as they were."""
    plt = pyplot()
    table_path, plot_path = out.with_suffix(".md"), out.with_suffix(".png")
    table_tmp, plot_tmp = out.with_name(out.name + ".tmp.md"), out.with_name(out.name + ".tmp.png")
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        table_tmp.write_text(text)
        fig = law_figure(points, law, held, what)
        fig.savefig(plot_tmp, dpi=110)
        plt.close(fig)
    except BaseException:
        table_tmp.unlink(missing_ok=True)
        plot_tmp.unlink(missing_ok=True)
        raise
    table_tmp.replace(table_path)
    plot_tmp.replace(plot_path)
    return table_path, plot_path


def law_figure(points: list[Point], law: Law, held: list[Point], what: str):
    """Loss against training FLOPs: each run, the fitted law along D for each size, and the compute-optimal
    frontier when the law is whole. Held-out runs are hollow, with the law's prediction beside them."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5.5))
    everyone = points + held
    sizes = sorted({p.N for p in everyone})
    colors = plt.get_cmap("viridis")(np.linspace(0, 0.9, len(sizes)))
    d_min, d_max = min(p.D for p in everyone), max(p.D for p in everyone)
    for size, color in zip(sizes, colors):
        runs = [p for p in everyone if p.N == size]
        fpt = runs[0].flops_per_token
        fitted = [p for p in runs if p not in held]
        if fitted:
            ax.scatter([p.C for p in fitted], [p.target for p in fitted], color=color, zorder=3,
                       label=f"N = {size:,}")
        if any(p in held for p in runs):
            ax.scatter([p.C for p in runs if p in held], [p.target for p in runs if p in held], facecolors="none",
                       edgecolors=color, s=60, zorder=3, label=f"N = {size:,} (held out: measured)")
            ax.scatter([p.C for p in runs if p in held], [float(law.predict(p.N, p.D)) for p in runs if p in held],
                       marker="x", color=color, zorder=3, label="predicted")
        if "N" in law.sides or size in law.fixed.values():
            d = np.geomspace(d_min / 2, d_max * 2, 100)
            ax.plot(fpt * d, law.predict(size, d), color=color, lw=1, ls="--" if not fitted else "-")
    if law.params.get("a") is not None:
        c = np.geomspace(min(p.C for p in everyone) / 2, max(p.C for p in everyone) * 4, 100)
        ax.plot(c, compute_optimal(law, everyone, c)[2], color="black", lw=1.5, ls=":",
                label=f"compute-optimal (N ~ C^{law.params['a']:.2f}, D ~ C^{law.params['b']:.2f})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    plain_log_axis(ax.yaxis)  # a loss axis spans less than a decade: 0.9, 2, not 2x10^0
    ax.set_xlabel("training FLOPs C")
    ax.set_ylabel(what)
    ax.set_title(f"{what} = {law.params['E']:.3g}" + (f" + {law.params['A']:.3g}/N^{law.params['alpha']:.3g}"
                 if "N" in law.sides else "") + (f" + {law.params['B']:.3g}/D^{law.params['beta']:.3g}"
                                                  if "D" in law.sides else ""), fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def law_main(argv) -> int:
    parser = argparse.ArgumentParser(
        prog="rafale law", description="Fit L(N, D) = E + A/N^alpha + B/D^beta to finished runs (Chinchilla's "
        "approach 3), with bootstrap intervals and the compute-optimal exponents; write a table and a plot.",
        epilog="example: rafale law runs/law --holdout 'law-hs128-*'")
    parser.add_argument("paths", nargs="+", help="run folders, or folders of runs")
    parser.add_argument("--holdout", action="append", default=[], metavar="NAME",
                        help="fit without these runs (a name or a shell pattern; repeatable) and predict them")
    parser.add_argument("--bits-per-byte", action="store_true",
                        help="fit bits per byte instead of the loss: runs with different tokenizers may share it")
    parser.add_argument("--bootstrap", type=int, default=200, help="bootstrap fits for the intervals (default 200)")
    parser.add_argument("--out", help="where the table (.md) and the plot (.png) go (default: law.md and law.png "
                        "in the first folder given)")
    args = parser.parse_args(argv)
    paths = [Path(p).expanduser() for p in args.paths]
    points, left_out = read_points(paths, args.bits_per_byte)
    if left_out:
        print("rafale: left out (not complete): " + ", ".join(left_out))
    fitted, held = select(points, args.holdout)
    what = "bits per byte" if args.bits_per_byte else "validation loss"
    if not fitted:
        raise LawError("every run is held out; nothing is left to fit")
    fit = fit_law(fitted, args.bootstrap)
    law = fit.law
    text = describe_law(fit, fitted, what)
    if held and law.fixed and not all(_same_fixed(law, p) for p in held):
        raise LawError(f"the runs fitted determine a law in {law.sides[0]} alone, at {_fixed_text(law)}; it cannot "
                       f"predict runs at another {'N' if 'N' in law.fixed else 'D'}: "
                       + ", ".join(p.name for p in held if not _same_fixed(law, p)))
    rows = table(fitted, fit, held, what)
    if held:
        errors = [abs(float(law.predict(p.N, p.D)) - p.target) / p.target for p in held]
        text += (f"\nheld out {len(held)} runs: the law predicts their {what} within {max(errors):.2%} (mean "
                 f"{np.mean(errors):.2%})")
    out = Path(args.out) if args.out else (paths[0] if paths[0].is_dir() else paths[0].parent) / "law"
    table_path, plot_path = write_law(out, text + "\n\n" + rows + "\n", fitted, law, held, what)
    print(text + "\n\n" + rows)
    print(f"rafale: wrote {table_path} and {plot_path}")
    return 0
