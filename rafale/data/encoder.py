"""What the encoder tasks (rafale/data/mlm.py, classification.py) share: the special tokens BERT and RoBERTa frame
a text with ([CLS] ... [SEP], <s> ... </s>), found in the tokenizer's vocabulary by role, and right-padding with
an attention mask.

An encoder's datapipe trains a WordPiece tokenizer (BERT's) unless it is told `tokenizer_kind="bpe-roberta"`.
"""

import torch
from tokenizers import Tokenizer

from rafale.data.cache import DataPipe
from rafale.errors import DataError

ENCODER_SPECIALS = {  # role -> names it goes by in BERT's and RoBERTa's vocabularies
    "cls_token_id": ("[CLS]", "<s>"),
    "sep_token_id": ("[SEP]", "</s>"),
    "pad_token_id": ("[PAD]", "<pad>"),
    "mask_token_id": ("[MASK]", "<mask>"),
}


class EncoderDataPipe(DataPipe):
    """What the MLM and classification datapipes share: BERT/RoBERTa special tokens and tokenizers."""

    tokenizer_kind = "wordpiece"  # BERT's; RoBERTa's families say "bpe-roberta"

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


def pad_batch(sequences: list, pad_token_id: int):
    """Right-pad to the longest: input_ids (B, T) and attention_mask (B, T) of 1 for real tokens."""
    T = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), T), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), T), dtype=torch.long)
    for i, seq in enumerate(sequences):
        input_ids[i, : len(seq)] = torch.as_tensor(seq)
        attention_mask[i, : len(seq)] = 1
    return input_ids, attention_mask
