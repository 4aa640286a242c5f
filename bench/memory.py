"""Peak memory of a training step: rafale's decoder as `rafale -c` runs it against HF's GPTNeoXForCausalLM.

    python bench/memory.py                      # pythia-70m and pythia-160m, T=512, B=4, on the CPU
    python bench/memory.py --presets pythia-70m --T 2048 --B 2 --checkpointing

Each side runs in a fresh process: build the model, take a baseline of the resident set, run two training steps
(forward with the labels, backward, optimizer step; the second step has the optimizer's state), and report the
peak resident set (ru_maxrss) above that baseline: the activations, the logits and their gradients, the gradients,
the optimizer's state and its temporaries. The weights and the imported libraries are in the baseline.

- rafale: what `rafale -c` runs with the default config's precision (amp_bf16: rafale's own bf16 autocast on a CPU
  with bf16 matrix units, else fp32), rafale's chunked loss and rafale's AdamW (rafale.run.optim: fused on a CPU too).
- HF, the headline reference: the plain fp32 loop most people write (torch.optim.AdamW's defaults).
- HF at rafale's precision (the same bf16 autocast), with the same plain AdamW.

On a GPU (--device cuda) the figure is torch.cuda.max_memory_allocated above the weights. Goal: rafale <= 0.6x HF.
rafale can also recompute each block in the backward pass (--checkpointing: training.activation_checkpointing).
--precision fp32 runs every side in fp32 (and rafale with torch's default AdamW with --plain-adamw).
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, resource, sys
import torch
sys.path.insert(0, {root!r})
from rafale.config import TrainingConfig
from rafale.models.pythia import PRESETS as PYTHIA_PRESETS
from rafale.models.pythia import config_to_hf as decoder_config_to_hf
from rafale.run.optim import build_optimizer
side, preset, T, B, device, checkpointing, bf16, plain_adamw = {args!r}
torch.manual_seed(0)
cfg = PYTHIA_PRESETS[preset]
if side == "rafale":
    from rafale.models.decoder import GPTNeoX
    model = GPTNeoX(cfg)
    model.activation_checkpointing = checkpointing
    step_loss = lambda ids: model(ids, labels=ids.roll(-1, 1))
else:
    import transformers
    fields = decoder_config_to_hf(cfg, vocab_size=cfg.vocab_size)
    fields.pop("architectures")
    model = transformers.GPTNeoXForCausalLM(transformers.AutoConfig.for_model(**fields))
    step_loss = lambda ids: model(ids, labels=ids).loss
model.to(device).train()
if side == "rafale" and not plain_adamw:  # rafale's optimizer as rafale -c builds it (TrainingConfig's defaults)
    optimizer = build_optimizer(model, TrainingConfig(lr=1e-4), "gpu" if device == "cuda" else "cpu")
else:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
ids = torch.randint(0, cfg.vocab_size, (B, T), device=device)
def rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
if device == "cuda":
    torch.cuda.synchronize(); base = torch.cuda.memory_allocated() / 2**20; torch.cuda.reset_peak_memory_stats()
else:
    base = rss_mb()
for _ in range(2):
    with torch.autocast("cuda" if device == "cuda" else "cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = step_loss(ids)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else rss_mb()
print(json.dumps({{"base_mb": base, "peak_mb": peak}}))
"""


def measure(side: str, preset: str, T: int, B: int, device: str, checkpointing: bool = False, bf16: bool = False,
            plain_adamw: bool = False) -> dict:
    code = CHILD.format(root=str(ROOT), args=(side, preset, T, B, device, checkpointing, bf16, plain_adamw))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=["pythia-70m", "pythia-160m"])
    parser.add_argument("--T", type=int, default=512)
    parser.add_argument("--B", type=int, default=4)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--precision", default="amp_bf16", choices=["amp_bf16", "fp32"],
                        help="rafale's (default amp_bf16, the default config's)")
    parser.add_argument("--plain-adamw", action="store_true", help="rafale with torch's default AdamW too")
    parser.add_argument("--checkpointing", action="store_true", help="also rafale with activation checkpointing")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from rafale.run.trainer_parts import cpu_has_fast_bf16

    bf16 = args.precision == "amp_bf16" and (args.device == "cuda" or cpu_has_fast_bf16())
    ours_label = f"rafale ({'bf16 autocast' if bf16 else 'fp32'}, {'plain' if args.plain_adamw else 'rafale'} AdamW)"
    unit = "max allocated" if args.device == "cuda" else "peak RSS"
    print(f"| shape | side | step {unit}, MB above the weights | HF plain fp32 loop | ratio | "
          f"HF in the same precision | ratio | goal (vs HF fp32) | met |")
    print("|---|---|---|---|---|---|---|---|---|")
    for preset in args.presets:
        ref = measure("hf", preset, args.T, args.B, args.device)
        same = measure("hf", preset, args.T, args.B, args.device, bf16=True) if bf16 else ref
        rows = [(ours_label, measure("rafale", preset, args.T, args.B, args.device, bf16=bf16, plain_adamw=args.plain_adamw))]
        if args.checkpointing:
            rows.append((ours_label + " + activation checkpointing",
                         measure("rafale", preset, args.T, args.B, args.device, True, bf16, args.plain_adamw)))
        ref_mb = ref["peak_mb"] - ref["base_mb"]
        same_mb = same["peak_mb"] - same["base_mb"]
        for label, r in rows:
            mb = r["peak_mb"] - r["base_mb"]
            print(f"| {preset} T={args.T} B={args.B} | {label} | {mb:,.0f} | {ref_mb:,.0f} | {mb / ref_mb:.2f} | "
                  f"{same_mb:,.0f} | {mb / same_mb:.2f} | <= 0.60 | {'yes' if mb / ref_mb <= 0.6 else '**no**'} |",
                  flush=True)


if __name__ == "__main__":
    main()
