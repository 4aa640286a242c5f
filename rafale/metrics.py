"""Bits per byte: a validation loss that can be compared across tokenizers.

A loss in nats per token depends on how much text a token covers, so two tokenizers' losses cannot be compared.
Bits per byte divides the same summed loss by the text's size instead:

    bits/byte = (sum over scored tokens of -ln p(token)) / (ln 2 * UTF-8 bytes of the text those tokens cover)

Validation sees token ids in blocks, not the text, so `BitsPerByte` takes each id's UTF-8 length from
`token_bytes(tokenizer)` (rafale/models/token_bytes.py), which is exact for a byte-level BPE (special tokens such as
<|endoftext|> cover no text: 0; added plain-text tokens, such as GPT-NeoX's runs of spaces, their content's length)
and None for other kinds (WordPiece), whose validation then has no BitsPerByte; `rafale score` counts every kind's
bytes in the text (`TextBytes`, beside it), the same figure on byte-level BPE. A tokenizer that adds a space before
each document (`add_prefix_space`) has one byte taken off each document's first token, which the metric finds
after each end-of-text id: the documents' own bytes, as `rafale score` counts them. `BitsPerByte` sums both parts over
a validation set (and over ranks) and divides once at the end.

CLIP and SigLIP's validation metrics are here too: `ContrastiveLoss`, `RetrievalRecall` (recall@k, image to text
and text to image, over all validation pairs) and `ZeroShotAccuracy` (rafale.models.composer.ComposerContrastive).
"""

import math

import torch
import torch.nn.functional as F
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

IGNORE_INDEX = -100


class BitsPerByte(Metric):
    """Bits per UTF-8 byte of the text the scored labels cover. update(logits (B, T, V), labels (B, T), input_ids
    (B, T)).

    document_end_id: for a tokenizer that adds a space before each document's first word (byte-level
    `add_prefix_space`, rafale.models.token_bytes.adds_prefix_space), the end-of-text id that ends each document:
    the label that follows it is the next document's first token, and one byte of its length (the "Ġ" the
    tokenizer added) is not the document's. Documents are stripped (rafale's .txt sources are); one of a table
    source that starts with a space itself gets no space added, and is counted one byte short: the ids cannot say.
    None: no space is added, and update needs no input_ids."""

    full_state_update = False
    higher_is_better = False

    def __init__(self, token_bytes: torch.Tensor, ignore_index: int = IGNORE_INDEX, document_end_id: int | None = None):
        super().__init__()
        self.ignore_index = ignore_index
        self.document_end_id = document_end_id
        self.register_buffer("table", token_bytes.clone(), persistent=False)  # moves with the metric's device
        self.add_state("nats", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("bytes", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, logits: torch.Tensor, labels: torch.Tensor, input_ids: torch.Tensor | None = None) -> None:
        scored = labels != self.ignore_index
        targets = labels[scored]  # (N,)
        self.nats += F.cross_entropy(logits[scored].float(), targets, reduction="sum").double()
        self.bytes += self.table[targets].sum()
        if self.document_end_id is not None:
            if input_ids is None:
                raise ValueError("BitsPerByte with document_end_id needs the batch's input_ids")
            # labels are input_ids shifted by one: a scored label whose input is the end-of-text starts a document
            starts = scored & (input_ids == self.document_end_id)  # (B, T)
            self.bytes -= (starts & (self.table[labels.clamp(min=0)] > 0)).sum()

    def compute(self) -> torch.Tensor:
        return self.nats / (math.log(2) * self.bytes.clamp(min=1))


# ----------------------------------------------------------------------------------------------------
# CLIP and SigLIP


class ContrastiveLoss(Metric):
    """The model's loss on each validation batch (its negatives are that batch), averaged over pairs."""

    full_state_update = False
    higher_is_better = False

    def __init__(self):
        super().__init__()
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, loss: torch.Tensor, n: int) -> None:
        self.total += loss.detach().double() * n
        self.count += n

    def compute(self) -> torch.Tensor:
        return (self.total / self.count).float()


class RetrievalRecall(Metric):
    """Recall@k over all validation pairs: the fraction of images whose own caption is among the k texts nearest
    to it ("image_to_text"), or of captions whose image is among the k nearest images ("text_to_image")."""

    full_state_update = False

    def __init__(self, direction: str, k: int):
        super().__init__()
        self.direction, self.k = direction, k
        self.add_state("image", default=[], dist_reduce_fx="cat")
        self.add_state("text", default=[], dist_reduce_fx="cat")

    def update(self, image: torch.Tensor, text: torch.Tensor) -> None:
        self.image.append(image.detach().float())
        self.text.append(text.detach().float())

    def compute(self) -> torch.Tensor:
        image, text = dim_zero_cat(self.image), dim_zero_cat(self.text)  # (N, P) each
        similarity = image @ text.t()  # (N images, N texts)
        if self.direction == "text_to_image":
            similarity = similarity.t()
        own = similarity.diagonal()[:, None]  # (N, 1)
        rank = (similarity > own).sum(dim=1)  # how many candidates score above the true one
        return (rank < self.k).float().mean()


class ZeroShotAccuracy(Metric):
    """Accuracy of zero-shot classification. The wrapper classifies its zero-shot images once per evaluation (on
    the first batch) and updates with (predicted, true) class ids."""

    full_state_update = False

    def __init__(self, subset: str = "all"):
        super().__init__()
        self.subset = subset  # which images and classes (rafale.models.composer.ZeroShotSet.subset)
        self.add_state("correct", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("done", torch.tensor(0, dtype=torch.long), dist_reduce_fx="max")

    def update(self, predicted: torch.Tensor, labels: torch.Tensor) -> None:
        self.correct += (predicted == labels).sum()
        self.total += labels.numel()
        self.done.fill_(1)

    def compute(self) -> torch.Tensor:
        return self.correct.float() / self.total.clamp(min=1)
