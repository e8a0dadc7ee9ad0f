"""The chunkwise affine op against the token-by-token recurrence, and the combine it carries with."""

import pytest
import torch

from psm_train.kernels.chunk_affine import chunk_affine
from psm_train.kernels.chunk_affine.reference import chunk_affine_ref, recurrent_affine_ref
from psm_train.kernels.chunk_affine.combine import combine

B, T, H, K, V = 2, 13, 2, 3, 4  # T = 13: a multiple of no chunk size tested but 1


def inputs(decay: str, *, strength: float = 1.0):
    """q, k, v, log_decay ([..., K] 'diagonal' or [..., 1] 'scalar', in [-strength, 0]), initial state."""
    f64 = dict(generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    q, k = torch.randn(2, B, T, H, K, **f64)
    v = torch.randn(B, T, H, V, **f64)
    width = K if decay == "diagonal" else 1
    log_decay = -strength * torch.rand(B, T, H, width, **f64)
    s0 = torch.randn(B, H, K, V, **f64)
    return q, k, v, log_decay, s0


def assert_close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("decay", ["scalar", "diagonal"])
@pytest.mark.parametrize("chunk_size", [1, 4, 5, 16])
@pytest.mark.parametrize("with_initial", [False, True])
@pytest.mark.parametrize("strength", [1.0, 20.0])
def test_chunk_equals_recurrent(decay, chunk_size, with_initial, strength):
    q, k, v, g, s0 = inputs(decay, strength=strength)
    s0 = s0 if with_initial else None
    o, s = chunk_affine_ref(q, k, v, g, chunk_size=chunk_size, initial_state=s0)
    o_ref, s_ref = recurrent_affine_ref(q, k, v, g, initial_state=s0)
    assert o.shape == (B, T, H, V) and s.shape == (B, H, K, V)
    assert torch.isfinite(o).all() and torch.isfinite(s).all()
    assert_close(o, o_ref)
    assert_close(s, s_ref)


@pytest.mark.parametrize("decay", ["scalar", "diagonal"])
def test_strong_decay_in_float32(decay):
    """Cumulative log decays reach -260 in a chunk: exp(+260) would overflow float32 (not float64)."""
    q, k, v, g, s0 = inputs(decay, strength=20.0)
    o, s = chunk_affine_ref(*(x.float() for x in (q, k, v, g)), chunk_size=16, initial_state=s0.float())
    o_ref, s_ref = recurrent_affine_ref(q, k, v, g, initial_state=s0)
    assert torch.isfinite(o).all() and torch.isfinite(s).all()
    torch.testing.assert_close(o.double(), o_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(s.double(), s_ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("decay", ["scalar", "diagonal"])
@pytest.mark.parametrize("strength", [1.0, 20.0])
def test_gradients_match(decay, strength):
    q, k, v, g, s0 = inputs(decay, strength=strength)
    w = torch.randn(B, T, H, V, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    w_s = torch.randn(B, H, K, V, generator=torch.Generator().manual_seed(10), dtype=torch.float64)

    def grads(fn, **kw):
        leaves = [x.clone().requires_grad_() for x in (q, k, v, g, s0)]
        o, s = fn(*leaves[:4], initial_state=leaves[4], **kw)
        ((o * w).sum() + (s * w_s).sum()).backward()
        return [x.grad for x in leaves]

    for got, want in zip(grads(chunk_affine_ref, chunk_size=4), grads(recurrent_affine_ref)):
        assert torch.isfinite(got).all()
        assert_close(got, want)


@pytest.mark.parametrize("decay", ["scalar", "diagonal"])
def test_combine_is_associative(decay):
    g = torch.Generator().manual_seed(3)
    width = K if decay == "diagonal" else 1
    f64 = dict(generator=g, dtype=torch.float64)
    a, b, c = [(-torch.rand(B, H, width, **f64), torch.randn(B, H, K, V, **f64)) for _ in range(3)]
    left = combine(*combine(*a, *b), *c)
    right = combine(*a, *combine(*b, *c))
    assert_close(left[0], right[0])
    assert_close(left[1], right[1])


@pytest.mark.parametrize("decay", ["scalar", "diagonal"])
def test_split_sequence_carries_state(decay):
    q, k, v, g, s0 = inputs(decay)
    whole, s_whole = chunk_affine(q, k, v, g, chunk_size=4, initial_state=s0)
    first, s_mid = chunk_affine(q[:, :6], k[:, :6], v[:, :6], g[:, :6], chunk_size=4, initial_state=s0)
    second, s_end = chunk_affine(q[:, 6:], k[:, 6:], v[:, 6:], g[:, 6:], chunk_size=4, initial_state=s_mid)
    assert_close(torch.cat((first, second), dim=1), whole)
    assert_close(s_end, s_whole)


@pytest.mark.parametrize("decay", ["scalar", "diagonal"])
def test_bf16_accumulates_in_fp32(decay):
    q, k, v, g, s0 = inputs(decay, strength=2.0)
    low = [x.bfloat16() for x in (q, k, v, g, s0)]
    o, s = chunk_affine(*low[:4], chunk_size=4, initial_state=low[4])
    # The float64 run sees the same bf16-rounded inputs, so only the op's own rounding differs.
    o_ref, s_ref = chunk_affine(*[x.double() for x in low[:4]], chunk_size=4, initial_state=low[4].double())
    assert o.dtype == torch.bfloat16 and s.dtype == torch.float32
    # The state stays in float32: its error is float32 accumulation over 13 tokens (~1e-6 relative).
    torch.testing.assert_close(s.double(), s_ref, rtol=1e-5, atol=1e-5)
    # o is rounded once to bf16 at the end (8 significant bits: relative error ≤ 2^-8 ≈ 4e-3).
    # Accumulating in bf16 instead would compound that rounding over every token and chunk.
    torch.testing.assert_close(o.double(), o_ref, rtol=2**-8, atol=1e-2)
