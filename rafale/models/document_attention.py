"""Document masking on a GPU (data.document_mask): causal attention within each packed document through flex
attention, which computes only the blocks of the block-diagonal causal mask that some query may see, where SDPA with
a boolean mask computes every score and then masks it.

The decoder (rafale/models/decoder.py, `uses_flex_attention`) comes here on a CUDA device only; a CPU, and a position
scheme with a mask of its own (ALiBi's bias), go through SDPA with `allowed_keys`' boolean mask, the path the tests
check against each document run alone (test/test_document_mask.py). This one's block mask is checked against that
mask with flex attention run eagerly on a CPU; the compiled CUDA kernel has no test here.
"""

import torch

_compiled_flex = None  # flex_attention compiled once (uncompiled, it materialises the scores)


def document_flex_attention(q, k, v, span, scale: float | None, enable_gqa: bool):
    """Causal attention within each document of span.document_ids (B, T): q (B, nh, T, hs), k and v (B, nkv, T, hs)
    -> (B, nh, T, hs), scores scaled by `scale` (None: 1/sqrt(hs); muP's otherwise). The block mask is built once per
    forward (span.memo) for every layer."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if "block_mask" not in span.memo:
        docs = span.document_ids  # (B, T)

        def same_document_causal(b, h, q_idx, kv_idx):
            return (kv_idx <= q_idx) & (docs[b, q_idx] == docs[b, kv_idx])

        span.memo["block_mask"] = create_block_mask(same_document_causal, B=docs.shape[0], H=None, Q_LEN=span.T,
                                                    KV_LEN=span.T, device=docs.device)
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex(q, k, v, block_mask=span.memo["block_mask"], scale=scale, enable_gqa=enable_gqa)
