"""`rafale score`: the loss, perplexity and bits per byte a trained language model gives a text file.

    rafale score runs/pythia-tiny-stories --file held-out.txt
    rafale score runs/pythia-tiny-stories --file held-out.txt --per-line

The file (.txt, .jsonl, .json, .csv, .parquet) is read, cut into documents (data.doc_separator for a .txt), tokenized
and cut into blocks by the run's own datapipe (rafale/data/causal_lm.py, mlm.py), and batched by its evaluation
collator: on the run's validation file the figures are its validation figures. A masked LM is scored on the masks
its validation draws: data.mlm_probability of each block's tokens, seeded by a hash of the block's tokens, so the
same text always gets the same masks; its loss is over the masked tokens, and its bits per byte over the bytes of
those tokens. `--per-line` scores each line (each row of a .jsonl) as a document of its own, one row each, then
the total. The model runs in fp32 (on the GPU when there is one).
"""

import argparse
import csv
import math
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch
import torch.nn.functional as F
from datasets import Dataset, DatasetDict

from rafale.data import DATAPIPES
from rafale.models.token_bytes import token_bytes
from rafale.errors import IGNORE_INDEX, ConfigError, DataError, RafaleError
from rafale.run_folder import load_run_model
from rafale.predict import batches, device_of, read_file_rows
from rafale.resolve import family_of, head_of

SCORED_HEADS = ("causal_lm", "mlm")  # the model heads whose loss is a language model's


@dataclass
class Score:
    """Summed nats, scored tokens and the UTF-8 bytes they cover; the figures validation reports from them."""

    nats: float = 0.0
    tokens: int = 0
    bytes: int = 0

    def __add__(self, other: "Score") -> "Score":
        return Score(self.nats + other.nats, self.tokens + other.tokens, self.bytes + other.bytes)

    def row(self) -> list[str]:
        """tokens, loss (nats per token), perplexity, bits per byte; empty when no token was scored."""
        if self.tokens == 0:
            return [str(self.tokens), "", "", ""]
        loss = self.nats / self.tokens
        bits = self.nats / (math.log(2) * self.bytes) if self.bytes else float("nan")
        return [str(self.tokens), f"{loss:.6f}", f"{math.exp(loss):.4f}", f"{bits:.6f}"]


@torch.no_grad()
def score_blocks(model, blocks: Dataset, collator, batch_size: int, vocab_size: int, sizes: torch.Tensor) -> Score:
    """The summed loss of the collator's batches of `blocks`, as the validation metrics sum it (LanguageCrossEntropy,
    BitsPerByte): the logits cut to the tokenizer's vocabulary, the labels that are not IGNORE_INDEX scored."""
    device, score = device_of(), Score()
    model.to(device)
    for batch in batches(blocks, collator, batch_size):
        mask = batch.get("attention_mask")
        logits = model(batch["input_ids"].to(device), attention_mask=None if mask is None else mask.to(device))
        labels = batch["labels"].to(device)
        scored = labels != IGNORE_INDEX  # (B, T)
        nats = F.cross_entropy(logits[..., :vocab_size][scored].float(), labels[scored], reduction="sum")
        score = score + Score(float(nats), int(scored.sum()), int(sizes[labels[scored].cpu()].sum()))
    return score


def documents_by_line(path: Path, rows: Dataset) -> DatasetDict:
    """--per-line: one split of one document per non-blank line (each row of a .jsonl), named by its line number."""
    if path.suffix == ".txt":
        lines = path.read_text(encoding="utf-8", errors="replace").split("\n")
        numbered = [(n, line.strip()) for n, line in enumerate(lines, start=1) if line.strip()]
    else:
        numbered = list(enumerate(rows["text"], start=1))
    return DatasetDict({f"line{n}": Dataset.from_dict({"text": [text]}) for n, text in numbered})


def score_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rafale score", description="Score a text file with a trained language model (causal or masked).",
        epilog=__doc__.split("\n\n", 2)[2] + "\nexample: rafale score runs/pythia-tiny-stories --file held-out.txt",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a causal LM (pythia) or masked LM (bert, roberta) run's folder (its latest checkpoint)")
    parser.add_argument("--file", required=True, help="a .txt (documents cut at the run's data.doc_separator), "
                        ".jsonl/.json/.csv/.parquet (one document a row, in the run's text column)")
    parser.add_argument("--per-line", action="store_true", help="score each line as a document of its own")
    parser.add_argument("--batch-size", type=int, default=None, help="blocks per forward pass (default: training.batch_size)")
    return parser


def score_main(argv) -> int:
    args = score_parser().parse_args(argv)
    datasets.disable_progress_bars()  # with --per-line, a bar per line
    run_dir, path = Path(args.run).expanduser(), Path(args.file).expanduser()
    cfg, data, model = load_run_model(run_dir)
    if head_of(cfg) not in SCORED_HEADS:
        raise ConfigError("model.task", f"{run_dir} is a {cfg.model.task} run; rafale score needs a language model "
                          "(model.task: causal_lm or mlm); rafale predict classifies texts")
    batch_size = args.batch_size or cfg.training.batch_size
    if batch_size < 1:
        raise RafaleError(f"--batch-size must be at least 1, got {batch_size}")
    pipe = DATAPIPES[cfg.model.task](cfg.data, **family_of(cfg).data)
    collator = pipe.collator(data.meta)
    collator = collator.for_evaluation() if hasattr(collator, "for_evaluation") else collator  # as validation's
    sizes = token_bytes(data.tokenizer)
    with tempfile.TemporaryDirectory(prefix="rafale-score-") as scratch:
        pipe.scratch = Path(scratch) / "blocks"
        rows = read_file_rows(path, cfg, Path(scratch), cfg.data.text_column, one_per_line=args.per_line)
        documents = documents_by_line(path, rows) if args.per_line else DatasetDict({"file": rows.select_columns(["text"])})
        try:
            blocks = pipe._prepare(documents, data.tokenizer, dict(data.meta))
        except DataError as err:
            raise DataError(f"{path}: {err}") from None
        scores = {name: score_blocks(model, split, collator, batch_size, data.vocab_size, sizes)
                  for name, split in blocks.items()}
    writer = csv.writer(sys.stdout, lineterminator="\n")
    writer.writerow(["line" if args.per_line else "file", "tokens", "loss", "perplexity", "bits_per_byte"])
    if args.per_line:
        for name, score in scores.items():
            writer.writerow([name.removeprefix("line"), *score.row()])
    total = sum(scores.values(), Score())
    writer.writerow(["total" if args.per_line else path.name, *total.row()])
    return 0
