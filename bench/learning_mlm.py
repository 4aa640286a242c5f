"""Learning check for masked LM: rafale's training against Hugging Face's masked-LM model in a plain PyTorch loop.

The reference side trains transformers' BertForMaskedLM (RobertaForMaskedLM for a roberta config), built from
scratch with the config's sizes, on the same blocks (rafale's MLM datapipe, read from the cache) with the same
masking (rafale's MLMCollator, same sampler and seed), the same optimizer settings (AdamW, no weight decay on
biases and LayerNorm weights), the same warmup + cosine/linear/constant schedule (written out below as Composer's
schedulers compute it), gradient clipping and number of steps. rafale trains through its real path, `rafale -c`.
Both are then scored the same way: transformers' class (rafale's model through its export folder) on one
validation set masked once, with a fixed seed per batch. rafale passes when its final masked-LM loss is no worse
than 1% above the reference's.

    PYTHONPATH=$PWD RAFALE_CACHE=/tmp/rc python bench/learning_mlm.py -c test/bert_mlm_stories.yaml

Timings on a shared CPU are noisy; the losses are what this compares.
"""

import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from composer.utils import reproducibility  # noqa: E402

from rafale.config import load_config  # noqa: E402
from rafale.resolve import resolve_model_config  # noqa: E402
from rafale.data.cache import PreparedData  # noqa: E402
from rafale.data.mlm import MLMCollator  # noqa: E402
from rafale.errors import IGNORE_INDEX  # noqa: E402
from rafale.run.train import prepare_data  # noqa: E402
from rafale.run.trainer_parts import make_dataloader  # noqa: E402

TOLERANCE = 1.01  # rafale's final loss may be at most 1% above the reference's
VALIDATION_SEED = 1234  # the fixed masks of the validation set: batch i is masked with seed VALIDATION_SEED + i


def mlm_collator(data: PreparedData, mlm_probability: float) -> MLMCollator:
    meta = data.meta
    return MLMCollator(
        pad_token_id=meta["pad_token_id"],
        mask_token_id=meta["mask_token_id"],
        special_ids=tuple(meta[k] for k in ("cls_token_id", "sep_token_id", "pad_token_id", "mask_token_id")),
        vocab_size=data.vocab_size,
        mlm_probability=mlm_probability,
    )


def masked_validation(data: PreparedData, collator: MLMCollator, batch_size: int) -> list[dict]:
    """The validation blocks in batches, each masked once with its own fixed seed: the same target for every model."""
    blocks = data.splits["validation"]
    batches = []
    for i, start in enumerate(range(0, len(blocks), batch_size)):
        fixed = dataclasses.replace(collator, fixed_seed=VALIDATION_SEED + i)
        batches.append(fixed([blocks[j] for j in range(start, min(start + batch_size, len(blocks)))]))
    return batches


@torch.no_grad()
def score(model: torch.nn.Module, batches: list[dict], vocab_size: int) -> tuple[float, float]:
    """(masked-LM loss, masked accuracy) of a transformers masked-LM model, averaged over all masked tokens."""
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    for batch in batches:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logits = logits[..., :vocab_size].float()  # (B, T, V)
        labels = batch["labels"]  # (B, T), IGNORE_INDEX where nothing was masked
        loss_sum += float(F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                                          reduction="sum"))
        masked = labels != IGNORE_INDEX
        correct += int((logits.argmax(-1)[masked] == labels[masked]).sum())
        count += int(masked.sum())
    return loss_sum / count, correct / count


def to_steps(duration: str, max_steps: int, steps_per_epoch: int) -> int:
    """A Composer time string ('20ba', '0.06dur', '2ep') in optimizer steps, as Composer converts it."""
    if duration.endswith("dur"):
        return int(float(duration[:-3]) * max_steps)
    if duration.endswith("ba"):
        return int(duration[:-2])
    if duration.endswith("ep"):
        return int(duration[:-2]) * steps_per_epoch
    raise ValueError(f"this check handles durations in ba, ep or dur, got {duration!r}")


def lr_factor(step: int, warmup: int, max_steps: int, schedule: str, final_ratio: float) -> float:
    """The learning-rate multiplier at `step` (batches done so far), as Composer's *WithWarmupScheduler computes it:
    linear from 0 over the warmup, then cosine or linear down to final_ratio at max_steps, or constant."""
    if step < warmup:
        return step / warmup
    if schedule == "constant":
        return 1.0
    frac = min(1.0, (step - warmup) / (max_steps - warmup)) if max_steps > warmup else 0.0
    if schedule == "cosine":
        return final_ratio + (1 - final_ratio) * (1 + math.cos(math.pi * frac)) / 2
    return 1.0 + frac * (final_ratio - 1.0)


def hf_masked_lm(cfg, data: PreparedData):
    """transformers' masked-LM model with the config's sizes, freshly initialised by transformers."""
    import transformers

    m = resolve_model_config(cfg)
    common = dict(
        vocab_size=data.vocab_size, hidden_size=m.hidden_size, num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_heads, intermediate_size=m.intermediate_size,
        max_position_embeddings=m.max_position_embeddings, type_vocab_size=m.type_vocab_size,
        layer_norm_eps=m.layer_norm_eps, hidden_dropout_prob=m.hidden_dropout,
        attention_probs_dropout_prob=m.attention_dropout, pad_token_id=data.meta["pad_token_id"],
        initializer_range=m.init_std,
    )
    if cfg.model.type == "roberta":
        return transformers.RobertaForMaskedLM(transformers.RobertaConfig(**common))
    return transformers.BertForMaskedLM(transformers.BertConfig(**common))


def reference_optimizer(model: torch.nn.Module, t) -> torch.optim.AdamW:
    """AdamW, with the usual BERT split by name: no weight decay on biases and LayerNorm weights."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if name.endswith("bias") or "LayerNorm" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=t.lr, betas=t.betas, eps=t.eps)


def train_reference(cfg, data: PreparedData, log_every: int = 0, losses: list | None = None) -> torch.nn.Module:
    """Train transformers' model in a plain loop with the config's batches, masks, optimizer, schedule and clipping;
    each step's training loss is appended to `losses` when given."""
    t = cfg.training
    reproducibility.seed_all(cfg.run.seed)
    model = hf_masked_lm(cfg, data)
    collator = mlm_collator(data, cfg.data.mlm_probability)
    loader = make_dataloader(data.splits["train"], t.batch_size, collator, shuffle=True, drop_last=True,
                             num_workers=0, pin=False, seed=cfg.run.seed).dataloader  # rafale's sampler and seed
    max_steps = to_steps(t.max_duration, 0, len(loader))
    warmup = to_steps(t.warmup, max_steps, len(loader))
    optimizer = reference_optimizer(model, t)
    model.train()
    step, epoch = 0, 0
    while step < max_steps:
        loader.sampler.set_epoch(epoch)  # as Composer does at the start of each epoch
        for batch in loader:
            if step == max_steps:
                break
            for group in optimizer.param_groups:
                group["lr"] = t.lr * lr_factor(step, warmup, max_steps, t.schedule, t.lr_final_ratio)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss = F.cross_entropy(logits[..., : data.vocab_size].flatten(0, 1).float(), batch["labels"].flatten(),
                                   ignore_index=IGNORE_INDEX)
            loss.backward()
            if t.clip_norm:
                torch.nn.utils.clip_grad_norm_(model.parameters(), t.clip_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if losses is not None:
                losses.append(loss.item())
            if log_every and step % log_every == 0:
                print(f"reference: step {step}/{max_steps} training loss {loss.item():.4f}", flush=True)
        epoch += 1
    return model


def load_export(export_dir: Path) -> torch.nn.Module:
    import transformers

    return transformers.AutoModelForMaskedLM.from_pretrained(export_dir, dtype=torch.float32)


def run_rafale(config_path: Path) -> None:
    """`rafale -c config_path`, in this process."""
    from rafale.main import main

    try:
        main(["-c", str(config_path)])
    except SystemExit as exit:
        if exit.code:
            raise RuntimeError(f"rafale -c {config_path} exited with {exit.code}") from None


def compare(config_path: Path) -> dict:
    """Train both sides on config_path and score them on the same masked validation set."""
    cfg = load_config(config_path)
    if cfg.model.task != "mlm" or cfg.model.pretrained is not None:
        raise SystemExit("learning_mlm: give a masked-LM config that trains from scratch (model.task: mlm)")
    start = time.perf_counter()
    run_rafale(config_path)
    rafale_s = time.perf_counter() - start
    data = prepare_data(cfg)  # from the cache rafale just used
    batches = masked_validation(data, mlm_collator(data, cfg.data.mlm_probability), cfg.training.batch_size)
    export_dir = Path(cfg.run.output_dir).expanduser() / cfg.run.name / "export"
    rafale_loss, rafale_acc = score(load_export(export_dir), batches, data.vocab_size)
    start = time.perf_counter()
    reference = train_reference(cfg, data, log_every=100)
    reference_s = time.perf_counter() - start
    reference_loss, reference_acc = score(reference, batches, data.vocab_size)
    reproducibility.seed_all(cfg.run.seed)
    initial_loss, _ = score(hf_masked_lm(cfg, data), batches, data.vocab_size)
    return {
        "initial_loss": initial_loss, "rafale_loss": rafale_loss, "rafale_accuracy": rafale_acc,
        "reference_loss": reference_loss, "reference_accuracy": reference_acc,
        "rafale_s": rafale_s, "reference_s": reference_s,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--config", required=True, type=Path, help="a masked-LM rafale config")
    args = parser.parse_args(argv)
    r = compare(args.config)
    ratio = r["rafale_loss"] / r["reference_loss"]
    print(f"\nvalidation masked-LM loss (fixed masks; untrained: {r['initial_loss']:.4f})")
    print(f"  rafale     {r['rafale_loss']:.4f}  masked accuracy {r['rafale_accuracy']:.4f}  ({r['rafale_s']:.0f} s, whole command)")
    print(f"  reference  {r['reference_loss']:.4f}  masked accuracy {r['reference_accuracy']:.4f}  ({r['reference_s']:.0f} s, training only)")
    print(f"  rafale / reference: {ratio:.4f} ({'ok' if ratio <= TOLERANCE else 'WORSE'}, tolerance {TOLERANCE})")
    return 0 if ratio <= TOLERANCE else 1


if __name__ == "__main__":
    sys.exit(main())
