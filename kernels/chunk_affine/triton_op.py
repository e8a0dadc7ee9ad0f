"""`chunk_affine_triton`: the Triton kernels behind a torch.autograd.Function.

Same contract as `reference.chunk_affine_ref`. The chunk the kernels use is an implementation
detail: every chunk size computes the same function (only rounding differs), so the kernels pick
what their tiles need. Scalar decay runs with the requested chunk size when it is a power of two
in [16, 128] and with the nearest one otherwise; diagonal decay evaluates its [C, C, K] decay
tensor exactly and always runs with C = 16.

Backward. Scalar decay keeps the forward's per-chunk states ([B, H, T/C, K, V] in the input
dtype: K·V/C values per token and head, 2× v's size at K = V = 128, C = 64); recomputing them
took 12% of its fwd+bwd time. Diagonal decay recomputes them: at C = 16 they would be 8× v's size.
The decay gradient comes from the other gradients: with B_t the cumulative log decay from the
sequence start, every term depends on B only through q_t ⊙ e^{B_t}, k_t ⊙ e^{-B_t} and the final
state's e^{B_T} factor, so dL/dB_t = q_t ⊙ dq_t - k_t ⊙ dk_t (plus S_T ⊙ dS_T summed over V at
t = T-1). The dq/dk kernel writes that product from its float32 dq, dk; dg is its reverse
cumulative sum over the sequence (kernel `decay_grad`).
"""

from __future__ import annotations

import torch
import triton

from psm_train.kernels.chunk_affine import MAX_TRITON_DIM
from psm_train.kernels.chunk_affine import triton_kernels as kern

KS = 16  # K slice of the diagonal decay tensor [C, C, KS]


def _pow2(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def kernel_chunk(chunk_size: int, diagonal: bool) -> int:
    """Chunk length the kernels run with for a requested chunk size (see the module docstring)."""
    if diagonal:
        return 16
    return min(128, _pow2(chunk_size))


def _meta(q: torch.Tensor, v: torch.Tensor, g: torch.Tensor, chunk_size: int) -> dict:
    B, T, H, K = q.shape
    V = v.shape[-1]
    diag = g.shape[-1] != 1
    C = kernel_chunk(chunk_size, diag)
    return dict(
        B=B, T=T, H=H, K=K, V=V, C=C, N=triton.cdiv(T, C), DIAG=diag,
        PREC="ieee" if v.dtype == torch.float32 else "tf32",
    )


def _states(k, v, g, h0, m):
    """Per-chunk incoming states [B, H, N, K, V] (input dtype) and the final state (float32)."""
    B, H, K, V = m["B"], m["H"], m["K"], m["V"]
    BK, BV = min(64, _pow2(K)), min(64, _pow2(V))
    h = k.new_empty(B, H, m["N"], K, V, dtype=v.dtype)
    ht = k.new_empty(B, H, K, V, dtype=torch.float32)
    grid = (triton.cdiv(K, BK), triton.cdiv(V, BV), B * H)
    kern.state_fwd[grid](
        k, v, g, h0 if h0 is not None else ht, h, ht, m["T"],
        H=H, K=K, V=V, C=m["C"], BK=BK, BV=BV, DIAG=m["DIAG"], USE_H0=h0 is not None, PREC=m["PREC"],
    )
    return h, ht


class _ChunkAffine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, h0, chunk_size):
        m = _meta(q, v, g, chunk_size)
        h, ht = _states(k, v, g, h0, m)
        o = torch.empty_like(v)
        grid = (1, m["N"], m["B"] * m["H"])
        kern.out_fwd[grid](
            q, k, v, g, h, o, m["T"],
            H=m["H"], K=m["K"], V=m["V"], C=m["C"], BK=_pow2(m["K"]), BV=_pow2(m["V"]), KS=KS,
            DIAG=m["DIAG"], PREC=m["PREC"],
        )
        ctx.save_for_backward(q, k, v, g, h0, None if m["DIAG"] else h, ht)
        ctx.chunk_size = chunk_size
        ctx.set_materialize_grads(False)
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g, h0, h, ht = ctx.saved_tensors
        m = _meta(q, v, g, ctx.chunk_size)
        B, T, H, K, V = m["B"], m["T"], m["H"], m["K"], m["V"]
        do = torch.zeros_like(v) if do is None else do.to(v.dtype).contiguous()
        if h is None:
            h, _ = _states(k, v, g, h0, m)

        BK, BV = min(64, _pow2(K)), min(64, _pow2(V))
        dh = torch.empty_like(h)
        dh0 = q.new_empty(B, H, K, V, dtype=torch.float32)
        kern.state_bwd[(triton.cdiv(K, BK), triton.cdiv(V, BV), B * H)](
            q, do, g, dht.float().contiguous() if dht is not None else dh0, dh, dh0, T,
            H=H, K=K, V=V, C=m["C"], BK=BK, BV=BV, DIAG=m["DIAG"], USE_DHT=dht is not None, PREC=m["PREC"],
        )

        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        # dL/dB_t, for scalar decay in one slab per K block (summed by decay_grad)
        nk = 1 if m["DIAG"] else triton.cdiv(K, BK)
        db = torch.empty(nk, *g.shape, dtype=torch.float32, device=g.device)
        if m["DIAG"]:
            kern.grads_bwd_diag[(m["N"], B * H)](
                q, k, v, g, h, do, dh, dq, dk, dv, db, T,
                H=H, K=K, V=V, C=m["C"], BK=_pow2(K), BV=_pow2(V), KS=KS, PREC=m["PREC"],
            )
        else:
            kern.dqk_bwd_scalar[(nk, m["N"], B * H)](
                q, k, v, g, h, do, dh, dq, dk, db, T, H=H, K=K, V=V, C=m["C"], BK=BK, PREC=m["PREC"],
            )
            kern.dv_bwd_scalar[(triton.cdiv(V, BV), m["N"], B * H)](
                q, k, g, dh, do, dv, T, H=H, K=K, V=V, C=m["C"], BV=BV, PREC=m["PREC"],
            )

        if dht is not None:  # the final state's e^{B_T} factor
            end = (ht * dht.float()).sum(-1)  # [B, H, K]
            db[0, :, -1] += end if m["DIAG"] else end.sum(-1, keepdim=True)
        dg = torch.empty(g.shape, dtype=torch.float32, device=g.device)
        W = g.shape[-1]
        BW = min(64, triton.next_power_of_2(W))
        kern.decay_grad[(triton.cdiv(W, BW), B * H)](
            db, dg, T, NK=nk, H=H, W=W, BT=kern.decay_grad_rows(BW), BW=BW,
        )
        dh0 = dh0.to(h0.dtype) if h0 is not None else None
        return dq, dk, dv, dg.to(g.dtype), dh0, None


def chunk_affine_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor,
    *,
    chunk_size: int,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton form of `chunk_affine_ref` (same shapes and dtypes; fp32, bf16 or fp16 inputs).

    q and k are cast to v's dtype (the matmul operand dtype); autograd casts their gradients back.
    """
    if max(q.shape[-1], v.shape[-1]) > MAX_TRITON_DIM:
        raise ValueError(f"Triton kernels take head dims up to {MAX_TRITON_DIM}, got K={q.shape[-1]}, V={v.shape[-1]}")
    q, k, v, g = (x.contiguous() for x in (q.to(v.dtype), k.to(v.dtype), v, log_decay))
    h0 = initial_state.float().contiguous() if initial_state is not None else None
    with torch.autocast(q.device.type, enabled=False):
        return _ChunkAffine.apply(q, k, v, g, h0, chunk_size)
