"""The thin Composer wrappers: a rafale nn.Module as a ComposerModel (batches in, loss and metrics out).

The models in decoder.py, encoder.py and clip.py know nothing of Composer; swapping the trainer means replacing this
file.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from composer.core import Callback
from composer.metrics import CrossEntropy, LanguageCrossEntropy, LanguagePerplexity, MaskedAccuracy
from composer.models import ComposerModel
from composer.utils import dist
from torchmetrics.classification import BinaryF1Score, MulticlassAccuracy

from rafale.errors import IGNORE_INDEX
from rafale.metrics import ContrastiveLoss, RetrievalRecall, ZeroShotAccuracy
from rafale.models.clip import class_embeddings, contrastive_logits, gather_features, zero_shot_probabilities


def cpu_autocast(dtype: torch.dtype | None):
    """torch.autocast("cpu", dtype), or a no-op when dtype is None (the wrappers' own autocast on a CPU)."""
    return torch.autocast("cpu", dtype=dtype, enabled=dtype is not None)


class ComposerLM(ComposerModel):
    """Causal language modelling with the Composer Trainer. Batches hold input_ids and (shifted) labels.

    forward(batch) returns the training loss, computed by the model in chunks (the full logits never exist);
    eval_forward(batch) returns the logits for the metrics.
    vocab_size: the tokenizer's true vocabulary when the model's embedding is padded (to a multiple of 64, for
    fast matmuls); logits are cut to it, so the padding rows never enter the softmax.
    autocast_dtype: run forward and eval_forward under torch.autocast("cpu", dtype) (bfloat16 on a CPU with
    bf16 matmul units, where Composer's own amp_bf16 is refused); None runs in the parameters' dtype.
    token_bytes: each token id's UTF-8 length (rafale.models.token_bytes), to report validation bits per byte,
    which unlike the loss compares across tokenizers; document_end_id: the end-of-text id where the tokenizer adds
    a space before each document (BitsPerByte takes that byte off the token after it), else None.
    """

    def __init__(self, model: nn.Module, vocab_size: int | None = None, autocast_dtype: torch.dtype | None = None,
                 token_bytes: torch.Tensor | None = None, document_end_id: int | None = None):
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

            self.val_metrics["BitsPerByte"] = BitsPerByte(token_bytes, ignore_index=IGNORE_INDEX,
                                                          document_end_id=document_end_id)

    def autocast(self):
        return cpu_autocast(self.autocast_dtype)

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
        if getattr(metric, "document_end_id", None) is not None:  # BitsPerByte finds the documents' starts
            metric.update(outputs, batch["labels"], batch["input_ids"])
        else:
            metric.update(outputs, batch["labels"])

    def flops_per_token(self, T: int) -> int:
        """A training step's FLOPs per token: the head over the tokenizer's rows, which are all the loss multiplies."""
        return self.model.flops_per_token(T, vocab_size=self.vocab_size)

    def flops_per_batch(self, batch):
        B, T = batch["input_ids"].shape
        return self.flops_per_token(T) * B * T


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
        with cpu_autocast(self.autocast_dtype):
            return self.model(batch["input_ids"], attention_mask=batch.get("attention_mask"),
                              token_type_ids=batch.get("token_type_ids"))

    def eval_forward(self, batch, outputs=None):
        return (outputs if outputs is not None else self.forward(batch)).float()

    def get_metrics(self, is_train: bool = False):
        return self.train_metrics if is_train else self.val_metrics

    def flops_per_token(self, T: int) -> float:
        # an MLM's logits over the padded vocabulary are all computed (then cut to vocab_size): the model's count
        return self.model.flops_per_token(T)

    def flops_per_batch(self, batch):
        B, T = batch["input_ids"].shape
        return self.flops_per_token(T) * B * T


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


# ----------------------------------------------------------------------------------------------------
# CLIP and SigLIP (rafale/models/clip.py). Batches hold pixel_values (B, 3, H, W), input_ids (B, T) and, for CLIP,
# attention_mask (B, T). A contrastive loss depends on the batch: with gradient accumulation each microbatch is its
# own set of negatives, and with several processes the features of every rank are gathered first (open_clip's
# `gather_features`), so the negatives of one step are the whole global microbatch.


class ClampLogitScale(Callback):
    """Keep exp(logit_scale) <= 100 after every optimizer step, as open_clip does."""

    def batch_end(self, state, logger):
        composer_model = getattr(state.model, "module", state.model)  # under DDP, the wrapped model
        composer_model.model.clamp_logit_scale_()


@dataclass
class ZeroShotSet:
    """Labelled images and the class prompts (each class's templates, class-major) to classify them with."""

    prompts: tuple  # (input_ids (C*K, T), attention_mask (C*K, T) or None)
    num_templates: int
    held_out: list  # class ids whose colour-shape pair training never showed (shapes); empty otherwise
    image_mean: list  # the per-channel mean and std the data normalises pixels in [0, 1] by (the data's meta)
    image_std: list
    pixels: torch.Tensor | None = None  # (N, 3, H, W) uint8, attached with the data (ComposerContrastive.attach_splits)
    labels: torch.Tensor | None = None  # (N,) class ids

    def images(self, subset: str) -> torch.Tensor:
        """Indices of the images a ZeroShotAccuracy of this subset scores: all of them, or the held-out classes'."""
        index = torch.arange(len(self.labels))
        return index if subset == "all" else index[torch.isin(self.labels, torch.tensor(self.held_out))]


class ComposerContrastive(ComposerModel):
    """CLIP or SigLIP trained by the Composer Trainer: the loss over the (gathered) batch, the logit-scale clamp,
    and the validation metrics: contrastive loss, retrieval recall@1/@5 both ways, zero-shot accuracy."""

    def __init__(self, model: nn.Module, zero_shot: ZeroShotSet | None = None, eval_chunk: int = 256):
        super().__init__()
        self.model = model
        self.zero_shot = zero_shot
        self.eval_chunk = eval_chunk  # zero-shot images per forward
        self.callbacks = [ClampLogitScale()]  # rafale.train.build_trainer adds them to the Trainer's
        self.train_metrics = {}
        self.val_metrics = {"ContrastiveLoss": ContrastiveLoss()}
        for k in (1, 5):
            self.val_metrics[f"ImageToTextRecall@{k}"] = RetrievalRecall("image_to_text", k)
            self.val_metrics[f"TextToImageRecall@{k}"] = RetrievalRecall("text_to_image", k)
        self._classified = None  # (the eval batch's outputs, predictions): the zero-shot set is classified once

    def attach_splits(self, splits) -> None:
        """Take the data's zero_shot split of labelled images (rafale.train.build_model calls this), and score it at
        every evaluation: all its images, and those of the held-out classes, each among all the classes."""
        if self.zero_shot is None or "zero_shot" not in splits:
            return
        images = splits["zero_shot"][:]  # the whole split, as tensors
        self.zero_shot.pixels = images["pixel_values"].to(torch.uint8).permute(0, 3, 1, 2)  # (N, 3, H, W)
        self.zero_shot.labels = images["label"]
        self.val_metrics["ZeroShotAccuracy"] = ZeroShotAccuracy("all")
        if self.zero_shot.held_out:
            self.val_metrics["ZeroShotHeldOutAccuracy"] = ZeroShotAccuracy("held_out")

    def forward(self, batch):
        """(image, text) normalised features, (B, P) each."""
        image = F.normalize(self.model.get_image_features(batch["pixel_values"]), dim=-1)
        text = F.normalize(self.model.get_text_features(batch["input_ids"], batch.get("attention_mask")), dim=-1)
        return image, text

    def loss(self, outputs, batch):
        image, text = gather_features(*outputs)
        return self.model.loss(contrastive_logits(self.model, image, text))

    def eval_forward(self, batch, outputs=None):
        image, text = outputs if outputs is not None else self.forward(batch)
        # the validation loss of this batch alone, on every rank alike
        return {"image": image, "text": text, "loss": self.model.loss(contrastive_logits(self.model, image, text))}

    def get_metrics(self, is_train: bool = False):
        return self.train_metrics if is_train else self.val_metrics

    def update_metric(self, batch, outputs, metric):
        if isinstance(metric, ContrastiveLoss):
            metric.update(outputs["loss"], outputs["image"].shape[0])
        elif isinstance(metric, RetrievalRecall):
            metric.update(outputs["image"], outputs["text"])
        elif isinstance(metric, ZeroShotAccuracy) and not metric.done:  # once per evaluation
            if self._classified is None or self._classified[0] is not outputs:  # once for all zero-shot metrics
                self._classified = (outputs, self.zero_shot_predictions())
            predicted, labels = self._classified[1]
            index = self.zero_shot_share(self.zero_shot.images(metric.subset))
            metric.update(predicted[index], labels[index])

    @staticmethod
    def zero_shot_share(index):
        """This rank's share of the zero-shot images (the metric sums over ranks)."""
        return index[dist.get_global_rank()::dist.get_world_size()]

    @torch.no_grad()
    def zero_shot_predictions(self):
        """(predicted, true) class ids of all the zero-shot images (a few hundred: every rank classifies them all,
        and counts its share)."""
        zs = self.zero_shot
        device = next(self.model.parameters()).device
        input_ids, attention_mask = (t if t is None else t.to(device) for t in zs.prompts)
        classes = class_embeddings(self.model, input_ids, attention_mask, zs.num_templates)
        mean, std = (torch.tensor(v, device=device).view(1, 3, 1, 1) for v in (zs.image_mean, zs.image_std))
        predicted = [  # the pixels normalised as the collator does (rafale.data.image_text.normalize)
            zero_shot_probabilities(self.model, (pixels.to(device).float() / 255 - mean) / std, classes).argmax(dim=-1)
            for pixels in zs.pixels.split(self.eval_chunk)  # (n, 3, H, W) each
        ]
        return torch.cat(predicted), zs.labels.to(device)
