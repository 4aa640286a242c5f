"""The lm-evaluation-harness adapter gives the scores of lm-eval's own HF model on the exported weights."""

import json

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("transformers")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from rafale.config import DataConfig, RafaleError  # noqa: E402
from rafale.data.causal_lm import CausalLMDataPipe  # noqa: E402
from rafale.commands.lm_eval import RafaleLM  # noqa: E402
from rafale.models.decoder import DecoderConfig, GPTNeoX  # noqa: E402
from rafale.models.hf import save_pretrained  # noqa: E402
from conftest import run_in_process, write_lm_eval_task  # noqa: E402


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lm")
    cfg = DataConfig(vocab_size=300, block_size=32, num_train_stories=100, num_val_stories=10,
                     cache_dir=str(folder / "cache"), num_proc=1)
    tokenizer = CausalLMDataPipe(cfg).load(verbose=False).tokenizer
    torch.manual_seed(0)
    model = GPTNeoX(DecoderConfig(vocab_size=320, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                                  max_position_embeddings=64)).eval()
    for p in model.parameters():  # far from init, so that scores differ clearly between choices
        torch.nn.init.normal_(p, std=0.3)
    save_pretrained(model, folder / "export", tokenizer=tokenizer, vocab_size=300)
    # the run's model is padded to 320 rows; the adapter sees the tokenizer's 300, as the export does
    return model.shrink_vocab(300), tokenizer, folder / "export"


def requests(kind, args):
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def test_loglikelihoods_equal_lm_evals_hf_model(exported):
    model, tokenizer, folder = exported
    ours, theirs = RafaleLM(model, tokenizer, batch_size=3), HFLM(pretrained=str(folder), device="cpu", batch_size=3)
    pairs = [("Once upon a time", " there was a dog."), ("The cat sat ", "on the mat"), ("", "Lily smiled."),
             ("She said", ' "hello!"'), ("A long story " * 20, "ends here")]  # the last is cut to the context
    a = ours.loglikelihood(requests("loglikelihood", pairs))
    b = theirs.loglikelihood(requests("loglikelihood", pairs))
    for (lp_a, greedy_a), (lp_b, greedy_b) in zip(a, b):
        assert lp_a == pytest.approx(lp_b, abs=1e-3) and greedy_a == greedy_b
    texts = [("Once upon a time there was a little dog named Max. " * 8,), ("Tom and Lily played.",)]
    rolled_a = ours.loglikelihood_rolling(requests("loglikelihood_rolling", texts))
    rolled_b = theirs.loglikelihood_rolling(requests("loglikelihood_rolling", texts))
    assert rolled_a == pytest.approx(rolled_b, abs=1e-3)
    generated = ours.generate_until(requests("generate_until", [("Once upon a time", {"until": ["."], "max_gen_toks": 10})]))
    assert len(generated) == 1 and "." not in generated[0]


def test_a_local_task_scores_the_same_through_the_adapter_and_hf(exported, tmp_path, capsys, monkeypatch):
    model, tokenizer, folder = exported
    data = [{"question": f"Story {i}: the dog was", "choices": [" happy", " sad", " big"], "answer": i % 3}
            for i in range(12)]
    write_lm_eval_task(tmp_path, "rafale_toy", data)
    manager = TaskManager(include_path=str(tmp_path))
    ours = lm_eval.simple_evaluate(model=RafaleLM(model, tokenizer), tasks=["rafale_toy"], task_manager=manager)
    theirs = lm_eval.simple_evaluate(model=HFLM(pretrained=str(folder), device="cpu"), tasks=["rafale_toy"],
                                     task_manager=manager)
    assert ours["results"]["rafale_toy"]["acc,none"] == theirs["results"]["rafale_toy"]["acc,none"]

    out = tmp_path / "results.json"
    code, printed, err = run_in_process(["lm-eval", str(folder), "--tasks", "rafale_toy", "--include-path",
                                         str(tmp_path), "--out", str(out)], capsys, monkeypatch)
    assert code == 0, err[-2000:]
    assert "rafale_toy" in printed
    assert json.loads(out.read_text())["rafale_toy"]["acc,none"] == ours["results"]["rafale_toy"]["acc,none"]


def test_generation_crops_the_context_as_lm_evals_hf_model(exported):
    model, tokenizer, folder = exported
    ours, theirs = RafaleLM(model, tokenizer), HFLM(pretrained=str(folder), device="cpu", batch_size=1)
    long = "Once upon a time there was a little dog named Max who liked to run. " * 6  # far over the 64-token context
    args = [(long, {"until": ["\n\n"], "max_gen_toks": 10}), ("Tom and Lily", {"until": ["."], "max_gen_toks": 20})]
    assert ours.generate_until(requests("generate_until", args)) == theirs.generate_until(requests("generate_until", args))


def test_max_gen_toks_over_the_context_is_capped_and_said(exported, capsys):
    model, tokenizer, _ = exported
    lm = RafaleLM(model, tokenizer)
    long = "Once upon a time there was a little dog. " * 20
    # lm-eval's default max_gen_toks (256) is over this model's 64 tokens of context
    (text,) = lm.generate_until(requests("generate_until", [(long, {"until": ["\n\n\n\n"]})]))
    assert "generating at most 63" in capsys.readouterr().out
    last_token = torch.tensor([lm.tok_encode(long)[-1:]])
    expected = model.generate(last_token, 63, eos_token_id=lm.eot_token_id)[0, 1:].tolist()
    assert text == tokenizer.decode([t for t in expected if t != lm.eot_token_id]).split("\n\n\n\n")[0]


def test_generation_honours_the_sampling_arguments(exported):
    model, tokenizer, _ = exported
    lm = RafaleLM(model, tokenizer)
    prompts = ["Once upon a time", "The cat", "Lily saw a", "Tom ran to the"]
    sampling = {"until": [], "max_gen_toks": 12, "do_sample": True, "temperature": 0.9, "top_k": 50, "top_p": 0.95,
                "seed": 7}
    sampled = lm.generate_until(requests("generate_until", [(p, sampling) for p in prompts]))
    expected = []
    for prompt in prompts:
        ids = torch.tensor([lm.tok_encode(prompt)])
        tokens = model.generate(ids, 12, eos_token_id=lm.eot_token_id, temperature=0.9, top_k=50, top_p=0.95,
                                generator=torch.Generator().manual_seed(7))[0, ids.shape[1]:].tolist()
        expected.append(tokenizer.decode([t for t in tokens if t != lm.eot_token_id]))
    assert sampled == expected
    greedy = lm.generate_until(requests("generate_until", [(p, sampling | {"do_sample": False}) for p in prompts]))
    assert greedy != sampled  # do_sample=False decodes greedily, whatever the temperature
    assert greedy == lm.generate_until(requests("generate_until", [(p, {"until": [], "max_gen_toks": 12}) for p in prompts]))


def test_unsupported_generation_arguments_are_refused(exported):
    model, tokenizer, _ = exported
    with pytest.raises(RafaleError, match="num_beams"):
        RafaleLM(model, tokenizer).generate_until(requests("generate_until", [("Once", {"until": ["."], "num_beams": 4})]))


def test_rolling_loglikelihood_gives_bits_per_byte_equal_to_lm_evals(exported, tmp_path, capsys, monkeypatch):
    """A perplexity task: rafale prints bits per byte, which must equal lm-eval's own bits_per_byte metric."""
    model, tokenizer, folder = exported
    texts = [f"Story {i}: Tom had a red ball. The dog was happy and ran to the park." for i in range(6)]
    (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in texts))
    (tmp_path / "docs.yaml").write_text(f"""task: rafale_docs
dataset_path: json
dataset_kwargs:
  data_files:
    test: {tmp_path / "docs.jsonl"}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: bits_per_byte
""")
    out = tmp_path / "results.json"
    code, printed, err = run_in_process(["lm-eval", str(folder), "--tasks", "rafale_docs", "--include-path",
                                         str(tmp_path), "--out", str(out)], capsys, monkeypatch)
    assert code == 0, err[-2000:]
    results = json.loads(out.read_text())
    ours = results["rafale_rolling"]["bits_per_byte"]
    assert results["rafale_rolling"]["bytes"] == sum(len(t.encode()) for t in texts)
    assert ours == pytest.approx(results["rafale_docs"]["bits_per_byte,none"], rel=1e-6)
    assert f"{ours:.4f} bits per byte" in printed
