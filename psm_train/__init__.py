"""psm-train: training Prefix-Scannable Models and attention baselines."""

__version__ = "0.1.0"


def load_pretrained(directory, dtype=None):
    """(model, tokenizer) from a `psm-train export` directory; see `psm_train.pretrained.load_pretrained`.

    Imported on first call, so that ``import psm_train`` (and ``psm-train --help``) does not import torch.
    """
    from psm_train.pretrained import load_pretrained as load

    return load(directory, dtype)
