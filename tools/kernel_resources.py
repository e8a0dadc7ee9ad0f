"""What the compiler makes of the chunked-scan kernels, without a GPU: registers, spills and the
width of every global load, per kernel and autotuning config, compiled for a CUDA architecture.

    python tools/kernel_resources.py --decay diagonal --dim 128 --kernels state_fwd out_fwd --out resources.json

Each kernel is compiled as a launch would compile it (bf16 tensors unless --dtype float32, the
pointers and T divisible by 16) for every config in its autotuning list that its pruner keeps,
or --max-configs of them. Registers and spills come from cuobjdump, the loads from the PTX: a
tile load that is not 16 bytes wide is usually a sign that the compiler could not vectorize it
(the state passes' 4-byte copies were found this way). Load and ex2
counts are instructions in the PTX, per thread: a loop's body counts once, and a pipelined load
once more in the loop's prologue.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

# Compile for real even when the caller runs kernels under the interpreter (the tests do).
os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from psm_train.kernels.chunk_affine import triton_kernels as kern  # noqa: E402
from psm_train.kernels.chunk_affine.triton_op import DIAG_SUB, host_block, kernel_chunk  # noqa: E402

KERNELS = {
    "diagonal": ["chunk_cumsum", "state_fwd", "scores_inter_diag", "scores_own_diag", "out_fwd", "state_bwd",
                 "dscores_diag", "dqk_bwd_diag", "dv_bwd", "decay_grad"],
    "scalar": ["state_fwd", "out_fwd", "state_bwd", "dqk_bwd_scalar", "dv_bwd", "decay_grad"],
}
# tensors in the input dtype (the others are float32: gc, states in and out, scores, db, dg)
INPUT_DTYPE = {"q", "k", "v", "do", "h", "dh", "o", "dq", "dk", "dv"}
DEFAULT_WARPS, DEFAULT_STAGES = 4, 3  # triton.jit's defaults, for kernels that are not autotuned


def _jit(kernel) -> JITFunction:
    while not isinstance(kernel, JITFunction):
        kernel = kernel.fn
    return kernel


def constexprs(decay: str, dim: int, chunk: int, dtype: str) -> dict:
    """The constexpr arguments a launch passes (triton_op.py), before the config's blocks."""
    diag = decay == "diagonal"
    block = host_block(dim)
    return dict(
        H=16, K=dim, V=dim, C=kernel_chunk(chunk, diag), S=DIAG_SUB, KP=max(16, triton.next_power_of_2(dim)),
        BK=block, BV=block, DIAG=diag, PREC="ieee" if dtype == "float32" else "tf32", USE_H0=False, USE_DHT=False,
        NK=1 if diag else triton.cdiv(dim, block), W=dim if diag else 1,
    )


def configs(name: str, consts: dict) -> list[tuple[dict, int, int]]:
    """(blocks, warps, stages) of every config the kernel's autotuner would try for these shapes."""
    tuner = getattr(kern, name)
    if isinstance(tuner, JITFunction):
        return [({}, DEFAULT_WARPS, DEFAULT_STAGES)]
    cands = tuner.configs
    if tuner.early_config_prune:
        cands = tuner.early_config_prune(cands, {}, **consts)
    return [(dict(c.kwargs), c.num_warps, c.num_stages) for c in cands]


def load_widths(ptx: str) -> dict[str, int]:
    """Global loads by width in bytes ('16B': n, ...): cp.async copies and ld.global instructions."""
    copies = re.findall(r"cp\.async\.c[ag]\.shared\.global \[[^]]*\], \[[^]]*\], (0x[0-9a-f]+)", ptx)
    widths = collections.Counter(f"{int(n, 16)}B" for n in copies)
    for vec, bits in re.findall(r"ld\.global(?:\.[\w:]+?)*?(?:\.v(\d))?\.[bfsu](\d+)\b", ptx):
        widths[f"{int(vec or 1) * int(bits) // 8}B"] += 1
    return dict(sorted(widths.items(), key=lambda kv: -int(kv[0][:-1])))


def resources(name: str, consts: dict, dtype: str, arch: int, cuobjdump: str, workdir: str) -> dict:
    fn = _jit(getattr(kern, name))
    sig, attrs, cx = {}, {}, {}
    for i, (arg, param) in enumerate(zip(fn.arg_names, fn.params)):
        if param.is_constexpr:
            sig[arg], cx[(i,)] = "constexpr", consts[arg]
        elif arg == "T":
            sig[arg], attrs[(i,)] = "i32", [["tt.divisibility", 16]]
        else:
            sig[arg] = ("*bf16" if dtype == "bfloat16" else "*fp32") if arg in INPUT_DTYPE else "*fp32"
            attrs[(i,)] = [["tt.divisibility", 16]]
    compiled = triton.compile(
        ASTSource(fn=fn, signature=sig, constexprs=cx, attrs=attrs), target=GPUTarget("cuda", arch, 32),
        options=dict(num_warps=consts["num_warps"], num_stages=consts["num_stages"]),
    )
    cubin = os.path.join(workdir, f"{name}.cubin")
    with open(cubin, "wb") as f:
        f.write(compiled.asm["cubin"])
    usage = subprocess.run([cuobjdump, "-res-usage", cubin], capture_output=True, text=True, check=True).stdout
    regs, stack = re.search(r"REG:(\d+) STACK:(\d+)", usage).groups()
    ptx = compiled.asm["ptx"]
    return dict(registers=int(regs), stack_bytes=int(stack), loads=load_widths(ptx), ex2=len(re.findall(r"ex2\.approx", ptx)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--decay", choices=list(KERNELS), default="diagonal")
    ap.add_argument("--dim", type=int, default=128, help="head dim K = V")
    ap.add_argument("--chunk", type=int, default=64, help="the requested chunk size (the kernels run at triton_op.kernel_chunk's)")
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability times 10 (90: Hopper)")
    ap.add_argument("--kernels", nargs="+", help="default: every kernel of this decay form")
    ap.add_argument("--max-configs", type=int, help="compile at most this many configs per kernel")
    ap.add_argument("--out", help="write the rows as JSON here")
    args = ap.parse_args()
    names = args.kernels or KERNELS[args.decay]
    unknown = [n for n in names if n not in KERNELS[args.decay]]
    if unknown:
        sys.exit(f"--kernels: {unknown} are not {args.decay}-decay kernels; those are {KERNELS[args.decay]}")
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(cuobjdump):
        sys.exit(f"kernel_resources.py reads registers with the cuobjdump that Triton ships, not found at {cuobjdump}")

    base = constexprs(args.decay, args.dim, args.chunk, args.dtype)
    workdir = tempfile.mkdtemp(prefix="kernel_resources_")
    rows = []
    print(f"{args.decay} decay, D {args.dim}, chunk {base['C']}, {args.dtype}, sm_{args.arch}")
    print("| kernel | config | registers | spill bytes | global loads by width | ex2 |\n|---|---|---|---|---|---|")
    for name in names:
        for blocks, warps, stages in configs(name, base)[: args.max_configs]:
            consts = {**base, **blocks, "num_warps": warps, "num_stages": stages}
            row = dict(kernel=name, blocks=blocks, num_warps=warps, num_stages=stages,
                       **resources(name, consts, args.dtype, args.arch, cuobjdump, workdir))
            rows.append(row)
            config = " ".join([f"{k} {v}" for k, v in blocks.items()] + [f"{warps} warps", f"{stages} stages"])
            loads = ", ".join(f"{w} ×{n}" for w, n in row["loads"].items())
            print(f"| {name} | {config} | {row['registers']} | {row['stack_bytes']} | {loads} | {row['ex2']} |", flush=True)
    shutil.rmtree(workdir)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(args=vars(args), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
