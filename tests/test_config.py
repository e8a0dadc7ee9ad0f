"""Config loading: overrides reach every field; bad input stops with the file and field named."""

from pathlib import Path

import pytest

from psm_train.config import ConfigError, config_from_dict, load_config, resume_differences
from psm_train.models import MODEL_CONFIGS

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    cfg = load_config(path)
    assert cfg.model.name in MODEL_CONFIGS
    assert cfg.to_dict()["model"]["name"] == cfg.model.name


def test_round_trip_through_dict():
    cfg = load_config("configs/mqar_psm_c32.yaml", ["train.lr=1e-3", "model.d_model=32", "data.eval_seq_lens=[128, 256]"])
    again = config_from_dict(cfg.to_dict(), "round trip")
    assert again == cfg
    assert again.train.lr == 1e-3 and isinstance(again.train.lr, float)


def test_overrides_reach_nested_fields_and_switch_models(tmp_path):
    path = tmp_path / "small.yaml"
    path.write_text("model: {name: transformer_psm, d_model: 64}\ndata: {task: s5}\n")
    cfg = load_config(path, [
        "model.name=transformer", "model.d_model=32", "model.n_layers=3", "train.steps=7",
        "model.sliding_window=8", "wandb.enabled=true",
    ])
    assert cfg.model.name == "transformer"
    assert (cfg.model.config.d_model, cfg.model.config.n_layers, cfg.model.config.sliding_window) == (32, 3, 8)
    assert cfg.train.steps == 7 and cfg.wandb.enabled
    assert cfg.name == "small" and cfg.run_dir == "runs/small"
    with pytest.raises(ConfigError, match=r"small.yaml: model.chunk_size: unknown field"):
        load_config(path, ["model.name=transformer", "model.chunk_size=8"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.stepz=3", r"train\.stepz: unknown field"),
        ("model.d_modle=3", r"model\.d_modle: unknown field"),
        ("train.steps=abc", r"train\.steps: expected an integer, got 'abc'"),
        ("train.steps=-1", r"train\.steps: expected a positive integer"),
        ("train.lr=fast", r"train\.lr: expected a number"),
        ("model.name=rnn", r"model\.name: unknown model 'rnn'"),
        ("model.n_heads=3", r"model\.n_heads: d_model / n_heads"),
        ("data.num_kv_pairs=0", r"data\.num_kv_pairs"),
        ("wandb.enabled=maybe", r"wandb\.enabled: expected true or false"),
        ("train.precision=fp8", r"train\.precision: expected one of"),
        ("optimizer.lr=1", r"optimizer: unknown section"),
        ("train.lr", r"expected key=value"),
    ],
)
def test_bad_values_name_the_file_and_field(override, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_config("configs/mqar_tiny.yaml", [override])
    assert "mqar_tiny.yaml" in str(info.value)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)
    no_model = tmp_path / "no_model.yaml"
    no_model.write_text("data: {task: mqar}\n")
    with pytest.raises(ConfigError, match=r"no_model.yaml: model.name: required"):
        load_config(no_model)


def test_unparsable_override_names_the_override():
    with pytest.raises(ConfigError, match=r"mqar_tiny.yaml: --set 'train.lr=\[1,2': the value of train.lr is not valid YAML"):
        load_config(CONFIGS[0].parent / "mqar_tiny.yaml", ["train.lr=[1,2"])


def test_resume_differences_split_model_from_the_rest():
    path = CONFIGS[0].parent / "mqar_tiny.yaml"
    saved = load_config(path).to_dict()
    now = load_config(path, ["model.d_model=32", "data.vocab_size=128", "model.chunk_size=16", "train.batch_size=8",
                             "data.num_kv_pairs=2", "run_dir=elsewhere"])
    model, other = resume_differences(saved, now)
    assert model == ["model.d_model: 64 (checkpoint) -> 32 (now)", "model.chunk_size: 8 (checkpoint) -> 16 (now)",
                     "data.vocab_size: 64 (checkpoint) -> 128 (now)"]
    assert other == ["data.num_kv_pairs: 4 (checkpoint) -> 2 (now)", "train.batch_size: 64 (checkpoint) -> 8 (now)"]
    assert resume_differences(saved, load_config(path)) == ([], [])
    # A field added after the checkpoint was written counts only where it differs from its default.
    del saved["checkpoint"]["on_save_error"]
    assert resume_differences(saved, load_config(path)) == ([], [])
    assert resume_differences(saved, load_config(path, ["checkpoint.on_save_error=continue"]))[1] == [
        "checkpoint.on_save_error: stop (checkpoint) -> continue (now)"]
