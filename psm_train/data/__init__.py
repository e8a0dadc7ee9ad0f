"""Data sources: synthetic tasks (MQAR, S5) and token shards, selected by ``data.task`` in the config.

The names below load on first use (psm_train.data.tasks imports torch): the CLI's parser imports
light submodules such as psm_train.data.corpora, and ``psm-train --help`` must not wait for torch.
"""

_FROM_TASKS = ("TASKS", "STREAMS", "TASK_CONFIGS", "DataSource", "SyntheticSource", "build_source")


def __getattr__(name: str):
    if name in _FROM_TASKS:
        from psm_train.data import tasks

        return getattr(tasks, name)
    raise AttributeError(f"module 'psm_train.data' has no attribute {name!r}")


__all__ = list(_FROM_TASKS)
