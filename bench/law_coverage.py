"""How often `rafale law`'s 95% bootstrap intervals cover a known law's parameters (issue 34).

    python bench/law_coverage.py                          20 noise seeds, 200 resamples each, both laws
    python bench/law_coverage.py --seeds 30 --workers 16  more seeds, in parallel processes

Runs are made from a known law on the README's design (4 sizes, 110k to 790k non-embedding parameters, x 3 budgets,
307,200 to 819,200 tokens: the sweep of test/law_stories.yaml), each loss times a log-normal noise of 0.3% (a
validation set's spread), one noise draw per seed. rafale.commands.law.fit_law fits each seed's 12 runs as `rafale law`
does, and the table counts, for each parameter, the seeds whose interval holds the truth, and those whose interval
`rafale law` prints as "not determined" (their numbers are still counted for coverage). Two laws: issue 34's
(E = 0.8, A = 30, alpha = 0.35, B = 100, beta = 0.35) and Chinchilla's own (Hoffmann et al. 2022, approach 3).
A 95% interval should cover the truth in about 19 of 20 seeds.
"""

import argparse
import math
import sys
from multiprocessing import Pool
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from rafale.commands.law import PARAMETERS, Point, fit_law  # noqa: E402

LAWS = {"issue 34": {"E": 0.8, "A": 30.0, "alpha": 0.35, "B": 100.0, "beta": 0.35},
        "Chinchilla": {"E": 1.69, "A": 406.4, "alpha": 0.34, "B": 410.7, "beta": 0.28}}
SIZES = (110_000, 210_000, 410_000, 790_000)  # the README's four widths, rounded
BUDGETS = (307_200, 512_000, 819_200)  # 300, 500 and 800 batches of 8 x 128 tokens
NOISE = 0.003


def synthetic_runs(law: dict, seed: int, noise: float = NOISE) -> list[Point]:
    rng = np.random.default_rng(seed)
    return [Point(f"n{N}-d{D}", N, D, 6 * N, (law["E"] + law["A"] / N ** law["alpha"] + law["B"] / D ** law["beta"])
                  * math.exp(rng.normal(0, noise))) for N in SIZES for D in BUDGETS]


def one_seed(job: tuple[str, int, int]) -> tuple[str, int, dict]:
    """(law, seed, parameter -> (covered, not determined, low, high))."""
    name, seed, bootstrap = job
    truth = LAWS[name]
    fit = fit_law(synthetic_runs(truth, seed), bootstrap=bootstrap, seed=seed)
    return name, seed, {key: (fit.intervals[key][0] <= truth[key] <= fit.intervals[key][1],
                              key in fit.undetermined, *fit.intervals[key]) for key in PARAMETERS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--bootstrap", type=int, default=200, help="resamples a fit (rafale law's default: 200)")
    parser.add_argument("--workers", type=int, default=1, help="processes (each fit is single-threaded numpy)")
    args = parser.parse_args()
    jobs = [(name, seed, args.bootstrap) for name in LAWS for seed in range(args.seeds)]
    results = []
    with Pool(args.workers) as pool:  # each seed's line as it lands (stderr): a run under load takes a while
        for name, seed, row in pool.imap_unordered(one_seed, jobs):
            results.append((name, seed, row))
            print(f"{name} seed {seed}: " + ", ".join(f"{k} [{r[2]:.3g}, {r[3]:.3g}]{'' if r[0] else ' misses'}"
                                                      for k, r in row.items()), file=sys.stderr, flush=True)
    print(f"{args.seeds} noise seeds, {args.bootstrap} bootstrap resamples a fit, {len(SIZES)} sizes x "
          f"{len(BUDGETS)} budgets, {NOISE:.1%} noise\n")
    print("| law | " + " | ".join(PARAMETERS) + " |")
    print("|---|" + "---|" * len(PARAMETERS))
    for name, truth in LAWS.items():
        rows = [r for n, _, r in results if n == name]
        cells = [f"{sum(r[key][0] for r in rows)}/{len(rows)}" + (f" ({sum(r[key][1] for r in rows)} n.d.)"
                                                                   if any(r[key][1] for r in rows) else "")
                 for key in PARAMETERS]
        print(f"| {name} ({', '.join(f'{k} {v:g}' for k, v in truth.items())}) | " + " | ".join(cells) + " |")
    print("\ncovered/seeds: seeds whose 95% interval holds the truth; n.d.: seeds whose interval rafale law prints "
          "as 'not determined'")
    for name in LAWS:
        print(f"\n{name}: median interval (low, high) over the seeds")
        rows = [r for n, _, r in results if n == name]
        for key in PARAMETERS:
            print(f"  {key:<6} [{np.median([r[key][2] for r in rows]):.4g}, {np.median([r[key][3] for r in rows]):.4g}]")


if __name__ == "__main__":
    main()
