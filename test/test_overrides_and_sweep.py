"""Command-line overrides (`rafale -c cfg.yaml training.lr=3e-3`) and `rafale sweep`."""

import json
import math
import re

import pytest
import yaml

from rafale.config import ConfigError, apply_overrides, load_config
from rafale.main import parse_args
from rafale.commands.sweep import grid, parse_sweep_args, run_name, split_values, sweep_axes
from conftest import ROOT, run_in_process, write_config


def csv_rows(text: str) -> list[dict]:
    import csv
    import io

    return list(csv.DictReader(io.StringIO(text)))


def test_both_spellings_of_an_override_reach_the_config(tmp_path):
    args = parse_args(["-c", str(ROOT / "test" / "pythia_debug.yaml"), "training.lr=7e-4", "--model.num_layers", "3",
                       "--debug", "--run.loggers=[tensorboard]"])
    assert args.debug and args.overrides == ["training.lr=7e-4", "model.num_layers=3", "run.loggers=[tensorboard]"]
    cfg = load_config(args.config, args.overrides)
    assert cfg.training.lr == 7e-4 and cfg.model.overrides["num_layers"] == 3 and cfg.run.loggers == ["tensorboard"]
    assert load_config(args.config).training.lr != 7e-4  # the file itself is untouched


@pytest.mark.parametrize("override, key, message", [
    ("training.lr=fast", "training.lr", "expected a number"),
    ("training.lrr=1e-3", "training.lrr", "did you mean 'lr'"),
    ("lr=1e-3", "lr", "section.key=value"),
    ("training.lr", "training.lr", "section.key=value"),
    ("training.lr.x=1", "training.lr", "not a section"),
])
def test_a_bad_override_is_a_config_error_naming_the_key(override, key, message):
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "test" / "pythia_debug.yaml", [override])
    assert err.value.key == key and message in str(err.value)


def test_nested_override_creates_the_section():
    assert apply_overrides({"training": {"lr": 1}}, ["training.optimizer.name=soap"]) == {
        "training": {"lr": 1, "optimizer": {"name": "soap"}}}


def test_sweep_grid_and_names():
    assert split_values("1e-3,3e-3") == ["1e-3", "3e-3"]
    assert split_values("[0.9,0.95],[0.9,0.99]") == ["[0.9,0.95]", "[0.9,0.99]"]
    assert grid(["training.lr=1,2", "model.num_layers=3"]) == [["training.lr=1", "model.num_layers=3"],
                                                               ["training.lr=2", "model.num_layers=3"]]
    assert run_name("base", ["training.lr=3e-3", "training.betas=[0.9,0.95]"]) == "base-lr-3e-3-betas-0.9_0.95"


LAW_AXIS = ("model.overrides={hidden_size: 48, intermediate_size: 192, num_heads: 6},{hidden_size: 64, "
            "intermediate_size: 256},{hidden_size: 96, intermediate_size: 384},{hidden_size: 128, intermediate_size: 512}")


def test_a_mapping_value_is_named_by_its_varying_keys_abbreviated():
    """The README's law sweep (test/law_stories.yaml's axis): each point named by the keys that vary between the
    mappings (num_heads only the first has), by their initials; a key the same in every mapping is left out."""
    from rafale.commands.sweep import axes_values, unique_names

    points = grid([LAW_AXIS])
    values = axes_values(points)
    assert [run_name("law", point, values) for point in points] == [
        "law-hs48-is192-nh6", "law-hs64-is256", "law-hs96-is384", "law-hs128-is512"]
    same_heads = grid(["model.overrides={hidden_size: 48, num_heads: 4},{hidden_size: 64, num_heads: 4}",
                       "training.optimizer={name: soap, lr: 0.1},{name: adamw, lr: 0.1}"])
    values = axes_values(same_heads)
    assert run_name("x", same_heads[0], values) == "x-hs48-name_soap"
    assert run_name("x", ["model.overrides={dropout: 0.1, a: {rope_theta: 5}}"]) == "x-dropout0.1-rt5"
    # too long: cut, with a hash of the point that is the same on every call; colliding names get the hash too
    long = run_name("x", ["data.source=" + "a" * 100])
    assert len(long) == len("x-") + 60 and long == run_name("x", ["data.source=" + "a" * 100])
    assert long != run_name("x", ["data.source=" + "a" * 99])
    twins = [["data.source=a/b"], ["data.source=a b"]]
    names = unique_names([run_name("x", point) for point in twins], twins)
    assert names[0].startswith("x-source-a_b-") and len(set(names)) == 2


def test_a_sweep_of_the_law_axis_trains_in_the_short_folders(tmp_path, cache_dir, capsys, monkeypatch):
    """The names reach the run folders: the law sweep's mappings on the debug preset (2 points, 1 batch each)."""
    cfg = write_config(tmp_path / "cfg.yaml", run={"output_dir": str(tmp_path / "runs"), "name": "law"},
                       training={"max_duration": "1ba", "eval_interval": "1ba", "save_interval": "1ba"})
    axis = "model.overrides={hidden_size: 32, intermediate_size: 64},{hidden_size: 64, intermediate_size: 128}"
    code, out, err = run_in_process(["sweep", "-c", str(cfg), axis], capsys, monkeypatch)
    assert code == 0, err[-3000:]
    assert {p.name for p in (tmp_path / "runs").iterdir() if p.is_dir()} == {"law-hs32-is64", "law-hs64-is128"}


def test_sweep_runs_the_grid_records_overrides_and_skips_finished_runs(tmp_path, cache_dir, capsys, monkeypatch):
    cfg = write_config(tmp_path / "cfg.yaml", run={"output_dir": str(tmp_path / "runs"), "name": "sw"},
                       training={"max_duration": "4ba", "eval_interval": "4ba", "save_interval": "4ba"})
    code, out, err = run_in_process(["sweep", "-c", str(cfg), "training.lr=1e-3,1e-2", "training.max_duration=4ba"],
                                    capsys, monkeypatch)
    assert code == 0, err[-3000:]  # a one-value axis applies to every run and is left out of the names
    for lr in ("1e-3", "1e-2"):
        saved = yaml.safe_load((tmp_path / "runs" / f"sw-lr-{lr}" / "config.yaml").read_text())
        assert saved["training"]["lr"] == float(lr)  # the override is in the run's resolved config
    table = (tmp_path / "runs" / "sweep-sw.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| sw-")]
    assert len(rows) == 2 and all(re.search(r"\| \d\.\d{4}( ★)? \| \d\.\d{4} \(step 4\) \|", r) for r in rows), table
    # the row names what varies; what every run shares is said once, above the table
    assert "| sw-lr-1e-3 | training.lr=1e-3 |" in table and table.startswith("Every run: training.max_duration=4ba\n")
    assert (tmp_path / "runs" / "sweep-sw.png").read_bytes()[:4] == b"\x89PNG"
    code, out, _ = run_in_process(["sweep", "-c", str(cfg), "training.lr=1e-3,1e-2"], capsys, monkeypatch)
    assert code == 0 and out.count("completed before with this config; skipped") == 2


def test_sweep_checks_every_combination_before_the_first_run(tmp_path, cache_dir, capsys, monkeypatch):
    cfg = write_config(tmp_path / "cfg.yaml", run={"output_dir": str(tmp_path / "runs")})
    code, _, err = run_in_process(["sweep", "-c", str(cfg), "training.lr=1e-3,oops"], capsys, monkeypatch)
    assert code == 2 and "training.lr" in err and not (tmp_path / "runs").exists()


def test_seeds_are_an_axis_named_last_from_the_configs_seed():
    axes = lambda *argv: sweep_axes(parse_sweep_args(["-c", "x.yaml", *argv]), 42)
    assert axes("training.lr=1e-3,3e-3", "--seeds", "3") == (["training.lr=1e-3,3e-3", "run.seed=42,43,44"], None)
    # a run.seed axis of the command line's own is the same axis, moved last so that names end in -seed-S
    assert axes("run.seed=0,1", "training.lr=1e-3,3e-3") == (["training.lr=1e-3,3e-3", "run.seed=0,1"], None)
    assert axes("--tune", "training.lr=0,1e-2", "--seeds", "2") == (
        ["training.lr=0,1e-2", "run.seed=42,43"], "training.lr")
    assert run_name("sw", ["training.lr=3e-3", "run.seed=43"]) == "sw-lr-3e-3-seed-43"
    for argv, key in ((["run.seed=1,2", "--seeds", "2"], "run.seed"), (["--seeds", "0"], "--seeds"),
                      (["training.lr=1,2", "--tune", "training.lr=3,4"], "training.lr"),
                      (["--tune", "training.lr=1e-3"], "--tune")):
        with pytest.raises(ConfigError) as err:
            axes(*argv)
        assert err.value.key == key


def test_a_sweep_with_seeds_gives_each_arm_its_mean_interval_and_n(tmp_path, cache_dir, capsys, monkeypatch):
    from rafale.stats import summarize

    cfg = write_config(tmp_path / "cfg.yaml", run={"output_dir": str(tmp_path / "runs"), "name": "sw"},
                       training={"max_duration": "2ba", "eval_interval": "2ba", "save_interval": "2ba"})
    code, out, err = run_in_process(["sweep", "-c", str(cfg), "training.lr=1e-2", "--seeds", "2"], capsys, monkeypatch)
    assert code == 0, err[-3000:]
    runs = tmp_path / "runs"
    losses = {}
    for seed in (42, 43):  # the config's run.seed and the next, each in a folder named by it
        assert yaml.safe_load((runs / f"sw-seed-{seed}" / "config.yaml").read_text())["run"]["seed"] == seed
        losses[seed] = json.loads((runs / f"sw-seed-{seed}" / "summary.json").read_text())["validation"][
            "LanguageCrossEntropy"]
    assert losses[42] != losses[43]  # the seed changed the run
    table = (runs / "sweep-sw.md").read_text()
    arm = next(line for line in table.splitlines() if line.startswith("| sw |")).split(" | ")
    expected = summarize(losses.values())  # rafale.stats on the runs' summaries; the mean and sd by hand too
    assert arm[2] == expected.text() + " ★" and arm[2].startswith(f"{(losses[42] + losses[43]) / 2:.4f} ± ")
    assert arm[3] == f"{expected.sd:.4f}" == f"{abs(losses[42] - losses[43]) / math.sqrt(2):.4f}"
    assert arm[4:] == ["2", "42,43 |"]
    assert "## Each run" in table and "| sw-seed-43 | run.seed=43 |" in table
    # `rafale runs` groups them the same way
    code, out, _ = run_in_process(["runs", str(runs), "--csv"], capsys, monkeypatch)
    (row,) = csv_rows(out)
    assert row["run"] == "sw-seed-*" and row["n"] == "2" and float(row["low"]) == pytest.approx(expected.low)
    # `rafale compare` on the two real runs: their difference, with no interval at one run a side
    code, out, _ = run_in_process(["compare", str(runs / "sw-seed-42"), str(runs / "sw-seed-43")], capsys, monkeypatch)
    assert code == 0 and f"A - B = {losses[42] - losses[43]:+.4f}, no interval (one run on a side)" in out


def test_tune_chooses_on_the_first_seed_and_reports_the_others(tmp_path, cache_dir, capsys, monkeypatch):
    """--tune training.lr=1e-9,1e-2: lr 1e-9 barely moves the weights in 2 batches, so 1e-2 wins, at the grid's
    edge; the arm is reported over seed 43 alone, the seed the choice never saw."""
    cfg = write_config(tmp_path / "cfg.yaml", run={"output_dir": str(tmp_path / "runs"), "name": "tu"},
                       training={"max_duration": "2ba", "eval_interval": "2ba", "save_interval": "2ba",
                                 "warmup": "0ba"})
    argv = ["sweep", "-c", str(cfg), "--tune", "training.lr=1e-9,1e-2", "--seeds", "2"]
    code, out, err = run_in_process(argv, capsys, monkeypatch)
    assert code == 0, err[-3000:]
    runs = tmp_path / "runs"
    trained = sorted(path.name for path in runs.iterdir() if path.is_dir())
    assert trained == ["tu-lr-1e-2-seed-42", "tu-lr-1e-2-seed-43", "tu-lr-1e-9-seed-42"]  # not 1e-9 at seed 43
    loss = {name: json.loads((runs / name / "summary.json").read_text())["validation"]["LanguageCrossEntropy"]
            for name in trained}
    assert loss["tu-lr-1e-2-seed-42"] < loss["tu-lr-1e-9-seed-42"]
    table = (runs / "sweep-tu.md").read_text()
    arm = next(line for line in table.splitlines() if line.startswith("| tu |")).split(" | ")
    assert arm[2] == "1e-2 (at the grid's edge: widen the grid)"
    assert arm[3] == f"1e-9: {loss['tu-lr-1e-9-seed-42']:.4f}, 1e-2: {loss['tu-lr-1e-2-seed-42']:.4f}"
    # the reported figure is seed 43's run alone, not the tuning seed's
    assert arm[4] == f"{loss['tu-lr-1e-2-seed-43']:.4f} (n=1, no interval) ★" and arm[6:] == ["1", "43 |"]
    assert "training.lr tuned per arm: chosen on seed 42 (the tuning column), reported over seeds 43" in table
    code, out, _ = run_in_process(argv, capsys, monkeypatch)  # a rerun skips every run and chooses the same
    assert code == 0 and out.count("completed before with this config; skipped") == 3
    assert (runs / "sweep-tu.md").read_text() == table


def test_a_tuned_value_at_the_grids_edge_is_flagged():
    from rafale.commands.sweep import grid_edge

    assert grid_edge(["1e-3", "3e-3", "1e-2"], "1e-2") and grid_edge(["1e-3", "3e-3", "1e-2"], "1e-3")
    assert not grid_edge(["1e-3", "3e-3", "1e-2"], "3e-3")
    assert not grid_edge(["adamw", "soap", "lion"], "adamw")  # names have no edge


def test_a_tuned_sweep_of_one_seed_says_its_figure_flatters_the_arm():
    from rafale.commands.sweep import SweepRow, arms_notes

    notes = "\n".join(arms_notes([SweepRow("sw", [], seeds=["42"])], {}, None, "LanguageCrossEntropy", "training.lr"))
    assert "tuned per arm on seed 42, and the figure reported is that seed's own run" in notes and "flatters" in notes


def test_a_sweep_with_cooldowns_counts_tables_and_draws_its_branches(tmp_path, cache_dir, capsys, monkeypatch):
    """Each point a WSD run of 10 batches with a cooldown to 5 (test_law's cheap cooldown setup, shorter): the
    progress counts the branches (1-2/4, 3-4/4), sweep-sw.md has a row for each branch with its budget, and the
    picture draws every run and branch (a run evaluated once: a marker, not a line)."""
    from rafale.run_folder.plots import runs_figure

    cfg = write_config(tmp_path / "cfg.yaml", run={"output_dir": str(tmp_path / "runs"), "name": "sw"},
                       training={"max_duration": "10ba", "warmup": "1ba", "schedule": "wsd", "decay_fraction": 0.2,
                                 "decay_shape": "linear", "cooldowns": ["5ba"], "checkpoints_to_keep": -1,
                                 "save_interval": "10ba", "eval_interval": "10ba"})
    code, out, err = run_in_process(["sweep", "-c", str(cfg), "training.lr=1e-3,3e-3"], capsys, monkeypatch)
    assert code == 0, (out + err)[-3000:]
    assert "rafale: sweep 1-2/4: sw-lr-1e-3 (training.lr=1e-3) and its cooldowns to 5ba" in out
    assert "rafale: sweep 3-4/4: sw-lr-3e-3 (training.lr=3e-3) and its cooldowns to 5ba" in out
    table = (tmp_path / "runs" / "sweep-sw.md").read_text()
    rows = {line.split(" | ")[0].lstrip("| "): line for line in table.splitlines() if line.startswith("| sw-")}
    assert list(rows) == ["sw-lr-1e-3", "sw-lr-1e-3-cooldown-5ba", "sw-lr-3e-3", "sw-lr-3e-3-cooldown-5ba"], table
    assert "| training.lr=3e-3 (cooldown to 5ba) | " in rows["sw-lr-3e-3-cooldown-5ba"]
    branch = json.loads((tmp_path / "runs" / "sw-lr-3e-3-cooldown-5ba" / "summary.json").read_text())
    assert f"| {branch['validation']['LanguageCrossEntropy']:.4f}" in rows["sw-lr-3e-3-cooldown-5ba"]
    # the picture: four runs, each validation (one evaluation) a marker without a line
    fig = runs_figure([tmp_path / "runs" / name for name in rows])
    validation = [line for line in fig.axes[0].get_lines() if line.get_label() and not line.get_label().startswith("_")]
    assert len(validation) == 4 and all(line.get_linestyle() == "None" and line.get_marker() == "o"
                                        for line in validation)
    code, out, _ = run_in_process(["sweep", "-c", str(cfg), "training.lr=1e-3,3e-3"], capsys, monkeypatch)
    assert code == 0 and "rafale: sweep 3-4/4: sw-lr-3e-3 and its cooldowns to 5ba completed before" in out
