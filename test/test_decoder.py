import pytest
import torch

from rafale.models.pythia import PRESETS as PYTHIA_PRESETS
from rafale.models.composer import ComposerLM
from rafale.models.decoder import DecoderConfig, GPTNeoX
from rafale.models.kv_cache import KVCache

V = 97


def tiny(**kw) -> GPTNeoX:
    torch.manual_seed(0)
    cfg = DecoderConfig(vocab_size=V, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                        max_position_embeddings=64, **kw)
    return GPTNeoX(cfg).eval()


def test_shapes():
    model = tiny()
    ids = torch.randint(0, V, (3, 10))
    assert model(ids).shape == (3, 10, V)
    assert model.generate(ids, max_new_tokens=5).shape == (3, 15)


@pytest.mark.parametrize("parallel_residual", [True, False])
@pytest.mark.parametrize("rotary_pct", [0.25, 1.0])
def test_kv_cache_generation_equals_full_forward_generation(parallel_residual, rotary_pct):
    model = tiny(parallel_residual=parallel_residual, rotary_pct=rotary_pct)
    prompt = torch.randint(0, V, (2, 7))
    cached = model.generate(prompt, max_new_tokens=20)
    uncached = model.generate(prompt, max_new_tokens=20, use_cache=False)
    assert torch.equal(cached, uncached)
    # and each uncached step really is the argmax of a full forward pass
    logits = model(uncached[:, :-1])
    assert torch.equal(logits[:, 6:].argmax(-1), uncached[:, 7:])


def test_cached_logits_match_full_forward():
    model = tiny()
    ids = torch.randint(0, V, (2, 12))
    full = model(ids)
    cache = KVCache(model.cfg, batch_size=2, max_len=12)
    first = model(ids[:, :5], kv_cache=cache)
    rest = [model(ids[:, t : t + 1], kv_cache=cache) for t in range(5, 12)]
    torch.testing.assert_close(torch.cat([first, *rest], dim=1), full, atol=1e-5, rtol=1e-4)
    assert cache.length == 12


def test_causal_mask():
    model = tiny()
    ids = torch.randint(0, V, (1, 16))
    changed = ids.clone()
    changed[0, 10] = (ids[0, 10] + 1) % V
    a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_right_padding_does_not_change_real_positions():
    model = tiny()
    ids = torch.randint(0, V, (1, 9))
    padded = torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(1, 9), torch.zeros(1, 4)], dim=1).long()
    torch.testing.assert_close(model(padded, attention_mask=mask)[:, :9], model(ids), atol=1e-5, rtol=1e-4)


def test_left_padded_batch_generates_what_each_prompt_generates_alone():
    model = tiny()
    prompts = [torch.randint(0, V, (n,)) for n in (3, 8)]
    batch = torch.zeros(2, 8, dtype=torch.long)
    mask = torch.zeros(2, 8, dtype=torch.long)
    for i, p in enumerate(prompts):
        batch[i, 8 - len(p):], mask[i, 8 - len(p):] = p, 1
    out = model.generate(batch, max_new_tokens=10, attention_mask=mask)
    for i, p in enumerate(prompts):
        alone = model.generate(p[None], max_new_tokens=10)
        assert torch.equal(out[i, 8:], alone[0, len(p):])


def test_generation_stops_at_eos():
    model = tiny()
    prompt = torch.randint(0, V, (1, 4))
    free = model.generate(prompt, max_new_tokens=12)
    eos = int(free[0, 6])  # pretend the third generated token is end-of-text
    out = model.generate(prompt, max_new_tokens=12, eos_token_id=eos)
    first_eos = (out[0, 4:] == eos).nonzero()[0].item()
    assert out.shape[1] == 4 + first_eos + 1 and torch.equal(out[0, : 4 + first_eos], free[0, : 4 + first_eos])


def test_too_long_input_is_an_error():
    model = tiny()
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(torch.zeros(1, 65, dtype=torch.long))


def test_presets_have_the_published_pythia_shapes():
    # parameter counts of EleutherAI/pythia-70m and -160m (70,426,624 and 162,322,944)
    assert sum(p.numel() for p in GPTNeoX(PYTHIA_PRESETS["pythia-70m"]).parameters()) == 70_426_624
    assert sum(p.numel() for p in GPTNeoX(PYTHIA_PRESETS["pythia-160m"]).parameters()) == 162_322_944


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="hidden_size .* divisible by num_heads"):
        DecoderConfig(vocab_size=8, hidden_size=30, num_heads=4).validate()


def test_composer_lm_loss_and_metrics():
    model = ComposerLM(tiny())
    ids = torch.randint(0, V, (2, 6))
    labels = torch.cat([ids[:, 1:], torch.full((2, 1), -100)], dim=1)
    batch = {"input_ids": ids, "labels": labels}
    logits = model.model(ids)
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(model.loss(model(batch), batch), expected)
    metric = model.get_metrics(is_train=False)["LanguageCrossEntropy"]
    model.update_metric(batch, model.eval_forward(batch), metric)
    torch.testing.assert_close(metric.compute(), expected)
    assert model.flops_per_batch(batch) == model.model.flops_per_token(6) * 12 > 0


def test_last_only_gives_the_logits_of_the_last_position():
    model = tiny()
    ids = torch.randint(0, V, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0  # left padding: positions come from the mask
    for kw in ({}, {"attention_mask": mask}):
        last = model(ids, last_only=True, **kw)
        assert last.shape == (2, 1, V)
        torch.testing.assert_close(last, model(ids, **kw)[:, -1:], atol=1e-6, rtol=1e-6)


def test_rotary_tables_are_the_gpt_neox_formula():
    # the precomputed tables must give what computing cos(position * inv_freq) in fp32 on the fly gives
    rotary = tiny(rotary_pct=0.5).positions
    positions = torch.tensor([[0, 0, 1, 2, 3], [5, 6, 7, 8, 9]])  # (B, T), the first row left-padded
    freqs = positions[:, :, None].float() * rotary.inv_freq[None, None, :]  # (B, T, dim/2)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, dim)
    cos, sin = rotary(positions, torch.float32)
    assert torch.equal(cos, emb.cos()) and torch.equal(sin, emb.sin())
    cos, sin = rotary.span(5, 5, torch.float32)  # (1, 1, T, dim), positions 5..9
    assert torch.equal(cos[0], emb.cos()[1]) and torch.equal(sin[0], emb.sin()[1])


def test_generated_ids_work_in_a_training_forward():
    # generate runs in inference mode; the ids it returns must still be usable where autograd records
    model = tiny()
    ids = model.generate(torch.randint(0, V, (2, 4)), max_new_tokens=3)
    model.train()
    model(ids).sum().backward()
    assert model.embed.weight.grad is not None


def test_cpu_decoding_plan_follows_the_timings(monkeypatch):
    """rafale/models/decoding.py keeps, for each weight, the way timed fastest over the whole generation: a
    transposed copy only from TRANSPOSE_FROM_TOKENS new tokens on, its copy time spread over the steps; F.linear
    for more rows than it times."""
    from rafale.models import decoding

    w = torch.zeros(4, 4)
    times = [{"linear": 3.0, "weight_at_x": 2.0, "x_at_weight_t": 1.0, "copy": 100.0},
             {"linear": 1.0, "weight_at_x": 2.0, "x_at_weight_t": 3.0, "copy": 1.0}]
    monkeypatch.setattr(decoding, "timings", lambda weights, rows, ways: times)
    assert decoding.plan([w, w], 2, 10) == ["weight_at_x", "linear"]  # too short for a copy
    assert decoding.plan([w, w], 2, 64) == ["weight_at_x", "linear"]  # 64 * 1 + 100 > 64 * 2
    assert decoding.plan([w, w], 2, 200) == ["x_at_weight_t", "linear"]  # 200 + 100 < 200 * 2
    assert decoding.plan([w, w], decoding.MAX_TUNED_ROWS + 1, 200) == ["linear", "linear"]
    monkeypatch.undo()
    weights = [torch.randn(64, 32), torch.randn(32, 64)]
    found = decoding.timings(weights, 3, decoding.WAYS)  # measured, once a process
    assert [set(t) for t in found] == [set(decoding.WAYS) | {"copy"}] * 2
    assert all(v > 0 for t in found for v in t.values())
    assert decoding.timings([w.clone() for w in weights], 3, decoding.WAYS) is found


@pytest.mark.parametrize("way", ["weight_at_x", "x_at_weight_t"])
def test_cpu_decoding_linears_give_the_same_tokens_and_restore_the_modules(monkeypatch, way):
    """Each way a CPU may multiply a step's rows (forced on every Linear) gives the same greedy tokens as plain
    F.linear; the prompt's rows go through F.linear; afterwards the modules are the ones they were (no instance
    forward left behind, even when decoding raises)."""
    from rafale.models import decoding

    model = tiny()
    monkeypatch.setattr(decoding, "WAYS", (way,))
    n = 20
    prompts = {B: torch.randint(0, V, (B, 5), generator=torch.Generator().manual_seed(B)) for B in (1, 2)}
    calls = []  # (rows, way) of every Linear call
    real = decoding._decoding_linear
    def spy(way_, n_rows, weight, weight_t, bias, x):
        rows = x.numel() // x.shape[-1]
        calls.append((rows, way_ if rows == n_rows else "linear"))
        return real(way_, n_rows, weight, weight_t, bias, x)

    monkeypatch.setattr(decoding, "_decoding_linear", spy)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    fast = {B: model.generate(prompt, n) for B, prompt in prompts.items()}
    per_run = n * len(linears)  # every Linear, every step (the head included)
    one, two = calls[:per_run], calls[per_run:]
    assert len(two) == per_run
    # the prompt's 5 rows (the head sees only the last one), then one row a step; with B=2, 10 rows, then 2 a step
    assert {rows for rows, _ in one} == {5, 1} and {rows for rows, _ in two} == {10, 2}
    assert {w for rows, w in one + two if rows in (1, 2)} == {way}
    assert {w for rows, w in one + two if rows > 2} == {"linear"}
    with torch.inference_mode():  # generate's loop without DecodingLinears: F.linear everywhere
        plain = {B: model._decode(prompt, n, None, None, True, 0.0, None, None, None, None)
                 for B, prompt in prompts.items()}
    for B in prompts:
        assert torch.equal(fast[B], plain[B]), B
    assert all("forward" not in m.__dict__ for m in linears)
    monkeypatch.setattr(decoding, "_decoding_linear", real)
    mlp_in = model.layers[0].mlp.up  # (64, 32)
    with pytest.raises(RuntimeError, match="stop"):
        with decoding.DecodingLinears(model, rows=3, steps=100):
            for rows in (3, 9):  # the forced way, then F.linear
                x = torch.randn(rows, 32)
                torch.testing.assert_close(mlp_in(x), torch.nn.functional.linear(x, mlp_in.weight, mlp_in.bias))
            raise RuntimeError("stop")
    assert all("forward" not in m.__dict__ for m in linears)


def test_every_decoder_family_is_declared_by_decoder_family_from_its_differences():
    """Pythia, Llama, Qwen2 and Qwen3 state their config, presets and Hugging Face names; decoder_family makes the
    rest alike (the causal LM builder, the BPE tokenizer, generation, the format's shape), and exports a Decoder as
    its family's architecture only when its config is that family's and its class is exactly Decoder."""
    import dataclasses

    from rafale.models.decoder import Decoder
    from rafale.models.families import FAMILIES
    from rafale.models.family import build_decoder, decoder_family
    from rafale.models.pythia import LAYOUT, VOCAB_ROWS, config_from_hf, config_to_hf

    decoders = {name: f for name, f in FAMILIES.items()
                if f.hf is not None and f.hf.module_files == ("rafale.models.decoder",)}
    assert set(decoders) == {"pythia", "llama", "qwen2", "qwen3"}
    for name, family in decoders.items():
        assert (family.name, family.build, family.heads, family.data, family.can_generate) == (
            family.config.family, build_decoder, ("causal_lm",), {"tokenizer_kind": "bpe"}, True)
        architecture, = family.hf.architectures
        preset = dataclasses.replace(next(iter(family.presets.values())), vocab_size=V)
        assert family.hf.architecture_of(Decoder(preset)) == architecture
        assert family.hf.max_length(preset) == preset.max_position_embeddings
        others = [f.hf.architecture_of(Decoder(preset)) for f in decoders.values() if f is not family]
        assert others == [None, None, None]  # a Llama-shaped config of Qwen2's is Qwen2's, never Llama's

    @dataclasses.dataclass
    class RMSNeoXConfig(DecoderConfig):  # a family that differs from Pythia in its norm alone
        family = "rmsneox"
        norm: str = "rmsnorm"

    family = decoder_family(RMSNeoXConfig, {"rmsneox-tiny": RMSNeoXConfig(hidden_size=32, num_layers=2, num_heads=4)},
                            architecture="GPTNeoXForCausalLM", model_type="gpt_neox", layout=LAYOUT,
                            vocab_rows=VOCAB_ROWS, config_from_hf=config_from_hf, config_to_hf=config_to_hf)
    cfg = RMSNeoXConfig(vocab_size=V, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64)
    assert family.name == "rmsneox" and family.hf.architecture_of(Decoder(cfg)) == "GPTNeoXForCausalLM"
    assert family.hf.architecture_of(type("Variant", (Decoder,), {})(cfg)) is None  # someone's variant
    assert FAMILIES["pythia"].hf.architecture_of(Decoder(cfg)) is None
