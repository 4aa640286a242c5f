"""training.activation_checkpointing: each block keeps only its input and is recomputed in the backward pass.
The loss and every gradient equal the plain computation's, while the tensors autograd keeps for the backward pass
shrink (counted with torch's saved-tensor hooks: what a step's activation memory is made of)."""

import pytest
import torch

from rafale.config import config_from_dict
from rafale.errors import ConfigError
from rafale.models.decoder import DecoderConfig, GPTNeoX
from rafale.models.encoder import EncoderConfig, build_encoder
from rafale.run.train import enable_activation_checkpointing


def saved_bytes(fn) -> int:
    """Bytes of the tensors autograd saves for the backward pass while fn() runs."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return total, out


def decoder():
    return GPTNeoX(DecoderConfig(hidden_size=64, num_layers=4, num_heads=4, intermediate_size=256,
                                 max_position_embeddings=64, vocab_size=128))


def encoder():
    return build_encoder(EncoderConfig(family="bert", hidden_size=64, num_layers=4, num_heads=4, intermediate_size=256,
                                       max_position_embeddings=64, vocab_size=128, hidden_dropout=0.0,
                                       attention_dropout=0.0), "mlm")


def loss_of(model, ids):
    if isinstance(model, GPTNeoX):
        return model(ids, labels=ids.roll(-1, 1))
    logits = model(ids, attention_mask=torch.ones_like(ids))
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten())


@pytest.mark.parametrize("make", [decoder, encoder], ids=["pythia", "bert"])
def test_same_loss_and_gradients_with_less_saved_for_backward(make):
    torch.manual_seed(0)
    plain = make().train()
    checkpointed = make().train()
    checkpointed.load_state_dict(plain.state_dict())
    enable_activation_checkpointing(checkpointed, "test")
    ids = torch.randint(0, 128, (4, 64))

    plain_bytes, plain_loss = saved_bytes(lambda: loss_of(plain, ids))
    ckpt_bytes, ckpt_loss = saved_bytes(lambda: loss_of(checkpointed, ids))
    plain_loss.backward()
    ckpt_loss.backward()

    torch.testing.assert_close(ckpt_loss, plain_loss, rtol=0, atol=0)
    for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-7, msg=name)
    # four blocks' intermediates (attention, MLP) are no longer kept: well under half of what plain autograd keeps
    print(f"saved for backward: {plain_bytes:,} B plain, {ckpt_bytes:,} B checkpointed")
    assert ckpt_bytes < 0.5 * plain_bytes


def test_the_config_key_reaches_the_model_and_a_model_without_it_refuses(tmp_path):
    cfg = config_from_dict({"model": {"type": "pythia"}, "training": {"activation_checkpointing": True}})
    assert cfg.training.activation_checkpointing is True
    model = decoder()
    enable_activation_checkpointing(model, "pythia")
    assert model.activation_checkpointing is True
    with torch.no_grad():  # evaluation and generation never recompute
        model.eval()(torch.randint(0, 128, (1, 8)))
    with pytest.raises(ConfigError, match=r"training\.activation_checkpointing.*model.type mlp does not support it"):
        enable_activation_checkpointing(torch.nn.Linear(2, 2), "mlp")


def test_rafale_c_with_the_key_recomputes_every_block(tmp_path, cache_dir, capsys, monkeypatch):
    """Through the real path (`rafale -c`): every block of every training step goes through the checkpoint."""
    import rafale.models.decoder as decoder_module
    from conftest import run_in_process, write_config

    calls, real = [], decoder_module.checkpoint

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(decoder_module, "checkpoint", counting)
    cfg = write_config(tmp_path / "cfg.yaml", run={"output_dir": str(tmp_path / "runs")},
                       training={"max_duration": "2ba", "eval_interval": "2ba", "save_interval": "2ba",
                                 "activation_checkpointing": True})
    code, out, err = run_in_process(["-c", str(cfg)], capsys, monkeypatch)
    assert code == 0, err[-3000:]
    assert len(calls) == 2 * 2  # 2 steps x pythia-debug's 2 layers; evaluation never recomputes
