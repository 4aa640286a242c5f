"""rafale's models: plain nn.Modules (decoder.py, encoder.py, clip.py); one file per family with its presets, heads,
builder and Hugging Face format (pythia.py, bert.py, contrastive.py), listed in families.py; their thin Composer
wrappers (composer.py); and the Hugging Face machinery they share (hf.py).

`rafale.models.from_pretrained` and `save_pretrained` are hf.py's, loaded on first use: importing one model file
loads that file only."""

__all__ = ["from_pretrained", "save_pretrained"]


def __getattr__(name):
    if name in __all__:
        from rafale.models import hf

        return getattr(hf, name)
    raise AttributeError(f"module 'rafale.models' has no attribute {name!r}")
