"""An export proves itself: transformers loads it back and must compute what the model does.

The export's other checks (rafale/models/hf.py, `export_refusal`) look at the model's classes and config before
training. They cannot see code: a block edited in place (the MLP's GELU turned into SiLU, nanoGPT's way, with no
new config field) is still the family's class with the family's config, and its export would load in transformers
as the plain model, computing something else. So after writing, the folder is loaded back by transformers' Auto
class for the `architectures` it names, both models run a fixed probe in fp32 on the CPU, and the export stands
only if their outputs agree to TOLERANCE of their scale (`allowed_difference`). Where they do not, the hooks below say where the difference first
arises: both models' modules are paired through the tensors they hold (the family's name map, as written), and
the first pair, in the order rafale's forward runs them, whose output differs is named with its block.

Nothing here is a family's own: the probe follows the head (causal_lm, mlm, classification, base, contrastive),
the Auto class the architecture's name, the pairing the tensors the family's HFFormat writes. A new family gets
the check for nothing; a new head needs one line in PROBES.

transformers is imported here only, on the first export (`rafale --help` and config errors never load it).
"""

import copy
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn

from rafale.errors import WeightsError

TOLERANCE = 1e-4  # max |difference| of fp32 outputs, per unit of their scale: 1 + max |output| (allowed_difference)
# Two implementations of the same fp32 model round differently (another summation order, a fused kernel): ~1e-7 of
# the outputs' scale, at most ~1e-5 (pythia-160m's shape with logits up to 23 differed by 2e-4), and a changed
# activation by ~1e-2. An absolute bound refused the exports of trained models, whose logits are large; so the
# bound grows with the largest |output|, as torch.testing.assert_close's atol + rtol * |expected| does, but
# relative to the whole tensor's scale, not each element's: the rounding of a logit near 0 is that of its row.


def allowed_difference(expected: torch.Tensor, mask: Optional[torch.Tensor] = None) -> tuple[float, float]:
    """(the max |difference| allowed against `expected`, its scale max |expected|): TOLERANCE x (1 + scale), at
    real tokens only, as `_difference` compares them."""
    scale = _difference(expected, torch.zeros_like(expected), mask)
    return TOLERANCE * (1 + scale), scale


class ExportRefused(WeightsError):
    """transformers computes something else than the model."""


@dataclass
class Proof:
    architecture: str
    max_difference: float
    allowed: float  # TOLERANCE x (1 + max |output|)
    scale: float  # max |output| of transformers' model
    probe: str  # what was run, in words
    seconds: float  # the check, from loading transformers to the comparison
    import_seconds: float  # of which importing transformers' model class (most of it once per process)

    def line(self) -> str:
        return (f"transformers' {_auto_class_name(self.architecture)} loads it as {self.architecture} and gives the same outputs "
                f"(max |difference| {self.max_difference:.1e} <= {self.allowed:.1e}, {TOLERANCE:.0e} x (1 + max |output| "
                f"{self.scale:.3g}), on {self.probe}, fp32 on the CPU); "
                f"checked in {self.seconds:.2f} s, {self.import_seconds:.2f} s of it importing transformers")


# ----------------------------------------------------------------------------------------------------
# The probe: fixed inputs per head, and how each side is called on them


@dataclass
class _Probe:
    inputs: dict  # tensors by HF's argument names
    mask: Optional[torch.Tensor]  # (B, T) real tokens, where token-level outputs are compared
    words: str


def _token_ids(batch: int, length: int, vocab_size: int, avoid: Optional[int]) -> torch.Tensor:
    """(batch, length) ids spread over the vocabulary by a fixed formula (no generator: the same on any torch)."""
    ids = (torch.arange(batch * length).reshape(batch, length) * 7919 + 17) % vocab_size
    if avoid is not None:  # RoBERTa counts positions from its pad id, so a pad inside the text changes them
        ids = torch.where(ids == avoid, (avoid + 1) % vocab_size, ids)
    return ids


def _text_probe(hf_config: dict, cfg, max_length: int, padded: bool) -> _Probe:
    """Two sequences; with `padded`, the second right-padded by a third, its mask saying so."""
    T = min(16, max_length)  # tokens (fewer when the model's context is shorter)
    pad = getattr(cfg, "pad_token_id", None)
    ids = _token_ids(2, T, hf_config["vocab_size"], pad)
    mask = torch.ones_like(ids)
    if padded:
        mask[1, T - T // 3:] = 0
        ids = ids.masked_fill(mask == 0, pad or 0)
        return _Probe({"input_ids": ids, "attention_mask": mask}, mask, f"2 sequences of {T} tokens, one padded")
    return _Probe({"input_ids": ids}, mask, f"2 sequences of {T} tokens")


def _image_text_probe(hf_config: dict, cfg, max_length: int) -> _Probe:
    """Two images of a fixed pattern against three texts."""
    vision, text = hf_config["vision_config"], hf_config["text_config"]
    size, channels = vision["image_size"], vision.get("num_channels", 3)
    pixels = torch.sin(torch.arange(2 * channels * size * size, dtype=torch.float32) * 0.37)
    pixels = pixels.reshape(2, channels, size, size)  # (N, C, H, W)
    T = min(8, max_length)
    ids = _token_ids(3, T, text["vocab_size"], None)
    return _Probe({"pixel_values": pixels, "input_ids": ids}, None,
                  f"2 images of {size}x{size} against 3 texts of {T} tokens")


def _logits(out):
    return out.logits


# head -> (the probe, rafale's call on its inputs, the output compared on transformers' side)
PROBES: dict[str, tuple[Callable, Callable, Callable]] = {
    "causal_lm": (lambda hf, cfg, n: _text_probe(hf, cfg, n, padded=False),
                  lambda model, x: model(x["input_ids"]), _logits),
    "mlm": (lambda hf, cfg, n: _text_probe(hf, cfg, n, padded=True),
            lambda model, x: model(x["input_ids"], attention_mask=x["attention_mask"]), _logits),
    "classification": (lambda hf, cfg, n: _text_probe(hf, cfg, n, padded=True),
                       lambda model, x: model(x["input_ids"], attention_mask=x["attention_mask"]), _logits),
    "base": (lambda hf, cfg, n: _text_probe(hf, cfg, n, padded=True),
             lambda model, x: model(x["input_ids"], attention_mask=x["attention_mask"]),
             lambda out: out.last_hidden_state),
    "contrastive": (_image_text_probe, lambda model, x: model(x["pixel_values"], x["input_ids"])[0],
                    lambda out: out.logits_per_image),
}

# the Auto class that builds an architecture, by the end of its name; AutoModel for the rest (CLIPModel, ...)
_AUTO_CLASSES = {"ForCausalLM": "AutoModelForCausalLM", "ForMaskedLM": "AutoModelForMaskedLM",
                "ForSequenceClassification": "AutoModelForSequenceClassification"}


def _auto_class_name(architecture: str) -> str:
    return next((auto for end, auto in _AUTO_CLASSES.items() if architecture.endswith(end)), "AutoModel")


def _difference(ours: torch.Tensor, theirs: torch.Tensor, mask: Optional[torch.Tensor]) -> float:
    """max |ours - theirs|, at real tokens only when the outputs are per token (padded ones mean nothing)."""
    if ours.shape[-1] > theirs.shape[-1] and ours.shape[:-1] == theirs.shape[:-1]:
        ours = ours[..., :theirs.shape[-1]]  # rafale's padded vocabulary: the export has the tokenizer's rows
    if ours.shape != theirs.shape:
        return float("inf")
    if mask is not None and ours.dim() >= 2 and ours.shape[:2] == mask.shape:
        ours, theirs = ours[mask.bool()], theirs[mask.bool()]
    return (ours.float() - theirs.float()).abs().max().item() if ours.numel() else 0.0


# ----------------------------------------------------------------------------------------------------
# Where the difference arises: the two models' modules, paired through the tensors they hold


def _paired_modules(model: nn.Module, hf_model: nn.Module, written: dict) -> dict:
    """{rafale module name: transformers module name} for the modules of both that hold the same tensors, as the
    family's format wrote them (`written`: {HF name: tensor}, views of the model's parameters; a token table cut to
    the vocabulary starts where it did). Where several nested modules hold the same ones (a block's MLP and its one
    Linear), they are paired outermost first, and only when both sides nest as deep."""
    hf_name_of = {t.data_ptr(): name for name, t in written.items()}
    ours, theirs = {}, {}  # the HF names of a module's parameters -> the modules holding exactly those, outer first
    for name, module in model.named_modules():
        names = frozenset(hf_name_of.get(p.data_ptr()) for p in module.parameters())
        if name and names and None not in names:
            ours.setdefault(names, []).append(name)
    for name, module in hf_model.named_modules():
        names = frozenset(f"{name}.{n}" for n, _ in module.named_parameters())
        if name and names in ours:
            theirs.setdefault(names, []).append(name)
    return {rafale: hf for names, modules in ours.items() if len(modules) == len(theirs.get(names, ()))
            for rafale, hf in zip(modules, theirs[names])}


def _first_tensor(value) -> Optional[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)):
        return next((v for v in value if isinstance(v, torch.Tensor)), None)
    if isinstance(value, dict):
        return value.get("hidden_states", _first_tensor(list(value.values())))
    return None


class _Recorder:
    """Each paired module's first input and output, and on rafale's side the order its modules finish in."""

    def __init__(self, modules: dict):
        self.seen, self.order = {}, []
        self.handles = [m.register_forward_hook(self.hook(name), with_kwargs=True) for name, m in modules.items()]

    def hook(self, name):
        def record(module, args, kwargs, output):
            if name not in self.seen:
                self.seen[name] = (_first_tensor(args) if _first_tensor(args) is not None else _first_tensor(kwargs),
                                   _first_tensor(output))
                self.order.append(name)
        return record

    def remove(self):
        for handle in self.handles:
            handle.remove()


def _block_of(name: str) -> Optional[str]:
    """'layers.3.mlp.dense_4h_to_h' -> 'layers.3', the entry of a list of blocks it sits in."""
    match = re.match(r"(.*?\.\d+)(\.|$)", name)
    return match.group(1) if match else None


def _where_it_differs(ours: _Recorder, theirs: _Recorder, pairs: dict, mask) -> str:
    """The first module, in the order rafale's forward finishes them, whose output differs from its twin's."""
    agreed = None
    for name in ours.order:
        if pairs[name] not in theirs.seen:
            continue
        (x, y), (hf_x, hf_y) = ours.seen[name], theirs.seen[pairs[name]]
        if y is None or hf_y is None or y.shape != hf_y.shape:
            continue
        out = _difference(y, hf_y, mask)
        if out <= allowed_difference(hf_y, mask)[0]:  # rounding of the module's output scale agrees
            agreed = name
            continue
        block = _block_of(name)
        inside = f"in block {block}, " if block and block != name else ""
        twin = f" (transformers' {pairs[name]})"
        into = _difference(x, hf_x, mask) if x is not None and hf_x is not None and x.shape == hf_x.shape else None
        if into is not None and into > allowed_difference(hf_x, mask)[0]:
            after = f", after {agreed} agreed" if agreed else ""
            return (f"it first differs {inside}at the input of {name}{twin}, by {into:.2g}{after}: code with no "
                    "parameters between them (an activation, a residual, a reshape, a mask) computes something else")
        if into is None:
            return f"it first differs {inside}at the output of {name}{twin}, by {out:.2g}"
        why = (": its parts with parameters agree, so its own code (an activation, a residual, a reshape, a mask) "
               "computes something else") if agreed and agreed.startswith(name + ".") else ""
        return f"it first differs {inside}in {name}{twin}: its input agrees, its output differs by {out:.2g}{why}"
    if agreed:
        return f"every module compared agrees, up to {agreed}: it differs after it"
    return "no module could be compared"


# ----------------------------------------------------------------------------------------------------
# The check


def _fp32_cpu_copy(model: nn.Module) -> nn.Module:
    """The model itself when it is already fp32 on the CPU, else a copy that is (the training model stays put)."""
    tensors = list(model.parameters()) + list(model.buffers())
    if all(t.device.type == "cpu" and (t.dtype == torch.float32 or not t.is_floating_point()) for t in tensors):
        return model
    return copy.deepcopy(model).to(device="cpu", dtype=torch.float32)


def _load_with_transformers(folder: Path, architecture: str):
    """(the model transformers' Auto class builds from `folder`, seconds importing it)."""
    started = time.perf_counter()
    import transformers
    from transformers.utils import logging

    auto_name = _auto_class_name(architecture)
    auto = getattr(transformers, auto_name)
    getattr(transformers, architecture, None)  # its modeling file: imported here, so timed as the import
    imported = time.perf_counter() - started
    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()  # its progress bar and config notes would read as rafale's
    logging.disable_progress_bar()
    try:
        hf_model, info = auto.from_pretrained(folder, dtype=torch.float32, local_files_only=True,
                                              output_loading_info=True)
    except Exception as err:  # transformers cannot read what was written
        raise ExportRefused(f"transformers' {auto_name} cannot load it: {type(err).__name__}: {err}") from None
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()
    problems = {key: value for key, value in info.items() if value and key != "error_msgs"}
    if type(hf_model).__name__ != architecture or problems:
        built = type(hf_model).__name__
        raise ExportRefused(f"transformers' {auto_name} builds {built} from it, not exactly {architecture}: "
                            f"{problems or 'another class'}")
    return hf_model.eval(), imported


@torch.no_grad()
def prove_export(model: nn.Module, folder: Path) -> Proof:
    """Load the export in `folder` with transformers and compare its outputs with `model`'s (the nn.Module that was
    written there) on a fixed probe, in fp32 on the CPU. The Proof, or ExportRefused saying by how much they differ
    and where it first arises."""
    from rafale.models.hf import family_and_architecture  # the architecture written, its head, its names

    started = time.perf_counter()
    family, architecture = family_and_architecture(model)
    head = family.hf.architectures[architecture]
    if head not in PROBES:
        raise WeightsError(f"the export check has no probe for the head {head!r}: add one to PROBES in {__name__}")
    make_probe, run_ours, theirs_of = PROBES[head]
    hf_config = json.loads((folder / "config.json").read_text())
    hf_model, imported = _load_with_transformers(folder, architecture)

    ours_model = _fp32_cpu_copy(model)
    was_training = ours_model.training
    probe = make_probe(hf_config, ours_model.cfg, family.hf.max_length(ours_model.cfg))
    vocab_size = hf_config.get("vocab_size") or hf_config["text_config"]["vocab_size"]
    pairs = _paired_modules(ours_model, hf_model, family.hf.tensors(ours_model, architecture, vocab_size))
    hf_modules, our_modules = dict(hf_model.named_modules()), dict(ours_model.named_modules())
    ours = _Recorder({name: our_modules[name] for name in pairs})
    theirs = _Recorder({hf_name: hf_modules[hf_name] for hf_name in pairs.values()})
    try:
        ours_model.eval()
        with torch.autocast("cpu", enabled=False):
            ours_out = run_ours(ours_model, probe.inputs)
            theirs_out = theirs_of(hf_model(**probe.inputs))
    finally:
        ours.remove()
        theirs.remove()
        ours_model.train(was_training)
    worst = _difference(ours_out, theirs_out, probe.mask)
    allowed, scale = allowed_difference(theirs_out, probe.mask)
    seconds = time.perf_counter() - started
    if not worst <= allowed:  # also NaN
        where = _where_it_differs(ours, theirs, pairs, probe.mask)
        raise ExportRefused(
            f"transformers' {architecture} computes other outputs than the model written: max |difference| "
            f"{worst:.2g} > {allowed:.2g}, {TOLERANCE:.0e} x (1 + max |output| {scale:.3g}), on {probe.words} "
            f"(fp32 on the CPU); {where} (checked in {seconds:.2f} s)"
        )
    return Proof(architecture, worst, allowed, scale, probe.words, seconds, imported)
