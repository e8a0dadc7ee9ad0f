"""Loader throughput of the shards source: tokens/s delivered to one training process per worker count.

    python tools/bench_loader.py --manifest data/stdlib-512 --batch-size 64 --steps 300 --json bench_loader.json

Every step's rows go through the whole path the trainer sees (tar parsing, lane shuffle, stacking,
worker transfer, int64 inputs/targets). The first steps (worker start-up, first shard opens) are
left out of the rate.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time

import torch

from psm_train.data.stream import ShardsConfig, ShardStream

# One H200 training a ~170M-parameter model: ~6 N FLOPs per token at 40% of 800 TFLOP/s (bf16 dense).
H200_TOKENS_PER_S = 0.4 * 800e12 / (6 * 170e6)


def measure(manifest: str, workers: int, batch_size: int, steps: int, warmup: int) -> dict:
    source = ShardStream(ShardsConfig(manifests=[manifest], workers=workers, verify="none"), seed=0)
    batches = source.train_batches(0, batch_size)
    for _ in range(warmup):
        next(batches)
    started = time.perf_counter()
    tokens = 0
    for _ in range(steps):
        inputs, _ = next(batches)
        tokens += inputs.numel()
    seconds = time.perf_counter() - started
    return {"workers": workers, "tokens_per_s": tokens / seconds, "samples_per_s": steps * batch_size / seconds,
            "seq_len": source.seq_len, "batch_size": batch_size, "steps": steps}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--manifest", required=True, help="a shard directory written by psm-train data build")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--batch-size", type=int, default=64, help="rows per step of this process")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()

    torch.set_num_threads(1)
    results = [measure(args.manifest, w, args.batch_size, args.steps, args.warmup) for w in args.workers]
    print(f"{'workers':>7} {'tokens/s':>12} {'samples/s':>10} {'x H200 170M need':>17}")
    for r in results:
        print(f"{r['workers']:>7} {r['tokens_per_s']:>12,.0f} {r['samples_per_s']:>10,.0f} {r['tokens_per_s'] / H200_TOKENS_PER_S:>17.1f}")
    print(f"one H200 training a 170M model consumes about {H200_TOKENS_PER_S:,.0f} tokens/s (6 N FLOPs/token at 40% of 800 TFLOP/s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"date": datetime.date.today().isoformat(), "machine": f"{platform.node()} {platform.processor() or platform.machine()}, "
                       f"{os.cpu_count()} CPUs", "torch": torch.__version__, "manifest": args.manifest,
                       "h200_170m_tokens_per_s": H200_TOKENS_PER_S, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
