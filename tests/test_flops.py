"""The training FLOP count against hand-computed values on small configs."""

from __future__ import annotations

import pytest

from psm_train.models import MODEL_CONFIGS, build_model
from psm_train.models.base import padded_vocab
from psm_train.train.flops import agg_calls, mfu, peak_flops, train_flops_per_token

VOCAB = 100  # padded to a multiple of 128 by the models


def counted_n(model) -> int:
    """N from a real model: unique parameters without the input embedding, the head counted even when tied."""
    unique = {id(p): p for p in model.parameters()}.values()
    n = sum(p.numel() for p in unique) - model.embed.weight.numel()
    return n + (model.head.weight.numel() if model.head.weight is model.embed.weight else 0)


@pytest.mark.parametrize("tied", [True, False])
def test_transformer_is_6n_plus_causal_attention(tied):
    cfg = MODEL_CONFIGS["transformer"](d_model=32, n_layers=3, n_heads=4, tie_embeddings=tied)
    n = counted_n(build_model("transformer", cfg, VOCAB))
    # By hand: 3 blocks of norms 2 x 32, qkv 3 x 32^2, out 32^2, SwiGLU 3 x 32 x 88; final norm 32; head 128 x 32.
    assert n == 3 * (2 * 32 + 4 * 32 * 32 + 3 * 32 * 88) + 32 + 128 * 32
    assert train_flops_per_token("transformer", cfg, VOCAB, 256) == 6 * n + 6 * 3 * 32 * 256


def test_sliding_window_counts_the_keys_in_the_window():
    cfg = MODEL_CONFIGS["transformer"](d_model=32, n_layers=2, n_heads=4, sliding_window=64)
    n = counted_n(build_model("transformer", cfg, VOCAB))
    # Query t sees min(t + 1, 64) keys: on average about 64 - 64^2 / (2 x 256) over 256 tokens.
    avg_keys = 64 - 64 * 64 / (2 * 256)
    assert train_flops_per_token("transformer", cfg, VOCAB, 256) == pytest.approx(6 * n + 3 * 2 * 4 * 32 * avg_keys)


def test_tree_agg_calls():
    # n = 4: upsweep 2 + 1, downsweep: the right child of the top level has the identity prefix (no call), the
    # lower level's second right child one call. n = 8: upsweep 4 + 2 + 1, downsweep 0 + 1 + 3.
    assert [agg_calls(n) for n in (1, 2, 4, 8)] == [0, 1, 4, 11]


def test_transformer_psm_over_the_transformer_by_hand():
    """d 16, 2 heads, SwiGLU hidden 40, chunk 4, Agg 1 block, Inf 2 blocks, T 16 (4 chunks), vocab padded to 128."""
    psm = MODEL_CONFIGS["transformer_psm"](d_model=16, n_heads=2, chunk_size=4, agg_layers=1, inf_layers=2)
    tf = MODEL_CONFIGS["transformer"](d_model=16, n_layers=2, n_heads=2)
    assert padded_vocab(VOCAB) == 128
    window_part = 16 + 2 * 16 * 16  # per position of the window: attention norm, keys, values
    kept_part = 16 * 16 + 16 * 16 + 16 + 3 * 16 * 40  # per kept position: queries, out, MLP norm, MLP
    full = 2 * (window_part + kept_part)  # a block computing every position of its window
    pair = 4 * 16  # score and value FLOPs of one query-key pair
    inf_call = (full * 8 + pair * 8 * 8 / 2) + (2 * (window_part * 8 + kept_part * 4) + pair * 4 * 6)
    chunk0 = 2 * (full * 4 + pair * 4 * 4 / 2)
    agg_call = 2 * (window_part * 8 + kept_part * 4) + pair * 4 * 8
    head = 2 * (16 + 128 * 16) * 16
    psm_forward = chunk0 + 3 * inf_call + 4 * agg_call + head
    tf_forward = 2 * (full * 16 + pair * 16 * 16 / 2) + head
    assert train_flops_per_token("transformer_psm", psm, VOCAB, 16) == pytest.approx(3 * psm_forward / 16)
    ratio = train_flops_per_token("transformer_psm", psm, VOCAB, 16) / train_flops_per_token("transformer", tf, VOCAB, 16)
    assert ratio == pytest.approx(psm_forward / tf_forward) and ratio > 1


def test_gla_adds_the_chunked_scan_to_6n():
    cfg = MODEL_CONFIGS["gla"](d_model=32, n_layers=2, n_heads=2, chunk_size=8, gate_low_rank_dim=4)
    n = counted_n(build_model("gla", cfg, VOCAB))
    k, v = 32 * 0.5 / 2, 32 / 2  # per-head key and value widths
    scan = 3 * 2 * 2 * (8 * (k + v) + 4 * k * v)  # 3 x layers x heads x (causal chunk scores + state and read)
    assert train_flops_per_token("gla", cfg, VOCAB, 64) == 6 * n + scan


def test_mfu_and_peak():
    assert peak_flops("NVIDIA H100 80GB HBM3") == peak_flops("NVIDIA H200") == 989e12
    assert peak_flops("NVIDIA A10G") is None
    assert mfu(200_000, 1e9, 1e15) == pytest.approx(0.2)
