"""End to end through the CLI: build shards from text, train a tiny model on them, report perplexity."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import yaml

from psm_train.cli import main


def build_tiny_shards(root: Path) -> Path:
    """8 documents of random words, a 300-token BPE, 32-token samples, 30% held out: root/shards."""
    rng = np.random.default_rng(0)
    words = "the cat sat on a mat and the dog ran to it".split()
    for i in range(8):
        (root / f"doc{i}.txt").write_text(" ".join(rng.choice(words, 400)))
    main(["data", "build", "--input", str(root / "doc*.txt"), "--vocab-size", "300", "--seq-len", "32",
          "--shard-samples", "32", "--val-fraction", "0.3", "--workers", "1", "--quiet", "--out", str(root / "shards")])
    return root / "shards"


def test_build_then_train_reports_validation_perplexity(tmp_path, capsys):
    build_tiny_shards(tmp_path)
    config = {
        "name": "lm_tiny",
        "model": {"name": "transformer_psm", "d_model": 32, "n_heads": 2, "chunk_size": 8, "agg_layers": 1, "inf_layers": 1},
        "data": {"task": "shards", "manifests": [str(tmp_path / "shards")], "workers": 1},
        "train": {"steps": 20, "batch_size": 8, "lr": 3e-3, "warmup_steps": 2, "eval_every": 0, "eval_batches": 2,
                  "eval_batch_size": 4, "log_every": 10, "device": "cpu"},
    }
    (tmp_path / "lm.yaml").write_text(yaml.safe_dump(config))
    main(["train", str(tmp_path / "lm.yaml"), "--run-dir", str(tmp_path / "run")])
    result = json.loads((tmp_path / "run" / "eval.json").read_text())["32"]
    assert math.isfinite(result["ppl"]) and math.isclose(result["ppl"], math.exp(result["loss"]))
    assert result["ppl"] < 300  # better than uniform over the vocabulary after 20 steps
    assert result["scored"] == 8 * 32  # every token of the held-out blocks is scored
    main(["eval", str(tmp_path / "run")])
    assert "lm_tiny" in capsys.readouterr().out
