"""rafale's models: plain nn.Modules, one file per family, and their thin Composer wrappers."""

from rafale.models.hf import from_pretrained, save_pretrained

__all__ = ["from_pretrained", "save_pretrained"]
