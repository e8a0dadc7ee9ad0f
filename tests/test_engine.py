"""The engines on CPU: the torch engine's bucketed, overlapped gradient sum against one process and against the
after-backward all-reduce (gloo, float64), and DeepSpeed at world size 1 without a launcher."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from psm_train.config import ConfigError, ParallelConfig, TrainConfig, build_dataclass
from psm_train.distributed.env import init_single_rank_group
from psm_train.train.engine import DeepSpeedEngine, TorchEngine
from tests.multiprocess import run_ranks

VOCAB, DIM = 16, 8


class TiedToy(nn.Module):
    """Tied embedding and head, two linear layers, an ``extra`` layer used only when asked, and ``never``,
    a parameter no forward uses."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.inner = nn.Linear(DIM, 4 * DIM)
        self.outer = nn.Linear(4 * DIM, DIM)
        self.extra = nn.Linear(DIM, DIM, bias=False)
        self.never = nn.Parameter(torch.randn(3))
        self.head = nn.Linear(DIM, VOCAB, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor, use_extra: bool = False) -> torch.Tensor:
        x = self.embed(tokens)
        x = x + self.outer(torch.tanh(self.inner(x)))
        if use_extra:
            x = x + self.extra(x)
        return self.head(x)


def toy_model() -> TiedToy:
    torch.manual_seed(0)
    return TiedToy().double()


def batch(rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, VOCAB, (rows, 6), generator=g), torch.randint(0, VOCAB, (rows, 6), generator=g)


def summed_loss(forward, tokens: torch.Tensor, targets: torch.Tensor, use_extra: bool) -> torch.Tensor:
    logits = forward(tokens, use_extra=use_extra)
    return nn.functional.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1), reduction="sum")


# rank 0's second micro-batch alone uses ``extra``: the ranks disagree on which parameters get a gradient.
def uses_extra(rank: int, micro: int) -> bool:
    return rank == 0 and micro == 1


WORLD, ACCUM, ROWS = 2, 2, 8  # 8 rows: 4 per rank, 2 per micro-batch


def reference_gradients() -> dict[str, torch.Tensor]:
    """One process, the whole global batch: each rank's micro-batches in turn, the loss over all tokens."""
    model = toy_model()
    tokens, targets = batch(ROWS)
    per_rank = ROWS // WORLD
    loss = 0
    for rank in range(WORLD):
        rows = slice(rank * per_rank, (rank + 1) * per_rank)
        for micro, (x, y) in enumerate(zip(tokens[rows].chunk(ACCUM), targets[rows].chunk(ACCUM))):
            loss = loss + summed_loss(model, x, y, uses_extra(rank, micro))
    (loss / targets.numel()).backward()
    return {n: (p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}


def engine_gradients(rank: int, grad_reduce: str) -> tuple[TorchEngine, dict[str, torch.Tensor]]:
    model = toy_model()
    par = ParallelConfig(grad_reduce=grad_reduce, bucket_mb=200 / 2**20)  # 200-byte buckets: several of them
    engine = TorchEngine(model, TrainConfig(lr=1e-2, warmup_steps=0), par)
    tokens, targets = batch(ROWS)
    per_rank = ROWS // WORLD
    rows = slice(rank * per_rank, (rank + 1) * per_rank)
    for micro, (x, y) in enumerate(zip(tokens[rows].chunk(ACCUM), targets[rows].chunk(ACCUM))):
        loss = summed_loss(model, x, y, uses_extra(rank, micro)) / targets.numel()
        engine.backward(loss, sync=micro == ACCUM - 1)
    engine.reduce_gradients()
    return engine, {n: p.grad.clone() for n, p in model.named_parameters()}


def _check_reduction(rank: int, world: int) -> None:
    reference = reference_gradients()
    overlapped, grads = engine_gradients(rank, "overlapped")
    assert overlapped.buckets is not None and len(overlapped.buckets.buckets) > 2
    after, after_grads = engine_gradients(rank, "after_backward")
    assert set(grads) == set(reference) == {"embed.weight", "inner.weight", "inner.bias", "outer.weight",
                                             "outer.bias", "extra.weight", "never"}
    for name in reference:
        torch.testing.assert_close(grads[name], reference[name], rtol=1e-12, atol=1e-14, msg=name)
        assert torch.equal(grads[name], after_grads[name]), name
    assert torch.count_nonzero(grads["extra.weight"]) > 0 and torch.count_nonzero(grads["never"]) == 0
    # The step after it: the same norm and parameters from both paths, and the buckets zeroed for the next step.
    norm_a, norm_b = overlapped.step(1e-2), after.step(1e-2)
    assert torch.equal(norm_a, norm_b)
    for (name, p), q in zip(overlapped.module.named_parameters(), after.module.parameters()):
        assert torch.equal(p, q), name
    assert all(torch.count_nonzero(flat) == 0 for flat in overlapped.buckets.buffers)


def test_overlapped_reduction_equals_one_process_and_after_backward():
    run_ranks(_check_reduction, WORLD)


def _check_sync_misuse(rank: int, world: int) -> None:
    model = toy_model()
    engine = TorchEngine(model, TrainConfig(), ParallelConfig())
    tokens, targets = batch(4)
    engine.backward(summed_loss(model, tokens, targets, False), sync=True)
    with pytest.raises(RuntimeError, match="sync=False for every micro-batch but the last"):
        engine.backward(summed_loss(model, tokens, targets, False), sync=True)
    engine.reduce_gradients()
    engine = TorchEngine(toy_model(), TrainConfig(), ParallelConfig())
    engine.backward(summed_loss(engine.forward, tokens, targets, False), sync=False)
    with pytest.raises(RuntimeError, match="needs sync=True"):
        engine.step(1e-3)
    engine = TorchEngine(toy_model(), TrainConfig(), ParallelConfig())
    engine.module.inner.weight.grad = None  # as zero_grad(set_to_none=True) would: autograd then allocates anew
    engine.backward(summed_loss(engine.forward, tokens, targets, False), sync=True)
    with pytest.raises(RuntimeError, match="was replaced during the step"):
        engine.step(1e-3)


def test_misuse_is_refused():
    run_ranks(_check_sync_misuse, WORLD)


def test_single_process_gives_unused_parameters_zero_gradients():
    model = toy_model()
    engine = TorchEngine(model, TrainConfig(), ParallelConfig())
    tokens, targets = batch(4)
    engine.backward(summed_loss(model, tokens, targets, False))
    engine.reduce_gradients()
    assert engine.buckets is None
    assert torch.count_nonzero(model.never.grad) == 0 and torch.count_nonzero(model.extra.weight.grad) == 0


@pytest.mark.parametrize("fields, message", [
    ({"offload_optimizer": True}, "offload_optimizer: needs engine: deepspeed and zero_stage 1, 2 or 3"),
    ({"offload_optimizer": True, "engine": "deepspeed"}, "got engine: deepspeed, zero_stage: 0"),
    ({"grad_reduce": "ddp"}, "grad_reduce: expected overlapped or after_backward"),
    ({"bucket_mb": 0}, "bucket_mb: expected a positive number"),
])
def test_parallel_config_rejects(fields, message):
    with pytest.raises(ConfigError, match=message):
        build_dataclass(ParallelConfig, fields, "parallel")
    build_dataclass(ParallelConfig, {"offload_optimizer": True, "engine": "deepspeed", "zero_stage": 2}, "parallel")


def _deepspeed_world_one(zero_stage: int, offload: bool) -> None:
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(key, None)
    os.environ["DS_ACCELERATOR"] = "cpu"
    assert not dist.is_initialized()
    cfg = TrainConfig(lr=1e-2, warmup_steps=0)
    tokens, targets = batch(4)
    reference = TorchEngine(toy_model().float(), cfg)
    init_single_rank_group("cpu")
    par = ParallelConfig(engine="deepspeed", zero_stage=zero_stage, zero3_persistence_threshold=0,
                         offload_optimizer=offload)
    engine = DeepSpeedEngine(toy_model().float(), cfg, par, micro_batch=4, bf16=False)
    assert dist.get_world_size() == 1
    assert type(engine._base_optimizer()).__name__ == ("DeepSpeedCPUAdam" if offload else "AdamW")
    for _ in range(2):
        for e in (engine, reference):
            e.backward(summed_loss(e.forward, tokens, targets, False) / targets.numel())
        torch.testing.assert_close(engine.step(1e-2), reference.step(1e-2), rtol=1e-5, atol=0)
    state = engine.canonical_shard()
    assert state["optimizer_step"] == 2
    for name, p in reference.module.named_parameters():
        torch.testing.assert_close(state["params"][name], p.detach(), rtol=1e-5, atol=1e-6, msg=name)
        for k in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(state[k][name], reference.optimizer.state[p][k], rtol=1e-5, atol=1e-8, msg=name)
    engine.load_canonical(state)
    dist.destroy_process_group()


@pytest.mark.parametrize("zero_stage, offload", [(2, False), (3, False), (2, True)], ids=["zero2", "zero3", "zero2-offload"])
def test_deepspeed_at_world_size_one_steps_like_the_torch_engine(zero_stage, offload, capfd):
    """No launcher, no process group: the engine makes a one-rank group, and two steps match the torch engine
    (parameters and AdamW moments). With offload, DeepSpeed's CPUAdam steps: its C++ extension is compiled on
    first use (minutes on 2 cores; cached in TORCH_EXTENSIONS_DIR).

    A fresh process each: DeepSpeed keeps the first process group it saw for the life of the process."""
    pytest.importorskip("deepspeed")
    process = mp.get_context("spawn").Process(target=_deepspeed_world_one, args=(zero_stage, offload))
    process.start()
    process.join(timeout=900)
    out, err = capfd.readouterr()
    assert process.exitcode == 0, err[-3000:]
    assert "DeepSpeed may compile its C++/CUDA extensions on first use" in out
