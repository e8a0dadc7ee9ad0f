"""Consolidated models: final.pt, a training checkpoint directory and a safetensors export load the same weights."""

from __future__ import annotations

import torch

from psm_train.cli import main
from psm_train.config import config_from_dict
from psm_train.train.checkpoint import load_checkpoint
from psm_train.train.loop import train
from tests.test_distributed_training import run_config


def test_export_and_every_checkpoint_form_load_the_trained_weights(tmp_path, capsys):
    run_dir = tmp_path / "run"
    train(config_from_dict(run_config(run_dir, "gla", steps=4, checkpoint={"every": 2}), "test"))
    final, cfg, info = load_checkpoint(run_dir)
    assert info["step"] == 4

    main(["export", str(run_dir), "--out", str(tmp_path / "model.safetensors")])
    exported, exported_cfg, exported_info = load_checkpoint(tmp_path / "model.safetensors")
    assert exported_cfg == cfg and exported_info["step"] == 4
    assert exported.head.weight is exported.embed.weight  # the tie survives the export
    tokens = torch.randint(0, 32, (2, 16))
    with torch.no_grad():
        assert torch.equal(exported(tokens), final(tokens))

    at_two, _, at_two_info = load_checkpoint(run_dir / "checkpoints" / "step_000000002")
    assert at_two_info["step"] == 2
    names = dict(final.named_parameters())
    assert any(not torch.equal(p, names[n]) for n, p in at_two.named_parameters())  # two steps earlier: other weights

    main(["export", str(run_dir / "checkpoints" / "step_000000002"), "--out", str(tmp_path / "step2.safetensors")])
    again, _, _ = load_checkpoint(tmp_path / "step2.safetensors")
    for n, p in at_two.named_parameters():
        assert torch.equal(p, dict(again.named_parameters())[n]), n
