"""Tests for CLIP and SigLIP (rafale/models/clip.py): parity with tiny random transformers models, the losses
against HF and the papers' formulas, strict weight loading both ways, configs and presets."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
import transformers

from rafale.errors import WeightsError
from rafale.models.clip import ClipConfig, build_model, clip_loss, siglip_loss
from rafale.models.contrastive import (
    CLIP_PRESETS,
    SIGLIP_PRESETS,
    config_from_hf,
    config_to_hf,
    hf_state_dict,
    load_hf_state_dict,
)

VOCAB, PAD = 99, 1
TOWER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37)


def hf_clip(eos_token_id: int, seed: int = 0) -> transformers.CLIPModel:
    """A tiny random CLIPModel; eos_token_id 2 selects HF's legacy pooling at the highest id."""
    torch.manual_seed(seed)
    config = transformers.CLIPConfig(
        vision_config=dict(image_size=32, patch_size=8, **TOWER),
        text_config=dict(vocab_size=VOCAB, max_position_embeddings=16, eos_token_id=eos_token_id, pad_token_id=PAD,
                         bos_token_id=0, **dict(TOWER, num_hidden_layers=3)),
        projection_dim=24,
        logit_scale_init_value=2.0,
    )
    return transformers.CLIPModel(config).eval()


def hf_siglip(seed: int = 0) -> transformers.SiglipModel:
    torch.manual_seed(seed)
    config = transformers.SiglipConfig(
        vision_config=dict(image_size=32, patch_size=8, **TOWER),
        text_config=dict(vocab_size=VOCAB, max_position_embeddings=12, pad_token_id=PAD, bos_token_id=0,
                         eos_token_id=2, projection_size=32, **dict(TOWER, num_hidden_layers=3)),
    )
    model = transformers.SiglipModel(config).eval()
    with torch.no_grad():  # HF's init zeroes both; other values so that they are tested
        model.logit_scale.fill_(1.3)
        model.logit_bias.fill_(-2.5)
    return model


def rafale_from(hf_model):
    cfg = config_from_hf(hf_model.config.to_dict())
    return load_hf_state_dict(build_model(cfg), hf_model.state_dict(), "the HF model").eval()


def images(n: int = 4, seed: int = 0):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def padded_texts(lengths, T: int, eos: int, seed: int = 0):
    """Right-padded ids (B, T): random tokens, `eos` as each row's last real token, then PAD; and the mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB - 1, (len(lengths), T), generator=g)
    mask = (torch.arange(T)[None] < torch.tensor(lengths)[:, None]).long()  # (B, T)
    ids[torch.arange(len(lengths)), torch.tensor(lengths) - 1] = eos
    return ids.masked_fill(mask == 0, PAD), mask


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


# ---------------------------------------------------------------- parity with transformers


@pytest.mark.parametrize("eos_token_id", [VOCAB - 1, 2], ids=["eos-id", "legacy-argmax"])
def test_clip_parity_with_hf(eos_token_id):
    hf = hf_clip(eos_token_id)
    model = rafale_from(hf)
    # legacy configs pool at the highest id: the end-of-text token is then the vocabulary's last
    ids, mask = padded_texts([9, 4, 12, 6], T=12, eos=VOCAB - 1)
    pixels = images()
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=pixels, attention_mask=mask, return_loss=True)
        ref_image = hf.get_image_features(pixel_values=pixels).pooler_output
        ref_text = hf.get_text_features(input_ids=ids, attention_mask=mask).pooler_output
        logits_per_image, logits_per_text = model(pixels, ids, mask)
        assert max_diff(model.get_image_features(pixels), ref_image) <= 1e-5
        assert max_diff(model.get_text_features(ids, mask), ref_text) <= 1e-5
        assert logits_per_image.shape == (4, 4)
        assert max_diff(logits_per_image, ref.logits_per_image) <= 1e-5
        assert max_diff(logits_per_text, ref.logits_per_text) <= 1e-5
        assert abs(model.loss(logits_per_image).item() - ref.loss.item()) <= 1e-5
    # the pooled token is the one the config names: moving the end-of-text token changes the embedding
    moved = ids.clone()
    moved[0, 3] = VOCAB - 1
    with torch.no_grad():
        assert max_diff(model.get_text_features(moved, mask)[0], ref_text[0]) > 1e-3


@pytest.mark.parametrize("with_mask", [False, True], ids=["max-length-no-mask", "attention-mask"])
def test_siglip_parity_with_hf(with_mask):
    """SigLIP's tokenizer pads to max_length and the checkpoints were trained without a mask, so the pooled
    last position is a pad that attends to everything; with an attention_mask HF hides the pad keys instead."""
    hf = hf_siglip()
    model = rafale_from(hf)
    ids, mask = padded_texts([9, 4, 12, 6], T=12, eos=2)  # T = max_position_embeddings: HF's max_length
    mask = mask if with_mask else None
    pixels = images()
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=pixels, attention_mask=mask, return_loss=True)
        ref_image = hf.get_image_features(pixel_values=pixels).pooler_output
        ref_text = hf.get_text_features(input_ids=ids, attention_mask=mask).pooler_output
        logits_per_image, logits_per_text = model(pixels, ids, mask)
        assert max_diff(model.get_image_features(pixels), ref_image) <= 1e-5
        assert max_diff(model.get_text_features(ids, mask), ref_text) <= 1e-5
        assert max_diff(logits_per_image, ref.logits_per_image) <= 1e-5
        assert max_diff(logits_per_text, ref.logits_per_text) <= 1e-5
        assert abs(model.loss(logits_per_image).item() - ref.loss.item()) <= 1e-5


def test_siglip_mask_matters():
    """The two ways of reading padded text differ (so the parity test above checks both paths)."""
    model = rafale_from(hf_siglip())
    ids, mask = padded_texts([4, 6], T=12, eos=2)
    with torch.no_grad():
        assert max_diff(model.get_text_features(ids), model.get_text_features(ids, mask)) > 1e-3


def test_clip_padding_does_not_change_a_text():
    """Independent of HF: a padded row embeds as the same text alone without padding."""
    model = rafale_from(hf_clip(VOCAB - 1))
    ids, mask = padded_texts([5, 12], T=12, eos=VOCAB - 1)
    with torch.no_grad():
        batch = model.get_text_features(ids, mask)
        alone = model.get_text_features(ids[:1, :5])
    assert max_diff(batch[0], alone[0]) <= 1e-5


# ---------------------------------------------------------------- losses


def test_clip_loss_is_symmetric_infonce():
    logits = torch.randn(5, 5, generator=torch.Generator().manual_seed(1)) * 3
    # written plainly: -log softmax of the matching pair, over each row (image -> texts) and column (text -> images)
    by_image = -sum(logits[i, i] - torch.logsumexp(logits[i, :], 0) for i in range(5)) / 5
    by_text = -sum(logits[i, i] - torch.logsumexp(logits[:, i], 0) for i in range(5)) / 5
    assert abs(clip_loss(logits).item() - (by_image + by_text).item() / 2) <= 1e-5
    assert abs(clip_loss(logits).item() - clip_loss(logits.t()).item()) <= 1e-6


def test_siglip_loss_is_the_papers_formula():
    """SigLIP paper, Algorithm 1: loss = -sum(log_sigmoid(labels * logits)) / n, labels = 2 * eye(n) - 1."""
    logits = torch.randn(6, 6, generator=torch.Generator().manual_seed(2)) * 4
    n = logits.shape[0]
    plain = 0.0
    for i in range(n):
        for j in range(n):
            z = 1.0 if i == j else -1.0
            plain -= math.log(1 / (1 + math.exp(-z * logits[i, j].item())))
    assert abs(siglip_loss(logits).item() - plain / n) <= 1e-5


def test_learnable_temperature_and_bias_initial_values():
    vocab = dict(vocab_size=50)
    clip = build_model(dataclasses.replace(CLIP_PRESETS["clip-debug"],
                                           text=dataclasses.replace(CLIP_PRESETS["clip-debug"].text, **vocab)))
    siglip = build_model(dataclasses.replace(SIGLIP_PRESETS["siglip-debug"],
                                             text=dataclasses.replace(SIGLIP_PRESETS["siglip-debug"].text, **vocab)))
    assert abs(clip.logit_scale.item() - math.log(1 / 0.07)) < 1e-6
    assert abs(siglip.logit_scale.item() - math.log(10)) < 1e-6  # the paper's t' = log 10 (HF's init: 0)
    assert siglip.logit_bias.item() == -10.0
    # both are learnt: the loss reaches them
    for model in (clip, siglip):
        logits, _ = model(images(3), torch.randint(0, 50, (3, 8)))
        model.loss(logits).backward()
        assert model.logit_scale.grad is not None and model.logit_scale.grad.abs().sum() > 0
    assert siglip.logit_bias.grad.abs().sum() > 0
    with torch.no_grad():
        clip.logit_scale.fill_(7.0)
    clip.clamp_logit_scale_()
    assert abs(clip.logit_scale.exp().item() - 100) < 1e-3  # open_clip's ceiling


# ---------------------------------------------------------------- weights in and out, strictly


@pytest.mark.parametrize("make_hf", [lambda: hf_clip(VOCAB - 1), hf_siglip], ids=["clip", "siglip"])
def test_round_trip_through_hf_names(make_hf):
    hf = make_hf()
    model = rafale_from(hf)
    # rafale -> HF names: transformers loads them strictly into a fresh model of the exported config
    config_class = type(hf.config)
    fresh = type(hf)(config_class(**config_to_hf(model.cfg))).eval()
    fresh.load_state_dict(hf_state_dict(model), strict=True)
    pixels = images(2)
    with torch.no_grad():
        assert max_diff(fresh.get_image_features(pixel_values=pixels).pooler_output,
                        model.get_image_features(pixels)) <= 1e-6
    # HF names -> rafale again: the same tensors, and the config survives config_to_hf / config_from_hf
    again = build_model(config_from_hf(config_to_hf(model.cfg)))
    assert again.cfg == dataclasses.replace(model.cfg, logit_scale_init=again.cfg.logit_scale_init)
    load_hf_state_dict(again, hf_state_dict(model))
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, again.state_dict()[name]), name


@pytest.mark.parametrize("make_hf", [lambda: hf_clip(VOCAB - 1), hf_siglip], ids=["clip", "siglip"])
def test_strict_loading_names_every_problem(make_hf):
    hf = make_hf()
    model = build_model(config_from_hf(hf.config.to_dict()))
    tensors = dict(hf.state_dict())
    del tensors["text_model.final_layer_norm.bias"]
    tensors["vision_model.encoder.layers.7.mlp.fc1.weight"] = torch.zeros(37, 32)  # a layer the model lacks
    tensors["text_model.pooler.weight"] = torch.zeros(3)
    tensors["logit_scale"] = torch.zeros(2, 2)
    with pytest.raises(WeightsError) as err:
        load_hf_state_dict(model, tensors, "ckpt")
    message = str(err.value)
    assert "missing: text_model.final_layer_norm.bias" in message
    assert "vision_model.encoder.layers.7.mlp.fc1.weight" in message and "text_model.pooler.weight" in message
    assert "wrong shape: logit_scale" in message
    # the old checkpoints' position_ids buffers are known and dropped
    ok = dict(hf.state_dict(), **{"text_model.embeddings.position_ids": torch.arange(16)[None]})
    load_hf_state_dict(model, ok)


def test_clip_weights_do_not_load_into_siglip():
    siglip = build_model(config_from_hf(hf_siglip().config.to_dict()))
    with pytest.raises(WeightsError, match="missing: .*logit_bias"):
        load_hf_state_dict(siglip, hf_clip(VOCAB - 1).state_dict())


# ---------------------------------------------------------------- configs and presets


def test_validate_names_the_field():
    cfg = CLIP_PRESETS["clip-tiny"]
    with pytest.raises(ValueError, match="vision.image_size"):
        dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, image_size=30)).validate()
    with pytest.raises(ValueError, match="text.hidden_size"):
        dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, num_heads=5)).validate()
    with pytest.raises(ValueError, match="vision.hidden_act"):
        dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, hidden_act="relu6")).validate()
    with pytest.raises(ValueError, match="vision.pooling 'map'"):
        dataclasses.replace(cfg, family="siglip").validate()
    with pytest.raises(ValueError, match="vocab_size"):
        build_model(cfg)  # vocab_size still None


def test_published_presets_match_hf_defaults():
    """HF's default configs describe openai/clip-vit-base-patch32 and google/siglip-base-patch16-224."""
    clip = config_from_hf(transformers.CLIPConfig(vision_config=dict(patch_size=16)).to_dict())
    assert clip == dataclasses.replace(CLIP_PRESETS["clip-vit-b-16"], logit_scale_init=clip.logit_scale_init)
    assert config_from_hf(transformers.SiglipConfig().to_dict()) == SIGLIP_PRESETS["siglip-vit-b-16"]
    for cfg in (*CLIP_PRESETS.values(), *SIGLIP_PRESETS.values()):
        cfg.validate()
    # the same parameter count as HF's models of those configs, built without memory on the meta device
    # (CLIP ViT-B/16: 149,620,737; SigLIP ViT-B/16: 203,155,970)
    hf_classes = {"clip": transformers.CLIPModel, "siglip": transformers.SiglipModel}  # imported before meta
    for cfg in (CLIP_PRESETS["clip-vit-b-16"], SIGLIP_PRESETS["siglip-vit-b-16"]):
        config_class = transformers.CLIPConfig if cfg.family == "clip" else transformers.SiglipConfig
        hf_config = config_class(**config_to_hf(cfg))
        with torch.device("meta"):
            expected = sum(p.numel() for p in hf_classes[cfg.family](hf_config).parameters())
            assert build_model(cfg).num_params() == expected


# ---------------------------------------------------------------- learning


@pytest.mark.parametrize("preset", ["clip-debug", "siglip-debug"])
def test_debug_preset_learns_a_batch_of_shapes(preset):
    """100 AdamW steps on 16 shapes pairs (word-level ids, padded): the loss falls and the pairs are found.
    This is what DEBUG=1 (overfit one batch) will rely on."""
    from rafale.data.shapes import shape_splits

    pairs = shape_splits(16, 0, seed=0, image_size=32)["train"]
    words = sorted({w for _, c in pairs for w in c.replace(",", "").split()})
    vocab = {w: i + 2 for i, w in enumerate(words)}  # 0: padding, 1: end of text
    rows = [[vocab[w] for w in c.replace(",", "").split()] + [1] for _, c in pairs]
    T = max(map(len, rows))
    ids = torch.tensor([row + [0] * (T - len(row)) for row in rows])
    mask = (ids != 0).long()  # (B, T): the end-of-text token 1 is a real token
    pixels = torch.stack([torch.tensor(list(im.getdata()), dtype=torch.float32).view(32, 32, 3).permute(2, 0, 1)
                          for im, _ in pairs]) / 127.5 - 1  # (16, 3, 32, 32)

    presets = {**CLIP_PRESETS, **SIGLIP_PRESETS}
    cfg = presets[preset]
    cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, vocab_size=len(vocab) + 2, eos_token_id=1))
    torch.manual_seed(0)
    model = build_model(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4)
    losses, threads = [], torch.get_num_threads()
    # one thread: these tiny matmuls gain nothing from more, and a busy 2-core machine made them 20x slower
    torch.set_num_threads(1)
    try:
        for _ in range(100):
            logits_per_image, _ = model(pixels, ids, mask)
            loss = model.loss(logits_per_image)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            model.clamp_logit_scale_()
            losses.append(loss.item())
    finally:
        torch.set_num_threads(threads)
    assert losses[-1] < 0.3 * losses[0], losses
    with torch.no_grad():
        logits_per_image, _ = model(pixels, ids, mask)
    assert (logits_per_image.argmax(dim=1) == torch.arange(16)).float().mean() >= 0.75
