"""Where the chunked affine scan's time goes: CUDA time per kernel for one shape, fwd+bwd.

    python tools/profile_scan.py --decay scalar --dim 128 --seq-len 16384 --out profile_scan.json [--tunings]

Inputs are tools/bench_scan.py's (bf16, B 8 × H 16, K = V = D, float32 log decay). Runs a few
warm-up steps (compilation, autotuning), then profiles ``--steps`` forward+backward passes with
torch.profiler and prints each kernel's CUDA time per pass, largest first. ``--tunings`` also prints
the autotuner's timings of the fastest configs of every kernel (the JSON gets all of them).
"""

from __future__ import annotations

import argparse
import json

import torch

from bench_scan import make_inputs  # tools/ is on the path when this script runs
from cuda_profile import autotune_rows, kernel_times, print_autotune_table, print_kernel_table

from psm_train.kernels.chunk_affine import chunk_affine, triton_kernels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--decay", choices=["scalar", "diagonal"], default="scalar")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=16384)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--tunings", action="store_true", help="also print the autotuner's timings per kernel and config")
    ap.add_argument("--out", help="write the table as JSON here")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("profile_scan.py profiles the Triton kernels and needs a CUDA GPU")

    B, T, H, D = args.batch, args.seq_len, args.heads, args.dim
    (q, k, v, g), do = make_inputs(args.decay, T, D, B, H)

    def step():
        q.grad = k.grad = v.grad = g.grad = None  # no gradient accumulation kernels in the profile
        o, _ = chunk_affine(q, k, v, g, chunk_size=args.chunk, backend="triton")
        o.backward(do)

    for _ in range(3):
        step()
    rows, total = kernel_times(step, args.steps)
    print(f"{args.decay} decay, B {B} × H {H}, T {T}, D {D}, chunk {args.chunk}: {total:.2f} ms of CUDA time per fwd+bwd")
    print_kernel_table(rows, total)
    tunings = autotune_rows(triton_kernels)
    if args.tunings:
        print_autotune_table(tunings)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "total_ms": total, "kernels": rows, "autotune": tunings}, f, indent=1)


if __name__ == "__main__":
    main()
