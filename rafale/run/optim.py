"""Optimizers: `training.optimizer: {name: ..., <its arguments>}` -> a torch Optimizer with rafale's parameter groups.

    training:
      lr: 3.0e-3                      # every optimizer's peak learning rate (Composer's schedule scales it)
      weight_decay: 0.1               # on matrices only: never on biases and norms (nor embeddings, with
      decay_embeddings: false         #   decay_embeddings: false)
      layer_decay: 0.8                # optional: block i learns at lr * 0.8^(L - i) (fine-tuning)
      optimizer: {name: lion, betas: [0.9, 0.99]}

`OPTIMIZERS` below is the registry: a plain dict of name -> factory; adding an optimizer is one function and one
line. A dotted path (`name: torch.optim.SGD`) names any `torch.optim.Optimizer` class instead. Each factory gets
the parameter groups and the mapping's other keys, which are checked against the class's own arguments, so a
typo is a ConfigError naming `training.optimizer.<arg>`. YAML 1.1 reads `5e-3` (no dot) as a string, so a numeric
string given for an argument that takes a number (by its default or its annotation) becomes that number.

Schedule-free AdamW keeps two sequences of weights: training steps at one (y), evaluation and export want the
averaged one (x). `schedule_free_switch()` switches the optimizer to train mode for each batch only, so evaluation,
checkpoints and the export always see (and save) the averaged weights, and a resumed run repeats exactly the
operations of an uninterrupted one.
"""

import importlib
import inspect
import math
import os
import re
import sys
import types
import typing
from fractions import Fraction

import torch
from torch import nn

from rafale.config import MUP_OPTIMIZERS, exact_time
from rafale.errors import ConfigError, RafaleError
from rafale.models.mup import width_mult

OPTIM_EXTRA = "pip install 'rafale[optim]'"
DEFAULT_OPTIMIZER = "adamw"

# keys of training.optimizer that rafale sets itself, and where the user sets them instead
RESERVED = {
    "lr": "training.lr",
    "weight_decay": "training.weight_decay",
    "params": "the model",
    "warmup_steps": "training.warmup",
    "adamw_lr": "training.lr",
    "adamw_wd": "training.weight_decay",
}


class MissingPackage(RafaleError):
    pass


# ----------------------------------------------------------------------------------------------------
# parameter groups: weight decay, layerwise learning rates, and which matrices Muon takes

_BLOCK = re.compile(r"(?:^|\.)(?:layers|layer)\.(\d+)\.")  # decoder `layers.3.`, encoder `encoder.layer.3.`
_EMBEDDINGS = re.compile(r"(?:^|\.)(?:embed|embeddings)\.")  # decoder `embed.`, encoder `embeddings.`


def num_blocks(model: nn.Module) -> int:
    return 1 + max((int(m.group(1)) for name, _ in model.named_parameters() if (m := _BLOCK.search(name))), default=-1)


def layer_depth(name: str, num_layers: int) -> int:
    """Embeddings at depth 0, block i at depth i + 1, everything after the blocks (final norm, heads) at L + 1."""
    block = _BLOCK.search(name)
    if block:
        return int(block.group(1)) + 1
    if _EMBEDDINGS.search(name):  # the MLM decoders are tied to the word embeddings, and named after them
        return 0
    return num_layers + 1


def embedding_params(model: nn.Module) -> set[int]:
    return {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}


def mup_width_mult(model: nn.Module) -> float | None:
    """muP's width multiplier m of `model` (its decoder's hidden_size / mup_base_width), or None
    for a model in the standard parametrisation."""
    for module in model.modules():
        cfg = getattr(module, "cfg", None)
        if getattr(cfg, "mup_base_width", None):
            return width_mult(cfg)
    return None


def param_groups(model: nn.Module, t: "TrainingConfig", split_hidden_matrices: bool = False,
                 hidden_lr_scale: float = 1.0) -> list[dict]:
    """The model's trainable parameters in groups that share a weight decay and a learning-rate scale.

    No weight decay on biases and norm weights (vectors), nor on embeddings unless decay_embeddings. With
    layer_decay, a parameter at depth d (see layer_depth) learns at lr * layer_decay^(L + 1 - d). With
    split_hidden_matrices, the 2-D weights inside the blocks get groups of their own, marked hidden=True (Muon).
    hidden_lr_scale multiplies the lr of the 2-D weights inside the blocks: muP's 1/m for AdamW (Tensor Programs V,
    table 3: "hidden weights", whose fan-in grows with width); the embeddings, the head, norms and biases keep lr."""
    embeddings = embedding_params(model)
    num_layers = num_blocks(model)
    groups: dict[tuple, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = p.dim() >= 2 and (t.decay_embeddings or id(p) not in embeddings)
        depth = layer_depth(name, num_layers) if t.layer_decay is not None else 0
        block_matrix = p.dim() >= 2 and _BLOCK.search(name) is not None
        hidden = split_hidden_matrices and block_matrix
        width_scaled = hidden_lr_scale != 1.0 and block_matrix
        key = (hidden, depth, decay, width_scaled)
        if key not in groups:
            scale = t.layer_decay ** (num_layers + 1 - depth) if t.layer_decay is not None else 1.0
            groups[key] = {"params": [], "weight_decay": t.weight_decay if decay else 0.0,
                           "lr_scale": scale * (hidden_lr_scale if width_scaled else 1.0), "hidden": hidden}
        groups[key]["params"].append(p)
    # Muon's matrices first, then shallow before deep, decayed before not (the order rafale's AdamW always had)
    return [groups[key] for key in sorted(groups, key=lambda k: (k[0] is False, k[1], k[2] is False, k[3]))]


def groups_with_lr(groups: list[dict], lr: float, hidden_lr: float | None = None) -> list[dict]:
    """Groups as torch wants them: lr_scale and hidden turned into each group's own lr (Composer's schedulers
    then scale each group's initial lr, so layerwise ratios hold all along the schedule)."""
    out = []
    for g in groups:
        base = hidden_lr if g["hidden"] and hidden_lr is not None else lr
        out.append({"params": g["params"], "weight_decay": g["weight_decay"], "lr": base * g["lr_scale"]})
    return out


# ----------------------------------------------------------------------------------------------------
# the registry


def _import(module: str):
    """A package of the optim extra, imported only when its optimizer is asked for."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingPackage(f"training.optimizer needs the package {module}; install it with {OPTIM_EXTRA}") from None


_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")  # what YAML 1.1 may leave a string: 5e-3


def _number(key: str, value, kind: type):
    """value as a number of `kind` (int or float) when it is a numeric string ('5e-3'); other values unchanged.
    A string that is not a number is a ConfigError naming training.optimizer.<key>."""
    if not isinstance(value, str):
        return value
    if not _NUMBER.fullmatch(value.strip()):
        raise ConfigError(f"training.optimizer.{key}", f"expected a number, got {value!r}")
    number = float(value)
    # an int argument given as '1e3' gets 1000; '1.5' stays a float, as YAML's 1.5 would, for the class to judge
    return int(number) if kind is int and number.is_integer() else number


def _annotated_types(annotation) -> set:
    """The plain types an annotation admits (`float | None` -> {float, NoneType}); a postponed (string)
    annotation by the names it mentions."""
    if isinstance(annotation, str):
        return {t for t in (bool, int, float, str) if re.search(rf"\b{t.__name__}\b", annotation)}
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return set().union(*(_annotated_types(a) for a in typing.get_args(annotation)))
    return {annotation}


def _number_kind(parameter: inspect.Parameter) -> type | None:
    """int or float when the argument takes a number, by its default, else its annotation; None when it does not
    (or also takes words, like Muon's ns_coeffs='original', whose strings must reach the class as they are)."""
    default = parameter.default
    annotated = set() if parameter.annotation is parameter.empty else _annotated_types(parameter.annotation)
    if str in annotated or isinstance(default, (str, bool)):
        return None
    if float in annotated or isinstance(default, float):
        return float
    if int in annotated or isinstance(default, int):
        return int
    return None


def _coerce_arguments(cls, args: dict) -> dict:
    """args with numeric strings turned into numbers where cls's argument takes a number, element by element for a
    tuple of numbers (betas: ['9e-1', 0.99])."""
    parameters = inspect.signature(cls.__init__).parameters
    out = {}
    for key, value in args.items():
        parameter = parameters[key]
        default = parameter.default
        if isinstance(value, (list, tuple)) and isinstance(default, tuple) and default and all(
                isinstance(d, (int, float)) and not isinstance(d, bool) for d in default):
            kind = float if any(isinstance(d, float) for d in default) else int
            value = type(value)(_number(key, v, kind) for v in value)  # a YAML list stays a list, as before
        elif (kind := _number_kind(parameter)) is not None:
            value = _number(key, value, kind)
        out[key] = value
    return out


def construct_optimizer(cls, groups, defaults: dict, args: dict):
    """cls(groups, **defaults, **args), after checking that each of args is a named argument of cls (and turning
    numeric strings into numbers where it takes a number)."""
    accepted = {n for n, p in inspect.signature(cls.__init__).parameters.items()
                if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)} - {"self", "params"}
    for key in args:
        if key in RESERVED:
            raise ConfigError(f"training.optimizer.{key}", f"is set by {RESERVED[key]}, not here")
        if key not in accepted:
            valid = ", ".join(sorted(accepted - set(RESERVED)))
            raise ConfigError(f"training.optimizer.{key}", f"{cls.__name__} has no argument {key!r}; it takes {valid}")
    args = _coerce_arguments(cls, args)
    try:
        return cls(groups, **(defaults | args))
    except (TypeError, ValueError) as err:
        raise ConfigError("training.optimizer", f"{cls.__name__}: {err}") from None


def adamw(groups, t: "TrainingConfig", args: dict, device: str):
    """AdamW, whose weight decay is decoupled from the gradient (Loshchilov & Hutter). Fused (one kernel for all
    the parameters' updates) on a GPU and on a CPU, where torch's default loop over the tensors took 540-720 ms per
    step for the 70m shape against 94 ms fused (one thread): a fifth of a 70m training step."""
    defaults = {"lr": t.lr, "betas": t.betas, "eps": t.eps, "fused": device in ("gpu", "cpu")}
    return construct_optimizer(torch.optim.AdamW, groups_with_lr(groups, t.lr), defaults, args)


def schedulefree_adamw(groups, t: "TrainingConfig", args: dict, device: str, warmup_steps: int = 0):
    """Schedule-free AdamW (Defazio et al. 2024): no decay schedule, its own warmup; evaluate the averaged weights."""
    sf = _import("schedulefree")
    defaults = {"lr": t.lr, "betas": t.betas, "eps": t.eps, "warmup_steps": warmup_steps}
    return construct_optimizer(sf.AdamWScheduleFree, groups_with_lr(groups, t.lr), defaults, args)


def soap(groups, t: "TrainingConfig", args: dict, device: str):
    """SOAP (Vyas et al. 2024): Adam in the eigenbasis of Shampoo's preconditioner (pytorch-optimizer's)."""
    po = _import("pytorch_optimizer")
    return construct_optimizer(po.SOAP, groups_with_lr(groups, t.lr), {"lr": t.lr}, args)


def lion(groups, t: "TrainingConfig", args: dict, device: str):
    """Lion (Chen et al. 2023): sign of an interpolated momentum; wants a 3-10x smaller lr than AdamW."""
    po = _import("pytorch_optimizer")
    return construct_optimizer(po.Lion, groups_with_lr(groups, t.lr), {"lr": t.lr}, args)


def muon(groups, t: "TrainingConfig", args: dict, device: str):
    """Muon (Jordan et al. 2024) on the blocks' 2-D matrices, AdamW on the rest (embeddings, head, norms, biases),
    as its authors do. training.lr, betas and eps are the AdamW part's; `lr` in the mapping is Muon's (0.02)."""
    po = _import("pytorch_optimizer")
    args = dict(args)
    muon_lr = _number("lr", args.pop("lr", 0.02), float)  # Muon's own lr never reaches construct_optimizer's coercion
    if not (isinstance(muon_lr, (int, float)) and muon_lr > 0):
        raise ConfigError("training.optimizer.lr", f"Muon's learning rate must be a positive number, got {muon_lr!r}")
    torch_groups = groups_with_lr(groups, t.lr, hidden_lr=float(muon_lr))
    for group, g in zip(torch_groups, groups):
        group["use_muon"] = g["hidden"]
    defaults = {"lr": float(muon_lr), "adamw_lr": t.lr, "adamw_betas": t.betas, "adamw_eps": t.eps}
    return construct_optimizer(po.Muon, torch_groups, defaults, args)


# name -> factory(groups, training config, the mapping's other keys, device)
OPTIMIZERS = {
    "adamw": adamw,
    "schedulefree_adamw": schedulefree_adamw,
    "soap": soap,
    "muon": muon,
    "lion": lion,
}


def import_with_working_directory(module_name: str):
    """importlib.import_module, with the working directory on the path as `python -m` has it (the `rafale` script
    starts with its own folder there instead), so a `my_optimizers.py` beside the config is found."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name != module_name.split(".")[0] or os.getcwd() in sys.path:
            raise
    sys.path.append(os.getcwd())  # last: it shadows nothing that is installed
    return importlib.import_module(module_name)


def torch_optimizer_class(path: str):
    """The Optimizer class a dotted path names (`torch.optim.SGD`, `mypackage.optim.Sophia`)."""
    module_name, _, class_name = path.rpartition(".")
    try:
        module = import_with_working_directory(module_name)
    except (ImportError, ValueError) as err:  # ValueError: an empty module name (".SGD")
        raise ConfigError("training.optimizer.name", f"cannot import {module_name} for {path}: {err}") from None
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise ConfigError("training.optimizer.name", f"{path} is not a torch.optim.Optimizer class")
    return cls


def optimizer_name(t: "TrainingConfig") -> str:
    return t.optimizer.get("name", DEFAULT_OPTIMIZER)


def is_schedule_free(t: "TrainingConfig") -> bool:
    return optimizer_name(t) == "schedulefree_adamw"


def mup_hidden_lr_scale(model: nn.Module, name: str) -> float:
    """The lr scale of the blocks' matrices: 1/m for AdamW under muP, 1 otherwise. Muon keeps 1: its update is
    orthogonalised and scaled by sqrt(max(1, rows / cols)) (pytorch-optimizer's default, Keller Jordan's), so its
    spectral norm is lr * sqrt(max(1, fan_out / fan_in)) at every width: the spectral condition for feature
    learning (Yang, Simon & Bernstein 2023), which is muP's hidden-layer rule for a matrix optimizer. Muon's
    AdamW part (embeddings, head, norms, biases) already learns at lr, as muP's AdamW rules have it. Any other
    optimizer under muP is a ConfigError (rafale.config checks it first, before the data)."""
    m = mup_width_mult(model)
    if m is None:
        return 1.0
    if name not in MUP_OPTIMIZERS:
        raise ConfigError("model.parametrization", f"mup has rules for training.optimizer.name "
                          f"{' or '.join(MUP_OPTIMIZERS)}, not {name!r}")
    return 1.0 if name == "muon" else 1.0 / m


def build_optimizer(model: nn.Module, t: "TrainingConfig", device: str, warmup_steps: int = 0):
    """The optimizer training.optimizer names, over param_groups(model). warmup_steps: schedule-free's own
    warmup, in batches (its Composer schedule stays constant)."""
    name = optimizer_name(t)
    if not isinstance(name, str):
        raise ConfigError("training.optimizer.name", f"expected a string, got {name!r}")
    args = {k: v for k, v in t.optimizer.items() if k != "name"}
    for key in args:
        if not isinstance(key, str):
            raise ConfigError(f"training.optimizer.{key}", "keys must be strings")
    groups = param_groups(model, t, split_hidden_matrices=name == "muon",
                          hidden_lr_scale=mup_hidden_lr_scale(model, name))
    if name == "schedulefree_adamw":
        return schedulefree_adamw(groups, t, args, device, warmup_steps)
    if name in OPTIMIZERS:
        return OPTIMIZERS[name](groups, t, args, device)
    if "." not in name:
        raise ConfigError("training.optimizer.name", f"unknown optimizer {name!r}; valid: {', '.join(OPTIMIZERS)}, "
                          "or the dotted path of a torch.optim.Optimizer class (torch.optim.SGD)")
    cls = torch_optimizer_class(name)
    return construct_optimizer(cls, groups_with_lr(groups, t.lr), {"lr": t.lr}, args)


def check_optimizer(t: "TrainingConfig") -> None:
    """Build the optimizer on a tiny stand-in model, so a wrong name, argument or value is a ConfigError right after
    the config loads (`rafale -c` and `rafale sweep` call it then), not after the data is prepared. A missing package
    is one too, naming the extra to install. (Not part of rafale.config's checks: building an optimizer imports
    torch's optimizers, seconds that the commands which only read a run folder do not wait for.)"""
    stand_in = nn.ModuleDict({"embed": nn.Embedding(4, 4), "layers": nn.ModuleList([nn.Linear(4, 4)]),
                              "head": nn.Linear(4, 4)})
    try:
        build_optimizer(stand_in, t, "cpu")
    except MissingPackage as err:
        raise ConfigError("training.optimizer.name", str(err)) from None


# ----------------------------------------------------------------------------------------------------
# time strings in batches (warmups, decays, branch points, intervals)
#
# Every conversion is exact (fractions.Fraction of the number as written) and a time that does not land on a batch
# boundary is rounded UP to the next whole batch: 0.07dur of 100 batches is 7, 1ep of 49 batches is 49, and 0.05dur
# of 49 batches (2.45) is 3. A float quotient rounded up made those 8 and 50 (0.07 * 100 = 7.000000000000001).


def exact_batches(time: str, max_duration: str, batches_per_epoch: int, batch_size: int, tokens_per_sample: int,
                  key: str = "training.warmup") -> Fraction:
    """A Composer time string as an exact (maybe fractional) number of batches; a fraction of the run ('0.1dur')
    is that share of max_duration's whole batches. key: the config key named if the unit has no batch count."""
    value, unit = exact_time(time)
    if unit == "dur":
        return value * batches_in(max_duration, max_duration, batches_per_epoch, batch_size, tokens_per_sample,
                                  "training.max_duration")
    per_batch = {"ba": 1, "ep": Fraction(1, batches_per_epoch), "sp": batch_size, "tok": batch_size * tokens_per_sample}
    if unit not in per_batch:
        raise ConfigError(key, f"cannot turn {time!r} into batches (give it in ba, ep, sp, tok or dur)")
    return value / per_batch[unit]


def batches_in(time: str, max_duration: str, batches_per_epoch: int, batch_size: int, tokens_per_sample: int,
               key: str = "training.warmup") -> int:
    """A Composer time string (training.warmup, a branch point) as a whole number of batches, rounded up."""
    return math.ceil(exact_batches(time, max_duration, batches_per_epoch, batch_size, tokens_per_sample, key))


def whole_time(time: str, max_duration: str, batches_per_epoch: int | None) -> str:
    """A fraction of the run ('0.07dur') as a whole count in max_duration's unit (batches when that is epochs),
    rounded up; any other time unchanged. For what Composer converts itself with floats (a cosine warmup, eval and
    save intervals): it makes 0.07dur of 100ba 8 batches for an interval (ceil of 7.000000000000001), 0.29dur of
    100ba 28 for a warmup (int of 28.999999999999996)."""
    value, unit = exact_time(time)
    if unit != "dur" or value == 0:
        return time
    total, total_unit = exact_time(max_duration)
    if total_unit == "ep":
        if batches_per_epoch is None:
            return time
        total, total_unit = total * batches_per_epoch, "ba"
    return f"{math.ceil(value * total)}{total_unit}"


# ----------------------------------------------------------------------------------------------------
# warmup-stable-decay


DECAY_SHAPES = {  # progress p through the decay (0 -> 1) -> the rate's factor (1 -> 0)
    "linear": lambda p: 1 - p,
    "cosine": lambda p: 0.5 * (1 + math.cos(math.pi * p)),
    "1-sqrt": lambda p: 1 - math.sqrt(p),  # Hägele et al. 2024 ("Scaling laws and compute-optimal training beyond fixed training durations")
}


class WarmupStableDecay:
    """The factor of lr for batch i (counted from 0): i / warmup during the warmup, then 1 until decay_start, then
    shape((i - decay_start) / (end - decay_start)), which is 0 at `end` (max_duration); all in batches. A Composer
    scheduler (called with the State); rafale.run.trainer_parts.ScheduleAtBatchStart applies it when batch i starts.

    One run's stable phase serves every budget: a cooldown branch (training.branch_from) is the same schedule with
    decay_start at the batch it branches at and `end` at its own budget, so up to its branch point it ran exactly
    the parent's rates."""

    def __init__(self, warmup: int, decay_start: int, end: int, shape: str = "1-sqrt"):
        if not 0 <= warmup <= decay_start < end:
            raise ConfigError("training.decay_fraction", f"the warmup ({warmup} batches) must end before the decay "
                              f"starts (batch {decay_start}), which must come before the end (batch {end})")
        self.warmup, self.decay_start, self.end, self.shape = warmup, decay_start, end, DECAY_SHAPES[shape]

    def factor(self, batch: int) -> float:
        if batch < self.warmup:
            return batch / self.warmup
        if batch < self.decay_start:
            return 1.0
        return self.shape(min((batch - self.decay_start) / (self.end - self.decay_start), 1.0))

    def __call__(self, state, ssr: float = 1.0) -> float:
        return self.factor(int(state.timestamp.batch))


def wsd_batches(t: "TrainingConfig", batches_per_epoch: int, tokens_per_sample: int) -> tuple[int, int, int]:
    """(warmup, decay_start, end) in batches: the decay starts at training.branch_from.at for a branch that names
    it, else decay_fraction of the run's batches (rounded up) before the end. An epoch of 49 batches ends at 49."""
    def batches(time: str, key: str) -> int:
        return batches_in(time, t.max_duration, batches_per_epoch, t.batch_size, tokens_per_sample, key)

    end = batches(t.max_duration, "training.max_duration")
    at = (t.branch_from or {}).get("at")
    # the decay covers decay_fraction of the batches, rounded up as every time is (Fraction of its repr: 0.2 is 1/5)
    decay = math.ceil(Fraction(repr(t.decay_fraction)) * end)
    decay_start = batches(str(at), "training.branch_from.at") if at is not None else end - decay
    return batches(t.warmup, "training.warmup"), decay_start, end


# ----------------------------------------------------------------------------------------------------
# schedule-free: train/eval modes around each batch (its warmup in batches: batches_in above)


def schedule_free_switch():
    """A Composer callback: train mode for each training batch only, eval mode (the averaged weights x) elsewhere.

    Everything that reads the weights between batches (evaluation, checkpoint saves, the signal handler's save,
    the end-of-run export) sees x, and a checkpoint holds x with the optimizer in eval mode. Switching around every
    batch, not only around those events, makes a resumed run perform exactly the operations of an uninterrupted
    one. Optimizers without train and eval methods (all but schedule-free) are left alone. (Composer is imported here
    only, so the rest of this module serves another trainer as well.)"""
    from composer import Callback

    def switchable(state):
        return [o for o in state.optimizers if callable(getattr(o, "train", None)) and callable(getattr(o, "eval", None))]

    class ScheduleFreeSwitch(Callback):
        def before_load(self, state, logger):
            # loading a checkpoint takes one lr-0 step to create the optimizer's state, which needs train mode
            for optimizer in switchable(state):
                optimizer.train()

        def after_load(self, state, logger):
            for optimizer in switchable(state):
                optimizer.eval()  # no-op on the weights of a fresh run; a checkpoint comes back in eval mode

        def batch_start(self, state, logger):
            for optimizer in switchable(state):
                optimizer.train()

        def batch_end(self, state, logger):
            for optimizer in switchable(state):
                optimizer.eval()

    return ScheduleFreeSwitch()
