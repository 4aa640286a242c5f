"""Does rafale's recipe learn as well as an independent reference? Final validation losses side by side.

    python bench/learning.py                                  # the default job, test/pythia_tinystories.yaml
    python bench/learning.py -c my.yaml --out /tmp/learning   # any Pythia config; runs go under --out

rafale trains through `rafale.main.main(["-c", cfg])`, exactly what `rafale -c cfg` runs. The reference is
transformers' `GPTNeoXForCausalLM`, built from the same sizes with its own initialisation and trained by the plain
PyTorch loop below with the same recipe: AdamW with weight decay on the matrices only (or Muon on the layers'
matrices and AdamW on the rest, as the default job does; pytorch-optimizer's Muon on both sides), linear warmup then cosine
to lr_final_ratio (stepped every batch), gradient-norm clipping, the same tokenizer and blocks (rafale's data
cache), the same batch order (a DistributedSampler seeded with run.seed, reshuffled each epoch), the same number
of steps, torch seeded with run.seed before the model is built. The weights differ (two inits drawn from the same
distribution), so the losses agree only up to seed noise. Both sides run fp32 on the CPU. rafale passes when its
loss is at most 1% above the reference's. test/test_learning.py runs the same comparison on pythia_debug.yaml.
"""

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from torch.utils.data import DataLoader, DistributedSampler

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rafale.config import Config, load_config  # noqa: E402
from rafale.run.train import prepare_data  # noqa: E402
from rafale.resolve import resolve_model_config  # noqa: E402
from rafale.main import main as rafale_main  # noqa: E402
from rafale.models.pythia import config_to_hf as decoder_config_to_hf  # noqa: E402
from rafale.run_folder import read_metrics  # noqa: E402

TOLERANCE = 1.01  # rafale's loss may be at most 1% above the reference's
IGNORE_INDEX = -100
VAL_LOSS = "metrics/eval/LanguageCrossEntropy"


# ----------------------------------------------------------------------------------------------------
# rafale: the real command


def run_rafale(config_path: Path) -> None:
    """`rafale -c config_path`, in this process; an error if it fails."""
    try:
        rafale_main(["-c", str(config_path)])
    except SystemExit as exit:
        if exit.code not in (0, None):
            raise RuntimeError(f"rafale -c {config_path} exited with {exit.code}") from None


def rafale_validation_loss(config_path: Path) -> float:
    """Train with `rafale -c config_path` (in this process) and return the last validation loss it logged."""
    run_rafale(config_path)
    cfg = load_config(config_path)
    series = read_metrics(Path(cfg.run.output_dir) / cfg.run.name)
    return series[VAL_LOSS][-1][1]


# ----------------------------------------------------------------------------------------------------
# the reference: transformers' model in a plain PyTorch loop


def causal_lm_batch(blocks: list) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids (B, T) padded with 0 after short blocks, and labels (B, T): the next token, -100 where none."""
    T = max(len(b) for b in blocks)
    input_ids = torch.zeros(len(blocks), T, dtype=torch.long)
    labels = torch.full((len(blocks), T), IGNORE_INDEX, dtype=torch.long)
    for i, block in enumerate(blocks):
        block = torch.as_tensor(block)
        input_ids[i, : len(block)] = block
        labels[i, : len(block) - 1] = block[1:]
    return input_ids, labels


def collate(examples):
    return causal_lm_batch([e["input_ids"] for e in examples])


def steps_of(duration: str, batches_per_epoch: int, total: int | None = None) -> int:
    """A Composer time string ("400ba", "2ep", "0.05dur") in optimizer steps."""
    if duration.endswith("ba"):
        return int(duration[:-2])
    if duration.endswith("ep"):
        return int(float(duration[:-2]) * batches_per_epoch)
    if duration.endswith("dur") and total is not None:
        return int(float(duration[:-3]) * total)
    raise ValueError(f"cannot convert {duration!r} to steps")


def lr_factor(step: int, warmup: int, total: int, final_ratio: float) -> float:
    """Linear warmup from 0, then a cosine from 1 down to final_ratio at the last step."""
    if step < warmup:
        return step / warmup
    progress = min(1.0, (step - warmup) / (total - warmup)) if total > warmup else 0.0
    return final_ratio + (1 - final_ratio) * (1 + math.cos(math.pi * progress)) / 2


def hf_model(cfg: Config, vocab_size: int):
    """transformers' GPT-NeoX with the config's sizes (no dropout, untied output), initialised by transformers."""
    import transformers

    fields = decoder_config_to_hf(resolve_model_config(cfg), vocab_size=vocab_size)
    fields.pop("architectures")
    config = transformers.AutoConfig.for_model(**fields)
    torch.manual_seed(cfg.run.seed)
    return transformers.GPTNeoXForCausalLM(config)


@torch.no_grad()
def validation_loss(model, dataset, batch_size: int) -> float:
    """Mean cross-entropy over every predicted token of the validation split."""
    model.eval()
    total, count = 0.0, 0
    for input_ids, labels in DataLoader(dataset, batch_size=batch_size, collate_fn=collate):
        logits = model(input_ids).logits.float()  # (B, T, V)
        total += F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum").item()
        count += int((labels != IGNORE_INDEX).sum())
    model.train()
    return total / count


def reference_optimizer(model, t) -> torch.optim.Optimizer:
    """AdamW with weight decay on the matrices only; or, for `training.optimizer: {name: muon}`, pytorch-optimizer's
    Muon on the 2-D weights inside the transformer layers and AdamW on the rest, grouped here from HF's names."""
    name = t.optimizer.get("name", "adamw")
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    if name == "adamw":
        return torch.optim.AdamW(
            [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=t.lr, betas=t.betas, eps=t.eps,
        )
    if name != "muon":
        raise ValueError(f"the reference loop implements adamw and muon, not {name!r}")
    import pytorch_optimizer

    args = {k: v for k, v in t.optimizer.items() if k != "name"}
    muon_lr = args.pop("lr", 0.02)
    hidden = [p for n, p in model.named_parameters() if p.dim() >= 2 and n.startswith("gpt_neox.layers.")]
    rest = [p for p in decay if not any(p is h for h in hidden)]
    return pytorch_optimizer.Muon(
        [{"params": hidden, "use_muon": True, "lr": muon_lr, "weight_decay": t.weight_decay},
         {"params": rest, "use_muon": False, "lr": t.lr, "weight_decay": t.weight_decay},
         {"params": no_decay, "use_muon": False, "lr": t.lr, "weight_decay": 0.0}],
        adamw_betas=t.betas, adamw_eps=t.eps, **args,
    )


def reference_validation_loss(cfg: Config) -> float:
    """Train transformers' GPT-NeoX on rafale's prepared data with the config's recipe; its final validation loss."""
    t = cfg.training
    data = prepare_data(cfg)  # the cached blocks rafale trained on
    train_set, val_set = data.splits["train"], data.splits["validation"]
    model = hf_model(cfg, data.vocab_size)
    optimizer = reference_optimizer(model, t)
    sampler = DistributedSampler(train_set, num_replicas=1, rank=0, shuffle=True, seed=cfg.run.seed, drop_last=True)
    loader = DataLoader(train_set, batch_size=t.batch_size, sampler=sampler, collate_fn=collate, drop_last=True)
    total = steps_of(t.max_duration, len(loader))
    warmup = steps_of(t.warmup, len(loader), total)
    if t.schedule != "cosine":
        raise ValueError(f"the reference loop implements the cosine schedule only, not {t.schedule!r}")
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, warmup, total, t.lr_final_ratio))
    step, epoch = 0, 0
    while step < total:
        sampler.set_epoch(epoch)
        for input_ids, labels in loader:
            logits = model(input_ids).logits  # (B, T, V)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX)
            loss.backward()
            if t.clip_norm:
                torch.nn.utils.clip_grad_norm_(model.parameters(), t.clip_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            schedule.step()
            step += 1
            if step == total:
                break
        epoch += 1
    return validation_loss(model, val_set, t.batch_size)


# ----------------------------------------------------------------------------------------------------


def compare(config_path: Path, out: Path, same_init: bool = False, **sections) -> tuple[float, float]:
    """(rafale's final validation loss, the reference's) for a Pythia config, its runs written under `out`;
    `sections` change config keys as in test/conftest.py's write_config: compare(p, out, training={...}).
    same_init: rafale starts from the reference's initial weights (through model.pretrained), so that the two
    runs differ only in their code, not in their random draws."""
    raw = yaml.safe_load(Path(config_path).read_text())
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    raw.setdefault("run", {}).update(output_dir=str(out), device="cpu")  # the reference loop runs fp32 on the CPU
    raw.setdefault("training", {})["precision"] = "fp32"
    local = out / "config.yaml"
    out.mkdir(parents=True, exist_ok=True)
    local.write_text(yaml.safe_dump(raw, sort_keys=False))
    if same_init:  # the reference's model as reference_validation_loss draws it, saved for rafale to load
        cfg = load_config(local)
        hf_model(cfg, prepare_data(cfg).vocab_size).save_pretrained(out / "init")
        raw.setdefault("model", {})["pretrained"] = str(out / "init")
        local.write_text(yaml.safe_dump(raw, sort_keys=False))
    ours = rafale_validation_loss(local)
    reference = reference_validation_loss(load_config(local))
    return ours, reference


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-c", "--config", default=str(ROOT / "test" / "pythia_tinystories.yaml"))
    parser.add_argument("--out", default=None, help="folder for the runs (default: a temporary one)")
    parser.add_argument("--same-init", action="store_true", help="rafale starts from the reference's initial weights")
    args = parser.parse_args(argv)
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="rafale-learning-"))
    start = time.perf_counter()
    ours, reference = compare(Path(args.config), out, same_init=args.same_init)
    ratio = ours / reference
    print(f"config: {args.config}")
    print(f"validation loss  rafale {ours:.4f}   transformers + plain loop {reference:.4f}   "
          f"ratio {ratio:.4f} ({'PASS' if ratio <= TOLERANCE else 'FAIL'}: at most {TOLERANCE})")
    print(f"wall time {time.perf_counter() - start:.0f} s (both runs, CPU, fp32)")
    return 0 if ratio <= TOLERANCE else 1


if __name__ == "__main__":
    sys.exit(main())
