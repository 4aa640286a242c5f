"""`rafale predict` and `rafale score` (rafale/commands/predict.py, score.py) on tiny runs trained here: on a run's own
validation file they give its validation figures, and neither imports Composer or transformers."""

import contextlib
import csv
import io
import json
import math
import subprocess
import sys

import pytest

from conftest import ROOT, write_config
from rafale.data.stories import labelled_story_splits, story_splits


def rafale(*args) -> tuple[int, str, str]:
    """rafale.main.main(args) in this process: (exit code, stdout, stderr)."""
    from rafale.main import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(list(args))
        except SystemExit as exit:
            code = exit.code
    return code, out.getvalue(), err.getvalue()


def train(folder, name, data, model, **training):
    cfg = write_config(folder / f"{name}.yaml", run={"name": name, "output_dir": str(folder / "runs")}, data=data,
                       model=model, training={"max_duration": "4ba", "eval_interval": "4ba", "save_interval": "4ba",
                                              "warmup": "1ba", "precision": "fp32", **training})
    code, out, err = rafale("-c", str(cfg))
    assert code == 0, (out + err)[-3000:]
    run_dir = folder / "runs" / name
    return run_dir, json.loads((run_dir / "summary.json").read_text())["validation"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache_dir):
    """A causal LM, a masked LM and a classifier, each trained for a few batches on files with a validation file."""
    folder = tmp_path_factory.mktemp("predict_score")
    texts = story_splits(120, 20, seed=0)
    for split, docs in texts.items():
        (folder / f"{split}.txt").write_text("\n".join(docs))
    text_data = {"source": {"train": str(folder / "train.txt"), "validation": str(folder / "validation.txt")},
                 "doc_separator": "\n", "vocab_size": 400}
    # 48 validation rows, 3 whole batches of 16: Composer's CrossEntropy averages the batches' means
    for split, rows in labelled_story_splits(120, 48, seed=0).items():
        with open(folder / f"cls_{split}.csv", "w", newline="") as f:
            csv.writer(f).writerows([("text", "label"), *rows])
    cls_data = {"source": {"train": str(folder / "cls_train.csv"), "validation": str(folder / "cls_validation.csv")},
                "block_size": 32}  # shorter than the stories: predict must truncate as training did
    return {
        "folder": folder,
        "lm": train(folder, "lm", text_data, {}),
        "mlm": train(folder, "mlm", text_data, {"type": "roberta", "task": "mlm", "preset": "roberta-tiny"},
                     max_duration="2ba", eval_interval="2ba", save_interval="2ba"),
        "cls": train(folder, "cls", cls_data, {"type": "bert", "task": "classification", "preset": "bert-tiny"},
                     batch_size=16, lr=3e-3),
    }


def table(text: str) -> list[dict]:
    return list(csv.DictReader(io.StringIO(text)))


def test_score_gives_the_runs_validation_loss_perplexity_and_bits_per_byte(runs):
    run_dir, validation = runs["lm"]
    code, out, err = rafale("score", str(run_dir), "--file", str(runs["folder"] / "validation.txt"))
    assert code == 0, err
    (row,) = table(out)
    assert float(row["loss"]) == pytest.approx(validation["LanguageCrossEntropy"], rel=1e-4)
    assert float(row["perplexity"]) == pytest.approx(validation["LanguagePerplexity"], rel=1e-4)
    assert float(row["bits_per_byte"]) == pytest.approx(validation["BitsPerByte"], rel=1e-4)


def test_score_labels_both_token_counts_as_data_preparation_does(runs, tmp_path):
    """`tokens` and `blocks` are data preparation's ("validation: N tokens in B blocks"); the loss is over
    `predicted_tokens`, a block's first token being no prediction; --doc-separator reads another file layout."""
    run_dir, _ = runs["lm"]
    code, out, err = rafale("score", str(run_dir), "--file", str(runs["folder"] / "validation.txt"))
    (row,) = table(out)
    prepared = json.loads((run_dir / "data.json").read_text())["splits"]["validation"]
    assert (int(row["tokens"]), int(row["blocks"])) == (prepared["tokens"], prepared["blocks"])
    assert int(row["predicted_tokens"]) == prepared["tokens"] - prepared["blocks"]
    # the same documents, written with another separator: the same figures with --doc-separator
    docs = (runs["folder"] / "validation.txt").read_text().split("\n")
    (tmp_path / "other.txt").write_text("\n\n~~~\n\n".join(docs))
    code, out, err = rafale("score", str(run_dir), "--file", str(tmp_path / "other.txt"), "--doc-separator", "\\n\\n~~~\\n\\n")
    assert code == 0, err
    assert table(out)[0] == {**row, "file": "other.txt"}
    code, out, err = rafale("score", str(run_dir), "--file", str(tmp_path / "other.txt"))  # the run's "\n"
    assert table(out)[0]["tokens"] != row["tokens"]


def test_the_readmes_transformers_lines_give_scores_bits_per_byte(runs, monkeypatch):
    """docs/bits-per-byte.md's block, run as written on the run's export (its paths pointed at this run)."""
    import re

    page = (ROOT / "docs" / "bits-per-byte.md").read_text()
    code_block = page.split("```python\n", 1)[1].split("```", 1)[0]
    run_dir, validation = runs["lm"]
    held_out = runs["folder"] / "validation.txt"
    code_block, n = re.subn(r'run, path = "[^"]+", "[^"]+"', f"run, path = {str(run_dir)!r}, {str(held_out)!r}", code_block)
    assert n == 1
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code_block, "docs/bits-per-byte.md", "exec"), {})
    said = dict(re.findall(r"(predicted tokens|bytes|loss|bits per byte) ([\d.]+)", out.getvalue()))
    code, score, err = rafale("score", str(run_dir), "--file", str(held_out))
    (row,) = table(score)
    assert said["predicted tokens"] == row["predicted_tokens"] and said["bytes"] == row["bytes"], (said, row)
    assert float(said["loss"]) == pytest.approx(float(row["loss"]), abs=2e-5)
    assert float(said["bits per byte"]) == pytest.approx(float(row["bits_per_byte"]), abs=2e-5)
    assert float(row["bits_per_byte"]) == pytest.approx(validation["BitsPerByte"], rel=1e-4)


def test_score_per_line_scores_each_line_as_its_own_document(runs, tmp_path):
    run_dir, _ = runs["lm"]
    lines = ["Tom had a red ball.", "", "  Lily saw a big dog in the park.  ", "The cat sat."]
    (tmp_path / "lines.txt").write_text("\n".join(lines))
    code, out, err = rafale("score", str(run_dir), "--file", str(tmp_path / "lines.txt"), "--per-line")
    assert code == 0, err
    rows = table(out)
    assert [r["line"] for r in rows] == ["1", "3", "4", "total"]  # the blank line is no document
    assert int(rows[-1]["tokens"]) == sum(int(r["tokens"]) for r in rows[:-1])
    # line 3 scores as a file that holds only it (its text stripped, as training strips documents)
    (tmp_path / "one.txt").write_text(lines[2].strip())
    code, out, err = rafale("score", str(run_dir), "--file", str(tmp_path / "one.txt"))
    (alone,) = table(out)
    assert {k: alone[k] for k in ("tokens", "loss", "bits_per_byte")} == {k: rows[1][k] for k in ("tokens", "loss", "bits_per_byte")}
    # while the whole file, one stream of blocks, gives each line the lines before it as context
    code, out, err = rafale("score", str(run_dir), "--file", str(tmp_path / "lines.txt"))
    assert table(out)[0]["loss"] != rows[-1]["loss"]


def test_score_of_a_masked_lm_is_its_validation_loss_on_the_same_masks(runs):
    run_dir, validation = runs["mlm"]
    code, out, err = rafale("score", str(run_dir), "--file", str(runs["folder"] / "validation.txt"))
    assert code == 0, err
    (row,) = table(out)
    assert float(row["loss"]) == pytest.approx(validation["LanguageCrossEntropy"], rel=1e-4)
    assert 0 < float(row["bits_per_byte"]) < 20


def test_predict_gives_the_runs_classes_and_validation_accuracy(runs, tmp_path):
    run_dir, validation = runs["cls"]
    rows_file = runs["folder"] / "cls_validation.csv"
    code, out, err = rafale("predict", str(run_dir), "--file", str(rows_file), "--batch-size", "5")
    assert code == 0, err
    rows, true = table(out), [r["label"] for r in table(rows_file.read_text())]
    assert list(rows[0]) == ["row", "predicted", "p_happy", "p_sad", "p_surprised"] and len(rows) == 48
    for r in rows:
        p = {name: float(r[f"p_{name}"]) for name in ("happy", "sad", "surprised")}
        assert sum(p.values()) == pytest.approx(1, abs=1e-5) and r["predicted"] == max(p, key=p.get)
    accuracy = float(err.split("accuracy on cls_validation.csv: ")[1].split()[0])
    assert accuracy == pytest.approx(validation["Accuracy"], abs=1e-6)
    assert accuracy == pytest.approx(sum(r["predicted"] == t for r, t in zip(rows, true)) / len(true), abs=1e-6)
    # the loss of the probabilities on the true classes: only the same framing and truncation give it
    loss = sum(-math.log(float(r[f"p_{t}"])) for r, t in zip(rows, true)) / len(true)
    assert loss == pytest.approx(validation["CrossEntropy"], rel=1e-4)
    code, _, err = rafale("predict", str(run_dir), "--file", str(rows_file), "--batch-size", "5",
                          "--out", str(tmp_path / "p.csv"))
    assert code == 0 and table((tmp_path / "p.csv").read_text()) == rows, err
    # another batch size: the same classes, probabilities equal but for the last bits of the batched matmuls
    code, out, err = rafale("predict", str(run_dir), "--file", str(rows_file))
    assert code == 0, err
    for r, other in zip(rows, table(out), strict=True):
        assert other["predicted"] == r["predicted"]
        assert all(float(other[k]) == pytest.approx(float(r[k]), abs=2e-6) for k in r if k.startswith("p_"))


def test_errors_name_the_task_the_file_and_the_column(runs, tmp_path):
    (tmp_path / "rows.jsonl").write_text('{"sentence": "a story"}\n')
    (tmp_path / "bad.csv").write_text("text,label\nTom was glad.,angry\n")
    cases = {
        ("predict", "lm", "rows.jsonl"): "is a causal_lm run; rafale predict needs a classifier",
        ("score", "cls", "rows.jsonl"): "is a classification run; rafale score needs a language model",
        ("predict", "cls", "rows.jsonl"): "no column 'text' in",
        ("predict", "cls", "bad.csv"): "bad.csv: data.label_column: row 0 of the bad.csv file has label 'angry'",
    }
    for (command, run, file), message in cases.items():
        code, _, err = rafale(command, str(runs[run][0]), "--file", str(tmp_path / file))
        assert code == 2 and message in err, (command, run, err)
    code, _, err = rafale("score", str(runs["lm"][0]), "--file", str(tmp_path / "rows.jsonl"))
    assert code == 2 and "rows.jsonl" in err and "'text'" in err, err


def test_score_reads_a_txt_under_a_run_whose_text_column_is_another(runs, tmp_path):
    """A .txt has no columns: its texts are the texts, whatever data.text_column the run was trained with (here
    'content'); a .jsonl without that column is one line naming the column and the file."""
    import shutil

    import yaml

    run_dir = tmp_path / "content-run"
    shutil.copytree(runs["lm"][0], run_dir, ignore=shutil.ignore_patterns("evals"))
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    config["data"]["text_column"] = "content"
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    (tmp_path / "x.txt").write_text("Tom had a red ball.\nLily ran home.\n")
    code, out, err = rafale("score", str(run_dir), "--file", str(tmp_path / "x.txt"))
    assert code == 0, err
    assert table(out)[0]["file"] == "x.txt" and int(table(out)[0]["tokens"]) > 0
    (tmp_path / "x.jsonl").write_text('{"text": "Tom had a red ball."}\n')
    code, out, err = rafale("score", str(run_dir), "--file", str(tmp_path / "x.jsonl"))
    assert code == 2 and "Traceback" not in err and "'content'" in err and "x.jsonl" in err, err


def test_scores_bytes_are_the_validations_on_byte_level_bpe(runs):
    """rafale score counts bytes in the text (offsets), validation by token id (rafale.models.token_bytes): on a
    byte-level BPE run's validation file they agree token by token."""
    from datasets import DatasetDict
    from tokenizers import Tokenizer

    from rafale.config import load_config
    from rafale.data import CausalLMDataPipe
    from rafale.models.token_bytes import TextBytes, token_bytes
    from rafale.commands.predict import read_file_rows
    from rafale.commands.score import bytes_of_blocks

    run_dir, folder = runs["lm"][0], runs["folder"]
    cfg = load_config(run_dir / "config.yaml", saved_run=True)
    tokenizer = Tokenizer.from_file(str(run_dir / "tokenizer.json"))
    rows = read_file_rows(folder / "validation.txt", cfg, folder / "scratch", "text", one_per_line=False)
    pipe = CausalLMDataPipe(cfg.data)
    pipe.scratch = folder / "scratch"
    meta = {"vocab_size": tokenizer.get_vocab_size(), **pipe.special_ids(tokenizer)}
    blocks = pipe._prepare(DatasetDict({"v": rows}), tokenizer, meta)["v"]
    table = token_bytes(tokenizer)
    counted = bytes_of_blocks(blocks, rows["text"], TextBytes(tokenizer))
    assert counted == [table[block].tolist() for block in blocks.with_format("torch")["input_ids"]]
    assert sum(map(sum, counted)) == sum(len(text.encode()) for text in rows["text"])


def test_neither_command_imports_composer_or_transformers(runs):
    folder, lm, cls = runs["folder"], runs["lm"][0], runs["cls"][0]
    script = f"""
import sys
from rafale.main import main
for args in (["score", {str(lm)!r}, "--file", {str(folder / "validation.txt")!r}],
             ["predict", {str(cls)!r}, "--file", {str(folder / "cls_validation.csv")!r}]):
    try:
        main(args)
    except SystemExit as exit:
        assert exit.code == 0, args
print("imported:", [m for m in ("composer", "transformers", "torchmetrics") if m in sys.modules])
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "imported: []" in done.stdout, done.stdout[-2000:] + done.stderr[-2000:]
