"""rafale: a simple, hackable CLI for training small transformers with Composer."""

__version__ = "0.1.0"
