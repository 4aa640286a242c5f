"""Text sources: a data.source as a DatasetDict with a 'train' and a 'validation' split of texts (and labels).

    stories                   the embedded story generator (rafale/data/stories.py)
    a .txt file               documents cut at data.doc_separator, read in pieces and copied to an Arrow file
    .jsonl .json .parquet .csv  one document a row, in data.text_column (and data.label_column)
    {train: ..., validation: ...}  files (or lists of shards) per split
    a folder                  one written by datasets.save_to_disk
    hf:<name>                 a hub dataset (online only)

A source without a validation split is split by data.val_fraction and data.split_seed. Bytes that are not UTF-8
are replaced (data.decode_errors: replace) or named by file, line and offset (error); a file that is mostly not
text is refused. `source_identity` and `source_name` are what the cache's fingerprint and folder name take of a
source (rafale/data/cache.py).
"""

import hashlib
import os
import re
import sys
import tempfile
from pathlib import Path

import pyarrow as pa
from datasets import Dataset, DatasetDict, Features, Value, concatenate_datasets, load_dataset, load_from_disk

from rafale.config import DataConfig, split_source_files
from rafale.errors import DataError
from rafale.progress import Progress

TEXT_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet", ".csv")


def file_identity(path: Path) -> list:
    """Cheap identity of a file or folder: names, sizes and modification times (contents are not read)."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files]


def safe_name(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-." else "-" for c in text).strip("-.")[:60] or "data"


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


def iter_text_documents(path: Path, separator: str, errors: str = "replace", piece_bytes: int | None = None,
                        progress=None):
    """The documents of a .txt source, stripped, empty ones dropped, reading `piece_bytes` at a time.

    The bytes are split on the separator's UTF-8 bytes, then each document is decoded: a UTF-8 sequence never
    starts inside another, so the cuts are those of splitting the decoded text, and a bad byte's offset is exact.
    A file whose characters are mostly invalid UTF-8 or control bytes (an executable, UTF-16) is a DataError,
    checked after each piece: it does not look like text, and replacing its bytes would train on noise. `progress`
    (rafale.progress.Progress) counts the bytes read."""
    sep, piece_bytes = separator.encode(), piece_bytes or READ_PIECE_BYTES
    replaced, offset, rest = 0, 0, b""  # offset: where `rest` starts in the file
    characters = controls = 0  # so far, for the share of what is not text
    with path.open("rb") as f:
        while True:
            piece = f.read(piece_bytes)
            if progress is not None:
                progress.update(len(piece))
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
    handle, name = tempfile.mkstemp(suffix=".arrow", prefix=f"{safe_name(path.stem)}-", dir=scratch)
    os.close(handle)
    schema = Features({"text": Value("string")}).arrow_schema
    with (pa.OSFile(name, "wb") as sink, pa.ipc.new_stream(sink, schema) as writer,
          Progress(f"reading {path.name}", total=path.stat().st_size, unit="bytes") as progress):
        batch, size = [], 0
        for doc in iter_text_documents(path, cfg.doc_separator, cfg.decode_errors, progress=progress):
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
            from rafale.data.stories import labelled_story_splits

            pairs = labelled_story_splits(cfg.num_train_stories, cfg.num_val_stories, seed=cfg.split_seed)
            return DatasetDict({
                split: Dataset.from_dict({"text": [t for t, _ in rows], "label": [label for _, label in rows]})
                for split, rows in pairs.items()
            })
        return DatasetDict({split: Dataset.from_dict({"text": docs}) for split, docs in _story_texts(cfg).items()})
    if cfg.source.startswith("hf:"):
        name = cfg.source[3:]
        try:
            with Progress(f"loading {name} from the hub"):
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
        dataset = _text_source_dataset(path, cfg, scratch)
        if len(dataset) == 1:
            # stderr: a command's stdout may be its output (rafale score's CSV)
            print(one_document_warning(path, dataset[0]["text"], cfg.doc_separator), file=sys.stderr)
        return dataset
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


_BLANK_LINE = re.compile(r"\n[ \t\r]*\n")


def one_document_warning(path: Path, text: str, separator: str) -> str:
    """The warning for a .txt file that data.doc_separator left whole: train or validation, it is most likely one
    document a line or documents between blank lines, and a model trained on it would silently never see a
    document start (the issue was 167,801 tokens where 164,116 were meant), so every such file is named."""
    if _BLANK_LINE.search(text):
        suggestion = 'it has blank lines: set data.doc_separator: "\\n\\n" if they separate its documents'
    elif "\n" in text:
        suggestion = 'set data.doc_separator: "\\n" if it holds one document a line'
    else:
        suggestion = "it has no line breaks either"
    return (f"rafale: warning: data.source: {path} ({path.stat().st_size:,} bytes) holds 1 document when cut at "
            f"data.doc_separator {separator!r}; {suggestion}")


def _read_table(read, path: Path, named: Path) -> Dataset:
    try:
        with Progress(f"reading {named.name}"):  # datasets' "Generating train split" bar is off (rafale.data.cache)
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
    from rafale.data.stories import story_splits

    return story_splits(cfg.num_train_stories, cfg.num_val_stories, seed=cfg.split_seed)


def source_identity(cfg: DataConfig) -> list:
    if isinstance(cfg.source, dict):
        files = split_source_files(cfg.source)
        return [{split: [file_identity(p) for p in paths] for split, paths in files.items()}, cfg.text_column,
                cfg.doc_separator, cfg.val_fraction if "validation" not in files else None, cfg.split_seed]
    if cfg.source == "stories":
        generator = (Path(__file__).parent / "stories.py").read_bytes()
        return ["stories", cfg.num_train_stories, cfg.num_val_stories, cfg.split_seed, hashlib.sha256(generator).hexdigest()]
    if cfg.source.startswith("hf:"):
        return [cfg.source, cfg.hub_config, cfg.text_column, cfg.val_fraction, cfg.split_seed]
    path = Path(cfg.source).expanduser()
    return [file_identity(path), cfg.text_column, cfg.doc_separator, cfg.val_fraction, cfg.split_seed]


def fields_the_source_ignores(cfg: DataConfig) -> frozenset:
    """The data.* fields this kind of source never reads, left out of the cache's fingerprint (rafale/data/cache.py):
    the story counts unless it is the stories, the columns, separator and validation fraction of the stories
    (which have their own validation split and no file), a hub configuration unless it is the hub."""
    ignored = {"hub_config"} if not (isinstance(cfg.source, str) and cfg.source.startswith("hf:")) else set()
    if cfg.source == "stories":
        return frozenset(ignored | {"text_column", "doc_separator", "val_fraction"})
    if isinstance(cfg.source, dict) and "validation" in split_source_files(cfg.source):
        ignored.add("val_fraction")  # a validation file of its own: nothing is carved off
    return frozenset(ignored | {"num_train_stories", "num_val_stories"})


def source_name(cfg: DataConfig) -> str:
    if isinstance(cfg.source, dict):
        first = split_source_files(cfg.source)["train"][0]
        return safe_name(first.parent.name if first.stem in ("train", "training") else first.stem)
    if cfg.source in ("stories",):
        return cfg.source
    if cfg.source.startswith("hf:"):
        return safe_name(cfg.source[3:].replace("/", "--"))
    return safe_name(Path(cfg.source).expanduser().stem or Path(cfg.source).name)
