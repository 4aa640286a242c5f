"""The Llama, Qwen2 and Qwen3 families against transformers' LlamaForCausalLM, Qwen2ForCausalLM and
Qwen3ForCausalLM, both ways: a random HF model loaded by rafale and a random rafale model exported and loaded by
transformers give the same logits (fp32, 1e-5, with left padding); greedy decoding with rafale's grouped-query KV
cache equals HF's generate and rafale's own decoding without a cache; a real checkpoint's folder shape (sharded
safetensors, an index, tied weights written once) loads. Shapes held out from the presets: GQA ratios 1, 2 and 4 and
one KV head, tied and untied heads, rope bases 10,000 and 1,000,000, Qwen2's biases on q, k and v alone (random, like
every weight), Qwen3 heads wider than hidden_size / num_heads."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from conftest import randomize_  # noqa: E402
from rafale.models.decoder import Decoder  # noqa: E402
from rafale.models.kv_cache import KVCache  # noqa: E402
from rafale.models.hf import from_pretrained, save_pretrained  # noqa: E402
from rafale.models.llama import LlamaConfig  # noqa: E402
from rafale.models.qwen2 import Qwen2Config  # noqa: E402
from rafale.models.qwen3 import Qwen3Config  # noqa: E402

VOCAB = 96
# (architecture, num_heads, num_kv_heads, tied, rope base, head_dim)
CASES = [
    ("LlamaForCausalLM", 4, 4, False, 10_000.0, None),  # multi-head (ratio 1), untied
    ("LlamaForCausalLM", 4, 2, True, 1_000_000.0, None),  # ratio 2, tied
    ("Qwen3ForCausalLM", 8, 2, False, 1_000_000.0, 16),  # ratio 4, heads of 16 on a 48-wide residual
    ("Qwen3ForCausalLM", 4, 1, True, 10_000.0, None),  # one KV head (multi-query), tied
    ("Qwen2ForCausalLM", 4, 2, True, 1_000_000.0, None),  # q, k and v biases, no output bias; ratio 2, tied
    ("Qwen2ForCausalLM", 4, 1, False, 1_000_000.0, None),  # the same, one KV head, untied
]
IDS = [f"{a[:5]}-{h}h{kv}kv-{'tied' if t else 'untied'}-{int(b)}" for a, h, kv, t, b, _ in CASES]
CONFIG_CLASSES = {"LlamaForCausalLM": LlamaConfig, "Qwen2ForCausalLM": Qwen2Config, "Qwen3ForCausalLM": Qwen3Config}


pytestmark = pytest.mark.usefixtures("one_thread")  # test/conftest.py


def hf_model(architecture, heads, kv_heads, tied, base, head_dim, seed=0):
    config_class = getattr(transformers, architecture.replace("ForCausalLM", "Config"))
    # Qwen2's config has no head_dim (its heads are hidden_size / num_heads wide)
    sizes = {} if architecture == "Qwen2ForCausalLM" else {"head_dim": head_dim or 32 // heads}
    config = config_class(vocab_size=VOCAB, hidden_size=48 if head_dim else 32, intermediate_size=80,
                          num_hidden_layers=2, num_attention_heads=heads, num_key_value_heads=kv_heads,
                          max_position_embeddings=64, tie_word_embeddings=tied,
                          rope_parameters={"rope_type": "default", "rope_theta": base}, rms_norm_eps=1e-6,
                          bos_token_id=None, eos_token_id=None, pad_token_id=None, **sizes)
    torch.manual_seed(seed)
    model = getattr(transformers, architecture)(config).eval()
    randomize_(model, seed)
    return model


def rafale_model(architecture, heads, kv_heads, tied, base, head_dim, seed=0):
    torch.manual_seed(seed)
    cfg = CONFIG_CLASSES[architecture](vocab_size=VOCAB, hidden_size=48 if head_dim else 32, intermediate_size=80,
                                       num_layers=2, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
                                       max_position_embeddings=64, tie_embeddings=tied, rotary_base=base,
                                       layer_norm_eps=1e-6)
    model = Decoder(cfg).eval()
    randomize_(model, seed)
    return model


def padded_batch(seed=1):
    """(ids (3, 11), mask): rows of 11, 7 and 3 real tokens, left-padded."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (3, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :4], mask[2, :8] = 0, 0
    return ids, mask


def assert_same_logits(ours, hf):
    ids, mask = padded_batch()
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=mask).logits
        mine = ours(ids, attention_mask=mask)
    real = mask.bool()  # padding positions compute nothing anyone reads
    torch.testing.assert_close(mine[real], theirs[real], atol=1e-5, rtol=0)
    return (mine[real] - theirs[real]).abs().max().item()


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_hf_to_rafale_and_rafale_to_hf_logits(tmp_path, case):
    hf = hf_model(*case)
    hf.save_pretrained(tmp_path / "hf")
    ours = from_pretrained(tmp_path / "hf")
    assert type(ours) is Decoder and type(ours.cfg) is CONFIG_CLASSES[case[0]]
    assert ours.cfg.kv_heads == case[2] and ours.cfg.tie_embeddings == case[3] and ours.cfg.rotary_base == case[4]
    assert (ours.head.weight is ours.embed.weight) == case[3]
    assert_same_logits(ours, hf)

    mine = rafale_model(*case, seed=1)
    save_pretrained(mine, tmp_path / "rafale")
    written = json.loads((tmp_path / "rafale" / "config.json").read_text())
    assert written["architectures"] == [case[0]] and written["num_key_value_heads"] == case[2]
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "rafale").eval()
    assert type(loaded).__name__ == case[0]
    assert_same_logits(mine, loaded)


@pytest.mark.parametrize("case", [CASES[1], CASES[2], CASES[5]], ids=[IDS[1], IDS[2], IDS[5]])
def test_greedy_generation_with_the_gqa_cache_equals_hf_generate(case):
    hf = hf_model(*case)
    ours = rafale_model(*case)
    ours.load_state_dict(from_state_of(hf, ours))
    ids, mask = padded_batch()
    theirs = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=20, do_sample=False, min_new_tokens=20)
    mine = ours.generate(ids, 20, attention_mask=mask)
    assert torch.equal(mine, theirs)
    assert torch.equal(ours.generate(ids, 20, attention_mask=mask, use_cache=False), mine)


def from_state_of(hf, ours):
    """HF's tensors in rafale's names, through the family's own import (the map under test in the other tests)."""
    from rafale.models.families import FAMILIES

    family = FAMILIES[ours.cfg.family]
    return family.hf.load(ours, hf.state_dict(), type(hf).__name__, "the HF model")


def test_the_gqa_cache_holds_the_kv_heads_and_equals_recomputation():
    ours = rafale_model(*CASES[2])  # 8 query heads, 2 KV heads
    cfg = ours.cfg
    ids = torch.randint(0, VOCAB, (2, 12))
    cache = KVCache(cfg, batch_size=2, max_len=12)
    assert cache.k.shape == (cfg.num_layers, 2, 2, 12, 16)  # (L, B, nkv, max_len, hs): KV heads, not 8 query heads
    with torch.no_grad():
        full = ours(ids)  # (2, 12, V)
        steps = [ours(ids[:, :5], kv_cache=cache)] + [ours(ids[:, t:t + 1], kv_cache=cache) for t in range(5, 12)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)


def test_a_sharded_tied_checkpoint_loads(tmp_path):
    """The shape of a real Hugging Face folder: several safetensors shards, an index, the tied head written once."""
    hf = hf_model(*CASES[1])
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # sharded
    assert "lm_head.weight" not in index["weight_map"] and "model.embed_tokens.weight" in index["weight_map"]
    ours = from_pretrained(tmp_path)
    assert ours.head.weight is ours.embed.weight
    assert_same_logits(ours, hf)
    # and rafale writes the tied tensor once too
    save_pretrained(ours, tmp_path / "again")
    from safetensors.torch import load_file

    assert "lm_head.weight" not in load_file(tmp_path / "again" / "model.safetensors")



def test_every_problem_with_the_split_qkv_is_named(tmp_path):
    """q_proj, k_proj and v_proj fill one rafale tensor: a missing or mis-shaped one is named, as any other."""
    from safetensors.torch import load_file, save_file

    from rafale.models.hf import WeightsError

    hf_model(*CASES[1]).save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    tensors["model.layers.0.self_attn.v_proj.weight"] = torch.zeros(8, 32)
    tensors["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(32)  # attention_bias is false
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(WeightsError) as err:
        from_pretrained(tmp_path)
    message = str(err.value)
    assert "missing: model.layers.1.self_attn.k_proj.weight" in message
    assert "model.layers.0.self_attn.v_proj.weight (expected (16, 32), found (8, 32))" in message
    assert "unexpected: model.layers.0.self_attn.q_proj.bias" in message



def test_a_qwen2_config_with_sliding_window_attention_is_refused(tmp_path):
    """rafale attends to every position: a Qwen2 that turns on its sliding window is not the model rafale computes."""
    from rafale.models.hf import WeightsError

    hf_model(*CASES[4]).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config | {"use_sliding_window": True, "sliding_window": 4}))
    with pytest.raises(WeightsError, match="use_sliding_window must be false"):
        from_pretrained(tmp_path)

# ----------------------------------------------------------------------------------------------------
# Through the command line: what a Pythia run can do, a Llama, a Qwen2 and a Qwen3 run do


def test_a_llama_run_trains_resumes_exports_generates_scores_and_runs_lm_eval(tmp_path, cache_dir, capsys, monkeypatch):
    from conftest import run_in_process, write_config, write_lm_eval_task
    from rafale.run_folder import latest_checkpoint, read_checkpoint_weights

    def train(name, batches):
        cfg = write_config(tmp_path / f"{name}.yaml", base="llama_debug.yaml",
                           run={"output_dir": str(tmp_path / "runs"), "name": name},
                           training={"max_duration": f"{batches}ba", "eval_interval": "4ba", "save_interval": "4ba"})
        code, out, err = run_in_process(["-c", str(cfg)], capsys, monkeypatch)
        assert code == 0, err[-3000:]
        return out

    train("whole", 8)
    train("halves", 4)
    out = train("halves", 8)  # the same run, longer: resumes at batch 4
    assert "resumed" in out and "at batch 4" in out, out
    whole, halves = tmp_path / "runs" / "whole", tmp_path / "runs" / "halves"
    a, b = (read_checkpoint_weights(latest_checkpoint(d)) for d in (whole, halves))
    assert "layers.0.attn.qkv.weight" in a and all(torch.equal(a[k], b[k]) for k in a), "resume changed the weights"
    summary = json.loads((whole / "summary.json").read_text())
    assert summary["model"] == "llama llama-debug" and summary["tokens"] > 0

    # the export is a LlamaForCausalLM with the run's logits
    export = whole / "export"
    hf = transformers.AutoModelForCausalLM.from_pretrained(export).eval()
    assert type(hf).__name__ == "LlamaForCausalLM" and hf.config.num_key_value_heads == 2
    ids = torch.randint(0, 500, (2, 16))
    torch.testing.assert_close(from_pretrained(export)(ids), hf(ids).logits, atol=1e-5, rtol=0)

    for args in (["generate", str(whole), "--prompt", "Once upon a time", "--max-new-tokens", "8"],
                 ["generate", str(export), "--prompt", "Once upon a time", "--max-new-tokens", "8"]):
        code, out, err = run_in_process(args, capsys, monkeypatch)
        assert code == 0 and out.startswith("Once upon a time") and len(out) > len("Once upon a time "), err
    (tmp_path / "held-out.txt").write_text("Once upon a time, there was a little dog. The dog was happy.\n")
    code, out, err = run_in_process(["score", str(whole), "--file", str(tmp_path / "held-out.txt")], capsys, monkeypatch)
    assert code == 0, err
    header, row = out.strip().splitlines()[-2:]
    score = dict(zip(header.split(","), row.split(",")))
    assert score["file"] == "held-out.txt" and 0 < float(score["bits_per_byte"]) < 20, out
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    write_lm_eval_task(tasks, "rafale_toy", [
        {"question": f"Story {i}: the dog was", "choices": [" happy", " sad"], "answer": i % 2} for i in range(4)])
    code, out, err = run_in_process(["lm-eval", str(whole), "--tasks", "rafale_toy", "--include-path", str(tasks)],
                                    capsys, monkeypatch)
    assert code == 0 and "rafale_toy" in out, err[-2000:]


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_a_qwen_run_overfits_in_debug(tmp_path, cache_dir, capsys, monkeypatch, family):
    import re

    from conftest import run_in_process, write_config

    cfg = write_config(tmp_path / f"{family}.yaml", base=f"{family}_debug.yaml",
                       run={"output_dir": str(tmp_path / "runs")})
    code, out, err = run_in_process(["-c", str(cfg)], capsys, monkeypatch, env={"DEBUG": "1"})
    assert code == 0, err[-3000:]
    start, end = (float(x) for x in re.search(r"DEBUG: loss on the batch went from ([\d.]+) to ([\d.]+)", out).groups())
    assert end < 0.3 * start, out


def test_a_sweep_over_model_type_trains_and_exports_every_decoder_family(tmp_path, cache_dir, capsys, monkeypatch):
    from conftest import run_in_process, write_config

    cfg = write_config(tmp_path / "qwen2.yaml", base="qwen2_debug.yaml", run={"output_dir": str(tmp_path / "runs")})
    sweep = tmp_path / "sweep"
    code, out, err = run_in_process(["sweep", "-c", str(cfg), "model.type=llama,qwen2,qwen3", "model.preset=null",
                                     "training.max_duration=1ba", f"run.output_dir={sweep}"], capsys, monkeypatch)
    assert code == 0, err[-3000:]
    models = {json.loads(p.read_text())["model"] for p in sweep.glob("*/summary.json")}
    assert models == {"llama", "qwen2", "qwen3"}, models  # each family's first (tiny) preset
    exports = {json.loads(p.read_text())["architectures"][0] for p in sweep.glob("*/export/config.json")}
    assert exports == {"LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"}
    for architecture in exports:  # each export loaded back by transformers with the run's logits (export_proof.py)
        assert f"loads it as {architecture} and gives the same outputs" in out, out[-3000:]
