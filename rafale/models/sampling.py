"""How generation picks each next token from the logits: greedy, or sampled with a temperature, top-k and top-p.

Apart from rafale/models/decoder.py so that a new sampling rule is an edit here, not in the model.
"""

import torch


def pick_next_token(logits, temperature: float = 0.0, top_k=None, top_p=None, generator=None):
    """The next token of each row from logits (B, V): the argmax, or a sample from the tempered, top-k and
    top-p (nucleus) filtered distribution."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # drop a token when the ones before it already reach top_p (the most likely token always stays)
        drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= top_p
        logits = logits.masked_fill(drop_sorted.scatter(1, order, drop_sorted), float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
