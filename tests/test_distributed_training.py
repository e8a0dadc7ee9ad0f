"""dp x sp training and sharded-checkpoint resume on CPU with gloo, against single-process runs.

Each rank runs the real trainer (psm_train.train.loop.train) in its own process.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from psm_train.config import config_from_dict
from psm_train.train.loop import train
from tests.multiprocess import run_ranks

MODELS = {
    "gla": {"name": "gla", "d_model": 32, "n_layers": 2, "n_heads": 2, "chunk_size": 8, "gate_low_rank_dim": 4},
    "transformer_psm": {"name": "transformer_psm", "d_model": 32, "n_heads": 2, "chunk_size": 4, "agg_layers": 1, "inf_layers": 1},
}


def run_config(run_dir: Path, model: str, steps: int = 8, **sections) -> dict:
    raw = {
        "name": "dist",
        "run_dir": str(run_dir),
        "model": dict(MODELS[model]),
        "data": {"task": "mqar", "vocab_size": 32, "num_kv_pairs": 2, "seq_len": 32},
        "train": {"steps": steps, "batch_size": 8, "lr": 3e-3, "warmup_steps": 2, "log_every": 1, "eval_every": 0,
                  "eval_batches": 1, "eval_batch_size": 8, "device": "cpu", "threads": 1},
    }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return raw


def _train_rank(rank: int, world: int, raw: dict) -> None:
    train(config_from_dict(copy.deepcopy(raw), "test"))


def train_on(world: int, raw: dict) -> list[float]:
    if world == 1:
        train(config_from_dict(copy.deepcopy(raw), "test"))
    else:
        run_ranks(_train_rank, world, raw)
    return losses(Path(raw["run_dir"]))


def losses(run_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


ZERO3 = {"engine": "deepspeed", "zero_stage": 3, "zero3_persistence_threshold": 0}  # tiny parameters partitioned too


@pytest.mark.parametrize(
    "model, world, parallel, steps",
    [
        ("transformer_psm", 2, {"sp": 2}, 8),
        ("gla", 4, {"sp": 2}, 8),  # dp 2 x sp 2
        ("transformer_psm", 4, {"sp": 2, "engine": "deepspeed", "zero_stage": 1, "grad_accum": 2}, 20),
        ("transformer_psm", 4, {"sp": 2, **ZERO3}, 20),
        ("gla", 2, ZERO3, 8),
        ("gla", 2, {"sp": 2, "engine": "deepspeed", "zero_stage": 2, "activation_checkpointing": True}, 8),
        ("transformer_psm", 2, {"grad_accum": 2, "bucket_mb": 0.01}, 8),  # overlapped buckets, the last micro-batch
        ("gla", 2, {"grad_accum": 2, "grad_reduce": "after_backward"}, 8),
    ],
    ids=["psm-sp2", "gla-dp2xsp2", "psm-dp2xsp2-zero1-accum2", "psm-dp2xsp2-zero3", "gla-dp2-zero3",
         "gla-sp2-zero2-ac", "psm-dp2-accum2-overlapped", "gla-dp2-accum2-after-backward"],
)
def test_parallel_training_tracks_single_process(tmp_path, model, world, parallel, steps):
    single = train_on(1, run_config(tmp_path / "single", model, steps=steps))
    multi = train_on(world, run_config(tmp_path / "multi", model, steps=steps, parallel=parallel))
    assert len(multi) == len(single) == steps
    for step, (a, b) in enumerate(zip(multi, single), 1):
        assert abs(a - b) <= 1e-4 * abs(b), f"step {step}: {a} vs single-process {b}"


@pytest.mark.parametrize(
    "world, parallel, dropout", [(2, {}, 0.0), (4, {"sp": 2}, 0.0), (2, {}, 0.3)], ids=["dp2", "dp2xsp2", "dp2_dropout"]
)
def test_resume_is_bit_exact(tmp_path, capfd, world, parallel, dropout):
    """With dropout, each rank's restored RNG state must give the masks the uninterrupted run drew."""
    raw = run_config(tmp_path / "run", "transformer_psm", steps=12, parallel=parallel, checkpoint={"every": 6})
    raw["model"]["dropout"] = dropout
    straight = train_on(world, raw)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step_*")) == ["step_000000006"]
    (tmp_path / "run" / "final.pt").unlink()
    capfd.readouterr()
    resumed = train_on(world, raw)  # resume: auto picks step 6
    assert "at step 6 (saved by" in capfd.readouterr().out  # a fresh start would give the same losses too
    assert resumed[6:] == straight[6:]  # ==, not approximately
    assert len(resumed) == 12


def test_resume_at_another_world_size_and_engine(tmp_path, capfd):
    """Saved by dp 2 under ZeRO-1; resumed by one process with the torch engine: the curve continues."""
    straight = train_on(1, run_config(tmp_path / "straight", "gla", steps=12))
    raw = run_config(tmp_path / "run", "gla", steps=12, parallel={"engine": "deepspeed", "zero_stage": 1},
                     checkpoint={"every": 6})
    train_on(2, raw)
    (tmp_path / "run" / "final.pt").unlink()
    capfd.readouterr()
    resumed = train_on(1, run_config(tmp_path / "run", "gla", steps=12, checkpoint={"every": 6}))
    assert "at step 6 (saved by 2 ranks)" in capfd.readouterr().out
    for step in range(6, 12):
        assert abs(resumed[step] - straight[step]) <= 1e-4 * straight[step], step


def test_killed_save_resumes_from_the_previous_checkpoint(tmp_path):
    """SIGKILL of rank 1 in the middle of writing its shard: the next start resumes from the last published one."""
    raw = run_config(tmp_path / "run", "gla", steps=8, checkpoint={"every": 3})
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(raw))
    cmd = [sys.executable, "-m", "psm_train", "train", str(config), "--nproc", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.run([*cmd, "--set", "train.steps=4"], env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    (tmp_path / "run" / "final.pt").unlink()
    crashed = subprocess.run(cmd, env={**env, "PSM_TRAIN_CKPT_CRASH_AT": "mid_shard:1"}, capture_output=True, text=True, timeout=300)
    assert crashed.returncode != 0
    assert f"exitcode  : {-signal.SIGKILL}" in crashed.stderr or "SIGKILL" in crashed.stderr, crashed.stderr[-3000:]
    assert list((tmp_path / "run" / "checkpoints").glob("step_000000006")) == []
    resumed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "at step 3" in resumed.stdout, resumed.stdout
    assert (tmp_path / "run" / "final.pt").is_file()


@pytest.mark.parametrize("zero_stage", [0, 2, 3])
def test_deepspeed_in_one_process_tracks_the_torch_engine(tmp_path, zero_stage):
    """`psm-train train` with engine deepspeed and no launcher (what --nproc 1 runs too): a one-rank process group."""
    pytest.importorskip("deepspeed")
    single = train_on(1, run_config(tmp_path / "torch", "gla", steps=6))
    raw = run_config(tmp_path / "ds", "gla", steps=6, parallel={"engine": "deepspeed", "zero_stage": zero_stage})
    config = tmp_path / "ds.yaml"
    config.write_text(yaml.safe_dump(raw))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    done = subprocess.run([sys.executable, "-m", "psm_train", "train", str(config)], env={**env, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "DeepSpeed may compile its C++/CUDA extensions on first use" in done.stdout
    for step, (a, b) in enumerate(zip(losses(tmp_path / "ds"), single, strict=True), 1):
        assert abs(a - b) <= 1e-4 * abs(b), f"step {step}: {a} vs the torch engine's {b}"
