"""What an asynchronous sharded save costs the training loop: step time with and without saving.

    python tools/bench_checkpoint.py --d-model 1024 --layers 8 --steps 12 --save-every 3 --json bench_checkpoint.json
    python tools/bench_checkpoint.py --device cuda ...   # the state is staged through reused pinned buffers

One process, the trainer's own pieces: a transformer LM, the torch engine (AdamW), and
`CheckpointStore` saving the engine's canonical state (fp32 parameters and both AdamW moments)
every ``--save-every`` steps. A first pass trains without saving; a second pass trains the same
steps with saves. Reported per save: the time the step was blocked (waiting for the previous
save, then staging a copy of the state), and the time the background thread took to write and
publish it; and the mean step time of both passes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from psm_train.checkpoint.store import CheckpointStore
from psm_train.config import TrainConfig
from psm_train.models import build_model
from psm_train.models.transformer import TransformerConfig
from psm_train.train.engine import TorchEngine

VOCAB = 8192


def train_steps(engine: TorchEngine, steps: int, batch: int, seq_len: int, store: CheckpointStore | None,
                save_every: int, device: torch.device) -> tuple[list[float], list[float]]:
    """Step times (a saving step includes its save() call) and the blocked time of each save."""
    generator = torch.Generator().manual_seed(0)
    step_times, blocked = [], []
    for step in range(1, steps + 1):
        tokens = torch.randint(0, VOCAB, (batch, seq_len + 1), generator=generator).to(device)
        started = time.perf_counter()
        logits = engine.forward(tokens[:, :-1])
        F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
        engine.step(1e-4)
        if store is not None and step % save_every == 0:
            blocked.append(store.save(step, engine.canonical_shard(), {"step": step}))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        step_times.append(time.perf_counter() - started)
    if store is not None:
        store.wait()
    return step_times, blocked


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d-model", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--save-every", type=int, default=3)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--dir", help="where to write the checkpoints (default: a temporary directory)")
    ap.add_argument("--json", default="bench_checkpoint.json")
    args = ap.parse_args()

    torch.manual_seed(0)
    model = build_model("transformer", TransformerConfig(d_model=args.d_model, n_layers=args.layers, n_heads=args.heads),
                        VOCAB).to(args.device)
    n_params = sum(p.numel() for p in model.parameters())
    device = torch.device(args.device)
    engine = TorchEngine(model, TrainConfig(device=device.type))
    print(f"transformer d {args.d_model} x {args.layers} layers: {n_params / 1e6:.1f}M parameters; "
          f"{args.steps} steps of {args.batch} x {args.seq_len} tokens per pass", flush=True)

    plain, _ = train_steps(engine, args.steps, args.batch, args.seq_len, None, args.save_every, device)
    print(f"without saving: {statistics.mean(plain[1:]):.3f} s/step", flush=True)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        store = CheckpointStore(Path(tmp) / "checkpoints", 0, 1, keep_last=1)
        saving, blocked = train_steps(engine, args.steps, args.batch, args.seq_len, store, args.save_every, device)
        store.close()
        write_s = store.write_seconds
        state_bytes = sum(f.stat().st_size for f in (Path(tmp) / "checkpoints").glob("step_*/*"))

    row = {
        "params_M": n_params / 1e6,
        "state_GB": state_bytes / 1e9,
        "saves": len(blocked),
        "step_s_without_saving": statistics.mean(plain[1:]),
        "step_s_with_saving": statistics.mean(saving[1:]),
        "blocked_s_per_save": statistics.mean(blocked),
        "blocked_s_max": max(blocked),
        "write_s_per_save": statistics.mean(write_s),
    }
    print("\n| params | state per save | saves | s/step without | s/step with | blocked per save (max) | write per save |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {row['params_M']:.0f}M | {row['state_GB']:.2f} GB | {row['saves']} | {row['step_s_without_saving']:.3f} | "
          f"{row['step_s_with_saving']:.3f} | {row['blocked_s_per_save']:.3f} s ({row['blocked_s_max']:.3f}) | "
          f"{row['write_s_per_save']:.2f} s |")
    meta = {"date": datetime.date.today().isoformat(), "machine": platform.node(), "cpus": torch.get_num_threads(),
            "torch": torch.__version__, "args": vars(args)}
    Path(args.json).write_text(json.dumps({"meta": meta, "result": row}, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
