"""Training on a task whose length varies from step to step (S5: 2..6 tokens) in one process, and the
shipped S5 (and S3) and MQAR configs (configs/ and configs/results/) run for a few steps on CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from psm_train.config import config_from_dict, load_config
from psm_train.data.synthetic import S5, S5Config
from psm_train.train.loop import train

MODELS = {
    "transformer_psm": {"name": "transformer_psm", "d_model": 16, "n_heads": 2, "chunk_size": 1, "agg_layers": 1,
                        "inf_layers": 1},
    "transformer": {"name": "transformer", "d_model": 16, "n_layers": 1, "n_heads": 2},
    "gla": {"name": "gla", "d_model": 16, "n_layers": 1, "n_heads": 2, "chunk_size": 4, "gate_low_rank_dim": 4},
}
STEPS = 12


@pytest.mark.parametrize("model", sorted(MODELS))
def test_one_process_trains_at_every_length(tmp_path, model):
    """Odd lengths and chunk counts that are not a power of two are fine without sequence parallelism."""
    lengths = {S5(S5Config(min_len=2, max_len=6)).train_seq_len(step) for step in range(STEPS)}
    assert {3, 5, 6} <= lengths  # what the SP rules (zigzag halves, power-of-two chunks per rank) would refuse
    raw = {
        "name": "lengths", "run_dir": str(tmp_path / "run"), "model": MODELS[model],
        "data": {"task": "s5", "min_len": 2, "max_len": 6, "eval_seq_lens": [6, 9]},
        "train": {"steps": STEPS, "batch_size": 4, "log_every": 1, "eval_every": 0, "eval_batches": 1,
                  "eval_batch_size": 4, "device": "cpu", "threads": 1},
    }
    train(config_from_dict(raw, "test"))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, STEPS + 1))
    assert set(json.loads((tmp_path / "run" / "eval.json").read_text())) == {"6", "9"}


CONFIGS = Path(__file__).parent.parent / "configs"
TASK_CONFIGS = sorted(p for folder in (CONFIGS, CONFIGS / "results") for pattern in ("s5_*.yaml", "s3_cpu_*.yaml", "mqar_*.yaml")
                      for p in folder.glob(pattern))


@pytest.mark.parametrize("path", TASK_CONFIGS, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_task_configs_train(tmp_path, path):
    """Every length they train and evaluate at (S5: 2..18, evaluated to 180) goes through the trainer."""
    overrides = [f"run_dir={tmp_path / 'run'}", "train.device=cpu", "train.steps=3", "train.batch_size=2",
                 "train.log_every=1", "train.eval_every=0", "train.eval_batches=1", "train.eval_batch_size=2"]
    cfg = load_config(path, overrides)
    train(cfg)
    evaluated = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert evaluated and set(map(int, evaluated)) >= set(cfg.data.config.eval_seq_lens)
