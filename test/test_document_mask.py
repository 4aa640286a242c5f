"""data.document_mask: packed documents that do not see each other (rafale/data/causal_lm.py's DocumentMaskCollator,
the decoder's block-diagonal mask in rafale/models/decoder.py)."""

import copy
import math

import pytest
import torch
import yaml

from conftest import run_in_process, write_config
from rafale.config import load_config
from rafale.data import DATAPIPES
from rafale.data.causal_lm import CausalLMCollator, CausalLMDataPipe, DocumentMaskCollator, document_ids_of, positions_in_documents
from rafale.errors import IGNORE_INDEX, ConfigError
from rafale.models import decoder, document_attention
from rafale.models.decoder import Decoder
from rafale.models.families import FAMILIES
from rafale.models.kv_cache import KVCache
from rafale.resolve import resolve_model_config
from rafale.run_folder import DOCUMENT_MASK_NOTE

pytestmark = pytest.mark.usefixtures("one_thread")

V, EOS = 101, 0
DEBUG_PRESETS = {"pythia": "pythia-debug", "llama": "llama-debug", "qwen2": "qwen2-debug", "qwen3": "qwen3-debug"}


def debug_decoder(family: str) -> Decoder:
    cfg = copy.deepcopy(FAMILIES[family].presets[DEBUG_PRESETS[family]])
    cfg.vocab_size = V
    torch.manual_seed(0)
    model = Decoder(cfg).eval()
    with torch.no_grad():  # norms and biases off their init, so that every part matters
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def three_documents() -> list[torch.Tensor]:
    """Three documents of a packed block, the first two ended by the end-of-text token, the last cut by the block."""
    g = torch.Generator().manual_seed(1)
    docs = [torch.randint(1, V, (n,), generator=g) for n in (6, 9, 5)]
    return [torch.cat([docs[0], torch.tensor([EOS])]), torch.cat([docs[1], torch.tensor([EOS])]), docs[2]]


@pytest.mark.parametrize("family", list(DEBUG_PRESETS))
def test_packed_block_gives_each_documents_logits_alone(family):
    model = debug_decoder(family)
    docs = three_documents()
    block = torch.cat(docs)[None]  # (1, T)
    document_ids = document_ids_of(block, EOS)
    with torch.no_grad():
        packed = model(block, position_ids=positions_in_documents(document_ids), document_ids=document_ids)
        unmasked = model(block)
        start = 0
        for doc in docs:
            alone = model(doc[None])  # (1, n, V)
            torch.testing.assert_close(packed[:, start : start + len(doc)], alone, atol=1e-5, rtol=0)
            start += len(doc)
    # without the mask the later documents see the earlier ones: the check above can fail
    later = slice(len(docs[0]), block.shape[1])
    assert (unmasked[:, later] - packed[:, later]).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["pythia", "llama"])
def test_generation_is_one_document_and_unchanged(family):
    """Generation takes no document ids: a single document's ids change nothing, and a KV cache refuses them."""
    model = debug_decoder(family)
    ids = torch.randint(1, V, (2, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        one_document = torch.zeros_like(ids)
        torch.testing.assert_close(model(ids, document_ids=one_document), model(ids), atol=1e-6, rtol=0)
        generated = model.generate(ids, max_new_tokens=6)
        uncached = model.generate(ids, max_new_tokens=6, use_cache=False)
        assert torch.equal(generated, uncached)
        assert torch.equal(model(generated[:, :-1])[:, 9:].argmax(-1), generated[:, 10:])
        with pytest.raises(ValueError, match="document_ids"):
            model(ids, kv_cache=KVCache(model.cfg, 2, 16), document_ids=one_document)


def test_collator_by_hand():
    # block 1 starts inside a document (the stream was cut there): that part is document 0
    block_1 = [5, 6, EOS, 7, 8, 9, EOS, 3, 4]
    block_2 = [7, EOS, 8]  # the short last block, padded
    examples = [{"input_ids": torch.tensor(block)} for block in (block_1, block_2)]  # as the dataset gives them
    batch = DocumentMaskCollator(pad_token_id=1, document_end_id=EOS)(examples)
    I = IGNORE_INDEX
    assert batch["input_ids"].tolist() == [block_1, [7, EOS, 8, 1, 1, 1, 1, 1, 1]]
    assert batch["document_ids"][0].tolist() == [0, 0, 0, 1, 1, 1, 1, 2, 2]
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 0, 1, 2, 3, 0, 1]
    # the end-of-text is predicted from its document; the token after it is not predicted from the end-of-text
    assert batch["labels"][0].tolist() == [6, EOS, I, 8, 9, EOS, I, 4, I]
    assert batch["document_ids"][1, :3].tolist() == [0, 0, 1]
    assert batch["position_ids"][1, :3].tolist() == [0, 1, 0]
    assert batch["labels"][1].tolist() == [EOS, I, I, I, I, I, I, I, I]
    # without the mask: the same input_ids, every label scored, no document ids
    plain = CausalLMCollator(pad_token_id=1)(examples[:1])
    assert plain["labels"][0].tolist() == [6, EOS, 7, 8, 9, EOS, 3, 4, I] and "document_ids" not in plain


class OtherDecoderTask(CausalLMDataPipe):
    """A task of someone's own that trains the causal-LM head: its collator is not known to find documents."""

    name = "other_lm"


@pytest.mark.parametrize("model_type, task", [("bert", None), ("roberta", "classification"), ("clip", None),
                                              ("pythia", "other_lm")])
def test_refused_for_a_family_or_task_that_cannot_use_it(tmp_path, monkeypatch, model_type, task):
    monkeypatch.setitem(DATAPIPES, "other_lm", OtherDecoderTask)
    path = write_config(tmp_path / "cfg.yaml", model={"type": model_type, "preset": ...,
                                                      **({"task": task} if task else {})},
                        data={"document_mask": True})
    with pytest.raises(ConfigError, match="data.document_mask") as err:
        resolve_model_config(load_config(path))
    assert "\n" not in str(err.value)


def test_refused_before_any_data_is_prepared(tmp_path, cache_dir, capsys, monkeypatch):
    path = write_config(tmp_path / "cfg.yaml", model={"type": "bert", "preset": ...}, data={"document_mask": True},
                        run={"output_dir": str(tmp_path / "runs")})
    before = sorted(cache_dir.rglob("*"))
    code, out, err = run_in_process(["-c", str(path)], capsys, monkeypatch)
    assert code != 0
    assert [line for line in err.splitlines() if "data.document_mask" in line] != []
    assert sorted(cache_dir.rglob("*")) == before and not (tmp_path / "runs").exists()


def test_debug_run_with_document_mask_records_it(tmp_path, cache_dir, capsys, monkeypatch):
    """`rafale -c test/pythia_debug.yaml data.document_mask=true` trains, evaluates, exports and records the setting."""
    path = write_config(tmp_path / "cfg.yaml", run={"output_dir": str(tmp_path / "runs")},
                        training={"max_duration": "4ba", "eval_interval": "4ba", "save_interval": "4ba"})
    code, out, err = run_in_process(["-c", str(path), "data.document_mask=true"], capsys, monkeypatch)
    assert code in (0, None), err
    run_dir = next((tmp_path / "runs").iterdir())
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["data"]["document_mask"] is True
    assert "metrics/eval/LanguageCrossEntropy" in (run_dir / "metrics.jsonl").read_text()
    # the export is proven as any other (one sequence a row) and says what transformers does not reproduce
    assert "rafale: export checked" in out and DOCUMENT_MASK_NOTE in out
    assert (run_dir / "export" / "config.json").is_file()
    # the collator reads it while training: a resume may not change it (half a run masked, half not)
    code, out, err = run_in_process(["-c", str(path), "data.document_mask=false", "training.max_duration=8ba"],
                                    capsys, monkeypatch)
    assert code not in (0, None) and "data.document_mask was True, now False" in out + err, out + err


def test_flex_attention_mask_is_the_block_diagonal_causal_one(monkeypatch):
    """The GPU path's mask (flex attention's block mask from the document ids), run eagerly on the CPU (the compiled
    kernel needs CUDA, which these tests do not have), against SDPA with allowed_keys' boolean mask."""
    from torch.nn.attention.flex_attention import flex_attention

    monkeypatch.setattr(document_attention, "_compiled_flex", flex_attention)
    g = torch.Generator().manual_seed(3)
    B, nh, nkv, T, hs = 2, 4, 2, 20, 8  # grouped-query: two query heads per key/value head
    q = torch.randn(B, nh, T, hs, generator=g)  # (B, nh, T, hs)
    k, v = torch.randn(2, B, nkv, T, hs, generator=g)  # (B, nkv, T, hs) each
    document_ids = document_ids_of(torch.randint(0, 5, (B, T), generator=g), 0)
    flex = document_attention.document_flex_attention(q, k, v, decoder.Span(0, T, document_ids=document_ids), scale=None,
                                                      enable_gqa=True)
    mask = decoder.allowed_keys(decoder.Span(0, T, document_ids=document_ids))  # (B, 1, T, T)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(flex, sdpa, atol=1e-5, rtol=0)


def test_bits_per_byte_counts_only_the_scored_labels_bytes():
    """The cross-boundary label is not scored, so neither its nats nor its bytes count (nor the prefix-space byte
    BitsPerByte takes off a document's first token, which is that label)."""
    from rafale.models.metrics import BitsPerByte

    table = torch.arange(V) % 4  # each id's UTF-8 length; the end-of-text (id 0) covers no text
    block = torch.tensor([5, 6, EOS, 7, 9, EOS, 3, 4])
    batch = DocumentMaskCollator(pad_token_id=1, document_end_id=EOS)([{"input_ids": block}])
    metric = BitsPerByte(table, document_end_id=EOS)
    metric.update(torch.zeros(1, len(block), V), batch["labels"], batch["input_ids"])
    scored = [6, EOS, 9, EOS, 4]  # by hand: the labels 7 and 3 (after an end-of-text) and the last are not scored
    assert metric.bytes.item() == int(table[scored].sum())
    assert metric.nats.item() == pytest.approx(len(scored) * math.log(V))


def test_score_attends_as_validation_does():
    """`rafale score` on a document-masked run batches with its collator and runs the model with the batch's document
    and position ids: the same nats as the masked forward pass, not the unmasked one."""
    from datasets import Dataset

    from rafale.commands.score import score_blocks

    model = debug_decoder("llama")
    block = torch.cat(three_documents())
    blocks = Dataset.from_dict({"input_ids": [block.tolist()]})
    collator = DocumentMaskCollator(pad_token_id=1, document_end_id=EOS)
    score = score_blocks(model, blocks, [[1] * len(block)], 1, collator, 4, V)
    batch = collator([{"input_ids": block}])
    scored = batch["labels"] != IGNORE_INDEX
    with torch.no_grad():
        for packed, equal in ((dict(position_ids=batch["position_ids"], document_ids=batch["document_ids"]), True),
                              ({}, False)):
            logits = model(batch["input_ids"], **packed)
            nats = torch.nn.functional.cross_entropy(logits[scored], batch["labels"][scored], reduction="sum")
            assert (score.nats == pytest.approx(float(nats), rel=1e-5)) is equal
    assert score.tokens == int(scored.sum()) == len(block) - 3  # the last token and the two after an end-of-text
