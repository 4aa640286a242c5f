"""`rafale models` (rafale/commands/models.py): each preset's sizes and parameter counts, checked against counts made
another way (a real model on the CPU summed by parameter name, the GPT-NeoX formula by hand, the published totals
of the Hugging Face models whose sizes the presets copy), its family filter, --vocab-size and its errors."""

import copy
import csv
import io

import pytest

from conftest import run_in_process
from rafale.models.families import FAMILIES
from rafale.commands.models import preset_size, preset_sizes

pytestmark = pytest.mark.usefixtures("one_thread")


def count_by_name(family: str, preset: str, vocab_size: int) -> tuple[int, int]:
    """(N, total) of the preset built for real on the CPU: every parameter once, N without the token embedding and
    the output head, recognised by their names in rafale's Decoder (`embed.`, `head.`)."""
    cfg = copy.deepcopy(FAMILIES[family].presets[preset])
    cfg.vocab_size = vocab_size
    module = FAMILIES[family].hf.module(cfg, "causal_lm")
    named = dict(module.named_parameters())  # a tied head is listed once, under the embedding's name
    non_embedding = sum(p.numel() for name, p in named.items() if not name.startswith(("embed.", "head.")))
    return non_embedding, sum(p.numel() for p in named.values())


@pytest.mark.parametrize("family, preset", [("pythia", "pythia-debug"), ("llama", "llama-debug")])
def test_counts_equal_the_model_built_on_the_cpu_and_counted_by_name(family, preset):
    size = preset_size(FAMILIES[family], preset, vocab_size=300)
    assert (size.non_embedding, size.total) == count_by_name(family, preset, 300)


def test_pythia_debug_n_equals_the_gpt_neox_formula():
    # per layer: fused q/k/v and the output projection with biases (4h^2 + 4h), the MLP up and down with biases
    # (2hi + i + h), two LayerNorms (4h); then the final LayerNorm (2h). pythia-debug: h 64, i 256, 2 layers
    h, i, layers = 64, 256, 2
    by_hand = layers * (4 * h * h + 4 * h + 2 * h * i + i + h + 4 * h) + 2 * h
    assert preset_size(FAMILIES["pythia"], "pythia-debug").non_embedding == by_hand == 100_096


@pytest.mark.parametrize("family, preset, total, head", [
    ("pythia", "pythia-70m", 70_426_624, "untied"),  # EleutherAI/pythia-70m: 50304 rows, its own embed_out
    ("qwen2", "qwen2.5-0.5b", 494_032_768, "tied"),  # Qwen/Qwen2.5-0.5B: 151936 rows, tie_word_embeddings
])
def test_real_presets_have_their_published_totals(family, preset, total, head):
    size = next(s for s in preset_sizes([family]) if s.preset == preset)
    assert (size.total, size.head, size.vocab_from_tokenizer) == (total, head, False)


def test_vocab_size_changes_the_total_by_the_vocabulary_matrices_only():
    pythia = FAMILIES["pythia"]
    preset, wider = preset_size(pythia, "pythia-70m"), preset_size(pythia, "pythia-70m", vocab_size=50304 + 64)
    assert wider.non_embedding == preset.non_embedding
    assert wider.total - preset.total == 2 * 64 * 512  # the embedding's and the untied head's new rows
    llama = FAMILIES["llama"]
    assert (preset_size(llama, "llama-tiny", vocab_size=4096 + 64).total - preset_size(llama, "llama-tiny").total
            == 64 * 128)  # tied: one matrix


def test_the_command_filters_by_family_and_prints_csv(capsys, monkeypatch):
    code, out, err = run_in_process(["models", "llama", "qwen3", "--csv", "--vocab-size", "1000"], capsys, monkeypatch)
    assert code == 0, err
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [(r["family"], r["preset"]) for r in rows] == (
        [("llama", p) for p in FAMILIES["llama"].presets] + [("qwen3", p) for p in FAMILIES["qwen3"].presets])
    assert {r["vocab"] for r in rows} == {"1000"}
    tiny = next(r for r in rows if r["preset"] == "llama-tiny")
    assert (tiny["layers"], tiny["hidden"], tiny["heads/kv"], tiny["intermediate"], tiny["head"]) == (
        "4", "128", "4/2", "384", "tied")


def test_the_table_lists_every_preset_and_marks_the_tokenizers_vocabulary(capsys, monkeypatch):
    code, out, err = run_in_process(["models"], capsys, monkeypatch)
    assert code == 0, err
    lines = out.splitlines()
    presets = [line.split()[1] for line in lines[1:] if line.split()[0] in FAMILIES]
    assert presets == [p for family in FAMILIES.values() for p in family.presets]
    assert "pythia-tiny" in lines[1] and "4096*" in lines[1] and lines[-1].startswith("* the preset takes")


def test_an_unknown_family_is_one_error_listing_the_families(capsys, monkeypatch):
    code, out, err = run_in_process(["models", "lama"], capsys, monkeypatch)
    assert code == 2 and out == ""
    assert err.strip().splitlines() == [f"rafale: error: no model family 'lama'; the families are {', '.join(FAMILIES)}"]


def test_a_clip_preset_counts_at_a_vocabulary_below_its_end_of_text_id():
    # clip-vit-b-16's eos_token_id 49407 is its tokenizer's; a run takes its own tokenizer's, so counting at 32000
    # rows must not refuse it, and the total moves by the token table alone
    clip = FAMILIES["clip"]
    base, smaller = preset_size(clip, "clip-vit-b-16"), preset_size(clip, "clip-vit-b-16", vocab_size=32000)
    assert smaller.non_embedding == base.non_embedding
    assert base.total - smaller.total == (49408 - 32000) * 512
