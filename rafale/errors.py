"""Errors and constants every part of rafale shares. A leaf module: it imports nothing from rafale.

Each error names what the user should change (a config key, a file, a column); the CLI prints it in one line
and exits non-zero.
"""

# label id that losses and metrics skip: padding, the positions past a block's end, unmasked MLM tokens
IGNORE_INDEX = -100


class RafaleError(Exception):
    """An error in what the user asked for; the CLI prints it in one line and exits non-zero."""


class ConfigError(RafaleError):
    """A config value that cannot work, named by its key path (e.g. 'training.lr')."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"config error at '{key}': {message}" if key else f"config error: {message}")


class DataError(RafaleError):
    """A data source, tokenizer or cache that cannot give the data the config asks for."""


class WeightsError(RafaleError):
    """Weights that cannot be read or written in Hugging Face format (missing, unexpected or unnamed tensors)."""


class CheckpointError(RafaleError):
    """A Composer checkpoint that cannot be read safely."""
