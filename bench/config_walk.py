"""The walk of a config through a training run: which of rafale's modules `cfg` visits, in order, and how often it
climbs back to a module it already left.

    python bench/config_walk.py                       # rafale -c test/pythia_debug.yaml, 2 batches, in /tmp
    python bench/config_walk.py --config my.yaml --steps 4 --show

It runs `rafale -c CONFIG` in this process under sys.setprofile and records a *stop* at every call of a rafale
function that is handed the config or one of its sections (an argument whose type is defined in rafale.config:
Config, RunConfig, DataConfig, ModelConfig, TrainingConfig). Consecutive stops in one module are one visit; the
figures are the stops, the modules they fall in, the moves from one module to another, and the *returns*: the moves
into a module the walk had already left. A short run (--steps batches, one evaluation, one checkpoint) walks the
config the same way a long one does: the walk is the set-up and the end of the run, not the batches.
"""

import argparse
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def config_types() -> tuple[type, ...]:
    import dataclasses

    import rafale.config as config

    return tuple(v for v in vars(config).values()
                 if isinstance(v, type) and dataclasses.is_dataclass(v) and v.__module__ == "rafale.config")


def trace(argv: list[str]) -> list[tuple[str, str]]:
    """(module, function) of every call of a rafale function handed the config or a section of it."""
    from rafale.main import main

    kinds = config_types()
    stops: list[tuple[str, str]] = []

    def profile(frame, event, arg):
        if event != "call":
            return
        module = frame.f_globals.get("__name__", "")
        if not module.startswith("rafale"):
            return
        code = frame.f_code
        names = code.co_varnames[:code.co_argcount + code.co_kwonlyargcount]
        local = frame.f_locals
        if any(isinstance(local.get(name), kinds) for name in names):
            stops.append((module, code.co_qualname))

    sys.setprofile(profile)
    try:
        code = main(argv)
    except SystemExit as stop:  # the CLI exits
        code = stop.code
    finally:
        sys.setprofile(None)
    if code not in (0, None):
        raise SystemExit(f"rafale {' '.join(argv)} exited {code}")
    return stops


def walk_figures(stops: list[tuple[str, str]]) -> dict:
    visits = [m for i, (m, _) in enumerate(stops) if i == 0 or stops[i - 1][0] != m]
    seen, returns = set(), []
    for before, now in zip(visits, visits[1:]):
        seen.add(before)
        if now in seen:
            returns.append(now)
    return {"stops": len(stops), "modules": len({m for m, _ in stops}), "moves": len(visits) - 1,
            "returns": len(returns), "visits": visits}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(ROOT / "test" / "pythia_debug.yaml"))
    parser.add_argument("--steps", type=int, default=2, help="batches to train (one evaluation, one checkpoint)")
    parser.add_argument("--out", default=None, help="run.output_dir (default: a temporary folder)")
    parser.add_argument("--show", action="store_true", help="print every stop, not only the visits")
    args = parser.parse_args()
    os.environ.setdefault("RAFALE_CACHE", str(Path(tempfile.gettempdir()) / "rafale-config-walk-cache"))
    out = args.out or tempfile.mkdtemp(prefix="config-walk-")
    steps = f"{args.steps}ba"
    argv = ["-c", args.config, f"run.output_dir={out}", "run.restart=true", f"training.max_duration={steps}",
            f"training.eval_interval={steps}", f"training.save_interval={steps}"]
    import rafale

    print(f"rafale from {Path(rafale.__file__).parent}; rafale {' '.join(argv)}")
    stops = trace(argv)
    figures = walk_figures(stops)
    if args.show:
        for module, function in stops:
            print(f"  {module}.{function}")
    print("visits: " + " -> ".join(m.removeprefix("rafale.") for m in figures["visits"]))
    print(f"config walk: {figures['stops']} stops in {figures['modules']} modules, {figures['moves']} moves between "
          f"modules, {figures['returns']} of them returns to a module already left")


if __name__ == "__main__":
    main()
