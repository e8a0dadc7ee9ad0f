"""tools/cost_model.py: message sizes against hand-computed values and against what the real sequence-parallel
exchanges gather (2 gloo ranks), collective times, and a run of the script."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from psm_train.distributed.layout import ParallelLayout
from psm_train.models import MODEL_CONFIGS, build_model
from psm_train.parallelize import apply_sequence_parallel
from psm_train.train.flops import meta_model
from tests.multiprocess import run_ranks

ROOT = Path(__file__).parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import cost_model  # noqa: E402  (a script, not a package)

SMALL = {
    "gla": dict(d_model=32, n_layers=2, n_heads=2, chunk_size=4, gate_low_rank_dim=4),  # K 8, V 16 per head
    "mamba2": dict(d_model=16, n_layers=2, chunk_size=4, head_dim=8, d_state=8),  # 4 heads, K 8, V 8, conv width 4
    "transformer_psm": dict(d_model=16, n_heads=2, chunk_size=4, agg_layers=1, inf_layers=2),
    "transformer": dict(d_model=32, n_layers=3, n_heads=2),
}
VOCAB = 50


def small(name: str):
    return meta_model(name, MODEL_CONFIGS[name](**SMALL[name]), VOCAB)


def test_gradient_and_zero_traffic_by_hand():
    (ar,) = cost_model.zero_collectives(0, 1000, 4)
    assert (ar.kind, ar.size, ar.per_rank_bytes) == ("all_reduce", 4000, 6000)  # fp32 gradients, 2 (n-1)/n
    zero2 = cost_model.zero_collectives(2, 1000, 4)
    assert [(c.kind, c.size, c.per_rank_bytes) for c in zero2] == [("reduce_scatter", 2000, 1500),
                                                                   ("all_gather", 2000, 1500)]
    assert cost_model.zero_collectives(1, 1000, 4) == zero2
    zero3 = cost_model.zero_collectives(3, 1000, 4)
    assert sum(c.per_rank_bytes for c in zero3) == 4500 and [c.kind for c in zero3].count("all_gather") == 2


def test_sequence_parallel_messages_by_hand():
    rows, tokens, sp = 3, 10, 4
    # GLA: per layer the carry [B, H, K, V + 1] of every rank in fp32.
    assert cost_model.sp_messages(small("gla"), rows, tokens, sp) == [4 * 4 * 3 * 2 * 8 * 17] * 2
    # Mamba2: the carry [B, 4, 8, 9] and the halo [B, 3, 16], per layer.
    assert cost_model.sp_messages(small("mamba2"), rows, tokens, sp) == [4 * 4 * 3 * 4 * 8 * 9, 4 * 4 * 3 * 3 * 16] * 2
    # Transformer-PSM: the subtree roots [B, c, d], once per forward.
    assert cost_model.sp_messages(small("transformer_psm"), rows, tokens, sp) == [4 * 4 * 3 * 4 * 16]
    # Transformer: K and V [B, T_local, d] in bf16, per layer.
    assert cost_model.sp_messages(small("transformer"), rows, tokens, sp) == [4 * 2 * 2 * 3 * 10 * 32] * 3
    assert cost_model.sp_messages(small("gla"), rows, tokens, 1) == []
    collectives = cost_model.sp_collectives(small("transformer_psm"), rows, tokens, sp)
    assert [(c.kind, c.per_rank_bytes) for c in collectives] == [("all_gather", 768 * 3 / 4 * 4),
                                                               ("reduce_scatter", 768 * 3 / 4 * 4)]


def _gathered_bytes(rank: int, world: int, results) -> None:
    """Bytes of every all-gather of one fp32 forward under sp = world (no autocast: K/V in fp32 too)."""
    sp = ParallelLayout(rank, world, sp=world).sequence_parallel()
    original = dist.all_gather
    sizes: list[int] = []

    def recording(parts, x, *args, **kwargs):
        sizes.append(sum(p.numel() * p.element_size() for p in parts))
        return original(parts, x, *args, **kwargs)

    for name in SMALL:
        torch.manual_seed(0)
        model = build_model(name, MODEL_CONFIGS[name](**SMALL[name]), VOCAB)
        sharding = apply_sequence_parallel(model, sp)
        tokens = sharding.shard(torch.randint(0, VOCAB, (3, 32)))
        sizes.clear()
        dist.all_gather = recording
        try:
            model(tokens, positions=sharding.positions(32))
        finally:
            dist.all_gather = original
        if rank == 0:
            results[name] = list(sizes)


def test_message_sizes_are_what_the_exchanges_gather():
    import torch.multiprocessing as mp

    results = mp.get_context("spawn").Manager().dict()
    run_ranks(_gathered_bytes, 2, results)
    for name in SMALL:
        expected = cost_model.sp_messages(small(name), rows=3, tokens_per_rank=16, sp=2, act_bytes=4, kv_bytes=4)
        assert sorted(results[name]) == sorted(expected), name


def test_collective_time_and_placement():
    net = cost_model.Network(inter_node_busbw=200e9, latency_s=10e-6)
    c = cost_model.Collective("all_reduce", 10**9, 8)
    assert net.seconds(c) == pytest.approx(2 * 7 / 8 * 1e9 / 361e9 + 3 * 10e-6)
    assert net.busbw(2) == 329e9 and net.busbw(3) == 355e9 and net.busbw(16) == 200e9
    assert net.seconds(cost_model.Collective("all_gather", 10**9, 1)) == 0


def test_script_predicts_weak_scaling(tmp_path):
    out = tmp_path / "cost.json"
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "cost_model.py"), "--config",
                           str(ROOT / "configs" / "lm_psm_170m.yaml"), "--seq-len", "512", "--batch-size", "64",
                           "--tokens-per-s", "150000", "--act-bytes-per-token", "400000", "--gpus", "8", "64",
                           "--sp", "1", "8", "--zero", "0", "3", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 2 * 2 * 2
    for r in rows:
        assert 0 < r["efficiency"] <= 1 and r["step_s"] >= r["compute_s"]
        assert r["dp"] * r["sp"] == r["gpus"] and r["seq_len"] == 512 * r["sp"]
        if r["sp"] == 1:  # one GPU's work at one GPU's speed
            assert r["compute_s"] == pytest.approx(64 * 512 / 150000) and r["sp_comm_s"] == 0
    at = {(r["gpus"], r["sp"], r["zero_stage"]): r for r in rows}
    assert at[64, 1, 0]["dp_comm_s"] > at[8, 1, 0]["dp_comm_s"]  # across nodes: the slower network
    assert at[8, 1, 3]["memory_gib"] < at[8, 1, 0]["memory_gib"]
    assert "Longest trainable sequence" in done.stdout and math.isfinite(rows[0]["memory_gib"])


def test_bench_rows_give_throughput_and_activation_memory(tmp_path):
    row = {"name": "transformer", "status": "ok", "config": "configs/lm_transformer_170m.yaml", "overrides": [],
           "seq_len": 512, "batch_size": 64, "tokens_per_step": 64 * 512, "vocab_size": 50257,
           "tokens_per_s": 200000.0, "peak_mem_gib": 30.0}
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"rows": [row, {**row, "name": "crashed", "status": "oom", "tokens_per_s": None}]}))
    (m,) = cost_model.from_bench(str(bench))
    n_params = sum(p.numel() for p in {id(p): p for p in meta_model(m.model_name, m.model_cfg, 50257).parameters()}.values())
    assert m.act_bytes_per_token == pytest.approx((30 * 2**30 - 16 * n_params) / (64 * 512))
    assert (m.rows, m.seq_len, m.tokens_per_s) == (64, 512, 200000.0)
    # One GPU, batch 1: static 16 P, then activations per token (the transformer's gathered K/V need sp > 1).
    gpu = 80 * 2**30
    assert cost_model.longest_sequence(m, 1, 0, gpu) == int((gpu - 16 * n_params) / m.act_bytes_per_token)
