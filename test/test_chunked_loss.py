"""The training loss computed in chunks (rafale.models.chunked_loss.chunked_cross_entropy) against the plain
full-logits cross-entropy, and the wrapper's own bf16 autocast on a CPU (rafale.run.trainer_parts.pick_precision)."""

import pytest
import torch
import torch.nn.functional as F

import rafale.models.chunked_loss as chunked_loss
import rafale.models.decoder as decoder
from rafale.config import config_from_dict
from rafale.errors import IGNORE_INDEX
from rafale.models.composer import ComposerLM
from rafale.models.chunked_loss import chunked_cross_entropy
from rafale.models.decoder import DecoderConfig, GPTNeoX
from rafale.run.trainer_parts import pick_precision

PADDED_V, TRUE_V = 64, 59  # the embedding is padded to a multiple of 64; the tokenizer has 59 tokens


def labels_with_ignored(N, V, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::5] = IGNORE_INDEX
    return labels


@pytest.mark.parametrize("chunk_rows", [1, 7, 1000])  # one row per chunk, an uneven split, a single chunk
def test_chunked_cross_entropy_equals_the_full_logits_loss_and_gradients(chunk_rows):
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, requires_grad=True)
    weight = torch.randn(PADDED_V, 16, requires_grad=True)
    labels = labels_with_ignored(37, TRUE_V)

    loss = chunked_cross_entropy(hidden, weight[:TRUE_V], labels, chunk_rows=chunk_rows)
    loss.backward()
    got = (loss.detach(), hidden.grad.clone(), weight.grad.clone())
    hidden.grad = weight.grad = None
    expected = F.cross_entropy(F.linear(hidden, weight[:TRUE_V]), labels, ignore_index=IGNORE_INDEX)
    expected.backward()

    torch.testing.assert_close(got[0], expected.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got[1], hidden.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got[2], weight.grad, rtol=1e-5, atol=1e-7)
    assert got[2][TRUE_V:].abs().sum() == 0  # the padding rows never enter the softmax


def test_the_soft_capped_chunked_loss_equals_the_full_logits_loss_and_gradients():
    """model.logit_softcap: the chunks cap their logits (cap * tanh(logits / cap)) and carry the cap's derivative."""
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, requires_grad=True)
    weight = torch.randn(PADDED_V, 16, requires_grad=True) * 3  # logits well past the cap
    weight = weight.detach().requires_grad_()
    labels = labels_with_ignored(37, TRUE_V)
    loss = chunked_cross_entropy(hidden, weight[:TRUE_V], labels, chunk_rows=7, softcap=5.0)
    loss.backward()
    got = (loss.detach(), hidden.grad.clone(), weight.grad.clone())
    hidden.grad = weight.grad = None
    capped = decoder.softcap(F.linear(hidden, weight[:TRUE_V]), 5.0)
    assert capped.abs().max() <= 5.0 < F.linear(hidden, weight).abs().max()  # (tanh reaches 1 in fp32)
    expected = F.cross_entropy(capped, labels, ignore_index=IGNORE_INDEX)
    expected.backward()
    torch.testing.assert_close(got[0], expected.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got[1], hidden.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got[2], weight.grad, rtol=1e-5, atol=1e-7)
    # and the model's training loss is that of its capped logits
    model = GPTNeoX(DecoderConfig(vocab_size=PADDED_V, hidden_size=32, num_layers=1, num_heads=4, intermediate_size=64,
                                  max_position_embeddings=32, logit_softcap=5.0))
    ids = torch.randint(0, TRUE_V, (2, 9))
    labels = torch.cat([ids[:, 1:], torch.full((2, 1), IGNORE_INDEX)], dim=1)
    logits = model(ids)
    assert logits.abs().max() <= 5.0
    torch.testing.assert_close(model(ids, labels=labels), F.cross_entropy(logits.flatten(0, 1), labels.flatten(),
                                                                          ignore_index=IGNORE_INDEX), rtol=1e-6, atol=1e-6)


def tiny_lm(padded_vocab=PADDED_V, true_vocab=TRUE_V, **kw):
    torch.manual_seed(0)
    cfg = DecoderConfig(vocab_size=padded_vocab, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                        max_position_embeddings=64)
    return ComposerLM(GPTNeoX(cfg), vocab_size=true_vocab, **kw)


def batch_of(B=3, T=12):
    ids = torch.randint(0, TRUE_V, (B, T), generator=torch.Generator().manual_seed(1))
    labels = torch.cat([ids[:, 1:], torch.full((B, 1), IGNORE_INDEX)], dim=1)
    labels[0, :4] = IGNORE_INDEX
    return {"input_ids": ids, "labels": labels}


def test_composer_lm_training_loss_and_gradients_equal_the_plain_computation(monkeypatch):
    monkeypatch.setattr(chunked_loss, "LOSS_CHUNK_ELEMENTS", 5 * TRUE_V)  # 5 rows per chunk: several chunks
    monkeypatch.setattr(chunked_loss, "LOSS_CHUNK_MIN_ROWS", 1)
    lm, batch = tiny_lm(), batch_of()
    loss = lm.loss(lm(batch), batch)
    loss.backward()
    chunked = {n: p.grad.clone() for n, p in lm.named_parameters()}
    lm.zero_grad(set_to_none=True)

    logits = lm.model(batch["input_ids"])[..., :TRUE_V]  # (B, T, V): the plain way
    expected = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE_INDEX)
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    for name, p in lm.named_parameters():
        torch.testing.assert_close(chunked[name], p.grad, rtol=1e-5, atol=1e-7, msg=name)
    # and the evaluation metric sees the same loss from the logits cut to the true vocabulary
    metric = lm.get_metrics(is_train=False)["LanguageCrossEntropy"]
    lm.update_metric(batch, lm.eval_forward(batch), metric)
    assert lm.eval_forward(batch).shape[-1] == TRUE_V
    torch.testing.assert_close(metric.compute(), expected.detach(), rtol=1e-6, atol=1e-6)


def saved_for_backward(run):
    """The sizes (numel) of every tensor autograd keeps for backward while `run` builds the graph."""
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sizes


def test_the_training_loss_keeps_no_logits_for_backward():
    # the plain loss keeps (B*T, V) tensors (the logits' log-softmax) until backward; the chunked one keeps
    # nothing bigger than the (B*T, C) hidden states and the (V, C) embedding gradient
    # a vocabulary big next to the model, as pythia's 50k is next to a 512-wide model
    lm, batch = tiny_lm(padded_vocab=1024, true_vocab=1000), batch_of(B=4, T=32)
    logits_numel = 4 * 32 * 1000
    plain = saved_for_backward(lambda: F.cross_entropy(
        lm.model(batch["input_ids"])[..., :1000].flatten(0, 1), batch["labels"].flatten()))
    assert max(plain) >= logits_numel  # the check can see logits when they are kept
    chunked = saved_for_backward(lambda: lm.loss(lm(batch), batch))
    assert max(chunked) < logits_numel / 2, sorted(chunked)[-5:]


def matmul_dtypes(lm, run):
    """The dtypes of every Linear output (the model's matmuls) while `run` runs."""
    seen = []
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
             for m in lm.modules() if isinstance(m, torch.nn.Linear)]
    try:
        out = run()
    finally:
        for h in hooks:
            h.remove()
    return set(seen), out


def test_bf16_autocast_runs_the_matmuls_in_bf16_and_the_loss_stays_close_to_fp32():
    batch = batch_of()
    fp32 = tiny_lm()
    dtypes, loss32 = matmul_dtypes(fp32, lambda: fp32(batch))
    assert dtypes == {torch.float32} and loss32.dtype == torch.float32

    bf16 = tiny_lm(autocast_dtype=torch.bfloat16)
    dtypes, loss16 = matmul_dtypes(bf16, lambda: bf16(batch))
    assert dtypes == {torch.bfloat16}
    loss16.backward()  # gradients reach the fp32 parameters in fp32
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in bf16.parameters())
    torch.testing.assert_close(loss16, loss32, rtol=2e-2, atol=0)
    dtypes, logits = matmul_dtypes(bf16, lambda: bf16.eval_forward(batch))
    assert dtypes == {torch.bfloat16} and logits.dtype == torch.float32  # the metrics get fp32 logits


def config(precision):
    return config_from_dict({"model": {"type": "pythia", "preset": "pythia-debug"},
                             "training": {"precision": precision}})


def test_pick_precision_on_a_cpu(monkeypatch, capsys):
    import rafale.run.trainer_parts as parts

    lm = tiny_lm()
    assert pick_precision(config("fp32"), "cpu", lm) == ("fp32", None)
    monkeypatch.setattr(parts, "cpu_has_fast_bf16", lambda: True)
    assert pick_precision(config("amp_bf16"), "cpu", lm) == ("fp32", torch.bfloat16)  # Composer fp32, model bf16
    assert pick_precision(config("amp_bf16"), "gpu", lm) == ("amp_bf16", None)  # Composer's own on a GPU
    assert capsys.readouterr().out == ""
    monkeypatch.setattr(parts, "cpu_has_fast_bf16", lambda: False)
    assert pick_precision(config("amp_bf16"), "cpu", lm) == ("fp32", None)
    assert "running fp32 on the CPU" in capsys.readouterr().out


@pytest.mark.parametrize("task", ["mlm", "classification"])
def test_the_encoders_autocast_too_and_their_losses_and_metrics_read_fp32(task):
    from rafale.models.composer import ComposerClassifier, ComposerMLM
    from rafale.models.encoder import EncoderConfig, build_encoder

    torch.manual_seed(0)
    cfg = EncoderConfig(family="bert", hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                        max_position_embeddings=32, vocab_size=64, hidden_dropout=0.0, attention_dropout=0.0)
    module = build_encoder(cfg, task)
    wrap = (lambda m: ComposerMLM(m, vocab_size=60)) if task == "mlm" else (lambda m: ComposerClassifier(m, 2))
    ids = torch.randint(5, 60, (4, 16))
    labels = torch.where(torch.rand(4, 16) < 0.3, ids, IGNORE_INDEX) if task == "mlm" else torch.tensor([0, 1, 1, 0])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    fp32, bf16 = wrap(module), wrap(module)
    bf16.autocast_dtype = torch.bfloat16
    dtypes, out32 = matmul_dtypes(fp32, lambda: fp32(batch))
    assert dtypes == {torch.float32}
    dtypes, out16 = matmul_dtypes(bf16, lambda: bf16(batch))
    assert dtypes == {torch.bfloat16}
    loss16 = bf16.loss(out16, batch)
    assert loss16.dtype == torch.float32
    torch.testing.assert_close(loss16, fp32.loss(out32, batch), rtol=2e-2, atol=0)
    assert bf16.eval_forward(batch).dtype == torch.float32  # the metrics get fp32 logits
