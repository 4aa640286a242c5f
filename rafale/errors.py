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


def read_utf8(path, what: str) -> str:
    """The text of the file `path`; a RafaleError naming `what` (an option such as '--prompt-file'), the file and
    the line and byte of the first bytes that are not UTF-8 (a Latin-1 or UTF-16 file), instead of a traceback."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise RafaleError(f"{what}: {path} is not UTF-8 (line {line}, byte offset {err.start}: "
                          f"{data[err.start:err.start + 4]!r}); save it as UTF-8") from None
