"""Differentiable collectives used by the sequence-parallel exchanges: one message per direction."""

from __future__ import annotations

import torch
import torch.distributed as dist


class _AllGatherStack(torch.autograd.Function):
    """Forward: all-gather x from every rank of the group, stacked [P, *x.shape].

    Backward: rank j's x fed every rank's output slot j, so its gradient is the sum over ranks
    of their slot-j gradients: one reduce-scatter (NCCL) or, where the backend lacks it (gloo),
    one all-reduce of the stacked gradients followed by taking slot j.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, group, rank: int, size: int) -> torch.Tensor:
        ctx.group, ctx.rank, ctx.size = group, rank, size
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(size)]
        dist.all_gather(parts, x, group=group)
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        if dist.get_backend(ctx.group) == dist.Backend.NCCL:
            out = grad.new_empty(grad.shape[1:])
            dist.reduce_scatter(out, list(grad.unbind(0)), group=ctx.group)
        else:
            dist.all_reduce(grad, group=ctx.group)
            out = grad[ctx.rank]
        return out, None, None, None


def all_gather_stack(x: torch.Tensor, group, rank: int, size: int) -> torch.Tensor:
    """[P, *x.shape]: x of every rank of ``group`` in rank order; gradients flow back to the owners."""
    return _AllGatherStack.apply(x, group, rank, size)
