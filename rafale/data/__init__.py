"""Data: text (or images and captions) in, cached examples out, and the collators that make them batches.

    sources.py         the data.source kinds (.txt/.jsonl/.json/.parquet/.csv files, saved folders, hub, stories)
    tokenizers.py      training and loading tokenizers, their special ids
    cache.py           the DataPipe base class: fingerprint, cache folder, build, PreparedData, the data summary
    causal_lm.py       one file per task: its DataPipe subclass and its collator
    mlm.py, classification.py  (and encoder.py, the framing and padding the two share)
    image_text.py      (also the image-text sources, image conversion and text/pixel preprocessing)

Nothing here imports rafale.models: what a model family wants of its data (the tokenizer to train, CLIP's or
SigLIP's text length and pixel normalisation) comes in as plain keyword arguments of the datapipe.
"""

from rafale.data.causal_lm import CausalLMDataPipe
from rafale.data.classification import ClassificationDataPipe
from rafale.data.image_text import ImageTextDataPipe
from rafale.data.mlm import MLMDataPipe

# model.task -> the datapipe that prepares its data and makes its batches. Adding a task is one file in
# rafale/data (its DataPipe subclass and collator) plus one line here; its `head` says which families train on it.
DATAPIPES = {
    "causal_lm": CausalLMDataPipe,
    "mlm": MLMDataPipe,
    "classification": ClassificationDataPipe,
    "contrastive": ImageTextDataPipe,
}
