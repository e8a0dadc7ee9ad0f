"""Logits at scored positions only (sparse targets such as MQAR's queries) equal the full logits
there, for every model, and training with them follows the same trajectory as scoring everywhere."""

from __future__ import annotations

import json

import pytest
import torch

from psm_train.config import config_from_dict
from psm_train.data.synthetic import MQAR
from psm_train.models import MODELS
from psm_train.train.loop import train
from tests.test_models import SMALL, VOCAB, small_model


@pytest.mark.parametrize("name", sorted(MODELS))
def test_scored_logits_are_the_full_logits_at_those_positions(name):
    model = small_model(name)
    tokens = torch.randint(0, VOCAB, (3, 23), generator=torch.Generator().manual_seed(1))
    scored = torch.rand(3, 23, generator=torch.Generator().manual_seed(2)) < 0.2
    scored[0] = False  # a row without any scored position
    with torch.no_grad():
        full, sparse = model(tokens), model(tokens, scored=scored)
        by_index = model(tokens, scored=scored.nonzero(as_tuple=True))  # the trainer's form: one device sync
    assert sparse.shape == (int(scored.sum()), VOCAB)
    torch.testing.assert_close(sparse, full[scored], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(by_index, sparse, rtol=0, atol=0)


def _mqar_losses(tmp_path, name: str) -> list[float]:
    raw = {
        "name": "mqar", "run_dir": str(tmp_path / name), "model": {"name": "transformer", **SMALL["transformer"]},
        "data": {"task": "mqar", "vocab_size": 64, "num_kv_pairs": 2, "seq_len": 16},
        "train": {"steps": 6, "batch_size": 8, "lr": 3e-3, "warmup_steps": 0, "log_every": 1, "eval_every": 3, "eval_batches": 1,
                  "eval_batch_size": 8, "device": "cpu", "threads": 1},
    }
    train(config_from_dict(raw, "test"))
    records = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r] + [r["eval/len16/loss"] for r in records if "eval/len16/loss" in r]


def test_training_on_scored_positions_matches_scoring_everywhere(tmp_path, monkeypatch):
    sparse = _mqar_losses(tmp_path, "sparse")
    monkeypatch.setattr(MQAR, "sparse_targets", False)
    dense = _mqar_losses(tmp_path, "dense")
    assert len(sparse) == 8
    assert sparse == pytest.approx(dense, rel=1e-5)
