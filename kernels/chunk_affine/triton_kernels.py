"""Triton kernels of the chunkwise affine recurrence (the math of `reference.chunk_affine_ref`).

Layout as in the reference: q, k [B, T, H, K], v [B, T, H, V], log decay g [B, T, H, K] (DIAG)
or [B, T, H, 1]; states [B, H, K, V] float32; per-chunk states [B, H, N, K, V] in the input dtype
(they are matmul operands). b is the cumulative log decay from a chunk's start (float32). Scalar
decay computes it in each kernel from g. Diagonal decay writes it once, gc [B, T, H, K]
(`chunk_cumsum`), and every other diagonal-decay kernel takes gc in place of g and loads it.
Rows past T load as k = v = 0 and g = 0 (gc: the last token's row, `_gc_rows`): inert, as in the
reference.

Kernels:
- `chunk_cumsum` (diagonal decay): gc, per (K block, chunk, batch·head).
- `state_fwd`: per (K block, V block, batch·head), a loop over chunks that writes the state
  entering each chunk and the final state.
- `scores_inter_diag`, `scores_own_diag` (diagonal decay): the chunk's decay-weighted causal
  score matrix A in [S, S] blocks (scalar decay computes its A where it is used). The blocks
  between two sub-chunks per (pair of sub-chunks, chunk, batch·head), walking K; each
  sub-chunk's own block per (sub-chunk, chunk, batch·head).
- `out_fwd`: per (V block, chunk, batch·head), walking K: o = (q ⊙ e^b) S_in + A v.
- `state_bwd`: the same loop in reverse for dS, the gradient of the state leaving each chunk, and
  the gradient of the initial state.
- `dscores_diag` (diagonal decay): dA = do vᵀ per (chunk, batch·head), walking V.
- dq, dk from S_in and dS: `dqk_bwd_scalar` per (K block, chunk, batch·head), walking V;
  `dqk_bwd_diag` per (sub-chunk × K block, chunk, batch·head), walking V for the state terms.
- `dv_bwd`: dv per (V block, chunk, batch·head), walking K.
- `decay_grad`: the decay gradient's reverse cumulative sum over the sequence.

Decay inside a chunk is always exp(b_i - b_j) with i ≥ j, masked to -inf before the exp, so
nothing overflows however strong the decay (the reference's rule); `scores_own_diag` alone masks
after the exp, per stored column, so an overflow above the diagonal never reaches A. Scalar
decay takes the decay from a token to its chunk's end as a reverse cumulative sum, not
b_C - b_j, whose rounding grows with |b|, and makes the in-chunk decay a [C, C] matrix next to
a tensor-core q kᵀ. Diagonal decay makes it [C, C, K], which is never built: the chunk (64) is
walked in sub-chunks of 16; between sub-chunks the decay is split at a sub-chunk edge into two
factors ≤ 1 that scale q and k before a tensor-core product (fla's layout), and only each
sub-chunk's own [16, 16] block is exact, one row at a time. Every decay between two tokens is
e^{gc_i - gc_j} of loaded values, so at i = j its exponent is exactly 0: both terms are the same
float32 number. With log decays of -20 per token that diagonal term dominates, and a b_i summed
in another order than b_j (tl.cumsum adds in tree order on a GPU) would err by |b|·2⁻²⁴ there.
Off the diagonal, the rounding of gc (|gc|·2⁻²⁴, |gc| ≤ 64·max|g|) is scaled by the decay
between the two tokens.
"""

from __future__ import annotations

import itertools
import os

import triton
import triton.language as tl

# Under TRITON_INTERPRET=1 (CPU tests) autotuning would only rerun the kernels slowly.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
LOG2E = tl.constexpr(1.4426950408889634)


def _configs(warps: list[int], stages: list[int]) -> list[triton.Config]:
    if _INTERPRET:
        return [triton.Config({}, num_warps=4, num_stages=1)]
    return [triton.Config({}, num_warps=w, num_stages=s) for w in warps for s in stages]


def _tile_configs(blocks: dict[str, tuple[int, ...]], warps: tuple[int, ...], stages: tuple[int, ...]) -> list[triton.Config]:
    """Configs over the block sizes of the dimensions a kernel walks or splits (name: candidates)."""
    if _INTERPRET:  # small, so that the CPU tests walk several blocks
        return [triton.Config(dict.fromkeys(blocks, 16), num_warps=4, num_stages=1)]
    return [
        triton.Config(dict(zip(blocks, bs)), num_warps=w, num_stages=s)
        for bs in itertools.product(*blocks.values()) for w in warps for s in stages
    ]


def _fit_dims(configs: list[triton.Config], nargs: dict, **kwargs) -> list[triton.Config]:
    """Drop configs whose BK or BV block is wider than K's or V's power of two (all masked
    columns); where no candidate is that narrow, keep the narrowest."""
    dims = {**nargs, **kwargs}
    limit = {
        n: max(triton.next_power_of_2(dims[d]), min(c.kwargs[n] for c in configs))
        for n, d in (("BK", "K"), ("BV", "V")) if n in configs[0].kwargs
    }
    return [c for c in configs if all(c.kwargs[n] <= lim for n, lim in limit.items())]


@triton.jit
def _gc_rows(t, T, i_b, i_h, H: tl.constexpr):
    """Row offsets into gc for times t: rows past T repeat the last token's row (g = 0 there), so
    decays from or to them stay ≤ 1 and no masked row can overflow."""
    return (i_b * T + tl.minimum(t, T - 1)) * H + i_h


@triton.jit
def chunk_cumsum(
    g, gc, T,
    H: tl.constexpr, K: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
):
    """Diagonal decay, per (K block, chunk, batch·head): gc, the cumulative sum of g from the
    chunk's start (float32, [B, T, H, K]), which the other diagonal-decay kernels load."""
    i_k, c, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    rk, t = i_k * BK + tl.arange(0, BK), c * C + tl.arange(0, C)
    off = ((i_b * T + t) * H + i_h)[:, None] * K + rk[None, :]
    m = (t < T)[:, None] & (rk < K)[None, :]
    tl.store(gc + off, tl.cumsum(tl.load(g + off, mask=m, other=0.0).to(tl.float32), 0), mask=m)


@triton.autotune(configs=_tile_configs({"BK": (32, 64), "BV": (32, 64)}, (4, 8), (2, 3)), key=["K", "V", "C", "DIAG"])
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
        if DIAG:  # g is gc
            b = tl.load(g + _gc_rows(t, T, i_b, i_h, H)[:, None] * K + rk[None, :], mask=(rk < K)[None, :], other=0.0)
            b_end = tl.load(g + _gc_rows(c * C + C - 1, T, i_b, i_h, H) * K + rk, mask=rk < K, other=0.0)
            kd = (kk * tl.exp(b_end[None, :] - b)).to(kk.dtype)
            s = tl.dot(tl.trans(kd), vv, s * tl.exp(b_end)[:, None], input_precision=PREC)
        else:
            gg = tl.load(g + row, mask=m_t, other=0.0).to(tl.float32)
            b_end = tl.sum(gg, 0)
            kd = (kk * tl.exp(tl.cumsum(gg, 0, reverse=True) - gg)[:, None]).to(kk.dtype)
            s = tl.dot(tl.trans(kd), vv, s * tl.exp(b_end), input_precision=PREC)
    tl.store(ht + i_bh * K * V + kv, s, mask=m_kv)


@triton.autotune(configs=_tile_configs({"BK": (32, 64)}, (2, 4), (2, 3)), key=["K", "C", "S"])
@triton.jit
def scores_inter_diag(
    q, k, gc, a, T,
    H: tl.constexpr, K: tl.constexpr, C: tl.constexpr, S: tl.constexpr, BK: tl.constexpr,
    PREC: tl.constexpr,
):
    """Diagonal decay, per (pair of sub-chunks, chunk, batch·head): one [S, S] block of the chunk's
    score matrix A[i, j] = Σ_K q_i k_j e^{b_i - b_j} (j ≤ i, else 0; float32, a [B, T, H, C]), the
    rows of sub-chunk i_s against the keys of sub-chunk p. An earlier p is a tensor-core product,
    K walked in blocks of BK, with the decay split at sub-chunk i_s's first row (both factors
    ≤ 1); a later p is zeros (`out_fwd` and `dv_bwd` read all C columns); p = i_s is
    `scores_own_diag`'s."""
    NS: tl.constexpr = C // S
    i_s, p = tl.program_id(0) // NS, tl.program_id(0) % NS
    c, i_bh = tl.program_id(1), tl.program_id(2).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    rs = tl.arange(0, S)
    t_s, t_p = c * C + i_s * S + rs, c * C + p * S + rs
    row_s = (i_b * T + t_s) * H + i_h
    m_row = t_s < T
    if p < i_s:
        row_p = (i_b * T + t_p) * H + i_h
        gc_s, gc_p = _gc_rows(t_s, T, i_b, i_h, H), _gc_rows(t_p, T, i_b, i_h, H)
        gc_first = _gc_rows(c * C + i_s * S, T, i_b, i_h, H)
        acc = tl.zeros([S, S], dtype=tl.float32)
        for k0 in range(0, K, BK):
            rk = k0 + tl.arange(0, BK)
            m_k = rk < K
            qq = tl.load(q + row_s[:, None] * K + rk[None, :], mask=m_row[:, None] & m_k[None, :], other=0.0)
            k_p = tl.load(k + row_p[:, None] * K + rk[None, :], mask=(t_p < T)[:, None] & m_k[None, :], other=0.0)
            b_s = tl.load(gc + gc_s[:, None] * K + rk[None, :], mask=m_k[None, :], other=0.0)
            b_p = tl.load(gc + gc_p[:, None] * K + rk[None, :], mask=m_k[None, :], other=0.0)
            b_first = tl.load(gc + gc_first * K + rk, mask=m_k, other=0.0)
            qd = (qq * tl.exp(b_s - b_first[None, :])).to(qq.dtype)
            kd = (k_p * tl.exp(b_first[None, :] - b_p)).to(k_p.dtype)
            acc += tl.dot(qd, tl.trans(kd), input_precision=PREC)
        tl.store(a + row_s[:, None] * C + p * S + rs[None, :], acc, mask=m_row[:, None])
    elif p > i_s:
        tl.store(a + row_s[:, None] * C + p * S + rs[None, :], tl.zeros([S, S], dtype=tl.float32), mask=m_row[:, None])


@triton.autotune(configs=_configs([2, 4], [1, 2]), key=["K", "C", "S"])
@triton.jit
def scores_own_diag(
    q, k, gc, a, T,
    H: tl.constexpr, K: tl.constexpr, C: tl.constexpr, S: tl.constexpr, KP: tl.constexpr,
):
    """Diagonal decay, per (sub-chunk, chunk, batch·head): the sub-chunk's own [S, S] block of the
    score matrix A (see `scores_inter_diag`), exact, all of K in one tile (KP, K's power of two),
    one key column at a time, each column stored as it is computed."""
    i_s, c, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    rs, rk = tl.arange(0, S), tl.arange(0, KP)
    m_k = (rk < K)[None, :]
    s0 = i_s * S
    t_s = c * C + s0 + rs
    row_s = (i_b * T + t_s) * H + i_h
    m_row = t_s < T
    # base-2 exponents (exp2 needs no multiply per element), scaled once per row
    b_s = tl.load(gc + _gc_rows(t_s, T, i_b, i_h, H)[:, None] * K + rk[None, :], mask=m_k, other=0.0) * LOG2E
    q32 = tl.load(q + row_s[:, None] * K + rk[None, :], mask=m_row[:, None] & m_k, other=0.0).to(tl.float32)
    for j in range(S):
        t_j = c * C + s0 + j
        # the same gc row and the same multiply as b_s's row j: b_i - b_j is exactly 0 at i = j
        b_j = tl.load(gc + _gc_rows(t_j, T, i_b, i_h, H) * K + rk, mask=rk < K, other=0.0) * LOG2E
        k_j = tl.load(k + ((i_b * T + t_j) * H + i_h) * K + rk, mask=(rk < K) & (t_j < T), other=0.0).to(tl.float32)
        # unmasked exponents (rows i < j may overflow to inf or nan): those rows are replaced by 0
        col = tl.sum(q32 * k_j[None, :] * tl.exp2(b_s - b_j[None, :]), 1)
        tl.store(a + row_s * C + s0 + j, tl.where(rs >= j, col, 0.0), mask=m_row)


@triton.autotune(
    configs=_tile_configs({"BK": (32, 64), "BV": (64, 128)}, (4, 8), (2, 3)), key=["K", "V", "C", "DIAG"],
    prune_configs_by={"early_config_prune": _fit_dims},
)
@triton.jit
def out_fwd(
    q, k, v, g, h, a, o, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
    BV: tl.constexpr, DIAG: tl.constexpr, PREC: tl.constexpr,
):
    """Per (V block, chunk, batch·head): o = (q ⊙ e^b) S_in + A v, K walked in blocks of BK.
    Scalar decay computes the chunk's scores A here (once per V block); diagonal decay reads them
    from `scores_inter_diag` and `scores_own_diag` (and g is gc)."""
    i_v, c, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    n = tl.cdiv(T, C)
    rv, rc = i_v * BV + tl.arange(0, BV), tl.arange(0, C)
    t = c * C + rc
    m_t, m_v = t < T, rv < V
    row = (i_b * T + t) * H + i_h
    hc = h + (i_bh * n + c) * K * V
    acc = tl.zeros([C, BV], dtype=tl.float32)
    if DIAG:
        aa = tl.load(a + row[:, None] * C + rc[None, :], mask=m_t[:, None], other=0.0)
        gc_t = _gc_rows(t, T, i_b, i_h, H)
    else:
        b = tl.cumsum(tl.load(g + row, mask=m_t, other=0.0).to(tl.float32), 0)
        aa = tl.zeros([C, C], dtype=tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        m = m_t[:, None] & (rk[None, :] < K)
        qq = tl.load(q + row[:, None] * K + rk[None, :], mask=m, other=0.0)
        hh = tl.load(hc + rk[:, None] * V + rv[None, :], mask=(rk[:, None] < K) & m_v[None, :], other=0.0)
        if DIAG:
            bk = tl.load(g + gc_t[:, None] * K + rk[None, :], mask=(rk < K)[None, :], other=0.0)
            acc += tl.dot((qq * tl.exp(bk)).to(hh.dtype), hh, input_precision=PREC)
        else:
            kk = tl.load(k + row[:, None] * K + rk[None, :], mask=m, other=0.0)
            acc += tl.dot((qq * tl.exp(b)[:, None]).to(hh.dtype), hh, input_precision=PREC)
            aa += tl.dot(qq, tl.trans(kk), input_precision=PREC)
    if not DIAG:
        aa = aa * tl.exp(tl.where(rc[:, None] >= rc[None, :], b[:, None] - b[None, :], float("-inf")))
    vv = tl.load(v + row[:, None] * V + rv[None, :], mask=m_t[:, None] & m_v[None, :], other=0.0)
    acc += tl.dot(aa.to(vv.dtype), vv, input_precision=PREC)
    tl.store(o + row[:, None] * V + rv[None, :], acc.to(o.dtype.element_ty), mask=m_t[:, None] & m_v[None, :])


@triton.autotune(configs=_tile_configs({"BK": (32, 64), "BV": (32, 64)}, (4, 8), (2, 3)), key=["K", "V", "C", "DIAG"])
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
        if DIAG:  # g is gc
            b = tl.load(g + _gc_rows(t, T, i_b, i_h, H)[:, None] * K + rk[None, :], mask=(rk < K)[None, :], other=0.0)
            b_end = tl.load(g + _gc_rows(c * C + C - 1, T, i_b, i_h, H) * K + rk, mask=rk < K, other=0.0)
            qe = (qq * tl.exp(b)).to(qq.dtype)
            ds = tl.dot(tl.trans(qe), dd, ds * tl.exp(b_end)[:, None], input_precision=PREC)
        else:
            gg = tl.load(g + row, mask=m_t, other=0.0).to(tl.float32)
            b, b_end = tl.cumsum(gg, 0), tl.sum(gg, 0)
            qe = (qq * tl.exp(b)[:, None]).to(qq.dtype)
            ds = tl.dot(tl.trans(qe), dd, ds * tl.exp(b_end), input_precision=PREC)
    tl.store(dh0 + i_bh * K * V + kv, ds, mask=m_kv)


@triton.autotune(configs=_tile_configs({"BV": (32, 64)}, (4, 8), (1, 2, 3)), key=["K", "V", "C", "BK"])
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


@triton.autotune(configs=_tile_configs({"BV": (32, 64)}, (4, 8), (1, 2)), key=["V", "C"])
@triton.jit
def dscores_diag(
    v, do, da, T,
    H: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
):
    """Diagonal decay, per (chunk, batch·head): dA = do vᵀ, the gradient of the chunk's causal
    score matrix (j ≤ i, else 0; float32, da [B, T, H, C] like a), V walked in blocks of BV. Once
    per chunk here, `dqk_bwd_diag`'s programs (sub-chunks × K blocks) only load their rows."""
    c, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    rc = tl.arange(0, C)
    t = c * C + rc
    m_t = t < T
    row = (i_b * T + t) * H + i_h
    acc = tl.zeros([C, C], dtype=tl.float32)
    for v0 in range(0, V, BV):
        rv = v0 + tl.arange(0, BV)
        m = m_t[:, None] & (rv < V)[None, :]
        dd = tl.load(do + row[:, None] * V + rv[None, :], mask=m, other=0.0)
        vv = tl.load(v + row[:, None] * V + rv[None, :], mask=m, other=0.0)
        acc += tl.dot(dd, tl.trans(vv), input_precision=PREC)
    tl.store(da + row[:, None] * C + rc[None, :], tl.where(rc[:, None] >= rc[None, :], acc, 0.0), mask=m_t[:, None])


@triton.autotune(configs=_tile_configs({"BK": (32, 64), "BV": (32, 64)}, (4, 8), (1, 2)), key=["K", "V", "C", "S"])
@triton.jit
def dqk_bwd_diag(
    q, k, v, gc, h, do, dh, da, dq, dk, db, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, S: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
):
    """Diagonal decay, per (sub-chunk × K block, chunk, batch·head): dq, dk of the sub-chunk's S
    rows in one K block and db = q ⊙ dq - k ⊙ dk (float32; per K column, so K blocks need no
    sum). V is walked in blocks of BV for the state terms do S_inᵀ and v dSᵀ; dA is
    `dscores_diag`'s. As for A (`scores_inter_diag`, `scores_own_diag`), other sub-chunks go
    through tensor cores, one [S, S] block of dA at a time (the earlier sub-chunks for dq, the
    later ones for dk), with the decay split at this sub-chunk's first row (dq) or last row (dk),
    and the own [S, S] block is exact, one row at a time, its dA column and row loaded for that
    row."""
    NS: tl.constexpr = C // S
    i_s, i_k = tl.program_id(0) % NS, tl.program_id(0) // NS
    c, i_bh = tl.program_id(1), tl.program_id(2).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    n = tl.cdiv(T, C)
    rs, rk = tl.arange(0, S), i_k * BK + tl.arange(0, BK)
    s0 = i_s * S
    t_s = c * C + s0 + rs
    row_s = (i_b * T + t_s) * H + i_h
    hc, dhc = h + (i_bh * n + c) * K * V, dh + (i_bh * n + c) * K * V
    dq_state = tl.zeros([S, BK], dtype=tl.float32)
    dk_state = tl.zeros([S, BK], dtype=tl.float32)
    for v0 in range(0, V, BV):
        rv = v0 + tl.arange(0, BV)
        m_v = rv[None, :] < V
        m_kv = (rk[:, None] < K) & m_v
        do_s = tl.load(do + row_s[:, None] * V + rv[None, :], mask=(t_s < T)[:, None] & m_v, other=0.0)
        v_s = tl.load(v + row_s[:, None] * V + rv[None, :], mask=(t_s < T)[:, None] & m_v, other=0.0)
        hh = tl.load(hc + rk[:, None] * V + rv[None, :], mask=m_kv, other=0.0)
        dhh = tl.load(dhc + rk[:, None] * V + rv[None, :], mask=m_kv, other=0.0)
        dq_state += tl.dot(do_s, tl.trans(hh), input_precision=PREC)
        dk_state += tl.dot(v_s, tl.trans(dhh), input_precision=PREC)

    m_k = rk < K
    m_s = (t_s < T)[:, None] & m_k[None, :]
    b_s = tl.load(gc + _gc_rows(t_s, T, i_b, i_h, H)[:, None] * K + rk[None, :], mask=m_k[None, :], other=0.0)
    b_first = tl.load(gc + _gc_rows(c * C + s0, T, i_b, i_h, H) * K + rk, mask=m_k, other=0.0)
    b_last = tl.load(gc + _gc_rows(c * C + s0 + S - 1, T, i_b, i_h, H) * K + rk, mask=m_k, other=0.0)
    b_end = tl.load(gc + _gc_rows(c * C + C - 1, T, i_b, i_h, H) * K + rk, mask=m_k, other=0.0)
    qq = tl.load(q + row_s[:, None] * K + rk[None, :], mask=m_s, other=0.0)
    kk = tl.load(k + row_s[:, None] * K + rk[None, :], mask=m_s, other=0.0)
    # the earlier sub-chunks' keys (dq) and the later ones' queries (dk), S rows at a time
    dq_inter = tl.zeros([S, BK], dtype=tl.float32)
    for p in range(0, i_s):
        t_p = c * C + p * S + rs
        row_p = (i_b * T + t_p) * H + i_h
        k_p = tl.load(k + row_p[:, None] * K + rk[None, :], mask=(t_p < T)[:, None] & m_k[None, :], other=0.0)
        b_p = tl.load(gc + _gc_rows(t_p, T, i_b, i_h, H)[:, None] * K + rk[None, :], mask=m_k[None, :], other=0.0)
        da_p = tl.load(da + row_s[:, None] * C + p * S + rs[None, :], mask=(t_s < T)[:, None], other=0.0)
        kd = (k_p * tl.exp(b_first[None, :] - b_p)).to(kk.dtype)
        dq_inter += tl.dot(da_p.to(kk.dtype), kd, input_precision=PREC)
    dk_inter = tl.zeros([S, BK], dtype=tl.float32)
    for p in range(i_s + 1, NS):
        t_p = c * C + p * S + rs
        row_p = (i_b * T + t_p) * H + i_h
        q_p = tl.load(q + row_p[:, None] * K + rk[None, :], mask=(t_p < T)[:, None] & m_k[None, :], other=0.0)
        b_p = tl.load(gc + _gc_rows(t_p, T, i_b, i_h, H)[:, None] * K + rk[None, :], mask=m_k[None, :], other=0.0)
        da_p = tl.load(da + row_p[:, None] * C + s0 + rs[None, :], mask=(t_p < T)[:, None], other=0.0)
        qd = (q_p * tl.exp(b_p - b_last[None, :])).to(qq.dtype)
        dk_inter += tl.dot(tl.trans(da_p).to(qq.dtype), qd, input_precision=PREC)
    dqs = dq_state * tl.exp(b_s) + dq_inter * tl.exp(b_s - b_first[None, :])
    dks = dk_state * tl.exp(b_end[None, :] - b_s) + dk_inter * tl.exp(b_last[None, :] - b_s)
    for j in range(S):
        t_j = c * C + s0 + j
        m_j = m_k & (t_j < T)
        row_j = (i_b * T + t_j) * H + i_h
        # the same gc row as b_s's row j: b_i - b_j is exactly 0 at i = j
        b_j = tl.load(gc + _gc_rows(t_j, T, i_b, i_h, H) * K + rk, mask=m_k, other=0.0)
        k_j = tl.load(k + row_j * K + rk, mask=m_j, other=0.0).to(tl.float32)
        q_j = tl.load(q + row_j * K + rk, mask=m_j, other=0.0).to(tl.float32)
        # row j as the key (dq of rows i ≥ j, dA[i, j]) and as the query (dk of rows i ≤ j, dA[j, i])
        da_col = tl.load(da + row_s * C + s0 + j, mask=t_s < T, other=0.0)
        da_row = tl.load(da + row_j * C + s0 + rs, mask=t_j < T, other=0.0)
        dqs += da_col[:, None] * k_j[None, :] * tl.exp(tl.where(rs[:, None] >= j, b_s - b_j[None, :], float("-inf")))
        dks += da_row[:, None] * q_j[None, :] * tl.exp(tl.where(rs[:, None] <= j, b_j[None, :] - b_s, float("-inf")))
    tl.store(dq + row_s[:, None] * K + rk[None, :], dqs.to(dq.dtype.element_ty), mask=m_s)
    tl.store(dk + row_s[:, None] * K + rk[None, :], dks.to(dk.dtype.element_ty), mask=m_s)
    tl.store(db + row_s[:, None] * K + rk[None, :], qq.to(tl.float32) * dqs - kk.to(tl.float32) * dks, mask=m_s)


@triton.autotune(configs=_tile_configs({"BK": (32, 64)}, (4, 8), (1, 2, 3)), key=["K", "V", "C", "BV", "DIAG"])
@triton.jit
def dv_bwd(
    q, k, g, a, dh, do, dv, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
    BV: tl.constexpr, DIAG: tl.constexpr, PREC: tl.constexpr,
):
    """Per (V block, chunk, batch·head): dv = Aᵀ do + (k ⊙ tail) dS, with K walked in blocks of BK.
    Scalar decay recomputes the scores A; diagonal decay reads the forward's (and g is gc)."""
    i_v, c, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    n = tl.cdiv(T, C)
    rv, rc = i_v * BV + tl.arange(0, BV), tl.arange(0, C)
    t = c * C + rc
    m_t, m_v = t < T, rv < V
    row = (i_b * T + t) * H + i_h
    m_tv = m_t[:, None] & m_v[None, :]
    dhc = dh + (i_bh * n + c) * K * V
    dv_acc = tl.zeros([C, BV], dtype=tl.float32)
    if DIAG:  # g is gc
        aa = tl.load(a + row[:, None] * C + rc[None, :], mask=m_t[:, None], other=0.0)
        gc_t, gc_end = _gc_rows(t, T, i_b, i_h, H), _gc_rows(c * C + C - 1, T, i_b, i_h, H)
        for k0 in range(0, K, BK):
            rk = k0 + tl.arange(0, BK)
            m = m_t[:, None] & (rk[None, :] < K)
            kk = tl.load(k + row[:, None] * K + rk[None, :], mask=m, other=0.0)
            b = tl.load(g + gc_t[:, None] * K + rk[None, :], mask=(rk < K)[None, :], other=0.0)
            b_end = tl.load(g + gc_end * K + rk, mask=rk < K, other=0.0)
            dhh = tl.load(dhc + rk[:, None] * V + rv[None, :], mask=(rk[:, None] < K) & m_v[None, :], other=0.0)
            dv_acc += tl.dot((kk * tl.exp(b_end[None, :] - b)).to(dhh.dtype), dhh, input_precision=PREC)
    else:
        gg = tl.load(g + row, mask=m_t, other=0.0).to(tl.float32)
        b = tl.cumsum(gg, 0)
        tail = tl.exp(tl.cumsum(gg, 0, reverse=True) - gg)
        aa = tl.zeros([C, C], dtype=tl.float32)
        for k0 in range(0, K, BK):
            rk = k0 + tl.arange(0, BK)
            m = m_t[:, None] & (rk[None, :] < K)
            qq = tl.load(q + row[:, None] * K + rk[None, :], mask=m, other=0.0)
            kk = tl.load(k + row[:, None] * K + rk[None, :], mask=m, other=0.0)
            dhh = tl.load(dhc + rk[:, None] * V + rv[None, :], mask=(rk[:, None] < K) & m_v[None, :], other=0.0)
            aa += tl.dot(qq, tl.trans(kk), input_precision=PREC)
            dv_acc += tl.dot((kk * tail[:, None]).to(dhh.dtype), dhh, input_precision=PREC)
        aa = aa * tl.exp(tl.where(rc[:, None] >= rc[None, :], b[:, None] - b[None, :], float("-inf")))
    dd = tl.load(do + row[:, None] * V + rv[None, :], mask=m_tv, other=0.0)
    dv_acc += tl.dot(tl.trans(aa).to(dd.dtype), dd, input_precision=PREC)
    tl.store(dv + row[:, None] * V + rv[None, :], dv_acc.to(dv.dtype.element_ty), mask=m_tv)


def _decay_grad_configs() -> list[triton.Config]:
    """Column blocks BW with 2048 values per tile (BT rows)."""
    if _INTERPRET:  # 16 rows, so that the CPU tests carry across several iterations
        return [triton.Config({"BW": 16, "BT": 16}, num_warps=4, num_stages=1)]
    return [triton.Config({"BW": bw, "BT": 2048 // bw}, num_warps=w) for bw in (1, 2, 4, 8, 16, 32, 64) for w in (4, 8)]


def _fit_width(configs: list[triton.Config], nargs: dict, **kwargs) -> list[triton.Config]:
    """Column blocks of 16 to 64 for W ≥ 16 (more blocks, more programs walking T in parallel), else
    one block of W's power of two (scalar decay: 1)."""
    w = triton.next_power_of_2(kwargs["W"])
    return [c for c in configs if (16 <= c.kwargs["BW"] <= w if w >= 16 else c.kwargs["BW"] == w)]


@triton.autotune(configs=_decay_grad_configs(), key=["NK", "W"], prune_configs_by={"early_config_prune": _fit_width})
@triton.jit
def decay_grad(
    db, dg, T,
    NK: tl.constexpr, H: tl.constexpr, W: tl.constexpr, BT: tl.constexpr, BW: tl.constexpr,
):
    """dg[b, t, h] = Σ_{s ≥ t} Σ_j db[j, b, s, h] over [W] columns (float32): the decay gradient as the
    reverse cumulative sum over the sequence of the per-token terms, summed over NK slabs (the
    scalar-decay K blocks). Per (column block, batch·head), a loop from the last rows to the first;
    torch's cumsum over that outer dim was a large share of the whole fwd+bwd."""
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
