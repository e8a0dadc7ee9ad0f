"""The training loop, one process per rank: batch, forward and backward, step, log, eval, checkpoint.

A single process, torchrun and srun run the same code: ranks form dp x sp (see
psm_train.distributed.layout); every rank of an SP group reads the same rows of the global batch
and keeps its slice of the sequence. The run resumes on its own from the newest complete sharded
checkpoint in the run directory, also at another world size, SP degree or ZeRO stage.
"""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from psm_train.config import RunConfig
from psm_train.data import build_source
from psm_train.distributed.env import DistEnv, init_distributed
from psm_train.distributed.layout import ParallelLayout
from psm_train.models import build_model
from psm_train.parallelize import parallelize
from psm_train.train.evaluate import evaluate
from psm_train.train.flops import peak_flops, train_flops_per_token
from psm_train.train.metrics import MetricsLogger, Throughput, start_wandb
from psm_train.train.optim import lr_at
from psm_train.train.preemption import should_stop
from psm_train.train.progress import Progress
from psm_train.train.run_dir import RunDir
from psm_train.train.state import code_version, describe_resume, load_state, save_state, seed_dropout
from psm_train.train.step import all_sum, forward_backward


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("train.device=cuda but no CUDA device is available (use train.device=cpu or auto)")
        return torch.device("cuda", local_rank)
    return torch.device(name)


def autocast_for(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on GPU under 'auto' or 'bf16'; fp32 on CPU unless bf16 is asked for."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


SUMMARY_METRICS = ("loss", "ppl", "acc", "group_acc")


def eval_summary(results: dict[int, dict]) -> dict[str, float]:
    """Flat metrics for metrics.jsonl: eval/len{L}/{loss, ppl, acc, group_acc, acc_d*} where the task has them."""
    return {f"eval/len{seq_len}/{key}": value for seq_len, r in results.items() for key, value in r.items()
            if key in SUMMARY_METRICS or key.startswith("acc_d")}


def eval_line(results: dict[int, dict]) -> str:
    return " ".join(f"@{n}: loss {r['loss']:.4f} acc {r['acc']:.3f}" for n, r in results.items())


def check_batch_split(batch_size: int, dp: int, grad_accum: int) -> None:
    if batch_size % (dp * grad_accum):
        raise SystemExit(f"train.batch_size = {batch_size} must be divisible by data-parallel ranks x parallel.grad_accum "
                         f"= {dp} x {grad_accum}; the global batch is split evenly across them")


@dataclass
class Process:
    """Where this rank runs: its device, the launcher's environment and its place in dp x sp."""

    device: torch.device
    env: DistEnv
    layout: ParallelLayout

    @property
    def main(self) -> bool:
        return self.env.rank == 0


def start_process(cfg: RunConfig) -> Process:
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    denv = init_distributed(resolve_device(cfg.train.device).type)
    layout = ParallelLayout(denv.rank, denv.world_size, cfg.parallel.sp)
    check_batch_split(cfg.train.batch_size, layout.dp, cfg.parallel.grad_accum)
    return Process(resolve_device(cfg.train.device, denv.local_rank), denv, layout)


class NonFiniteWatch:
    """The first step whose loss or gradient norm was not finite, tracked on the device (no sync per
    step) and read where the host syncs anyway: at logged steps and before every checkpoint."""

    def __init__(self, device: torch.device):
        self.first = torch.full((), -1, dtype=torch.long, device=device)

    def update(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        bad = ~(torch.isfinite(loss) & torch.isfinite(grad_norm.to(loss.device)))
        self.first = torch.where(bad & (self.first < 0), step, self.first)

    def check(self) -> None:
        """Raise FloatingPointError naming the first non-finite step of any rank (collective)."""
        none = torch.iinfo(torch.long).max
        first = torch.where(self.first < 0, none, self.first)
        if dist.is_initialized():
            dist.all_reduce(first, op=dist.ReduceOp.MIN)
        if int(first.item()) != none:
            raise FloatingPointError(f"step {int(first.item())}: the loss or the gradient norm is not finite; no "
                                     "checkpoint was saved after it (lower train.lr, check the data, or set train.grad_clip)")


def train(cfg: RunConfig) -> dict[str, Any]:
    """Train as configured, resuming from the run directory's newest checkpoint if it has one.

    Returns the final evaluation metrics, or {"preempted": True, "step": n} when a preemption
    signal stopped the run after a checkpoint at step n.
    """
    owns_group = not dist.is_initialized()  # else the caller made the process group and tears it down
    result = _train(cfg)
    # Left to interpreter exit, gloo's teardown can abort a rank whose peers are already gone
    # ("terminate called without an active exception"). After an error torchrun stops the ranks.
    if owns_group and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return result


def _train(cfg: RunConfig) -> dict[str, Any]:
    t, par = cfg.train, cfg.parallel
    proc = start_process(cfg)
    device, layout = proc.device, proc.layout
    with RunDir(cfg, proc) as run:
        seed_everything(t.seed)
        source = build_source(cfg.data.name, cfg.data.config, t.seed)
        model = build_model(cfg.model.name, cfg.model.config, source.vocab_size).to(device)
        run.check_resume_config(source.vocab_size)
        counts = parameter_counts(model)
        autocast = autocast_for(t.precision, device)
        bf16_engine = par.engine == "deepspeed" and device.type == "cuda" and t.precision != "fp32"
        if bf16_engine:
            autocast = contextlib.nullcontext()  # DeepSpeed holds bf16 weights with fp32 masters itself
        micro_rows = t.batch_size // (layout.dp * par.grad_accum)
        engine, sharding = parallelize(model, t, par, layout.sequence_parallel(), micro_rows, device, bf16_engine)
        start, tokens = 0, 0
        if run.checkpoint is not None:
            start, tokens = load_state(run.checkpoint, engine, source, cfg, layout, device)
        if run.checkpoint is None or run.checkpoint.world_size != layout.world_size:
            seed_dropout(t.seed, layout.rank, start)
        eval_sets = source.eval_sets(t.eval_batches, t.eval_batch_size)
        logger = MetricsLogger(run.path, start_wandb(cfg, run.path)) if proc.main else None
        show = logger.show if logger is not None else (lambda text, final=False: None)
        show(run.describe(cfg, counts["n_params"], par, device, layout), final=True)
        if run.checkpoint is not None:
            show(describe_resume(run.checkpoint, start), final=True)

        batches = source.train_batches(start, t.batch_size, layout.dp_rank, layout.dp)
        version, throughput, watch = code_version(), Throughput(), NonFiniteWatch(device)
        progress = None
        final_eval: dict[int, dict] = {}
        last_loss = float("nan")
        for step in range(start, t.steps):
            inputs, targets = (x.to(device) for x in next(batches))
            seq_len = inputs.shape[1]
            if progress is None:
                flops = train_flops_per_token(cfg.model.name, cfg.model.config, source.vocab_size, seq_len)
                peak = peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
                progress = Progress(start, t.steps, device, flops, peak)
            split = sharding.splits(seq_len)
            if sharding.sp is not None and not split:
                try:
                    sharding.check(seq_len)
                except ValueError as e:
                    raise SystemExit(f"parallel.sp = {par.sp}: {e}") from None
            positions = sharding.positions(seq_len).to(device) if split else None
            lr = lr_at(step, t)
            local_inputs = sharding.shard(inputs)
            step_loss = forward_backward(engine, local_inputs, sharding.shard(targets), grad_accum=par.grad_accum,
                                         autocast=autocast, sparse_targets=source.sparse_targets, positions=positions)
            grad_norm = engine.step(lr)
            watch.update(step + 1, step_loss, grad_norm)
            throughput.add(local_inputs.numel())
            tokens += t.batch_size * seq_len
            run.store.check()

            done = step + 1
            record = None
            if done % t.log_every == 0 or done == t.steps or done == start + 1:
                watch.check()
                last_loss = all_sum(step_loss.clone()).item()
                rate = throughput.rate() * layout.world_size  # every rank holds its share of the global batch
                record = {"step": done, "loss": last_loss, "lr": lr, "grad_norm": float(grad_norm), "tokens": tokens,
                          "tokens_per_s": rate, "elapsed_s": progress.elapsed(), **progress.measures(rate / layout.world_size)}
                if hasattr(source, "metrics"):
                    record.update(source.metrics())
            evaluated = (t.eval_every and done % t.eval_every == 0) or done == t.steps
            if evaluated:
                final_eval = evaluate(engine.module, eval_sets, device, autocast, layout, sharding, source.class_groups,
                                      recall_distance=source.recall_distance)
                record = {**(record or {"step": done}), **eval_summary(final_eval)}
                throughput.rate()  # evaluation time is not training throughput
            stop = record is not None and done < t.steps and should_stop()
            if (cfg.checkpoint.every and done % cfg.checkpoint.every == 0 and done < t.steps) or stop:
                watch.check()
                blocked = save_state(run.store, done, engine, source, cfg, layout, device, tokens, version)
                record = {**(record or {"step": done}), "checkpoint/blocked_s": blocked}
            if record is not None and logger is not None:
                logger.log(record)
                if "loss" in record:
                    show(progress.line(done, record) + (" " + eval_line(final_eval) if evaluated else ""), final=evaluated)
            if stop:
                run.store.close()
                show(f"stopping at step {done} on a preemption signal; checkpoint in {run.store.root}", final=True)
                if logger is not None:
                    logger.close()
                return {"preempted": True, "step": done}

        run.store.close()
        weights = engine.full_state_dict()
        if proc.main:
            flops = {"flops_per_token": progress.flops_per_token} if progress and progress.flops_per_token else {}
            run.finish(weights, final_eval, {**counts, "tokens": tokens, **flops, "train_loss": last_loss,
                                             "eval": eval_summary(final_eval)}, source.vocab_size, version)
            show(f"done in {progress.elapsed() if progress else 0:.0f}s; checkpoint {run.path / 'final.pt'}", final=True)
            logger.close()
        return eval_summary(final_eval)


def parameter_counts(model: torch.nn.Module) -> dict[str, int]:
    """Parameters (tied ones once) and those outside the embedding, counted before ZeRO-3 partitions them."""
    n_params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    n_embedding = sum(p.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters())
    return {"n_params": n_params, "n_params_non_embedding": n_params - n_embedding}

