"""The parallel scan and the online counter against an independent recursive tree (PSM.md §3)."""

import math

import pytest
import torch

from psm_train.scan import OnlineScan, prefix_scan
from psm_train.scan.tree import downsweep, upsweep



@pytest.fixture(autouse=True)
def float64_by_default():
    """Exactness is the claim here; restore the default afterwards so other test files keep float32."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


class MLPAgg(torch.nn.Module):
    """A random MLP over [older ; newer]: neither associative nor commutative. Counts its calls."""

    def __init__(self, dim: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w1 = torch.nn.Parameter(torch.randn(2 * dim, 16, generator=g) / math.sqrt(2 * dim))
        self.w2 = torch.nn.Parameter(torch.randn(16, dim, generator=g) / 4)
        self.calls = 0

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return torch.tanh(torch.cat((a, b), -1) @ self.w1) @ self.w2 + 0.5 * b


def block(x, agg, start, size):
    """Aggregate of the aligned block [start, start+size) by recursive halving."""
    if size == 1:
        return x[:, start]
    half = size // 2
    return agg(block(x, agg, start, half), block(x, agg, start + half, half))


def reference_prefix(x, agg, i):
    """P_i: the aligned blocks covering [0, i) from the most significant bit down, left-folded."""
    acc, start = None, 0
    for k in reversed(range(i.bit_length())):
        if i >> k & 1:
            b = block(x, agg, start, 1 << k)
            acc = b if acc is None else agg(acc, b)
            start += 1 << k
    return acc


def test_psm_md_examples():
    """P_6 = Agg(B[0:4], B[4:6]) and P_7 = Agg(Agg(B[0:4], B[4:6]), x6), spelled out."""
    agg = MLPAgg(3)
    x = torch.randn(2, 8, 3)
    prefixes, has = prefix_scan(x, agg)
    b03 = agg(agg(x[:, 0], x[:, 1]), agg(x[:, 2], x[:, 3]))
    b45 = agg(x[:, 4], x[:, 5])
    # The scan batches a level's pairs into one call, whose matmuls may round differently in the last
    # bit; another parenthesisation of this nonlinear Agg would differ by O(1), far above 1e-12.
    torch.testing.assert_close(prefixes[:, 6], agg(b03, b45), rtol=0, atol=1e-12)
    torch.testing.assert_close(prefixes[:, 7], agg(agg(b03, b45), x[:, 6]), rtol=0, atol=1e-12)
    torch.testing.assert_close(prefixes[:, 1], x[:, 0], rtol=0, atol=0)
    assert has.tolist() == [False] + [True] * 7


@pytest.mark.parametrize("n", range(1, 71))
def test_parallel_online_and_tree_agree(n):
    dim, batch = 4, 3
    agg = MLPAgg(dim, seed=n)
    x = torch.randn(batch, n, dim, generator=torch.Generator().manual_seed(100 + n))
    agg.calls = 0
    prefixes, has = prefix_scan(x, agg)
    # One batched call per tree level, up and down.
    assert agg.calls <= 2 * max(1, math.ceil(math.log2(n)))
    assert has.tolist() == [False] + [True] * (n - 1)

    online = OnlineScan(agg)
    assert online.prefix() is None
    for t in range(n):
        if t > 0:
            expected = reference_prefix(x, agg, t)
            torch.testing.assert_close(prefixes[:, t], expected, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(online.prefix(), expected, rtol=1e-12, atol=1e-12)
        online.push(x[:, t])
        pushed = t + 1
        assert online.num_roots <= math.ceil(math.log2(pushed + 1))
        assert online.num_roots == bin(pushed).count("1")
        assert online.agg_calls <= 2 * pushed
    torch.testing.assert_close(online.prefix(), reference_prefix(x, agg, n), rtol=1e-12, atol=1e-12)


def test_gradients_match_reference_tree():
    n, dim = 13, 3
    agg = MLPAgg(dim)
    x = torch.randn(2, n, dim, requires_grad=True)
    weights = torch.randn(2, n - 1, dim)
    prefixes, _ = prefix_scan(x, agg)
    (grad_scan,) = torch.autograd.grad((prefixes[:, 1:] * weights).sum(), x)
    expected = torch.stack([reference_prefix(x, agg, i) for i in range(1, n)], dim=1)
    (grad_ref,) = torch.autograd.grad((expected * weights).sum(), x)
    torch.testing.assert_close(grad_scan, grad_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n_ranks", [2, 4])
def test_root_prefix_splits_the_tree_into_aligned_blocks(n_ranks):
    """Each aligned block scanned with its incoming prefix equals the single-device scan."""
    n, dim = 16, 3
    agg = MLPAgg(dim)
    x = torch.randn(2, n, dim)
    full, _ = prefix_scan(x, agg)
    per_rank = n // n_ranks
    for r in range(n_ranks):
        root = None if r == 0 else reference_prefix(x, agg, r * per_rank)
        local, has = prefix_scan(x[:, r * per_rank : (r + 1) * per_rank], agg, root_prefix=root)
        assert bool(has[0]) == (r > 0)
        torch.testing.assert_close(local[:, int(r == 0) :], full[:, r * per_rank + int(r == 0) : (r + 1) * per_rank], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n", [1, 2, 4, 8, 16])
def test_uniform_calls_change_no_value_and_match_the_calls_of_a_rooted_downsweep(n):
    """Rank 0 of a sequence-parallel group (no root prefix) must call Agg like the ranks after it."""
    dim = 3
    agg = MLPAgg(dim)
    shapes = []

    def recording(a, b):
        shapes.append(tuple(a.shape))
        return agg(a, b)

    x = torch.randn(2, n, dim, requires_grad=True)
    blocks = upsweep(x, agg)
    plain = downsweep(blocks, n, agg)
    shapes.clear()
    uniform = downsweep(blocks, n, recording, uniform_calls=True)
    uniform_shapes = list(shapes)
    shapes.clear()
    downsweep(blocks, n, recording, root_prefix=torch.randn(2, dim))
    assert uniform_shapes == shapes
    # Equal up to rounding: a batched call over one more pair may round its matmuls differently.
    torch.testing.assert_close(uniform, plain, rtol=1e-12, atol=1e-12)
    if n > 1:  # the discarded pairs stay in the graph (their backward runs) and add exactly zero
        inputs = (x, agg.w1, agg.w2)
        uniform_grads = torch.autograd.grad(uniform[:, 1:].sum(), inputs, retain_graph=True, allow_unused=True,
                                            materialize_grads=True)
        plain_grads = torch.autograd.grad(plain[:, 1:].sum(), inputs, allow_unused=True, materialize_grads=True)
        for a, b in zip(uniform_grads, plain_grads):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_root_prefix_needs_power_of_two_block():
    with pytest.raises(ValueError, match="power-of-two"):
        prefix_scan(torch.randn(1, 6, 2), MLPAgg(2), root_prefix=torch.randn(1, 2))


def test_multidimensional_states():
    """States may have any trailing shape, e.g. c vectors of width d."""

    def agg(a, b):
        return torch.tanh(a @ b.transpose(-1, -2)) @ b + a

    x = torch.randn(2, 11, 4, 4)
    prefixes, _ = prefix_scan(x, agg)
    for i in range(1, 11):
        torch.testing.assert_close(prefixes[:, i], reference_prefix(x, agg, i), rtol=1e-12, atol=1e-12)
