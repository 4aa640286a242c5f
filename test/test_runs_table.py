"""Comparing runs: `rafale runs` (the hyperparameters that differ, sorting, CSV), the sweep's folder names and
table, and the pictures (metrics.png's own axis for bits per byte, an overlay's legend saying what differs).

The run folders are made by hand, in the formats rafale writes: config.yaml by rafale.config.save_config,
summary.json as rafale.run.record.RunRecord writes it, metrics.jsonl as rafale.run.loggers.MetricsFile does."""

import csv
import io
import json
import math
from pathlib import Path

import pytest

from rafale.config import Config, load_config, save_config
from rafale.errors import RafaleError
from rafale.run_folder.plots import run_figure, runs_figure, runs_table, what_differs
from rafale.commands.runs import runs_main
from rafale.commands.sweep import run_name, sweep_table

LOSS, PPL, BPB = "metrics/eval/LanguageCrossEntropy", "metrics/eval/LanguagePerplexity", "metrics/eval/BitsPerByte"


def fake_run(root: Path, name: str, losses: list[float], bits: list[float] | None = None, lr: float = 1e-3,
             optimizer: str = "adamw", seed: int = 42, config: bool = True, accuracy: list[float] | None = None,
             data: dict | None = None) -> Path:
    """A complete run folder evaluated at steps 0, 10, 20, ...: config.yaml, metrics.jsonl and summary.json; a
    classifier's (model.task classification) when given `accuracy`; `data`: data section values."""
    run_dir = root / name
    run_dir.mkdir(parents=True)
    if config:
        cfg = Config()
        cfg.run.name, cfg.run.output_dir, cfg.run.seed = name, str(root), seed
        cfg.training.lr, cfg.training.optimizer = lr, {"name": optimizer}
        cfg.model.task = "classification" if accuracy else "causal_lm"
        for key, value in (data or {}).items():
            setattr(cfg.data, key, value)
        save_config(cfg, run_dir / "config.yaml")
    rows, validation = [], {}
    for i, loss in enumerate(losses):
        if accuracy:
            validation = {"CrossEntropy": loss, "Accuracy": accuracy[i]} if loss else {"Accuracy": accuracy[i]}
        else:
            validation = {"LanguageCrossEntropy": loss, "LanguagePerplexity": math.exp(loss)}
            if bits:
                validation["BitsPerByte"] = bits[i]
        rows.append({"step": 10 * i, "time/token": 10 * i * 512, "loss/train/total": (loss or 1.0) + 0.1,
                     "lr-base": lr, "throughput/tokens_per_sec": 1000.0,
                     **{f"metrics/eval/{key}": value for key, value in validation.items()}})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    steps = 10 * (len(losses) - 1)
    summary = {"name": name, "model": "pythia pythia-debug", "task": "classification" if accuracy else "causal_lm", "parameters": 170_000,
               "status": "complete", "batches": steps, "tokens": steps * 512, "wall_time_s": 60.0,
               "tokens_per_s": 1000.0, "validation": validation, "validation_step": steps}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return run_dir


@pytest.fixture
def three_runs(tmp_path):
    """a, b, c: alphabetical order is not the order of their final validation loss (b 1.5, c 2.0, a 2.5)."""
    return [fake_run(tmp_path, "a", [6.0, 2.5], [3.1, 0.85], lr=3e-3),
            fake_run(tmp_path, "b", [6.0, 1.5], [3.1, 0.52], lr=3e-3, optimizer="soap"),
            fake_run(tmp_path, "c", [6.0, 2.0], [3.1, 0.70], lr=1e-3)]


def table(run_dirs, *args) -> tuple[list[str], list[list[str]]]:
    """`rafale runs`'s fixed-width table as its header and rows, split on runs of two or more spaces."""
    lines = runs_table(run_dirs, *args).splitlines()
    split = lambda line: [cell.strip() for cell in line.split("  ") if cell.strip()]
    return split(lines[0]), [split(line) for line in lines[2:]]


def test_the_table_shows_the_hyperparameters_that_differ_and_not_those_that_do_not(three_runs, tmp_path):
    no_config = fake_run(tmp_path, "d", [6.0, 3.0], [3.1, 1.0], config=False)
    header, rows = table(three_runs + [no_config])
    assert header[:3] == ["run", "lr", "optimizer.name"]
    # the same in every run (seed, batch_size), or bookkeeping that always differs (name, output_dir): no column
    assert not {"seed", "batch_size", "name", "run.name", "output_dir", "restart"} & set(header)
    by_run = {row[0]: dict(zip(header, row)) for row in rows}
    assert by_run["b"]["lr"] == "3e-3" and by_run["b"]["optimizer.name"] == "soap"
    assert by_run["c"]["lr"] == "1e-3" and by_run["c"]["optimizer.name"] == "adamw"
    assert "d" in by_run  # a run without config.yaml still lists, with nothing in those columns
    assert runs_table([no_config]).splitlines()[0].split()[:2] == ["run", "model"]
    # a seed shows when it differs
    assert what_differs([fake_run(tmp_path, "s1", [2.0], seed=1), fake_run(tmp_path, "s2", [2.0], seed=2)]) == [
        {"seed": "1"}, {"seed": "2"}]


def test_the_table_has_bits_per_byte_and_sorts_by_final_validation_loss(three_runs):
    header, rows = table(three_runs)
    assert [row[0] for row in rows] == ["b", "c", "a"]
    assert "bits/byte" in header and [row[header.index("bits/byte")] for row in rows] == [
        "0.5200", "0.7000", "0.8500"]


def test_classifiers_sort_by_accuracy_highest_first(tmp_path):
    runs = [fake_run(tmp_path, name, [None, None], accuracy=[0.5, value], lr=lr)
            for name, value, lr in (("x", 0.7, 1e-3), ("y", 0.9, 2e-3), ("z", 0.8, 3e-3))]
    header, rows = table(runs)
    assert "val loss" not in header and [row[0] for row in rows] == ["y", "z", "x"]


def test_sort_by_any_column(three_runs, capsys):
    assert [row[0] for row in table(three_runs, "lr")[1]] == ["c", "a", "b"]
    assert [row[0] for row in table(three_runs, "training.lr")[1]] == ["c", "a", "b"]  # the whole key works too
    assert [row[0] for row in table(three_runs, "lr", True)[1]][-1] == "c"
    assert [row[0] for row in table(three_runs, "optimizer.name")[1]] == ["a", "c", "b"]
    assert [row[0] for row in table(three_runs, "bits/byte", True)[1]] == ["a", "c", "b"]
    with pytest.raises(RafaleError, match="no such column"):
        runs_table(three_runs, "momentum")
    assert runs_main([str(three_runs[0].parent), "--sort", "lr"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines[2:5]] == ["c", "a", "b"]


def test_csv_has_the_tables_rows_as_plain_numbers_in_base_units(three_runs, capsys):
    """The fixed-width table says 204,800 tokens, 7.4 min and 1.31M parameters; CSV the summary.json's numbers,
    the unit in the header, each cell read back by float() equal to the summary's value."""
    summary_file = three_runs[1] / "summary.json"
    summary = json.loads(summary_file.read_text()) | {
        "tokens": 204_800, "wall_time_s": 444.0, "parameters": 1_310_720, "non_embedding_parameters": 66_304,
        "training_flops": 6 * 66_304 * 204_800, "tokens_per_s": 461.26126126126127, "mfu": 0.074}
    summary_file.write_text(json.dumps(summary))
    header, rows = table(three_runs)
    assert "204,800" in rows[0] and "7.4 min" in rows[0] and "1.31M" in rows[0]  # the table stays human
    assert runs_main([str(three_runs[0].parent), "--csv"]) == 0
    parsed = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [row["run"] for row in parsed] == [row[0] for row in rows] == ["b", "c", "a"]  # the table's order
    assert list(parsed[0]) == ["run", "lr", "optimizer.name", "model", "status", "params", "N_params", "tokens",
                               "C_flops", "wall_s", "tok_per_s", "mfu_pct", "val loss", "ppl", "bits/byte"]
    units = {"params": "parameters", "N_params": "non_embedding_parameters", "tokens": "tokens",
             "C_flops": "training_flops", "wall_s": "wall_time_s", "tok_per_s": "tokens_per_s"}
    for row, run in zip(parsed, (three_runs[1], three_runs[2], three_runs[0])):
        expected = json.loads((run / "summary.json").read_text())
        for column, key in units.items():
            assert (float(row[column]) if row[column] else None) == expected.get(key), (column, row[column])
        assert float(row["val loss"]) == expected["validation"]["LanguageCrossEntropy"]
        assert float(row["ppl"]) == expected["validation"]["LanguagePerplexity"]  # every digit, not 4 decimals
        assert float(row["bits/byte"]) == expected["validation"]["BitsPerByte"]
        assert float(row["lr"]) in (1e-3, 3e-3) and row["status"] == "complete"
    assert parsed[0]["tokens"] == "204800" and parsed[0]["wall_s"] == "444.0" and parsed[0]["params"] == "1310720"
    assert float(parsed[0]["mfu_pct"]) == pytest.approx(7.4) and parsed[1]["mfu_pct"] == ""


def test_values_are_escaped_onto_one_line(tmp_path):
    runs = [fake_run(tmp_path, "lines", [6.0, 2.0], data={"doc_separator": "\n"}),
            fake_run(tmp_path, "tabs", [6.0, 2.5], data={"doc_separator": "\t|"})]
    lines = runs_table(runs).splitlines()
    assert len(lines) == 4  # header, rule, one line per run
    header, rows = table(runs)
    separators = {row[0]: row[header.index("doc_separator")] for row in rows}
    assert separators == {"lines": "\\n", "tabs": "\\t|"}


def test_runs_of_other_tasks_or_data_are_separate_tables(tmp_path):
    """A classifier's low loss is not ranked among language models, nor a run on other data among these."""
    lm = [fake_run(tmp_path, "lm-a", [6.0, 2.5], lr=1e-3), fake_run(tmp_path, "lm-b", [6.0, 2.0], lr=3e-3)]
    other_data = fake_run(tmp_path, "lm-kjv", [6.0, 1.0], data={"source": "kjv.txt"})
    classifier = fake_run(tmp_path, "cls", [0.24, 0.2398], accuracy=[0.5, 0.9])
    text = runs_table(lm + [classifier, other_data])
    blocks = [block.splitlines() for block in text.split("\n\n")]
    assert [block[0] for block in blocks] == ["causal_lm on stories (2 runs)", "classification on stories (1 run)",
                                              "causal_lm on kjv.txt (1 run)"]
    first = [line.split()[0] for line in blocks[0][3:]]
    assert first == ["lm-b", "lm-a"]  # ranked among themselves; the classifier's 0.2398 is in its own table
    assert "lr" in blocks[0][1].split() and "lr" not in blocks[1][1].split()  # what differs inside each group
    assert "accuracy" in blocks[1][1] and "accuracy" not in blocks[0][1]
    # CSV: every run in one table, each with its group, ranked within it
    rows = list(csv.DictReader(io.StringIO(runs_table(lm + [classifier, other_data], as_csv=True))))
    assert [(row["run"], row["group"]) for row in rows] == [
        ("lm-b", "causal_lm on stories"), ("lm-a", "causal_lm on stories"), ("cls", "classification on stories"),
        ("lm-kjv", "causal_lm on kjv.txt")]


def test_the_table_fits_the_width_and_names_what_it_left_out(three_runs, capsys, monkeypatch):
    wide = runs_table(three_runs)
    assert max(map(len, wide.splitlines())) > 60
    narrow = runs_table(three_runs, width=60).splitlines()
    assert all(len(line) <= 60 for line in narrow[:-1])
    header = narrow[0].split()
    assert header[:1] == ["run"] and "val loss" in narrow[0] and "tok/s" not in header
    left_out = narrow[-1]
    assert left_out.startswith("(") and "tok/s" in left_out and "--all" in left_out
    # the CLI: as wide as the terminal; --all every column; --columns those columns
    monkeypatch.setenv("COLUMNS", "60")
    assert runs_main([str(three_runs[0].parent)]) == 0
    assert capsys.readouterr().out.strip() == "\n".join(narrow)
    assert runs_main([str(three_runs[0].parent), "--all"]) == 0
    assert capsys.readouterr().out.strip() == wide
    assert runs_main([str(three_runs[0].parent), "--columns", "training.lr,tok/s"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["run", "lr", "tok/s"] and len(lines) == 5
    with pytest.raises(RafaleError, match="no such column"):
        runs_main([str(three_runs[0].parent), "--columns", "momentum"])


def test_sweep_folder_names_keep_the_whole_key_without_its_section():
    name = run_name("sw", ["training.optimizer.name=adamw", "training.lr=3e-3"])
    assert name == "sw-optimizer.name-adamw-lr-3e-3" and "=" not in name
    assert run_name("sw", ["model.num_layers=2"]) == "sw-num_layers-2"
    assert run_name("sw", ["run.seed=1", "data.seed=2"]) == "sw-run.seed-1-data.seed-2"  # the same without section
    assert run_name("sw", ["data.source=a/b c.txt"]) == "sw-source-a_b_c.txt"
    assert run_name("sw", ["training.betas=[0.9,0.95]"]) == "sw-betas-0.9_0.95"


def test_the_sweep_table_has_bits_per_byte_and_marks_the_best_run(three_runs, tmp_path):
    points = {"a": ["training.lr=3e-3"], "b": ["training.lr=3e-3", "training.optimizer.name=soap"],
              "c": ["training.lr=1e-3"]}
    text = sweep_table([(run_dir.name, points[run_dir.name], run_dir) for run_dir in three_runs])
    lines = text.splitlines()
    assert "bits/byte" in lines[0]
    row = {line.split(" | ")[0].strip("| "): line for line in lines if line.startswith("| ") and "---" not in line}
    assert "| 1.5000 ★ |" in row["b"] and "★" not in row["a"] + row["c"]
    assert "| 0.5200 |" in row["b"] and "| 0.8500 |" in row["a"]
    assert "★ best final validation loss: b" in text
    assert "Validation: the whole validation split (training.eval_batches unset)." in text
    for run_dir in three_runs:  # validation on the first 8 batches: the table says so
        cfg = load_config(run_dir / "config.yaml", saved_run=True)
        cfg.training.eval_batches, cfg.training.batch_size = 8, 16
        save_config(cfg, run_dir / "config.yaml")
    text = sweep_table([(run_dir.name, points[run_dir.name], run_dir) for run_dir in three_runs])
    assert ("Validation: the first 8 batches of 16 of the validation split (training.eval_batches: 8), at most 128 "
            "blocks or examples.") in text
    # classifiers: the highest accuracy is best, and there is no bits/byte column
    runs = [fake_run(tmp_path / "cls", name, [None, None], accuracy=[0.5, value]) for name, value in
            (("x", 0.7), ("y", 0.9))]
    text = sweep_table([(run_dir.name, [], run_dir) for run_dir in runs])
    assert "bits/byte" not in text and "| 0.9000 ★ |" in text and "best final validation accuracy: y" in text


def test_metrics_png_puts_bits_per_byte_on_an_axis_of_its_own(tmp_path):
    run_dir = fake_run(tmp_path, "lm", [6.0, 3.0, 1.2], [3.1, 2.2, 1.77])
    fig = run_figure(run_dir)
    by_label = {ax.get_ylabel(): ax for ax in fig.axes if ax.get_ylabel()}
    perplexity, bits = by_label["perplexity"], by_label["bits per byte"]
    assert perplexity is not bits
    assert perplexity.get_yscale() == "log" and bits.get_yscale() == "linear"
    assert [list(line.get_ydata()) for line in bits.get_lines()] == [[3.1, 2.2, 1.77]]
    assert [line.get_label() for line in perplexity.get_lines()] == ["LanguagePerplexity"]
    low, high = bits.get_ylim()
    assert low < 1.77 and 3.1 < high < 10  # its own scale, not perplexity's
    # the one legend names both curves
    legend = next(ax.get_legend() for ax in fig.axes if ax.get_legend() and ax.get_title() == "validation")
    assert {text.get_text() for text in legend.get_texts()} == {"LanguagePerplexity", "bits per byte"}


def test_the_overlay_legend_says_what_differs(three_runs, tmp_path):
    fig = runs_figure(three_runs)
    labels = [text.get_text() for text in fig.axes[0].get_legend().get_texts()]
    assert labels == ["lr=3e-3 optimizer.name=adamw", "lr=3e-3 optimizer.name=soap", "lr=1e-3 optimizer.name=adamw"]
    # runs that differ in nothing are named by their folders
    same = [fake_run(tmp_path / "same", name, [6.0, 2.0]) for name in ("p", "q")]
    assert [t.get_text() for t in runs_figure(same).axes[0].get_legend().get_texts()] == ["p", "q"]
    # evaluated at the start and the end only: markers; three evaluations or more: a dashed curve through them
    curve = fake_run(tmp_path / "curve", "r", [6.0, 3.0, 2.0])
    lines = {line.get_label(): line for line in runs_figure([same[0], curve]).axes[0].get_lines()}
    assert lines["p"].get_linestyle() == "None" and lines["p"].get_marker() == "o"
    assert lines["r"].get_linestyle() == "--" and lines["r"].get_marker() == "o"


def test_runs_and_plot_read_a_killed_runs_cut_metrics_line(tmp_path, capsys):
    """A process killed mid-write leaves metrics.jsonl ending in a cut line: `rafale runs` and `rafale plot` read
    the rows before it (the one reader, rafale.run_folder.metrics_rows, which the resume's compaction uses too)."""
    from rafale.main import main
    from rafale.run_folder import metrics_rows, read_metrics
    from rafale.run.record import compact_metrics

    run_dir = fake_run(tmp_path, "killed", [6.0, 2.5], [3.1, 0.85])
    with (run_dir / "metrics.jsonl").open("a") as f:
        f.write('{"step": 20, "loss/train/total": 2.')
    assert [row["step"] for row in metrics_rows(run_dir / "metrics.jsonl")] == [0, 10]
    assert read_metrics(run_dir)[LOSS] == [(0, 6.0), (10, 2.5)]
    for argv in (["runs", str(run_dir)], ["plot", str(run_dir)]):
        with pytest.raises(SystemExit) as exit:
            main(argv)
        assert exit.value.code == 0, capsys.readouterr().err
    assert "killed" in capsys.readouterr().out and (run_dir / "metrics.png").is_file()
    compact_metrics(run_dir)
    assert [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [0, 10]


def test_log_axes_read_as_plain_numbers(three_runs):
    """The overlay's loss axis spans less than a decade: its labels read 2, 3, 6, not 2x10^0 (sweep-*.png)."""
    fig = runs_figure(three_runs)
    fig.canvas.draw()
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_yticklabels() + ax.get_yticklabels(minor=True) if t.get_text()]
    assert labels and all(float(label.replace("\u2212", "-")) > 0 for label in labels), labels
    assert {"2", "3", "6"} <= set(labels), labels
    # a run's metrics.png: perplexity's log axis too
    fig = run_figure(three_runs[0])
    fig.canvas.draw()
    perplexity = next(ax for ax in fig.axes if ax.get_ylabel() == "perplexity")
    labels = [t.get_text() for t in perplexity.get_yticklabels() + perplexity.get_yticklabels(minor=True) if t.get_text()]
    assert labels and not any("times" in label or "^" in label for label in labels), labels


@pytest.fixture
def seeded_runs(tmp_path):
    """Two arms: lr 1e-3 at seeds 1, 2, 3 (seed 3 stopped at batch 5) and lr 3e-3 at seeds 1, 2."""
    runs = [fake_run(tmp_path, f"sw-lr-1e-3-seed-{seed}", [6.0, loss], lr=1e-3, seed=seed)
            for seed, loss in ((1, 2.50), (2, 2.54), (3, 2.00))]
    runs += [fake_run(tmp_path, f"sw-lr-3e-3-seed-{seed}", [6.0, loss], lr=3e-3, seed=seed)
             for seed, loss in ((1, 2.31), (2, 2.37))]
    summary = json.loads((runs[2] / "summary.json").read_text())
    (runs[2] / "summary.json").write_text(json.dumps(summary | {"status": "stopped", "batches": 5}))
    return runs


def test_runs_that_differ_only_in_their_seed_are_one_line_with_their_mean_interval_and_n(seeded_runs, capsys):
    from rafale.stats import summarize

    assert runs_main([str(seeded_runs[0].parent), "--all"]) == 0
    lines = capsys.readouterr().out.splitlines()
    split = lambda line: [cell.strip() for cell in line.split("  ") if cell.strip()]
    header = split(lines[0])
    rows = {row[0]: dict(zip(header, row)) for row in map(split, lines[2:4])}
    assert header[:7] == ["run", "lr", "val loss", "±95%", "sd", "n", "seeds"] and len(rows) == 2
    assert [split(line)[0] for line in lines[2:4]] == ["sw-lr-3e-3-seed-*", "sw-lr-1e-3-seed-*"]  # best mean first
    low = rows["sw-lr-1e-3-seed-*"]
    # the stopped run is not averaged in, and the n and the left-out column say so: mean of 2.50 and 2.54 by hand
    assert low["val loss"] == "2.5200" and low["n"] == "2 of 3" and low["seeds"] == "1,2"
    assert "sw-lr-1e-3-seed-3 (stopped at batch 5)" in lines[3]
    # sd and the interval are rafale.stats' (hand: sd = 0.04 / sqrt 2; half-width = t(0.975, 1) x 0.04 / 2)
    expected = summarize([2.50, 2.54])
    assert low["sd"] == f"{expected.sd:.4f}" == f"{0.04 / math.sqrt(2):.4f}"
    assert low["±95%"] == f"{(expected.high - expected.low) / 2:.4f}" == f"{12.7062 * 0.02:.4f}"
    # CSV: the arms' figures as plain numbers
    assert runs_main([str(seeded_runs[0].parent), "--csv"]) == 0
    by_arm = {row["run"]: row for row in csv.DictReader(io.StringIO(capsys.readouterr().out))}
    high = summarize([2.31, 2.37])
    assert by_arm["sw-lr-3e-3-seed-*"]["metric"] == "LanguageCrossEntropy" and by_arm["sw-lr-3e-3-seed-*"]["n"] == "2"
    assert [float(by_arm["sw-lr-3e-3-seed-*"][key]) for key in ("mean", "sd", "low", "high")] == pytest.approx(
        [high.mean, high.sd, high.low, high.high], abs=1e-12)
    # --runs: one line per run, the seed a column
    assert runs_main([str(seeded_runs[0].parent), "--runs", "--all"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 + 5 and "seed" in split(lines[0])


OLD_LAW_NAME = "law-overrides-_hidden_size__{}__intermediate_size__{}__num_heads__6_"  # the old sweep's 84 characters


@pytest.mark.parametrize("width", [80, 100])
def test_long_run_names_leave_room_for_the_loss_at_80_and_100_columns(tmp_path, width):
    """Run folders named as the README's law sweep named them before (up to 84 characters) at 80 and 100 columns:
    the run column is cut (the shared prefix said once above, the middle of the rest left out), so that the
    names, still told apart, the validation loss, bits per byte and perplexity all fit."""
    runs = []
    for i, (h, budget) in enumerate([(48, ""), (48, "-cooldown-300ba"), (64, ""), (64, "-cooldown-300ba")]):
        name = OLD_LAW_NAME.format(h, 4 * h) + budget
        runs.append(fake_run(tmp_path, name, [6.0, 2.0 + i / 10], [3.1, 0.6 + i / 10], lr=1e-3 * (i + 1)))
    assert max(len(run.name) for run in runs) == 84
    lines = runs_table(runs, width=width).splitlines()
    assert lines[0] == ("(run: without the start every name shares, law-overrides-_hidden_size__; … marks a long "
                        "name's middle left out; --all shows whole names)")
    assert all(len(line) <= width for line in lines[1:-1]) and lines[-1].startswith("(") and "more column" in lines[-1]
    header = [cell.strip() for cell in lines[1].split("  ") if cell.strip()]
    assert header[0] == "run" and {"val loss", "bits/byte", "ppl"} <= set(header)
    rows = {line.split()[0]: line.split() for line in lines[3:-1]}
    assert len(rows) == 4 and sum(name.endswith("cooldown-300ba") for name in rows) == 2  # told apart
    assert all(name.startswith(("48_", "64_")) for name in rows)
    # each name's row has its own loss (fake_run's 2.0, 2.1, ... in the order above)
    for run, loss in zip(runs, ("2.0000", "2.1000", "2.2000", "2.3000")):
        short = run.name.removeprefix("law-overrides-_hidden_size__")
        (name,) = [name for name in rows if name.startswith(short[:3]) and name.endswith(short[-5:])]
        assert rows[name][header.index("val loss")] == loss
    # --all: the whole names, nothing said above
    whole = runs_table(runs).splitlines()
    assert whole[0].split()[0] == "run" and {run.name for run in runs} <= {line.split()[0] for line in whole[2:]}


def test_plain_rafale_runs_finds_nested_run_folders_and_tells_same_names_apart(tmp_path, capsys, monkeypatch):
    """After the README's law sweep, runs/ holds the default run and runs/law/*: `rafale runs` (default runs/)
    lists them all, not the evaluations and exports inside a run folder (each with a summary.json of its own),
    and two runs named alike in different folders show their path below runs/."""
    runs = tmp_path / "runs"
    default = fake_run(runs, "pythia-tiny-stories", [6.0, 2.5], lr=1e-3)
    law = [fake_run(runs / "law", f"law-hs{h}-is{4 * h}", [6.0, 2.0 + h / 1000], lr=2e-3) for h in (48, 64)]
    old = fake_run(runs / "old" / "deeper", "law-hs48-is192", [6.0, 3.0], lr=3e-3)
    evaluation = law[0] / "evals" / "2026-01-01T00-00-00"
    evaluation.mkdir(parents=True)
    (evaluation / "summary.json").write_text((law[0] / "summary.json").read_text())
    (law[0] / "checkpoints").mkdir()
    monkeypatch.chdir(tmp_path)
    assert runs_main(["--all"]) == 0
    lines = capsys.readouterr().out.splitlines()
    names = [line.split()[0] for line in lines[2:]]
    assert sorted(names) == sorted(["pythia-tiny-stories", "law/law-hs48-is192", "law-hs64-is256",
                                    "old/deeper/law-hs48-is192"])
    # the one named alike are told apart and keep their own figures: law/... 2.048, old/deeper/... 3.0
    assert "2.0480" in next(line for line in lines if line.startswith("law/law-hs48-is192"))
    assert "3.0000" in next(line for line in lines if line.startswith("old/deeper/law-hs48-is192"))
    # CSV and --where read the same runs
    assert runs_main(["--csv"]) == 0
    assert sorted(row["run"] for row in csv.DictReader(io.StringIO(capsys.readouterr().out))) == sorted(names)
    assert runs_main(["--where", "val loss>2.9", "--all"]) == 0
    (only,) = capsys.readouterr().out.splitlines()[2:]  # alone in its table, its name needs no path
    assert only.split()[0] == "law-hs48-is192" and "3.0000" in only
    with pytest.raises(RafaleError, match="no run folders in empty or below"):
        (tmp_path / "empty" / "sub").mkdir(parents=True)
        runs_main(["empty"])
