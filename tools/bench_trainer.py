"""The trainer benchmark: the real `psm-train train`, one subprocess per configuration, one table + JSON.

    python tools/bench_trainer.py --preset default170m --data data/gpt2-512 --out results.json
    python tools/bench_trainer.py --preset long --data data/gpt2-4096 data/gpt2-16384 data/gpt2-65536
    python tools/bench_trainer.py --preset default170m --data data/gpt2-512 --only transformer --profile

Each configuration is a config file under configs/ plus `--set` overrides, run by
`python -m psm_train train` in its own process (an out-of-memory error or a crash of one does not
stop the rest) under a wall-clock limit. From the run's metrics.jsonl it reports tokens/s (the
median of the logged intervals after --warmup steps), MFU (psm_train.train.flops over the card's
dense bf16 peak), peak GPU memory (`peak_mem_gib`), checkpoint/blocked_s and the final loss.

`--data` takes shard directories (`psm-train data build --out DIR`); each configuration uses the one
whose manifest has its sequence length, and is skipped, saying so, when there is none.

`--profile` runs each selected configuration for a few steps under torch.profiler instead and
prints where the device time goes, by category of operator (see CATEGORIES).

GPU only, unless `--device cpu` (tiny runs, for the tool's own test).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TRANSFORMER, PSM = "configs/lm_transformer_170m.yaml", "configs/lm_psm_170m.yaml"
GLA = ["model.name=gla", "model.n_heads=4"]  # 13 layers at d 768: 170M parameters like the transformer's
MAMBA2 = ["model.name=mamba2", "model.n_heads=null", "model.n_layers=11"]  # 11 layers: 170M


@dataclass
class Bench:
    name: str
    config: str  # relative to the repository root
    seq_len: int
    overrides: list[str] = field(default_factory=list)


def default170m() -> list[Bench]:
    batch = ["train.batch_size=64"]
    return [
        Bench("transformer", TRANSFORMER, 512, batch),
        Bench("transformer_eager", TRANSFORMER, 512, [*batch, "parallel.compile_blocks=false"]),
        Bench("psm_c64", PSM, 512, batch),
        Bench("psm_c64_ac_every2", PSM, 512,  # its saved activations at the transformer's (tools/activation_memory.py)
              [*batch, "parallel.activation_checkpointing=true", "parallel.checkpoint_every=2"]),
        Bench("gla", TRANSFORMER, 512, [*batch, *GLA]),
        Bench("mamba2", TRANSFORMER, 512, [*batch, *MAMBA2]),
    ]


def deepspeed() -> list[Bench]:
    ds = ["train.batch_size=64", "parallel.engine=deepspeed"]
    return [
        Bench("torch_engine", TRANSFORMER, 512, ["train.batch_size=64"]),
        *(Bench(f"zero{s}", TRANSFORMER, 512, [*ds, f"parallel.zero_stage={s}"]) for s in (0, 1, 2)),
        Bench("zero3", TRANSFORMER, 512, [*ds, "parallel.zero_stage=3"]),
        Bench("zero2_offload", TRANSFORMER, 512, [*ds, "parallel.zero_stage=2", "parallel.offload_optimizer=true"]),
        Bench("zero3_offload", TRANSFORMER, 512, [*ds, "parallel.zero_stage=3", "parallel.offload_optimizer=true"]),
    ]


def ckpt() -> list[Bench]:
    return [Bench("transformer_ckpt20", TRANSFORMER, 512, ["train.batch_size=64", "checkpoint.every=20"]),
            Bench("psm_c64_ckpt20", PSM, 512, ["train.batch_size=64", "checkpoint.every=20"])]


def one_b() -> list[Bench]:
    # d 2048, 16 heads, 16 blocks, untied GPT-2 embeddings: about 1.0B parameters.
    size = ["model.d_model=2048", "model.n_heads=16", "train.batch_size=8"]
    return [Bench("transformer_1b", TRANSFORMER, 2048, [*size, "model.n_layers=16"]),
            Bench("psm_c64_1b", PSM, 2048, [*size, "model.agg_layers=1", "model.inf_layers=15"])]


def long() -> list[Bench]:
    """32K tokens per step up to 16K-token sequences; one 64K sequence with activation checkpointing."""
    out = []
    for seq in (4096, 16384, 65536):
        step = [f"train.batch_size={max(1, 32768 // seq)}"]
        if seq > 32768:
            step.append("parallel.activation_checkpointing=true")
        k = f"{seq // 1024}k"
        out += [Bench(f"transformer_{k}", TRANSFORMER, seq, step), Bench(f"psm_c64_{k}", PSM, seq, step),
                Bench(f"gla_{k}", TRANSFORMER, seq, [*step, *GLA])]
    return out


def tiny() -> list[Bench]:
    """Toy models for CPU (the tool's test): the configs' structure at d 32."""
    small = ["model.d_model=32", "model.n_heads=2", "train.batch_size=4", "data.workers=0"]
    return [Bench("transformer", TRANSFORMER, 0, [*small, "model.n_layers=2"]),
            Bench("psm_c8", PSM, 0, [*small, "model.chunk_size=8", "model.inf_layers=1"]),
            Bench("gla", TRANSFORMER, 0, [*small, *GLA, "model.n_heads=2", "model.n_layers=2", "model.chunk_size=8"])]


PRESETS = {"default170m": default170m, "deepspeed": deepspeed, "ckpt": ckpt, "1b": one_b, "long": long, "tiny": tiny}

# Profile categories, by the name of a GPU kernel (a CPU operator on a CPU-only run): the first whose substrings
# occur in the lower-case name wins. A kernel's name does not say which module launched it, so the loss and
# vocabulary projection is reported besides, as the device time spent inside it (see `vocab_scope`).
CATEGORIES = [
    ("communication", ("nccl", "all_reduce", "allreduce", "reduce_scatter", "all_gather", "c10d")),
    ("optimizer", ("adam", "optimizer", "multi_tensor", "_foreach", "clip_grad")),
    ("loss (softmax, cross-entropy)", ("cross_entropy", "crossentropy", "log_softmax", "logsumexp", "nll_loss")),
    ("attention", ("attention", "flash", "fmha", "sdpa", "cudnn_mha", "mha")),
    ("scan kernels", ("chunk_affine", "chunk_cumsum", "state_fwd", "state_bwd", "scores_", "out_fwd", "dqk_", "dv_",
                      "dscores")),
    ("matmul", ("gemm", "matmul", "aten::mm", "aten::bmm", "aten::addmm", "aten::linear", "nvjet", "cutlass",
                "cublas", "xmma", "sm90_", "sm80_")),
    ("elementwise/reduction", ("elementwise", "vectorized", "reduce", "copy", "triton_", "cat", "fill", "mul", "add",
                               "silu", "rsqrt", "pow", "mean", "aten::")),
]
MATMULS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear")


def category(name: str) -> str:
    low = name.lower()
    for label, needles in CATEGORIES:
        if any(n in low for n in needles):
            return label
    return "other"


def vocab_scope(name: str, shapes: str, vocab: int | None) -> bool:
    """A CPU operator whose inclusive device time is the loss and vocabulary projection: the fused linear
    cross-entropy (forward and backward), or a matrix product with the padded vocabulary among its shapes."""
    low = name.lower().replace("_", "")
    if low in ("linearcrossentropy", "linearcrossentropybackward"):
        return True
    return bool(vocab) and low.startswith(tuple(m.replace("_", "") for m in MATMULS)) and str(vocab) in shapes


def gpu_name() -> str | None:
    """The first GPU's name from nvidia-smi (no CUDA context in this process), else torch's."""
    smi = shutil.which("nvidia-smi")
    if smi:
        done = subprocess.run([smi, "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True)
        if done.returncode == 0 and done.stdout.strip():
            return done.stdout.strip().splitlines()[0]
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def manifests_by_length(dirs: list[str]) -> dict[int, tuple[str, int]]:
    """{seq_len: (directory, vocab_size)} of the given shard directories."""
    from psm_train.data.manifest import load_manifest

    out = {}
    for d in dirs:
        m = load_manifest(d)
        if m.seq_len in out:
            raise SystemExit(f"--data: {d} and {out[m.seq_len][0]} both hold {m.seq_len}-token sequences; give one")
        out[m.seq_len] = (d, m.vocab_size)
    return out


def run_overrides(bench: Bench, args, data_dir: str, run_dir: Path) -> list[str]:
    common = [f"run_dir={run_dir}", f"data.manifests=[{data_dir}]", f"train.steps={args.steps}",
              f"train.log_every={args.log_every}", "train.eval_every=0", "train.eval_batches=1",
              "checkpoint.resume=never", f"train.device={args.device}"]
    if args.device == "cpu":
        common += ["train.eval_batch_size=2", "train.threads=1"]
    return [*common, *bench.overrides, *args.set]


def read_records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def summarise(records: list[dict], warmup: int) -> dict:
    """Tokens/s: the median of the intervals logged after the warm-up steps (each record's rate covers the steps
    since the previous record); the rest from the last record that has it."""
    timed = [r for r in records if "tokens_per_s" in r]
    steady = [r["tokens_per_s"] for r in timed if r["step"] > warmup] or [r["tokens_per_s"] for r in timed[-1:]]
    mem = [r["peak_mem_gib"] for r in records if "peak_mem_gib" in r]
    blocked = [r["checkpoint/blocked_s"] for r in records if "checkpoint/blocked_s" in r]
    losses = [r["loss"] for r in records if "loss" in r]
    return {"tokens_per_s": statistics.median(steady) if steady else None, "intervals": len(steady),
            "peak_mem_gib": max(mem) if mem else None, "checkpoint_blocked_s": blocked or None,
            "final_loss": losses[-1] if losses else None}


def failure(stderr: str) -> tuple[str, str]:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    last = lines[-1] if lines else "no output"
    if "OutOfMemoryError" in stderr or "out of memory" in stderr:
        return "oom", last
    return "failed", last


def run_one(cmd: list[str], limit_s: float, log: Path) -> tuple[str, str | None, float]:
    """Run cmd in its own session (killed whole at the limit); returns (status, error, wall seconds)."""
    start = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            rc = proc.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return "timeout", f"killed after {limit_s:.0f} s", time.perf_counter() - start
    wall = time.perf_counter() - start
    if rc != 0:
        status, error = failure(log.read_text(errors="replace"))
        return status, error, wall
    return "ok", None, wall


def measure(bench: Bench, args, data: dict[int, tuple[str, int]], peak: float | None) -> dict:
    from psm_train.config import load_config
    from psm_train.train.flops import mfu, train_flops_per_token

    seq_len = bench.seq_len or next(iter(data))
    row = {"name": bench.name, "config": bench.config, "overrides": [*bench.overrides, *args.set], "seq_len": seq_len}
    if seq_len not in data:
        have = ", ".join(str(s) for s in sorted(data)) or "none"
        return {**row, "status": "skipped",
                "error": f"no --data directory with {seq_len}-token sequences (have: {have}); build one with "
                         f"`psm-train data build --seq-len {seq_len} --out DIR ...`"}
    data_dir, vocab = data[seq_len]
    run_dir = Path(args.run_root) / bench.name
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    overrides = run_overrides(bench, args, data_dir, run_dir)
    cfg = load_config(ROOT / bench.config, overrides)
    flops = train_flops_per_token(cfg.model.name, cfg.model.config, vocab, seq_len)
    row.update(model=cfg.model.name, vocab_size=vocab, batch_size=cfg.train.batch_size, tokens_per_step=cfg.train.batch_size * seq_len,
               flops_per_token=flops, run_dir=str(run_dir))
    sets = [a for o in overrides for a in ("--set", o)]
    if args.profile:
        cmd = [sys.executable, __file__, "--profile-child", bench.config, "--profile-steps", str(args.profile_steps),
               "--profile-vocab", str(vocab), *sets]
    else:
        cmd = [sys.executable, "-m", "psm_train", "train", bench.config, *sets]
    status, error, wall = run_one(cmd, args.time_limit, run_dir / "output.log")
    row.update(status=status, error=error, wall_s=wall)
    if args.profile:
        table = run_dir / "profile.json"
        row["profile"] = json.loads(table.read_text()) if table.is_file() else None
        return row
    result = summarise(read_records(run_dir), args.warmup)
    summary = run_dir / "summary.json"
    if summary.is_file():
        row["n_params"] = json.loads(summary.read_text()).get("n_params")
    tok = result["tokens_per_s"]
    row.update(result, mfu=mfu(tok, flops, peak) if tok and peak else None)
    return row


def fmt(value, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def print_table(rows: list[dict]) -> None:
    print("| configuration | status | tokens/step | tokens/s | MFU | peak GiB | ckpt blocked s (max) | final loss |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        blocked = r.get("checkpoint_blocked_s")
        print(f"| {r['name']} | {r['status']}{'' if not r.get('error') else ': ' + r['error'][:80]} "
              f"| {fmt(r.get('tokens_per_step'), ',')} | {fmt(r.get('tokens_per_s'), ',.0f')} | {fmt(r.get('mfu'), '.1%')} | {fmt(r.get('peak_mem_gib'), '.1f')} "
              f"| {fmt(max(blocked) if blocked else None, '.2f')} | {fmt(r.get('final_loss'), '.4f')} |")


def print_profile(rows: list[dict]) -> None:
    for r in rows:
        prof = r.get("profile")
        print(f"\n{r['name']}: {r['status']}{'' if not r.get('error') else ': ' + r['error']}")
        if not prof:
            continue
        total = sum(prof["categories"].values())
        print(f"{prof['steps']} steps, {prof['wall_ms_per_step']:.1f} ms a step, {prof['busy_ms_per_step']:.1f} ms of "
              f"{prof['time']} time a step ({prof['busy_ms_per_step'] / prof['wall_ms_per_step']:.0%} busy)")
        print("| category | ms a step | share |")
        print("|---|---|---|")
        for label, us in sorted(prof["categories"].items(), key=lambda kv: -kv[1]):
            print(f"| {label} | {us / 1e3 / prof['steps']:.2f} | {us / total:.1%} |")
        vocab = prof["loss_vocab_ms_per_step"]
        print(f"of which inside the loss and vocabulary projection (its matrix products included): {vocab:.2f} ms a step "
              f"({vocab * prof['steps'] * 1e3 / total:.1%})")
        print("| kernel (top 15) | ms a step |")
        print("|---|---|")
        for name, ms in prof.get("top", []):
            print(f"| {name[:100]} | {ms:.2f} |")


# ---- the child that runs the trainer under torch.profiler ----

def profile_child(args) -> None:
    """`psm-train train` in this process, profiled over --profile-steps steps after two warm-up steps; writes
    profile.json into the run directory: device time per category (CPU time on a CPU-only run)."""
    import torch
    from torch.profiler import ProfilerActivity, profile, schedule

    from psm_train.cli import main
    from psm_train.config import load_config
    from psm_train.models.base import padded_vocab
    from psm_train.train import engine as engines

    cfg = load_config(args.profile_child, args.set)
    cuda = torch.cuda.is_available() and cfg.train.device != "cpu"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    warm, active = 2, args.profile_steps
    prof = profile(activities=activities, schedule=schedule(wait=0, warmup=warm, active=active, repeat=1),
                   record_shapes=True)
    clock = {}

    for cls in (engines.TorchEngine, engines.DeepSpeedEngine):  # each optimizer step advances the profiler
        def step(self, lr, _original=cls.step):
            norm = _original(self, lr)
            if cuda:
                torch.cuda.synchronize()
            clock.setdefault("steps", []).append(time.perf_counter())
            prof.step()
            return norm

        cls.step = step
    with prof:
        main(["train", args.profile_child, *(a for o in args.set for a in ("--set", o))])
    stamps = clock.get("steps", [])
    if len(stamps) < warm + active:
        raise SystemExit(f"the run made {len(stamps)} steps; the profile needs {warm + active} (raise --steps)")
    wall_ms = (stamps[warm + active - 1] - stamps[warm - 1]) * 1e3 / active
    from torch.autograd import DeviceType

    vocab = padded_vocab(args.profile_vocab)
    totals: dict[str, float] = {}
    kernels: dict[str, float] = {}
    in_vocab = 0.0
    for evt in prof.key_averages(group_by_input_shape=True):
        if evt.device_type == DeviceType.CPU and vocab_scope(evt.key, str(evt.input_shapes), vocab):
            in_vocab += evt.device_time_total if cuda else evt.cpu_time_total
    for evt in prof.events():
        # On GPU only kernels, copies and memsets count: annotations on the device timeline (compiled graphs,
        # autograd, profiler steps) span many kernels and would count them twice. On CPU the operators' own time.
        if cuda and (evt.device_type == DeviceType.CPU or evt.is_user_annotation):
            continue
        us = evt.self_device_time_total if cuda else evt.self_cpu_time_total
        if us > 0:
            totals[category(evt.name)] = totals.get(category(evt.name), 0.0) + us
            kernels[evt.name] = kernels.get(evt.name, 0.0) + us
    busy_ms = sum(totals.values()) / 1e3 / active
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:15]
    out = {"steps": active, "time": "device" if cuda else "CPU", "wall_ms_per_step": wall_ms,
           "busy_ms_per_step": busy_ms, "loss_vocab_ms_per_step": in_vocab / 1e3 / active, "categories": totals,
           "top": [[name[:120], us / 1e3 / active] for name, us in top]}
    if cuda:
        out["categories"]["idle (data, host, syncs)"] = max(0.0, wall_ms - busy_ms) * 1e3 * active
    (Path(cfg.run_dir) / "profile.json").write_text(json.dumps(out, indent=1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="default170m")
    p.add_argument("--data", nargs="+", default=[], help="shard directories (psm-train data build --out), any lengths")
    p.add_argument("--only", nargs="+", default=[], help="run only these configurations of the preset")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=20, help="steps left out of tokens/s (compilation, autotuning)")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--time-limit", type=float, default=900, help="seconds per configuration, startup included")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak; default: from the GPU's name")
    p.add_argument("--run-root", default="runs/bench_trainer", help="run directories go here, one per configuration")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every configuration")
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    p.add_argument("--profile", action="store_true", help="profile a few steps of each instead of timing them")
    p.add_argument("--profile-steps", type=int, default=5)
    p.add_argument("--profile-child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--profile-vocab", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.profile_child:
        profile_child(args)
        return

    import torch

    device = gpu_name() if args.device == "cuda" else "cpu"
    if args.device == "cuda" and device is None:
        raise SystemExit("bench_trainer: no GPU here; it measures the trainer on a GPU (`--device cpu` runs tiny "
                         "steps on the CPU, for testing the tool)")
    if not args.data:
        raise SystemExit("bench_trainer: --data DIR [DIR ...] is required: shard directories from "
                         "`psm-train data build --seq-len N --out DIR`")
    from psm_train.train.flops import peak_flops

    peak = args.peak_tflops * 1e12 if args.peak_tflops else (peak_flops(device) if args.device == "cuda" else None)
    benches = PRESETS[args.preset]()
    unknown = sorted(set(args.only) - {b.name for b in benches})
    if unknown:
        raise SystemExit(f"--only {unknown[0]}: not in preset {args.preset} ({', '.join(b.name for b in benches)})")
    benches = [b for b in benches if not args.only or b.name in args.only]
    if args.profile and args.steps < args.profile_steps + 3:
        args.steps = args.profile_steps + 3
    args.run_root = str(Path(args.run_root).resolve())  # the runs start in the repository root
    data = manifests_by_length([str(Path(d).resolve()) for d in args.data])
    from psm_train.train.state import code_version

    rows = []
    result = {"tool": "bench_trainer", "preset": args.preset, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "device": device, "peak_flops": peak, "torch": torch.__version__, "code_version": code_version(),
              "steps": args.steps, "warmup": args.warmup, "log_every": args.log_every, "profile": args.profile,
              "rows": rows}
    for bench in benches:
        print(f"{bench.name} ...", flush=True)
        rows.append(measure(bench, args, data, peak))
        r = rows[-1]
        print(f"  {r['status']}" + (f": {r['error']}" if r.get("error") else "")
              + (f", {r['tokens_per_s']:,.0f} tok/s" if r.get("tokens_per_s") else ""), flush=True)
        if args.out:  # after every row: a run stopped from outside keeps what it measured
            Path(args.out).write_text(json.dumps(result, indent=1))
    print()
    print(f"{device}, torch {torch.__version__}, {result['code_version']}, {result['date']}")
    print_profile(rows) if args.profile else print_table(rows)


if __name__ == "__main__":
    main()
