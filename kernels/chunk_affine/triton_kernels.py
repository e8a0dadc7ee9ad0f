"""Triton kernels of the chunkwise affine recurrence (the math of `reference.chunk_affine_ref`).

Layout as in the reference: q, k [B, T, H, K], v [B, T, H, V], log decay g [B, T, H, K] (DIAG)
or [B, T, H, 1]; states [B, H, K, V] float32; per-chunk states [B, H, N, K, V] in the input dtype
(they are matmul operands). b is the cumulative log decay from a chunk's start, computed in each
kernel from g (float32), so no padded or cumulative copy of g is ever written. Rows past T load
as k = v = 0 and g = 0: inert, as in the reference.

Kernels:
- `state_fwd`: per (K block, V block, batch·head), a loop over chunks that writes the state
  entering each chunk and the final state.
- `out_fwd`: per (V block, chunk, batch·head): o = (q ⊙ e^b) S_in + A v, with A the
  decay-weighted causal q·k of the chunk.
- `state_bwd`: the same loop in reverse for dS, the gradient of the state leaving each chunk, and
  the gradient of the initial state.
- scalar decay, dq, dk, dv from S_in and dS in two kernels whose tiles stay small at any head dim:
  `dqk_bwd_scalar` per (K block, chunk, batch·head) and `dv_bwd_scalar` per (V block, chunk,
  batch·head), each walking the other dimension in an inner loop;
- diagonal decay: `grads_bwd_diag` per (chunk, batch·head), all of V at once and K in slices.

Decay inside a chunk is always exp(b_i - b_j) with i ≥ j, masked to -inf before the exp, so
nothing overflows however strong the decay (the reference's rule). The decay from a token to its
chunk's end is a reverse cumulative sum, not b_C - b_j, whose rounding grows with |b|. Scalar decay makes that a
[C, C] matrix next to a tensor-core q kᵀ; diagonal decay makes it [C, C, K], which is evaluated
exactly in K slices of KS, and is why the diagonal kernels run with C = 16.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

# Under TRITON_INTERPRET=1 (CPU tests) autotuning would only rerun the kernels slowly.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _configs(warps: list[int], stages: list[int]) -> list[triton.Config]:
    if _INTERPRET:
        return [triton.Config({}, num_warps=4, num_stages=1)]
    return [triton.Config({}, num_warps=w, num_stages=s) for w in warps for s in stages]


@triton.autotune(configs=_configs([4, 8], [2, 3]), key=["K", "V", "C", "BK", "BV", "DIAG"])
@triton.jit
def state_fwd(
    k, v, g, h0, h, ht, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
    BV: tl.constexpr, DIAG: tl.constexpr, USE_H0: tl.constexpr, PREC: tl.constexpr,
):
    i_k, i_v, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    n = tl.cdiv(T, C)
    rk, rv, rc = i_k * BK + tl.arange(0, BK), i_v * BV + tl.arange(0, BV), tl.arange(0, C)
    m_kv = (rk[:, None] < K) & (rv[None, :] < V)
    kv = rk[:, None] * V + rv[None, :]
    s = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_H0:
        s = tl.load(h0 + i_bh * K * V + kv, mask=m_kv, other=0.0).to(tl.float32)
    for c in range(n):
        tl.store(h + (i_bh * n + c) * K * V + kv, s.to(h.dtype.element_ty), mask=m_kv)
        t = c * C + rc
        m_t = t < T
        row = (i_b * T + t) * H + i_h
        kk = tl.load(k + row[:, None] * K + rk[None, :], mask=m_t[:, None] & (rk[None, :] < K), other=0.0)
        vv = tl.load(v + row[:, None] * V + rv[None, :], mask=m_t[:, None] & (rv[None, :] < V), other=0.0)
        if DIAG:
            gg = tl.load(g + row[:, None] * K + rk[None, :], mask=m_t[:, None] & (rk[None, :] < K), other=0.0)
            gg = gg.to(tl.float32)
            b_end = tl.sum(gg, 0)
            kd = (kk * tl.exp(tl.cumsum(gg, 0, reverse=True) - gg)).to(kk.dtype)
            s = s * tl.exp(b_end)[:, None] + tl.dot(tl.trans(kd), vv, input_precision=PREC)
        else:
            gg = tl.load(g + row, mask=m_t, other=0.0).to(tl.float32)
            b_end = tl.sum(gg, 0)
            kd = (kk * tl.exp(tl.cumsum(gg, 0, reverse=True) - gg)[:, None]).to(kk.dtype)
            s = s * tl.exp(b_end) + tl.dot(tl.trans(kd), vv, input_precision=PREC)
    tl.store(ht + i_bh * K * V + kv, s, mask=m_kv)


@triton.autotune(configs=_configs([4, 8], [1]), key=["K", "V", "C", "BK", "BV", "DIAG"])
@triton.jit
def out_fwd(
    q, k, v, g, h, o, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
    BV: tl.constexpr, KS: tl.constexpr, DIAG: tl.constexpr, PREC: tl.constexpr,
):
    i_v, c, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    n = tl.cdiv(T, C)
    rv, rc = i_v * BV + tl.arange(0, BV), tl.arange(0, C)
    t = c * C + rc
    m_t, m_v = t < T, rv < V
    row = (i_b * T + t) * H + i_h
    causal = rc[:, None] >= rc[None, :]
    vv = tl.load(v + row[:, None] * V + rv[None, :], mask=m_t[:, None] & m_v[None, :], other=0.0)
    hc = h + (i_bh * n + c) * K * V
    if DIAG:
        acc = tl.zeros([C, BV], dtype=tl.float32)
        a = tl.zeros([C, C], dtype=tl.float32)
        for k0 in range(0, BK, KS):
            rk = k0 + tl.arange(0, KS)
            m = m_t[:, None] & (rk[None, :] < K)
            qs = tl.load(q + row[:, None] * K + rk[None, :], mask=m, other=0.0)
            ks = tl.load(k + row[:, None] * K + rk[None, :], mask=m, other=0.0).to(tl.float32)
            b = tl.cumsum(tl.load(g + row[:, None] * K + rk[None, :], mask=m, other=0.0).to(tl.float32), 0)
            gap = tl.where(causal[:, :, None], b[:, None, :] - b[None, :, :], float("-inf"))
            a += tl.sum(qs.to(tl.float32)[:, None, :] * ks[None, :, :] * tl.exp(gap), 2)
            hs = tl.load(hc + rk[:, None] * V + rv[None, :], mask=(rk[:, None] < K) & m_v[None, :], other=0.0)
            acc += tl.dot((qs * tl.exp(b)).to(hs.dtype), hs, input_precision=PREC)
    else:
        rk = tl.arange(0, BK)
        m = m_t[:, None] & (rk[None, :] < K)
        qq = tl.load(q + row[:, None] * K + rk[None, :], mask=m, other=0.0)
        kk = tl.load(k + row[:, None] * K + rk[None, :], mask=m, other=0.0)
        b = tl.cumsum(tl.load(g + row, mask=m_t, other=0.0).to(tl.float32), 0)
        hh = tl.load(hc + rk[:, None] * V + rv[None, :], mask=(rk[:, None] < K) & m_v[None, :], other=0.0)
        acc = tl.dot((qq * tl.exp(b)[:, None]).to(hh.dtype), hh, input_precision=PREC)
        gap = tl.where(causal, b[:, None] - b[None, :], float("-inf"))
        a = tl.dot(qq, tl.trans(kk), input_precision=PREC) * tl.exp(gap)
    acc += tl.dot(a.to(vv.dtype), vv, input_precision=PREC)
    tl.store(o + row[:, None] * V + rv[None, :], acc.to(o.dtype.element_ty), mask=m_t[:, None] & m_v[None, :])


@triton.autotune(configs=_configs([4, 8], [2, 3]), key=["K", "V", "C", "BK", "BV", "DIAG"])
@triton.jit
def state_bwd(
    q, do, g, dht, dh, dh0, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
    BV: tl.constexpr, DIAG: tl.constexpr, USE_DHT: tl.constexpr, PREC: tl.constexpr,
):
    i_k, i_v, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    n = tl.cdiv(T, C)
    rk, rv, rc = i_k * BK + tl.arange(0, BK), i_v * BV + tl.arange(0, BV), tl.arange(0, C)
    m_kv = (rk[:, None] < K) & (rv[None, :] < V)
    kv = rk[:, None] * V + rv[None, :]
    ds = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_DHT:
        ds = tl.load(dht + i_bh * K * V + kv, mask=m_kv, other=0.0).to(tl.float32)
    for i in range(n):
        c = n - 1 - i
        # ds is the gradient of the state chunk c leaves behind.
        tl.store(dh + (i_bh * n + c) * K * V + kv, ds.to(dh.dtype.element_ty), mask=m_kv)
        t = c * C + rc
        m_t = t < T
        row = (i_b * T + t) * H + i_h
        qq = tl.load(q + row[:, None] * K + rk[None, :], mask=m_t[:, None] & (rk[None, :] < K), other=0.0)
        dd = tl.load(do + row[:, None] * V + rv[None, :], mask=m_t[:, None] & (rv[None, :] < V), other=0.0)
        if DIAG:
            gg = tl.load(g + row[:, None] * K + rk[None, :], mask=m_t[:, None] & (rk[None, :] < K), other=0.0)
            gg = gg.to(tl.float32)
            b, b_end = tl.cumsum(gg, 0), tl.sum(gg, 0)
            qe = (qq * tl.exp(b)).to(qq.dtype)
            ds = ds * tl.exp(b_end)[:, None] + tl.dot(tl.trans(qe), dd, input_precision=PREC)
        else:
            gg = tl.load(g + row, mask=m_t, other=0.0).to(tl.float32)
            b, b_end = tl.cumsum(gg, 0), tl.sum(gg, 0)
            qe = (qq * tl.exp(b)[:, None]).to(qq.dtype)
            ds = ds * tl.exp(b_end) + tl.dot(tl.trans(qe), dd, input_precision=PREC)
    tl.store(dh0 + i_bh * K * V + kv, ds, mask=m_kv)


@triton.autotune(configs=_configs([4, 8], [1]), key=["K", "V", "C", "BK", "BV"])
@triton.jit
def grads_bwd_diag(
    q, k, v, g, h, do, dh, dq, dk, dv, db, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
    BV: tl.constexpr, KS: tl.constexpr, PREC: tl.constexpr,
):
    """Diagonal decay: dq, dk, dv of one chunk, and db = q ⊙ dq - k ⊙ dk (float32), the gradient of
    the cumulative log decay (see triton_op). BV covers all of V; K is walked in slices of KS."""
    c, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    n = tl.cdiv(T, C)
    rv, rc = tl.arange(0, BV), tl.arange(0, C)
    t = c * C + rc
    m_t, m_v = t < T, rv < V
    row = (i_b * T + t) * H + i_h
    causal = rc[:, None] >= rc[None, :]
    m_tv = m_t[:, None] & m_v[None, :]
    vv = tl.load(v + row[:, None] * V + rv[None, :], mask=m_tv, other=0.0)
    dd = tl.load(do + row[:, None] * V + rv[None, :], mask=m_tv, other=0.0)
    hc, dhc = h + (i_bh * n + c) * K * V, dh + (i_bh * n + c) * K * V
    da = tl.where(causal, tl.dot(dd, tl.trans(vv), input_precision=PREC), 0.0)
    a = tl.zeros([C, C], dtype=tl.float32)
    dv_acc = tl.zeros([C, BV], dtype=tl.float32)
    for k0 in range(0, BK, KS):
        rk = k0 + tl.arange(0, KS)
        m = m_t[:, None] & (rk[None, :] < K)
        m_kv = (rk[:, None] < K) & m_v[None, :]
        qs = tl.load(q + row[:, None] * K + rk[None, :], mask=m, other=0.0)
        ks = tl.load(k + row[:, None] * K + rk[None, :], mask=m, other=0.0)
        gs = tl.load(g + row[:, None] * K + rk[None, :], mask=m, other=0.0).to(tl.float32)
        b = tl.cumsum(gs, 0)
        hs = tl.load(hc + rk[:, None] * V + rv[None, :], mask=m_kv, other=0.0)
        dhs = tl.load(dhc + rk[:, None] * V + rv[None, :], mask=m_kv, other=0.0)
        e = tl.exp(tl.where(causal[:, :, None], b[:, None, :] - b[None, :, :], float("-inf")))
        q3, k3 = qs.to(tl.float32)[:, None, :], ks.to(tl.float32)[None, :, :]
        a += tl.sum(q3 * k3 * e, 2)
        dqs = tl.sum(da[:, :, None] * k3 * e, 1)
        dqs += tl.dot(dd, tl.trans(hs), input_precision=PREC) * tl.exp(b)
        dks = tl.sum(da[:, :, None] * q3 * e, 0)
        tail = tl.exp(tl.cumsum(gs, 0, reverse=True) - gs)
        dks += tl.dot(vv, tl.trans(dhs), input_precision=PREC) * tail
        dv_acc += tl.dot((ks * tail).to(dhs.dtype), dhs, input_precision=PREC)
        tl.store(dq + row[:, None] * K + rk[None, :], dqs.to(dq.dtype.element_ty), mask=m)
        tl.store(dk + row[:, None] * K + rk[None, :], dks.to(dk.dtype.element_ty), mask=m)
        tl.store(db + row[:, None] * K + rk[None, :], qs.to(tl.float32) * dqs - ks.to(tl.float32) * dks, mask=m)
    dv_acc += tl.dot(tl.trans(a).to(dd.dtype), dd, input_precision=PREC)
    tl.store(dv + row[:, None] * V + rv[None, :], dv_acc.to(dv.dtype.element_ty), mask=m_tv)


def _loop_configs(name: str) -> list[triton.Config]:
    """Block of the reduced dimension walked by the scalar-decay gradient kernels' inner loop."""
    if _INTERPRET:  # small, so that the CPU tests walk several blocks
        return [triton.Config({name: 16}, num_warps=4, num_stages=1)]
    return [triton.Config({name: b}, num_warps=w, num_stages=s) for b in (32, 64) for w in (4, 8) for s in (1, 2, 3)]


@triton.autotune(configs=_loop_configs("BV"), key=["K", "V", "C", "BK"])
@triton.jit
def dqk_bwd_scalar(
    q, k, v, g, h, do, dh, dq, dk, db, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
    BV: tl.constexpr, PREC: tl.constexpr,
):
    """Scalar decay, per (K block, chunk, batch·head): dq, dk, and this K block's part of
    db = Σ_K (q ⊙ dq - k ⊙ dk) (float32, db[i_k]). V is walked in blocks of BV: the live tiles
    are [C, BK] and [BK, BV], whatever K and V are."""
    i_k, c, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    n = tl.cdiv(T, C)
    rk, rc = i_k * BK + tl.arange(0, BK), tl.arange(0, C)
    t = c * C + rc
    m_t, m_k = t < T, rk < K
    row = (i_b * T + t) * H + i_h
    m = m_t[:, None] & m_k[None, :]
    qq = tl.load(q + row[:, None] * K + rk[None, :], mask=m, other=0.0)
    kk = tl.load(k + row[:, None] * K + rk[None, :], mask=m, other=0.0)
    gg = tl.load(g + row, mask=m_t, other=0.0).to(tl.float32)
    b = tl.cumsum(gg, 0)
    hc, dhc = h + (i_bh * n + c) * K * V, dh + (i_bh * n + c) * K * V
    da = tl.zeros([C, C], dtype=tl.float32)
    dq_state = tl.zeros([C, BK], dtype=tl.float32)
    dk_state = tl.zeros([C, BK], dtype=tl.float32)
    for v0 in range(0, V, BV):
        rv = v0 + tl.arange(0, BV)
        m_tv = m_t[:, None] & (rv[None, :] < V)
        m_kv = m_k[:, None] & (rv[None, :] < V)
        vv = tl.load(v + row[:, None] * V + rv[None, :], mask=m_tv, other=0.0)
        dd = tl.load(do + row[:, None] * V + rv[None, :], mask=m_tv, other=0.0)
        hh = tl.load(hc + rk[:, None] * V + rv[None, :], mask=m_kv, other=0.0)
        dhh = tl.load(dhc + rk[:, None] * V + rv[None, :], mask=m_kv, other=0.0)
        da += tl.dot(dd, tl.trans(vv), input_precision=PREC)
        dq_state += tl.dot(dd, tl.trans(hh), input_precision=PREC)
        dk_state += tl.dot(vv, tl.trans(dhh), input_precision=PREC)
    causal = rc[:, None] >= rc[None, :]
    da = da * tl.exp(tl.where(causal, b[:, None] - b[None, :], float("-inf")))
    tail = tl.exp(tl.cumsum(gg, 0, reverse=True) - gg)
    dqs = tl.dot(da.to(kk.dtype), kk, input_precision=PREC) + dq_state * tl.exp(b)[:, None]
    dks = tl.dot(tl.trans(da).to(qq.dtype), qq, input_precision=PREC) + dk_state * tail[:, None]
    tl.store(dq + row[:, None] * K + rk[None, :], dqs.to(dq.dtype.element_ty), mask=m)
    tl.store(dk + row[:, None] * K + rk[None, :], dks.to(dk.dtype.element_ty), mask=m)
    part = tl.sum(qq.to(tl.float32) * dqs - kk.to(tl.float32) * dks, 1)
    tl.store(db + (i_k * tl.num_programs(2)).to(tl.int64) * T + row, part, mask=m_t)  # db [NK, B, T, H]


@triton.autotune(configs=_loop_configs("BK"), key=["K", "V", "C", "BV"])
@triton.jit
def dv_bwd_scalar(
    q, k, g, dh, do, dv, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
    BV: tl.constexpr, PREC: tl.constexpr,
):
    """Scalar decay, per (V block, chunk, batch·head): dv = Aᵀ do + (k ⊙ tail) dS, with K walked in
    blocks of BK."""
    i_v, c, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    n = tl.cdiv(T, C)
    rv, rc = i_v * BV + tl.arange(0, BV), tl.arange(0, C)
    t = c * C + rc
    m_t, m_v = t < T, rv < V
    row = (i_b * T + t) * H + i_h
    m_tv = m_t[:, None] & m_v[None, :]
    gg = tl.load(g + row, mask=m_t, other=0.0).to(tl.float32)
    b = tl.cumsum(gg, 0)
    tail = tl.exp(tl.cumsum(gg, 0, reverse=True) - gg)
    dhc = dh + (i_bh * n + c) * K * V
    a = tl.zeros([C, C], dtype=tl.float32)
    dv_acc = tl.zeros([C, BV], dtype=tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        m = m_t[:, None] & (rk[None, :] < K)
        qq = tl.load(q + row[:, None] * K + rk[None, :], mask=m, other=0.0)
        kk = tl.load(k + row[:, None] * K + rk[None, :], mask=m, other=0.0)
        dhh = tl.load(dhc + rk[:, None] * V + rv[None, :], mask=(rk[:, None] < K) & m_v[None, :], other=0.0)
        a += tl.dot(qq, tl.trans(kk), input_precision=PREC)
        dv_acc += tl.dot((kk * tail[:, None]).to(dhh.dtype), dhh, input_precision=PREC)
    causal = rc[:, None] >= rc[None, :]
    a = a * tl.exp(tl.where(causal, b[:, None] - b[None, :], float("-inf")))
    dd = tl.load(do + row[:, None] * V + rv[None, :], mask=m_tv, other=0.0)
    dv_acc += tl.dot(tl.trans(a).to(dd.dtype), dd, input_precision=PREC)
    tl.store(dv + row[:, None] * V + rv[None, :], dv_acc.to(dv.dtype.element_ty), mask=m_tv)


def decay_grad_rows(bw: int) -> int:
    """Rows per iteration of `decay_grad` for a column block of bw: 2048 values per tile (16 rows
    under the interpreter, so that the CPU tests carry across several iterations)."""
    return 16 if _INTERPRET else max(16, 2048 // bw)


@triton.jit
def decay_grad(
    db, dg, T,
    NK: tl.constexpr, H: tl.constexpr, W: tl.constexpr, BT: tl.constexpr, BW: tl.constexpr,
):
    """dg[b, t, h] = Σ_{s ≥ t} Σ_j db[j, b, s, h] over [W] columns (float32): the decay gradient as the
    reverse cumulative sum over the sequence of the per-token terms, summed over NK slabs (the
    scalar-decay K blocks). Per (column block, batch·head), a loop from the last rows to the first;
    torch's cumsum over that outer dim took 29-46% of the whole fwd+bwd (docs/benchmarks.md)."""
    i_w, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    rw, rt = i_w * BW + tl.arange(0, BW), tl.arange(0, BT)
    slab = tl.num_programs(1).to(tl.int64) * T * W
    carry = tl.zeros([BW], dtype=tl.float32)
    n = tl.cdiv(T, BT)
    for i in range(n):
        t = (n - 1 - i) * BT + rt
        m = (t < T)[:, None] & (rw < W)[None, :]
        off = ((i_b * T + t) * H + i_h)[:, None] * W + rw[None, :]
        x = tl.zeros([BT, BW], dtype=tl.float32)
        for j in range(NK):
            x += tl.load(db + j * slab + off, mask=m, other=0.0)
        tl.store(dg + off, tl.cumsum(x, 0, reverse=True) + carry[None, :], mask=m)
        carry += tl.sum(x, 0)
