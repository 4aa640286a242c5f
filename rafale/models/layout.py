"""How a family's Hugging Face checkpoint names map onto its rafale modules' parameter names, and the strict
matching every family that uses such a map shares: a `WeightLayout` (names are templates: `{}` stands for the layer
index, litgpt's convention), `match_tensors` (one WeightsError naming every missing, unexpected, mis-shaped or
disagreeing tensor) and the `load`/`tensors` functions of an HFFormat built from a layout.

The family files (rafale/models/pythia.py, bert.py) import this; rafale/models/hf.py reads and writes the files.
"""

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn

from rafale.errors import WeightsError



@dataclass(frozen=True)
class Fused:
    """One rafale tensor that a checkpoint stores as several (Llama's q_proj, k_proj and v_proj are rafale's one
    attn.qkv): `parts`, the HF templates; `join(tensors, cfg)` makes the rafale tensor of the parts (in that order)
    and `split(tensor, cfg)` gives them back."""

    parts: tuple
    join: Callable
    split: Callable


@dataclass
class WeightLayout:
    """How one architecture's checkpoint names map onto a rafale model's parameter names. A template whose rafale
    name the model does not have (a bias the config turns off) is neither expected nor exported."""

    names: dict  # HF template -> rafale template; export writes exactly these names (a tied tensor once)
    aliases: dict = field(default_factory=dict)  # other HF names some checkpoints use for the same tensors (import)
    ignored: tuple = ()  # HF templates in checkpoints that rafale knowingly drops (each documented where listed)
    fused: dict = field(default_factory=dict)  # rafale template -> Fused: stored as several HF tensors


def require(hf: dict, key: str, config_path: Path):
    """config.json[key], or a WeightsError naming the file and the key."""
    if key not in hf:
        raise WeightsError(f"{config_path}: missing '{key}'")
    return hf[key]


def split_layer_index(name: str) -> tuple[str, Optional[str]]:
    """'gpt_neox.layers.3.mlp.dense_h_to_4h.weight' -> ('gpt_neox.layers.{}.mlp.dense_h_to_4h.weight', '3')."""
    match = re.search(r"\.(\d+)\.", name)
    if match is None:
        return name, None
    return name[: match.start()] + ".{}." + name[match.end() :], match.group(1)


def legacy_layer_norm_name(name: str) -> str:
    """Checkpoints converted from TensorFlow BERT call LayerNorm's weight and bias gamma and beta."""
    return re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", name))


def match_tensors(tensors: dict, model: nn.Module, layout: WeightLayout, where: str) -> dict:
    """Checkpoint tensors renamed to the model's names, every tied name filled; one WeightsError for all problems.

    Tied parameters (the masked LM's decoder and word embeddings) are one tensor under several names: the
    checkpoint needs to hold any one of them, and when it holds several they must agree.
    """
    found, parts_found, unexpected = sort_tensors(tensors, set(model.state_dict()), layout)

    # the names sharing one Parameter, in the model's order
    groups = {}
    for name, param in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(param), []).append((name, param))
    export_name = {rafale: hf for hf, rafale in expand_names(layout.names, model).items()}

    missing, wrong_shape, reported = join_fused(parts_found, model, layout, found)

    state, disagree = {}, []
    for group in groups.values():
        candidates = [pair for name, _ in group for pair in found.get(name, [])]
        expected = tuple(group[0][1].shape)
        if not candidates:
            if group[0][0] not in reported:
                missing.append(export_name.get(group[0][0], group[0][0]))
            continue
        shaped = []
        for hf_name, tensor in candidates:
            if tuple(tensor.shape) != expected:
                wrong_shape.append(f"{hf_name} (expected {expected}, found {tuple(tensor.shape)})")
            else:
                shaped.append((hf_name, tensor))
        if len(shaped) > 1 and not all(torch.equal(shaped[0][1], t) for _, t in shaped[1:]):
            disagree.append(" and ".join(hf_name for hf_name, _ in shaped))
        if shaped:
            state.update((name, shaped[0][1]) for name, _ in group)

    problems = []
    if missing:
        problems.append("missing: " + ", ".join(missing))
    if unexpected:
        problems.append("unexpected: " + ", ".join(sorted(unexpected)))
    if wrong_shape:
        problems.append("wrong shape: " + ", ".join(wrong_shape))
    if disagree:
        problems.append("tied in rafale but stored with different values: " + ", ".join(disagree))
    if problems:
        raise WeightsError(f"weights in {where} do not fit the model:\n  " + "\n  ".join(problems))
    return state


def sort_tensors(tensors: dict, model_names: set, layout: WeightLayout):
    """The checkpoint's tensors by the rafale name they fill: ({rafale name: [(checkpoint name, tensor)]}, {fused
    rafale name: {part index: (checkpoint name, tensor)}}, [checkpoint names that fill nothing]); ignored ones dropped."""
    found, parts_found, unexpected = {}, {}, []
    ignored = set(layout.ignored)
    part_of = {hf: (rafale, i) for rafale, fused in layout.fused.items() for i, hf in enumerate(fused.parts)}
    for hf_name, tensor in tensors.items():
        template, index = split_layer_index(legacy_layer_norm_name(hf_name))
        if template in ignored:
            continue
        if template in part_of and part_of[template][0].format(index) in model_names:
            rafale_template, i = part_of[template]
            parts_found.setdefault(rafale_template.format(index), {})[i] = (hf_name, tensor)
            continue
        rafale_template = layout.names.get(template, layout.aliases.get(template))
        rafale_name = None if rafale_template is None else rafale_template.format(index)
        if rafale_name is None or rafale_name not in model_names:  # also a layer beyond num_layers
            unexpected.append(hf_name)
        else:
            found.setdefault(rafale_name, []).append((hf_name, tensor))
    return found, parts_found, unexpected


def join_fused(parts_found: dict, model: nn.Module, layout: WeightLayout, found: dict):
    """Each fused tensor of the model whose parts are all there, with their shapes, joined into `found` (under the
    parts' names joined by ' + '); (missing parts, mis-shaped parts, the rafale names already reported)."""
    state = model.state_dict(keep_vars=True)
    missing, wrong_shape, reported = [], [], set()
    for rafale_name, (hf_names, fused) in expand_fused(layout.fused, model).items():
        if rafale_name not in state:
            continue
        got = parts_found.get(rafale_name, {})
        expected = [tuple(t.shape) for t in fused.split(state[rafale_name].detach(), model.cfg)]
        absent = [name for i, name in enumerate(hf_names) if i not in got]
        shapes = [f"{name} (expected {shape}, found {tuple(got[i][1].shape)})"
                  for i, (name, shape) in enumerate(zip(hf_names, expected)) if i in got and tuple(got[i][1].shape) != shape]
        if absent or shapes:
            missing += absent
            wrong_shape += shapes
            reported.add(rafale_name)
            continue
        joined = fused.join([got[i][1] for i in range(len(hf_names))], model.cfg)
        found.setdefault(rafale_name, []).append((" + ".join(hf_names), joined))
    return missing, wrong_shape, reported


def expand_fused(fused: dict, model: nn.Module) -> dict:
    """Fused templates written out for each layer: {rafale name: ([HF names of its parts], Fused)}."""
    layers = range(model.cfg.num_layers)
    return {rafale.format(i): ([part.format(i) for part in f.parts], f)
            for rafale, f in fused.items() for i in (layers if "{}" in rafale else [None])}


def expand_names(names: dict, model: nn.Module) -> dict:
    """Templates with `{}` written out for each layer: {HF name: rafale name}."""
    expanded = {}
    for hf_template, rafale_template in names.items():
        layers = range(model.cfg.num_layers) if "{}" in hf_template else [None]
        for i in layers:
            expanded[hf_template.format(i)] = rafale_template.format(i)
    return expanded


def layout_loader(layout_of):
    """HFFormat.load for a family whose names a WeightLayout maps: `layout_of(architecture)` -> its layout."""

    def load(model: nn.Module, tensors: dict, architecture: str, where: str) -> dict:
        state = match_tensors(tensors, model, layout_of(architecture), where)
        model.load_state_dict(state, strict=True)  # copies into the (tied) parameters
        return state

    return load


def layout_tensors(layout_of, vocab_rows_of):
    """HFFormat.tensors for a family whose names a WeightLayout maps; `vocab_rows_of(architecture)`: the HF names of
    the tensors with one row per token, cut to the exported vocabulary."""

    def tensors(model: nn.Module, architecture: str, vocab_size: int) -> dict:
        """The model's tensors under HF names, each tied tensor once, as transformers writes them."""
        state = model.state_dict(keep_vars=True)
        layout = layout_of(architecture)
        out, exported = {}, set()
        for hf_name, rafale_name in expand_names(layout.names, model).items():
            if rafale_name in state and id(state[rafale_name]) not in exported:  # a tied tensor once, the first name
                out[hf_name] = state[rafale_name]
                exported.add(id(state[rafale_name]))
        for rafale_name, (hf_names, fused) in expand_fused(layout.fused, model).items():
            if rafale_name in state:
                out.update(zip(hf_names, fused.split(state[rafale_name], model.cfg)))
                exported.add(id(state[rafale_name]))
        # every parameter must leave under some name: a module added to the model but not to the layout would
        # otherwise be dropped from the export without a word
        left_out = [name for name, p in state.items() if id(p) not in exported]
        if left_out:
            raise WeightsError(f"save_pretrained: no HF name for {', '.join(left_out)} (update the family's layout)")
        sliced = vocab_rows_of(architecture)
        return {hf_name: t[:vocab_size] if hf_name in sliced else t for hf_name, t in out.items()}

    return tensors
