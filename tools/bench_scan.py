"""Chunked affine scan, forward and forward+backward: our Triton kernels vs fla vs the PyTorch reference.

    python tools/bench_scan.py --out bench_scan.json

Inputs [B, T, H, D] in bf16 with B·H = 128 (B = 8, H = 16), K = V = D, log decay in float32:
[B, T, H, 1] for scalar decay (fla's chunk_simple_gla, and fla's chunk_gla with the gate
broadcast over K as ``fla_chunk_gla``: the same function, the copy of the gate included),
[B, T, H, D] for diagonal decay (fla's chunk_gla). A peer that refuses its backward (fla 0.6.0's
chunk_simple_gla does on Hopper with Triton < 3.7.1) gets its forward timed alone. Times are medians of triton.testing.do_bench; fwd+bwd backpropagates a random dO.

TFLOP/s counts the chunkwise algorithm's matmuls at chunk C = 64 (per token and head: the
[C, C] score matrix, its product with V, the inter-chunk q·S and the state update, 2·(C·K + C·V
+ 2·K·V) FLOP forward; backward counted as twice that). Roofline bound: the larger of those FLOP
at the card's measured bf16 matmul rate (PEAK_FLOPS) and the minimal HBM traffic (q, k, v, g read and o
written forward; q, k, v, g, dO read and dq, dk, dv, dg written backward; per-chunk states not
counted) at its measured copy bandwidth (PEAK_BW).

Each shape (decay, D, T) runs in a process of its own (tools/isolated_run.py), limited to
--shape-timeout seconds including compilation and autotuning: an out-of-memory error or the limit
becomes an error row ("oom", "timeout after N s") and the next shape starts with an empty GPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import torch
import torch.nn.functional as F
import triton
import triton.testing

from isolated_run import OOM, run_isolated, write_result  # tools/ is on the path when this script runs

from psm_train.kernels.chunk_affine.reference import chunk_affine_ref
from psm_train.kernels.chunk_affine.triton_op import chunk_affine_triton

PEAK_FLOPS, PEAK_BW = 790e12, 4.3e12  # H200: 8192^3 bf16 matmul; device-to-device copy, read + write


def fla_impl(decay: str):
    """fla's kernel for this decay form as (q, k, v, g) -> o, or None when fla is missing."""
    try:
        from fla.ops.gla import chunk_gla
        from fla.ops.simple_gla import chunk_simple_gla
    except ImportError:
        return None
    if decay == "scalar":
        return lambda q, k, v, g: chunk_simple_gla(q, k, v, g=g[..., 0], scale=1.0)[0]
    if decay == "scalar_as_diagonal":  # the same function through fla's diagonal-gate kernel
        return lambda q, k, v, g: chunk_gla(q, k, v, g.expand(*q.shape).contiguous(), scale=1.0)[0]
    return lambda q, k, v, g: chunk_gla(q, k, v, g, scale=1.0)[0]


def ours(chunk: int):
    """Our kernels at chunk size ``chunk`` (scalar decay runs at it; diagonal decay always at 64)."""
    return lambda q, k, v, g: chunk_affine_triton(q, k, v, g, chunk_size=chunk)[0]


def reference(q, k, v, g):
    return chunk_affine_ref(q, k, v, g, chunk_size=64)[0]


def cost(decay: str, T: int, D: int, bh: int) -> tuple[float, float, float]:
    """FLOP fwd+bwd, minimal bytes fwd+bwd, roofline time in ms (see the module docstring)."""
    C = 64
    flops = 3 * 2 * (C * D + C * D + 2 * D * D) * T * bh
    g = 4 * (D if decay == "diagonal" else 1)
    fwd_bytes = 3 * 2 * D + g + 2 * D
    bwd_bytes = 4 * 2 * D + g + 3 * 2 * D + g
    nbytes = (fwd_bytes + bwd_bytes) * T * bh
    return flops, nbytes, 1e3 * max(flops / PEAK_FLOPS, nbytes / PEAK_BW)


def make_inputs(decay: str, T: int, D: int, B: int, H: int):
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k = (torch.randn(B, T, H, D, device="cuda", generator=gen) / D**0.5 for _ in range(2))
    v = torch.randn(B, T, H, D, device="cuda", generator=gen)
    # GLA-style gates: log sigmoid / 16, mean about -0.05 per token.
    g = F.logsigmoid(torch.randn(B, T, H, D if decay == "diagonal" else 1, device="cuda", generator=gen)) / 16
    do = torch.randn(B, T, H, D, device="cuda", generator=gen, dtype=torch.bfloat16)
    xs = [x.bfloat16().requires_grad_() for x in (q, k, v)] + [g.requires_grad_()]
    return xs, do


def time_fwd(fn, xs) -> float:
    return triton.testing.do_bench(lambda: fn(*xs), warmup=10, rep=50, return_mode="median")


def time_fwdbwd(fn, xs, do) -> float:
    def step():
        fn(*xs).backward(do)

    return triton.testing.do_bench(step, warmup=10, rep=100, grad_to_none=xs, return_mode="median")


def write(path: str, meta: dict, rows: list[dict]) -> None:
    with open(path, "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)


def measure_shape(decay: str, D: int, T: int, args: argparse.Namespace) -> list[dict]:
    """One row per implementation at this shape; a failure (an OOM, a peer's refusal) is a row's error."""
    impls = {"triton": ours(args.chunk), "fla": fla_impl(decay), "reference": reference}
    if decay == "scalar":
        impls["fla_chunk_gla"] = fla_impl("scalar_as_diagonal")
    xs, do = make_inputs(decay, T, D, args.batch, args.heads)
    flops, _, bound = cost(decay, T, D, args.batch * args.heads)
    o_ours = impls["triton"](*xs).float()
    rows = []
    for name, fn in impls.items():
        if fn is None or (name == "reference" and T > args.ref_max_len):
            continue
        row = dict(decay=decay, D=D, T=T, impl=name, roofline_ms=bound)
        try:  # forward and backward separately: a peer may refuse only its backward
            o = fn(*xs).float()
            row["rel_diff_vs_triton"] = ((o - o_ours).norm() / o_ours.norm()).item()
            row["fwd_ms"] = time_fwd(fn, xs)
            row["fwdbwd_ms"] = time_fwdbwd(fn, xs, do)
            row["tflops"] = flops / row["fwdbwd_ms"] / 1e9
            row["x_roofline"] = row["fwdbwd_ms"] / bound
        except torch.OutOfMemoryError:
            row["error"] = OOM
        except Exception as e:  # a peer's refusal is a result too
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
        torch.cuda.empty_cache()
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def measure_isolated(decay: str, D: int, T: int, args: argparse.Namespace) -> list[dict]:
    """`measure_shape` in a child process (this script with --one) under --shape-timeout."""
    cmd = [
        sys.executable, __file__, "--one", decay, str(D), str(T), "--batch", str(args.batch), "--heads", str(args.heads),
        "--ref-max-len", str(args.ref_max_len), "--chunk", str(args.chunk),
    ]
    rows, error = run_isolated(cmd, args.shape_timeout)
    if rows is None:
        rows = [dict(decay=decay, D=D, T=T, impl="all", error=error)]
        print(json.dumps(rows[0]), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[2048, 8192, 32768, 65536])
    ap.add_argument("--dims", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--decays", nargs="+", default=["scalar", "diagonal"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--ref-max-len", type=int, default=8192, help="longest T for the PyTorch reference")
    ap.add_argument("--chunk", type=int, default=64,
                    help="our kernels' chunk size (scalar decay; a power of two in 16..128); the roofline stays at 64")
    ap.add_argument("--budget-s", type=float, default=600.0, help="start no new shape after this many seconds")
    ap.add_argument("--shape-timeout", type=float, default=600.0,
                    help="wall-clock limit in seconds of one shape, compilation and autotuning included")
    ap.add_argument("--out", default="bench_scan.json")
    ap.add_argument("--warm-only", action="store_true",
                    help="run every implementation's fwd+bwd once at the first length (compile and autotune into the "
                         "Triton cache, e.g. one process per decay and D in parallel before the timed run), no timing")
    ap.add_argument("--one", nargs=3, metavar=("DECAY", "D", "T"), help=argparse.SUPPRESS)  # the child of measure_isolated
    ap.add_argument("--row-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_scan.py needs a CUDA GPU")
    if args.one:
        decay, D, T = args.one[0], int(args.one[1]), int(args.one[2])
        write_result(args.row_out, measure_shape(decay, D, T, args))
        return
    if args.warm_only:
        for D in args.dims:
            for decay in args.decays:
                xs, do = make_inputs(decay, args.seq_lens[0], D, args.batch, args.heads)
                for name, fn in (("triton", ours(args.chunk)), ("fla", fla_impl(decay)), ("fla_chunk_gla", fla_impl("scalar_as_diagonal"))):
                    if fn is None or (name == "fla_chunk_gla" and decay != "scalar"):
                        continue
                    t0 = time.time()
                    try:
                        fn(*xs).backward(do)
                    except RuntimeError as e:
                        print(f"warm {decay} D={D} {name}: backward refused ({str(e)[:80]}); forward only", flush=True)
                        with torch.no_grad():
                            fn(*xs)
                    torch.cuda.synchronize()
                    print(f"warm {decay} D={D} {name}: {time.time() - t0:.1f}s", flush=True)
        return

    meta = dict(
        gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
        python=platform.python_version(), batch=args.batch, heads=args.heads, chunk=args.chunk,
    )
    try:
        import fla

        meta["fla"] = fla.__version__
    except ImportError:
        meta["fla"] = None
    start, rows = time.time(), []
    for D in args.dims:
        for decay in args.decays:
            for T in args.seq_lens:
                if time.time() - start > args.budget_s:
                    print(f"time budget spent: skipped {decay} D={D} T={T}", flush=True)
                    continue
                rows.extend(measure_isolated(decay, D, T, args))
                write(args.out, meta, rows)

    print(f"\n{meta}")
    print("| decay | D | T | impl | fwd ms | fwd+bwd ms | TFLOP/s | roofline ms | × roofline | fastest fla / ours (fwd, fwd+bwd) | rel diff vs triton |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    by_shape = {(r["decay"], r["D"], r["T"], r["impl"]): r for r in rows}
    for r in rows:
        if "fwd_ms" in r and "fwdbwd_ms" not in r:
            print(f"| {r['decay']} | {r['D']} | {r['T']} | {r['impl']} | {r['fwd_ms']:.2f} | {r.get('error', '')[:60]} | | | | | {r['rel_diff_vs_triton']:.1e} |")
            continue
        if "error" in r:
            print(f"| {r['decay']} | {r['D']} | {r['T']} | {r['impl']} | {r['error']} | | | | | | |")
            continue
        peers = [by_shape.get((r["decay"], r["D"], r["T"], n)) for n in ("fla", "fla_chunk_gla")]
        fwd = [p["fwd_ms"] for p in peers if p and "fwd_ms" in p]
        both = [p["fwdbwd_ms"] for p in peers if p and "fwdbwd_ms" in p]
        ratio = ""
        if r["impl"] == "triton" and fwd:  # the fastest fla kernel for the same function
            ratio = f"{min(fwd) / r['fwd_ms']:.2f}, " + (f"{min(both) / r['fwdbwd_ms']:.2f}" if both else "–")
        print(
            f"| {r['decay']} | {r['D']} | {r['T']} | {r['impl']} | {r['fwd_ms']:.2f} | {r['fwdbwd_ms']:.2f} | "
            f"{r['tflops']:.0f} | {r['roofline_ms']:.2f} | {r['x_roofline']:.1f} | {ratio} | {r['rel_diff_vs_triton']:.1e} |"
        )


if __name__ == "__main__":
    main()
