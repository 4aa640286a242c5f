"""The few-row matmuls of decoding on a CPU, each done the way this CPU does fastest.

A decoding step multiplies every weight by B rows (one new token per prompt). How fast a library does that depends
on the CPU far more than a big matmul does: on an AMD EPYC, `W @ x.T` beat `F.linear(x, W)` 3x for pythia-70m's
50k x 512 head at 2 rows, while on an Intel Xeon (Sapphire Rapids) it was 2.6x slower (torch 2.7's MKL, one
thread). So `DecodingLinears` times the candidates once per model shape, row count, dtype and thread count in a
process and keeps, for each weight, the fastest:

    linear         F.linear(x, W): what nn.Linear does
    weight_at_x    (W @ x.T).T: W read as it is stored, (out, in)
    x_at_weight_t  x @ W_t with W_t a transposed (in, out) copy, made once; only for generations of at least
                   TRANSPOSE_FROM_TOKENS tokens, and its copy time counts against it (spread over the steps)

A weight is timed as decoding meets it, one after another in the model's order (so a small weight comes from
memory, not from a cache that a loop over it alone would keep it in): 3 passes over all of them per way, about
0.3 s for pythia-70m at one thread, once. Each way is the same fp32 products summed in another order: greedy tokens
equal HF's (test/test_weights.py), and two machines can differ in the last bits of a logit, as any two BLAS
builds do. The module imports torch only.
"""

import time
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

WAYS = ("linear", "weight_at_x", "x_at_weight_t")  # the candidates (a test narrows them to one)
TRANSPOSE_FROM_TOKENS = 64  # the copies cost (pythia-70m: ~100 ms, most of it the head's) what 30-60 steps save
MAX_TUNED_ROWS = 32  # more rows than this (a long prompt, a big batch) is a GEMM that F.linear does well
PASSES = 3  # timed passes per way after a warm-up pass; each weight keeps its fastest
_TIMINGS: dict = {}  # (weight shapes, rows, dtype, threads, ways) -> per weight {way: seconds, "copy": seconds}


def _multiply(way, weight, weight_t, bias, rows):
    """rows (n, in) times weight (out, in) the given way -> (n, out)."""
    if way == "x_at_weight_t":
        return torch.addmm(bias, rows, weight_t) if bias is not None else rows @ weight_t
    if way == "weight_at_x":
        return (torch.addmm(bias[:, None], weight, rows.t()) if bias is not None else weight @ rows.t()).t()
    return F.linear(rows, weight, bias)


def timings(weights: list, rows: int, ways: tuple) -> list:
    """Seconds per call of each way for each weight at `rows` rows (and of its transposed copy), timed in passes
    over all the weights in order; measured once per process."""
    key = (tuple(w.shape for w in weights), rows, weights[0].dtype, torch.get_num_threads(), ways)
    if key not in _TIMINGS:
        found = [{w: float("inf") for w in ways} for _ in weights]
        inputs = {w.shape[1]: torch.randn(rows, w.shape[1], dtype=w.dtype) for w in weights}
        copies = [None] * len(weights)
        if "x_at_weight_t" in ways:
            for i, w in enumerate(weights):
                start = time.perf_counter()
                copies[i] = w.t().contiguous()
                found[i]["copy"] = time.perf_counter() - start
        for way in ways:
            for p in range(PASSES + 1):  # pass 0 warms up
                for i, w in enumerate(weights):
                    start = time.perf_counter()
                    _multiply(way, w, copies[i], None, inputs[w.shape[1]])
                    if p:
                        found[i][way] = min(found[i][way], time.perf_counter() - start)
        _TIMINGS[key] = found
    return _TIMINGS[key]


def plan(weights: list, rows: int, steps: int) -> list:
    """For each weight, the way among WAYS to multiply `rows` rows by it at each of `steps` decoding steps in the
    least time in all."""
    if not 1 <= rows <= MAX_TUNED_ROWS:
        return ["linear"] * len(weights)
    if len(WAYS) == 1:
        return [WAYS[0]] * len(weights)
    ways = WAYS if steps >= TRANSPOSE_FROM_TOKENS else tuple(w for w in WAYS if w != "x_at_weight_t")
    return [min(ways, key=lambda w: t[w] * steps + (t["copy"] if w == "x_at_weight_t" else 0.0))
            for t in timings(weights, rows, ways)]


class DecodingLinears:
    """Within this context every nn.Linear of `model` multiplies the `rows` rows of a decoding step the way `plan`
    found fastest for it; any other number of rows (the prompt) goes through F.linear. The transposed copies take
    their weights' memory again until the context ends."""

    def __init__(self, model: nn.Module, rows: int, steps: int):
        self.linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        self.rows, self.steps = rows, steps

    def __enter__(self):
        weights = [m.weight.detach() for m in self.linears]
        for m, weight, way in zip(self.linears, weights, plan(weights, self.rows, self.steps) if weights else []):
            weight_t = weight.t().contiguous() if way == "x_at_weight_t" else None  # (in, out)
            m.forward = partial(_decoding_linear, way, self.rows, weight, weight_t, m.bias)  # shadows the class's
        return self

    def __exit__(self, *exc):
        for m in self.linears:
            m.__dict__.pop("forward", None)
        return False


def _decoding_linear(way, n_rows, weight, weight_t, bias, x):
    """F.linear(x, weight, bias), computed `way` when x holds `n_rows` rows."""
    rows = x.reshape(-1, x.shape[-1])  # (n, in)
    if rows.shape[0] != n_rows or way == "linear":
        return F.linear(x, weight, bias)
    return _multiply(way, weight, weight_t, bias, rows).view(*x.shape[:-1], weight.shape[0])
