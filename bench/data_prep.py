"""Data preparation at scale: rafale's DATA=1 path (CausalLMDataPipe.load on a .txt) vs bare encode_batch.

    .venv/bin/python bench/data_prep.py [--sizes 10,100] [--tokenizer PATH] [--real PATH] [--repeats 1] [--out FILE]

For each corpus (synthetic stories of each size in MB, generated to disk a chunk at a time, and a real .txt,
by default the TinyStories sample), with the same tokenizer (by default Pythia's, else a BPE trained here):

- in one child process per corpus, rafale's build from an empty cache: seconds, tokens, peak RSS (VmHWM,
  which counts memory-mapped file pages the kernel may drop) and peak anonymous memory (sampled), cache size;
- in this process, on the same text: rafale's build again and bare `encode_batch` (documents already split and
  in memory, batches of rafale.data.causal_lm.ENCODE_BATCH documents, only the ids counted): tokens/s and their ratio
  (goal >= 0.8).

Goal for memory: the peaks stay about flat as the corpus grows. Timings on a shared machine are noisy.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

SHARED = Path("/work/shared/data")
SEP = "\n<|endoftext|>\n"


def anon_kb() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssAnon:"))


def hwm_kb() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


def du_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def rafale_build(corpus: Path, tokenizer: Path, workdir: Path) -> dict:
    """rafale's DATA=1 path from an empty cache: seconds, tokens and cache size."""
    from rafale.config import DataConfig
    from rafale.data.causal_lm import CausalLMDataPipe

    cache = Path(tempfile.mkdtemp(prefix="cache-", dir=workdir))
    cfg = DataConfig(source=str(corpus), tokenizer=str(tokenizer), block_size=2048, cache_dir=str(cache))
    t = time.perf_counter()
    data = CausalLMDataPipe(cfg).load(verbose=False)
    seconds = time.perf_counter() - t
    tokens = sum(s["tokens"] for s in data.meta["splits"].values())
    size = du_bytes(data.path)
    del data
    shutil.rmtree(cache)
    return {"seconds": seconds, "tokens": tokens, "cache_bytes": size}


def child(corpus: Path, tokenizer: Path, workdir: Path):
    """One build in a fresh process, with its peak memory."""
    peak = [0]

    def sample():  # the kernel keeps no peak of anonymous memory
        while True:
            peak[0] = max(peak[0], anon_kb())
            time.sleep(0.005)

    import rafale.data  # noqa: F401  (imports outside the measured growth)

    start_anon, start_hwm = anon_kb(), hwm_kb()
    threading.Thread(target=sample, daemon=True).start()
    out = rafale_build(corpus, tokenizer, workdir)
    print(json.dumps(out | {"start_anon_kb": start_anon, "peak_anon_kb": peak[0], "start_hwm_kb": start_hwm,
                            "peak_hwm_kb": hwm_kb()}))


def bare_encode_batch(docs: list[str], tokenizer) -> tuple[float, int]:
    from rafale.data.causal_lm import ENCODE_BATCH

    t = time.perf_counter()
    tokens = 0
    for i in range(0, len(docs), ENCODE_BATCH):
        tokens += sum(len(e.ids) + 1 for e in tokenizer.encode_batch(docs[i : i + ENCODE_BATCH], add_special_tokens=False))
    return time.perf_counter() - t, tokens


def write_stories(path: Path, megabytes: float) -> Path:
    """Generated stories, a chunk at a time, until the file holds `megabytes`."""
    from rafale.data.stories import generate_stories

    with path.open("w") as f:
        written, seed = 0, 0
        while written < megabytes * 2**20:
            chunk = SEP.join(generate_stories(2000, seed=seed)) + SEP
            f.write(chunk)
            written += len(chunk.encode())
            seed += 1
    return path


def default_tokenizer(workdir: Path) -> Path:
    pythia = SHARED / "pythia-tokenizer" / "tokenizer.json"
    if pythia.is_file():
        return pythia
    from datasets import Dataset

    from rafale.data.tokenizers import train_tokenizer
    from rafale.data.stories import generate_stories

    path = workdir / "tokenizer.json"
    train_tokenizer(Dataset.from_dict({"text": generate_stories(5000)}), 4096).save(str(path))
    return path


def measure(name: str, corpus: Path, tokenizer_path: Path, repeats: int, workdir: Path) -> dict:
    from tokenizers import Tokenizer

    from rafale.data.sources import iter_text_documents

    size = corpus.stat().st_size
    print(f"\n[{name}] {corpus} ({size / 2**20:.1f} MiB)", flush=True)
    proc = subprocess.run([sys.executable, __file__, "--child", str(corpus), str(tokenizer_path), str(workdir)],
                          capture_output=True, text=True, env=os.environ | {"PYTHONPATH": str(HERE.parent)})
    if proc.returncode:
        sys.exit(proc.stderr[-3000:])
    alone = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"    child: {alone['seconds']:.1f}s, {alone['tokens']:,} tokens, peak anon "
          f"{alone['peak_anon_kb'] / 1024:.0f} MiB (start {alone['start_anon_kb'] / 1024:.0f}), VmHWM "
          f"{alone['peak_hwm_kb'] / 1024:.0f} MiB (start {alone['start_hwm_kb'] / 1024:.0f}), cache "
          f"{alone['cache_bytes'] / 2**20:.1f} MiB", flush=True)
    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    docs = list(iter_text_documents(corpus, "<|endoftext|>"))
    ours, bare = [], []
    for r in range(repeats):  # alternate the order: the machine's load drifts
        for side in (("rafale", "bare") if r % 2 == 0 else ("bare", "rafale")):
            if side == "rafale":
                out = rafale_build(corpus, tokenizer_path, workdir)
                ours.append(out["tokens"] / out["seconds"])
            else:
                seconds, tokens = bare_encode_batch(docs, tokenizer)
                bare.append(tokens / seconds)
        print(f"    repeat {r}: rafale {ours[-1] / 1e6:.2f}M tok/s, bare encode_batch {bare[-1] / 1e6:.2f}M tok/s", flush=True)
    del docs
    median = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    return {"name": name, "mib": size / 2**20, "rafale_tps": median(ours), "bare_tps": median(bare), **alone}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="10,100", help="synthetic corpus sizes in MB, comma-separated")
    p.add_argument("--real", default=str(SHARED / "tinystories" / "train-head-2MiB.txt"), help="a real .txt corpus")
    p.add_argument("--tokenizer", default=None, help="tokenizers JSON (default: Pythia's, else a BPE trained here)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--real-repeats", type=int, default=3)
    p.add_argument("--out", default=None, help="also write the table to this file (e.g. bench/results-data.md)")
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(*map(Path, args.child))
    with tempfile.TemporaryDirectory(prefix="rafale-data-bench-") as tmp:
        workdir = Path(tmp)
        tokenizer = Path(args.tokenizer) if args.tokenizer else default_tokenizer(workdir)
        rows = []
        if args.real and Path(args.real).is_file():
            rows.append(measure("real", Path(args.real), tokenizer, args.real_repeats, workdir))
        for mb in (float(x) for x in args.sizes.split(",") if x):
            corpus = write_stories(workdir / f"stories-{mb:g}MB.txt", mb)
            rows.append(measure(f"stories {mb:g} MB", corpus, tokenizer, args.repeats, workdir))
            corpus.unlink()
    lines = [
        "# rafale data preparation benchmark",
        "",
        f"- date {time.strftime('%Y-%m-%d %H:%M:%S')}, nproc {os.cpu_count()}, load average {os.getloadavg()[0]:.1f} "
        "(a shared machine: the figures are noisy)",
        f"- command: `{' '.join(['.venv/bin/python', 'bench/data_prep.py'] + sys.argv[1:])}`, tokenizer {tokenizer}",
        "- peak anon: anonymous memory, sampled; VmHWM: the kernel's peak RSS, which also counts memory-mapped "
        "file pages (the source's Arrow copy read back), reclaimable page cache; both with the process's start",
        "",
        "| corpus | MiB | rafale tok/s | bare encode_batch tok/s | ratio (goal >= 0.8) | peak anon MiB (start) "
        "| VmHWM MiB (start) | cache MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['mib']:.1f} | {r['rafale_tps'] / 1e6:.2f}M | {r['bare_tps'] / 1e6:.2f}M | "
            f"{r['rafale_tps'] / r['bare_tps']:.2f} | {r['peak_anon_kb'] / 1024:.0f} ({r['start_anon_kb'] / 1024:.0f}) | "
            f"{r['peak_hwm_kb'] / 1024:.0f} ({r['start_hwm_kb'] / 1024:.0f}) | {r['cache_bytes'] / 2**20:.1f} |")
    print("\n" + "\n".join(lines))
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
