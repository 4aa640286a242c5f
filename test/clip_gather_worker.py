"""The worker of test_clip_training's two-process test, in its own module so that spawned processes import only
torch and rafale/models/clip.py (not Composer, datasets and transformers, which the test module imports)."""

import copy

import torch
import torch.nn.functional as F

from rafale.models.clip import build_model, contrastive_logits, gather_features
from rafale.models.contrastive import CLIP_PRESETS, SIGLIP_PRESETS

FAMILIES = ("clip", "siglip")


def features_and_model(family: str):
    """8 pairs of normalised features and a model whose temperature (and bias) the loss uses."""
    torch.manual_seed(0)
    cfg = copy.deepcopy(CLIP_PRESETS["clip-debug"] if family == "clip" else SIGLIP_PRESETS["siglip-debug"])
    cfg.text.vocab_size = 50  # on a copy: the presets are shared
    model = build_model(cfg)
    image, text = F.normalize(torch.randn(8, 64), dim=-1), F.normalize(torch.randn(8, 64), dim=-1)
    return image, text, model


def gathered_loss_worker(rank: int, store: str, out: str):
    """Rank `rank` of 2 holds pairs 4*rank .. 4*rank+3; saves its loss and its features' gradients."""
    import faulthandler
    from datetime import timedelta

    import torch.distributed as dist

    # the test gives up after 180 s; if this rank is still alive at 150 s, its threads' stacks go to stderr, which
    # the failure report shows (a hang was seen once in a whole-suite run and not reproduced alone)
    faulthandler.dump_traceback_later(150, exit=False)
    torch.set_num_threads(1)
    # a file store: with a TCP store, the rank that hosts it may exit first and leave the other's
    # destroy_process_group waiting for it (seen once under load); a timeout turns any wait into a failure
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=60))
    results = {}
    for family in FAMILIES:
        image, text, model = features_and_model(family)
        local = slice(4 * rank, 4 * rank + 4)
        mine_image, mine_text = image[local].detach().requires_grad_(), text[local].detach().requires_grad_()
        loss = model.loss(contrastive_logits(model, *gather_features(mine_image, mine_text)))
        loss.backward()
        results[family] = {"loss": loss.detach(), "image_grad": mine_image.grad, "text_grad": mine_text.grad}
    torch.save(results, f"{out}.{rank}")
    dist.barrier()  # neither leaves while the other may still need it
    dist.destroy_process_group()
