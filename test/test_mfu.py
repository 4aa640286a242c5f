"""MFU: the FLOPs a training step does (flops_per_token) and the peak it is divided by (rafale/hardware.py).

An MFU above 100% means one of the two is wrong. The FLOPs are checked against a count by hand from the config's
sizes and against torch's own FLOP counter; the CPU peak against a probe that a busy machine can only slow down, a
cached peak that is too low against the run itself, and on the console of a `rafale -c` run.
"""

import dataclasses
import json
import re

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from conftest import run_in_process, write_config
from rafale import hardware
from rafale.models.families import FAMILIES
from rafale.models.decoder import GPTNeoX
from rafale.models.encoder import build_encoder

VOCAB, LABELS = 192, 3


def hand_count(cfg, T: int, head: str) -> float:
    """Matmul FLOPs per token of a training step, layer by layer: 2 FLOPs per multiply-add, and the backward
    multiplies twice what the forward does (the gradients of the inputs and of the weights)."""
    C, I = cfg.hidden_size, cfg.intermediate_size
    forward = 0  # multiply-adds per token
    for _ in range(cfg.num_layers):
        forward += C * 3 * C  # query, key and value projections
        forward += T * C  # attention scores: a query times T keys, over all heads (heads x head_dim = C)
        forward += T * C  # the T values weighed by the probabilities
        forward += C * C  # the attention's output projection
        forward += C * I + I * C  # the MLP, up and down
    if head == "causal_lm":
        forward += C * cfg.vocab_size  # embed_out, on every token (embed_in is a lookup)
    elif head == "mlm":
        forward += C * C + C * cfg.vocab_size  # transform dense, then the decoder tied to the word embeddings
    elif head == "classification":
        forward += (C * C + C * cfg.num_labels) / T  # pooler (or RoBERTa's dense) and classifier, once per sequence
    return 2 * 3 * forward


def models():
    yield "pythia-debug", "causal_lm", GPTNeoX(dataclasses.replace(FAMILIES["pythia"].presets["pythia-debug"], vocab_size=VOCAB))
    for family, preset in (("bert", "bert-tiny"), ("roberta", "roberta-tiny")):
        for head in ("mlm", "classification"):
            cfg = dataclasses.replace(FAMILIES[family].presets[preset], vocab_size=VOCAB, num_labels=LABELS)
            yield preset, head, build_encoder(cfg, head)


@pytest.mark.parametrize("T", [16, 64])
def test_flops_per_token_is_the_hand_count(T):
    for preset, head, model in models():
        assert model.flops_per_token(T) == pytest.approx(hand_count(model.cfg, T, head), rel=1e-12), (preset, head)


def test_the_count_leaves_out_lookups_and_counts_a_per_sequence_head_once():
    _, _, decoder = next(models())
    cfg = decoder.cfg
    # twice the vocabulary: the output projection's share doubles, the input embedding (a lookup) adds nothing
    bigger = GPTNeoX(dataclasses.replace(cfg, vocab_size=2 * VOCAB))
    assert bigger.flops_per_token(64) - decoder.flops_per_token(64) == 6 * cfg.hidden_size * VOCAB
    cls = build_encoder(dataclasses.replace(FAMILIES["bert"].presets["bert-tiny"], vocab_size=VOCAB, num_labels=LABELS),
                        "classification")
    C = cls.cfg.hidden_size
    head = 6 * (C * C + C * LABELS)  # per sequence
    # a sequence of T tokens does the head once: T * per-token count = T * body + head
    for T in (16, 64):
        body = hand_count(cls.cfg, T, "none")
        assert T * cls.flops_per_token(T) == pytest.approx(T * body + head)


def measured_flops(model, head: str, B: int = 2, T: int = 32) -> float:
    """torch's FLOP counter over a forward and backward from the logits (with the math attention kernel, whose
    matmuls it sees; the decoder's chunked training loss does the same three products with its output projection,
    but accumulates one of them in place, with addmm_, which the counter does not count)."""
    torch.manual_seed(0)
    ids = torch.randint(2, VOCAB, (B, T))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(ids).float().sum().backward()
    return counter.get_total_flops() / (B * T)


def test_flops_per_token_is_what_torch_counts():
    for preset, head, model in models():
        model.train()
        assert model.flops_per_token(32) == pytest.approx(measured_flops(model, head), rel=1e-9), (preset, head)


# every part of the decoder a config can choose, alone or together: the count is the parts' sum (Decoder's
# flops_per_token), and torch's counter sees the same matmuls
DECODER_PARTS = [
    ("pythia", {}),
    ("pythia", {"mlp": "relu2"}),
    ("pythia", {"mlp": "swiglu", "parallel_residual": False, "norm": "rmsnorm", "attention_bias": False}),
    ("pythia", {"qk_norm": True, "logit_softcap": 15.0, "zero_init_proj": True}),
    ("llama", {}),  # grouped-query (2 KV heads for 4), SwiGLU, tied head
    ("llama", {"num_kv_heads": 1, "tie_embeddings": False}),  # multi-query, untied
    ("llama", {"mlp": "relu2", "qk_norm": True, "logit_softcap": 30.0}),
    ("qwen3", {}),  # QK-norm, heads of 32 on a 64-wide residual
    ("qwen2", {}),  # biases on q, k and v, none on the output
    ("pythia", {"attention_bias": False, "qkv_bias": True}),  # the same on GPT-NeoX's parts
]


def test_decoder_flops_from_the_parts_are_what_torch_counts():
    for family, fields in DECODER_PARTS:
        preset = next(name for name in FAMILIES[family].presets if name.endswith("-debug"))
        model = GPTNeoX(dataclasses.replace(FAMILIES[family].presets[preset], vocab_size=VOCAB, **fields)).train()
        assert model.flops_per_token(32) == pytest.approx(measured_flops(model, "causal_lm"), rel=1e-9), (family, fields)


def count_addmm_inplace(self_shape, a_shape, b_shape, out_shape=None, **kwargs) -> int:
    """FLOPs of tensor.addmm_(a, b), which torch's counter does not know (it counts addmm): 2 per multiply-add."""
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]


def measured_training_flops(model, tokenizer_vocab: int, B: int = 2, T: int = 32) -> float:
    """torch's FLOP counter over the training step itself: forward with labels (the chunked loss, over the
    tokenizer's rows of the head) and backward; the loss's in-place addmm_ counted too."""
    torch.manual_seed(0)
    ids, labels = torch.randint(2, tokenizer_vocab, (B, T)), torch.randint(0, tokenizer_vocab, (B, T))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False,
                                                       custom_mapping={torch.ops.aten.addmm_: count_addmm_inplace}) as counter:
        model(ids, labels=labels, vocab_size=tokenizer_vocab).backward()
    return counter.get_total_flops() / (B * T)


@pytest.mark.parametrize("family,tokenizer_vocab", [("pythia", 500), ("llama", 500), ("pythia", 512)])
def test_a_padded_vocabulary_counts_the_rows_the_training_loss_multiplies(family, tokenizer_vocab):
    # issue 34, 1.7: a 500-token tokenizer pads the head to 512 rows; the chunked loss multiplies the first 500
    from rafale.models.composer import ComposerLM

    preset = next(name for name in FAMILIES[family].presets if name.endswith("-debug"))
    model = GPTNeoX(dataclasses.replace(FAMILIES[family].presets[preset], vocab_size=512)).train()
    lm = ComposerLM(model, vocab_size=tokenizer_vocab)
    measured = measured_training_flops(model, tokenizer_vocab)
    batch = {"input_ids": torch.zeros(2, 32, dtype=torch.long)}
    assert lm.flops_per_batch(batch) == pytest.approx(measured * 2 * 32, rel=1e-9)
    assert lm.flops_per_token(32) == pytest.approx(measured, rel=1e-9)
    # the logits path (evaluation, generation) multiplies all 512 rows: that is the model's count without vocab_size
    assert model.flops_per_token(32) - lm.flops_per_token(32) == 6 * model.cfg.hidden_size * (512 - tokenizer_vocab)


def test_grouped_query_attention_saves_the_key_and_value_projections_it_leaves_out():
    cfg = dataclasses.replace(FAMILIES["llama"].presets["llama-debug"], vocab_size=VOCAB)
    mha, mqa = GPTNeoX(dataclasses.replace(cfg, num_kv_heads=None)), GPTNeoX(dataclasses.replace(cfg, num_kv_heads=1))
    C, hs = cfg.hidden_size, cfg.head_size
    # per layer, k and v lose (num_heads - 1) heads of C x hs multiply-adds each; x2 FLOPs, x3 for the training step
    saved = cfg.num_layers * 2 * (cfg.num_heads - 1) * C * hs * 2 * 3
    assert mha.flops_per_token(64) - mqa.flops_per_token(64) == saved


# ----------------------------------------------------------------------------------------------------
# the CPU peak


class FakeClock:
    """time.perf_counter for the probe: each matmul takes `durations[i]` seconds (the last one from then on)."""

    def __init__(self, durations):
        self.now, self.durations, self.calls = 0.0, list(durations), 0

    def perf_counter(self):
        return self.now

    def sleep(self, seconds):
        self.now += seconds

    def mm(self, a, b):
        self.now += self.durations[min(self.calls, len(self.durations) - 1)]
        self.calls += 1


def test_the_probe_keeps_the_fastest_timing(monkeypatch):
    # a busy machine: every matmul takes 1 s but one, which ran alone and took 0.1 s
    clock = FakeClock([1.0, 1.0, 1.0, 0.1] + [1.0] * 100)
    monkeypatch.setattr(hardware, "time", clock)
    monkeypatch.setattr(hardware.torch, "mm", clock.mm)
    peak = hardware.measure_cpu_peak(n=64, repeats=3, rounds=3)
    assert peak == pytest.approx(2 * 64**3 / 0.1)


def test_the_probe_tries_several_sizes(monkeypatch):
    sides = []
    monkeypatch.setattr(hardware.torch, "mm", lambda a, b: sides.append(a.shape[0]))
    hardware.measure_cpu_peak(repeats=2, rounds=1)
    assert set(sides) == set(hardware.PROBE_SIZES) and len(hardware.PROBE_SIZES) >= 3


def cached(tmp_path, peak, dtype=torch.float32):
    (tmp_path / "cpu_peak.json").write_text(json.dumps({hardware.cpu_peak_key(dtype): peak}))


def test_confirm_peak_keeps_a_peak_the_run_stayed_under(tmp_path, monkeypatch, capsys):
    cached(tmp_path, 5e10)
    monkeypatch.setattr(hardware, "measure_cpu_peak", lambda **kw: pytest.fail("probed again"))
    assert hardware.confirm_peak(4e10, "cpu", "fp32", tmp_path) == 5e10
    assert capsys.readouterr().out == ""


def test_confirm_peak_probes_again_above_a_cached_peak_and_rewrites_it(tmp_path, monkeypatch, capsys):
    cached(tmp_path, 8.95e9, torch.bfloat16)  # probed while the machine was busy
    probed = []
    monkeypatch.setattr(hardware, "measure_cpu_peak", lambda **kw: probed.append(kw["dtype"]) or 4e10)
    assert hardware.confirm_peak(2e10, "cpu", "fp32", tmp_path, torch.bfloat16) == 4e10
    assert probed == [torch.bfloat16]
    assert hardware.cached_cpu_peaks(tmp_path)[hardware.cpu_peak_key(torch.bfloat16)] == 4e10
    out = capsys.readouterr().out
    assert len(out.splitlines()) == 1 and "probed again: 40.0 GFLOP/s" in out and "cpu_peak.json" in out, out
    # the next run reads the new peak without probing
    monkeypatch.setattr(hardware, "measure_cpu_peak", lambda **kw: pytest.fail("probed again"))
    assert hardware.confirm_peak(2e10, "cpu", "fp32", tmp_path, torch.bfloat16) == 4e10


def test_confirm_peak_gives_none_when_the_run_is_still_above_it(tmp_path, monkeypatch, capsys):
    cached(tmp_path, 1e9)
    monkeypatch.setattr(hardware, "measure_cpu_peak", lambda **kw: 3e9)
    assert hardware.confirm_peak(5e9, "cpu", "fp32", tmp_path) is None
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and "probed again: 3.0 GFLOP/s" in out[0] and "MFU unavailable" in out[0], out
    assert hardware.cached_cpu_peaks(tmp_path)[hardware.cpu_peak_key()] == 3e9  # the better peak, kept anyway
    # a probe that comes out lower than the cached one never lowers it
    monkeypatch.setattr(hardware, "measure_cpu_peak", lambda **kw: 1e9)
    assert hardware.confirm_peak(5e9, "cpu", "fp32", tmp_path) is None
    assert hardware.cached_cpu_peaks(tmp_path)[hardware.cpu_peak_key()] == 3e9


def test_a_gpu_above_its_datasheet_peak_has_no_mfu(monkeypatch, capsys):
    monkeypatch.setattr(hardware.torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    assert hardware.confirm_peak(500e12, "gpu", "amp_bf16", "/nonexistent") == 989e12
    assert hardware.confirm_peak(1200e12, "gpu", "amp_bf16", "/nonexistent") is None
    assert "MFU unavailable" in capsys.readouterr().out


def test_a_run_on_a_too_low_cached_peak_shows_no_mfu_above_100_percent(tmp_path, cache_dir, capsys, monkeypatch):
    """The console's MFU (SpeedMonitor's, over 10 batches) against a cached CPU peak far below what the run does."""
    path = cache_dir / "cpu_peak.json"  # the session's cache: other tests read it, so it is restored below
    before = path.read_text() if path.exists() else None
    too_low = 1e6  # 1 MFLOP/s: the debug model runs at a few GFLOP/s even on a busy machine
    path.write_text(json.dumps(hardware.cached_cpu_peaks(cache_dir)
                               | {hardware.cpu_peak_key(): too_low, hardware.cpu_peak_key(torch.bfloat16): too_low}))
    cfg = write_config(tmp_path / "cfg.yaml", run={"output_dir": str(tmp_path / "runs"), "name": "low-peak"},
                       training={"max_duration": "24ba", "log_interval": "1ba", "eval_interval": "24ba",
                                 "save_interval": "24ba"})
    try:
        code, out, err = run_in_process(["-c", str(cfg)], capsys, monkeypatch)
    finally:
        path.write_text(before) if before is not None else path.unlink()
    assert code in (0, None), err[-3000:]
    lines = [line for line in out.splitlines() if re.match(r"\[\s*\d+/24", line) and "validation" not in line]
    assert len(lines) == 24, out
    mfus = [float(m) for line in lines for m in re.findall(r"MFU ([\d.]+)%", line)]
    # the first window is full at batch 11, where the peak is probed again; the next one from batch 22
    assert mfus or "MFU unavailable" in out, out
    assert all(mfu <= 100 for mfu in mfus), out
    assert "above the CPU's float32 matmul peak of 0.0 GFLOP/s" in out and "probed again" in out, out
    # and the summary's MFU, over the whole run's time inside training batches, against the peak probed again
    summary = json.loads((tmp_path / "runs" / "low-peak" / "summary.json").read_text())
    assert summary["mfu"] is None or 0 < summary["mfu"] <= 1, summary["mfu"]
    assert re.search(r"tokens/s while training(, MFU ([\d.]+)%)?(; the machine's load [^)]*)?\)", out)
    assert all(float(m) <= 100 for m in re.findall(r"while training, MFU ([\d.]+)%", out)), out
