"""The thin Composer wrappers: a rafale nn.Module as a ComposerModel (batches in, loss and metrics out).

The models in decoder.py and encoder.py know nothing of Composer; swapping the trainer means replacing this file.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from composer.metrics import CrossEntropy, LanguageCrossEntropy, LanguagePerplexity, MaskedAccuracy
from composer.models import ComposerModel
from torchmetrics.classification import BinaryF1Score, MulticlassAccuracy

from rafale.errors import IGNORE_INDEX


class ComposerLM(ComposerModel):
    """Causal language modelling with the Composer Trainer. Batches hold input_ids and (shifted) labels.

    forward(batch) returns the training loss, computed by the model in chunks (the full logits never exist);
    eval_forward(batch) returns the logits for the metrics.
    vocab_size: the tokenizer's true vocabulary when the model's embedding is padded (to a multiple of 64, for
    fast matmuls); logits are cut to it, so the padding rows never enter the softmax.
    autocast_dtype: run forward and eval_forward under torch.autocast("cpu", dtype) (bfloat16 on a CPU with
    bf16 matmul units, where Composer's own amp_bf16 is refused); None runs in the parameters' dtype.
    token_bytes: each token id's UTF-8 length (rafale.metrics.token_bytes), to report validation bits per byte,
    which unlike the loss compares across tokenizers.
    """

    def __init__(self, model: nn.Module, vocab_size: int | None = None, autocast_dtype: torch.dtype | None = None,
                 token_bytes: torch.Tensor | None = None):
        super().__init__()
        self.model = model
        self.vocab_size = vocab_size
        self.autocast_dtype = autocast_dtype
        self.train_metrics = {}
        self.val_metrics = {
            "LanguageCrossEntropy": LanguageCrossEntropy(ignore_index=IGNORE_INDEX),
            "LanguagePerplexity": LanguagePerplexity(ignore_index=IGNORE_INDEX),
        }
        if token_bytes is not None:
            from rafale.metrics import BitsPerByte

            self.val_metrics["BitsPerByte"] = BitsPerByte(token_bytes, ignore_index=IGNORE_INDEX)

    def autocast(self):
        return torch.autocast("cpu", dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None)

    def forward(self, batch):
        with self.autocast():
            return self.model(batch["input_ids"], attention_mask=batch.get("attention_mask"),
                              labels=batch["labels"], vocab_size=self.vocab_size)

    def loss(self, outputs, batch):
        return outputs  # forward already computed it

    def eval_forward(self, batch, outputs=None):
        with self.autocast():
            logits = self.model(batch["input_ids"], attention_mask=batch.get("attention_mask"))
        return logits[..., : self.vocab_size].float()

    def get_metrics(self, is_train: bool = False):
        return self.train_metrics if is_train else self.val_metrics

    def update_metric(self, batch, outputs, metric):
        metric.update(outputs, batch["labels"])

    def flops_per_batch(self, batch):
        B, T = batch["input_ids"].shape
        return self.model.flops_per_token(T) * B * T


class ComposerEncoder(ComposerModel):
    """What both wrappers share. Batches hold input_ids, labels and optionally attention_mask, token_type_ids.

    autocast_dtype: as ComposerLM's, the forward under torch.autocast("cpu", dtype) on a CPU with bf16 matmul
    units; the losses and metrics then read the outputs in fp32."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.autocast_dtype: torch.dtype | None = None
        self.train_metrics = {}
        self.val_metrics = {}

    def forward(self, batch):
        with torch.autocast("cpu", dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            return self.model(batch["input_ids"], attention_mask=batch.get("attention_mask"),
                              token_type_ids=batch.get("token_type_ids"))

    def eval_forward(self, batch, outputs=None):
        return (outputs if outputs is not None else self.forward(batch)).float()

    def get_metrics(self, is_train: bool = False):
        return self.train_metrics if is_train else self.val_metrics

    def flops_per_batch(self, batch):
        B, T = batch["input_ids"].shape
        return self.model.flops_per_token(T) * B * T


class ComposerMLM(ComposerEncoder):
    """Masked language modelling: labels (B, T) hold the original id at masked positions and -100 elsewhere.

    vocab_size: the tokenizer's true vocabulary when the embedding is padded; logits are cut to it."""

    def __init__(self, model: nn.Module, vocab_size: int | None = None):
        super().__init__(model)
        self.vocab_size = vocab_size
        self.val_metrics = {
            "LanguageCrossEntropy": LanguageCrossEntropy(ignore_index=IGNORE_INDEX),
            # argmax over the last dim, so (B, T, V) logits against (B, T) labels need no reshape
            "MaskedAccuracy": MaskedAccuracy(ignore_index=IGNORE_INDEX),
        }

    def forward(self, batch):
        return super().forward(batch)[..., : self.vocab_size]

    def loss(self, outputs, batch):
        # mean over the masked positions only; fp32 because a bf16 log-softmax over the vocabulary is coarse
        return F.cross_entropy(outputs.flatten(0, 1).float(), batch["labels"].flatten(), ignore_index=IGNORE_INDEX)

    def update_metric(self, batch, outputs, metric):
        metric.update(outputs, batch["labels"])


class ComposerClassifier(ComposerEncoder):
    """Sequence classification: labels (B,) of class ids; cross-entropy, accuracy, and F1 of class 1 when there are two."""

    def __init__(self, model: nn.Module, num_labels: int):
        super().__init__(model)
        self.val_metrics = {
            "CrossEntropy": CrossEntropy(),
            "Accuracy": MulticlassAccuracy(num_classes=num_labels, average="micro"),
        }
        if num_labels == 2:
            self.val_metrics["F1"] = BinaryF1Score()

    def loss(self, outputs, batch):
        return F.cross_entropy(outputs.float(), batch["labels"])

    def update_metric(self, batch, outputs, metric):
        if isinstance(metric, CrossEntropy):
            metric.update(outputs.float(), batch["labels"])
        else:
            metric.update(outputs.argmax(dim=-1), batch["labels"])  # (B, num_labels) -> (B,) predicted ids
