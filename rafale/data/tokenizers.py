"""Tokenizers: the one a datapipe tokenizes with, trained here on the training split (data.tokenizer: train), read
from a tokenizers JSON file, or loaded from the hub (hf:<name>).

The kind a `train` tokenizer is (`tokenizer_kind`, which the model side hands the datapipe) fixes its model and
its special tokens: "bpe" (byte-level BPE, Pythia's <|endoftext|> <|padding|>), "wordpiece" (BERT's lower-cased
WordPiece, [PAD] [UNK] [CLS] [SEP] [MASK]) or "bpe-roberta" (byte-level BPE with RoBERTa's <s> <pad> </s> <unk>
<mask>), in the ids of those models' own tokenizers. `tokenizer_identity` and `tokenizer_name` are what the cache's
fingerprint and folder name take of a tokenizer (rafale/data/cache.py).
"""

import hashlib
from pathlib import Path

from datasets import Dataset
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from rafale.config import DataConfig
from rafale.data.sources import safe_name
from rafale.errors import DataError
from rafale.progress import Progress

EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "[SEP]")
PAD_CANDIDATES = ("<|padding|>", "<pad>", "[PAD]")


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
        return safe_name(cfg.tokenizer[3:].replace("/", "--"))
    path = Path(cfg.tokenizer)
    return safe_name(path.parent.name if path.stem == "tokenizer" else path.stem)


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
            vocab_size=vocab_size, special_tokens=specials, show_progress=False
        )
    else:
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
    # the trainer's own bar is off (it draws carriage returns into a log); rafale's counts the documents read, and
    # keeps saying the stage runs while the trainer computes its merges
    with Progress("training the tokenizer", total=len(texts), unit="documents") as progress:

        def batches():
            for i in range(0, len(texts), 1000):
                batch = texts[i : i + 1000]["text"]
                yield batch
                progress.update(len(batch))

        tokenizer.train_from_iterator(batches(), trainer, length=len(texts))
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
