"""The parallel scan and the online counter against an independent recursive tree (PSM.md §3)."""

import math

import pytest
import torch

from psm_train.scan import OnlineScan, prefix_scan
from psm_train.scan.tree import upsweep



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
    assert has is False  # P_0 is the identity: slot 0 holds no prefix


@pytest.mark.parametrize("n", range(1, 71))
def test_parallel_online_and_tree_agree(n):
    dim, batch = 4, 3
    agg = MLPAgg(dim, seed=n)
    x = torch.randn(batch, n, dim, generator=torch.Generator().manual_seed(100 + n))
    agg.calls = 0
    prefixes, has = prefix_scan(x, agg)
    # One batched call per tree level, up and down.
    assert agg.calls <= 2 * max(1, math.ceil(math.log2(n)))
    assert has is False

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
        assert has == (r > 0)
        torch.testing.assert_close(local[:, int(r == 0) :], full[:, r * per_rank + int(r == 0) : (r + 1) * per_rank], rtol=1e-12, atol=1e-12)


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


class ElementwiseAgg(torch.nn.Module):
    """A per-element nonlinear Agg, neither associative nor commutative. Without matmuls, its result for one
    pair does not depend on how many pairs share the call, so the batched upsweep and the counter's single
    calls must agree bit for bit when their parenthesisation is the same."""

    def __init__(self, dim: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = torch.nn.Parameter(torch.randn(3, dim, generator=g))
        self.calls = 0

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return torch.tanh(self.w[0] * a + self.w[1] * b) + self.w[2] * a * b + 0.5 * b


def assert_same_counter(a: OnlineScan, b: OnlineScan, exact: bool) -> None:
    """The same roots and cached folds at the same levels: bit for bit, or to 1e-12 where matmuls may round
    differently in a batched call."""
    assert a.chunks == b.chunks
    assert len(a.roots) == len(b.roots) and len(a.folds) == len(b.folds)
    for x, y in zip(a.roots + a.folds, b.roots + b.folds):
        assert (x is None) == (y is None)
        if x is not None:
            if exact:
                assert torch.equal(x, y)
            else:
                torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)


def test_elementwise_agg_is_not_associative():
    agg = ElementwiseAgg(4)
    a, b, c = torch.randn(3, 2, 4).unbind(0)
    assert (agg(agg(a, b), c) - agg(a, agg(b, c))).abs().max() > 1e-3
    assert (agg(a, b) - agg(b, a)).abs().max() > 1e-3


@pytest.mark.parametrize("agg_class", [ElementwiseAgg, MLPAgg])
@pytest.mark.parametrize("n", range(0, 18))
def test_prefill_equals_pushing_chunk_by_chunk(n, agg_class):
    """The counter read off one upsweep is the counter of n pushes, and stays so over more pushes."""
    dim, batch, more = 4, 3, 9
    agg = agg_class(dim, seed=n)
    exact = agg_class is ElementwiseAgg
    x = torch.randn(batch, n + more, dim, generator=torch.Generator().manual_seed(200 + n))
    pushed = OnlineScan(agg)
    for t in range(n):
        pushed.push(x[:, t])
    agg.calls = 0
    filled = OnlineScan.prefill(x[:, :n], agg)
    # one batched call per upsweep level, then the folds of the roots: O(log n) in all
    assert filled.agg_calls == agg.calls <= max(n - 1, 0).bit_length() + max(bin(n).count("1") - 1, 0)
    assert_same_counter(filled, pushed, exact)
    if n:
        torch.testing.assert_close(filled.prefix(), reference_prefix(x, agg, n), rtol=1e-12, atol=1e-12)
    else:
        assert filled.prefix() is None
    for t in range(n, n + more):
        pushed.push(x[:, t])
        filled.push(x[:, t])
        assert_same_counter(filled, pushed, exact)


def test_from_upsweep_reads_any_prefix_of_longer_blocks():
    """Blocks of 13 chunks give the counter of any first n of them."""
    agg = ElementwiseAgg(3)
    x = torch.randn(2, 13, 3)
    blocks = upsweep(x, agg)
    for n in range(14):
        pushed = OnlineScan(agg)
        for t in range(n):
            pushed.push(x[:, t])
        filled = OnlineScan.from_upsweep(blocks, n, agg)
        assert_same_counter(filled, pushed, exact=True)
        # the roots are copies: holding the counter does not keep the upsweep's levels alive
        held = {t.untyped_storage().data_ptr() for t in filled.roots if t is not None}
        assert not held & {b.untyped_storage().data_ptr() for b in blocks}
    with pytest.raises(ValueError, match="n: expected 0 <= n <= 13"):
        OnlineScan.from_upsweep(blocks, 14, agg)
