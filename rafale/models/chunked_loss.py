"""Cross-entropy in chunks: the training loss of a decoder without ever holding its (N, vocab) logits.

The logits of a small model with a 50k vocabulary are its biggest tensor (13 GB in fp32 for pythia-70m at T=2048,
batch 32), and the plain loss keeps them, and their softmax, for backward. `chunked_cross_entropy` computes the same
loss and gradients a chunk of rows at a time (tested against the plain computation in test/test_chunked_loss.py).
The module imports torch only; rafale/models/decoder.py calls it when labels are given.
"""

from typing import Optional

import torch
import torch.nn.functional as F

from rafale.errors import IGNORE_INDEX


LOSS_CHUNK_ELEMENTS = 2**22  # logits per chunk: 16 MiB in fp32, small enough for the allocator to reuse: a chunk
# above 32 MiB is mapped afresh and page-faulted every time (the default job's 2,816-token vocabulary: a whole
# batch in one 23-46 MiB chunk ran its loss 15-17% slower than chunks of 2**21-2**22 on this project's CPU)
LOSS_CHUNK_MIN_ROWS = 640  # but never fewer rows: each chunk re-reads the output embedding and its gradient (a 50k
# vocabulary at 2**22 would be 83 rows, ~10% slower than 667; 640-667 rows, 128 MiB, was the fastest there)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Forward walks over chunks of rows; each chunk's logits give its share of the loss and, at once, its
    gradients (softmax - one_hot) / count, multiplied back into grad_hidden and grad_weight; then they are
    dropped. Backward only scales those by the incoming gradient. The FLOPs of the plain computation (nothing
    recomputed), the memory of one chunk. Under autocast the matmuls run in the autocast dtype, as autograd's
    would, with the weight cast once rather than per chunk; the softmax and the sums are fp32."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_rows: int, want_grad: bool, cap: Optional[float] = None):
        # hidden (N, C), weight (V, C), labels (N,) with IGNORE_INDEX where no token is predicted
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
        count = (labels != IGNORE_INDEX).sum().clamp(min=1)  # the mean is over the real labels
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.zeros_like(hidden) if want_grad else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if want_grad else None
        with torch.autocast(device, enabled=False):
            w = weight.to(dtype)  # (V, C)
            for start in range(0, hidden.shape[0], chunk_rows):
                h, y = hidden[start : start + chunk_rows].to(dtype), labels[start : start + chunk_rows]  # (n, C), (n,)
                keep = (y != IGNORE_INDEX).float()  # (n,)
                target = y.clamp(min=0)[:, None]  # (n, 1), ignored rows point at token 0 and are zeroed by keep
                logits = F.linear(h, w).float()  # (n, V)
                if cap is not None:  # soft-capped: cap * tanh(logits / cap), whose derivative is 1 - tanh^2
                    tanh = logits.div_(cap).tanh_()  # (n, V), in the logits' memory
                    logits = tanh * cap  # (n, V)
                picked = logits.gather(1, target).squeeze(1)  # (n,) the labels' logits
                # logsumexp in the logits' own memory (torch.logsumexp would allocate another (n, V))
                top = logits.amax(dim=-1, keepdim=True)  # (n, 1)
                exps = logits.sub_(top).exp_()  # (n, V) exp(logits - top)
                sums = exps.sum(dim=-1, keepdim=True)  # (n, 1)
                lse = (top + sums.log()).squeeze(1)  # (n,)
                loss += ((lse - picked) * keep).sum()
                if want_grad:
                    weight_of_row = (keep / count)[:, None]  # (n, 1)
                    probs = exps.mul_(weight_of_row / sums)  # softmax * keep / count, in the same memory (one pass)
                    probs.scatter_add_(1, target, -weight_of_row)  # - one_hot * keep / count: (n, V) d loss / d logits
                    if cap is not None:
                        probs.mul_(tanh.square_().neg_().add_(1))  # (n, V) d loss / d uncapped logits
                    probs = probs.to(dtype)
                    grad_hidden[start : start + chunk_rows] = probs @ w  # (n, C)
                    if dtype == grad_weight.dtype:
                        grad_weight.addmm_(probs.t(), h)  # (V, C), accumulated in place
                    else:  # bf16 products summed in fp32
                        grad_weight += probs.t() @ h
        if want_grad:
            ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
        return loss / count

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_loss, grad_weight * grad_loss, None, None, None, None


def chunked_cross_entropy(hidden, weight, labels, chunk_rows: Optional[int] = None, softcap: Optional[float] = None):
    """Mean cross-entropy of the logits hidden @ weight.T against labels (IGNORE_INDEX skipped), equal to
    F.cross_entropy(F.linear(hidden, weight).float(), labels, ignore_index=IGNORE_INDEX) without ever holding
    the (N, V) logits. hidden: (N, C); weight: (V, C); labels: (N,). softcap: the logits soft-capped first."""
    if chunk_rows is None:
        chunk_rows = max(LOSS_CHUNK_MIN_ROWS, LOSS_CHUNK_ELEMENTS // weight.shape[0])
    # forward runs without grad mode, so whether a backward can follow is decided here
    want_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, labels, chunk_rows, want_grad, softcap)
