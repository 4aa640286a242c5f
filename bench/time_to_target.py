"""Time to a target validation loss: rafale's `rafale -c` against Hugging Face's `Trainer`, same model and data.

    python bench/time_to_target.py                                   # the default job, target loss 1.2
    python bench/time_to_target.py -c test/pythia_tinystories_sample.yaml --target 5.0
    python bench/time_to_target.py --hf-bf16                         # HF Trainer in bf16 autocast too

Both sides train the config's model from scratch on the same blocks (rafale's data cache), with the same batch
size, peak learning rate, warmup, cosine decay to lr_final_ratio over max_duration, AdamW betas/eps/weight decay
and gradient clipping, and evaluate the whole validation split every `--every` batches. rafale runs its defaults
(the config's precision: bf16 autocast on a CPU that has bf16 matmuls, rafale's chunked loss; the config's
optimizer: the default job trains the blocks' matrices with Muon, AdamW at the same lr on the rest); HF's Trainer
runs its own defaults, AdamW and fp32 (or bf16 autocast with --hf-bf16), with transformers' `GPTNeoXForCausalLM`.
`--rafale-set training.optimizer.name=adamw` (any rafale overrides) separates the optimizer from the step time. Each side's
time to target is the wall time from the start of training to the first evaluation at or below the target,
evaluations included (the figure a user waits for); HF's Trainer stops there, rafale finishes its run. The ratio is
HF's time / rafale's (goal >= 1.5). Recipe differences that remain, by design: HF's Trainer decays the embeddings
and draws its own batch order and initial weights. Timings on a shared CPU are noisy: run it on a quiet machine.
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from learning import hf_model, run_rafale, steps_of  # noqa: E402
from rafale.config import apply_overrides, load_config  # noqa: E402
from rafale.run.train import prepare_data  # noqa: E402
from rafale.run_folder import read_metrics  # noqa: E402

VAL_LOSS = "metrics/eval/LanguageCrossEntropy"


def first_crossing(points: list[tuple[int, float, float]], target: float):
    """(step, seconds) of the first (step, seconds, loss) at or below target, or None."""
    return next(((step, s) for step, s, loss in points if loss <= target), None)


# ----------------------------------------------------------------------------------------------------
# rafale: the real command; its evaluations and their times come from the run's metrics.jsonl


def rafale_points(config_path: Path) -> list[tuple[int, float, float]]:
    """(step, seconds since training started, validation loss) at each evaluation of `rafale -c config_path`."""
    run_rafale(config_path)
    cfg = load_config(config_path)
    run_dir = Path(cfg.run.output_dir) / cfg.run.name
    hours = {}  # step -> Composer's time/total (wall hours since fit start, evaluations included)
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "time/total" in row:
            hours[row["step"]] = row["time/total"]
    losses = read_metrics(run_dir)[VAL_LOSS]
    # an evaluation after step s ends before step s + 1's time is logged: that time includes it
    return [(step, 3600 * hours.get(step + 1, hours.get(step, 0.0)), loss) for step, loss in losses if step > 0]


# ----------------------------------------------------------------------------------------------------
# the reference: transformers' Trainer with its defaults


def hf_points(cfg, target: float, every: int, bf16: bool, out: Path) -> list[tuple[int, float, float]]:
    import transformers

    t = cfg.training
    data = prepare_data(cfg)  # the blocks rafale trained on
    train_set = data.splits["train"].with_format(None)
    val_set = data.splits["validation"].with_format(None)
    batches_per_epoch = len(train_set) // t.batch_size
    total = steps_of(t.max_duration, batches_per_epoch)
    warmup = steps_of(t.warmup, batches_per_epoch, total)
    model = hf_model(cfg, data.vocab_size)

    def collate(examples):  # HF's causal-LM models shift the labels themselves
        ids = torch.tensor([e["input_ids"] for e in examples])
        return {"input_ids": ids, "labels": ids}

    points, start = [], [0.0]

    class Record(transformers.TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            start[0] = time.perf_counter()

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            points.append((state.global_step, time.perf_counter() - start[0], metrics["eval_loss"]))
            print(f"HF Trainer: step {state.global_step} validation loss {metrics['eval_loss']:.4f}", flush=True)
            if metrics["eval_loss"] <= target:
                control.should_training_stop = True

    args = transformers.TrainingArguments(
        output_dir=str(out / "hf"), per_device_train_batch_size=t.batch_size, per_device_eval_batch_size=t.batch_size,
        learning_rate=t.lr, weight_decay=t.weight_decay, adam_beta1=t.betas[0], adam_beta2=t.betas[1],
        adam_epsilon=t.eps, max_grad_norm=t.clip_norm or 0.0, lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": t.lr_final_ratio}, warmup_steps=warmup, max_steps=total,
        eval_strategy="steps", eval_steps=every, logging_steps=every, save_strategy="no", report_to=[],
        seed=cfg.run.seed, dataloader_drop_last=True, use_cpu=not torch.cuda.is_available(), bf16=bf16,
        disable_tqdm=True,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=train_set, eval_dataset=val_set,
                                   data_collator=collate, callbacks=[Record()])
    trainer.train()
    return points


# ----------------------------------------------------------------------------------------------------


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-c", "--config", default=str(ROOT / "test" / "pythia_tinystories.yaml"))
    parser.add_argument("--target", type=float, default=1.2, help="validation loss to reach (default 1.2)")
    parser.add_argument("--every", type=int, default=20, help="evaluate every this many batches (default 20)")
    parser.add_argument("--hf-bf16", action="store_true", help="HF's Trainer in bf16 autocast (default fp32)")
    parser.add_argument("--out", default=None, help="folder for the runs (default: a temporary one)")
    parser.add_argument("--rafale-set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="overrides for rafale's side only, e.g. training.optimizer.name=adamw")
    args = parser.parse_args(argv)
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="rafale-ttt-"))
    out.mkdir(parents=True, exist_ok=True)
    raw = yaml.safe_load(Path(args.config).read_text())
    raw.setdefault("run", {}).update(output_dir=str(out), name="rafale", restart=True)
    raw.setdefault("training", {}).update(eval_interval=f"{args.every}ba", save_interval=raw["training"]["max_duration"])
    shared = out / "config-hf.yaml"  # HF's side reads the config without rafale's overrides
    shared.write_text(yaml.safe_dump(raw, sort_keys=False))
    local = out / "config.yaml"
    local.write_text(yaml.safe_dump(apply_overrides(raw, args.rafale_set), sort_keys=False))

    ours = rafale_points(local)
    reference = hf_points(load_config(shared), args.target, args.every, args.hf_bf16, out)
    hf_label = f"HF Trainer ({'bf16 autocast' if args.hf_bf16 else 'fp32'})"
    print(f"\nconfig: {args.config}; target validation loss {args.target}; evaluation every {args.every} batches")
    for label, points in (("rafale -c", ours), (hf_label, reference)):
        print(f"{label}: " + ", ".join(f"{step}: {loss:.3f} @ {s:.0f}s" for step, s, loss in points))
    a, b = first_crossing(ours, args.target), first_crossing(reference, args.target)
    if a is None or b is None:
        missing = " and ".join(name for name, x in (("rafale", a), ("HF", b)) if x is None)
        print(f"{missing} did not reach {args.target}: lower the target or lengthen training.max_duration")
        return 1
    print(f"time to {args.target}: rafale {a[1]:.0f} s (step {a[0]}), {hf_label} {b[1]:.0f} s (step {b[0]}), "
          f"ratio HF / rafale {b[1] / a[1]:.2f} (goal >= 1.5)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
