"""The export directory: a trained model that needs neither its run directory nor its data.

``psm-train export RUN --out DIR`` writes

- ``config.json``: the model's name and config, vocabulary size, chunk size, the psm-train version
  and source commit, the tokenizer's file name and end-of-text id; also a Hugging Face config
  (``auto_map`` names the modeling file below), so one file serves both loaders;
- ``model.safetensors``: the weights under psm-train's parameter names (fp32, or bf16);
- the tokenizer file copied from the run's data manifest (``tokenizer.json`` or
  ``tokenizer.tiktoken``), plus Hugging Face tokenizer files;
- ``modeling_psm.py`` (`psm_train.hf.modeling_psm`), for ``AutoModelForCausalLM`` with
  ``trust_remote_code=True``;
- ``README.md``: a model card.

Nothing in it names a path of the training run.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

import psm_train
from psm_train.pretrained.model_files import load_checkpoint
from psm_train.pretrained.text_tokenizer import FILE_NAMES, TextTokenizer

EXPORT_FORMAT = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _run_dir_of(source: Path) -> Path | None:
    """The run directory a checkpoint path belongs to (for its summary.json), if it is one."""
    if source.is_dir() and source.name.startswith("step_"):
        return source.parent.parent
    if source.is_dir():
        return source
    return source.parent if source.name == "final.pt" else None


def run_tokenizer_file(cfg) -> Path | None:
    """The tokenizer beside the run's (first) shard manifest; None for synthetic tasks."""
    if cfg.data.name != "shards":
        return None
    from psm_train.data.manifest import load_manifest

    manifest = load_manifest(cfg.data.config.manifests[0])
    return manifest.path.parent / manifest.tokenizer["file"]


def export_pretrained(source: str | Path, out: str | Path, dtype: str = "fp32") -> Path:
    """Write the export directory ``out`` for any checkpoint `load_checkpoint` reads; returns ``out``.

    Written under a temporary name beside ``out`` and renamed, so a failed export leaves nothing.
    """
    from safetensors.torch import save_model

    from psm_train.hf import write_hf_files
    from psm_train.pretrained.model_card import model_card
    from psm_train.train.state import code_version

    if dtype not in DTYPES:
        raise ValueError(f"--dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")
    source, out = Path(source), Path(out)
    if out.exists():
        raise FileExistsError(f"--out {out}: already exists; choose a new directory")
    model, cfg, info = load_checkpoint(source)
    tokenizer_path = run_tokenizer_file(cfg)
    tokenizer = TextTokenizer(tokenizer_path) if tokenizer_path else None
    if tokenizer is not None and tokenizer.vocab_size != model.vocab_size:
        raise ValueError(f"{tokenizer_path}: tokenizer has {tokenizer.vocab_size} tokens, the model {model.vocab_size}")
    run_dir = _run_dir_of(source)
    summary_file = run_dir / "summary.json" if run_dir else None
    summary = json.loads(summary_file.read_text()) if summary_file and summary_file.is_file() else {}
    if summary.get("steps") != info["step"]:
        summary = {}  # the summary describes the run's end, not this earlier checkpoint

    model_cfg = dataclasses.asdict(cfg.model.config)
    config = {
        "psm_export_format": EXPORT_FORMAT,
        "psm_model": cfg.model.name,
        "psm_model_config": model_cfg,
        "vocab_size": model.vocab_size,
        "chunk_size": model_cfg.get("chunk_size"),
        "psm_train_version": psm_train.__version__,
        "psm_train_commit": info.get("code_version") or code_version(),
        "step": info["step"],
        "tokens": summary.get("tokens", info.get("tokens")),
        "dtype": str(DTYPES[dtype]).removeprefix("torch."),
        "tokenizer_file": FILE_NAMES[tokenizer.kind] if tokenizer else None,
        "eot_token_id": tokenizer.eot_id if tokenizer else None,
    }

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        # save_model drops the duplicate names of tied weights; loading restores the tie.
        save_model(model.to(DTYPES[dtype]), str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        if tokenizer is not None:
            shutil.copyfile(tokenizer.path, tmp / config["tokenizer_file"])
        config = write_hf_files(tmp, config, tokenizer)
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=1) + "\n")
        (tmp / "README.md").write_text(model_card(config, cfg, summary))
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_export_config(directory: str | Path) -> dict[str, Any]:
    """config.json of an export directory, checked for the fields psm-train reads."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: no {CONFIG_FILE}; expected a directory written by `psm-train export`")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if config.get("psm_export_format") != EXPORT_FORMAT:
        raise ValueError(f"{path}: psm_export_format: expected {EXPORT_FORMAT}, got {config.get('psm_export_format')!r}")
    for key, kind in (("psm_model", str), ("psm_model_config", dict), ("vocab_size", int)):
        if not isinstance(config.get(key), kind):
            raise ValueError(f"{path}: {key}: expected a {kind.__name__}, got {config.get(key)!r}")
    return config


def build_exported_model(config: dict[str, Any], where: str) -> nn.Module:
    """The model an export's config describes, with freshly initialised weights."""
    from psm_train.config import ConfigError, build_dataclass
    from psm_train.models import MODEL_CONFIGS, build_model

    name = config["psm_model"]
    if name not in MODEL_CONFIGS:
        raise ValueError(f"{where}: psm_model: unknown model {name!r} (known: {', '.join(sorted(MODEL_CONFIGS))})")
    try:
        model_cfg = build_dataclass(MODEL_CONFIGS[name], config["psm_model_config"], "psm_model_config")
    except ConfigError as e:
        raise ValueError(f"{where}: {e}") from None
    return build_model(name, model_cfg, config["vocab_size"])


def load_weights(model: nn.Module, path: Path) -> None:
    """Load model.safetensors (psm-train's parameter names) into ``model``; a tied weight is stored under
    one of its names only."""
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    aliases: dict[int, list[str]] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        aliases.setdefault(id(t), []).append(name)
    for names in aliases.values():
        stored = [n for n in names if n in tensors]
        for n in names:
            if n not in tensors and stored:
                tensors[n] = tensors[stored[0]]
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{path}: the weights do not fit the model its config.json describes: {e}") from None


def load_pretrained(directory: str | Path, dtype: torch.dtype | None = None) -> tuple[nn.Module, TextTokenizer | None]:
    """(model in eval mode on CPU, its tokenizer or None) from an export directory.

    The model is the psm-train model (`psm_train.models.CausalLM`): ``model(tokens)`` gives logits,
    ``model.init_generation(batch)`` an online state. Weights load as fp32 unless ``dtype`` is given.
    """
    directory = Path(directory)
    config = read_export_config(directory)
    model = build_exported_model(config, str(directory / CONFIG_FILE))
    load_weights(model, directory / WEIGHTS_FILE)
    if dtype is not None:
        model.to(dtype)
    tokenizer = TextTokenizer(directory / config["tokenizer_file"]) if config.get("tokenizer_file") else None
    return model.eval(), tokenizer


def load_for_inference(path: str | Path, overrides: list[str] = ()) -> tuple[nn.Module, TextTokenizer | None, Any]:
    """(model, tokenizer or None, run config or None) of an export directory or of any checkpoint
    `load_checkpoint` reads (the tokenizer then comes from the run's shard manifest)."""
    path = Path(path)
    if (path / CONFIG_FILE).is_file():
        if overrides:
            raise ValueError("--set: an export directory has no training config to override")
        return (*load_pretrained(path), None)
    model, cfg, _ = load_checkpoint(path, overrides)
    tokenizer_file = run_tokenizer_file(cfg)
    return model, TextTokenizer(tokenizer_file) if tokenizer_file else None, cfg
