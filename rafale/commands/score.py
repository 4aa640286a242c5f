"""`rafale score`: the loss, perplexity and bits per byte a trained language model gives a text file.

    rafale score runs/pythia-tiny-stories --file held-out.txt
    rafale score runs/pythia-tiny-stories --file held-out.txt --per-line

The file (.txt, .jsonl, .json, .csv, .parquet) is read, cut into documents (data.doc_separator for a .txt), tokenized
and cut into blocks by the run's own datapipe (rafale/data/causal_lm.py, mlm.py), and batched by its evaluation
collator: on the run's validation file the figures are its validation figures. A masked LM is scored on the masks
its validation draws: data.mlm_probability of each block's tokens, seeded by a hash of the block's tokens, so the
same text always gets the same masks; its loss is over the masked tokens, and its bits per byte over the bytes of
those tokens. The bytes a token covers are counted in the text, from the tokenizer's offsets, for every kind of
tokenizer (rafale.models.token_bytes.TextBytes: a token covers its own text and the whitespace before it, so a
document's tokens cover all its bytes). `--per-line` scores each line (each row of a .jsonl) as a document of its
own, one row each, then the total. The model runs in fp32 (on the GPU when there is one).

The columns: `blocks` and `tokens`, every token of the blocks the text makes (end-of-text tokens included), as
data preparation counts them ("validation: 52,822 tokens in 412 blocks"); `predicted_tokens`, the tokens the loss
is over (a causal LM predicts every token of a block but its first, which has no context: tokens - blocks; a
masked LM its masked tokens); `bytes`, the UTF-8 bytes of the text those predicted tokens stand for; `loss`, the
mean over predicted tokens in nats; `perplexity`, exp(loss); `bits_per_byte`.

Bits per byte is the summed loss of the predicted tokens, in bits, over their bytes, as validation's BitsPerByte
computes it. The bytes are those of the documents' text (each document is stripped), and the separators between
documents (data.doc_separator, or --doc-separator) are no text and count no byte. Each document is followed by
the end-of-text token, which is predicted (its loss counts) and stands for no byte; a block's first token is not
predicted and its bytes do not count. docs/bits-per-byte.md gives the lines of transformers code that
reproduce the figure from the run's export.
"""

import argparse
import csv
import json
import math
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from datasets import Dataset, DatasetDict

from rafale.data import DATAPIPES
from rafale.data.cache import library_progress_bars_off
from rafale.data.causal_lm import describe_blocks
from rafale.models.token_bytes import TextBytes
from rafale.errors import IGNORE_INDEX, ConfigError, DataError, RafaleError
from rafale.run_folder import load_run_model
from rafale.commands.predict import batches, device_of, read_file_rows
from rafale.resolve import FAMILIES, family_of, head_of

SCORED_HEADS = ("causal_lm", "mlm")  # the model heads whose loss is a language model's
# where a block's token sits relative to the position whose label it is: the next one (causal LM), the same (MLM)
LABEL_SHIFT = {"causal_lm": 1, "mlm": 0}


@dataclass
class Score:
    """Summed nats, scored (predicted) tokens and the UTF-8 bytes they cover, the blocks and all their tokens; the
    figures validation reports from them."""

    nats: float = 0.0
    tokens: int = 0
    bytes: int = 0

    blocks: int = 0
    block_tokens: int = 0  # every token of the blocks, as data preparation counts them

    def __add__(self, other: "Score") -> "Score":
        return Score(self.nats + other.nats, self.tokens + other.tokens, self.bytes + other.bytes,
                     self.blocks + other.blocks, self.block_tokens + other.block_tokens)

    def row(self) -> list[str]:
        """blocks, tokens, predicted tokens, bytes, loss (nats per predicted token), perplexity, bits per byte; the
        last three empty when no token was predicted."""
        counts = [str(self.blocks), str(self.block_tokens), str(self.tokens), str(self.bytes)]
        if self.tokens == 0:
            return counts + ["", "", ""]
        loss = self.nats / self.tokens
        bits = self.nats / (math.log(2) * self.bytes) if self.bytes else float("nan")
        return counts + [f"{loss:.6f}", f"{math.exp(loss):.4f}", f"{bits:.6f}"]


COLUMNS = ["blocks", "tokens", "predicted_tokens", "bytes", "loss", "perplexity", "bits_per_byte"]


@torch.no_grad()
def score_blocks(model, blocks: Dataset, block_bytes: list[list[int]], shift: int, collator, batch_size: int,
                 vocab_size: int) -> Score:
    """The summed loss of the collator's batches of `blocks`, as the validation metrics sum it (LanguageCrossEntropy,
    BitsPerByte): the logits cut to the tokenizer's vocabulary, the labels that are not IGNORE_INDEX scored, and
    the bytes the labels' tokens cover (`block_bytes`, each block's; the label at position t is token t + shift)."""
    device, score = device_of(), Score()
    model.to(device)
    for start, batch in zip(range(0, len(blocks), batch_size), batches(blocks, collator, batch_size)):
        mask = batch.get("attention_mask")
        # a data.document_mask run's collator gives each token's document and position in it: attend as validation does
        packed = {key: batch[key].to(device) for key in ("position_ids", "document_ids") if key in batch}
        logits = model(batch["input_ids"].to(device), attention_mask=None if mask is None else mask.to(device),
                       **packed)
        labels = batch["labels"]
        scored = labels != IGNORE_INDEX  # (B, T)
        nats = F.cross_entropy(logits[..., :vocab_size][scored.to(device)].float(), labels[scored].to(device),
                               reduction="sum")
        label_bytes = torch.zeros(labels.shape, dtype=torch.long)  # (B, T)
        for row, sizes in enumerate(block_bytes[start : start + len(labels)]):
            label_bytes[row, : len(sizes) - shift] = torch.tensor(sizes[shift:], dtype=torch.long)
        score = score + Score(float(nats), int(scored.sum()), int(label_bytes[scored].sum()))
    sized = describe_blocks(blocks)
    return score + Score(blocks=sized["blocks"], block_tokens=sized["tokens"])


def bytes_of_blocks(blocks: Dataset, texts: list[str], text_bytes: TextBytes) -> list[list[int]]:
    """The UTF-8 bytes each token of each block covers in `texts` (`text_bytes`, the tokenizer's TextBytes), the
    blocks being the datapipe's cut of those texts: the texts' tokens in order, with special tokens added between
    them (<|endoftext|> between documents, [CLS] ... [SEP] around blocks), which cover 0 bytes."""
    specials = text_bytes.specials
    stream = [(token, size) for ids, sizes in text_bytes(texts) for token, size in zip(ids, sizes)]
    out, next_token = [], 0
    for block in blocks.with_format(None)["input_ids"]:
        sizes = []
        for token in block:
            if next_token < len(stream) and token == stream[next_token][0]:
                sizes.append(stream[next_token][1])
                next_token += 1
            elif token in specials:  # one the datapipe added
                sizes.append(0)
            else:  # the datapipe cut the texts otherwise than encode_batch tokenizes them
                raise RafaleError(f"rafale score: the blocks hold token {token} where the text has "
                                  f"{stream[next_token][0] if next_token < len(stream) else 'no more tokens'}")
        out.append(sizes)
    if next_token != len(stream):
        raise RafaleError(f"rafale score: the blocks hold {next_token:,} of the text's {len(stream):,} tokens")
    return out


def documents_by_line(path: Path, rows: Dataset) -> DatasetDict:
    """--per-line: one split of one document per non-blank line (each row of a .jsonl), named by its line number."""
    if path.suffix == ".txt":
        lines = path.read_text(encoding="utf-8", errors="replace").split("\n")
        numbered = [(n, line.strip()) for n, line in enumerate(lines, start=1) if line.strip()]
    else:
        numbered = list(enumerate(rows["text"], start=1))
    return DatasetDict({f"line{n}": Dataset.from_dict({"text": [text]}) for n, text in numbered})


def _unescaped(text: str) -> str:
    """'\\n' typed on a command line -> a line break: the escapes of a JSON (or YAML double-quoted) string; text
    that is no such string is taken as it is."""
    try:
        return json.loads(f'"{text}"')
    except ValueError:
        return text


def families_with(head: str) -> list[str]:
    return [family.name for family in FAMILIES.values() if head in family.heads]


def score_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rafale score", description="Score a text file with a trained language model (causal or masked).",
        epilog=__doc__.split("\n\n", 2)[2] + "\nexamples:\n"
        "  rafale score runs/pythia-tiny-stories --file held-out.txt\n"
        "  rafale score runs/pythia-tiny-stories --file verses.txt --doc-separator '\\n'   one document a line",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a language model's run folder (its latest checkpoint; not an export): a causal "
                        f"LM ({', '.join(families_with('causal_lm'))}) or a masked LM ({', '.join(families_with('mlm'))})")
    parser.add_argument("--file", required=True, help="a .txt (documents cut at the run's data.doc_separator), "
                        ".jsonl/.json/.csv/.parquet (one document a row, in the run's text column)")
    parser.add_argument("--per-line", action="store_true", help="score each line as a document of its own")
    parser.add_argument("--doc-separator", metavar="SEP", help="cut a .txt into documents at SEP instead of the "
                        "run's data.doc_separator, for a file written with another one; escapes as in YAML's double "
                        r"quotes: '\n' one document a line, '\n\n' blank-line-separated")
    parser.add_argument("--batch-size", type=int, default=None, help="blocks per forward pass (default: training.batch_size)")
    return parser


def score_main(argv) -> int:
    args = score_parser().parse_args(argv)
    with library_progress_bars_off():  # with --per-line, a bar per line
        return _score(args)


def _score(args) -> int:
    run_dir, path = Path(args.run).expanduser(), Path(args.file).expanduser()
    cfg, data, model = load_run_model(run_dir)
    if head_of(cfg) not in SCORED_HEADS:
        raise ConfigError("model.task", f"{run_dir} is a {cfg.model.task} run; rafale score needs a language model "
                          "(model.task: causal_lm or mlm); rafale predict classifies texts")
    if args.doc_separator is not None:
        cfg.data.doc_separator = _unescaped(args.doc_separator)
        if not cfg.data.doc_separator:
            raise RafaleError("--doc-separator must not be empty")
    batch_size = args.batch_size or cfg.training.batch_size
    if batch_size < 1:
        raise RafaleError(f"--batch-size must be at least 1, got {batch_size}")
    pipe = DATAPIPES[cfg.model.task](cfg.data, **family_of(cfg).data)
    collator = pipe.collator(data.meta)
    collator = collator.for_evaluation() if hasattr(collator, "for_evaluation") else collator  # as validation's
    with tempfile.TemporaryDirectory(prefix="rafale-score-") as scratch:
        pipe.scratch = Path(scratch) / "blocks"
        rows = read_file_rows(path, cfg, Path(scratch), cfg.data.text_column, one_per_line=args.per_line)
        documents = documents_by_line(path, rows) if args.per_line else DatasetDict({"file": rows.select_columns(["text"])})
        try:
            blocks = pipe._prepare(documents, data.tokenizer, dict(data.meta))
        except DataError as err:
            raise DataError(f"{path}: {err}") from None
        shift, text_bytes = LABEL_SHIFT[head_of(cfg)], TextBytes(data.tokenizer)
        scores = {name: score_blocks(model, split, bytes_of_blocks(split, documents[name]["text"], text_bytes),
                                     shift, collator, batch_size, data.vocab_size)
                  for name, split in blocks.items()}
    writer = csv.writer(sys.stdout, lineterminator="\n")
    writer.writerow(["line" if args.per_line else "file", *COLUMNS])
    if args.per_line:
        for name, score in scores.items():
            writer.writerow([name.removeprefix("line"), *score.row()])
    total = sum(scores.values(), Score())
    writer.writerow(["total" if args.per_line else path.name, *total.row()])
    return 0
