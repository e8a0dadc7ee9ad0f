"""README.md of an export directory: what the model is, what it was trained on, how to load it."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from psm_train.config import RunConfig


def _data_summary(cfg: RunConfig) -> list[str]:
    if cfg.data.name != "shards":
        return [f"- task: synthetic `{cfg.data.name}` (token ids only, no tokenizer)"]
    from psm_train.data.manifest import load_manifest

    lines = []
    for path in cfg.data.config.manifests:
        m = load_manifest(path)
        source = m.raw.get("source", {})
        train = m.raw.get("splits", {}).get("train", {})
        # The description names the builder's input files: keep their names, not the machine's paths.
        description = re.sub(r"/[^\s,;:]+", lambda p: Path(p.group()).name, source.get("description", "token shards"))
        lines.append(f"- {description}: {train.get('tokens', '?')} training tokens in "
                     f"{train.get('documents', '?')} documents, {m.seq_len}-token samples, "
                     f"{m.tokenizer['kind']} tokenizer of {m.vocab_size} tokens (manifest sha256 {m.sha256[:12]})")
    return lines


def model_card(config: dict[str, Any], cfg: RunConfig, summary: dict[str, Any]) -> str:
    """``config``: the export's config.json; ``summary``: the run's summary.json ({} if unknown)."""
    evals = summary.get("eval", {})
    eval_lines = [f"- {k}: {v:.4f}" for k, v in sorted(evals.items())] or ["- (no final evaluation recorded)"]
    tokens = config.get("tokens")
    prompt = '--prompt "The"' if config.get("tokenizer_file") else "--prompt-ids 1,2,3"
    return "\n".join([
        f"# {cfg.name}: {config['psm_model']}",
        "",
        f"A `{config['psm_model']}` language model trained with psm-train {config['psm_train_version']} "
        f"(source commit `{config['psm_train_commit']}`), exported from step {config['step']}"
        + (f" after {tokens:,} training tokens." if tokens else "."),
        "",
        "## Model",
        "",
        f"- vocabulary: {config['vocab_size']} tokens; chunk size: {config.get('chunk_size')}; weights: {config['dtype']}",
        f"- parameters: {summary['n_params']:,}" if "n_params" in summary else "- parameters: see model.safetensors",
        "- config: `psm_model_config` in config.json",
        "",
        "## Training data",
        "",
        *_data_summary(cfg),
        "",
        "## Final evaluation (held-out shards)",
        "",
        *eval_lines,
        "",
        "## Use",
        "",
        "Every route below imports `psm_train`: install psm-train first (`pip install 'psm-train[hf]'` for the",
        "transformers and lm-evaluation-harness routes).",
        "",
        "```",
        f"psm-train generate . {prompt} --max-new-tokens 64 --temperature 0.8 --top-p 0.95",
        "```",
        "",
        "```python",
        "import psm_train",
        "model, tokenizer = psm_train.load_pretrained('.')",
        "",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "hf_model = AutoModelForCausalLM.from_pretrained('.', trust_remote_code=True)",
        "hf_tokenizer = AutoTokenizer.from_pretrained('.', trust_remote_code=True)  # else it asks about the config's code",
        "```",
        "",
    ])
