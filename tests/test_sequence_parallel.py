"""Sequence parallelism on CPU with gloo: logits and every gradient equal the single-process run.

The same model object runs whole and split: `apply_sequence_parallel` (the parallelize step) is the
only thing that makes it sequence-parallel, and `whole_sequences` switches it back.
"""

from __future__ import annotations

import re
from collections import Counter

import pytest
import torch
import torch.distributed as dist

from psm_train.distributed.layout import ParallelLayout
from psm_train.distributed.sequence import SequenceParallel, shard_sequence, slice_positions, unshard_sequence
from psm_train.parallelize import apply_sequence_parallel
from psm_train.models import build_model
from psm_train.models.gla import GLAConfig
from psm_train.models.linear_attention import LinearAttentionConfig
from psm_train.models.mamba2 import Mamba2Config
from psm_train.models.retnet import RetNetConfig
from psm_train.models.transformer import TransformerConfig
from psm_train.models.transformer_psm import TransformerPSMConfig
from tests.multiprocess import run_ranks

VOCAB = 37
# seq_len 64 gives every rank several chunks at sp = 2 and 4 (chunk 4 for the PSM: 4 or 8 chunks per rank).
MODELS = {
    "transformer_psm": TransformerPSMConfig(d_model=16, n_heads=2, chunk_size=4, agg_layers=1, inf_layers=2, tie_embeddings=False),
    "gla": GLAConfig(d_model=16, n_layers=2, n_heads=2, chunk_size=4, gate_low_rank_dim=4),
    "mamba2": Mamba2Config(d_model=16, n_layers=2, chunk_size=4, head_dim=8, d_state=8),
    "transformer": TransformerConfig(d_model=16, n_layers=2, n_heads=2),
    "retnet": RetNetConfig(d_model=16, n_layers=1, n_heads=2, chunk_size=4),
    "linear_attention": LinearAttentionConfig(d_model=16, n_layers=1, n_heads=2, chunk_size=4),
}
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _check_equal_to_single_process(rank: int, world: int, seq_len: int) -> None:
    sp = ParallelLayout(rank, world, sp=world).sequence_parallel()
    for name, cfg in MODELS.items():
        for dtype in (torch.float64, torch.float32):
            torch.manual_seed(0)
            model = build_model(name, cfg, VOCAB).to(dtype)
            tokens = torch.randint(0, VOCAB, (2, seq_len), generator=torch.Generator().manual_seed(1))
            probe = torch.randn(2, seq_len, VOCAB, generator=torch.Generator().manual_seed(2), dtype=dtype)
            sharding = apply_sequence_parallel(model, sp)
            layout = sharding.layout
            sharding.check(seq_len)

            model.zero_grad()
            with sharding.whole_sequences():
                full = model(tokens)
            (full * probe).sum().backward()
            # A parameter no output depends on (Agg when no chunk has a real prefix) has no gradient: zero.
            grads = {n: torch.zeros_like(p) if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}

            model.zero_grad()
            local = model(sharding.shard(tokens), positions=sharding.positions(seq_len))
            (local * sharding.shard(probe)).sum().backward()
            slices = [torch.empty_like(local) for _ in range(world)]
            dist.all_gather(slices, local.detach().contiguous())
            tol = TOLERANCE[dtype]
            err = rel_err(unshard_sequence(slices, layout), full.detach())
            assert err <= tol, f"{name} {dtype} sp={world}: logits differ, rel err {err:.2e}"
            for n, p in model.named_parameters():
                g = torch.zeros_like(p) if p.grad is None else p.grad.clone()
                dist.all_reduce(g)  # each rank holds the gradient of its own tokens' loss
                err = rel_err(g, grads[n])
                assert err <= tol, f"{name} {dtype} sp={world}: grad of {n} differs, rel err {err:.2e}"


@pytest.mark.parametrize("world, seq_len", [(2, 64), (4, 64), (2, 8)], ids=["sp2", "sp4", "sp2-one-chunk-a-rank"])
def test_logits_and_gradients_match_single_process(world, seq_len):
    """seq_len 8 at sp 2: Transformer-PSM holds one chunk a rank, and rank 0 uses no prefix at all."""
    run_ranks(_check_equal_to_single_process, world, seq_len)


def _module_calls(rank: int, world: int) -> None:
    sp = ParallelLayout(rank, world, sp=world).sequence_parallel()
    for name, cfg in MODELS.items():
        torch.manual_seed(0)
        model = build_model(name, cfg, VOCAB)
        calls: Counter = Counter()

        def count(module, args, output, qualname):
            calls[qualname, "forward"] += 1
            out = output[0] if isinstance(output, tuple) else output
            if out.requires_grad:  # where ZeRO-3 gathers the parameters again for the backward
                out.register_hook(lambda grad: calls.update([(qualname, "backward")]))

        for qualname, module in model.named_modules():
            if any(True for _ in module.parameters(recurse=False)):
                module.register_forward_hook(lambda m, a, o, q=qualname: count(m, a, o, q))
        sharding = apply_sequence_parallel(model, sp)
        tokens = sharding.shard(torch.randint(0, VOCAB, (2, 64), generator=torch.Generator().manual_seed(1)))
        model(tokens, positions=sharding.positions(64)).sum().backward()
        every = [None] * world
        dist.all_gather_object(every, sorted(calls.items()))
        for r in range(1, world):
            assert every[r] == every[0], f"{name}: rank {r} calls its modules differently from rank 0"
        assert any(key[1] == "backward" for key, _ in every[0])


def test_every_rank_calls_each_module_equally_often():
    """ZeRO-3 gathers a module's parameters collectively at each forward and backward call, so the ranks
    of an SP group must make the same calls (transformer_psm: rank 0 has no prefix, later ranks have one)."""
    run_ranks(_module_calls, 4)


def _count_collectives(rank: int, world: int, counts) -> None:
    sp = ParallelLayout(rank, world, sp=world).sequence_parallel()
    calls: Counter = Counter()
    originals = {op: getattr(dist, op) for op in ("all_gather", "all_reduce", "reduce_scatter", "send", "recv", "broadcast")}

    def counting(op):
        def wrapper(*args, **kwargs):
            calls[op] += 1
            return originals[op](*args, **kwargs)

        return wrapper

    for name in ("gla", "mamba2", "transformer_psm", "transformer"):
        torch.manual_seed(0)
        model = build_model(name, MODELS[name], VOCAB).double()
        sharding = apply_sequence_parallel(model, sp)
        tokens = sharding.shard(torch.randint(0, VOCAB, (1, 64)))
        calls.clear()
        for op in originals:
            setattr(dist, op, counting(op))
        try:
            out = model(tokens, positions=sharding.positions(64))
            forward = dict(calls)
            calls.clear()
            out.sum().backward()
            backward = dict(calls)
        finally:
            for op, fn in originals.items():
                setattr(dist, op, fn)
        if rank == 0:
            counts[name] = (forward, backward)


def test_collectives_per_layer_and_direction(tmp_path):
    import torch.multiprocessing as mp

    manager = mp.get_context("spawn").Manager()
    counts = manager.dict()
    run_ranks(_count_collectives, 2, counts)
    layers = {name: getattr(MODELS[name], "n_layers", 1) for name in MODELS}
    # Affine models: one all-gather of the slice summaries per layer forward, one reduction backward.
    assert counts["gla"] == ({"all_gather": layers["gla"]}, {"all_reduce": layers["gla"]})
    # Mamba2 also exchanges the conv halo (its last W-1 inputs) per layer: a second small message.
    assert counts["mamba2"] == ({"all_gather": 2 * layers["mamba2"]}, {"all_reduce": 2 * layers["mamba2"]})
    # The tree: one all-gather of the P subtree roots for the whole model, one reduction backward.
    assert counts["transformer_psm"] == ({"all_gather": 1}, {"all_reduce": 1})
    # Context-parallel attention: one K/V all-gather per layer.
    assert counts["transformer"] == ({"all_gather": layers["transformer"]}, {"all_reduce": layers["transformer"]})


def test_zigzag_slices_cover_the_sequence_once():
    for size in (1, 2, 3, 4):
        seen = torch.cat([slice_positions(48, r, size, "zigzag") for r in range(size)])
        assert sorted(seen.tolist()) == list(range(48))
    x = torch.arange(24).view(1, 24)
    parts = [shard_sequence(x, SequenceParallel(None, r, 3), "zigzag") for r in range(3)]
    assert torch.equal(unshard_sequence(parts, "zigzag"), x)


@pytest.mark.parametrize(
    "name, seq_len, sp, message",
    [
        ("transformer_psm", 96, 2, "power of two"),  # 96 / (2 * 4) = 12 chunks per rank
        ("transformer_psm", 60, 2, "not divisible by parallel.sp * model.chunk_size"),
        ("gla", 63, 2, "not divisible by parallel.sp"),
        ("transformer", 60, 4, "2 * parallel.sp"),
    ],
)
def test_misconfiguration_is_explained(name, seq_len, sp, message):
    sharding = apply_sequence_parallel(build_model(name, MODELS[name], VOCAB), SequenceParallel(None, 0, sp))
    with pytest.raises(ValueError, match=re.escape(message)):
        sharding.check(seq_len)
    assert not sharding.splits(seq_len)


def test_sp_must_divide_the_world():
    with pytest.raises(ValueError, match="does not divide the world size 6"):
        ParallelLayout(0, 6, sp=4)
