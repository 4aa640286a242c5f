"""GPU benchmark of rafale training: pythia-160m at T=2048 in bf16 (see bench/gpu.sh).

    python bench/gpu_bench.py [--preset pythia-160m --seq 2048 --batch 8 --steps 20 --warmup 5]
    python bench/gpu_bench.py --cpu-smoke      # the same code paths on the CPU, tiny shape, < 1 minute

Rows (each an MFU against the card's bf16 dense peak, and tokens/s):
  a. rafale plain loop, eager              (bf16 autocast, flash attention allowed)
  b. rafale plain loop, torch.compile
  c. rafale plain loop, SDPA forced to FLASH_ATTENTION   vs   d. forced to MATH
  e. rafale in the Composer Trainer (amp_bf16)   vs   f. HF GPTNeoXForCausalLM (sdpa) in a plain loop
"""

import argparse
import gc
import json
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import torch  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from common import (  # noqa: E402
    decoder_cfg, hf_from_rafale, make_rafale, matmul_peak, median, random_blocks, train_plain, train_rafale,
)
from rafale.run.hardware import gpu_peak_flops  # noqa: E402
from rafale.models.composer import ComposerLM  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-smoke", action="store_true", help="run every path on the CPU with a tiny shape")
    p.add_argument("--preset", default="pythia-160m")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=20, help="measured steps per row")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--compile-warmup", type=int, default=8, help="warm-up steps of the compiled row")
    p.add_argument("--compile-backend", default=None,
                   help="torch.compile backend (default inductor; aot_eager in --cpu-smoke, where inductor's C++ build takes minutes)")
    p.add_argument("--skip", default="", help="comma-separated rows to skip: compile,flash,math,trainer,hf")
    p.add_argument("--json", default=None, help="also write the rows as JSON here")
    args = p.parse_args()
    skip = set(filter(None, args.skip.split(",")))

    if args.cpu_smoke:
        args.preset, vocab, args.seq, args.batch, args.steps, args.warmup, args.compile_warmup = (
            "pythia-debug", 512, 64, 2, 2, 1, 1)
        device, composer_device, dtype = "cpu", "cpu", torch.bfloat16
        trainer_precision = "fp32"  # Composer has no amp_bf16 on a CPU
        args.compile_backend = args.compile_backend or "aot_eager"
        peak, _ = matmul_peak(torch.get_num_threads(), n=512, repeats=3, cache=False)
        name = "CPU (smoke test; fp32 matmul probe as the peak)"
    else:
        if not torch.cuda.is_available():
            sys.exit("no GPU; use --cpu-smoke")
        vocab, device, composer_device, dtype = None, "cuda", "gpu", torch.bfloat16
        trainer_precision = "amp_bf16"
        name = torch.cuda.get_device_name()
        peak = gpu_peak_flops("amp_bf16", name)  # the one table, in rafale/run/hardware.py
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    print(f"device: {name}; peak {peak / 1e12 if peak else float('nan'):.3f} TFLOP/s; torch {torch.__version__}; "
          f"{args.preset} T={args.seq} B={args.batch} bf16, {args.warmup} warm-up + {args.steps} steps", flush=True)

    cfg = decoder_cfg(args.preset, vocab, args.seq)
    base = make_rafale(cfg)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    flops = ComposerLM(base).flops_per_batch({"input_ids": torch.zeros(args.batch, args.seq, dtype=torch.long)})
    tokens = args.batch * args.seq
    rows = []

    def fresh():
        m = make_rafale(cfg)
        m.load_state_dict(state)
        return m.to(device)

    def record(label, times, warmup):
        t = median(times[warmup:])
        mfu = flops / t / peak if peak else float("nan")
        rows.append({"row": label, "step_ms": t * 1e3, "tokens_per_s": tokens / t, "mfu": mfu})
        print(f"  {label:55s} step {t * 1e3:8.1f} ms  {tokens / t:10.0f} tok/s  MFU {mfu * 100:5.1f}%", flush=True)
        if device == "cuda":
            torch.cuda.empty_cache()
        gc.collect()

    def run(label, model, kind="rafale", step_ctx=None, warmup=args.warmup):
        blocks = random_blocks((warmup + args.steps) * args.batch, args.seq, cfg.vocab_size)
        try:
            times = train_plain(model, blocks, args.batch, warmup + args.steps, kind=kind, device=device,
                                autocast_dtype=dtype, step_ctx=step_ctx)
        except Exception as err:  # one failing row (no compiler, no kernel) must not lose the others
            print(f"  {label:55s} FAILED: {type(err).__name__}: {str(err)[:300]}", flush=True)
            rows.append({"row": label, "error": f"{type(err).__name__}: {str(err)[:300]}"})
            return
        record(label, times, warmup)

    run("a. rafale plain loop, eager", fresh())
    if "compile" not in skip:
        run("b. rafale plain loop, torch.compile", torch.compile(fresh(), backend=args.compile_backend or "inductor"), warmup=args.compile_warmup)
    if "flash" not in skip:
        run("c. rafale plain loop, SDPA FLASH_ATTENTION only", fresh(), step_ctx=lambda: sdpa_kernel(SDPBackend.FLASH_ATTENTION))
    if "math" not in skip:
        run("d. rafale plain loop, SDPA MATH only", fresh(), step_ctx=lambda: sdpa_kernel(SDPBackend.MATH))
    if "trainer" not in skip:
        blocks = random_blocks((args.warmup + args.steps) * args.batch, args.seq, cfg.vocab_size)
        label = f"e. rafale -c: rafale.run.train's Trainer ({trainer_precision})"
        try:
            with tempfile.TemporaryDirectory(prefix="rafale-gpu-bench-") as workdir:
                times, _ = train_rafale(ComposerLM(fresh()), blocks, args.batch, args.warmup + args.steps, workdir,
                                        precision=trainer_precision)
            record(label, times, args.warmup)
        except Exception as err:
            print(f"  {label:55s} FAILED: {type(err).__name__}: {str(err)[:300]}", flush=True)
            rows.append({"row": label, "error": str(err)[:300]})
    if "hf" not in skip:
        run("f. HF GPTNeoXForCausalLM (sdpa) plain loop", hf_from_rafale(fresh().cpu()).to(device), kind="hf")

    by = {r["row"][0]: r for r in rows if "error" not in r}

    def ratio(a, b):
        return by[a]["tokens_per_s"] / by[b]["tokens_per_s"] if a in by and b in by else float("nan")

    print("\n| comparison | ratio |\n|---|---|")
    print(f"| torch.compile vs eager (b/a) | {ratio('b', 'a'):.2f} |")
    print(f"| flash vs math attention (c/d) | {ratio('c', 'd'):.2f} |")
    print(f"| rafale Trainer vs HF plain loop (e/f), goal >= 1.2 | {ratio('e', 'f'):.2f} |")
    print(f"| Composer overhead: Trainer vs plain eager loop (e/a), goal >= 0.97 | {ratio('e', 'a'):.2f} |")
    best = max((r["mfu"] for r in rows if "mfu" in r), default=float("nan"))
    print(f"| best MFU | {best * 100:.1f}% |")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": name, "peak": peak, "args": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
