"""The ``data.task`` registry: each task's config dataclass and the class that makes its DataSource."""

from psm_train.data.source import DataSource, SyntheticSource
from psm_train.data.stream import ShardsConfig, ShardStream
from psm_train.data.synthetic import MQAR, S5, MQARConfig, S5Config

TASKS = {"mqar": (MQARConfig, MQAR), "s5": (S5Config, S5), "shards": (ShardsConfig, ShardStream)}
STREAMS = {"shards"}  # tasks whose class is itself a DataSource, not a synthetic generator
TASK_CONFIGS = {name: cfg for name, (cfg, _) in TASKS.items()}


def build_source(task_name: str, task_config, seed: int) -> DataSource:
    _, task_cls = TASKS[task_name]
    if task_name in STREAMS:
        return task_cls(task_config, seed)
    return SyntheticSource(task_cls(task_config), seed)
