"""Where a step's time goes: torch.profiler over rafale and HF, ops grouped by kind, side by side.

    python bench/profile_steps.py                      # train step (70m shape, T=512, B=2) and greedy decoding (B=1, 8)
    python bench/profile_steps.py --what decode --new-tokens 64 --batches 1,4,8
    python bench/profile_steps.py --what train --preset pythia-tiny --vocab 50304 --T 128 --B 32   # the sample config
    python bench/profile_steps.py --what train --preset pythia-tiny --vocab 4096 --T 128 --B 16 --fp32  # the default, fp32

train: one step of rafale's model (its chunked loss, the default config's bf16 autocast on a CPU with bf16 matrix
units, rafale's fused AdamW) against HF's GPTNeoXForCausalLM in the same autocast with torch's default AdamW, the
same weights and batch; two warm-up steps, then `--steps` profiled. decode: rafale's `generate` (static KV cache)
against HF's `generate`, greedy, same weights and prompt, fp32 as both decode by default; also the bytes of weights
a decoding step reads and a memory-bandwidth probe (a large tensor copy), whose ratio is the fastest a
bandwidth-bound step can be. Self CPU time per kind of op, in ms per step (train) or per token (decode).
"""

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from common import decoder_cfg, hf_from_rafale, make_rafale, random_blocks, seconds  # noqa: E402
from rafale.errors import IGNORE_INDEX  # noqa: E402
from rafale.models.composer import ComposerLM  # noqa: E402
from rafale.run.optim import build_optimizer  # noqa: E402
from rafale.config import TrainingConfig  # noqa: E402
from rafale.run.trainer_parts import cpu_has_fast_bf16  # noqa: E402

# op name -> kind, first match wins (self time, so a linear's time lands on its mm/addmm)
KINDS = [
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear")),
    ("attention (SDPA)", ("scaled_dot_product", "flash_attention", "_efficient_attention")),
    ("casts and copies", ("aten::copy_", "aten::_to_copy", "aten::to", "aten::clone", "aten::contiguous")),
    ("optimizer", ("_fused_adam", "_foreach_", "aten::lerp", "aten::addcdiv", "aten::addcmul", "aten::sqrt")),
    ("softmax / loss", ("softmax", "cross_entropy", "nll_loss", "logsumexp")),
    ("layer norm", ("layer_norm",)),
    ("GELU", ("gelu",)),
    ("elementwise", ("aten::add", "aten::mul", "aten::sub", "aten::div", "aten::cat", "aten::neg", "aten::where",
                     "aten::fill_", "aten::zero_", "aten::index", "aten::embedding", "aten::argmax", "aten::sum")),
]


def kind_of(name: str) -> str:
    return next((kind for kind, keys in KINDS if any(k in name for k in keys)), "other")


def by_kind(prof) -> dict[str, float]:
    """Self CPU time in ms per kind of op."""
    out: dict[str, float] = {}
    for event in prof.key_averages():
        out[kind_of(event.key)] = out.get(kind_of(event.key), 0.0) + event.self_cpu_time_total / 1e3
    return out


def table(title: str, sides: dict[str, dict[str, float]], per: float, unit: str) -> str:
    kinds = sorted({k for d in sides.values() for k in d}, key=lambda k: -max(d.get(k, 0) for d in sides.values()))
    names = list(sides)
    lines = [f"\n{title} (self CPU ms per {unit}; share of the side's total)",
             "| kind | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    totals = {n: sum(d.values()) for n, d in sides.items()}
    for k in kinds:
        cells = [f"{sides[n].get(k, 0) / per:.1f} ({sides[n].get(k, 0) / totals[n]:.0%})" for n in names]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    lines.append("| total | " + " | ".join(f"{totals[n] / per:.1f}" for n in names) + " |")
    return "\n".join(lines)


def profile_train(T: int, B: int, steps: int, preset: str = "pythia-70m", vocab: int | None = None,
                  fp32: bool = False) -> str:
    bf16 = cpu_has_fast_bf16() and not fp32
    dtype = torch.bfloat16 if bf16 else None
    cfg = decoder_cfg(preset, vocab, T)
    base = make_rafale(cfg)
    blocks = random_blocks(B, T, cfg.vocab_size)
    batch = {k: torch.stack([b[k] for b in blocks]) for k in ("input_ids", "labels")}
    ours = ComposerLM(base, autocast_dtype=dtype).train()
    hf = hf_from_rafale(make_rafale(cfg)).train()
    ours_opt = build_optimizer(ours, TrainingConfig(lr=1e-4), "cpu")
    hf_opt = torch.optim.AdamW(hf.parameters(), lr=1e-4)

    def step_ours():
        loss = ours.loss(ours(batch), batch)
        loss.backward()
        ours_opt.step()
        ours_opt.zero_grad(set_to_none=True)

    def step_hf():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = hf(input_ids=batch["input_ids"]).logits
            loss = F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten(), ignore_index=IGNORE_INDEX)
        loss.backward()
        hf_opt.step()
        hf_opt.zero_grad(set_to_none=True)

    sides, walls = {}, {}
    for name, step in (("rafale", step_ours), ("HF", step_hf)):
        for _ in range(2):
            step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            for _ in range(steps):
                step()
            walls[name] = (time.perf_counter() - start) / steps
        sides[name] = by_kind(prof)
    precision = "bf16 autocast" if bf16 else "fp32"
    title = (f"train step, {preset} shape, vocabulary {cfg.vocab_size}, T={T}, B={B}, {precision}, {torch.get_num_threads()} thread(s); wall per "
             f"step under the profiler: rafale {walls['rafale'] * 1e3:.0f} ms, HF {walls['HF'] * 1e3:.0f} ms")
    return table(title, sides, steps, "step")


def bandwidth_gbs(mb: int = 512, repeats: int = 5) -> float:
    """GB/s of a large tensor copy (read + write), the best of `repeats`."""
    src = torch.empty(mb * 2**20 // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = min(seconds(lambda: dst.copy_(src)) for _ in range(repeats))
    return 2 * src.numel() * 4 / best / 1e9


def profile_decode(new_tokens: int, batches=(1, 8), prompt_len: int = 8) -> str:
    cfg = decoder_cfg("pythia-70m")
    model = make_rafale(cfg).eval()
    hf = hf_from_rafale(model).eval()
    weight_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if not n.startswith("embed."))
    gbs = bandwidth_gbs()
    out = [f"\nweights a decoding step reads (all but the input embedding, fp32): {weight_bytes / 1e6:.0f} MB; "
           f"memory bandwidth (512 MB copy): {gbs:.1f} GB/s; so a bandwidth-bound step takes at least "
           f"{weight_bytes / gbs / 1e6:.1f} ms"]
    for B in batches:
        prompt = torch.randint(2, cfg.vocab_size, (B, prompt_len))
        runs = {
            "rafale": lambda: model.generate(prompt, new_tokens),
            "HF": lambda: hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                                      min_new_tokens=new_tokens, do_sample=False, pad_token_id=1, eos_token_id=None),
        }
        sides, walls = {}, {}
        for name, run in runs.items():
            with torch.no_grad():
                run()
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    walls[name] = seconds(run) / new_tokens
            sides[name] = by_kind(prof)
        title = (f"greedy decoding, pythia-70m shape, B={B}, {new_tokens} new tokens, fp32, {torch.get_num_threads()} "
                 f"thread(s); wall per step under the profiler: rafale {walls['rafale'] * 1e3:.1f} ms, HF "
                 f"{walls['HF'] * 1e3:.1f} ms; the bandwidth bound {weight_bytes / gbs / 1e6:.1f} ms")
        out.append(table(title, sides, new_tokens, "decoding step"))
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--what", default="train,decode")
    p.add_argument("--T", type=int, default=512)
    p.add_argument("--B", type=int, default=2)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--preset", default="pythia-70m", help="the training step's model shape")
    p.add_argument("--vocab", type=int, default=None, help="its vocabulary (default: the preset's)")
    p.add_argument("--fp32", action="store_true", help="train in fp32 on both sides (training.precision=fp32)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--batches", default="1,8", help="decode: comma-separated batch sizes")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    what = set(args.what.split(","))
    if "train" in what:
        print(profile_train(args.T, args.B, args.steps, args.preset, args.vocab, args.fp32), flush=True)
    if "decode" in what:
        print(profile_decode(args.new_tokens, [int(b) for b in args.batches.split(",")]), flush=True)


if __name__ == "__main__":
    main()
