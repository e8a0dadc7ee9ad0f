"""`chunk_affine_triton`: the Triton kernels behind a torch.autograd.Function.

Same contract as `reference.chunk_affine_ref`. The chunk the kernels use is an implementation
detail: every chunk size computes the same function (only rounding differs), so the kernels pick
what their tiles need (`kernel_chunk`). Scalar decay runs with the requested chunk size rounded up
to a power of two and clamped to [16, 128]; diagonal decay always runs with C = 64 in sub-chunks
of 16 (see the `triton_kernels` module docstring).

The launches sit in two torch.library custom ops, `psm_train::chunk_affine_fwd` and
`psm_train::chunk_affine_bwd`, tied together by `register_autograd`: torch.compile sees each as one
opaque op with a fake implementation for its shapes, so a compiled block keeps chunk_affine in its
graph. The forward op returns its backward's residuals as extra outputs, marked non-differentiable.

Diagonal decay: every kernel loads the chunk-local cumulative log decay gc ([B, T, H, K],
float32) that `triton_kernels.chunk_cumsum` writes once in the forward; the forward keeps gc for
the backward in place of g (float32: the size of a float32 g, twice that of a bf16 one).

Backward. The forward keeps its per-chunk states ([B, H, T/C, K, V] in the input dtype: K·V/C
values per token and head, 2× v's size at K = V = 128, C = 64) and, for diagonal decay, its
float32 score matrices ([B, T, H, C]): recomputing the states in the backward cost more time than
the memory saved was worth.
Diagonal decay forms dA = do vᵀ once per chunk (`dscores_diag`, float32 [B, T, H, C]) for the
dq/dk kernel.
The decay gradient comes from the other gradients: with B_t the cumulative log decay from the
sequence start, every term depends on B only through q_t ⊙ e^{B_t}, k_t ⊙ e^{-B_t} and the final
state's e^{B_T} factor, so dL/dB_t = q_t ⊙ dq_t - k_t ⊙ dk_t (plus S_T ⊙ dS_T summed over V at
t = T-1). The dq/dk kernels write that product from their float32 dq, dk; dg is its reverse
cumulative sum over the sequence (kernel `decay_grad`).
"""

from __future__ import annotations

import torch
import triton

from psm_train.kernels.chunk_affine import MAX_TRITON_DIM
from psm_train.kernels.chunk_affine import triton_kernels as kern

DIAG_CHUNK, DIAG_SUB = 64, 16  # diagonal decay: chunk and sub-chunk lengths


def _pow2(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def host_block(dim: int) -> int:
    """The K or V block of the launches that choose it here rather than by autotuning."""
    return min(64, _pow2(dim))


def kernel_chunk(chunk_size: int, diagonal: bool) -> int:
    """Chunk length the kernels run with for a requested chunk size (see the module docstring)."""
    if diagonal:
        return DIAG_CHUNK
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


def _chunk_cumsum(g, m):
    """Diagonal decay: gc, the cumulative log decay from each chunk's start ([B, T, H, K], float32)."""
    BK = host_block(m["K"])
    gc = torch.empty(g.shape, dtype=torch.float32, device=g.device)
    kern.chunk_cumsum[(triton.cdiv(m["K"], BK), m["N"], m["B"] * m["H"])](
        g, gc, m["T"], H=m["H"], K=m["K"], C=m["C"], BK=BK,
    )
    return gc


def _state_grid(m):
    """Grid of the state passes: (K blocks, V blocks, batch·head), with autotuned blocks."""
    return lambda meta: (triton.cdiv(m["K"], meta["BK"]), triton.cdiv(m["V"], meta["BV"]), m["B"] * m["H"])


def _states(k, v, g, h0, m):
    """Per-chunk incoming states [B, H, N, K, V] (input dtype) and the final state (float32).
    g: the log decay, or gc for diagonal decay."""
    B, H, K, V = m["B"], m["H"], m["K"], m["V"]
    h = k.new_empty(B, H, m["N"], K, V, dtype=v.dtype)
    ht = k.new_empty(B, H, K, V, dtype=torch.float32)
    kern.state_fwd[_state_grid(m)](
        k, v, g, h0 if h0 is not None else ht, h, ht, m["T"],
        H=H, K=K, V=V, C=m["C"], DIAG=m["DIAG"], USE_H0=h0 is not None, PREC=m["PREC"],
    )
    return h, ht


def _empty(x: torch.Tensor) -> torch.Tensor:
    """Stands in for a residual that scalar decay does not have (a custom op returns tensors only)."""
    return x.new_empty(0, dtype=torch.float32)


@torch.library.custom_op("psm_train::chunk_affine_fwd", mutates_args=())
def chunk_affine_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, h0: torch.Tensor | None, chunk_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """o [B, T, H, V], the final state ht [B, H, K, V] (float32), and the residuals of the
    backward: the per-chunk states h [B, H, N, K, V], and for diagonal decay gc and the scores a
    (float32 [B, T, H, K] and [B, T, H, C]; empty for scalar decay). q and k in v's dtype."""
    q, k, v, g = (x.contiguous() for x in (q, k, v, g))
    h0 = h0.contiguous() if h0 is not None else None
    m = _meta(q, v, g, chunk_size)
    b = _chunk_cumsum(g, m) if m["DIAG"] else g
    h, ht = _states(k, v, b, h0, m)
    a = None
    if m["DIAG"]:
        a = q.new_empty(m["B"], m["T"], m["H"], m["C"], dtype=torch.float32)
        ns = m["C"] // DIAG_SUB
        kern.scores_inter_diag[(ns * ns, m["N"], m["B"] * m["H"])](
            q, k, b, a, m["T"], H=m["H"], K=m["K"], C=m["C"], S=DIAG_SUB, PREC=m["PREC"],
        )
        kern.scores_own_diag[(ns, m["N"], m["B"] * m["H"])](
            q, k, b, a, m["T"], H=m["H"], K=m["K"], C=m["C"], S=DIAG_SUB, KP=_pow2(m["K"]),
        )
    o = torch.empty_like(v)
    kern.out_fwd[lambda meta: (triton.cdiv(m["V"], meta["BV"]), m["N"], m["B"] * m["H"])](
        q, k, v, b, h, q if a is None else a, o, m["T"],
        H=m["H"], K=m["K"], V=m["V"], C=m["C"], DIAG=m["DIAG"], PREC=m["PREC"],
    )
    if not m["DIAG"]:
        return o, ht, h, _empty(q), _empty(q)
    return o, ht, h, b, a


@chunk_affine_fwd.register_fake
def _(q, k, v, g, h0, chunk_size):
    B, T, H, K = q.shape
    V, diag = v.shape[-1], g.shape[-1] != 1
    C = kernel_chunk(chunk_size, diag)
    o = v.new_empty(B, T, H, V)
    ht = v.new_empty(B, H, K, V, dtype=torch.float32)
    h = v.new_empty(B, H, (T + C - 1) // C, K, V)
    if not diag:
        return o, ht, h, _empty(q), _empty(q)
    return o, ht, h, g.new_empty(B, T, H, K, dtype=torch.float32), q.new_empty(B, T, H, C, dtype=torch.float32)


@torch.library.custom_op("psm_train::chunk_affine_bwd", mutates_args=())
def chunk_affine_bwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    b: torch.Tensor,
    h: torch.Tensor,
    ht: torch.Tensor,
    a: torch.Tensor,
    do: torch.Tensor | None,
    dht: torch.Tensor | None,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv (their inputs' dtypes), dg and dh0 (float32) from the forward's inputs and
    residuals (b: g, or gc for diagonal decay) and the gradients of o and ht (None: zero)."""
    q, k, v, b, h, ht, a = (x.contiguous() for x in (q, k, v, b, h, ht, a))
    m = _meta(q, v, b, chunk_size)
    B, T, H, K, V, N = m["B"], m["T"], m["H"], m["K"], m["V"], m["N"]
    do = torch.zeros_like(v) if do is None else do.to(v.dtype).contiguous()

    dh = torch.empty_like(h)
    dh0 = q.new_empty(B, H, K, V, dtype=torch.float32)
    kern.state_bwd[_state_grid(m)](
        q, do, b, dht.float().contiguous() if dht is not None else dh0, dh, dh0, T,
        H=H, K=K, V=V, C=m["C"], DIAG=m["DIAG"], USE_DHT=dht is not None, PREC=m["PREC"],
    )
    BK, BV = host_block(K), host_block(V)

    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    # dL/dB_t, for scalar decay in one slab per K block (summed by decay_grad)
    nk = 1 if m["DIAG"] else triton.cdiv(K, BK)
    db = torch.empty(nk, *b.shape, dtype=torch.float32, device=b.device)
    if m["DIAG"]:
        da = torch.empty(B, T, H, m["C"], dtype=torch.float32, device=v.device)
        kern.dscores_diag[(N, B * H)](v, do, da, T, H=H, V=V, C=m["C"], PREC=m["PREC"])
        grid = lambda meta: (m["C"] // DIAG_SUB * triton.cdiv(K, meta["BK"]), N, B * H)  # noqa: E731
        kern.dqk_bwd_diag[grid](
            q, k, v, b, h, do, dh, da, dq, dk, db, T, H=H, K=K, V=V, C=m["C"], S=DIAG_SUB, PREC=m["PREC"],
        )
    else:
        kern.dqk_bwd_scalar[(nk, N, B * H)](
            q, k, v, b, h, do, dh, dq, dk, db, T, H=H, K=K, V=V, C=m["C"], BK=BK, PREC=m["PREC"],
        )
    kern.dv_bwd[(triton.cdiv(V, BV), N, B * H)](
        q, k, b, q if not m["DIAG"] else a, dh, do, dv, T,
        H=H, K=K, V=V, C=m["C"], BV=BV, DIAG=m["DIAG"], PREC=m["PREC"],
    )

    if dht is not None:  # the final state's e^{B_T} factor
        end = (ht * dht.float()).sum(-1)  # [B, H, K]
        db[0, :, -1] += end if m["DIAG"] else end.sum(-1, keepdim=True)
    dg = torch.empty(b.shape, dtype=torch.float32, device=b.device)
    W = b.shape[-1]
    kern.decay_grad[lambda meta: (triton.cdiv(W, meta["BW"]), B * H)](db, dg, T, NK=nk, H=H, W=W)
    return dq, dk, dv, dg, dh0


@chunk_affine_bwd.register_fake
def _(q, k, v, b, h, ht, a, do, dht, chunk_size):
    B, _, H, K = q.shape
    return (
        torch.empty_like(q, memory_format=torch.contiguous_format),
        torch.empty_like(k, memory_format=torch.contiguous_format),
        torch.empty_like(v, memory_format=torch.contiguous_format),
        b.new_empty(b.shape, dtype=torch.float32),
        q.new_empty(B, H, K, v.shape[-1], dtype=torch.float32),
    )


def _setup_context(ctx, inputs, output):
    q, k, v, g, h0, chunk_size = inputs
    _, ht, h, gc, a = output
    diag = g.shape[-1] != 1
    ctx.save_for_backward(q, k, v, gc if diag else g, h, ht, a)
    ctx.chunk_size, ctx.g_dtype, ctx.h0_dtype = chunk_size, g.dtype, None if h0 is None else h0.dtype
    ctx.mark_non_differentiable(h, gc, a)
    ctx.set_materialize_grads(False)


def _backward(ctx, do, dht, *_residual_grads):
    q, k, v, b, h, ht, a = ctx.saved_tensors
    dq, dk, dv, dg, dh0 = chunk_affine_bwd(q, k, v, b, h, ht, a, do, dht, ctx.chunk_size)
    dh0 = dh0.to(ctx.h0_dtype) if ctx.h0_dtype is not None else None
    return dq, dk, dv, dg.to(ctx.g_dtype), dh0, None


chunk_affine_fwd.register_autograd(_backward, setup_context=_setup_context)


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
    h0 = initial_state.float().contiguous() if initial_state is not None else None
    with torch.autocast(q.device.type, enabled=False):
        o, ht, *_residuals = chunk_affine_fwd(q.to(v.dtype), k.to(v.dtype), v, log_decay, h0, chunk_size)
    return o, ht
