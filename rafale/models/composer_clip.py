"""CLIP and SigLIP with the Composer Trainer: the loss over the batch (gathered across ranks), the logit-scale
clamp after each optimizer step, and the evaluation metrics (contrastive loss, retrieval recall@1/@5 both ways,
zero-shot accuracy).

Batches hold pixel_values (B, 3, H, W), input_ids (B, T) and, for CLIP, attention_mask (B, T). A contrastive
loss depends on the batch: with gradient accumulation each microbatch is its own set of negatives, and with
several processes the features of every rank are gathered first (open_clip's `gather_features`), so the
negatives of one step are the whole global batch of a microbatch step.
"""

from dataclasses import dataclass

import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
from composer.core import Callback
from composer.models import ComposerModel
from torchmetrics import Metric

from rafale.models.clip import contrastive_logits, gather_features


class ClampLogitScale(Callback):
    """Keep exp(logit_scale) <= 100 after every optimizer step, as open_clip does."""

    def batch_end(self, state, logger):
        composer_model = getattr(state.model, "module", state.model)  # under DDP, the wrapped model
        composer_model.model.clamp_logit_scale_()


# ----------------------------------------------------------------------------------------------------
# metrics


class ContrastiveLoss(Metric):
    """The model's loss on each validation batch (its negatives are that batch), averaged over pairs."""

    full_state_update = False

    def __init__(self):
        super().__init__()
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, loss, n: int):
        self.total += loss.detach().double() * n
        self.count += n

    def compute(self):
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

    def update(self, image, text):
        self.image.append(image.detach().float())
        self.text.append(text.detach().float())

    def compute(self):
        image = torch.cat(self.image) if isinstance(self.image, list) else self.image  # (N, P)
        text = torch.cat(self.text) if isinstance(self.text, list) else self.text  # (N, P)
        similarity = image @ text.t()  # (N images, N texts)
        if self.direction == "text_to_image":
            similarity = similarity.t()
        own = similarity.diagonal()[:, None]  # (N, 1)
        rank = (similarity > own).sum(dim=1)  # how many candidates score above the true one
        return (rank < self.k).float().mean()


class ZeroShotAccuracy(Metric):
    """Accuracy of zero-shot classification; the wrapper classifies the whole zero-shot set once per evaluation."""

    full_state_update = False

    def __init__(self, held_out_only: bool = False):
        super().__init__()
        self.held_out_only = held_out_only
        self.add_state("correct", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("done", torch.tensor(0, dtype=torch.long), dist_reduce_fx="max")

    def update(self, predictions, labels):
        self.correct += (predictions == labels).sum()
        self.total += labels.numel()
        self.done.fill_(1)

    def compute(self):
        return self.correct.float() / self.total.clamp(min=1)


# ----------------------------------------------------------------------------------------------------
# zero-shot classification


@dataclass
class ZeroShotSet:
    """Labelled images and the class prompts (each class's templates, class-major) to classify them with."""

    pixels: torch.Tensor  # (N, 3, H, W) uint8
    labels: torch.Tensor  # (N,) class ids
    prompts: tuple  # (input_ids (C*K, T), attention_mask (C*K, T) or None)
    num_templates: int
    normalization: tuple  # (mean, std) per channel, of pixels in [0, 1]
    held_out: list  # class ids whose colour-shape pair training never showed

    def pixel_values(self, index, device):
        mean, std = (torch.tensor(v, device=device).view(1, 3, 1, 1) for v in self.normalization)
        return (self.pixels[index].to(device).float() / 255 - mean) / std  # (n, 3, H, W)


@torch.no_grad()
def class_embeddings(model, input_ids, attention_mask, num_templates: int):
    """One unit vector per class: the mean of its prompts' normalised text features, normalised (CLIP's recipe)."""
    text = F.normalize(model.get_text_features(input_ids, attention_mask).float(), dim=-1)  # (C*K, P)
    text = text.view(-1, num_templates, text.shape[-1]).mean(dim=1)  # (C, P)
    return F.normalize(text, dim=-1)


@torch.no_grad()
def zero_shot_probabilities(model, pixel_values, classes):
    """(N, C) probabilities of each class (a softmax over the model's logits, SigLIP's bias aside: it does not
    change the ranking)."""
    image = F.normalize(model.get_image_features(pixel_values).float(), dim=-1)  # (N, P)
    return (model.logit_scale.exp().float() * image @ classes.t()).softmax(dim=-1)  # (N, C)


# ----------------------------------------------------------------------------------------------------
# the wrapper


class ComposerContrastive(ComposerModel):
    """CLIP or SigLIP (rafale.models.clip) trained by the Composer Trainer."""

    def __init__(self, model, zero_shot: ZeroShotSet | None = None, eval_chunk: int = 256):
        super().__init__()
        self.model = model
        self.zero_shot = zero_shot
        self.eval_chunk = eval_chunk  # zero-shot images per forward
        self.callbacks = [ClampLogitScale()]  # rafale.train.run adds these to the Trainer's
        self.train_metrics = {}
        self.val_metrics = {
            "ContrastiveLoss": ContrastiveLoss(),
            "ImageToTextRecall@1": RetrievalRecall("image_to_text", 1),
            "ImageToTextRecall@5": RetrievalRecall("image_to_text", 5),
            "TextToImageRecall@1": RetrievalRecall("text_to_image", 1),
            "TextToImageRecall@5": RetrievalRecall("text_to_image", 5),
        }
        if zero_shot is not None:
            self.val_metrics["ZeroShotAccuracy"] = ZeroShotAccuracy()
            if zero_shot.held_out:
                self.val_metrics["ZeroShotHeldOutAccuracy"] = ZeroShotAccuracy(held_out_only=True)

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
            metric.update(*self.zero_shot_predictions(metric.held_out_only))

    @torch.no_grad()
    def zero_shot_predictions(self, held_out_only: bool):
        """(predicted, true) class ids of this rank's share of the zero-shot images."""
        zs = self.zero_shot
        device = next(self.model.parameters()).device
        index = torch.arange(len(zs.labels))
        if held_out_only:
            index = index[torch.isin(zs.labels, torch.tensor(zs.held_out))]
        if torch_dist.is_available() and torch_dist.is_initialized():
            index = index[torch_dist.get_rank()::torch_dist.get_world_size()]  # the metric sums over ranks
        input_ids, attention_mask = (t if t is None else t.to(device) for t in zs.prompts)
        classes = class_embeddings(self.model, input_ids, attention_mask, zs.num_templates)
        predicted = [
            zero_shot_probabilities(self.model, zs.pixel_values(chunk, device), classes).argmax(dim=-1)
            for chunk in index.split(self.eval_chunk)
        ]
        predicted = torch.cat(predicted) if predicted else torch.empty(0, dtype=torch.long, device=device)
        return predicted, zs.labels[index].to(device)
