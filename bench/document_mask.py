"""Document masking (data.document_mask): what a training step costs with it, and whether it helps the model learn.

    python bench/document_mask.py                     # the default job (test/pythia_tinystories.yaml), 5 seeds
    python bench/document_mask.py --text ../shared/data/tinystories/train-head-2MiB.txt   # the TinyStories sample
    python bench/document_mask.py --seeds 1 --steps 6 --stories 300 --out /tmp/dm   # a seconds-long smoke run

The cost: the same model (the job's preset, fp32; --bf16 under bf16 autocast), the same batch of the job's shape (its batch_size blocks of
block_size, the validation split's real blocks), a training step (forward with the chunked loss, backward, AdamW)
timed with and without the mask, interleaved, the median of --cost-steps each after two warm-up steps. On a CPU
the masked step goes through SDPA with a (B, 1, T, T) boolean mask, the unmasked one through SDPA's implicit causal
path; a GPU would use flex attention instead, which this script does not time.

The learning: the job trained by `rafale -c` (rafale.main.main, in this process) with data.document_mask off and on,
for each seed (run.seed: the initial draw and the data order, the same for both arms). Both arms are then scored on
the same tokens: the validation blocks, each document's tokens predicted from their own document, and not the
first token of each document, which the masked arm never predicts from the previous document's end-of-text (its
label is not scored) while the unmasked one does; each arm attends as it trained (the masked one within each
document, with positions from 0 at each; the unmasked one across the block). The logged validation losses are
printed too, but they score different tokens (the masked run's leaves out each document's first token) and are not
compared. The difference (on - off) is paired by seed (rafale.stats.difference): its 95% interval and p-value.

--text FILE trains on a .txt of documents separated by <|endoftext|> (data.doc_separator), with a byte-level BPE of
the job's vocab_size trained on it (data.tokenizer: train), the rest of the job unchanged.
"""

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rafale.config import load_config  # noqa: E402
from rafale.data.causal_lm import CausalLMCollator, DocumentMaskCollator  # noqa: E402
from rafale.errors import IGNORE_INDEX  # noqa: E402
from rafale.main import main as rafale_main  # noqa: E402
from rafale.models.decoder import Decoder  # noqa: E402
from rafale.models.family import model_vocab_size  # noqa: E402
from rafale.models.token_bytes import token_bytes  # noqa: E402
from rafale.resolve import resolve_model_config  # noqa: E402
from rafale.run.train import prepare_data  # noqa: E402
from rafale.run_folder import load_run_model, read_metrics  # noqa: E402
from rafale.stats import difference, summarize  # noqa: E402

JOB = ROOT / "test" / "pythia_tinystories.yaml"
VAL_LOSS = "metrics/eval/LanguageCrossEntropy"


def job_config(out: Path, name: str, seed: int, document_mask: bool, args) -> Path:
    """The default job's config with this arm's settings, written under out."""
    raw = yaml.safe_load(JOB.read_text())
    raw["run"].update(name=name, output_dir=str(out / "runs"), seed=seed)
    raw["data"]["document_mask"] = document_mask
    if args.text:
        raw["data"].update(source=str(Path(args.text).resolve()), doc_separator="<|endoftext|>")
        for key in ("num_train_stories", "num_val_stories"):
            raw["data"].pop(key)
    elif args.stories:
        raw["data"].update(num_train_stories=args.stories, num_val_stories=max(20, args.stories // 20))
    if args.steps:
        t = raw["training"]
        t.update(max_duration=f"{args.steps}ba", eval_interval=f"{args.steps}ba", save_interval=f"{args.steps}ba",
                 warmup=f"{max(1, args.steps // 10)}ba")
    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


# ----------------------------------------------------------------------------------------------------
# the cost of a step


def step_seconds(model, batch, optimizer, bf16: bool) -> float:
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):  # as ComposerLM runs amp_bf16 on a CPU
        loss = model(batch["input_ids"], position_ids=batch.get("position_ids"), labels=batch["labels"],
                     document_ids=batch.get("document_ids"))
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def step_cost(config: Path, steps: int, bf16: bool) -> dict:
    """Median seconds of a training step, unmasked and masked, on the same blocks and weights."""
    cfg = load_config(config)
    model_cfg = resolve_model_config(cfg)
    data = prepare_data(cfg)
    model_cfg.vocab_size = model_vocab_size(model_cfg.vocab_size, data.meta["vocab_size"])
    torch.manual_seed(0)
    model = Decoder(model_cfg).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)  # a small rate: the weights barely move
    val = data.splits["validation"].with_format("torch")
    blocks = [val[i] for i in range(min(cfg.training.batch_size, len(val)))]
    batches = {"off": CausalLMCollator(data.pad_token_id)(blocks),
               "on": DocumentMaskCollator(data.pad_token_id, data.eos_token_id)(blocks)}
    documents = int(batches["on"]["document_ids"][:, -1].add(1).sum())
    times = {"off": [], "on": []}
    for i in range(steps + 2):
        for arm in (("off", "on") if i % 2 == 0 else ("on", "off")):  # interleaved: drift hits both alike
            seconds = step_seconds(model, batches[arm], optimizer, bf16)
            if i >= 2:
                times[arm].append(seconds)
    off, on = statistics.median(times["off"]), statistics.median(times["on"])
    B, T = batches["on"]["input_ids"].shape
    return {"batch": [B, T], "documents_per_block": documents / B, "threads": torch.get_num_threads(),
            "off_s": off, "on_s": on, "ratio": on / off, "steps": steps, "precision": "bf16" if bf16 else "fp32"}


# ----------------------------------------------------------------------------------------------------
# the learning comparison


def train(config: Path) -> None:
    """`rafale -c config` in this process; an error if it fails."""
    try:
        rafale_main(["-c", str(config)])
    except SystemExit as exit:
        if exit.code not in (0, None):
            raise RuntimeError(f"rafale -c {config} exited with {exit.code}") from None


@torch.no_grad()
def common_token_scores(run_dir: Path, batch_size: int = 32) -> dict:
    """The run's final weights on the validation blocks, over the tokens both arms score (DocumentMaskCollator's
    labels): nats per token and bits per byte, attending as the run trained."""
    cfg, _, model = load_run_model(run_dir)
    data = prepare_data(cfg)
    collate = DocumentMaskCollator(data.pad_token_id, data.eos_token_id)
    table = token_bytes(data.tokenizer)
    val = data.splits["validation"].with_format("torch")
    nats, tokens, nbytes = 0.0, 0, 0
    for start in range(0, len(val), batch_size):
        batch = collate([val[i] for i in range(start, min(start + batch_size, len(val)))])
        masked = cfg.data.document_mask
        logits = model(batch["input_ids"], position_ids=batch["position_ids"] if masked else None,
                       document_ids=batch["document_ids"] if masked else None)[..., : data.vocab_size].float()
        labels = batch["labels"]
        scored = labels != IGNORE_INDEX
        nats += torch.nn.functional.cross_entropy(logits[scored], labels[scored], reduction="sum").item()
        tokens += int(scored.sum())
        if table is not None:
            nbytes += int(table[labels[scored]].sum())
    logged = read_metrics(run_dir)[VAL_LOSS][-1][1]
    return {"loss": nats / tokens, "bits_per_byte": nats / (math.log(2) * nbytes) if nbytes else None,
            "tokens": tokens, "logged_loss": logged}


def learning(out: Path, seeds: list[int], args) -> dict:
    scores = {"off": {}, "on": {}}
    for seed in seeds:
        for arm, masked in (("off", False), ("on", True)):
            config = job_config(out, f"{arm}-seed{seed}", seed, masked, args)
            start = time.perf_counter()
            train(config)
            scores[arm][seed] = common_token_scores(out / "runs" / f"{arm}-seed{seed}")
            scores[arm][seed]["seconds"] = time.perf_counter() - start
            print(f"document_mask {arm}, seed {seed}: {json.dumps(scores[arm][seed])}", flush=True)
    return scores


def report(cost: dict | None, scores: dict | None, args) -> str:
    lines = [f"data: {args.text or 'the built-in stories'}; the job: {JOB.relative_to(ROOT)}"
             + (f", {args.steps} steps" if args.steps else "")]
    if cost:
        lines.append(f"step cost ({cost['batch'][0]} x {cost['batch'][1]} tokens, {cost['documents_per_block']:.2f} "
                     f"documents a block, {cost['threads']} threads, {cost['precision']}, median of {cost['steps']}): off "
                     f"{cost['off_s'] * 1e3:.1f} ms, on {cost['on_s'] * 1e3:.1f} ms, on/off {cost['ratio']:.3f}")
    if scores:
        seeds = sorted(scores["off"])
        for key, what in (("loss", "validation loss on the tokens both score (nats/token)"),
                          ("bits_per_byte", "bits per byte, the same tokens")):
            if scores["off"][seeds[0]][key] is None:
                continue
            on = {s: scores["on"][s][key] for s in seeds}
            off = {s: scores["off"][s][key] for s in seeds}
            d = difference(on, off)
            interval = f" [{d.low:+.4f}, {d.high:+.4f}]" if d.low is not None else ""
            p = f", p = {d.p_value:.2g}" if d.p_value is not None else ""
            lines.append(f"{what}: off {summarize(off.values()).text()}, on {summarize(on.values()).text()}; "
                         f"on - off = {d.estimate:+.4f}{interval}{p} ({d.test}): {d.verdict()}")
        for arm in ("off", "on"):
            logged = summarize([scores[arm][s]["logged_loss"] for s in seeds]).text()
            lines.append(f"logged validation loss, {arm} (its own scored tokens, not comparable): {logged}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 per arm (default 5)")
    parser.add_argument("--text", help="a .txt of documents separated by <|endoftext|> instead of the stories")
    parser.add_argument("--steps", type=int, help="train this many batches instead of the job's 300 (smoke tests)")
    parser.add_argument("--stories", type=int, help="built-in stories for training instead of the job's 20000 (smoke)")
    parser.add_argument("--cost-steps", type=int, default=20, help="timed steps per arm for the cost (default 20)")
    parser.add_argument("--bf16", action="store_true", help="time the steps under bf16 autocast (the job's amp_bf16 "
                        "on a CPU with bf16 matrix units) instead of fp32")
    parser.add_argument("--no-cost", action="store_true", help="skip the step cost")
    parser.add_argument("--no-learning", action="store_true", help="skip the learning comparison")
    parser.add_argument("--out", help="folder for the runs and results.json (default: a new temporary folder)")
    args = parser.parse_args(argv)
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="rafale-document-mask-"))
    out.mkdir(parents=True, exist_ok=True)
    cost = None if args.no_cost else step_cost(job_config(out, "cost", 0, False, args), args.cost_steps, args.bf16)
    scores = None if args.no_learning else learning(out, list(range(args.seeds)), args)
    (out / "results.json").write_text(json.dumps({"cost": cost, "scores": scores}, indent=2))
    print(report(cost, scores, args))
    print(f"(runs and results.json in {out})")


if __name__ == "__main__":
    main()
