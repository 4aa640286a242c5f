"""The model families rafale knows: `model.type` -> its Family (rafale/models/family.py), one line each.

A new family is one file beside the others (its presets, tasks, builder and, to export it, its Hugging Face
format; rafale/models/pythia.py is the smallest to copy) and one line here. Everything else (the config's help,
the datapipes, generation, lm-eval, the export, the resume guard) asks the family, not its name.
"""

from rafale.models.bert import BERT, ROBERTA
from rafale.models.contrastive import CLIP, SIGLIP
from rafale.models.llama import LLAMA
from rafale.models.pythia import PYTHIA
from rafale.models.qwen2 import QWEN2
from rafale.models.qwen3 import QWEN3

FAMILIES = {
    "pythia": PYTHIA,
    "llama": LLAMA,
    "qwen2": QWEN2,
    "qwen3": QWEN3,
    "bert": BERT,
    "roberta": ROBERTA,
    "clip": CLIP,
    "siglip": SIGLIP,
}
