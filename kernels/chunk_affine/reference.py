"""Plain PyTorch references of the affine recurrence of PSM.md section 2.

Per batch element and head, with the state S [K, V]:

    S_t = Diag(exp(g_t)) S_{t-1} + k_t v_t^T,        o_t = S_t^T q_t

g_t ≤ 0 is the log decay, either over the key dim (GLA) or one scalar per head stored as [..., 1]
(Mamba2, RetNet, linear attention), which broadcasts over K. o_t includes token t's own
contribution; the op does no scaling, models scale q themselves.

Precision: half-precision inputs are accumulated in float32 (float64 stays float64), with
autocast switched off inside, as a Triton kernel would; o comes back in v's dtype, the state in
the accumulation dtype.

- `chunk_affine_ref`: the chunkwise form a kernel implements, with the carry across chunks done
  by the affine combine of `combine`.
- `recurrent_affine_ref`: token by token, the independent check of the chunkwise form.
- `affine_step`: one token, for generation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from psm_train.kernels.chunk_affine.combine import apply


def _accumulation_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def chunk_affine_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor,
    *,
    chunk_size: int,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunkwise parallel form.

    q, k: [B, T, H, K]; v: [B, T, H, V]; log_decay: [B, T, H, K] or [B, T, H, 1];
    initial_state: [B, H, K, V] or None (zeros). T need not be a multiple of chunk_size.
    Returns o [B, T, H, V] and the final state [B, H, K, V].

    Inside a chunk of C tokens, with b_i the cumulative log decay from the chunk start through
    token i: o_i = sum_{j ≤ i} ((q_i ⊙ exp(b_i - b_j)) · k_j) v_j + S_in^T (q_i ⊙ exp(b_i)).
    Each chunk is also the affine element (b_C, sum_j (k_j ⊙ exp(b_C - b_j)) v_j^T): its total
    log decay and the state it produces from a zero incoming state. Applying those elements in
    order (`combine.apply`, the combine with a state) gives every chunk's S_in.
    """
    b, t, h, _ = q.shape
    out_dtype, acc = v.dtype, _accumulation_dtype(v)
    n = -(-t // chunk_size)

    def chunks(x: torch.Tensor) -> torch.Tensor:
        """[B, T, H, D] -> [B, H, N, C, D] in the accumulation dtype, zero-padded at the end.

        The padding is inert: k = v = 0 adds nothing to the state and g = 0 keeps it.
        """
        x = F.pad(x.to(acc), (0, 0, 0, 0, 0, n * chunk_size - t))
        return x.view(b, n, chunk_size, h, x.shape[-1]).permute(0, 3, 1, 2, 4)

    with torch.autocast(q.device.type, enabled=False):
        q, k, v, g = chunks(q), chunks(k), chunks(v), chunks(log_decay)
        cum = g.cumsum(-2)  # [B, H, N, C, K | 1]

        # Decay from token j to token i as exact [C, C, K | 1] factors. Masking j > i before the
        # exp keeps b_i - b_j ≤ 0 wherever it is exponentiated: nothing overflows for strong
        # decays, unlike a factorisation exp(b_i) · exp(-b_j).
        causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=q.device).tril()
        gap = cum[..., :, None, :] - cum[..., None, :, :]
        decay = gap.masked_fill(~causal[:, :, None], float("-inf")).exp()
        if g.shape[-1] == 1:
            scores = (q @ k.transpose(-1, -2)) * decay[..., 0]
        else:
            scores = torch.einsum("...ik,...jk,...ijk->...ij", q, k, decay)
        o = scores @ v  # [B, H, N, C, V]

        total = cum[..., -1, :]  # [B, H, N, K | 1]
        local = (k * (total[..., None, :] - cum).exp()).transpose(-1, -2) @ v  # [B, H, N, K, V]
        state = initial_state.to(acc) if initial_state is not None else v.new_zeros(b, h, k.shape[-1], v.shape[-1])
        incoming = []
        for i in range(n):
            incoming.append(state)
            state = apply(total[:, :, i], local[:, :, i], state)
        o = o + (q * cum.exp()) @ torch.stack(incoming, dim=2)

    o = o.permute(0, 2, 3, 1, 4).reshape(b, n * chunk_size, h, v.shape[-1])[:, :t]
    return o.to(out_dtype), state


def affine_step(
    q_t: torch.Tensor,
    k_t: torch.Tensor,
    v_t: torch.Tensor,
    log_decay_t: torch.Tensor,
    state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token of the recurrence.

    q_t, k_t: [B, H, K]; v_t: [B, H, V]; log_decay_t: [B, H, K] or [B, H, 1];
    state: [B, H, K, V] or None (zeros). Returns o_t [B, H, V] and the new state [B, H, K, V].
    """
    acc = _accumulation_dtype(v_t)
    with torch.autocast(q_t.device.type, enabled=False):
        q, k, v = q_t.to(acc), k_t.to(acc), v_t.to(acc)
        update = k[..., :, None] * v[..., None, :]
        if state is not None:
            update = log_decay_t.to(acc).exp()[..., None] * state.to(acc) + update
        o = (q[..., None, :] @ update)[..., 0, :]
    return o.to(v_t.dtype), update


def recurrent_affine_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor,
    *,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-by-token form. Shapes as in `chunk_affine_ref`."""
    state, outputs = initial_state, []
    for t in range(q.shape[1]):
        o, state = affine_step(q[:, t], k[:, t], v[:, t], log_decay[:, t], state)
        outputs.append(o)
    return torch.stack(outputs, dim=1), state
