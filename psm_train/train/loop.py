"""The training loop, one process per rank: batch, forward, loss, backward, step, log, eval, checkpoint.

A single process, torchrun and srun run the same code: ranks form dp x sp (see
psm_train.distributed.layout); every rank of an SP group reads the same rows of the global batch
and keeps its slice of the sequence. The run resumes on its own from the newest complete sharded
checkpoint in the run directory, also at another world size, SP degree or ZeRO stage.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml

from psm_train.checkpoint import CheckpointStore, StoredCheckpoint
from psm_train.config import RunConfig
from psm_train.data import build_source
from psm_train.data.synthetic import IGNORE_INDEX
from psm_train.distributed.env import init_distributed
from psm_train.distributed.layout import ParallelLayout
from psm_train.distributed.sequence import shard_sequence
from psm_train.train.preemption import should_stop
from psm_train.models import build_model
from psm_train.models.affine_lm import AffineBlock
from psm_train.models.layers import Block, compile_blocks
from psm_train.train.checkpoint import save_checkpoint
from psm_train.train.engine import build_engine, merge_canonical
from psm_train.train.evaluate import evaluate, write_eval_json
from psm_train.train.metrics import MetricsLogger, Throughput, start_wandb
from psm_train.train.optim import lr_at


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


def eval_summary(results: dict[int, dict]) -> dict[str, float]:
    """Flat metrics for metrics.jsonl: eval/len{L}/loss, /ppl, /acc and, where the task has class groups, /group_acc."""
    out = {}
    for seq_len, r in results.items():
        for key in ("loss", "ppl", "acc", "group_acc"):
            if key in r:
                out[f"eval/len{seq_len}/{key}"] = r[key]
    return out


def code_version() -> str:
    """The git commit of the code that ran (with '+dirty' for local changes), else the package version."""
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=here, capture_output=True, text=True, check=True).stdout
        return rev + ("+dirty" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        from importlib.metadata import version

        return f"psm-train {version('psm-train')}"


def check_batch_split(batch_size: int, dp: int, grad_accum: int) -> None:
    if batch_size % (dp * grad_accum):
        raise SystemExit(f"train.batch_size = {batch_size} must be divisible by data-parallel ranks x parallel.grad_accum "
                         f"= {dp} x {grad_accum}; the global batch is split evenly across them")


def resume_step(source, cursor: dict, global_batch_size: int, checkpoint_step: int) -> int:
    """The step to continue at, after checking that the data would continue the same sample order."""
    if hasattr(source, "check_cursor"):
        return source.check_cursor(cursor, global_batch_size)
    expected = source.cursor(checkpoint_step, global_batch_size)
    if cursor != expected:
        raise SystemExit(f"data cursor in the checkpoint {cursor} differs from this config's {expected}: "
                         "resuming would not continue the same sample order (was data.* or train.seed changed?)")
    return checkpoint_step


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def truncate_metrics(path: Path, step: int) -> None:
    """Drop records after ``step`` (written after the checkpoint we resume from), so curves don't double back."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in keep))


def all_sum(x: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(x)
    return x


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
    t, par, ck = cfg.train, cfg.parallel, cfg.checkpoint
    if t.threads:
        torch.set_num_threads(t.threads)
    device = resolve_device(t.device)
    denv = init_distributed(device.type)
    device = resolve_device(t.device, denv.local_rank)
    layout = ParallelLayout(denv.rank, denv.world_size, par.sp)
    check_batch_split(t.batch_size, layout.dp, par.grad_accum)
    sp = layout.sequence_parallel()
    main = denv.rank == 0

    run_dir = Path(cfg.run_dir)
    if (run_dir / "final.pt").exists():
        raise SystemExit(f"{run_dir} already holds a finished run (final.pt); choose another --run-dir or remove it")
    run_dir.mkdir(parents=True, exist_ok=True)
    store = CheckpointStore(run_dir / "checkpoints", denv.rank, denv.world_size, keep_last=ck.keep_last, keep_every=ck.keep_every)
    ckpt: StoredCheckpoint | None = None
    if ck.resume == "auto" and store.complete_steps():
        ckpt = store.load()
    if dist.is_initialized():
        dist.barrier()  # every rank's store exists (rank 0 cleaned stale temporaries) before anyone saves
    if main:
        (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        if ckpt is None:
            (run_dir / "metrics.jsonl").unlink(missing_ok=True)
        else:
            truncate_metrics(run_dir / "metrics.jsonl", ckpt.step)

    seed_everything(t.seed)
    autocast = autocast_for(t.precision, device)
    source = build_source(cfg.data.name, cfg.data.config, t.seed)
    model = build_model(cfg.model.name, cfg.model.config, source.vocab_size).to(device)
    # Counted before ZeRO-3 partitions the parameters (a partitioned one reports no elements).
    n_params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    n_embedding = sum(p.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters())
    if par.activation_checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

        apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, (Block, AffineBlock)))
    if par.compile_blocks:  # fuses each block's norms, rotary and MLP elementwise work (docs/benchmarks.md)
        compile_blocks(model)
    micro_rows = t.batch_size // (layout.dp * par.grad_accum)
    use_ds_bf16 = par.engine == "deepspeed" and device.type == "cuda" and t.precision != "fp32"
    engine = build_engine(model, t, par, micro_rows, bf16=use_ds_bf16)
    if use_ds_bf16:
        autocast = contextlib.nullcontext()  # DeepSpeed holds bf16 weights with fp32 masters itself
    start, tokens_seen = 0, 0
    if ckpt is not None:
        files = [ckpt.read(r) for r in range(ckpt.world_size)]
        engine.load_canonical(merge_canonical([f["engine"] for f in files]))
        start = resume_step(source, ckpt.meta["data_cursor"], t.batch_size, ckpt.step)
        tokens_seen = ckpt.meta["tokens"]
        if ckpt.world_size == denv.world_size:
            restore_rng(files[denv.rank]["rng"], device)
    if ckpt is None or ckpt.world_size != denv.world_size:
        # Every rank initialised the same weights from the shared seed; from here on the global RNG only draws
        # dropout masks, which must differ between ranks (a sequence's slices included) and, after a resume
        # at another world size, from the masks of the run's first steps.
        torch.manual_seed(int(np.random.SeedSequence([t.seed, denv.rank, start]).generate_state(1)[0]))
    eval_sets = source.eval_sets(t.eval_batches, t.eval_batch_size)

    logger = MetricsLogger(run_dir, start_wandb(cfg, run_dir)) if main else None

    def show(text: str, final: bool = False) -> None:
        if logger is not None:
            logger.show(text, final)

    where = f"{layout.dp} dp x {layout.sp} sp ranks on {device.type}" if denv.world_size > 1 else str(device)
    show(f"{cfg.name}: {cfg.model.name} with {n_params / 1e6:.2f}M parameters, {where}, engine {par.engine}"
         f"{f' ZeRO-{par.zero_stage}' if par.engine == 'deepspeed' else ''}, run dir {run_dir}", final=True)
    if ckpt is not None:
        note = f" (skipped: {'; '.join(ckpt.skipped)})" if ckpt.skipped else ""
        show(f"resumed from {ckpt.path} at step {start} (saved by {ckpt.world_size} ranks){note}", final=True)

    batches = source.train_batches(start, t.batch_size, layout.dp_rank, layout.dp)
    version = code_version()
    throughput = Throughput()
    started = time.perf_counter()
    final_eval: dict[int, dict] = {}
    checked_lengths: set[int] = set()
    last_loss = float("nan")
    for step in range(start, t.steps):
        inputs, targets = (x.to(device) for x in next(batches))
        seq_len = inputs.shape[1]
        if sp is not None and seq_len not in checked_lengths:  # without SP any length works
            try:
                model.check_sequence_parallel(seq_len, par.sp)
            except ValueError as e:
                raise SystemExit(f"parallel.sp = {par.sp}: {e}") from None
            checked_lengths.add(seq_len)
        inputs = shard_sequence(inputs, sp, model.sequence_layout)
        targets = shard_sequence(targets, sp, model.sequence_layout)
        # Normalise by the scored tokens of the whole global batch, so that summed gradients are its mean.
        scored = all_sum((targets != IGNORE_INDEX).sum().to(torch.float32)).clamp_min(1)
        lr = lr_at(step, t)
        step_loss = torch.zeros((), device=device)
        for micro_in, micro_tg in zip(inputs.chunk(par.grad_accum), targets.chunk(par.grad_accum)):
            # Finding the scored positions costs one device sync: worth it only where few are scored.
            scored_rows = (micro_tg != IGNORE_INDEX).nonzero(as_tuple=True) if source.sparse_targets else None
            with autocast:
                logits = engine.forward(micro_in, sp=sp, scored=scored_rows)
            labels = micro_tg[scored_rows] if scored_rows is not None else micro_tg.flatten()
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")
            engine.backward(loss / scored)
            step_loss += loss.detach() / scored
        grad_norm = engine.step(lr)
        throughput.add(inputs.numel())
        tokens_seen += t.batch_size * seq_len

        done = step + 1
        record, evaluated = None, False
        logging_step = done % t.log_every == 0 or done == t.steps
        if logging_step:
            # Checked only when logging: a per-step check would sync the GPU every step.
            loss_value = last_loss = all_sum(step_loss.clone()).item()
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"step {done}: loss is {loss_value}; lower train.lr or check the data")
            record = {"step": done, "loss": loss_value, "lr": lr, "grad_norm": float(grad_norm),
                      "tokens": tokens_seen, "tokens_per_s": throughput.rate() * denv.world_size,
                      "elapsed_s": time.perf_counter() - started}
            if hasattr(source, "metrics"):
                record.update(source.metrics())
        if (t.eval_every and done % t.eval_every == 0) or done == t.steps:
            final_eval = evaluate(engine.module, eval_sets, device, autocast, layout, sp, source.class_groups)
            evaluated = True
            record = {**(record or {"step": done}), **eval_summary(final_eval)}
            throughput.rate()  # evaluation time is not training throughput
        stop = logging_step and done < t.steps and should_stop()
        if (ck.every and done % ck.every == 0 and done < t.steps) or stop:
            shard = {"engine": engine.canonical_shard(), "rng": rng_state(device)}
            meta = {"step": done, "tokens": tokens_seen, "data_cursor": source.cursor(done, t.batch_size),
                    "world_size": denv.world_size, "dp": layout.dp, "sp": layout.sp, "engine": par.engine,
                    "zero_stage": par.zero_stage, "config": cfg.to_dict(), "code_version": version}
            blocked = store.save(done, shard, meta)
            record = {**(record or {"step": done}), "checkpoint/blocked_s": blocked}
        if record is not None and logger is not None:
            logger.log(record)
            line = f"step {done}/{t.steps} loss {last_loss:.4f} lr {lr:.2e}"
            if "tokens_per_s" in record:
                line += f" {record['tokens_per_s']:.0f} tok/s"
            metrics = [f"acc@{k}={v['acc']:.3f}" for k, v in final_eval.items()] if evaluated and final_eval else []
            if evaluated and cfg.data.name == "shards":
                metrics = [f"ppl@{k}={v['ppl']:.2f}" for k, v in final_eval.items()]
            show(" ".join([line, *metrics]), final=evaluated)
        if stop:
            store.close()
            show(f"stopping at step {done} on a preemption signal; checkpoint in {store.root}", final=True)
            if logger is not None:
                logger.close()
            return {"preempted": True, "step": done}

    store.close()
    weights = engine.full_state_dict()
    if main:
        save_checkpoint(run_dir / "final.pt", weights, cfg, t.steps)
        write_eval_json(run_dir / "eval.json", final_eval)
        summary = {"name": cfg.name, "model": cfg.model.name, "n_params": n_params,
                   "n_params_non_embedding": n_params - n_embedding, "tokens": tokens_seen, "steps": t.steps,
                   "train_loss": last_loss, "eval": eval_summary(final_eval)}
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        show(f"done in {time.perf_counter() - started:.0f}s; checkpoint {run_dir / 'final.pt'}", final=True)
        logger.close()
    return eval_summary(final_eval)
