"""Every model: the parallel forward equals online generation token by token (float64), and is causal; the
trimmed last block equals the full one."""

import math

import pytest
import torch

from psm_train.models import MODELS, build_model
from psm_train.models.layers import Block, rotary

VOCAB = 37
T = 23  # not a multiple of any chunk size below
SMALL = {
    "transformer": dict(d_model=32, n_layers=2, n_heads=2),
    "transformer_psm": dict(d_model=32, n_heads=2, chunk_size=4, agg_layers=1, inf_layers=2),
    "gla": dict(d_model=32, n_layers=2, n_heads=2, chunk_size=4),
    "mamba2": dict(d_model=32, n_layers=2, chunk_size=4, head_dim=16, d_state=8),
    "retnet": dict(d_model=32, n_layers=2, n_heads=2, chunk_size=4),
    "linear_attention": dict(d_model=32, n_layers=2, n_heads=2, chunk_size=4),
}


def small_model(name: str, seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg_cls, _ = MODELS[name]
    cfg = cfg_cls(**{**SMALL[name], **overrides})
    cfg.validate()
    model = build_model(name, cfg, VOCAB).double()
    # Larger weights than the init, so that every layer changes the logits measurably.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.3)
    return model.eval()


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_every_registered_model_is_tested():
    assert set(SMALL) == set(MODELS)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_generation_reproduces_parallel_forward(name):
    model = small_model(name)
    tokens = torch.randint(0, VOCAB, (3, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        parallel = model(tokens)
        state = model.init_generation(3)
        online = torch.stack([state.step(tokens[:, t]) for t in range(T)], dim=1)
    assert parallel.shape == (3, T, VOCAB)
    assert relative_error(online, parallel) <= 1e-9
    assert state.describe()["state_bytes"] == state.nbytes() > 0


@pytest.mark.parametrize("name", sorted(SMALL))
@pytest.mark.parametrize("n", [1, 4, 9, 16])
def test_prefill_leaves_the_state_that_stepping_leaves(name, n):
    """prefill(tokens[:n]) returns the logits of step n, and the steps after it continue exactly as after
    n single steps (n on and off chunk boundaries: Transformer-PSM's counter comes from one upsweep)."""
    model = small_model(name)
    tokens = torch.randint(0, VOCAB, (2, n + 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        stepped = model.init_generation(2)
        expected = [stepped.step(tokens[:, t]) for t in range(n + 6)]
        prefilled = model.init_generation(2)
        got = [prefilled.prefill(tokens[:, :n])] + [prefilled.step(tokens[:, t]) for t in range(n, n + 6)]
    assert relative_error(torch.stack(got), torch.stack(expected[n - 1 :])) <= 1e-9
    assert prefilled.describe() == stepped.describe()
    with pytest.raises(ValueError, match="fresh"):
        prefilled.prefill(tokens[:, :1])


@pytest.mark.parametrize("name", sorted(SMALL))
def test_causal(name):
    model = small_model(name)
    tokens = torch.randint(0, VOCAB, (2, T), generator=torch.Generator().manual_seed(2))
    changed = tokens.clone()
    changed[:, 13:] = (changed[:, 13:] + 1) % VOCAB
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, :13], b[:, :13], rtol=1e-12, atol=1e-12)
    assert (a[:, 13:] - b[:, 13:]).abs().max() > 1e-6


@pytest.mark.parametrize("chunk_size", [1, 3, 4])
def test_transformer_psm_state_holds_log_many_roots(chunk_size):
    model = small_model("transformer_psm", chunk_size=chunk_size)
    state = model.init_generation(1)
    with torch.no_grad():
        for t in range(40):
            state.step(torch.tensor([t % VOCAB]))
            chunks = (t + 1) // chunk_size
            summary = state.describe()
            assert summary["chunks"] == chunks
            assert summary["roots"] <= math.ceil(math.log2(chunks + 1))
            assert summary["agg_calls"] <= 2 * chunks


def test_transformer_psm_c1_has_no_length_cap():
    """Positions are window-local, so a sequence far longer than any table still runs."""
    model = small_model("transformer_psm", chunk_size=1)
    with torch.no_grad():
        logits = model(torch.randint(0, VOCAB, (1, 300)))
    assert torch.isfinite(logits).all()


def test_sliding_window_forgets_old_tokens():
    window = 5
    model = small_model("transformer", sliding_window=window, n_layers=1)
    tokens = torch.randint(0, VOCAB, (1, T), generator=torch.Generator().manual_seed(3))
    changed = tokens.clone()
    changed[:, 2] = (changed[:, 2] + 1) % VOCAB
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    # With one layer, position t sees tokens (t - window, t]: token 2 reaches positions 2..6 only.
    assert (a[:, 2 : 2 + window] - b[:, 2 : 2 + window]).abs().amax(-1).min() > 1e-9
    torch.testing.assert_close(a[:, 2 + window :], b[:, 2 + window :], rtol=0, atol=1e-12)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("only_last", [1, 4, 9])
def test_block_only_last_matches_the_full_blocks_last_rows(causal, only_last):
    """The trimmed last block (Agg's newer half, Inf's chunk): outputs and every gradient as the full block's."""
    torch.manual_seed(0)
    block = Block(16, 2, 4.0, 1e-6).double()
    x = torch.randn(3, 9, 16, dtype=torch.float64, requires_grad=True)
    rope = rotary(torch.arange(9), 8, 10000.0, torch.float64)
    weight = torch.randn(3, only_last, 16, dtype=torch.float64)

    full = block(x, rope, causal=causal)[:, 9 - only_last :]
    full_grads = torch.autograd.grad((full * weight).sum(), [x, *block.parameters()])
    trimmed = block(x, rope, causal=causal, only_last=only_last)
    trimmed_grads = torch.autograd.grad((trimmed * weight).sum(), [x, *block.parameters()])

    assert trimmed.shape == full.shape
    torch.testing.assert_close(trimmed, full, rtol=1e-12, atol=1e-12)
    for a, b in zip(trimmed_grads, full_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("only_last", [0, 10])
def test_block_only_last_out_of_range_is_refused(only_last):
    block = Block(16, 2, 4.0, 1e-6)
    with pytest.raises(ValueError, match="only_last must be in 1..9"):
        block(torch.randn(1, 9, 16), rotary(torch.arange(9), 8, 10000.0, torch.float32), causal=True, only_last=only_last)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (bf16 attention backends)")
@pytest.mark.parametrize("causal", [True, False])
def test_block_only_last_on_gpu_bf16_is_as_accurate_as_the_full_block(causal):
    """On the GPU the trimmed block takes other attention kernels (fewer queries than keys): measured against
    a float32 run of the same block, its bf16 error must be that of the full block's, within a factor 1.5."""
    torch.manual_seed(0)
    block = Block(512, 8, 4.0, 1e-6).cuda()
    x = torch.randn(64, 128, 512, device="cuda")
    rope = rotary(torch.arange(128, device="cuda"), 64, 10000.0, torch.float32)
    exact = block(x, rope, causal=causal)[:, 64:]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        full = block(x, rope, causal=causal)[:, 64:].float()
        trimmed = block(x, rope, causal=causal, only_last=64).float()
    full_error = (full - exact).abs().max().item()
    assert full_error > 0
    assert (trimmed - exact).abs().max().item() <= 1.5 * full_error
