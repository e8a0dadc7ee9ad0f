"""Resume at another data-parallel size, SP degree or engine: the saved weights and AdamW moments are what
the new world continues from (CPU, gloo, several processes)."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from psm_train.checkpoint.store import CheckpointStore
from psm_train.config import config_from_dict
from psm_train.data import build_source
from psm_train.labels import IGNORE_INDEX
from psm_train.models import build_model
from psm_train.train.engine import build_engine, merge_canonical
from tests.multiprocess import run_ranks
from tests.test_distributed_training import losses, run_config, train_on

ZERO3 = {"engine": "deepspeed", "zero_stage": 3, "zero3_persistence_threshold": 0}


def saved_state(run_dir: Path, step: int) -> dict:
    store = CheckpointStore(run_dir / "checkpoints", 0, 1)
    try:
        ckpt = store.load(step)
        return merge_canonical([ckpt.read(r)["engine"] for r in range(ckpt.world_size)])
    finally:
        store.close()


def loss_of(state: dict, raw: dict, step: int) -> float:
    """Mean loss over the scored tokens of the global batch of (1-based) ``step``, in one process, from the
    weights in ``state``: what the first step after resuming must log."""
    cfg = config_from_dict(copy.deepcopy(raw), "test")
    source = build_source(cfg.data.name, cfg.data.config, cfg.train.seed)
    model = build_model(cfg.model.name, cfg.model.config, source.vocab_size)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(state["params"][name])
    inputs, targets = next(source.train_batches(step - 1, cfg.train.batch_size))
    with torch.no_grad():
        logits = model(inputs)
    return float(F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX))


def resume_first_loss(raw: dict, world: int, parallel: dict) -> float:
    """Resume ``raw``'s run (its final.pt removed) with another layout; the loss logged at the step after."""
    (Path(raw["run_dir"]) / "final.pt").unlink()
    resumed = copy.deepcopy(raw)
    resumed["parallel"] = parallel
    return train_on(world, resumed)[6]


@pytest.fixture(scope="module")
def zero3_dp2_run(tmp_path_factory) -> Path:
    """A gla run of 7 steps on 2 ZeRO-3 ranks (every parameter partitioned) with a checkpoint at step 6."""
    run_dir = tmp_path_factory.mktemp("zero3") / "run"
    train_on(2, run_config(run_dir, "gla", steps=7, parallel={**ZERO3}, checkpoint={"every": 6}))
    return run_dir


def copy_of(run_dir: Path, tmp_path: Path) -> dict:
    """The config of a private copy of the saved run."""
    shutil.copytree(run_dir, tmp_path / "run")
    return run_config(tmp_path / "run", "gla", steps=7, parallel={**ZERO3}, checkpoint={"every": 6})


def test_zero3_dp2_resumes_at_dp4_and_at_one_process(zero3_dp2_run, tmp_path):
    raw = copy_of(zero3_dp2_run, tmp_path)
    state = saved_state(tmp_path / "run", 6)
    want = loss_of(state, raw, 7)
    for world, parallel in ((4, {**ZERO3}), (1, {})):
        got = resume_first_loss(raw, world, parallel)
        assert abs(got - want) <= 1e-6 * want, f"resumed at {world} ranks {parallel}: {got} vs {want}"


def test_sp2_resumes_at_sp1(tmp_path):
    raw = run_config(tmp_path / "run", "transformer_psm", steps=7, parallel={"sp": 2}, checkpoint={"every": 6})
    train_on(2, raw)
    want = loss_of(saved_state(tmp_path / "run", 6), raw, 7)
    got = resume_first_loss(raw, 1, {})
    assert abs(got - want) <= 1e-6 * want, f"{got} vs {want}"
    assert len(losses(tmp_path / "run")) == 7


def assert_same_state(got: dict, want: dict, where: str) -> None:
    assert got["optimizer_step"] == want["optimizer_step"], where
    for key in ("params", "exp_avg", "exp_avg_sq"):
        assert got[key].keys() == want[key].keys(), (where, key)
        for name, value in want[key].items():
            assert torch.equal(got[key][name], value), f"{where}: {key} of {name} changed"


def load_into_engine(raw: dict, parallel: dict, state: dict, world: int):
    cfg = config_from_dict({**copy.deepcopy(raw), "parallel": parallel}, "test")
    model = build_model(cfg.model.name, cfg.model.config, 32)
    engine = build_engine(model, cfg.train, cfg.parallel, cfg.train.batch_size // world, bf16=False)
    engine.load_canonical(state)
    return engine


def _reload_on_ranks(rank: int, world: int, raw: dict, state: dict) -> None:
    torch.manual_seed(rank)  # the loaded values must not depend on the initial ones
    engine = load_into_engine(raw, {**ZERO3}, state, world)
    parts = [None] * world
    dist.all_gather_object(parts, engine.canonical_shard())
    assert_same_state(merge_canonical(parts), state, f"ZeRO-3 at {world} ranks")


def test_moments_survive_resharding(zero3_dp2_run, tmp_path):
    """Directly: what a ZeRO-3 dp 2 run saved reads back unchanged from 4 ZeRO-3 ranks and from the torch engine."""
    raw = copy_of(zero3_dp2_run, tmp_path)
    state = saved_state(tmp_path / "run", 6)
    assert state["optimizer_step"] == 6 and state["exp_avg"] and state["exp_avg_sq"]
    run_ranks(_reload_on_ranks, 4, raw, state)
    assert_same_state(load_into_engine(raw, {}, state, 1).canonical_shard(), state, "torch engine, 1 process")
