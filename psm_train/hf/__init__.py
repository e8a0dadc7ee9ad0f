"""Hugging Face files of an export directory: the modeling file, its config keys, the tokenizer files.

Writing them needs no transformers; loading them (`modeling_psm`) does: ``pip install 'psm-train[hf]'``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

MODELING_FILE = "modeling_psm.py"


def write_hf_files(directory: Path, config: dict[str, Any], tokenizer) -> dict[str, Any]:
    """Copy the modeling file into ``directory``, write tokenizer_config.json (and, for a tiktoken
    file, a converted tokenizer.json); return ``config`` with the transformers keys added."""
    from psm_train.data.tokenizer import EOT

    shutil.copyfile(Path(__file__).with_name(MODELING_FILE), directory / MODELING_FILE)
    hf = {
        "model_type": "psm_train",
        "architectures": ["PSMForCausalLM"],
        "auto_map": {"AutoConfig": "modeling_psm.PSMConfig", "AutoModelForCausalLM": "modeling_psm.PSMForCausalLM"},
        "tie_word_embeddings": False,  # psm-train ties (or not) inside the model; transformers leaves it alone
    }
    if tokenizer is not None:
        hf.update(eos_token_id=tokenizer.eot_id, bos_token_id=tokenizer.eot_id, pad_token_id=tokenizer.eot_id)
        if tokenizer.kind == "tiktoken":
            from psm_train.hf.tiktoken_conversion import tiktoken_to_tokenizers

            tiktoken_to_tokenizers(tokenizer.path).save(str(directory / "tokenizer.json"))
        (directory / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "eos_token": EOT, "bos_token": EOT, "pad_token": EOT, "unk_token": None,
            "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
        }, indent=1) + "\n")
    return {**config, **hf}
