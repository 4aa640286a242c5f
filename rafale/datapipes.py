"""Datapipes: text in, cached blocks of token ids out.

A datapipe loads a source (the embedded stories, a local file or folder, or a hub dataset), gets a tokenizer
(a tokenizers JSON file, a hub tokenizer, or one trained here on the training split), and `_prepare`s the
splits: tokenize, concatenate, cut into blocks. Everything except padding happens there, once; the result is
saved with `datasets.save_to_disk` under the cache folder and memory-mapped back on later runs. Padding and
label shifting are the collator's job, per batch. The causal-LM datapipe streams instead of holding a split in
memory: a .txt source is copied in pieces to an Arrow file, documents are tokenized a batch at a time, and the
blocks are written a shard at a time straight into the cache folder's layout (`BlockWriter`, `save_split`).

Cache folders are named `{source}_{tokenizer}_bs{block_size}_len{N}_{fingerprint}` (N training blocks, or
examples); the fingerprint covers every
input that changes the content (the source's identity, the tokenizer, the block size, the pipeline version),
so a changed input builds a new cache, and a cache is found by its fingerprint alone. A trained tokenizer is
named by the size it got (`bpe2761`), known only once trained. A cache is built under a temporary name, holds a
`rafale.json` written last, and is renamed into place when complete: an interrupted build is never mistaken for
a finished one.

To add a datapipe: subclass `DataPipe`, give it a `name` and a `_prepare(raw, tokenizer)` that maps a
`DatasetDict` of texts to a `DatasetDict` of examples, and a collator for its batches.
"""

import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from datasets import Dataset, DatasetDict, Features, Sequence, Value, concatenate_datasets, load_dataset, load_from_disk
from filelock import FileLock
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from rafale.config import Config, DataConfig, split_source_files
from rafale.errors import IGNORE_INDEX, DataError

PIPELINE_VERSION = 2  # 2: caches named by the trained vocabulary size; trained tokenizers carry their post-processor
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "[SEP]")
PAD_CANDIDATES = ("<|padding|>", "<pad>", "[PAD]")
TEXT_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet", ".csv")
TOKEN_FEATURES = Features({"input_ids": Sequence(Value("int32"))})


def cache_root(cache_dir=None) -> Path:
    """The cache folder: data.cache_dir, else $RAFALE_CACHE, else ~/.rafale_cache."""
    return Path(cache_dir or os.environ.get("RAFALE_CACHE") or "~/.rafale_cache").expanduser()


def _sha(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _file_identity(path: Path) -> list:
    """Cheap identity of a file or folder: names, sizes and modification times (contents are not read)."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files]


def _safe_name(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-." else "-" for c in text).strip("-.")[:60] or "data"


# ----------------------------------------------------------------------------------------------------
# sources


READ_PIECE_BYTES = 4 * 2**20  # a .txt source is read this much at a time
TEXT_BATCH_BYTES = 4 * 2**20  # documents are written to the source's Arrow copy in record batches of about this size
# A .txt source with more than this share of its characters invalid UTF-8 or control bytes is not text: an
# executable measured 65% (/bin/ls) and 89% (python), UTF-16 text is half NULs; real UTF-8 text with a few bad bytes,
# Latin-1 accents in French or German (a few %) or ANSI colour codes in a log stay far below
MAX_NON_TEXT_SHARE = 0.2
# C0 control bytes other than whitespace (\t \n \v \f \r), and DEL: never part of a multi-byte UTF-8 sequence,
# so counting them in the bytes counts them in the text
CONTROL_BYTES = bytes([*range(0x09), *range(0x0E, 0x20), 0x7F])
NOT_CONTROL_BYTES = bytes(b for b in range(256) if b not in CONTROL_BYTES)


def iter_text_documents(path: Path, separator: str, errors: str = "replace", piece_bytes: int | None = None):
    """The documents of a .txt source, stripped, empty ones dropped, reading `piece_bytes` at a time.

    The bytes are split on the separator's UTF-8 bytes, then each document is decoded: a UTF-8 sequence never
    starts inside another, so the cuts are those of splitting the decoded text, and a bad byte's offset is exact.
    A file whose characters are mostly invalid UTF-8 or control bytes (an executable, UTF-16) is a DataError,
    checked after each piece: it does not look like text, and replacing its bytes would train on noise."""
    sep, piece_bytes = separator.encode(), piece_bytes or READ_PIECE_BYTES
    replaced, offset, rest = 0, 0, b""  # offset: where `rest` starts in the file
    characters = controls = 0  # so far, for the share of what is not text
    with path.open("rb") as f:
        while True:
            piece = f.read(piece_bytes)
            parts = (rest + piece).split(sep)
            rest = parts.pop() if piece else b""  # the last part may go on in the next piece (at the end it is a document)
            for raw in parts:
                text, bad, length = _decode_document(raw, offset, path, errors)
                replaced += bad
                characters += length
                controls += len(raw.translate(None, NOT_CONTROL_BYTES))  # the control bytes are what is left
                offset += len(raw) + len(sep)
                if text:
                    yield text
            if characters and (replaced + controls) / characters > MAX_NON_TEXT_SHARE:
                raise DataError(
                    f"data.source: {path} does not look like text: {replaced + controls:,} of the first "
                    f"{characters:,} characters are invalid UTF-8 or control bytes such as NUL "
                    f"({(replaced + controls) / characters:.0%}; at most {MAX_NON_TEXT_SHARE:.0%} is taken for text). "
                    "Is it a binary file, or text in another encoding (UTF-16, Latin-1)? Convert it to UTF-8")
            if not piece:
                break
    # U+FFFD already in the file (as valid UTF-8) is not a replacement
    if replaced:
        print(f"rafale: data.source: replaced {replaced:,} invalid UTF-8 sequence(s) in {path} with U+FFFD "
              "(data.decode_errors: error stops instead)")


def _decode_document(raw: bytes, offset: int, path: Path, errors: str) -> tuple[str, int, int]:
    """(the stripped text of one document's bytes, how many invalid UTF-8 sequences were replaced, how many
    characters the decoded document has before stripping)."""
    try:
        text = raw.decode("utf-8", errors="strict" if errors == "error" else errors)
    except UnicodeDecodeError as err:
        raise DataError(
            f"data.source: {path} is not UTF-8 at byte offset {offset + err.start} ({raw[err.start:err.start + 4]!r}); "
            "fix the file or set data.decode_errors: replace"
        ) from None
    replaced = text.count("\ufffd") - raw.count("\ufffd".encode()) if "\ufffd" in text else 0
    return text.strip(), replaced, len(text)


def _text_source_dataset(path: Path, cfg: DataConfig, scratch: Path) -> Dataset:
    """A .txt source's documents, written batch by batch to an Arrow file in `scratch` and memory-mapped back:
    the text is never whole in memory, and the dataset is the one `Dataset.from_dict` of all documents gives."""
    scratch.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(suffix=".arrow", prefix=f"{_safe_name(path.stem)}-", dir=scratch)
    os.close(handle)
    schema = Features({"text": Value("string")}).arrow_schema
    with pa.OSFile(name, "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        batch, size = [], 0
        for doc in iter_text_documents(path, cfg.doc_separator, cfg.decode_errors):
            batch.append(doc)
            size += len(doc)
            if size >= TEXT_BATCH_BYTES:
                writer.write_batch(pa.record_batch([pa.array(batch, pa.string())], schema=schema))
                batch, size = [], 0
        if batch:
            writer.write_batch(pa.record_batch([pa.array(batch, pa.string())], schema=schema))
    return Dataset.from_file(name)


def load_source(cfg: DataConfig, scratch: Path, labelled: bool = False) -> DatasetDict:
    """The source as a DatasetDict with a 'train' and a 'validation' split, a 'text' and (labelled) a 'label' column.

    A .txt source is copied to an Arrow file in the folder `scratch` (the caller removes it once done)."""
    if isinstance(cfg.source, dict):  # {train: files, validation: files}
        loaded = DatasetDict({split: _load_files(files, cfg, labelled, scratch)
                              for split, files in split_source_files(cfg.source).items()})
        return _with_splits(loaded if "validation" in loaded else loaded["train"], cfg, labelled)
    if cfg.source == "stories":
        if labelled:
            from rafale.stories import labelled_story_splits

            pairs = labelled_story_splits(cfg.num_train_stories, cfg.num_val_stories, seed=cfg.split_seed)
            return DatasetDict({
                split: Dataset.from_dict({"text": [t for t, _ in rows], "label": [label for _, label in rows]})
                for split, rows in pairs.items()
            })
        return DatasetDict({split: Dataset.from_dict({"text": docs}) for split, docs in _story_texts(cfg).items()})
    if cfg.source.startswith("hf:"):
        name = cfg.source[3:]
        try:
            loaded = load_dataset(name, cfg.hub_config)
        except Exception as err:  # the hub raises many types; all mean the same to a user
            raise DataError(f"data.source: could not load hub dataset '{name}' (needs internet): {err}") from None
    else:
        path = Path(cfg.source).expanduser()
        if path.is_dir():
            try:
                loaded = load_from_disk(str(path))
            except FileNotFoundError as err:
                raise DataError(f"data.source: {path} is a folder but not one written by datasets.save_to_disk ({err})") from None
        else:
            loaded = _load_file(path, cfg, labelled, scratch)
    return _with_splits(loaded, cfg, labelled)


def _load_files(files: list[Path], cfg: DataConfig, labelled: bool, scratch: Path) -> Dataset:
    """Several files of one split (shards), as one Dataset."""
    parts = [_load_file(path, cfg, labelled, scratch) for path in files]
    return parts[0] if len(parts) == 1 else concatenate_datasets(parts)


def _load_file(path: Path, cfg: DataConfig, labelled: bool, scratch: Path) -> Dataset:
    """One .txt/.jsonl/.json/.parquet/.csv file as a Dataset; bad bytes and a missing column name the file and row."""
    if path.suffix == ".txt":
        # decode_errors is not in the cache fingerprint: 'error' either fails or reads what 'replace' reads
        return _text_source_dataset(path, cfg, scratch)
    readers = {".jsonl": Dataset.from_json, ".json": Dataset.from_json, ".parquet": Dataset.from_parquet,
               ".csv": Dataset.from_csv}
    if path.suffix not in readers:
        raise DataError(f"data.source: {path} has an unsupported suffix; expected a folder or one of {TEXT_SUFFIXES}")
    read = readers[path.suffix]
    if path.suffix != ".parquet":  # Arrow's own UTF-8 errors name neither the line nor the byte
        clean = _utf8_checked_copy(path, cfg.decode_errors)
        if clean is not None:
            try:
                return _check_columns(_read_table(read, clean, path), path, cfg, labelled)
            finally:
                clean.unlink()
    return _check_columns(_read_table(read, path, path), path, cfg, labelled)


def _read_table(read, path: Path, named: Path) -> Dataset:
    try:
        return read(str(path))
    except Exception as err:  # Arrow and datasets raise many types for a malformed file
        message = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise DataError(f"data.source: {named} could not be read as {named.suffix[1:]}: {message}") from None


def _utf8_checked_copy(path: Path, errors: str) -> Path | None:
    """None when `path` is valid UTF-8. Otherwise an error naming the line and byte (decode_errors: error), or a
    copy with U+FFFD in place of the bad bytes (decode_errors: replace), as .txt sources get."""
    bad_lines = []
    with path.open("rb") as f:
        offset = 0
        for number, line in enumerate(f, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as err:
                if errors == "error":
                    raise DataError(
                        f"data.source: {path} is not UTF-8 at line {number} (byte offset {offset + err.start}, "
                        f"{line[err.start:err.start + 4]!r}); fix the file or set data.decode_errors: replace") from None
                bad_lines.append(number)
            offset += len(line)
    if not bad_lines:
        return None
    print(f"rafale: data.source: replaced invalid UTF-8 on {len(bad_lines):,} line(s) of {path} (first: line "
          f"{bad_lines[0]}) with U+FFFD (data.decode_errors: error stops instead)")
    handle, name = tempfile.mkstemp(suffix=path.suffix, prefix="rafale-utf8-")  # the source's folder may be read-only
    os.close(handle)
    clean = Path(name)
    clean.write_text(path.read_bytes().decode("utf-8", errors="replace"), encoding="utf-8")
    return clean


def _check_columns(ds: Dataset, path: Path, cfg: DataConfig, labelled: bool) -> Dataset:
    """The text column exists and holds strings (no nulls), naming the file and the first bad row."""
    columns = [("data.text_column", cfg.text_column)] + ([("data.label_column", cfg.label_column)] if labelled else [])
    for key, column in columns:
        if column not in ds.column_names:
            raise DataError(f"{key}: no column '{column}' in {path}; columns: {ds.column_names}")
    values = ds.data.column(cfg.text_column)
    if not pa.types.is_string(values.type) and not pa.types.is_large_string(values.type):
        raise DataError(f"data.text_column: column '{cfg.text_column}' of {path} holds {values.type}, not text")
    if values.null_count:
        row = next(i for i, v in enumerate(values.is_null().to_pylist()) if v)
        raise DataError(f"data.text_column: row {row} of {path} has no text (null) in column '{cfg.text_column}'")
    return ds


def _with_splits(loaded, cfg: DataConfig, labelled: bool = False) -> DatasetDict:
    if isinstance(loaded, DatasetDict):
        if "train" not in loaded:
            raise DataError(f"data.source: has splits {list(loaded)} but no 'train' split")
        val_name = next((s for s in ("validation", "valid", "val", "test") if s in loaded), None)
        if val_name is not None:
            loaded = DatasetDict({"train": loaded["train"], "validation": loaded[val_name]})
        else:
            loaded = loaded["train"]
    if isinstance(loaded, Dataset):
        if len(loaded) < 2:
            raise DataError(f"data.source: {cfg.source} holds {len(loaded)} document{'' if len(loaded) == 1 else 's'}; "
                            f"need at least 2 to split{_separator_hint(cfg) if len(loaded) == 1 else ''}")
        loaded = loaded.train_test_split(test_size=cfg.val_fraction, seed=cfg.split_seed)
        loaded = DatasetDict({"train": loaded["train"], "validation": loaded["test"]})
    columns = {"text": ("data.text_column", cfg.text_column)}
    if labelled:
        columns["label"] = ("data.label_column", cfg.label_column)
    for split, ds in loaded.items():
        for key, column in columns.values():
            if column not in ds.column_names:
                raise DataError(
                    f"{key}: no column '{column}' in the {split} split of {cfg.source}; columns: {ds.column_names}"
                )
        if len(ds) == 0:
            raise DataError(f"data.source: the {split} split of {cfg.source} is empty")
    out = {}
    for split, ds in loaded.items():
        ds = ds.select_columns([column for _, column in columns.values()])
        out[split] = ds.rename_columns({column: name for name, (_, column) in columns.items() if column != name})
    return DatasetDict(out)


def _separator_hint(cfg: DataConfig) -> str:
    """For a .txt source that came out as one document: most such files are one document per line, or documents
    between blank lines, which data.doc_separator (default <|endoftext|>) must then say."""
    files = split_source_files(cfg.source)["train"] if isinstance(cfg.source, dict) else [Path(cfg.source)]
    if not any(f.suffix == ".txt" for f in files):
        return ""
    return (f" (a .txt source is cut into documents at data.doc_separator, here {cfg.doc_separator!r}: set "
            "data.doc_separator: \"\\n\" for one document per line, or \"\\n\\n\" for documents separated by a blank line)")


def _story_texts(cfg: DataConfig) -> dict[str, list[str]]:
    from rafale.stories import story_splits

    return story_splits(cfg.num_train_stories, cfg.num_val_stories, seed=cfg.split_seed)


def source_identity(cfg: DataConfig) -> list:
    if isinstance(cfg.source, dict):
        files = split_source_files(cfg.source)
        return [{split: [_file_identity(p) for p in paths] for split, paths in files.items()}, cfg.text_column,
                cfg.doc_separator, cfg.val_fraction if "validation" not in files else None, cfg.split_seed]
    if cfg.source == "stories":
        generator = Path(__file__).with_name("stories.py").read_bytes()
        return ["stories", cfg.num_train_stories, cfg.num_val_stories, cfg.split_seed, hashlib.sha256(generator).hexdigest()]
    if cfg.source.startswith("hf:"):
        return [cfg.source, cfg.hub_config, cfg.text_column, cfg.val_fraction, cfg.split_seed]
    path = Path(cfg.source).expanduser()
    return [_file_identity(path), cfg.text_column, cfg.doc_separator, cfg.val_fraction, cfg.split_seed]


def source_name(cfg: DataConfig) -> str:
    if isinstance(cfg.source, dict):
        first = split_source_files(cfg.source)["train"][0]
        return _safe_name(first.parent.name if first.stem in ("train", "training") else first.stem)
    if cfg.source in ("stories",):
        return cfg.source
    if cfg.source.startswith("hf:"):
        return _safe_name(cfg.source[3:].replace("/", "--"))
    return _safe_name(Path(cfg.source).expanduser().stem or Path(cfg.source).name)


# ----------------------------------------------------------------------------------------------------
# tokenizers


def tokenizer_identity(cfg: DataConfig, kind: str = "bpe") -> list:
    if cfg.tokenizer == "train":
        return [kind, cfg.vocab_size]
    if cfg.tokenizer.startswith("hf:"):
        return [cfg.tokenizer]
    return [hashlib.sha256(Path(cfg.tokenizer).expanduser().read_bytes()).hexdigest()]


def tokenizer_name(cfg: DataConfig, kind: str = "bpe", vocab_size: int | None = None) -> str:
    """The tokenizer's part of a cache folder's name; a trained one by its size, `vocab_size` once trained
    (the trainer may learn fewer tokens than data.vocab_size asks for)."""
    if cfg.tokenizer == "train":
        return f"{kind}{vocab_size or cfg.vocab_size}"
    if cfg.tokenizer.startswith("hf:"):
        return _safe_name(cfg.tokenizer[3:].replace("/", "--"))
    path = Path(cfg.tokenizer)
    return _safe_name(path.parent.name if path.stem == "tokenizer" else path.stem)


# special tokens of the tokenizers trained here, in id order: the ids of Pythia's, BERT's and RoBERTa's own
TRAINED_SPECIALS = {
    "bpe": ["<|endoftext|>", "<|padding|>"],
    "wordpiece": ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
    "bpe-roberta": ["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
}


def train_tokenizer(texts: Dataset, vocab_size: int, kind: str = "bpe") -> Tokenizer:
    """A tokenizer trained on `texts`: byte-level BPE (GPT-2 / GPT-NeoX / RoBERTa) or lower-cased WordPiece (BERT)."""
    specials = TRAINED_SPECIALS[kind]
    if kind == "wordpiece":
        tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
        tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tokenizer.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(
            vocab_size=vocab_size, special_tokens=specials, show_progress=sys.stderr.isatty()
        )
    else:
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=sys.stderr.isatty(),
        )
    batches = (texts[i : i + 1000]["text"] for i in range(0, len(texts), 1000))
    tokenizer.train_from_iterator(batches, trainer, length=len(texts))
    if kind != "bpe":
        tokenizer.post_processor = encoder_post_processor(kind)
    return tokenizer


def encoder_post_processor(kind: str):
    """The framing BERT's and RoBERTa's own tokenizers add (`encode(text)`, HF's `tokenizer(text)`), so that the
    exported tokenizer gives the ids the model was trained on (the decoder's BPE adds nothing, as Pythia's).
    The datapipes encode with add_special_tokens=False and frame by hand (blocks of several documents)."""
    ids = {token: i for i, token in enumerate(TRAINED_SPECIALS[kind])}
    if kind == "wordpiece":
        return processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", ids["[CLS]"]), ("[SEP]", ids["[SEP]"])],
        )
    if kind == "bpe-roberta":  # <s> A </s> and <s> A </s></s> B </s>, as roberta-base's tokenizer.json
        return processors.RobertaProcessing(("</s>", ids["</s>"]), ("<s>", ids["<s>"]), add_prefix_space=False)
    raise ValueError(f"no post-processor for a {kind} tokenizer")


def smallest_vocabulary(kind: str, size: int) -> str:
    """What the smallest vocabulary of a `kind` tokenizer trained here is made of, `size` tokens in all: the
    trainer always keeps its whole alphabet (every byte for byte-level BPE; for WordPiece every character of the
    training text, and as '##c' each that continues a word) and its special tokens, so data.vocab_size below that
    gets that."""
    specials = len(TRAINED_SPECIALS[kind])
    if kind == "wordpiece":
        return (f"the smallest a WordPiece tokenizer can be is the characters of the corpus, with their ## "
                f"continuation forms ({size - specials:,}), plus its {specials} special tokens: {size:,}")
    return f"the smallest a byte-level BPE can be is its byte alphabet (256) plus its {specials} special tokens: {size:,}"


def warn_if_smaller(trained: int, asked: int, kind: str):
    """Say when the trainer learned another number of tokens than data.vocab_size asks for: fewer (it ran out of
    merges) or more (the size asked is below the smallest possible). The model and the cache name use the size it
    got, and a researcher comparing vocabulary sizes must know."""
    if trained < asked:
        print(f"rafale: warning: data.vocab_size asks for {asked:,} tokens but the {kind} tokenizer trained on this "
              f"data has {trained:,} (the trainer ran out of merges); using {trained:,}")
    elif trained > asked:
        print(f"rafale: warning: data.vocab_size asks for {asked:,} tokens but {smallest_vocabulary(kind, trained)}; "
              f"using {trained:,}")


def load_tokenizer(spec: str) -> Tokenizer:
    """A tokenizers JSON file, or 'hf:<name>' from the hub."""
    if spec.startswith("hf:"):
        try:
            return Tokenizer.from_pretrained(spec[3:])
        except Exception as err:
            raise DataError(f"data.tokenizer: could not load hub tokenizer '{spec[3:]}' (needs internet): {err}") from None
    try:
        return Tokenizer.from_file(str(Path(spec).expanduser()))
    except Exception as err:
        raise DataError(f"data.tokenizer: {spec} is not a tokenizers JSON file: {err}") from None


def special_token_ids(tokenizer: Tokenizer, where: str) -> tuple[int, int]:
    """(end-of-text id, padding id); padding falls back to end-of-text (padded labels are ignored anyway)."""
    vocab = tokenizer.get_vocab()
    eos = next((vocab[t] for t in EOS_CANDIDATES if t in vocab), None)
    if eos is None:
        raise DataError(f"{where}: the tokenizer has no end-of-text token; expected one of {list(EOS_CANDIDATES)}")
    pad = next((vocab[t] for t in PAD_CANDIDATES if t in vocab), eos)
    return eos, pad


# ----------------------------------------------------------------------------------------------------
# datapipes


@dataclass
class PreparedData:
    """What a datapipe hands the trainer: the cached splits and the tokenizer that made them."""

    splits: DatasetDict
    tokenizer: Tokenizer
    path: Path
    meta: dict

    @property
    def eos_token_id(self) -> int:
        return self.meta["eos_token_id"]

    @property
    def pad_token_id(self) -> int:
        return self.meta["pad_token_id"]

    @property
    def vocab_size(self) -> int:
        return self.meta["vocab_size"]


MIN_VALIDATION_EXAMPLES = 10  # fewer validation blocks (or examples) than this give a noisy validation loss


def small_validation_warning(meta: dict) -> str | None:
    """A warning when the validation split holds fewer than MIN_VALIDATION_EXAMPLES blocks (or examples): its loss
    and bits per byte then rest on a few (maybe one padded) blocks. None when it is large enough."""
    info = meta["splits"].get("validation")
    if info is None:
        return None
    count, unit = (info["blocks"], "block") if "blocks" in info else (info["examples"], "example")
    if count >= MIN_VALIDATION_EXAMPLES:
        return None
    tokens = f" ({info['tokens']:,} tokens)" if "tokens" in info else ""
    return (f"warning: the validation split holds only {count:,} {unit}{'' if count == 1 else 's'}{tokens}, fewer "
            f"than {MIN_VALIDATION_EXAMPLES}: its loss and metrics will be noisy; give it more data "
            "(data.val_fraction, or a larger validation file)")


def _process_alive(pid: int) -> bool:
    """Whether process `pid` runs on this machine. Elsewhere than on POSIX (where os.kill(pid, 0) would signal
    it), say yes: a stale folder left in place costs disk space, a live build removed costs a crash."""
    if os.name != "posix":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it runs, as another user
        return True
    return True


def find_cache(folder: Path, fingerprint: str) -> Path | None:
    """The complete cache in `folder` whose name ends with `fingerprint`: the rest of the name (a trained
    tokenizer's size) is known only once built, the fingerprint before."""
    for path in sorted(folder.glob(f"*_{fingerprint}")):
        if (path / "rafale.json").is_file():
            return path
    return None


def wait_for_cache(folder: Path, fingerprint: str, timeout_s: float = 24 * 3600, poll_s: float = 1.0) -> Path:
    """Wait until another process has finished building the cache `fingerprint` in `folder`."""
    deadline = time.monotonic() + timeout_s
    while (path := find_cache(folder, fingerprint)) is None:
        if time.monotonic() > deadline:
            raise DataError(f"data.cache_dir: gave up waiting {timeout_s:.0f} s for the first process to build "
                            f"the cache *_{fingerprint} in {folder}")
        time.sleep(poll_s)
    return path


class DataPipe:
    """Load, tokenize, chunk and cache one dataset. Subclasses define `_prepare` and `collator`.

    Every datapipe takes the same arguments: the data section, the model family it prepares for (model.type:
    encoders frame texts with their family's special tokens) and the tokenization processes (0: data.num_proc).
    A new task is a subclass and one line in DATAPIPES at the bottom of this file."""

    name = "base"
    tokenizer_kind = "bpe"  # what `tokenizer: train` trains
    labelled = False  # whether the source must have a label column
    scratch: Path | None = None  # while building: a folder inside the temporary cache for files `_prepare` streams

    def __init__(self, cfg: DataConfig, family: str = "pythia", num_proc: int = 0):
        self.cfg = cfg
        self.family = family
        self.num_proc = num_proc or cfg.num_proc or os.cpu_count() or 1
        self.root = cache_root(cfg.cache_dir)

    def collator(self, meta: dict):
        """The batch maker for this data: PreparedData.meta -> a callable from a list of examples to a batch."""
        raise NotImplementedError

    def fingerprint_inputs(self) -> dict:
        return {
            "pipeline": [self.name, PIPELINE_VERSION],
            "source": source_identity(self.cfg),
            "tokenizer": tokenizer_identity(self.cfg, self.tokenizer_kind),
            "block_size": self.cfg.block_size,
        }

    @property
    def fingerprint(self) -> str:
        return _sha(self.fingerprint_inputs())[:10]

    def cache_name(self, vocab_size: int | None = None, train_examples: int | None = None) -> str:
        """The cache folder's name; once built it holds the trained tokenizer's real `vocab_size` and the number of
        training blocks (`len{N}`), both known only then."""
        tokenizer = tokenizer_name(self.cfg, self.tokenizer_kind, vocab_size)
        length = f"_len{train_examples}" if train_examples is not None else ""
        return f"{source_name(self.cfg)}_{tokenizer}_bs{self.cfg.block_size}{length}_{self.fingerprint}"

    @property
    def cache_path(self) -> Path:
        """The complete cache of these inputs, else the name a build starts under (with the asked vocabulary size)."""
        return find_cache(self.root / self.name, self.fingerprint) or self.root / self.name / self.cache_name()

    def load(self, verbose: bool = True) -> PreparedData:
        """The prepared data: from the cache when it is complete, else built now and cached."""
        folder = self.root / self.name
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise DataError(f"data.cache_dir: cannot create the cache folder {folder}: {err}") from None
        if not os.access(folder, os.W_OK):
            raise DataError(f"data.cache_dir: the cache folder {folder} is not writable")
        # Under Composer's launcher, local rank 0 builds the cache and the node's other ranks wait for it.
        # Between unrelated processes, the lock lets one build while the others wait, then find the cache.
        if int(os.environ.get("LOCAL_RANK", "0")) > 0:
            wait_for_cache(folder, self.fingerprint)
        lock = folder / (self.cache_name() + ".lock")
        with FileLock(str(lock)):
            try:
                path = find_cache(folder, self.fingerprint)
                if path is not None:
                    if verbose:
                        print(f"rafale: using cached data at {path}")
                else:
                    path = self._build(folder, verbose)
            finally:
                # No lock file is left behind, after a build, a failed build or a cache hit. It is removed while
                # still held: a process already waiting on it then gets a lock on an unlinked file, which filelock
                # sees (st_nlink 0) and retries on a fresh file, so one process at a time still holds the lock
                # (removing it after the release could delete a newcomer's live lock file instead). And should two
                # processes ever hold it at once (an older filelock, a file system without flock), the lock only
                # saves work: each builds into its own .tmp-<pid> folder, a live builder's folder is never taken
                # for a stale one, and the second to finish keeps the first's cache (`_build`).
                with contextlib.suppress(OSError):  # on Windows filelock removes it itself
                    lock.unlink()
        meta = json.loads((path / "rafale.json").read_text())
        splits = DatasetDict({split: load_from_disk(str(path / split)) for split in meta["splits"]})
        tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        return PreparedData(splits.with_format("torch"), tokenizer, path, meta)

    def _build(self, folder: Path, verbose: bool) -> Path:
        """Build the cache under a temporary name in `folder`; rename it, once complete, to its final name
        (which holds the trained tokenizer's real size). Returns the final path."""
        name = self.cache_name()
        if verbose:
            print(f"rafale: preparing data into {folder / name}")
        # a temporary folder of this cache whose builder (the pid in its name) is gone is what a killed build left
        # behind; one whose builder still runs is being built (see load: the lock does not guarantee it is not)
        for stale in folder.glob(name + ".tmp-*"):
            pid = stale.name.rpartition(".tmp-")[2]
            if not (pid.isdigit() and int(pid) != os.getpid() and _process_alive(int(pid))):
                shutil.rmtree(stale, ignore_errors=True)
        tmp = folder / f"{name}.tmp-{os.getpid()}"
        self.scratch = tmp / "scratch"  # source copies and streamed splits while building; gone before the rename
        try:
            tmp.mkdir(parents=True)
            raw = self.load_raw()
            if self.cfg.tokenizer == "train":
                tokenizer = train_tokenizer(raw["train"], self.cfg.vocab_size, self.tokenizer_kind)
                warn_if_smaller(tokenizer.get_vocab_size(), self.cfg.vocab_size, self.tokenizer_kind)
            else:
                tokenizer = load_tokenizer(self.cfg.tokenizer)
            meta = {
                "datapipe": self.name,
                "fingerprint_inputs": self.fingerprint_inputs(),
                "config": dict(vars(self.cfg)),
                "vocab_size": tokenizer.get_vocab_size(),
                # what `tokenizer: train` asked for; the trainer may learn fewer tokens (vocab_size is what it got)
                "vocab_size_asked": self.cfg.vocab_size if self.cfg.tokenizer == "train" else None,
                **self.special_ids(tokenizer),
                "splits": {},
            }
            prepared = self._prepare(raw, tokenizer, meta)
            path = folder / self.cache_name(meta["vocab_size"], len(prepared["train"]))
            try:
                tokenizer.save(str(tmp / "tokenizer.json"))
                for split, ds in prepared.items():
                    save_split(ds, tmp / split, self.scratch)
                    meta["splits"][split] = self._describe(ds)
                    meta["splits"][split]["sha256"] = content_digest(load_from_disk(str(tmp / split)))
                shutil.rmtree(self.scratch, ignore_errors=True)
                (tmp / "rafale.json").write_text(json.dumps(meta, indent=2))  # written last: marks the cache complete
                try:
                    os.replace(tmp, path)
                except OSError:
                    if not (path / "rafale.json").is_file():
                        raise
                    # another process built the same cache meanwhile (see load): keep theirs, drop ours
                    shutil.rmtree(tmp, ignore_errors=True)
                if verbose and path.name != name:
                    print(f"rafale: data cached at {path}")
            except OSError as err:  # a full disk or a read-only folder: the except below removes what was written
                raise DataError(f"data.cache_dir: could not write the data cache {path}: {err.strerror or err} "
                                "(free space there, or point data.cache_dir / $RAFALE_CACHE elsewhere)") from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return path

    def load_raw(self) -> DatasetDict:
        """The source's splits of texts (and labels); a trained tokenizer learns from raw["train"]."""
        return load_source(self.cfg, self.scratch, labelled=self.labelled)

    def _describe(self, ds: Dataset) -> dict:
        return {"examples": len(ds)}

    def special_ids(self, tokenizer: Tokenizer) -> dict:
        """The special token ids this datapipe needs, for the cache's rafale.json."""
        eos, pad = special_token_ids(tokenizer, "data.tokenizer")
        return {"eos_token_id": eos, "pad_token_id": pad}

    def _prepare(self, raw: DatasetDict, tokenizer: Tokenizer, meta: dict) -> DatasetDict:
        """Everything but padding: text splits in, example splits out. May add to `meta` (saved in rafale.json)."""
        raise NotImplementedError

    def _tokenize(self, ds: Dataset, split: str, function, features: Features) -> Dataset:
        """Batched, multi-process `map` of `function(batch of rows) -> batch of token lists` over a split."""
        num_proc = self.num_proc if len(ds) >= 20_000 and self.num_proc > 1 else None
        return ds.map(
            function,
            batched=True,
            batch_size=10_000,  # large batches: encode_batch parallelizes within each call
            num_proc=num_proc,
            remove_columns=ds.column_names,
            features=features,
            desc=f"tokenizing {split}",
            load_from_cache_file=False,
            keep_in_memory=True,
        )


INT32_MAX = 2**31 - 1  # an Arrow list's offsets are int32: one list array holds at most this many values


def block_chunks(num_tokens: int, block_size: int, max_chunk_tokens: int = INT32_MAX) -> list[tuple[int, int]]:
    """(start, stop) token ranges that cover [0, num_tokens), each a whole number of blocks (the last may end
    with a short one) and at most max_chunk_tokens long, so that each range's block offsets fit in int32."""
    step = max(1, max_chunk_tokens // block_size) * block_size
    return [(start, min(start + step, num_tokens)) for start in range(0, num_tokens, step)]


def chunk_into_blocks(token_lists: pa.ChunkedArray, block_size: int, max_chunk_tokens: int = INT32_MAX) -> pa.ChunkedArray:
    """Concatenate token lists into one stream and cut it every block_size tokens (the last block may be short).

    The blocks come as several list arrays when the stream is longer than int32 offsets can address (2^31 tokens);
    the column type stays list<int32>, so the datasets features and the collators are the same."""
    # flatten chunk by chunk: combining the lists first would need offsets past int32 on a large split
    pieces = [chunk.flatten() for chunk in token_lists.chunks]
    stream = pa.concat_arrays(pieces) if pieces else pa.array([], pa.int32())
    lists = []
    for start, stop in block_chunks(len(stream), block_size, max_chunk_tokens):
        offsets = np.append(np.arange(0, stop - start, block_size), stop - start)
        lists.append(pa.ListArray.from_arrays(pa.array(offsets, type=pa.int32()), stream.slice(start, stop - start)))
    return pa.chunked_array(lists, type=pa.list_(stream.type))


def describe_blocks(ds: Dataset) -> dict:
    """Sizes of a split of token blocks, for rafale.json and DATA=1."""
    tokens = sum(len(chunk.flatten()) for chunk in ds.data.column("input_ids").chunks)
    return {"examples": len(ds), "blocks": len(ds), "tokens": tokens}


SHARD_TOKENS = 2**22  # tokens cut into blocks and written at a time (16 MiB of int32): about what a split holds in memory
ENCODE_BATCH = 1000  # documents per encode_batch call, which tokenizes them in parallel
PROGRESS_EVERY = 50_000_000  # tokens between progress lines when stderr is not a terminal


class BlockWriter:
    """Cut a token stream, given piece by piece, into blocks of block_size and write them to an Arrow file.

    The blocks are those of cutting the whole stream at once (`chunk_into_blocks`, the last block may be short),
    but they are written a shard of `shard_tokens` at a time: the tokens past a shard's last whole block are
    carried into the next, so at most about one shard is held. Each shard is its own record batch, with its own
    int32 offsets, so a split of any length fits (the file's own offsets are 64-bit)."""

    def __init__(self, path: Path, block_size: int, shard_tokens: int = SHARD_TOKENS):
        self.block_size = block_size
        # whole blocks, and a shard's offsets fit in int32
        self.shard_tokens = max(1, min(shard_tokens, INT32_MAX) // block_size) * block_size
        self.pending, self.pending_tokens = [], 0  # token arrays not written yet
        self.tokens = self.blocks = self.shards = self.most_held = 0
        self.schema = TOKEN_FEATURES.arrow_schema
        self.sink = pa.OSFile(str(path), "wb")
        self.writer = pa.ipc.new_stream(self.sink, self.schema)

    def add(self, tokens: np.ndarray):
        self.pending.append(tokens)
        self.pending_tokens += len(tokens)
        self.most_held = max(self.most_held, self.pending_tokens)
        if self.pending_tokens < self.shard_tokens:
            return
        stream = np.concatenate(self.pending)
        whole = len(stream) // self.shard_tokens * self.shard_tokens
        for start in range(0, whole, self.shard_tokens):
            self._write(stream[start : start + self.shard_tokens])
        self.pending, self.pending_tokens = [stream[whole:]], len(stream) - whole

    def close(self):
        if self.pending_tokens:
            self._write(np.concatenate(self.pending))
        self.pending, self.pending_tokens = [], 0
        self.writer.close()
        self.sink.close()

    def _write(self, tokens: np.ndarray):
        offsets = np.append(np.arange(0, len(tokens), self.block_size), len(tokens)).astype(np.int32)
        blocks = pa.ListArray.from_arrays(pa.array(offsets), pa.array(tokens, pa.int32()))
        self.writer.write_batch(pa.record_batch([blocks], schema=self.schema))
        self.tokens += len(tokens)
        self.blocks += len(offsets) - 1
        self.shards += 1


class TokenProgress:
    """Tokens done so far: a tqdm bar on an interactive stderr, else a line every PROGRESS_EVERY tokens."""

    def __init__(self, desc: str, every: int | None = None):
        self.desc, self.every, self.count = desc, every or PROGRESS_EVERY, 0
        self.bar = None
        if sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(desc=desc, unit="tok", unit_scale=True, file=sys.stderr)

    def update(self, tokens: int):
        before, self.count = self.count, self.count + tokens
        if self.bar is not None:
            self.bar.update(tokens)
        elif self.count // self.every > before // self.every:
            print(f"rafale: {self.desc}: {self.count:,} tokens", flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def token_stream(encodings, end_id: int) -> np.ndarray:
    """The ids of encoded documents, each followed by `end_id`, as one int32 array."""
    return pa.array([e.ids + [end_id] for e in encodings], pa.list_(pa.int32())).flatten().to_numpy()


def write_blocks(texts: Dataset, tokenizer: Tokenizer, end_id: int, block_size: int, path: Path, desc: str,
                 shard_tokens: int = SHARD_TOKENS) -> BlockWriter:
    """Tokenize `texts` batch by batch, each document followed by `end_id`, and write the stream's blocks to `path`."""
    writer = BlockWriter(path, block_size, shard_tokens)
    progress = TokenProgress(desc)
    try:
        for batch in texts.iter(batch_size=ENCODE_BATCH):
            tokens = token_stream(tokenizer.encode_batch(batch["text"], add_special_tokens=False), end_id)
            writer.add(tokens)
            progress.update(len(tokens))
        writer.close()
    except OSError as err:  # a full disk: the build's cleanup removes what was written
        raise DataError(f"data.cache_dir: could not write the data cache ({path}): {err.strerror or err} "
                        "(free space there, or point data.cache_dir / $RAFALE_CACHE elsewhere)") from None
    finally:
        progress.close()
    return writer


def content_digest(ds: Dataset) -> str:
    """sha256 of a split's values, column by column. The same examples give the same digest however the Arrow
    table is chunked and wherever the cache lives, so the resume guard can tell a corpus edited without changing
    its size (two words swapped) from the same corpus moved to another folder."""
    digest = hashlib.sha256()
    for name in sorted(ds.column_names):
        digest.update(name.encode() + b"\0")
        for chunk in ds.data.column(name).chunks:
            _digest_array(digest, chunk)
    return digest.hexdigest()


def _digest_array(digest, array: pa.Array):
    if isinstance(array, pa.ExtensionArray):  # datasets' ArrayND image columns
        array = array.storage
    while pa.types.is_list(array.type) or pa.types.is_large_list(array.type) or pa.types.is_fixed_size_list(array.type):
        digest.update(pc.list_value_length(array).to_numpy(zero_copy_only=False).astype(np.int64).tobytes())
        array = pc.list_flatten(array)
    if pa.types.is_string(array.type) or pa.types.is_large_string(array.type) or pa.types.is_binary(array.type):
        for value in array.to_pylist():
            data = value.encode() if isinstance(value, str) else (value or b"")
            digest.update(len(data).to_bytes(8, "little") + data)
    else:
        digest.update(array.to_numpy(zero_copy_only=False).tobytes())


def save_split(ds: Dataset, path: Path, scratch: Path | None):
    """Save a prepared split where `load_from_disk` finds it, as `save_to_disk` does.

    A split streamed into one Arrow file in `scratch` is moved into place rather than copied (a copy would read
    the whole split back through memory): `save_to_disk` of the split's first row writes the folder's metadata,
    and the streamed file replaces that row's data file."""
    files = [Path(f["filename"]).resolve() for f in ds.cache_files]
    if scratch is None or len(files) != 1 or files[0].parent != scratch.resolve() or ds._indices is not None:
        ds.save_to_disk(str(path))
        return
    Dataset.from_dict(ds[:1], features=ds.features).save_to_disk(str(path), num_shards=1)
    (data_file,) = json.loads((path / "state.json").read_text())["_data_files"]
    os.replace(files[0], path / data_file["filename"])


class CausalLMDataPipe(DataPipe):
    """Causal language modelling: documents joined by the end-of-text token, cut into blocks.

    Each split streams: tokenized a batch of documents at a time and written to disk a shard at a time, so
    memory does not grow with the corpus."""

    name = "causal_lm"
    shard_tokens = SHARD_TOKENS

    def _prepare(self, raw: DatasetDict, tokenizer: Tokenizer, meta: dict) -> DatasetDict:
        scratch = self.scratch or Path(tempfile.mkdtemp(prefix="rafale-blocks-"))
        scratch.mkdir(parents=True, exist_ok=True)
        out = {}
        for split, ds in raw.items():
            path = scratch / f"{split}-blocks.arrow"
            write_blocks(ds, tokenizer, meta["eos_token_id"], self.cfg.block_size, path, f"tokenizing {split}",
                         self.shard_tokens)
            out[split] = Dataset.from_file(str(path))
            if len(out[split]) == 0:
                raise DataError(f"data.source: the {split} split has no tokens after tokenization")
        return DatasetDict(out)

    def _describe(self, ds: Dataset) -> dict:
        return describe_blocks(ds)

    def collator(self, meta: dict):
        return CausalLMCollator(pad_token_id=meta["pad_token_id"])


@dataclass
class CausalLMCollator:
    """Stack blocks into input_ids (B, T) and labels shifted by one, IGNORE_INDEX past each block's end."""

    pad_token_id: int

    def __call__(self, examples: list[dict]) -> dict:
        blocks = [e["input_ids"] for e in examples]
        T = max(len(b) for b in blocks)
        input_ids = torch.full((len(blocks), T), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(blocks), T), IGNORE_INDEX, dtype=torch.long)
        for i, block in enumerate(blocks):
            input_ids[i, : len(block)] = block
            labels[i, : len(block) - 1] = block[1:]
        return {"input_ids": input_ids, "labels": labels}


# ----------------------------------------------------------------------------------------------------
# encoders: masked language modelling and sequence classification

ENCODER_SPECIALS = {  # role -> names it goes by in BERT's and RoBERTa's vocabularies
    "cls_token_id": ("[CLS]", "<s>"),
    "sep_token_id": ("[SEP]", "</s>"),
    "pad_token_id": ("[PAD]", "<pad>"),
    "mask_token_id": ("[MASK]", "<mask>"),
}


class EncoderDataPipe(DataPipe):
    """What the MLM and classification datapipes share: BERT/RoBERTa special tokens and tokenizers."""

    def __init__(self, cfg: DataConfig, family: str = "bert", num_proc: int = 0):
        super().__init__(cfg, family, num_proc)
        self.tokenizer_kind = "wordpiece" if family == "bert" else "bpe-roberta"

    def special_ids(self, tokenizer: Tokenizer) -> dict:
        vocab = tokenizer.get_vocab()
        ids = {}
        for role, names in ENCODER_SPECIALS.items():
            found = [vocab[n] for n in names if n in vocab]
            if not found:
                raise DataError(f"data.tokenizer: the tokenizer has no {' or '.join(names)} token, which an encoder needs")
            ids[role] = found[0]
        return ids

    def frame(self, token_lists: list[list[int]], meta: dict) -> list[list[int]]:
        """[CLS] tokens [SEP] (BERT) or <s> tokens </s> (RoBERTa) around each list."""
        return [[meta["cls_token_id"], *ids, meta["sep_token_id"]] for ids in token_lists]


class MLMDataPipe(EncoderDataPipe):
    """Masked LM: documents joined by [SEP], cut into blocks of block_size - 2, each framed by [CLS] ... [SEP].

    Masking is the collator's job, so each epoch masks afresh."""

    name = "mlm"

    def _prepare(self, raw: DatasetDict, tokenizer: Tokenizer, meta: dict) -> DatasetDict:
        sep = meta["sep_token_id"]

        def tokenize(batch):
            encodings = tokenizer.encode_batch(batch["text"], add_special_tokens=False)
            return {"input_ids": [e.ids + [sep] for e in encodings]}

        out = {}
        for split, ds in raw.items():
            tokenized = self._tokenize(ds, split, tokenize, TOKEN_FEATURES)
            blocks = chunk_into_blocks(tokenized.data.column("input_ids"), self.cfg.block_size - 2)
            framed = self.frame(blocks.to_pylist(), meta)
            out[split] = Dataset.from_dict({"input_ids": framed}, features=TOKEN_FEATURES)
        return DatasetDict(out)

    def _describe(self, ds: Dataset) -> dict:
        return describe_blocks(ds)

    def collator(self, meta: dict):
        return MLMCollator(
            pad_token_id=meta["pad_token_id"],
            mask_token_id=meta["mask_token_id"],
            special_ids=tuple(meta[k] for k in ("cls_token_id", "sep_token_id", "pad_token_id", "mask_token_id")),
            vocab_size=meta["vocab_size"],
            mlm_probability=self.cfg.mlm_probability,
        )


class ClassificationDataPipe(EncoderDataPipe):
    """Sequence classification: each text truncated to block_size (framing included), with its class id.

    Labels may be class ids or names; names map to ids through data.label_names, or sorted when it is not set.
    The mapping is saved in the cache's rafale.json (and the run folder's labels.json)."""

    name = "classification"
    labelled = True

    def fingerprint_inputs(self) -> dict:
        return super().fingerprint_inputs() | {"labels": [self.cfg.label_column, self.cfg.label_names]}

    def label_names(self, raw: DatasetDict) -> list[str]:
        if self.cfg.label_names is not None:
            return list(self.cfg.label_names)
        labels = set(raw["train"]["label"])
        if all(isinstance(x, str) for x in labels):
            return sorted(labels)
        if all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in labels):
            return [str(i) for i in range(max(labels) + 1)]
        raise DataError(f"data.label_column: labels must be class names or ids >= 0, got {sorted(map(repr, labels))[:5]}")

    def _prepare(self, raw: DatasetDict, tokenizer: Tokenizer, meta: dict) -> DatasetDict:
        names = self.label_names(raw)
        ids_of = {name: i for i, name in enumerate(names)}
        max_tokens = self.cfg.block_size - 2
        meta["label_names"] = names

        def label_id(label, row: int, split: str) -> int:
            if isinstance(label, str) and label in ids_of:
                return ids_of[label]
            if isinstance(label, int) and not isinstance(label, bool) and 0 <= label < len(names):
                return label
            raise DataError(
                f"data.label_column: row {row} of the {split} split has label {label!r}, not one of the "
                f"{len(names)} classes {names} (set data.label_names to list them)"
            )

        out = {}
        for split, ds in raw.items():

            def tokenize(batch, indices):
                for text, row in zip(batch["text"], indices):
                    if not isinstance(text, str) or not text.strip():
                        raise DataError(f"data.text_column: row {row} of the {split} split has an empty text")
                encodings = tokenizer.encode_batch(batch["text"], add_special_tokens=False)
                return {
                    "input_ids": self.frame([e.ids[:max_tokens] for e in encodings], meta),
                    "label": [label_id(x, row, split) for x, row in zip(batch["label"], indices)],
                }

            features = Features({"input_ids": Sequence(Value("int32")), "label": Value("int64")})
            out[split] = ds.map(
                tokenize, batched=True, with_indices=True, remove_columns=ds.column_names, features=features,
                desc=f"tokenizing {split}", load_from_cache_file=False, keep_in_memory=True,
            )
        return DatasetDict(out)

    def _describe(self, ds: Dataset) -> dict:
        counts = np.bincount(np.asarray(ds.data.column("label")))
        tokens = sum(len(chunk.flatten()) for chunk in ds.data.column("input_ids").chunks)
        return {"examples": len(ds), "examples_per_class": counts.tolist(), "tokens": tokens}

    def collator(self, meta: dict):
        return ClassificationCollator(pad_token_id=meta["pad_token_id"])


def pad_batch(sequences: list, pad_token_id: int):
    """Right-pad to the longest: input_ids (B, T) and attention_mask (B, T) of 1 for real tokens."""
    T = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), T), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), T), dtype=torch.long)
    for i, seq in enumerate(sequences):
        input_ids[i, : len(seq)] = torch.as_tensor(seq)
        attention_mask[i, : len(seq)] = 1
    return input_ids, attention_mask


@dataclass
class MLMCollator:
    """Pad blocks and mask them (BERT): `mlm_probability` of the non-special tokens are chosen; of those 80%
    become the mask token, 10% a random token, 10% stay. Labels hold the original ids there, IGNORE_INDEX elsewhere.

    Fresh masks each call (training), unless `fixed_seed` is set (DEBUG=1: the target must not move), or
    `per_example` is (evaluation, see `for_evaluation`): each example's masks come from its own tokens, so every
    evaluation scores the same masks and leaves the global RNG, which training draws from, alone."""

    pad_token_id: int
    mask_token_id: int
    special_ids: tuple[int, ...]
    vocab_size: int
    mlm_probability: float = 0.15
    fixed_seed: int | None = None
    per_example: bool = False

    def for_evaluation(self) -> "MLMCollator":
        return replace(self, per_example=True)

    def __call__(self, examples: list[dict]) -> dict:
        input_ids, attention_mask = pad_batch([e["input_ids"] for e in examples], self.pad_token_id)
        special = torch.isin(input_ids, torch.tensor(self.special_ids)) | (attention_mask == 0)
        probability = torch.full(input_ids.shape, self.mlm_probability).masked_fill(special, 0.0)
        if self.per_example and self.fixed_seed is None:
            chosen, roll, random_ids = self._draw_per_example(probability, attention_mask.sum(dim=1).tolist(), input_ids)
        else:
            generator = None if self.fixed_seed is None else torch.Generator().manual_seed(self.fixed_seed)
            chosen, roll, random_ids = self._draw(probability, generator)
        labels = input_ids.masked_fill(~chosen, IGNORE_INDEX)
        to_mask = chosen & (roll < 0.8)
        to_random = chosen & (roll >= 0.8) & (roll < 0.9)
        input_ids = torch.where(to_mask, self.mask_token_id, torch.where(to_random, random_ids, input_ids))
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    def _draw(self, probability, generator):
        """Which positions are chosen, the roll that picks mask/random/keep, and the random ids: each (B, T)."""
        chosen = torch.bernoulli(probability, generator=generator).bool()
        roll = torch.rand(probability.shape, generator=generator)
        random_ids = torch.randint(self.vocab_size, probability.shape, generator=generator)
        return chosen, roll, random_ids

    def _draw_per_example(self, probability, lengths: list[int], input_ids):
        """`_draw` row by row, each row seeded by a hash of its unpadded tokens (whatever batch it lands in)."""
        chosen = torch.zeros(probability.shape, dtype=torch.bool)
        roll = torch.ones(probability.shape)
        random_ids = torch.zeros(probability.shape, dtype=torch.long)
        for i, n in enumerate(lengths):
            tokens = input_ids[i, :n].numpy().astype("int64").tobytes()
            seed = int.from_bytes(hashlib.sha256(tokens).digest()[:8], "little") >> 1  # manual_seed wants < 2**63
            drawn = self._draw(probability[i, :n], torch.Generator().manual_seed(seed))
            for full, part in zip((chosen, roll, random_ids), drawn):
                full[i, :n] = part
        return chosen, roll, random_ids


@dataclass
class ClassificationCollator:
    """Pad texts with an attention mask; labels (B,) are class ids."""

    pad_token_id: int

    def __call__(self, examples: list[dict]) -> dict:
        input_ids, attention_mask = pad_batch([e["input_ids"] for e in examples], self.pad_token_id)
        labels = torch.tensor([int(e["label"]) for e in examples], dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


# ----------------------------------------------------------------------------------------------------
# image-text pairs for CLIP and SigLIP (the sources and the image conversion are in rafale/image_text.py)


class ImageTextDataPipe(DataPipe):
    """Contrastive image-text pairs: uint8 images (H, W, 3) and caption ids ending with the end-of-text token (at
    most block_size), plus a `zero_shot` split of labelled images whose classes and prompts go in the meta."""

    name = "contrastive"

    def fingerprint_inputs(self) -> dict:
        cfg = self.cfg
        if cfg.source == "shapes":
            generator = Path(__file__).with_name("shapes.py").read_bytes()
            source = ["shapes", cfg.num_train_images, cfg.num_val_images, cfg.num_zero_shot_images,
                      hashlib.sha256(generator).hexdigest()]
        elif cfg.source.startswith("hf:"):
            source = [cfg.source, cfg.hub_config]
        else:  # the captions file's folder: the file and the images it names
            path = Path(cfg.source).expanduser()
            source = _file_identity(path if path.is_dir() else path.parent)
        zero_shot = None if cfg.zero_shot_source is None else _file_identity(Path(cfg.zero_shot_source).expanduser())
        return {
            "pipeline": [self.name, PIPELINE_VERSION],
            "source": [source, cfg.image_column, cfg.text_column, cfg.val_fraction, cfg.split_seed],
            "tokenizer": tokenizer_identity(cfg, self.tokenizer_kind),
            "block_size": cfg.block_size,
            "images": [cfg.image_size, zero_shot, cfg.prompt_templates],
        }

    def load_raw(self) -> DatasetDict:
        """The captions as a DatasetDict of texts (what the tokenizer trains on); the images wait in self.images."""
        from rafale.image_text import hub_pairs, local_pairs, shapes_pairs

        cfg = self.cfg
        pairs = shapes_pairs(cfg) if cfg.source == "shapes" else hub_pairs(cfg) if cfg.source.startswith("hf:") \
            else local_pairs(cfg)
        self.images = {split: images for split, (_, images) in pairs.items()}
        return DatasetDict({split: Dataset.from_dict({"text": texts}) for split, (texts, _) in pairs.items()})

    def _prepare(self, raw: DatasetDict, tokenizer: Tokenizer, meta: dict) -> DatasetDict:
        from rafale.image_text import images_dataset, pixel_features, zero_shot_source
        from rafale.models.clip import encode_texts

        size = self.cfg.image_size
        out = {}
        for split, ds in raw.items():
            ids = encode_texts(tokenizer, ds["text"], meta["eos_token_id"], self.cfg.block_size)
            features = pixel_features(size, input_ids=Sequence(Value("int32")))
            out[split] = images_dataset(self.images[split], {"input_ids": ids}, features, size)
        zero_shot = zero_shot_source(self.cfg)
        if zero_shot is not None:  # {classes, templates, held_out} go in the meta, for the model's builder
            features = pixel_features(size, label=Value("int64"))
            labels = {"label": zero_shot.pop("labels")}
            out["zero_shot"] = images_dataset(zero_shot.pop("images"), labels, features, size)
            meta["zero_shot"] = zero_shot
        meta["image_size"] = size
        return DatasetDict(out)

    def _describe(self, ds: Dataset) -> dict:
        info = {"examples": len(ds), "images": len(ds), "image_size": self.cfg.image_size,
                "image_bytes": len(ds) * self.cfg.image_size ** 2 * 3}
        if "input_ids" in ds.column_names:
            info["tokens"] = len(ds.data.column("input_ids").combine_chunks().flatten())
        return info

    def collator(self, meta: dict):
        from rafale.models.clip import text_length

        return ImageTextCollator(self.family, meta["pad_token_id"], text_length(self.family, self.cfg.block_size),
                                 augment=self.cfg.augment)


@dataclass
class ImageTextCollator:
    """Stack images (augmented when training) into pixel_values (B, 3, H, W), normalised for the family, and pad
    the texts: input_ids (B, T) with attention_mask (CLIP), or to text_length without a mask (SigLIP)."""

    family: str
    pad_token_id: int
    text_length: int | None = None
    augment: bool = False  # a random mild crop of each image (no flips or colour changes, which captions describe)
    fixed_seed: int | None = None  # DEBUG=1 sets it: no augmentation, so the batch holds still

    def for_evaluation(self) -> "ImageTextCollator":
        return replace(self, augment=False)

    def __call__(self, examples: list[dict]) -> dict:
        from rafale.models.clip import normalize, pad_texts

        # datasets hands uint8 columns over as int64 tensors; the crop wants uint8
        pixels = torch.stack([torch.as_tensor(e["pixel_values"]).to(torch.uint8) for e in examples])  # (B, H, W, 3)
        pixels = pixels.permute(0, 3, 1, 2)  # (B, 3, H, W)
        if self.augment and self.fixed_seed is None:
            from torchvision.transforms import v2

            crop = v2.RandomResizedCrop(pixels.shape[-1], scale=(0.85, 1.0), ratio=(0.9, 1.1), antialias=True)
            pixels = torch.stack([crop(p) for p in pixels])  # a different crop per image
        input_ids, attention_mask = pad_texts([e["input_ids"] for e in examples], self.pad_token_id, self.text_length)
        batch = {"pixel_values": normalize(pixels, self.family), "input_ids": input_ids}
        if attention_mask is not None:
            batch["attention_mask"] = attention_mask
        return batch


# model.task -> the datapipe that prepares its data and makes its batches; a new task is one line here (and its
# name in the TASKS entry of each model family that does it, rafale/models/configurations.py)
DATAPIPES = {"causal_lm": CausalLMDataPipe, "mlm": MLMDataPipe, "classification": ClassificationDataPipe,
             "contrastive": ImageTextDataPipe}


def datapipe_for(cfg: Config) -> DataPipe:
    """The datapipe of model.task (by default the family's first task), preparing data for model.type."""
    task = cfg.model.task
    if task is None:
        from rafale.models.configurations import TASKS

        task = TASKS[cfg.model.type][0]
    return DATAPIPES[task](cfg.data, family=cfg.model.type)


def describe_vocabulary(data: PreparedData) -> str:
    """The vocabulary the model gets: a trained tokenizer may have fewer tokens than data.vocab_size asked for (it
    ran out of merges), or more (the size asked is below its alphabet plus its special tokens)."""
    asked = data.meta.get("vocab_size_asked")
    if asked is None:
        return f"vocabulary: {data.vocab_size:,} tokens"
    shortfall = f", fewer than the {asked:,} data.vocab_size asked for" if data.vocab_size < asked else ""
    if data.vocab_size > asked:  # a trained tokenizer's fingerprint input is [kind, the size asked]
        kind = data.meta["fingerprint_inputs"]["tokenizer"][0]
        shortfall = f", more than the {asked:,} data.vocab_size asked for: {smallest_vocabulary(kind, data.vocab_size)}"
    return f"vocabulary: {data.vocab_size:,} tokens (tokenizer trained here{shortfall})"


def print_data_summary(data: PreparedData):
    """What DATA=1 and every run print of the prepared data."""
    print(f"rafale: data cache: {data.path}")
    print(f"rafale:   {describe_vocabulary(data)}")
    for split, info in data.meta["splits"].items():
        if "images" in info:
            side, tokens = info["image_size"], f", {info['tokens']:,} caption tokens" if "tokens" in info else ""
            print(f"rafale:   {split}: {info['images']:,} images of {side}x{side} "
                  f"({info['image_bytes'] / 1e6:.1f} MB as uint8){tokens}")
        elif "blocks" in info:
            print(f"rafale:   {split}: {info['tokens']:,} tokens in {info['blocks']:,} blocks")
        else:
            print(f"rafale:   {split}: {info['examples']:,} examples")
    small = small_validation_warning(data.meta)  # here, so that DATA=1 says it too
    if small is not None:
        print(f"rafale: {small}")


def prepare_data(cfg: Config) -> PreparedData:
    """The config's data, from the cache or prepared now."""
    return datapipe_for(cfg).load()
