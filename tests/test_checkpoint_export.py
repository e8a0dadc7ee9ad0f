"""Whole models: final.pt, a training checkpoint directory and exports load the same weights; an export
directory stands alone (run directory and data deleted) and names no path of the run."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from psm_train.cli import main
from psm_train.config import config_from_dict
from psm_train.pretrained import load_checkpoint, load_pretrained
from tests.pretrained_helpers import lm_run, run_fresh


def test_every_checkpoint_form_loads_the_trained_weights(tmp_path):
    from psm_train.train.loop import train
    from tests.test_distributed_training import run_config

    run_dir = tmp_path / "run"
    train(config_from_dict(run_config(run_dir, "gla", steps=4, checkpoint={"every": 2}), "test"))
    final, cfg, info = load_checkpoint(run_dir)
    assert info["step"] == 4
    at_two, _, at_two_info = load_checkpoint(run_dir / "checkpoints" / "step_000000002")
    assert at_two_info["step"] == 2
    names = dict(final.named_parameters())
    assert any(not torch.equal(p, names[n]) for n, p in at_two.named_parameters())  # two steps earlier: other weights

    main(["export", str(run_dir / "checkpoints" / "step_000000002"), "--out", str(tmp_path / "step2")])
    again, tokenizer = load_pretrained(tmp_path / "step2")
    assert tokenizer is None  # MQAR: token ids only
    assert again.head.weight is again.embed.weight  # the tie survives the export
    for n, p in at_two.named_parameters():
        assert torch.equal(p, dict(again.named_parameters())[n]), n


def test_export_stands_alone_in_a_fresh_process(tmp_path):
    run_dir = lm_run(tmp_path / "work")
    model, _, _ = load_checkpoint(run_dir)
    tokens = torch.randint(0, model.vocab_size, (2, 23), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(tokens)
    main(["export", str(run_dir), "--out", str(tmp_path / "model")])
    shutil.rmtree(tmp_path / "work")  # the run directory and its data
    torch.save(tokens, tmp_path / "tokens.pt")

    for f in (tmp_path / "model").iterdir():
        text = f.read_bytes()
        assert str(tmp_path).encode() not in text, f"{f.name} names a path of the run"
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["psm_model"] == "transformer_psm" and config["vocab_size"] == model.vocab_size
    assert config["chunk_size"] == 4 and config["psm_train_version"] and config["psm_train_commit"] == "0123abc"
    card = (tmp_path / "model" / "README.md").read_text()
    assert "step 7" in card and "eval/len32/ppl: 148.4" in card and "training tokens" in card

    run_fresh("import sys, psm_train\n"
              "assert 'torch' not in sys.modules  # psm_train.load_pretrained imports it on first call\n"
              "import torch\n"
              "model, tok = psm_train.load_pretrained('model')\n"
              "with torch.no_grad():\n"
              "    torch.save(model(torch.load('tokens.pt')), 'logits.pt')\n"
              "assert tok.decode(tok.encode('the cat sat')) == 'the cat sat'\n", tmp_path)
    assert torch.equal(torch.load(tmp_path / "logits.pt"), expected)


def test_bf16_export_and_refusals(tmp_path):
    run_dir = lm_run(tmp_path / "work")
    model, _, _ = load_checkpoint(run_dir)
    main(["export", str(run_dir), "--out", str(tmp_path / "bf16"), "--dtype", "bf16"])
    half, _ = load_pretrained(tmp_path / "bf16")
    for (n, p), q in zip(model.named_parameters(), half.parameters()):
        assert torch.equal(p.bfloat16().float(), q), n
    with pytest.raises(SystemExit, match="already exists"):
        main(["export", str(run_dir), "--out", str(tmp_path / "bf16")])
    with pytest.raises(ValueError, match="export directory"):
        load_checkpoint(tmp_path / "bf16")
    config = tmp_path / "bf16" / "config.json"
    config.write_text(config.read_text().replace('"psm_model": "transformer_psm"', '"psm_model": "lstm"'))
    with pytest.raises(ValueError, match=r"config.json: psm_model: unknown model 'lstm'"):
        load_pretrained(tmp_path / "bf16")


def test_single_file_safetensors_of_earlier_versions_still_load(tmp_path):
    from safetensors.torch import save_model

    from tests.pretrained_helpers import synthetic_run

    run = synthetic_run(tmp_path, "gla")
    model, _, info = load_checkpoint(run)
    # What `psm-train export RUN --out m.safetensors` wrote before export directories: the run config as metadata.
    save_model(model, str(tmp_path / "m.safetensors"), metadata={"psm_train_config": json.dumps(info["config"]), "step": "7"})
    old, _, old_info = load_checkpoint(tmp_path / "m.safetensors")
    assert old_info["step"] == 7 and old.head.weight is old.embed.weight
    for (n, p), q in zip(model.named_parameters(), old.parameters()):
        assert torch.equal(p, q), n
