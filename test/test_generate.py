"""`rafale generate`: greedy and sampled decoding, batching, streaming, and its errors."""

import pytest
import torch

from rafale.config import DataConfig
from rafale.data.causal_lm import CausalLMDataPipe
from rafale.commands.generate import generate_text
from rafale.models.decoder import DecoderConfig, GPTNeoX
from rafale.models.sampling import pick_next_token
from conftest import run_in_process, write_config


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    cfg = DataConfig(vocab_size=300, block_size=32, num_train_stories=100, num_val_stories=10,
                     cache_dir=str(tmp_path_factory.mktemp("cache")), num_proc=1)
    return CausalLMDataPipe(cfg).load(verbose=False).tokenizer


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPTNeoX(DecoderConfig(vocab_size=320, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                                 max_position_embeddings=64)).eval()


PROMPTS = ["Once upon a time", "The dog", "Lily and Tom went to the park to play with a big red ball"]


def test_batched_prompts_give_the_text_of_each_prompt_alone(model, tokenizer):
    batched = generate_text(model, tokenizer, PROMPTS, max_new_tokens=12)
    alone = [generate_text(model, tokenizer, [p], max_new_tokens=12)[0] for p in PROMPTS]
    assert batched == alone
    assert all(text for text in batched)


def test_streamed_pieces_add_up_to_the_text(model, tokenizer):
    pieces = []
    text = generate_text(model, tokenizer, PROMPTS[:1], max_new_tokens=12, stream=pieces.append)[0]
    assert len(pieces) > 1 and "".join(pieces) == text


def test_sampling_is_seeded_and_filters_reduce_to_greedy(model, tokenizer):
    a = generate_text(model, tokenizer, PROMPTS, max_new_tokens=10, temperature=1.0, seed=3)
    b = generate_text(model, tokenizer, PROMPTS, max_new_tokens=10, temperature=1.0, seed=3)
    c = generate_text(model, tokenizer, PROMPTS, max_new_tokens=10, temperature=1.0, seed=4)
    assert a == b != c
    greedy = generate_text(model, tokenizer, PROMPTS, max_new_tokens=10)
    assert generate_text(model, tokenizer, PROMPTS, max_new_tokens=10, temperature=1.0, top_k=1, seed=5) == greedy
    assert generate_text(model, tokenizer, PROMPTS, max_new_tokens=10, temperature=1.0, top_p=1e-6, seed=5) == greedy


def test_top_k_and_top_p_only_sample_allowed_tokens():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]]).expand(2000, 5)
    g = torch.Generator().manual_seed(0)
    assert set(pick_next_token(logits, 1.0, top_k=2, generator=g).tolist()) == {0, 1}
    # probabilities 0.64, 0.24, 0.09, ...: the first two reach 0.8
    assert set(pick_next_token(logits, 1.0, top_p=0.8, generator=g).tolist()) == {0, 1}


def test_generation_stops_at_end_of_text(model, tokenizer):
    eos = tokenizer.token_to_id("<|endoftext|>")
    ids = tokenizer.encode("Once upon a time").ids
    free = model.generate(torch.tensor([ids]), 12)[0, len(ids):].tolist()
    biased = GPTNeoX(model.cfg).eval()
    biased.load_state_dict(model.state_dict())
    with torch.no_grad():  # make end-of-text the likeliest token everywhere
        biased.head.weight[eos] = 0
        biased.head.weight[eos, 0] = 100.0
        biased.norm.bias[0] = 10.0
    assert generate_text(biased, tokenizer, ["Once upon a time"], max_new_tokens=12) == [""]
    assert eos not in free  # the unbiased model does not stop: the empty text above is the stop, not chance


def test_cli_generates_from_a_run_and_from_its_export(tmp_path, cache_dir, capsys, monkeypatch):
    cfg = write_config(tmp_path / "cfg.yaml", run={"output_dir": str(tmp_path / "runs")},
                       training={"max_duration": "10ba", "save_interval": "10ba", "eval_interval": "10ba"})
    code, _, err = run_in_process(["-c", str(cfg)], capsys, monkeypatch)
    assert code == 0, err[-2000:]
    run = tmp_path / "runs" / "pythia-debug"
    outputs = []
    for source in (run, run / "export"):
        code, out, err = run_in_process(["generate", str(source), "--prompt", "Once upon a time", "--max-new-tokens", "8"],
                                        capsys, monkeypatch)
        assert code == 0, err[-2000:]
        assert out.startswith("Once upon a time") and len(out) > len("Once upon a time\n")
        outputs.append(out)
    assert outputs[0] == outputs[1]

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Once upon a time\n\nThe cat\n")
    code, out, err = run_in_process(["generate", str(run), "--prompt-file", str(prompts), "--max-new-tokens", "5"],
                                    capsys, monkeypatch)
    assert code == 0 and out.count("\n\n") == 2 and "The cat" in out

    for args, message in [
        (["--top-p", "0", "--temperature", "1"], "--top-p must be in (0, 1]"),
        (["--top-p", "1.5", "--temperature", "1"], "--top-p must be in (0, 1]"),
        (["--top-k", "5"], "give a --temperature above 0"),
        (["--max-new-tokens", "300"], "longer than the model's context (256 tokens)"),
    ]:
        code, _, err = run_in_process(["generate", str(run), "--prompt", "Hi", *args], capsys, monkeypatch)
        assert code == 2 and message in err, (args, err)
