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

import torch
from torch.autograd.function import once_differentiable


class LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, vocab_size, ignore_index, chunk_rows, compute_dtype, grad_hidden_needed, grad_weight_needed):
        acc = torch.promote_types(compute_dtype, torch.float32)
        n_rows, v_pad = hidden.shape[0], weight.shape[0]
        w = weight.to(compute_dtype)
        loss = torch.zeros((), dtype=acc, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if grad_hidden_needed else None
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if grad_weight_needed else None
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, n_rows, chunk_rows):
                h = hidden[start : start + chunk_rows].to(compute_dtype)
                t = targets[start : start + chunk_rows]
                logits = (h @ w.t()).to(acc)  # [n, V_pad]
                if vocab_size < v_pad:
                    logits[:, vocab_size:] = float("-inf")
                valid = t != ignore_index
                safe = torch.where(valid, t, 0)
                lse = torch.logsumexp(logits, dim=-1)
                target_logit = logits.gather(1, safe[:, None])[:, 0]
                loss = loss + torch.where(valid, lse - target_logit, 0.0).sum()
                if grad_hidden is None and grad_weight is None:
                    continue
                # d loss / d logits = softmax - onehot on rows not ignored; 0 on padded columns.
                grad_logits = logits.sub_(lse[:, None]).exp_()
                grad_logits.scatter_add_(1, safe[:, None], torch.full_like(lse[:, None], -1.0))
                grad_logits.mul_(valid[:, None])
                grad_logits = grad_logits.to(compute_dtype)
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
