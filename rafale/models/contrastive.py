"""The CLIP and SigLIP families in one place: their presets, what they train for (contrastive image-text), how
their Composer models are built, what their data looks like, and their Hugging Face formats (CLIPModel,
SiglipModel: config.json both ways and the tensors' names). The nn.Modules and their losses are
rafale/models/clip.py.

    model: {type: clip, preset: clip-tiny}     # or siglip
"""

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

from rafale.errors import ConfigError, DataError, WeightsError
from rafale.models import clip
from rafale.models.clip import ClipConfig, TextConfig, VisionConfig
from rafale.models.family import Family, HFFormat, model_vocab_size


# ----------------------------------------------------------------------------------------------------
# presets


def clip_preset(vision: dict, text: dict, projection_dim: int) -> ClipConfig:
    return ClipConfig(
        family="clip", vision=VisionConfig(**vision), text=TextConfig(**text), projection_dim=projection_dim
    )


def siglip_preset(vision: dict, text: dict) -> ClipConfig:
    siglip = dict(hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
    return ClipConfig(
        family="siglip",
        vision=VisionConfig(pooling="map", **siglip, **vision),
        text=TextConfig(pooling="last", **siglip, **text),
        projection_dim=vision["hidden_size"],
        logit_scale_init=math.log(10),
    )


TINY_VISION = dict(image_size=32, patch_size=4, hidden_size=128, num_layers=4, num_heads=4, intermediate_size=512)
TINY_TEXT = dict(hidden_size=128, num_layers=4, num_heads=4, intermediate_size=512, max_position_embeddings=32)
DEBUG_VISION = dict(image_size=32, patch_size=8, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=256)
DEBUG_TEXT = dict(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=256, max_position_embeddings=32)

CLIP_PRESETS = {
    # tiny and debug: CPU sizes for the shapes data and the tests (vocab_size None: taken from the tokenizer)
    "clip-tiny": clip_preset(TINY_VISION, TINY_TEXT, projection_dim=128),
    "clip-debug": clip_preset(DEBUG_VISION, DEBUG_TEXT, projection_dim=64),
    # openai/clip-vit-base-patch16 (config.json on the hub)
    "clip-vit-b-16": clip_preset(
        dict(image_size=224, patch_size=16, hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072),
        dict(vocab_size=49408, hidden_size=512, num_layers=12, num_heads=8, intermediate_size=2048,
             max_position_embeddings=77, eos_token_id=49407),
        projection_dim=512,
    ),
}

SIGLIP_PRESETS = {
    "siglip-tiny": siglip_preset(TINY_VISION, TINY_TEXT),
    "siglip-debug": siglip_preset(DEBUG_VISION, DEBUG_TEXT),
    # google/siglip-base-patch16-224 (config.json on the hub); its tokenizer pads to 64 tokens without a mask
    "siglip-vit-b-16": siglip_preset(
        dict(image_size=224, patch_size=16, hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072),
        dict(vocab_size=32000, hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072,
             max_position_embeddings=64),
    ),
}


# ----------------------------------------------------------------------------------------------------
# the Composer model


def build(model_cfg: ClipConfig, head: str, meta: dict, tokenizer):
    """A CLIP or SigLIP. Its vocabulary, image size and (CLIP) end-of-text id come from the data; so do the
    zero-shot classes' prompts, tokenized and padded, and the pixel normalisation, in meta (their images are
    attached with the data: ComposerContrastive.attach_splits)."""
    import torch

    from rafale.models.composer import ComposerContrastive, ZeroShotSet

    model_cfg.text.vocab_size = model_vocab_size(model_cfg.text.vocab_size, meta["vocab_size"])
    model_cfg.vision.image_size = meta["image_size"]
    if model_cfg.family == "clip":
        if meta["eos_token_id"] == 2:  # transformers reads a CLIP eos_token_id of 2 as "pool at the highest id"
            raise DataError("data.tokenizer: its end-of-text id is 2, which an exported CLIP cannot express "
                            "(transformers pools at the highest id then); use a tokenizer with another id")
        model_cfg.text.eos_token_id = meta["eos_token_id"]
    try:
        model_cfg.validate()
    except ValueError as err:
        raise ConfigError("data.image_size" if "image_size" in str(err) else "model", str(err)) from None
    zero_shot = None
    # (the data.json of a run folder from before the prompts were tokenized with the data has none: it still exports)
    if "input_ids" in meta.get("zero_shot", {}):
        info, mask = meta["zero_shot"], meta["zero_shot"]["attention_mask"]
        prompts = (torch.tensor(info["input_ids"]), None if mask is None else torch.tensor(mask))
        zero_shot = ZeroShotSet(prompts, len(info["templates"]), info["held_out"], meta["image_mean"],
                                meta["image_std"])
    return ComposerContrastive(clip.build_model(model_cfg), zero_shot)


# what the datapipe (rafale/data/image_text.py) makes of the texts and pixels for each family
DATA = {
    # texts padded to the batch's longest, with a mask; OpenAI CLIP's pixel mean and std (of its training set)
    "clip": {"tokenizer_kind": "bpe", "fixed_text_length": False,
             "image_mean": (0.48145466, 0.4578275, 0.40821073), "image_std": (0.26862954, 0.26130258, 0.27577711)},
    # every text padded to data.block_size without a mask, as SigLIP's checkpoints were trained (it pools the last
    # position, so padding changes the embedding); pixels to [-1, 1]
    "siglip": {"tokenizer_kind": "bpe", "fixed_text_length": True, "image_mean": (0.5, 0.5, 0.5),
               "image_std": (0.5, 0.5, 0.5)},
}


# ----------------------------------------------------------------------------------------------------
# Hugging Face weights. Names are templates: `{}` is a layer index, counted in the tower the name belongs to.


@dataclass
class WeightLayout:
    """How one family's checkpoint names map onto the model's (an identity here, written out so that a
    module renamed in this file fails loudly instead of loading nothing)."""

    names: dict  # HF template -> rafale template
    ignored: tuple = ()  # HF names that checkpoints may hold and rafale knowingly drops


LAYER = (
    "encoder.layers.{}.layer_norm1.weight", "encoder.layers.{}.layer_norm1.bias",
    "encoder.layers.{}.self_attn.q_proj.weight", "encoder.layers.{}.self_attn.q_proj.bias",
    "encoder.layers.{}.self_attn.k_proj.weight", "encoder.layers.{}.self_attn.k_proj.bias",
    "encoder.layers.{}.self_attn.v_proj.weight", "encoder.layers.{}.self_attn.v_proj.bias",
    "encoder.layers.{}.self_attn.out_proj.weight", "encoder.layers.{}.self_attn.out_proj.bias",
    "encoder.layers.{}.layer_norm2.weight", "encoder.layers.{}.layer_norm2.bias",
    "encoder.layers.{}.mlp.fc1.weight", "encoder.layers.{}.mlp.fc1.bias",
    "encoder.layers.{}.mlp.fc2.weight", "encoder.layers.{}.mlp.fc2.bias",
)
TEXT = (
    "embeddings.token_embedding.weight", "embeddings.position_embedding.weight",
    *LAYER, "final_layer_norm.weight", "final_layer_norm.bias",
)
VISION = ("embeddings.patch_embedding.weight", "embeddings.position_embedding.weight", *LAYER,
          "post_layernorm.weight", "post_layernorm.bias")
FAMILY_NAMES = {
    "clip": (
        *("text_model." + name for name in TEXT),
        *("vision_model." + name for name in VISION),
        "vision_model.embeddings.class_embedding",
        "vision_model.pre_layrnorm.weight", "vision_model.pre_layrnorm.bias",
        "visual_projection.weight", "text_projection.weight", "logit_scale",
    ),
    "siglip": (
        *("text_model." + name for name in TEXT),
        "text_model.head.weight", "text_model.head.bias",
        *("vision_model." + name for name in VISION),
        "vision_model.embeddings.patch_embedding.bias",
        "vision_model.head.probe",
        "vision_model.head.attention.in_proj_weight", "vision_model.head.attention.in_proj_bias",
        "vision_model.head.attention.out_proj.weight", "vision_model.head.attention.out_proj.bias",
        "vision_model.head.layernorm.weight", "vision_model.head.layernorm.bias",
        "vision_model.head.mlp.fc1.weight", "vision_model.head.mlp.fc1.bias",
        "vision_model.head.mlp.fc2.weight", "vision_model.head.mlp.fc2.bias",
        "logit_scale", "logit_bias",
    ),
}
LAYOUTS = {
    family: WeightLayout(
        names={name: name for name in names},
        # arange buffers that transformers 4.2x saved in the checkpoints; positions are computed here
        ignored=("text_model.embeddings.position_ids", "vision_model.embeddings.position_ids"),
    )
    for family, names in FAMILY_NAMES.items()
}


def expand_names(names: dict, cfg: ClipConfig) -> dict:
    """Templates written out for every layer of their tower: {HF name: rafale name}."""
    expanded = {}
    for hf_template, rafale_template in names.items():
        tower = cfg.vision if hf_template.startswith("vision_model.") else cfg.text
        for i in range(tower.num_layers) if "{}" in hf_template else [None]:
            expanded[hf_template.format(i)] = rafale_template.format(i)
    return expanded


def hf_state_dict(model) -> dict:
    """The model's tensors under HF's names (CLIPModel / SiglipModel); every parameter must have one."""
    names = expand_names(LAYOUTS[model.cfg.family].names, model.cfg)
    state = model.state_dict()
    left_out = sorted(set(state) - set(names.values()))
    if left_out:
        raise WeightsError(f"no HF name for {', '.join(left_out)} (update FAMILY_NAMES in contrastive.py)")
    return {hf_name: state[rafale_name] for hf_name, rafale_name in names.items()}


def load_hf_state_dict(model, tensors: dict, where: str = "the state dict"):
    """Copy HF-named tensors into the model, strictly: one WeightsError lists every missing, unexpected
    and mis-shaped tensor."""
    layout = LAYOUTS[model.cfg.family]
    names = expand_names(layout.names, model.cfg)
    expected = model.state_dict()
    state, unexpected, wrong_shape = {}, [], []
    for hf_name, tensor in tensors.items():
        if hf_name in layout.ignored:
            continue
        if hf_name not in names:
            unexpected.append(hf_name)
        elif tuple(tensor.shape) != tuple(expected[names[hf_name]].shape):
            shapes = f"expected {tuple(expected[names[hf_name]].shape)}, found {tuple(tensor.shape)}"
            wrong_shape.append(f"{hf_name} ({shapes})")
        else:
            state[names[hf_name]] = tensor
    missing = [hf_name for hf_name in names if hf_name not in tensors]
    problems = [f"{kind}: {', '.join(items)}" for kind, items in
                (("missing", missing), ("unexpected", sorted(unexpected)), ("wrong shape", wrong_shape)) if items]
    if problems:
        family = {"clip": "CLIPModel", "siglip": "SiglipModel"}[model.cfg.family]
        raise WeightsError(f"weights in {where} do not fit the {family}:\n  " + "\n  ".join(problems))
    model.load_state_dict(state, strict=True)
    return model


# config.json <-> ClipConfig


def config_from_hf(hf: dict) -> ClipConfig:
    """A ClipConfig from a CLIPModel or SiglipModel config.json (as a dict)."""
    family = {"clip": "clip", "siglip": "siglip"}.get(hf.get("model_type"))
    if family is None:
        raise WeightsError(f"model_type must be 'clip' or 'siglip', got {hf.get('model_type')!r}")
    vision, text = hf.get("vision_config") or {}, hf.get("text_config") or {}
    for where, sub in (("vision_config", vision), ("text_config", text)):
        if sub.get("attention_dropout", 0.0):
            raise WeightsError(f"{where}.attention_dropout must be 0: rafale's CLIP has no dropout")
    if family == "siglip" and not vision.get("vision_use_head", True):
        raise WeightsError("vision_config.vision_use_head must be true: SigLIP's embedding is the head's output")
    defaults = CLIP_PRESETS["clip-vit-b-16"] if family == "clip" else SIGLIP_PRESETS["siglip-vit-b-16"]
    eos = text.get("eos_token_id", 49407)  # CLIPTextConfig's default
    cfg = ClipConfig(
        family=family,
        vision=VisionConfig(
            image_size=vision.get("image_size", 224),
            patch_size=vision.get("patch_size", 32 if family == "clip" else 16),
            num_channels=vision.get("num_channels", 3),
            hidden_size=vision.get("hidden_size", 768),
            num_layers=vision.get("num_hidden_layers", 12),
            num_heads=vision.get("num_attention_heads", 12),
            intermediate_size=vision.get("intermediate_size", 3072),
            hidden_act=vision.get("hidden_act", defaults.vision.hidden_act),
            layer_norm_eps=vision.get("layer_norm_eps", defaults.vision.layer_norm_eps),
            pooling=defaults.vision.pooling,
        ),
        text=TextConfig(
            vocab_size=text.get("vocab_size", defaults.text.vocab_size),
            hidden_size=text.get("hidden_size", defaults.text.hidden_size),
            num_layers=text.get("num_hidden_layers", 12),
            num_heads=text.get("num_attention_heads", defaults.text.num_heads),
            intermediate_size=text.get("intermediate_size", defaults.text.intermediate_size),
            max_position_embeddings=text.get("max_position_embeddings", defaults.text.max_position_embeddings),
            hidden_act=text.get("hidden_act", defaults.text.hidden_act),
            layer_norm_eps=text.get("layer_norm_eps", defaults.text.layer_norm_eps),
            pooling=defaults.text.pooling,
            # HF's CLIP pools at the highest id when eos_token_id is 2 (the configs from before the fix);
            # SigLIP pools at the last position whatever the token
            eos_token_id=None if family == "siglip" or eos == 2 else eos,
        ),
        projection_dim=(hf.get("projection_dim", 512) if family == "clip"
                        else text.get("projection_size") or text.get("hidden_size", 768)),
        logit_scale_init=hf.get("logit_scale_init_value", math.log(1 / 0.07)) if family == "clip" else math.log(10),
    )
    try:
        cfg.validate()
    except ValueError as err:
        raise WeightsError(f"config.json: {err}") from None
    return cfg


def config_to_hf(cfg: ClipConfig) -> dict:
    """The config.json of the CLIPModel or SiglipModel that hf_state_dict's tensors load into."""
    tower = lambda c: dict(  # noqa: E731
        hidden_size=c.hidden_size, num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
        intermediate_size=c.intermediate_size, hidden_act=c.hidden_act, layer_norm_eps=c.layer_norm_eps,
        attention_dropout=0.0,
    )
    vision = dict(tower(cfg.vision), image_size=cfg.vision.image_size, patch_size=cfg.vision.patch_size,
                  num_channels=cfg.vision.num_channels)
    text = dict(tower(cfg.text), vocab_size=cfg.text.vocab_size,
                max_position_embeddings=cfg.text.max_position_embeddings)
    if cfg.family == "clip":
        # eos_token_id 2 tells HF to pool at the highest id, what rafale does when it is None
        text["eos_token_id"] = 2 if cfg.text.eos_token_id is None else cfg.text.eos_token_id
        text["projection_dim"] = vision["projection_dim"] = cfg.projection_dim
        return {"architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": cfg.projection_dim,
                "logit_scale_init_value": cfg.logit_scale_init, "vision_config": vision, "text_config": text}
    text["projection_size"] = cfg.projection_dim
    vision["vision_use_head"] = True
    return {"architectures": ["SiglipModel"], "model_type": "siglip", "vision_config": vision, "text_config": text}


# ----------------------------------------------------------------------------------------------------
# the families


ARCHITECTURES = {"clip": "CLIPModel", "siglip": "SiglipModel"}


def family_config_to_hf(cfg: ClipConfig, architecture: str = "", vocab_size: Optional[int] = None, id2label=None):
    if vocab_size is not None:  # the token embedding cut to the tokenizer's vocabulary
        cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, vocab_size=vocab_size))
    return config_to_hf(cfg)


def load(model, tensors: dict, architecture: str, where: str) -> dict:
    load_hf_state_dict(model, tensors, where)
    return dict(model.state_dict())


def tensors(model, architecture: str, vocab_size: int) -> dict:
    try:
        out = hf_state_dict(model)
    except WeightsError as err:
        raise WeightsError(f"save_pretrained: {err}") from None
    embedding = "text_model.embeddings.token_embedding.weight"
    out[embedding] = out[embedding][:vocab_size]  # the rows of real tokens only
    return out


def contrastive_family(name: str, presets: dict) -> Family:
    architecture = ARCHITECTURES[name]
    model_class = clip.MODEL_CLASSES[name]
    return Family(
        name=name,
        config=ClipConfig,
        presets=presets,
        heads=("contrastive",),
        build=build,
        data=DATA[name],
        hf=HFFormat(
            architectures={architecture: "contrastive"},
            model_type=name,
            config_from_hf=lambda hf, config_path=None: config_from_hf(hf),
            config_to_hf=family_config_to_hf,
            module=lambda cfg, head: clip.build_model(cfg),
            architecture_of=lambda module: architecture if type(module) is model_class else None,
            load=load,
            tensors=tensors,
            max_length=lambda cfg: cfg.text.max_position_embeddings,
            module_files=("rafale.models.clip",),
            special_ids=False,
        ),
    )


CLIP = contrastive_family("clip", CLIP_PRESETS)
SIGLIP = contrastive_family("siglip", SIGLIP_PRESETS)
