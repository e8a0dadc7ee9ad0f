"""Triton chunked affine kernels against the PyTorch reference (float64), forward and backward.

On a CPU machine the kernels run under TRITON_INTERPRET=1 (set by tests/conftest.py before triton
is first imported); on a GPU they are compiled, and the bf16 cases run as well.
"""

import numpy as np
import pytest
import torch

CUDA = torch.cuda.is_available()
pytest.importorskip("triton")

from psm_train.kernels.chunk_affine import chunk_affine, resolve_backend  # noqa: E402
from psm_train.kernels.chunk_affine.reference import chunk_affine_ref  # noqa: E402
from psm_train.kernels.chunk_affine.triton_op import chunk_affine_triton  # noqa: E402

DEVICE = "cuda" if CUDA else "cpu"
# Relative error ‖x - ref‖ / ‖ref‖ against float64. fp32 is exact arithmetic up to rounding.
# bf16 inputs are rounded once (2^-9 relative), and the kernels round the matmul operands again
# (decay-weighted q, k, the per-chunk states, the [C, C] score matrix): a few 2^-9 roundings in
# sums of random terms stay near 1e-2; the decay gradient, a reverse cumulative sum of
# q·dq - k·dk, cancels more and gets twice that.
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


def make(decay, T, *, K=16, V=32, B=1, H=2, strength=1.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    f64 = dict(generator=gen, dtype=torch.float64)
    q, k = torch.randn(2, B, T, H, K, **f64) / K**0.5
    v = torch.randn(B, T, H, V, **f64)
    g = -strength * torch.rand(B, T, H, K if decay == "diagonal" else 1, **f64)
    s0 = torch.randn(B, H, K, V, **f64)
    w_o, w_s = torch.randn(B, T, H, V, **f64), torch.randn(B, H, K, V, **f64)
    return (q, k, v, g, s0), (w_o, w_s)


def rel(x, ref):
    x = x.double().cpu()
    assert torch.isfinite(x).all()
    return ((x - ref).norm() / ref.norm()).item()


def s0_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def run(fn, xs, ws, dtype, chunk_size, with_initial):
    """o, final state and the gradients of sum(o·w_o) + sum(s·w_s) for q, k, v, g (and s0)."""
    xs = [x.to(DEVICE, dtype if i < 4 else s0_dtype(dtype)).clone().requires_grad_() for i, x in enumerate(xs)]
    q, k, v, g, s0 = xs
    o, s = fn(q, k, v, g, chunk_size=chunk_size, initial_state=s0 if with_initial else None)
    ((o.double() * ws[0].to(DEVICE)).sum() + (s.double() * ws[1].to(DEVICE)).sum()).backward()
    grads = [x.grad for x in xs[: 5 if with_initial else 4]]
    return [o, s, *grads]


NAMES = ["o", "state", "dq", "dk", "dv", "dlog_decay", "dinitial_state"]


def check(decay, T, chunk_size, with_initial, dtype, strength=1.0, **dims):
    """Relative errors against float64 within TOL, or within 2x of the PyTorch reference's own
    error in the same dtype: with strong decays the cumulative log decays reach hundreds, and
    their float32 rounding (|b|·2^-24) alone exceeds 1e-4 in both implementations."""
    xs, ws = make(decay, T, strength=strength, **dims)
    exact = [x.cpu() for x in run(chunk_affine_ref, xs, ws, torch.float64, chunk_size, with_initial)]
    got = run(chunk_affine_triton, xs, ws, dtype, chunk_size, with_initial)
    same_dtype = run(chunk_affine_ref, xs, ws, dtype, chunk_size, with_initial)
    errors = {n: rel(x, r) for n, x, r in zip(NAMES, got, exact)}
    ref_errors = {n: rel(x, r) for n, x, r in zip(NAMES, same_dtype, exact)}
    base = {n: TOL[dtype] * (2 if n == "dlog_decay" and dtype != torch.float32 else 1) for n in errors}
    tol = {n: max(base[n], 2 * ref_errors[n]) for n in errors}
    assert all(errors[n] <= tol[n] for n in errors), {n: (f"{errors[n]:.1e}", f"tol {tol[n]:.1e}") for n in errors}


@pytest.mark.parametrize("decay", ["scalar", "diagonal"])
# chunk 5 runs as the kernels' 16; T 150 crosses several chunks of every kernel chunk size up to 64, T 300 of 128
@pytest.mark.parametrize("T,chunk_size", [(37, 16), (64, 32), (50, 5), (150, 64), (300, 128)])
@pytest.mark.parametrize("with_initial", [False, True])
def test_matches_reference_fp32(decay, T, chunk_size, with_initial):
    check(decay, T, chunk_size, with_initial, torch.float32)


# the interpreter (numpy) warns where a kernel lets exponents it discards overflow
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("decay", ["scalar", "diagonal"])
def test_strong_decay_and_odd_dims(decay):
    """Log decay down to -20 per token (e^{+260} would overflow fp32) and head dims that are no tile size,
    over several chunks."""
    check(decay, 150, 16, True, torch.float32, strength=20.0, K=24, V=20)


@pytest.mark.skipif(CUDA, reason="changes the interpreter's scan; a GPU runs its own")
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("decay", ["scalar", "diagonal"])
def test_strong_decay_with_tree_order_cumsum(decay, monkeypatch):
    """The strong-decay case with tl.cumsum adding in tree order, as a GPU's scan does, instead of
    the interpreter's sequential order: a kernel whose b_i - b_j at i = j takes b_i and b_j from
    sums in two orders fails here as on the GPU (decay gradient error 6e-4, tolerance 1e-4)."""
    from triton.runtime import interpreter

    def tree_cumsum(self, x):
        y, d = np.moveaxis(x.handle.data, self.axis, 0), 1
        while d < y.shape[0]:
            y, d = np.concatenate([y[:d], y[d:] + y[:-d]]), 2 * d
        return [self.to_tensor(np.moveaxis(y, 0, self.axis), dtype=x.dtype)]

    monkeypatch.setattr(interpreter.ScanOps, "cumsum", tree_cumsum)
    check(decay, 150, 16, True, torch.float32, strength=20.0, K=24, V=20)


@pytest.mark.parametrize("decay", ["scalar", "diagonal"])
def test_head_dims_over_one_block(decay):
    """K and V over 64: the scalar-decay gradient kernels walk K and V in blocks and sum the decay
    gradient over the K blocks; the diagonal ones walk K in slices with all of V in one tile."""
    check(decay, 40, 16, True, torch.float32, K=80, V=72, H=1)


@pytest.mark.skipif(not CUDA, reason="bf16 kernels run on the GPU")
@pytest.mark.parametrize("decay", ["scalar", "diagonal"])
@pytest.mark.parametrize("T,chunk_size,dim", [(1000, 64, 64), (777, 128, 128), (2048, 16, 128)])
def test_matches_reference_bf16(decay, T, chunk_size, dim):
    check(decay, T, chunk_size, True, torch.bfloat16, K=dim, V=dim, B=2, H=4)


@pytest.mark.skipif(not CUDA, reason="large shapes on the GPU only")
@pytest.mark.parametrize("decay", ["scalar", "diagonal"])
def test_matches_reference_fp32_gpu(decay):
    check(decay, 1500, 64, True, torch.float32, K=128, V=128, B=2, H=2)


def test_decay_grad_column_blocks(monkeypatch):
    """The decay gradient's autotuning candidates, pruned on the GPU only (the interpreter runs one
    config): column blocks of 16 to 64 for diagonal decay, else one block of W's power of two
    (scalar decay: 1), 2048 values per tile."""
    from psm_train.kernels.chunk_affine import triton_kernels as kern

    monkeypatch.setattr(kern, "_INTERPRET", False)
    configs = kern._decay_grad_configs()
    assert all(c.kwargs["BW"] * c.kwargs["BT"] == 2048 for c in configs)

    def widths(W):
        return sorted({c.kwargs["BW"] for c in kern._fit_width(configs, {}, W=W)})

    assert (widths(1), widths(6), widths(24), widths(128)) == ([1], [8], [16, 32], [16, 32, 64])


def test_tile_blocks_fit_head_dims(monkeypatch):
    """The K/V tile candidates of the GPU autotuning: none wider than the head dim's power of two,
    V read from the positional arguments or the keywords."""
    from psm_train.kernels.chunk_affine import triton_kernels as kern

    monkeypatch.setattr(kern, "_INTERPRET", False)
    configs = kern._tile_configs({"BK": (32, 64, 128), "BV": (32, 64, 128)}, (4,), (2,))

    def blocks(nargs, **kwargs):
        return sorted({(c.kwargs["BK"], c.kwargs["BV"]) for c in kern._fit_dims(configs, nargs, **kwargs)})

    assert blocks({}, K=128, V=128) == [(a, b) for a in (32, 64, 128) for b in (32, 64, 128)]
    assert blocks({"V": 48}, K=64) == [(32, 32), (32, 64), (64, 32), (64, 64)]
    assert blocks({}, K=16, V=200) == [(32, a) for a in (32, 64, 128)]  # BK: none fits, the narrowest


def test_dispatch():
    q = torch.zeros(1, 4, 1, 16)
    assert resolve_backend("auto", q) == ("triton" if q.is_cuda else "reference")
    assert resolve_backend("reference", q) == "reference"
    assert resolve_backend("auto", q.double()) == "reference"
    assert resolve_backend("auto", q, torch.zeros(1, 4, 1, 512)) == "reference"
    with pytest.raises(ValueError, match="backend"):
        resolve_backend("cuda", q)
    with pytest.raises(RuntimeError, match="float64"):
        resolve_backend("triton", q.double())


def test_forced_triton_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q = torch.zeros(1, 4, 1, 16)
    with pytest.raises(RuntimeError, match="CUDA"):
        chunk_affine(q, q, q, q[..., :1], chunk_size=16, backend="triton")


def small_inputs(decay, *, requires_grad=True):
    """fp32 q, k, v, g, h0 on DEVICE: two kernel chunks (T 20 at chunk 16), small enough for opcheck's reruns."""
    (q, k, v, g, s0), _ = make(decay, 20)
    return [x.float().to(DEVICE).requires_grad_(requires_grad) for x in (q, k, v, g, s0)]


@pytest.mark.parametrize("decay", ["scalar", "diagonal"])
@pytest.mark.parametrize("with_initial", [False, True])
def test_opcheck_forward(decay, with_initial):
    """The registered forward op: schema, autograd registration, fake (meta) shapes and strides
    against the real outputs, and AOT dispatch with dynamic shapes (which runs the backward op)."""
    from psm_train.kernels.chunk_affine.triton_op import chunk_affine_fwd

    q, k, v, g, s0 = small_inputs(decay)
    torch.library.opcheck(chunk_affine_fwd, (q, k, v, g, s0 if with_initial else None, 16))


@pytest.mark.parametrize("decay", ["scalar", "diagonal"])
@pytest.mark.parametrize("with_grads", [False, True])
def test_opcheck_backward(decay, with_grads):
    """The registered backward op (not differentiable itself), with the output gradients given or absent (None)."""
    from psm_train.kernels.chunk_affine.triton_op import chunk_affine_bwd, chunk_affine_fwd

    q, k, v, g, s0 = small_inputs(decay, requires_grad=False)
    o, ht, h, gc, a = chunk_affine_fwd(q, k, v, g, s0, 16)
    do, dht = (torch.randn_like(o), torch.randn_like(ht)) if with_grads else (None, None)
    torch.library.opcheck(chunk_affine_bwd, (q, k, v, gc if decay == "diagonal" else g, h, ht, a, do, dht, 16))


@pytest.mark.parametrize("decay", ["scalar", "diagonal"])
def test_compiles_without_graph_break(decay):
    """torch.compile(fullgraph=True) of a function calling chunk_affine on the Triton path traces
    the op into one graph (a graph break would raise), and gives the eager outputs and gradients."""

    def loss(q, k, v, g, s0):
        o, s = chunk_affine(q, k, v, g, chunk_size=16, initial_state=s0, backend="triton")
        return (o * o).sum() + s.sum()

    results = []
    for fn in (loss, torch.compile(loss, backend="aot_eager", fullgraph=True)):
        xs = small_inputs(decay)
        value = fn(*xs)
        value.backward()
        results.append([value.detach(), *(x.grad for x in xs)])
    for compiled, eager in zip(results[1], results[0]):
        torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["gla", "retnet"])
def test_model_kernel_switch(name):
    """AffineLMConfig.kernel reaches chunk_affine: the same model under both backends agrees."""
    from psm_train.models import MODELS, build_model

    torch.manual_seed(0)
    cfg = MODELS[name][0](d_model=32, n_layers=1, n_heads=2, chunk_size=16, kernel="reference")
    ref_model = build_model(name, cfg, 50).to(DEVICE)
    tri_model = build_model(name, MODELS[name][0](**{**vars(cfg), "kernel": "triton"}), 50).to(DEVICE)
    tri_model.load_state_dict(ref_model.state_dict())
    assert [layer.mixer.kernel for layer in tri_model.layers] == ["triton"]
    tokens = torch.randint(0, 50, (2, 40), device=DEVICE)
    out = [m(tokens) for m in (ref_model, tri_model)]
    for o in out:
        o.square().mean().backward()
    assert rel(out[1].detach(), out[0].detach().double().cpu()) < 1e-4
    grads = [torch.cat([p.grad.flatten() for p in m.parameters()]) for m in (ref_model, tri_model)]
    assert rel(grads[1], grads[0].double().cpu()) < 1e-4
