"""The single-process training loop: batch, forward, loss, backward, clip, step, log, eval, save."""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from psm_train.config import RunConfig
from psm_train.data import build_source
from psm_train.models import build_model
from psm_train.train.checkpoint import save_checkpoint
from psm_train.train.evaluate import evaluate, masked_loss
from psm_train.train.metrics import MetricsLogger, Throughput, start_wandb
from psm_train.train.optim import build_optimizer, lr_at


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("train.device=cuda but no CUDA device is available (use train.device=cpu or auto)")
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
    """Flat metrics for metrics.jsonl: eval/len{L}/loss and eval/len{L}/acc."""
    out = {}
    for seq_len, r in results.items():
        out[f"eval/len{seq_len}/loss"] = r["loss"]
        out[f"eval/len{seq_len}/acc"] = r["acc"]
    return out


def train(cfg: RunConfig) -> dict[str, float]:
    """Train from scratch as configured; returns the final evaluation metrics."""
    t = cfg.train
    if t.threads:
        torch.set_num_threads(t.threads)
    run_dir = Path(cfg.run_dir)
    if (run_dir / "final.pt").exists():
        raise SystemExit(f"{run_dir} already holds a finished run (final.pt); choose another --run-dir or remove it")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    (run_dir / "metrics.jsonl").unlink(missing_ok=True)

    seed_everything(t.seed)
    device = resolve_device(t.device)
    autocast = autocast_for(t.precision, device)
    source = build_source(cfg.data.name, cfg.data.config, t.seed)
    model = build_model(cfg.model.name, cfg.model.config, source.vocab_size).to(device)
    optimizer = build_optimizer(model, t)
    eval_sets = source.eval_sets(t.eval_batches, t.eval_batch_size)
    n_params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())

    logger = MetricsLogger(run_dir, start_wandb(cfg, run_dir))
    logger.show(f"{cfg.name}: {cfg.model.name} with {n_params / 1e6:.2f}M parameters on {device}, run dir {run_dir}", final=True)
    throughput = Throughput()
    started = time.perf_counter()
    final_eval: dict[int, dict] = {}
    batches = source.train_batches(0, t.batch_size)
    for step in range(t.steps):
        inputs, targets = (x.to(device) for x in next(batches))
        lr = lr_at(step, t)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with autocast:
            loss = masked_loss(model(inputs), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip if t.grad_clip > 0 else float("inf"))
        optimizer.step()
        throughput.add(inputs.numel())

        done = step + 1
        record, evaluated = None, False
        if done % t.log_every == 0 or done == t.steps:
            # Checked only when logging: a per-step check would sync the GPU every step.
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"step {done}: loss is {loss_value}; lower train.lr or check the data")
            record = {
                "step": done,
                "loss": loss_value,
                "lr": lr,
                "grad_norm": grad_norm.item(),
                "tokens_per_s": throughput.rate(),
                "elapsed_s": time.perf_counter() - started,
            }
        if (t.eval_every and done % t.eval_every == 0) or done == t.steps:
            final_eval, evaluated = evaluate(model, eval_sets, device, autocast), True
            record = {**(record or {"step": done}), **eval_summary(final_eval)}
            throughput.rate()  # evaluation time is not training throughput
        if record is not None:
            logger.log(record)
            line = f"step {done}/{t.steps} loss {loss.item():.4f} lr {lr:.2e}"
            if "tokens_per_s" in record:
                line += f" {record['tokens_per_s']:.0f} tok/s"
            accs = [f"acc@{k}={v['acc']:.3f}" for k, v in final_eval.items()] if evaluated else []
            logger.show(" ".join([line, *accs]), final=evaluated)

    save_checkpoint(run_dir / "final.pt", model, cfg, t.steps)
    (run_dir / "eval.json").write_text(json.dumps({str(k): v for k, v in final_eval.items()}, indent=1))
    logger.show(f"done in {time.perf_counter() - started:.0f}s; checkpoint {run_dir / 'final.pt'}", final=True)
    logger.close()
    return eval_summary(final_eval)
