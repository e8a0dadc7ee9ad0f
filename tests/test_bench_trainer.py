"""tools/bench_trainer.py on CPU: the real trainer per configuration in a subprocess, against shards built here."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from psm_train.config import load_config
from psm_train.train.flops import train_flops_per_token
from tests.test_data_train import build_tiny_shards

ROOT = Path(__file__).parent.parent
TOOL = ROOT / "tools" / "bench_trainer.py"


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return build_tiny_shards(tmp_path_factory.mktemp("bench_trainer"))


def bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_tiny_preset_writes_one_row_per_configuration(shards, tmp_path):
    out = tmp_path / "result.json"
    done = bench("--preset", "tiny", "--device", "cpu", "--data", str(shards), "--only", "transformer", "psm_c8",
                 "--steps", "6", "--warmup", "2", "--log-every", "2", "--run-root", str(tmp_path / "runs"),
                 "--out", str(out))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["tool"] == "bench_trainer" and result["preset"] == "tiny" and result["device"] == "cpu"
    assert result["peak_flops"] is None and result["torch"] == torch.__version__
    rows = {r["name"]: r for r in result["rows"]}
    assert set(rows) == {"transformer", "psm_c8"}
    for name, row in rows.items():
        assert row["status"] == "ok" and row["error"] is None, row
        assert row["seq_len"] == 32 and row["batch_size"] == 4 and row["tokens_per_step"] == 128
        assert row["tokens_per_s"] > 0 and row["intervals"] == 2  # the intervals ending at steps 4 and 6
        assert math.isfinite(row["final_loss"]) and row["n_params"] > 0
        assert row["mfu"] is None and row["peak_mem_gib"] is None and row["checkpoint_blocked_s"] is None
        cfg = load_config(ROOT / row["config"], row["overrides"])
        assert row["flops_per_token"] == train_flops_per_token(cfg.model.name, cfg.model.config, 300, 32)
        records = [json.loads(line) for line in (Path(row["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
        steady = sorted(r["tokens_per_s"] for r in records if "tokens_per_s" in r and r["step"] > 2)
        assert row["tokens_per_s"] == pytest.approx((steady[0] + steady[1]) / 2)
    assert rows["transformer"]["model"] == "transformer" and rows["psm_c8"]["model"] == "transformer_psm"
    assert "| psm_c8 | ok |" in done.stdout


def test_profile_reports_time_by_category(shards, tmp_path):
    out = tmp_path / "profile.json"
    done = bench("--preset", "tiny", "--device", "cpu", "--data", str(shards), "--only", "transformer", "--profile",
                 "--profile-steps", "2", "--run-root", str(tmp_path / "runs"), "--out", str(out))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    prof = json.loads(out.read_text())["rows"][0]["profile"]
    assert prof["steps"] == 2 and prof["time"] == "CPU"
    assert prof["categories"]["matmul"] > 0 and prof["categories"]["optimizer"] > 0
    assert 0 < prof["loss_vocab_ms_per_step"] < prof["busy_ms_per_step"]
    assert "| matmul |" in done.stdout


def test_refuses_without_a_gpu_or_shards(shards, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    done = bench("--preset", "tiny", "--data", str(shards))
    assert done.returncode != 0 and "no GPU here" in done.stderr and "--device cpu" in done.stderr
    done = bench("--preset", "tiny", "--device", "cpu")
    assert done.returncode != 0 and "--data DIR" in done.stderr


def test_missing_sequence_length_is_skipped_with_the_command_to_build_it(shards, tmp_path):
    out = tmp_path / "long.json"
    done = bench("--preset", "long", "--device", "cpu", "--data", str(shards), "--only", "gla_4k", "--run-root",
                 str(tmp_path / "runs"), "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    (row,) = json.loads(out.read_text())["rows"]
    assert row["status"] == "skipped" and "--seq-len 4096" in row["error"]


def test_every_preset_configuration_is_a_valid_config():
    sys.path.insert(0, str(ROOT / "tools"))
    import bench_trainer

    for preset, make in bench_trainer.PRESETS.items():
        benches = make()
        assert len({b.name for b in benches}) == len(benches), preset
        for b in benches:
            cfg = load_config(ROOT / b.config, [*b.overrides, "data.manifests=[unused]"])
            assert cfg.train.batch_size >= 1, (preset, b.name)
