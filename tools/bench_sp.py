"""Sequence-parallel weak scaling: step time, exchange time and its share of the step, per SP degree.

    python tools/bench_sp.py --sp 1 2 4 8 --device cuda --tokens-per-rank 16384 --json bench_sp.json

For each SP degree the script starts that many ranks with torchrun (one SP group, dp = 1) and
trains every model for --steps steps on one sequence of sp × --tokens-per-rank tokens: forward,
cross-entropy, backward, the gradient all-reduce and AdamW (the torch engine). The exchange time
is the time spent in the SP collectives of the forward and backward passes (the all-gathers of
slice summaries, tree roots or K/V, and their backward reductions); on GPU every collective is
bracketed by synchronisations to time it, which the training loop does not do. Efficiency is
time(sp = 1) / time(sp): the same tokens per rank should take the same time.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from psm_train.config import TrainConfig
from psm_train.distributed.env import init_distributed
from psm_train.distributed.layout import ParallelLayout
from psm_train.models import MODELS, build_model
from psm_train.parallelize import apply_sequence_parallel
from psm_train.train.engine import TorchEngine

VOCAB = 8192
SP_COLLECTIVES = ("all_gather", "all_reduce", "reduce_scatter")
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def model_specs(d: int, layers: int, heads: int, chunk: int) -> dict[str, tuple[str, dict]]:
    return {
        "transformer_psm": ("transformer_psm", dict(d_model=d, n_heads=heads, chunk_size=chunk, agg_layers=1,
                                                    inf_layers=layers - 1)),
        "gla": ("gla", dict(d_model=d, n_layers=layers, n_heads=heads, chunk_size=chunk)),
        "mamba2": ("mamba2", dict(d_model=d, n_layers=layers, chunk_size=chunk)),
        "transformer": ("transformer", dict(d_model=d, n_layers=layers, n_heads=heads)),
    }


class ExchangeTimer:
    """Accumulates the wall time of the SP collectives while ``active``."""

    def __init__(self, device: torch.device):
        self.device, self.active, self.seconds = device, False, 0.0
        for op in SP_COLLECTIVES:
            setattr(dist, op, self._timed(getattr(dist, op)))

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _timed(self, fn):
        def wrapper(*args, **kwargs):
            if not self.active:
                return fn(*args, **kwargs)
            self.sync()
            started = time.perf_counter()
            out = fn(*args, **kwargs)
            self.sync()
            self.seconds += time.perf_counter() - started
            return out

        return wrapper


def worker(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    denv = init_distributed(device.type)
    if device.type == "cuda":
        device = torch.device("cuda", denv.local_rank)
    else:
        torch.set_num_threads(args.threads)
    layout = ParallelLayout(denv.rank, denv.world_size, sp=denv.world_size)
    sp = layout.sequence_parallel()
    timer = ExchangeTimer(device)
    rows = []
    for label in args.models:
        name, kw = model_specs(args.d_model, args.layers, args.heads, args.chunk)[label]
        torch.manual_seed(0)
        model = build_model(name, MODELS[name][0](**kw), VOCAB).to(device)
        sharding = apply_sequence_parallel(model, sp)
        engine = TorchEngine(model, TrainConfig(device=device.type))
        seq_len = args.tokens_per_rank * layout.sp
        sharding.check(seq_len)
        data = torch.randint(0, VOCAB, (1, seq_len + 1), generator=torch.Generator().manual_seed(1)).to(device)
        inputs, targets = sharding.shard(data[:, :-1]), sharding.shard(data[:, 1:])
        positions = sharding.positions(seq_len).to(device) if sp is not None else None
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
        step_s, exchange_s = [], []
        for step in range(args.warmup + args.steps):
            timer.seconds, timer.active = 0.0, True
            timer.sync()
            started = time.perf_counter()
            with autocast:
                loss = engine.forward(inputs, positions=positions, targets=targets)
            engine.backward(loss / targets.numel())
            timer.active = False
            engine.step(1e-4)
            timer.sync()
            if step >= args.warmup:
                step_s.append(time.perf_counter() - started)
                exchange_s.append(timer.seconds)
        # The slowest rank sets the step time.
        stats = torch.tensor([statistics.mean(step_s), statistics.mean(exchange_s)], dtype=torch.float64)
        if dist.is_initialized():
            reduced = stats.to(device)  # NCCL reduces device tensors; gloo, CPU ones
            dist.all_reduce(reduced, op=dist.ReduceOp.MAX)
            stats = reduced.cpu()
        step_mean, exchange_mean = stats.tolist()
        rows.append({"model": label, "sp": layout.sp, "seq_len": seq_len, "tokens_per_rank": args.tokens_per_rank,
                     "params_M": sum(p.numel() for p in model.parameters()) / 1e6, "step_s": step_mean,
                     "exchange_s": exchange_mean, "exchange_frac": exchange_mean / step_mean})
        del engine, model
    if denv.rank == 0:
        Path(args.worker_out).write_text(json.dumps(rows))
    if dist.is_initialized():
        dist.destroy_process_group()


def launch(args: argparse.Namespace, sp: int, out: Path) -> None:
    forwarded = ["--device", args.device, "--models", *args.models, "--tokens-per-rank", str(args.tokens_per_rank),
                 "--d-model", str(args.d_model), "--layers", str(args.layers), "--heads", str(args.heads),
                 "--chunk", str(args.chunk), "--steps", str(args.steps), "--warmup", str(args.warmup),
                 "--threads", str(args.threads), "--worker-out", str(out)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={sp}", __file__, *forwarded]
    env = {**os.environ, **NO_MULTICAST, "OMP_NUM_THREADS": str(args.threads)}
    subprocess.run(cmd, env=env, check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sp", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--models", nargs="+", default=["transformer_psm", "gla", "mamba2", "transformer"])
    ap.add_argument("--tokens-per-rank", type=int, default=2048)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads per rank")
    ap.add_argument("--json", default="bench_sp.json")
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker_out:
        worker(args)
        return

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for sp in args.sp:
            out = Path(tmp) / f"sp{sp}.json"
            launch(args, sp, out)
            rows += json.loads(out.read_text())
    base = {r["model"]: r["step_s"] for r in rows if r["sp"] == 1}
    print("\n| model | params | sp | sequence | step s | exchange s | exchange share | efficiency vs sp 1 |")
    print("|---|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (r["model"], r["sp"])):
        r["efficiency"] = base[r["model"]] / r["step_s"] if r["model"] in base else None
        eff = f"{100 * r['efficiency']:.0f}%" if r["efficiency"] is not None else "-"
        print(f"| {r['model']} | {r['params_M']:.1f}M | {r['sp']} | {r['seq_len']} | {r['step_s']:.3f} | "
              f"{r['exchange_s']:.4f} | {100 * r['exchange_frac']:.1f}% | {eff} |")
    meta = {"date": datetime.date.today().isoformat(), "machine": platform.node(), "device": args.device,
            "torch": torch.__version__, "args": {k: v for k, v in vars(args).items() if k != "worker_out"}}
    Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
