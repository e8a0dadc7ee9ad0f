"""Model-level training throughput on one GPU: tokens/s and peak memory per sequence length.

    python tools/bench_models.py --out bench_models.json

Models at about 170M parameters (vocab 32768, tied embeddings, d 1024): transformer (11 layers,
16 heads), transformer_psm (Agg 1 (the default) + Inf 10 layers, chunk 64 and 128), gla (11 layers, 8 heads:
K 64, V 128 per head), mamba2 (9 layers, expand 2, head dim 64, state 64). One training step =
forward, cross-entropy, backward and a fused AdamW step under bf16 autocast, on batches of about
--tokens tokens (B = tokens // T, at least 1; so T above --tokens runs T tokens per step). The
default tokens per step are sized for an 80 GB card up to T = 32K.
Time: the mean of --steps steps after --warmup steps (which include Triton autotuning).
Each configuration (model, T) runs in a process of its own (tools/isolated_run.py), limited to
--shape-timeout seconds for everything it does (building, compiling, autotuning, timing): an
out-of-memory error or the limit becomes its row's "error" ("oom", "timeout after N s") and the
next configuration starts with an empty GPU.
--profile N also profiles one more step of each run and prints its N most expensive CUDA kernels.
--compile runs every transformer block through torch.compile, as the trainer's parallel.compile_blocks does.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import torch
import torch.nn.functional as F

from cuda_profile import kernel_times, print_kernel_table  # tools/ is on the path when this script runs
from isolated_run import OOM, run_isolated, write_result

from psm_train.kernels.attention import attention_backend
from psm_train.models import MODELS, build_model
from psm_train.parallelize import apply_compile

VOCAB = 32768
SPECS = {
    "transformer": ("transformer", dict(d_model=1024, n_layers=11, n_heads=16)),
    "transformer_psm_c64": ("transformer_psm", dict(d_model=1024, n_heads=16, chunk_size=64, inf_layers=10)),
    "transformer_psm_c128": ("transformer_psm", dict(d_model=1024, n_heads=16, chunk_size=128, inf_layers=10)),
    "gla": ("gla", dict(d_model=1024, n_layers=11, n_heads=8, chunk_size=64)),
    "mamba2": ("mamba2", dict(d_model=1024, n_layers=9, chunk_size=64)),
}


def measure(
    label: str, T: int, tokens: int, warmup: int, steps: int, profile_top: int = 0, compiled: bool = False
) -> dict:
    name, kw = SPECS[label]
    model = build_model(name, MODELS[name][0](**kw), VOCAB).cuda()
    params = sum(p.numel() for p in model.parameters())
    if compiled:
        torch._dynamo.reset()  # each run's graphs count against dynamo's recompile limit from zero
        apply_compile(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    B = max(1, tokens // T)
    data = torch.randint(0, VOCAB, (B, T + 1), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(data[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), data[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    row = dict(model=label, T=T, batch=B, params_M=params / 1e6, compiled=compiled)
    try:
        for _ in range(warmup):
            step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        dt = (time.perf_counter() - t0) / steps
        row.update(step_s=dt, tokens_per_s=B * T / dt, peak_mem_GiB=torch.cuda.max_memory_allocated() / 2**30)
        if profile_top:
            kernels, total = kernel_times(step, 1)
            row.update(profile_total_ms=total, profile=kernels[:profile_top])
            print(f"{label}, T {T}: {total:.1f} ms of CUDA time per step")
            print_kernel_table(kernels, total, profile_top)
    except torch.OutOfMemoryError:
        row["error"] = OOM
    return row


def measure_isolated(label: str, T: int, args: argparse.Namespace) -> dict:
    """`measure` in a child process (this script with --one) under --shape-timeout."""
    cmd = [
        sys.executable, __file__, "--one", label, str(T), "--tokens", str(args.tokens), "--warmup", str(args.warmup),
        "--steps", str(args.steps), "--profile", str(args.profile), *(["--compile"] if args.compile else []),
    ]
    row, error = run_isolated(cmd, args.shape_timeout)
    if row is None:
        row = dict(model=label, T=T, batch=max(1, args.tokens // T), params_M=None, compiled=args.compile, error=error)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[2048, 8192, 16384, 32768])
    ap.add_argument("--models", nargs="+", default=list(SPECS))
    ap.add_argument("--tokens", type=int, default=32768, help="tokens per step")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--budget-s", type=float, default=600.0, help="start no new run after this many seconds")
    ap.add_argument("--shape-timeout", type=float, default=600.0,
                    help="wall-clock limit in seconds of one configuration, compilation and autotuning included")
    ap.add_argument("--compile", action="store_true", help="torch.compile every transformer block")
    ap.add_argument("--profile", type=int, default=0, metavar="N", help="print each run's N most expensive CUDA kernels")
    ap.add_argument("--out", default="bench_models.json")
    ap.add_argument("--one", nargs=2, metavar=("MODEL", "T"), help=argparse.SUPPRESS)  # the child of measure_isolated
    ap.add_argument("--row-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_models.py needs a CUDA GPU")
    if args.one:
        label, T = args.one[0], int(args.one[1])
        write_result(args.row_out, measure(label, T, args.tokens, args.warmup, args.steps, args.profile, args.compile))
        return

    probe = torch.zeros(1, device="cuda", dtype=torch.bfloat16)
    meta = dict(
        gpu=torch.cuda.get_device_name(), torch=torch.__version__, python=platform.python_version(),
        attention=attention_backend(probe), tokens_per_step=args.tokens,
    )
    start, rows = time.time(), []
    for T in args.seq_lens:
        for label in args.models:
            if time.time() - start > args.budget_s:
                print(f"time budget spent: skipped {label} T={T}", flush=True)
                continue
            rows.append(measure_isolated(label, T, args))
            print(json.dumps(rows[-1]), flush=True)
            with open(args.out, "w") as f:
                json.dump(dict(meta=meta, rows=rows), f, indent=1)

    print(f"\n{meta}")
    print("| model | params | T | batch | tokens/s | peak memory GiB |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            params = "–" if r["params_M"] is None else f"{r['params_M']:.0f}M"
            print(f"| {r['model']} | {params} | {r['T']} | {r['batch']} | {r['error']} | |")
        else:
            print(
                f"| {r['model']} | {r['params_M']:.0f}M | {r['T']} | {r['batch']} | "
                f"{r['tokens_per_s'] / 1e3:.0f}k | {r['peak_mem_GiB']:.1f} |"
            )


if __name__ == "__main__":
    main()
