"""Peak memory of a training step: rafale's decoder (chunked loss) against HF's GPTNeoXForCausalLM, same shape.

    python bench/memory.py                      # pythia-70m and pythia-160m, T=512, B=4, fp32, on the CPU
    python bench/memory.py --presets pythia-70m --T 2048 --B 2

Each side runs in a fresh process: build the model, take a baseline of the resident set, run two AdamW training
steps (forward with the labels, backward, step; the second step has the optimizer's state), and report the peak
resident set (ru_maxrss) above that baseline: the activations, the logits and their gradients, the gradients and
the optimizer's state. The weights and the imported libraries are in the baseline, the same for both sides. On a
GPU (--device cuda) the figure is torch.cuda.max_memory_allocated above the weights. Goal: rafale <= 0.6x HF.
rafale can also recompute each block in the backward pass (--checkpointing: training.activation_checkpointing).
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
from rafale.models.configurations import PYTHIA_PRESETS
from rafale.models.hf import decoder_config_to_hf
side, preset, T, B, device, checkpointing = {args!r}
torch.manual_seed(0)
cfg = PYTHIA_PRESETS[preset]
if side == "rafale":
    from rafale.models.decoder import GPTNeoX
    model = GPTNeoX(cfg)
    model.activation_checkpointing = checkpointing
    step_loss = lambda ids: model(ids, labels=ids.roll(-1, 1))
else:
    import transformers
    fields = decoder_config_to_hf(cfg, cfg.vocab_size)
    fields.pop("architectures")
    model = transformers.GPTNeoXForCausalLM(transformers.AutoConfig.for_model(**fields))
    step_loss = lambda ids: model(ids, labels=ids).loss
model.to(device).train()
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
ids = torch.randint(0, cfg.vocab_size, (B, T), device=device)
def rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
if device == "cuda":
    torch.cuda.synchronize(); base = torch.cuda.memory_allocated() / 2**20; torch.cuda.reset_peak_memory_stats()
else:
    base = rss_mb()
for _ in range(2):
    step_loss(ids).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else rss_mb()
print(json.dumps({{"base_mb": base, "peak_mb": peak}}))
"""


def measure(side: str, preset: str, T: int, B: int, device: str, checkpointing: bool = False) -> dict:
    code = CHILD.format(root=str(ROOT), args=(side, preset, T, B, device, checkpointing))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=["pythia-70m", "pythia-160m"])
    parser.add_argument("--T", type=int, default=512)
    parser.add_argument("--B", type=int, default=4)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--checkpointing", action="store_true", help="also rafale with activation checkpointing")
    args = parser.parse_args(argv)
    unit = "max allocated" if args.device == "cuda" else "peak RSS"
    print(f"| shape | rafale step {unit} (MB above the weights) | HF | ratio | goal | met |")
    print("|---|---|---|---|---|---|")
    for preset in args.presets:
        ours = measure("rafale", preset, args.T, args.B, args.device)
        ref = measure("hf", preset, args.T, args.B, args.device)
        rows = [("rafale", ours)]
        if args.checkpointing:
            rows.append(("rafale + activation checkpointing",
                         measure("rafale", preset, args.T, args.B, args.device, checkpointing=True)))
        ref_mb = ref["peak_mb"] - ref["base_mb"]
        for label, r in rows:
            mb = r["peak_mb"] - r["base_mb"]
            ratio = mb / ref_mb
            print(f"| {preset} T={args.T} B={args.B}, {label} | {mb:,.0f} | {ref_mb:,.0f} | {ratio:.2f} | <= 0.60 | "
                  f"{'yes' if ratio <= 0.6 else '**no**'} |", flush=True)


if __name__ == "__main__":
    main()
