"""Activation memory of a training step, counted on the CPU: the bytes autograd keeps for the backward.

    python tools/activation_memory.py --out results/trainer/activation_memory.json
    python tools/activation_memory.py --only psm_c64 --seq-len 2048

A model's peak training memory is its weights, gradients and optimizer state (fixed) plus what the
forward saves for the backward (per token). This tool builds each configuration's model (the 170M
configs of tools/bench_trainer.py), runs one forward with the loss under bf16 autocast, and counts the
distinct storages the forward saves (`torch.autograd.graph.saved_tensors_hooks`) plus the inputs of
checkpointed blocks (what activation checkpointing keeps). Two batch sizes give the bytes per token
(the slope, the activations) apart from what does not grow with the batch (bf16 copies of the weights).
No GPU is needed and none is used: the count is the model's, not an allocator's, so it leaves out
transient buffers (the peak's workspace) and the CUDA kernels' own choices of what to save.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from psm_train.config import load_config  # noqa: E402
from psm_train.models import build_model  # noqa: E402
from psm_train.parallelize import apply_activation_checkpointing  # noqa: E402

GPT2_VOCAB = 50257
AC = ["parallel.activation_checkpointing=true"]
CONFIGS = {  # name: (config, overrides), as tools/bench_trainer.py's 170M rows
    "transformer": ("configs/lm_transformer_170m.yaml", []),
    "transformer_ac": ("configs/lm_transformer_170m.yaml", AC),
    "psm_c64": ("configs/lm_psm_170m.yaml", []),
    "psm_c64_ac_every2": ("configs/lm_psm_170m.yaml", [*AC, "parallel.checkpoint_every=2"]),
    "psm_c64_ac_every3": ("configs/lm_psm_170m.yaml", [*AC, "parallel.checkpoint_every=3"]),
    "psm_c64_ac": ("configs/lm_psm_170m.yaml", AC),
}


def saved_bytes(model: torch.nn.Module, tokens: torch.Tensor) -> int:
    """Bytes of the distinct storages one forward (with the loss) keeps for the backward."""
    storages: dict[int, int] = {}

    def keep(t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        storages.setdefault(storage.data_ptr(), storage.nbytes())

    def pack(t: torch.Tensor) -> torch.Tensor:
        keep(t)
        return t

    def checkpoint_inputs(module, args, kwargs) -> None:  # a checkpointed block keeps its inputs to recompute
        for a in [*args, *kwargs.values()]:
            if isinstance(a, torch.Tensor):
                keep(a)

    hooks = [m.register_forward_pre_hook(checkpoint_inputs, with_kwargs=True)
             for m in model.modules() if type(m).__name__ == "CheckpointWrapper"]
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(tokens, targets=tokens)
    finally:
        for h in hooks:
            h.remove()
    return sum(storages.values())


def measure(config: str, overrides: list[str], seq_len: int, batches: tuple[int, int]) -> dict:
    cfg = load_config(ROOT / config, overrides)
    torch.manual_seed(0)
    model = build_model(cfg.model.name, cfg.model.config, GPT2_VOCAB)
    if cfg.parallel.activation_checkpointing:
        apply_activation_checkpointing(model, cfg.parallel.checkpoint_every)
    b0, b1 = batches
    total = [saved_bytes(model, torch.randint(0, GPT2_VOCAB, (b, seq_len))) for b in batches]
    per_token = (total[1] - total[0]) / ((b1 - b0) * seq_len)
    return {"config": config, "overrides": overrides, "seq_len": seq_len,
            "parameters": sum(p.numel() for p in model.parameters()),
            "saved_kib_per_token": per_token / 1024, "fixed_mib": (total[0] - per_token * b0 * seq_len) / 2**20}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="+", choices=sorted(CONFIGS), help="configurations to measure (default: all)")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batches", type=int, nargs=2, default=(1, 2), metavar=("B0", "B1"),
                    help="the two batch sizes whose difference gives the bytes per token")
    ap.add_argument("--out", type=Path, help="write the rows as JSON")
    args = ap.parse_args(argv)
    if not args.batches[0] < args.batches[1]:
        ap.error(f"--batches: expected B0 < B1, got {args.batches}")
    names = args.only or list(CONFIGS)
    rows = {}
    for name in names:
        rows[name] = measure(*CONFIGS[name], args.seq_len, tuple(args.batches))
        print(f"  measured {name}", file=sys.stderr, flush=True)
    base = rows.get("transformer")
    print(f"{'configuration':<20} {'params':>8} {'KiB/token':>10} {'x transformer':>14} {'fixed MiB':>10}")
    for name, r in rows.items():
        ratio = f"{r['saved_kib_per_token'] / base['saved_kib_per_token']:.2f}" if base else "-"
        print(f"{name:<20} {r['parameters'] / 1e6:>7.0f}M {r['saved_kib_per_token']:>10.1f} {ratio:>14} {r['fixed_mib']:>10.0f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        meta = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "torch": torch.__version__,
                "command": " ".join(["python", "tools/activation_memory.py", *(argv if argv is not None else sys.argv[1:])])}
        args.out.write_text(json.dumps({**meta, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
