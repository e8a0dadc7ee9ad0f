"""The label convention shared by the data sources and the loss."""

IGNORE_INDEX = -100  # a target position that is not scored (PyTorch's cross-entropy default)
