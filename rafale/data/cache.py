"""The cache every datapipe shares: the `DataPipe` base class, and what a datapipe hands the trainer (`PreparedData`).

A datapipe loads a source (rafale/data/sources.py), gets a tokenizer (rafale/data/tokenizers.py), and `_prepare`s
the splits: everything except padding happens there, once; the result is saved with `datasets.save_to_disk` under
the cache folder and memory-mapped back on later runs. Padding, masking and label shifting are the collator's
job, per batch. Each task is a subclass in its own file (rafale/data/causal_lm.py, mlm.py, classification.py,
image_text.py), listed in DATAPIPES (rafale/data/__init__.py).

Cache folders are named `{source}_{tokenizer}_bs{block_size}_len{N}_{fingerprint}` (N training blocks, or
examples); the fingerprint covers every input that changes the content (the source's files, the tokenizer, the
pipeline version, and every data.* field), so a changed input builds a new cache, and a cache is found by its
fingerprint alone. Safe by default: a field a datapipe starts to read (a response column, a second text) is in
its fingerprint without a word; only the fields a datapipe declares it cannot be changed by (`not_in_cache`) are
left out, so that changing them (data.num_workers, or data.mlm_probability, which the MLM collator reads per
batch) reuses the cache. A trained tokenizer is named by the size it got (`bpe2761`), known only once trained.
A cache is built under a temporary name, holds a `rafale.json` written last, and is renamed into place when
complete: an interrupted build is never mistaken for a finished one. Each split's `content_digest` goes in rafale.json, for
the resume guard.
"""

import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasets import Dataset, DatasetDict, Features, load_from_disk
from filelock import FileLock
from tokenizers import Tokenizer

from rafale.config import DataConfig
from rafale.data.sources import fields_the_source_ignores, load_source, source_identity, source_name
from rafale.data.tokenizers import (TRAINED_SPECIALS, load_tokenizer, smallest_vocabulary, special_token_ids,
                                    tokenizer_identity, tokenizer_name, train_tokenizer, warn_if_smaller)
from rafale.errors import DataError
from rafale.progress import Progress

PIPELINE_VERSION = 3  # 2: caches named by the trained vocabulary size; trained tokenizers carry their post-processor
# 3: every data.* field but a datapipe's not_in_cache is a fingerprint input

# data.* fields that cannot change what any datapipe writes to its cache: where the cache is, how many processes
# build it and load batches from it, and decode_errors ('error' either stops or reads what 'replace' reads)
# document_mask: the collator's choice, made from the same blocks
NEVER_IN_CACHE = frozenset({"cache_dir", "num_proc", "num_workers", "decode_errors", "document_mask"})
# the fields only the image-text datapipe reads, which a text datapipe says cannot change its cache
IMAGE_FIELDS = frozenset({"image_size", "image_column", "num_train_images", "num_val_images", "num_zero_shot_images",
                          "zero_shot_source", "prompt_templates", "augment"})
LABEL_FIELDS = frozenset({"label_column", "label_names"})  # what only a labelled (classification) datapipe reads


def cache_root(cache_dir=None) -> Path:
    """The cache folder: data.cache_dir, else $RAFALE_CACHE, else ~/.rafale_cache."""
    return Path(cache_dir or os.environ.get("RAFALE_CACHE") or "~/.rafale_cache").expanduser()


def _sha(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class PreparedData:
    """What a datapipe hands the trainer: the cached splits and the tokenizer that made them."""

    splits: DatasetDict
    tokenizer: Tokenizer
    path: Path
    meta: dict
    announced: bool = False  # whether loading said where the cache is ("using cached data at", "data cached at")

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

    Every datapipe takes the data section, then what the model side says of the data it wants, as plain values
    (each model family's `data`, rafale/models/<family>.py):
        tokenizer_kind  what `data.tokenizer: train` trains: "bpe" (Pythia's), "wordpiece" (BERT's) or
                        "bpe-roberta" (RoBERTa's); None: the datapipe's own default (its class attribute)
        num_proc        the tokenization processes (0: data.num_proc, else every core)
    and a datapipe that needs more takes it as keyword arguments (the image-text one: the text length and the
    pixel normalisation). A new task is a subclass in its own file and one line in DATAPIPES
    (rafale/data/__init__.py); `head` says which model head its examples train (a family lists the heads it has),
    so a subclass of CausalLMDataPipe trains every decoder."""

    name = "base"
    head = "base"  # causal_lm, mlm, classification or contrastive: the model head the examples are for
    # data.* fields this datapipe's cache cannot depend on (besides NEVER_IN_CACHE): every other field is in its
    # fingerprint, read or not; a field left out here is the safe side (a cache built again, never a stale one)
    not_in_cache: frozenset = frozenset()
    tokenizer_kind = "bpe"  # what `tokenizer: train` trains, unless the constructor says otherwise
    labelled = False  # whether the source must have a label column
    scratch: Path | None = None  # while building: a folder inside the temporary cache for files `_prepare` streams

    def __init__(self, cfg: DataConfig, tokenizer_kind: str | None = None, num_proc: int = 0):
        self.cfg = cfg
        self.tokenizer_kind = tokenizer_kind or self.tokenizer_kind
        if self.tokenizer_kind not in TRAINED_SPECIALS:
            raise ValueError(f"tokenizer_kind must be one of {list(TRAINED_SPECIALS)}, got {self.tokenizer_kind!r}")
        self.num_proc = num_proc or cfg.num_proc or os.cpu_count() or 1
        self.root = cache_root(cfg.cache_dir)

    def collator(self, meta: dict):
        """The batch maker for this data: PreparedData.meta -> a callable from a list of examples to a batch."""
        raise NotImplementedError

    def fingerprint_inputs(self) -> dict:
        """What the cache's content depends on: the source's files (names, sizes, times), the tokenizer, and every
        data.* field but those that cannot change it (`fields_not_in_cache`)."""
        left_out, source = self.fields_not_in_cache(), self.source_identity()  # the source's, then the tokenizer's
        return {
            "pipeline": [self.name, PIPELINE_VERSION],
            "source": source,
            "tokenizer": tokenizer_identity(self.cfg, self.tokenizer_kind),
            "data": {f.name: getattr(self.cfg, f.name) for f in dataclasses.fields(self.cfg) if f.name not in left_out},
        }

    def source_identity(self) -> list:
        """The source's files by name, size and modification time (rafale/data/sources.py), or its generator."""
        return source_identity(self.cfg)

    def fields_not_in_cache(self) -> frozenset:
        """NEVER_IN_CACHE, this datapipe's `not_in_cache`, the fields its kind of source does not read, and those
        the fingerprint takes otherwise: data.source and data.tokenizer by their files (a tokenizer file by its
        content, so a copy elsewhere is the same), data.vocab_size when the tokenizer is not trained here."""
        identified = {"source", "tokenizer"} | ({"vocab_size"} if self.cfg.tokenizer != "train" else set())
        return NEVER_IN_CACHE | self.not_in_cache | fields_the_source_ignores(self.cfg) | identified

    @functools.cached_property
    def fingerprint(self) -> str:
        """Computed once per datapipe (the source's files are stat'ed, a tokenizer file hashed): a datapipe is made
        for one config, and a changed input is a new DataPipe."""
        return _sha(self.fingerprint_inputs())[:10]

    def cache_name(self, vocab_size: int | None = None, train_examples: int | None = None) -> str:
        """The cache folder's name; once built it holds the trained tokenizer's real `vocab_size` and the number of
        training blocks (`len{N}`), both known only then."""
        source, fingerprint = source_name(self.cfg), self.fingerprint
        tokenizer = tokenizer_name(self.cfg, self.tokenizer_kind, vocab_size)
        length = f"_len{train_examples}" if train_examples is not None else ""
        return f"{source}_{tokenizer}_bs{self.cfg.block_size}{length}_{fingerprint}"

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
                    if verbose:
                        print(f"rafale: data cached at {path}")
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
        return PreparedData(splits.with_format("torch"), tokenizer, path, meta, announced=verbose)

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
            with library_progress_bars_off():
                return self._build_into(tmp, folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _build_into(self, tmp: Path, folder: Path) -> Path:
        """`_build`'s steps: read, get a tokenizer, prepare the splits, write them into `tmp`, rename it."""
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
            with Progress("writing the cache", total=len(prepared), unit="splits") as progress:
                for split, ds in prepared.items():
                    save_split(ds, tmp / split, self.scratch)
                    meta["splits"][split] = self._describe(ds)
                    meta["splits"][split]["sha256"] = content_digest(load_from_disk(str(tmp / split)))
                    progress.update()
            shutil.rmtree(self.scratch, ignore_errors=True)
            (tmp / "rafale.json").write_text(json.dumps(meta, indent=2))  # written last: marks the cache complete
            try:
                os.replace(tmp, path)
            except OSError:
                if not (path / "rafale.json").is_file():
                    raise
                # another process built the same cache meanwhile (see load): keep theirs, drop ours
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError as err:  # a full disk or a read-only folder: _build removes what was written
            raise DataError(f"data.cache_dir: could not write the data cache {path}: {err.strerror or err} "
                            "(free space there, or point data.cache_dir / $RAFALE_CACHE elsewhere)") from None
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
        with Progress(f"tokenizing {split}", total=len(ds), unit="examples") as progress:
            return ds.map(counted(function, progress) if num_proc is None else function,
                          batched=True,
                          batch_size=10_000,  # large batches: encode_batch parallelizes within each call
                          num_proc=num_proc,
                          remove_columns=ds.column_names,
                          features=features,
                          load_from_cache_file=False,
                          keep_in_memory=True)


def counted(function, progress):
    """A batched `map` function that also counts its rows on `progress` (in this process only: `map` with
    num_proc pickles the function into other processes, where rafale's progress only says the stage runs)."""

    def function_counting_rows(batch, *args):
        out = function(batch, *args)
        progress.update(len(next(iter(batch.values()))))
        return out

    return function_counting_rows


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


@contextlib.contextmanager
def library_progress_bars_off():
    """`datasets` draws bars of its own while a cache is built ("Generating train split" reading a .csv or .jsonl,
    `map`'s "tokenizing train", `save_to_disk`'s "Saving the dataset (0/1 shards)"), with carriage returns in a
    log; rafale says what it does itself (rafale.progress). Their setting comes back afterwards."""
    was_off = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_off:
            datasets.enable_progress_bars()


def save_split(ds: Dataset, path: Path, scratch: Path | None):
    """Save a prepared split where `load_from_disk` finds it, as `save_to_disk` does.

    A split streamed into one Arrow file in `scratch` is moved into place rather than copied (a copy would read
    the whole split back through memory): `save_to_disk` of the split's first row writes the folder's metadata,
    and the streamed file replaces that row's data file."""
    files = [Path(f["filename"]).resolve() for f in ds.cache_files]
    if scratch is None or len(files) != 1 or files[0].parent != scratch.resolve() or ds._indices is not None:
        with library_progress_bars_off():
            ds.save_to_disk(str(path))
        return
    with library_progress_bars_off():
        Dataset.from_dict(ds[:1], features=ds.features).save_to_disk(str(path), num_shards=1)
    (data_file,) = json.loads((path / "state.json").read_text())["_data_files"]
    os.replace(files[0], path / data_file["filename"])


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
    """What DATA=1 and every run print of the prepared data; where the cache is, unless loading said it."""
    if not data.announced:
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
