"""parallel.compile_blocks: torch.compile'd transformer blocks train like eager ones, checkpoints unchanged."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

from psm_train.config import ConfigError, config_from_dict
from psm_train.train.loop import train
from tests.multiprocess import run_ranks
from tests.test_distributed_training import losses, run_config


def test_compiled_blocks_match_eager(tmp_path):
    runs, graphs = {}, {}
    for compiled in (False, True):
        raw = run_config(tmp_path / str(compiled), "transformer_psm", steps=3, parallel={"compile_blocks": compiled})
        torch._dynamo.reset()
        counters.clear()
        train(config_from_dict(raw, "test"))
        runs[compiled], graphs[compiled] = losses(tmp_path / str(compiled)), counters["stats"]["unique_graphs"]
    assert graphs[False] == 0 and graphs[True] > 0
    assert len(runs[True]) == 3
    # Inductor fuses and reorders float32 arithmetic: equal up to rounding, not bit for bit.
    assert runs[True] == pytest.approx(runs[False], rel=1e-4)
    eager, compiled = (torch.load(tmp_path / str(c) / "final.pt", weights_only=True) for c in (False, True))
    assert eager["model"].keys() == compiled["model"].keys()


def test_compile_blocks_refused_with_zero3():
    raw = run_config("unused", "transformer_psm", parallel={"compile_blocks": True, "engine": "deepspeed", "zero_stage": 3})
    with pytest.raises(ConfigError, match="compile_blocks"):
        config_from_dict(raw, "test")



def _train_counting_graphs(rank: int, world: int, raw: dict) -> None:
    counters.clear()
    train(config_from_dict(copy.deepcopy(raw), "test"))
    Path(raw["run_dir"], f"graphs_rank{rank}.txt").write_text(str(counters["stats"]["unique_graphs"]))


def test_compiled_blocks_under_zero2_match_eager(tmp_path):
    """Two data-parallel ranks under DeepSpeed ZeRO-2 (gradients and optimizer state partitioned,
    reduced through hooks on the compiled blocks' parameters) train like eager blocks."""
    runs, graphs = {}, {}
    for compiled in (False, True):
        raw = run_config(tmp_path / str(compiled), "transformer_psm", steps=3,
                         parallel={"compile_blocks": compiled, "engine": "deepspeed", "zero_stage": 2})
        run_ranks(_train_counting_graphs, 2, raw)
        runs[compiled] = losses(tmp_path / str(compiled))
        graphs[compiled] = [int((tmp_path / str(compiled) / f"graphs_rank{r}.txt").read_text()) for r in range(2)]
    assert graphs[False] == [0, 0] and min(graphs[True]) > 0
    assert len(runs[True]) == 3
    assert runs[True] == pytest.approx(runs[False], rel=1e-4)
