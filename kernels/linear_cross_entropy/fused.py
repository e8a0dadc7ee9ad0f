"""The chunked linear cross-entropy as a torch.autograd.Function.

The forward walks the rows in chunks; for each it forms the chunk's logits, the loss, and the
gradient of the loss with respect to the logits (softmax - onehot), which it turns straight into
the chunk's share of d hidden and d weight. So the [N, V] logits exist one chunk at a time and
there is no second pass over them in the backward, which only scales the stored gradients by the
incoming scalar. The price: the gradients are computed whenever autograd may need them, even if
backward is never called (the wrapper skips them when no input requires grad).

Precision: the matmuls run in the compute dtype (the autocast dtype under autocast, else the
inputs' dtype); the log-sum-exp, the softmax and the loss in float32 (float64 for float64
inputs); d weight is accumulated over chunks in that accumulation dtype.
"""

from __future__ import annotations

import warnings

import torch
from torch.autograd.function import once_differentiable


def chunk_loss_and_grad(logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor, vocab_size: int,
                        acc: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk's summed loss (``acc``) and d loss / d logits (softmax - onehot, logits' dtype) from its
    logits [n, V_pad]: 0 on padded columns and on rows not ``valid``; ``targets`` must be 0 where not valid.

    Written as whole-tensor expressions so that on GPU torch.compile fuses it into a reduction (the
    log-sum-exp) and one pointwise pass: the float32 logits are never stored.
    """
    x = logits.to(acc)
    cols = torch.arange(x.shape[1], device=x.device)
    x = torch.where(cols < vocab_size, x, float("-inf"))
    lse = torch.logsumexp(x, dim=-1)
    target_logit = x.gather(1, targets[:, None])[:, 0]
    loss = torch.where(valid, lse - target_logit, 0.0).sum()
    grad = torch.exp(x - lse[:, None]) - (cols[None, :] == targets[:, None]).to(acc)
    return loss, torch.where(valid[:, None], grad, 0.0).to(logits.dtype)


_compiled = None


def loss_and_grad_for(device: torch.device):
    """`chunk_loss_and_grad`, compiled on CUDA (once per process, on first use). Should compilation fail,
    the eager function takes over with a warning: slower, the same numbers."""
    global _compiled
    if device.type != "cuda":
        return chunk_loss_and_grad
    if _compiled is None:
        compiled = torch.compile(chunk_loss_and_grad, dynamic=False)

        def guarded(*args):
            global _compiled
            try:
                return compiled(*args)
            except Exception as e:  # a compiler failure: keep training on the eager function
                warnings.warn(f"linear_cross_entropy: torch.compile of the chunk math failed ({type(e).__name__}: {e}); "
                              "using the eager function", stacklevel=2)
                _compiled = chunk_loss_and_grad
                return chunk_loss_and_grad(*args)

        _compiled = guarded
    return _compiled


class LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, vocab_size, ignore_index, chunk_rows, compute_dtype, grad_hidden_needed, grad_weight_needed):
        acc = torch.promote_types(compute_dtype, torch.float32)
        n_rows = hidden.shape[0]
        w = weight.to(compute_dtype)
        loss = torch.zeros((), dtype=acc, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if grad_hidden_needed else None
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if grad_weight_needed else None
        loss_and_grad = loss_and_grad_for(hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, n_rows, chunk_rows):
                h = hidden[start : start + chunk_rows].to(compute_dtype)
                t = targets[start : start + chunk_rows]
                valid = t != ignore_index
                chunk_loss, grad_logits = loss_and_grad(h @ w.t(), torch.where(valid, t, 0), valid, vocab_size, acc)
                loss = loss + chunk_loss
                if grad_hidden is not None:
                    grad_hidden[start : start + chunk_rows] = grad_logits @ w
                if grad_weight is not None:
                    grad_weight += grad_logits.t() @ h
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_loss.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_loss.to(grad_weight.dtype)).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None, None, None, None
