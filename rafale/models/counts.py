"""What a model's size is, counted from its parts: N, the non-embedding parameters a scaling law fits.

Here, in the models layer, so that everything that reports a size (the run's record, `rafale models`, the law)
counts the same way without importing the run.
"""

from torch import nn


def non_embedding_parameters(module) -> int:
    """The parameters outside the vocabulary matrices, N of a scaling law (Kaplan et al. 2020): every parameter but
    the embedding tables (nn.Embedding: token, and position where a model has one) and the output projection onto
    the vocabulary, tied or not. Shared ones count once.

    The projection is the one the model names (`output_head()`: the decoder's head, the MLM decoder), never
    guessed from its shape: a hidden Linear as wide as the vocabulary (an MLP's up projection when the padded
    vocabulary equals intermediate_size) is a layer like any other."""
    left_out = {id(m.weight) for m in module.modules() if isinstance(m, nn.Embedding)}
    output_head = getattr(module, "output_head", None)
    if output_head is not None:
        left_out |= {id(p) for p in output_head().parameters()}
    counted = {id(p): p.numel() for p in module.parameters() if id(p) not in left_out}
    return sum(counted.values())
