"""The chunked linear cross-entropy against F.linear + F.cross_entropy: loss and gradients."""

import pytest
import torch

from psm_train.kernels.linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_ref

N, D, V_PAD, VOCAB = 37, 24, 128, 100
IGNORE = -100


def inputs(dtype=torch.float64, *, ignore_rows=(3, 4, 20)):
    """hidden [N, D], weight [V_PAD, D], targets [N] in [0, VOCAB) with some rows ignored."""
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, D, generator=gen, dtype=dtype)
    weight = torch.randn(V_PAD, D, generator=gen, dtype=dtype) / D**0.5
    targets = torch.randint(0, VOCAB, (N,), generator=gen)
    targets[list(ignore_rows)] = IGNORE
    return hidden, weight, targets


def loss_and_grads(fn, hidden, weight, targets, **kwargs):
    hidden, weight = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = fn(hidden, weight, targets, **kwargs)
    grad_loss = torch.tensor(0.7, dtype=loss.dtype)  # a scale other than 1 reaches the stored grads
    (loss * grad_loss).backward()
    return loss, hidden.grad, weight.grad


@pytest.mark.parametrize("chunk_rows", [1, 5, 16, 37, 64])
def test_float64_matches_reference(chunk_rows):
    # chunk_rows 5: rows 0-4 form a chunk with two ignored rows, 16 does not divide 37.
    hidden, weight, targets = inputs()
    targets[5:10] = IGNORE  # with chunk_rows 5, a chunk whose every row is ignored
    got = loss_and_grads(linear_cross_entropy, hidden, weight, targets, vocab_size=VOCAB, chunk_rows=chunk_rows)
    want = loss_and_grads(linear_cross_entropy_ref, hidden, weight, targets, vocab_size=VOCAB)
    assert got[0].dtype == torch.float64 and got[0].shape == ()
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    # padded rows of the head are never scored, so they get no gradient
    assert torch.equal(got[2][VOCAB:], torch.zeros(V_PAD - VOCAB, D, dtype=torch.float64))


def test_padding_is_excluded_from_the_softmax():
    # Large padded logits would dominate the softmax if they were not masked.
    hidden, weight, targets = inputs()
    weight[VOCAB:] = 50 * hidden[:1]
    got = linear_cross_entropy(hidden, weight, targets, vocab_size=VOCAB)
    want = linear_cross_entropy_ref(hidden, weight[:VOCAB], targets)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_unpadded_head_and_custom_ignore_index():
    hidden, weight, targets = inputs()
    targets[targets == IGNORE] = 7  # class 7 is now the ignored id
    got = loss_and_grads(linear_cross_entropy, hidden, weight, targets, ignore_index=7, chunk_rows=8)
    want = loss_and_grads(linear_cross_entropy_ref, hidden, weight, targets, ignore_index=7)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_all_rows_ignored_gives_zero_loss_and_grads():
    hidden, weight, targets = inputs()
    targets[:] = IGNORE
    loss, grad_hidden, grad_weight = loss_and_grads(linear_cross_entropy, hidden, weight, targets, vocab_size=VOCAB)
    assert loss.item() == 0 and not grad_hidden.any() and not grad_weight.any()


def test_float32_matches_reference():
    hidden, weight, targets = inputs(torch.float32)
    got = loss_and_grads(linear_cross_entropy, hidden, weight, targets, vocab_size=VOCAB, chunk_rows=16)
    want = loss_and_grads(linear_cross_entropy_ref, hidden, weight, targets, vocab_size=VOCAB)
    assert got[0].dtype == torch.float32
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_bfloat16_autocast_matches_reference():
    # fp32 parameters under CPU autocast: both sides run the matmuls in bf16 and the softmax in
    # float32; they differ in where bf16 rounds (the reference's logit gradient is bf16 whole).
    hidden, weight, targets = inputs(torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = loss_and_grads(linear_cross_entropy, hidden, weight, targets, vocab_size=VOCAB, chunk_rows=16)
        want = loss_and_grads(linear_cross_entropy_ref, hidden, weight, targets, vocab_size=VOCAB)
    exact = loss_and_grads(linear_cross_entropy_ref, hidden.double(), weight.double(), targets, vocab_size=VOCAB)
    assert got[0].dtype == torch.float32
    assert got[1].dtype == torch.float32 and got[2].dtype == torch.float32  # grads in the parameters' dtype
    for g, w, e in zip(got, want, exact):
        scale = e.abs().max().item()
        torch.testing.assert_close(g, w, rtol=2e-2, atol=1e-2 * scale)
        torch.testing.assert_close(g.double(), e, rtol=2e-2, atol=1e-2 * scale)


def test_no_grad_needed():
    hidden, weight, targets = inputs()
    with torch.no_grad():
        loss = linear_cross_entropy(hidden.requires_grad_(), weight, targets, vocab_size=VOCAB)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, linear_cross_entropy_ref(hidden.detach(), weight, targets, vocab_size=VOCAB))


def test_only_weight_requires_grad():
    hidden, weight, targets = inputs()
    weight.requires_grad_()
    linear_cross_entropy(hidden, weight, targets, vocab_size=VOCAB, chunk_rows=10).backward()
    w = weight.detach().clone().requires_grad_()
    linear_cross_entropy_ref(hidden, w, targets, vocab_size=VOCAB).backward()
    torch.testing.assert_close(weight.grad, w.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(vocab_size=129), "vocab_size"),
        (dict(vocab_size=0), "vocab_size"),
        (dict(chunk_rows=0), "chunk_rows"),
    ],
)
def test_bad_arguments(kwargs, match):
    hidden, weight, targets = inputs()
    with pytest.raises(ValueError, match=match):
        linear_cross_entropy(hidden, weight, targets, **kwargs)


def test_bad_shapes():
    hidden, weight, targets = inputs()
    with pytest.raises(ValueError, match="hidden"):
        linear_cross_entropy(hidden[None], weight, targets)
    with pytest.raises(ValueError, match="targets"):
        linear_cross_entropy(hidden, weight, targets[:-1])
    with pytest.raises(ValueError, match="targets"):
        linear_cross_entropy(hidden, weight, targets.int())


def test_chunk_math_traces_whole_for_the_gpu_compiler():
    """On CUDA the chunk's loss and gradient run through torch.compile: the function traces as one graph and
    computes what it computes eagerly (padded columns and ignored rows included)."""
    from psm_train.kernels.linear_cross_entropy.fused import chunk_loss_and_grad

    torch.manual_seed(0)
    logits = torch.randn(9, 16, dtype=torch.float64)
    targets = torch.tensor([0, 3, 11, 2, 0, 5, 7, 1, 0])
    valid = torch.tensor([True, True, True, False, True, True, True, True, False])
    compiled = torch.compile(chunk_loss_and_grad, backend="aot_eager", fullgraph=True)
    for got, want in zip(compiled(logits, targets, valid, 12, torch.float64),
                         chunk_loss_and_grad(logits, targets, valid, 12, torch.float64)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    loss, grad = chunk_loss_and_grad(logits, targets, valid, 12, torch.float64)
    assert grad[:, 12:].abs().max() == 0 and grad[~valid].abs().max() == 0
    assert torch.allclose(grad[valid].sum(-1), torch.zeros(int(valid.sum()), dtype=torch.float64), atol=1e-12)


def test_chunk_math_compiles_with_inductor():
    """The compiler the GPU path uses (inductor; here generating CPU code) lowers the chunk math exactly."""
    from psm_train.kernels.linear_cross_entropy.fused import chunk_loss_and_grad

    torch.manual_seed(1)
    logits = torch.randn(33, 40, dtype=torch.float32).to(torch.bfloat16)
    targets = torch.randint(0, 30, (33,))
    valid = torch.rand(33) > 0.2
    targets = torch.where(valid, targets, 0)
    compiled = torch.compile(chunk_loss_and_grad, dynamic=False, fullgraph=True)
    (loss_c, grad_c), (loss_e, grad_e) = (f(logits, targets, valid, 30, torch.float32) for f in (compiled, chunk_loss_and_grad))
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_c.float(), grad_e.float(), rtol=1e-2, atol=1e-2)  # bf16 outputs
