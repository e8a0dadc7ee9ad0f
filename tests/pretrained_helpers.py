"""Tiny trained-looking runs for the export tests, built without training, and a fresh-process runner.

A run here is what training leaves: final.pt (with its vocabulary size), summary.json, and for a
language model the shard directory its config names (tokenizer.json beside the manifest).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from psm_train.cli import main
from psm_train.config import config_from_dict
from psm_train.models import build_model
from psm_train.pretrained import save_checkpoint
from tests.test_models import SMALL

FAMILIES = SMALL  # one tiny config per model family
WORDS = "the cat sat on a mat and the dog ran to it while birds sang".split()


def _write_run(run_dir: Path, raw: dict, vocab_size: int, seed: int) -> torch.nn.Module:
    cfg = config_from_dict(raw, "test")
    torch.manual_seed(seed)
    model = build_model(cfg.model.name, cfg.model.config, vocab_size)
    with torch.no_grad():  # larger weights than the init, so that every layer changes the logits
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.3)
    run_dir.mkdir(parents=True)
    save_checkpoint(run_dir / "final.pt", model.state_dict(), cfg, 7, vocab_size=vocab_size, code_version="0123abc")
    (run_dir / "summary.json").write_text(json.dumps({"steps": 7, "tokens": 7 * 256, "n_params": 1234,
                                                      "eval": {"eval/len32/loss": 5.0, "eval/len32/ppl": 148.4}}))
    return model.eval()


def lm_run(root: Path, name: str = "transformer_psm") -> Path:
    """A language-model run on shards built from random words (a trained byte-level BPE)."""
    rng = np.random.default_rng(0)
    (root / "text").mkdir(parents=True)
    for i in range(8):
        (root / "text" / f"doc{i}.txt").write_text(" ".join(rng.choice(WORDS, 400)))
    main(["data", "build", "--input", str(root / "text" / "doc*.txt"), "--vocab-size", "300", "--seq-len", "32",
          "--shard-samples", "32", "--val-fraction", "0.3", "--workers", "1", "--quiet", "--out", str(root / "shards")])
    vocab = json.loads((root / "shards" / "manifest.json").read_text())["vocab_size"]
    raw = {"name": "lm_tiny", "run_dir": str(root / "run"), "model": {"name": name, **FAMILIES[name]},
           "data": {"task": "shards", "manifests": [str(root / "shards")], "workers": 1}}
    _write_run(root / "run", raw, vocab, seed=0)
    return root / "run"


def synthetic_run(root: Path, name: str) -> Path:
    """A run of model family ``name`` on MQAR (no tokenizer)."""
    raw = {"name": f"mqar_{name}", "run_dir": str(root / name), "model": {"name": name, **FAMILIES[name]},
           "data": {"task": "mqar", "vocab_size": 37, "num_kv_pairs": 2, "seq_len": 32}}
    _write_run(root / name, raw, 37, seed=1)
    return root / name


def run_fresh(code: str, cwd: Path, timeout: int = 300) -> str:
    """Run ``code`` in a new Python process in ``cwd`` (outside the repository, so that its top-level
    ``kernels/`` folder does not shadow the ``kernels`` package transformers imports); returns stdout."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_NO_ADVISORY_WARNINGS="1")
    result = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=timeout, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result.stdout
