"""Initialisation: a model rafale builds from scratch starts like the one transformers builds from the same config.

Every parameter is paired with its HF twin through the weight layouts of rafale/models/hf.py, and the two must
have the same mean and standard deviation (and the same all-zero rows: padding embeddings) within a tolerance
that sampling noise meets but a wrong init does not: a LayerNorm bias of 1 instead of 0, or a std off by 2x.
"""

import copy

import pytest
import torch

from rafale.models import bert, pythia
from rafale.models.hf import architectures
from rafale.models.layout import expand_names

transformers = pytest.importorskip("transformers")

VOCAB = 512
PRESETS = {"pythia": pythia.PRESETS["pythia-debug"], "bert": bert.BERT_PRESETS["bert-tiny"],
           "roberta": bert.ROBERTA_PRESETS["roberta-tiny"]}
LAYOUTS = {"pythia": lambda architecture: pythia.LAYOUT, "bert": bert.layout, "roberta": bert.layout}
STD_RTOL = 0.2  # the sample std of the smallest matrix (2 x 128 classifier) is within ~5% of the true one
MEAN_SIGMAS = 6  # a sample mean is within a few std / sqrt(n) of the true one


def rafale_model(architecture: str, seed: int = 0):
    family, head = architectures()[architecture]
    cfg = copy.deepcopy(PRESETS[family.name])
    cfg.vocab_size = VOCAB
    torch.manual_seed(seed)
    return family.hf.module(cfg, head)


def hf_model(architecture: str, model, seed: int = 1):
    family, _ = architectures()[architecture]
    fields = family.hf.config_to_hf(model.cfg, architecture, VOCAB, None)
    fields.pop("architectures")
    config = transformers.AutoConfig.for_model(**fields)
    torch.manual_seed(seed)
    return getattr(transformers, architecture)(config)


def paired_parameters(architecture: str, model, hf) -> list:
    """[(HF name, rafale tensor, HF tensor)] for every HF parameter, each tied tensor once; every rafale
    parameter must be paired too, so a module one side lacks cannot be skipped silently."""
    layout = LAYOUTS[architectures()[architecture][0].name](architecture)
    names = expand_names({**layout.names, **layout.aliases}, model)  # HF name -> rafale name
    ours = dict(model.named_parameters())
    pairs, paired = [], set()
    for hf_name, hf_param in hf.named_parameters():
        assert hf_name in names, f"{architecture}: HF parameter {hf_name} has no rafale name in hf.py's layout"
        pairs.append((hf_name, ours[names[hf_name]], hf_param))
        paired.add(id(ours[names[hf_name]]))
    unpaired = [name for name, p in ours.items() if id(p) not in paired]
    assert not unpaired, f"{architecture}: rafale parameters without an HF twin: {unpaired}"
    return pairs


def init_mismatches(architecture: str, model, hf) -> list[str]:
    """The parameters whose initial statistics differ from transformers', each with both sides' figures."""
    problems = []
    for name, ours, theirs in paired_parameters(architecture, model, hf):
        ours, theirs = ours.detach().double(), theirs.detach().double()
        mean, std = (ours.mean().item(), theirs.mean().item()), (ours.std().item(), theirs.std().item())
        mean_tol = MEAN_SIGMAS * max(std) / ours.numel() ** 0.5 + 1e-6
        if abs(mean[0] - mean[1]) > mean_tol or abs(std[0] - std[1]) > STD_RTOL * std[1] + 1e-6:
            problems.append(f"{name}: rafale mean {mean[0]:.4g} std {std[0]:.4g}, HF mean {mean[1]:.4g} std {std[1]:.4g}")
        if ours.dim() == 2:  # padding rows start at zero on both sides
            zero_rows = (ours == 0).all(dim=1).nonzero().flatten().tolist()
            hf_zero_rows = (theirs == 0).all(dim=1).nonzero().flatten().tolist()
            if zero_rows != hf_zero_rows:
                problems.append(f"{name}: all-zero rows {zero_rows} in rafale, {hf_zero_rows} in HF")
    return problems


ARCHS = ["GPTNeoXForCausalLM", "BertForMaskedLM", "BertForSequenceClassification", "RobertaForMaskedLM",
         "RobertaForSequenceClassification"]


@pytest.mark.parametrize("architecture", ARCHS)
def test_init_matches_transformers(architecture):
    model = rafale_model(architecture)
    hf = hf_model(architecture, model)
    assert init_mismatches(architecture, model, hf) == []


@pytest.mark.parametrize("mistake", ["layer_norm_bias_one", "std_halved"])
def test_init_check_catches_a_wrong_init(mistake):
    """The tolerance is tight enough: the two mistakes this test was written for both show up."""
    model = rafale_model("GPTNeoXForCausalLM")
    hf = hf_model("GPTNeoXForCausalLM", model)
    with torch.no_grad():
        if mistake == "layer_norm_bias_one":
            model.layers[0].attn_norm.bias.fill_(1.0)
        else:
            model.layers[1].mlp.down.weight.mul_(0.5)
    problems = init_mismatches("GPTNeoXForCausalLM", model, hf)
    assert len(problems) == 1, problems
