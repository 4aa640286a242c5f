"""`rafale predict`: the class a trained classifier gives each text of a file, with every class's probability.

    rafale predict runs/bert-cls-stories --file rows.csv                  # CSV on stdout
    rafale predict runs/bert-cls-stories --file rows.jsonl --out preds.csv --batch-size 64

The file is a .csv, .jsonl, .json or .parquet with the run's text column (data.text_column, `text` by default), or
a .txt of one text per line. Each text is tokenized by the run's own tokenizer and framed and truncated by the
run's own datapipe (rafale/data/classification.py), so it is the example validation would have made of it. When
the file has the label column (data.label_column), the accuracy is printed too: on the run's validation rows it is
the validation accuracy. The model runs in fp32 (on the GPU when there is one).

The reading of the file and the batching are shared with `rafale score` (rafale/commands/score.py). Neither imports
Composer (~20 s): a run's model is rebuilt from its folder as a bare nn.Module (rafale.run_folder.load_run_model).
"""

import argparse
import csv
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import torch
from datasets import Dataset, DatasetDict

from rafale.config import Config
from rafale.data import DATAPIPES
from rafale.data.cache import PreparedData, library_progress_bars_off
from rafale.data.sources import _load_file
from rafale.errors import ConfigError, DataError, RafaleError
from rafale.run_folder import load_run_model
from rafale.resolve import family_of, head_of


def read_file_rows(path: Path, cfg: Config, scratch: Path, text_column: str, one_per_line: bool) -> Dataset:
    """The rows of a .csv/.jsonl/.json/.parquet file or the texts of a .txt (read by the data sources' reader, as
    training reads them), with a `text` column; a missing column or an empty file is an error naming the file.
    one_per_line: a .txt holds one text per line (else: the run's data.doc_separator cuts it)."""
    if not path.is_file():
        raise RafaleError(f"--file: no such file: {path}")
    data_cfg = replace(cfg.data, text_column=text_column)
    if one_per_line:
        data_cfg = replace(data_cfg, doc_separator="\n")
    try:
        rows = _load_file(path, data_cfg, False, scratch)
    except DataError as err:
        raise DataError(f"--file: {err}".replace("data.text_column: ", "--text-column / data.text_column: ")) from None
    if len(rows) == 0:
        raise DataError(f"--file: {path} holds no texts")
    # a .txt has no columns: its texts are read into `text`, whatever the run's data.text_column
    return rows.rename_column(text_column, "text") if text_column != "text" and path.suffix != ".txt" else rows


def batches(examples: Dataset, collator, batch_size: int):
    """The collator's batches of `examples` (as tensors, as the cache hands training its splits), in order."""
    examples = examples.with_format("torch")
    for start in range(0, len(examples), batch_size):
        yield collator([examples[i] for i in range(start, min(start + batch_size, len(examples)))])


def device_of() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ----------------------------------------------------------------------------------------------------
# rafale predict


def classifier_examples(rows: Dataset, cfg: Config, data: PreparedData, path: Path, labelled: bool):
    """(the framed, truncated examples training makes of `rows`, the datapipe): its own `_prepare`, the run's
    classes fixed (a row's label must be one of them). Rows without labels get class 0, never read."""
    names = data.meta["label_names"]
    pipe = DATAPIPES[cfg.model.task](replace(cfg.data, label_names=list(names)), **family_of(cfg).data)
    if not labelled:
        rows = rows.add_column("label", [0] * len(rows))
    raw = DatasetDict({path.name: rows.select_columns(["text", "label"])})
    try:
        return pipe._prepare(raw, data.tokenizer, dict(data.meta))[path.name], pipe
    except DataError as err:
        message = str(err).replace(" (set data.label_names to list them)", "").replace(" split ", " file ")
        raise DataError(f"{path}: {message}") from None


@torch.no_grad()
def class_probabilities(model, examples: Dataset, collator, batch_size: int) -> torch.Tensor:
    """(N, num_classes) softmax of the classifier's logits, in fp32."""
    device, out = device_of(), []
    model.to(device)
    for batch in batches(examples, collator, batch_size):
        logits = model(batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))  # (B, C)
        out.append(logits.float().softmax(dim=-1).cpu())
    return torch.cat(out)


def write_predictions(out, names: list[str], probabilities: torch.Tensor) -> None:
    """CSV: row (from 1), predicted (a class name), then each class's probability."""
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["row", "predicted", *(f"p_{name}" for name in names)])
    for row, p in enumerate(probabilities.tolist(), start=1):
        writer.writerow([row, names[max(range(len(p)), key=p.__getitem__)], *(f"{x:.6f}" for x in p)])


def predict_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rafale predict", description="Classify the texts of a file with a trained classifier (BERT, RoBERTa).",
        epilog="example: rafale predict runs/bert-cls-stories --file rows.csv --out preds.csv\n\n"
        "Each text is tokenized, framed and truncated as the run's training data was. Prints (or writes to --out) "
        "one CSV row per text: row, predicted class, each class's probability; with a label column, the accuracy "
        "too (on stderr), which on the run's validation rows is its validation accuracy.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a classification run's folder (its latest checkpoint)")
    parser.add_argument("--file", required=True, help=".csv/.jsonl/.json/.parquet with a text column, or .txt: one text a line")
    parser.add_argument("--out", help="write the predictions to this CSV file instead of stdout")
    parser.add_argument("--batch-size", type=int, default=32, help="texts per forward pass (default 32)")
    parser.add_argument("--text-column", help="the file's text column (default: the run's data.text_column)")
    parser.add_argument("--label-column", help="the file's label column (default: the run's data.label_column)")
    return parser


def predict_main(argv) -> int:
    args = predict_parser().parse_args(argv)
    with library_progress_bars_off():  # a bar per tokenized file: noise on the predictions' stderr
        return _predict(args)


def _predict(args) -> int:
    if args.batch_size < 1:
        raise RafaleError(f"--batch-size must be at least 1, got {args.batch_size}")
    run_dir, path = Path(args.run).expanduser(), Path(args.file).expanduser()
    cfg, data, model = load_run_model(run_dir)
    if head_of(cfg) != "classification":
        raise ConfigError("model.task", f"{run_dir} is a {cfg.model.task} run; rafale predict needs a classifier "
                          "(model.task: classification); rafale score scores a language model")
    names = data.meta["label_names"]
    label_column = args.label_column or cfg.data.label_column
    with tempfile.TemporaryDirectory(prefix="rafale-predict-") as scratch:
        rows = read_file_rows(path, cfg, Path(scratch), args.text_column or cfg.data.text_column, one_per_line=True)
        if args.label_column is not None and label_column not in rows.column_names:
            raise DataError(f"--label-column: no column '{label_column}' in {path}; columns: {rows.column_names}")
        labelled = label_column in rows.column_names
        if labelled:
            rows = rows.rename_column(label_column, "label") if label_column != "label" else rows
        examples, pipe = classifier_examples(rows, cfg, data, path, labelled)
        probabilities = class_probabilities(model, examples, pipe.collator(data.meta), args.batch_size)
        true = torch.tensor(examples["label"])
    if args.out:
        with open(Path(args.out).expanduser(), "w", newline="", encoding="utf-8") as out:
            write_predictions(out, names, probabilities)
        print(f"rafale: wrote {len(probabilities):,} predictions to {args.out}", file=sys.stderr)
    else:
        write_predictions(sys.stdout, names, probabilities)
    if labelled:
        correct = int((probabilities.argmax(dim=-1) == true).sum())
        print(f"rafale: accuracy on {path.name}: {correct / len(true):.6f} ({correct:,} of {len(true):,} rows "
              f"right; column '{label_column}')", file=sys.stderr)
    return 0
