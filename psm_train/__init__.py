"""psm-train: training Prefix-Scannable Models and attention baselines."""

__version__ = "0.1.0"
