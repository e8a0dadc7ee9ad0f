"""Attention fwd+bwd TFLOP/s per backend: SDPA cuDNN, SDPA flash, SDPA memory-efficient, flash-attn
(when installed) and `psm_train.kernels.attention.attention` (the selector), bf16.

    python tools/bench_attention.py --out bench_attention.json

Shapes: causal B 8, H 16, D 128 at L 2048 and 8192 (the platform's reference shapes), and the
bidirectional Agg call of Transformer-PSM: all pairs of one tree level batched, [P, 16, 2c, 64]
with P·2c = 65536 tokens, c = 64 and 128. FLOP: 4·L²·D per head forward (halved when causal),
3.5× that for fwd+bwd (backward = 2.5× forward, the usual convention).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import triton.testing
from torch.nn.attention import SDPBackend, sdpa_kernel
import torch.nn.functional as F

from isolated_run import OOM  # tools/ is on the path when this script runs

from psm_train.kernels.attention import attention, flash_attn_func

SHAPES = [  # (label, B, H, L, D, causal)
    ("causal", 8, 16, 2048, 128, True),
    ("causal", 8, 16, 8192, 128, True),
    ("agg c=64", 512, 16, 128, 64, False),
    ("agg c=128", 256, 16, 256, 64, False),
]


def impls():
    out = {
        f"sdpa_{name}": (lambda q, k, v, c, b=backend: _sdpa(q, k, v, c, b))
        for name, backend in [
            ("cudnn", SDPBackend.CUDNN_ATTENTION),
            ("flash", SDPBackend.FLASH_ATTENTION),
            ("efficient", SDPBackend.EFFICIENT_ATTENTION),
        ]
    }
    if flash_attn_func is not None:
        out["flash_attn"] = lambda q, k, v, c: flash_attn_func(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=c
        ).transpose(1, 2)
    out["selector"] = lambda q, k, v, c: attention(q, k, v, causal=c)
    return out


def _sdpa(q, k, v, causal, backend):
    with sdpa_kernel(backend):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench_attention.json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_attention.py needs a CUDA GPU")
    rows = []
    for label, B, H, L, D, causal in SHAPES:
        q, k, v = (torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        do = torch.randn_like(q)
        flops = 3.5 * 4 * B * H * L * L * D * (0.5 if causal else 1.0)
        for name, fn in impls().items():
            row = dict(shape=label, B=B, H=H, L=L, D=D, causal=causal, impl=name)
            try:
                ms = triton.testing.do_bench(
                    lambda: fn(q, k, v, causal).backward(do), warmup=10, rep=50, grad_to_none=[q, k, v],
                    return_mode="median",
                )
                row.update(ms=ms, tflops=flops / ms / 1e9)
            except torch.OutOfMemoryError:
                row["error"] = OOM
            except RuntimeError as e:  # a backend that refuses the shape
                row["error"] = str(e).splitlines()[0][:100]
            torch.cuda.empty_cache()
            rows.append(row)
            print(json.dumps(row), flush=True)
    with open(args.out, "w") as f:
        json.dump(dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows), f, indent=1)
    print("| shape | B×H×L×D | impl | fwd+bwd ms | TFLOP/s | % of fastest backend |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        dims = f"{r['B']}×{r['H']}×{r['L']}×{r['D']}"
        same = [x["ms"] for x in rows if x["shape"] == r["shape"] and x["L"] == r["L"] and "ms" in x and x["impl"] != "selector"]
        pct = f"{100 * min(same) / r['ms']:.0f}%" if same and "ms" in r else ""
        res = f"{r['ms']:.2f} | {r['tflops']:.0f} | {pct}" if "ms" in r else f"{r['error']} | |"
        print(f"| {r['shape']} | {dims} | {r['impl']} | {res} |")


if __name__ == "__main__":
    main()
