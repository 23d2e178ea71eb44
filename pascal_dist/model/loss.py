"""Mean cross-entropy of a linear head, computed in token chunks so that the (tokens x vocab) logits never exist whole.

At the reference micro-batch the logits are 16,384 x 8,192: 256 MiB in bf16, and the usual
`F.cross_entropy(logits.float(), ...)` keeps an fp32 copy, its log-softmax and, in backward, an fp32
gradient of the same size: about 1.5 GiB of a 7.5 GiB budget for a tensor nobody reads. Here each chunk's
logits live only while that chunk's loss and gradients are computed, and the gradients are computed in
forward (the loss is the last op, so its gradient is known up to the scalar that backward receives, as in
Liger-Kernel's fused linear cross-entropy). The matmuls are the same three as the unchunked head's, so it
costs no extra FLOPs; what it saves for backward is d hidden (tokens x d) and d weight (vocab x d).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

CHUNK_LOGITS = 2**25  # logits per chunk: 128 MiB in fp32; at vocab 8192, 4096 tokens (4 chunks at the reference batch)


def chunk_tokens(vocab: int) -> int:
    return max(1, CHUNK_LOGITS // vocab)


def _compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype the head's matmuls would run in: autocast's when it is on (the plain loop), else the input's.
    Autocast leaves float64 matmuls alone, and so does this."""
    dev = x.device.type
    autocast = torch.is_autocast_enabled(dev) and x.dtype != torch.float64
    return torch.get_autocast_dtype(dev) if autocast else x.dtype


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for bf16/fp16/fp32 matmuls (what `.float()` gives), float64 for float64 (tests, references)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunk_softmax(hs: Tensor, weight: Tensor, ts: Tensor) -> tuple[Tensor, Tensor]:
    """(softmax (n, V) in fp32, the chunk's summed loss). The softmax is written over the logits in place: one
    fp32 chunk is the whole working set (eager torch.logsumexp would allocate a second)."""
    logits = hs @ weight.t()  # rounded to the compute dtype first, exactly like nn.Linear then .float()
    logits = logits.to(_accumulate_dtype(logits.dtype))
    target = logits.gather(1, ts[:, None])
    peak = logits.amax(dim=-1, keepdim=True)
    probs = logits.sub_(peak).exp_()
    total = probs.sum(dim=-1, keepdim=True)
    loss = (peak + total.log() - target).sum()  # log-sum-exp minus the target's logit
    return probs.div_(total), loss


def _chunked(h: Tensor, weight: Tensor, targets: Tensor, chunk: int, grads: bool):
    """(the summed loss, d sum / d h, d sum / d weight), chunk by chunk; the gradients None unless `grads`. They
    are of the sum, not the mean: the 1/N (and any loss scale) is applied in backward, so that an fp16 loss scale
    multiplies them before they can underflow."""
    dtype = _compute_dtype(h)
    with torch.autocast(h.device.type, enabled=False):
        hc, wc = h.to(dtype), weight.to(dtype)
        acc = _accumulate_dtype(dtype)
        loss = torch.zeros((), device=h.device, dtype=acc)
        grad_h = torch.empty_like(hc) if grads else None
        grad_w = torch.zeros(weight.shape, device=h.device, dtype=acc) if grads else None
        for s in range(0, h.size(0), chunk):
            hs, ts = hc[s : s + chunk], targets[s : s + chunk]
            g, chunk_loss = _chunk_softmax(hs, wc, ts)
            loss += chunk_loss
            if grads:  # d loss / d logits = softmax - onehot
                g.scatter_add_(1, ts[:, None], torch.full_like(ts[:, None], -1.0, dtype=g.dtype))
                g = g.to(dtype)
                grad_h[s : s + chunk] = g @ wc
                grad_w += (g.t() @ hs).to(acc)
    return loss, grad_h, grad_w


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, h: Tensor, weight: Tensor, targets: Tensor, chunk: int) -> Tensor:
        loss, grad_h, grad_w = _chunked(h, weight, targets, chunk, grads=True)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.n, ctx.dtypes = h.size(0), (h.dtype, weight.dtype)
        return loss / h.size(0)

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor) -> tuple[Tensor, Tensor, None, None]:
        if torch.is_grad_enabled():  # backward(create_graph=True): the saved gradients have no graph to go through
            raise RuntimeError(
                "linear_cross_entropy: no double backward (create_graph=True); its gradients are "
                "computed in forward. Use F.cross_entropy on the logits for higher-order gradients"
            )
        grad_h, grad_w = ctx.saved_tensors
        scale = grad_loss / ctx.n
        # scaled in fp32 (grad_w already is): a half-precision grad_h would round the scale to half first, and an
        # fp16 loss scale over 65504 would turn every gradient into inf
        acc = _accumulate_dtype(grad_h.dtype)
        return (grad_h.to(acc) * scale).to(ctx.dtypes[0]), (grad_w * scale).to(ctx.dtypes[1]), None, None


def linear_cross_entropy(h: Tensor, weight: Tensor, targets: Tensor, chunk: int | None = None) -> Tensor:
    """mean_i CE(h_i @ weight^T, targets_i) in fp32 (fp64 for fp64 inputs), for h (N, d), weight (V, d), targets (N,).

    Equal to `F.cross_entropy((h @ weight.t()).float(), targets)` (the logits rounded to the compute dtype
    as nn.Linear would), with gradients for h and weight; every target counts (no ignore index).
    `chunk` tokens at a time (default: CHUNK_LOGITS / V). Without grad it only computes the loss.
    """
    chunk = chunk or chunk_tokens(weight.size(0))
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(h, weight, targets, chunk)
    return _chunked(h, weight, targets, chunk, grads=False)[0] / h.size(0)
