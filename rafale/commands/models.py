"""`rafale models`: every preset of every model family, with its sizes and parameter counts, so that the arms of a
comparison can be matched before any of them trains.

    rafale models                       one line per preset of every family
    rafale models llama qwen3           the presets of these families only
    rafale models --vocab-size 32000    the totals at the vocabulary you will train with (N does not depend on it)
    rafale models --csv                 CSV instead of a fixed-width table

Each preset's bare model (what its family's Hugging Face format builds for its first head: the causal LM, BERT's
masked LM, CLIP's two towers) is built on torch's `meta` device, which makes the shapes and no memory, and counted
as a run counts itself: N is the non-embedding parameters of summary.json (rafale.record.non_embedding_parameters),
the total its `parameters`. --vocab-size V counts every preset with V embedding rows (model.vocab_size: V). A preset
whose vocab_size is None takes the tokenizer's, rounded up to a multiple of 64: without --vocab-size it is counted at
data.vocab_size's default, marked `*`. CLIP's and SigLIP's sizes read vision+text. The README's presets table ("Supported models") is `markdown_table(preset_sizes())`.
"""

import argparse
import copy
import csv
import dataclasses
import io
from dataclasses import dataclass

import torch
from torch import nn

from rafale.config import DataConfig
from rafale.errors import RafaleError
from rafale.models.families import FAMILIES
from rafale.models.family import Family, model_vocab_size
from rafale.models.counts import non_embedding_parameters

# the vocabulary a preset without its own is counted at: what `data.tokenizer: train` makes by default
DEFAULT_VOCAB_SIZE = next(f.default for f in dataclasses.fields(DataConfig) if f.name == "vocab_size")
TOKEN_HEADS = ("causal_lm", "mlm")  # the heads whose output projection is onto the vocabulary
COLUMNS = ("family", "preset", "layers", "hidden", "heads/kv", "intermediate", "vocab", "N", "total", "head")


@dataclass(frozen=True)
class PresetSize:
    """One line of the table. layers, hidden, heads/kv and intermediate are text ("12+12": a vision and a text
    tower); vocab_from_tokenizer: the preset has no vocab_size of its own, and `vocab` is the one counted at;
    head: "tied" or "untied" (an output projection onto the vocabulary), "-" (none: CLIP, SigLIP)."""

    family: str
    preset: str
    layers: str
    hidden: str
    heads: str
    intermediate: str
    vocab: int
    vocab_from_tokenizer: bool
    non_embedding: int
    total: int
    head: str

    def cells(self) -> dict:
        vocab = f"{self.vocab}*" if self.vocab_from_tokenizer else str(self.vocab)
        return dict(zip(COLUMNS, (self.family, self.preset, self.layers, self.hidden, self.heads, self.intermediate,
                                  vocab, f"{self.non_embedding:,}", f"{self.total:,}", self.head)))


def towers(cfg) -> list:
    """The configs that carry the sizes: a CLIP's vision and text towers, or the model's own."""
    return [cfg.vision, cfg.text] if hasattr(cfg, "vision") else [cfg]


def token_config(cfg):
    """The config that holds the vocabulary: a CLIP's text tower, or the model's own."""
    return cfg.text if hasattr(cfg, "text") else cfg


def joined(cfg, describe) -> str:
    return "+".join(str(describe(tower)) for tower in towers(cfg))


def heads_of(tower) -> str:
    kv_heads = getattr(tower, "kv_heads", tower.num_heads)  # only a decoder has grouped-query attention
    return f"{tower.num_heads}/{kv_heads}"


def output_head(module: nn.Module, head: str) -> str:
    """"tied" when a Linear shares its weight with an embedding table, else "untied" for a head that predicts tokens
    (causal or masked LM), "-" for one that does not (CLIP's). Told by identity, not by width: a hidden Linear can be
    as wide as the vocabulary."""
    tables = {id(m.weight) for m in module.modules() if isinstance(m, nn.Embedding)}
    if any(id(m.weight) in tables for m in module.modules() if isinstance(m, nn.Linear)):
        return "tied"
    return "untied" if head in TOKEN_HEADS else "-"


def preset_size(family: Family, preset: str, vocab_size: int | None = None) -> PresetSize:
    """The sizes and counts of `family`'s `preset` with `vocab_size` embedding rows when given (model.vocab_size),
    else the preset's own (or DEFAULT_VOCAB_SIZE's, rounded as a tokenizer's is, when it takes the tokenizer's)."""
    cfg = copy.deepcopy(family.presets[preset])  # the presets are shared: a run's config starts from them
    tokens = token_config(cfg)
    from_tokenizer = tokens.vocab_size is None
    if vocab_size is not None:  # model.vocab_size: V, the rows of the embedding
        tokens.vocab_size = vocab_size
    elif from_tokenizer:
        tokens.vocab_size = model_vocab_size(None, DEFAULT_VOCAB_SIZE)
    if getattr(tokens, "eos_token_id", None) is not None and tokens.eos_token_id >= tokens.vocab_size:
        tokens.eos_token_id = None  # CLIP's: a run takes its tokenizer's (contrastive.build), and it sizes nothing
    try:
        with torch.device("meta"):  # shapes only: no memory, no initialisation
            module = family.hf.module(cfg, family.heads[0])
    except ValueError as err:  # a size the preset cannot have (its config's validate())
        raise RafaleError(f"{preset} with {tokens.vocab_size} embedding rows: {err}") from None
    return PresetSize(
        family=family.name, preset=preset,
        layers=joined(cfg, lambda t: t.num_layers), hidden=joined(cfg, lambda t: t.hidden_size),
        heads=joined(cfg, heads_of), intermediate=joined(cfg, lambda t: t.intermediate_size),
        vocab=tokens.vocab_size, vocab_from_tokenizer=from_tokenizer and vocab_size is None,
        non_embedding=non_embedding_parameters(module), total=sum(p.numel() for p in module.parameters()),
        head=output_head(module, family.heads[0]),
    )


def preset_sizes(families: list[str] | None = None, vocab_size: int | None = None) -> list[PresetSize]:
    """One PresetSize per preset of `families` (default: all, in FAMILIES' order); an unknown family is an error
    listing the known ones."""
    unknown = [name for name in families or () if name not in FAMILIES]
    if unknown:
        raise RafaleError(f"no model family {', '.join(map(repr, unknown))}; the families are {', '.join(FAMILIES)}")
    if vocab_size is not None and vocab_size <= 0:
        raise RafaleError(f"--vocab-size must be positive, got {vocab_size}")
    chosen = families or list(FAMILIES)
    return [preset_size(FAMILIES[name], preset, vocab_size) for name in chosen for preset in FAMILIES[name].presets]


FOOTNOTE = (f"* the preset takes the tokenizer's vocabulary (rounded up to a multiple of 64): counted at "
            f"{DEFAULT_VOCAB_SIZE}, data.vocab_size's default (--vocab-size V counts at V). N: non-embedding "
            "parameters (summary.json's non_embedding_parameters); head: the output projection onto the vocabulary. "
            "CLIP and SigLIP: vision+text towers.")


def text_table(rows: list[PresetSize]) -> str:
    """A fixed-width table, numbers right-aligned, with the footnote when a row has a `*`."""
    cells = [row.cells() for row in rows]
    widths = {c: max(len(c), *(len(row[c]) for row in cells)) for c in COLUMNS}
    left = ("family", "preset", "head")

    def line(values: dict) -> str:
        cells = (values[c].ljust(widths[c]) if c in left else values[c].rjust(widths[c]) for c in COLUMNS)
        return "  ".join(cells).rstrip()

    lines = [line({c: c for c in COLUMNS})] + [line(row) for row in cells]
    return "\n".join(lines + ([FOOTNOTE] if any(row.vocab_from_tokenizer for row in rows) else []))


def csv_table(rows: list[PresetSize]) -> str:
    """CSV with plain numbers (no thousands separators) and the vocabulary's origin in its own column."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(COLUMNS + ("vocab_from_tokenizer",))
    for row in rows:
        writer.writerow([row.family, row.preset, row.layers, row.hidden, row.heads, row.intermediate, row.vocab,
                         row.non_embedding, row.total, row.head, row.vocab_from_tokenizer])
    return out.getvalue().rstrip("\n")


def markdown_table(rows: list[PresetSize]) -> str:
    """The README's presets table."""
    cells = [row.cells() for row in rows]
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    lines += ["| " + " | ".join(row[c] for c in COLUMNS).replace("*", "\\*") + " |" for row in cells]
    return "\n".join(lines + ["", FOOTNOTE.replace("* ", "\\* ", 1)])


def models_main(argv) -> int:
    parser = argparse.ArgumentParser(
        prog="rafale models", description="One line per preset of every model family: its layers, hidden size, "
        "attention heads / key-value heads, MLP width, vocabulary, N (non-embedding parameters, as a run's "
        "summary.json counts them) and total parameters, and whether its output head is tied to the embedding. "
        "Counted on empty (meta) tensors: nothing is allocated.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  rafale models                      every preset\n"
        "  rafale models llama qwen3          these families only\n"
        "  rafale models --vocab-size 32000   totals at the vocabulary you train with (N does not change)")
    parser.add_argument("families", nargs="*", metavar="FAMILY", help=f"only these families ({', '.join(FAMILIES)})")
    parser.add_argument("--vocab-size", type=int, metavar="V", help="count every preset with V embedding rows, as "
                        f"model.vocab_size=V builds it (default: the preset's own, or {DEFAULT_VOCAB_SIZE} where it "
                        "takes the tokenizer's)")
    parser.add_argument("--csv", action="store_true", help="print CSV instead of a fixed-width table")
    args = parser.parse_args(argv)
    rows = preset_sizes(args.families, args.vocab_size)
    print(csv_table(rows) if args.csv else text_table(rows))
    return 0
