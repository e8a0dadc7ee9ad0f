"""Evaluation shared by dp x sp ranks (gloo, CPU) returns the single-process numbers on every rank; the group
(S_n sign) accuracy counts what it should."""

from __future__ import annotations

import math

import torch

from psm_train.data import build_source
from psm_train.data.synthetic import IGNORE_INDEX, S5Config
from psm_train.distributed.layout import ParallelLayout
from psm_train.models import build_model
from psm_train.parallelize import apply_sequence_parallel
from psm_train.train.evaluate import evaluate
from tests.multiprocess import run_ranks
from tests.test_sequence_parallel import MODELS, VOCAB


def eval_sets() -> dict[int, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Three batches (uneven over 2 dp ranks) at a length every model splits over sp = 2 (64) and at
    one that only the affine model splits (18: not whole PSM chunks, not divisible by 2·sp for zigzag)."""
    g = torch.Generator().manual_seed(3)
    sets = {}
    for seq_len in (64, 18):
        batches = []
        for _ in range(3):
            inputs = torch.randint(0, VOCAB, (2, seq_len), generator=g)
            targets = torch.randint(0, VOCAB, (2, seq_len), generator=g)
            targets[torch.rand(2, seq_len, generator=g) < 0.3] = IGNORE_INDEX
            batches.append((inputs, targets))
        sets[seq_len] = batches
    return sets


def expected() -> dict[str, dict[int, dict]]:
    out = {}
    for name in ("transformer_psm", "gla", "transformer"):
        torch.manual_seed(0)
        out[name] = evaluate(build_model(name, MODELS[name], VOCAB).double(), eval_sets(), torch.device("cpu"))
    return out


def _evaluate_on_ranks(rank: int, world: int, want: dict) -> None:
    layout = ParallelLayout(rank, world, sp=2)
    sp = layout.sequence_parallel()
    for name, single in want.items():
        torch.manual_seed(0)
        model = build_model(name, MODELS[name], VOCAB).double()
        seen = set()
        # A split sequence's slice comes with its global positions; a whole one without.
        model.register_forward_pre_hook(lambda m, args, kwargs: seen.add((args[0].shape[1], kwargs.get("positions") is not None)),
                                        with_kwargs=True)
        got = evaluate(model, eval_sets(), torch.device("cpu"), None, layout, apply_sequence_parallel(model, sp))
        assert seen == {(32, True), (9, True) if name == "gla" else (18, False)}, f"{name}: {seen}"
        for seq_len, w in single.items():
            g = got[seq_len]
            where = f"rank {rank} {name} @{seq_len}"
            assert g["scored"] == w["scored"] and g["acc"] == w["acc"], where
            assert g["acc_by_position"] == w["acc_by_position"], where
            assert math.isclose(g["loss"], w["loss"], rel_tol=1e-10), f"{where}: {g['loss']} vs {w['loss']}"


def test_dp2_x_sp2_evaluation_equals_single_process():
    run_ranks(_evaluate_on_ranks, 4, expected())


class RunningProductTimes(torch.nn.Module):
    """Predicts the S_n running product composed with a fixed permutation: exact when that is the identity."""

    def __init__(self, table: torch.Tensor, offset: int):
        super().__init__()
        self.table, self.offset = table, offset

    def forward(self, inputs, positions=None, scored=None):
        state = torch.zeros(inputs.shape[0], dtype=torch.int64)
        states = []
        for t in range(inputs.shape[1]):
            state = self.table[inputs[:, t], state]
            states.append(self.table[self.offset, state])
        predicted = torch.stack(states, dim=1)[scored]
        return torch.nn.functional.one_hot(predicted, self.table.shape[0]).float()


def test_group_accuracy_counts_the_right_sign():
    """With S_n's signs as class groups, a model off by an even permutation has accuracy 0 and group accuracy 1;
    off by an odd one, 0 and 0; exact, 1 and 1."""
    source = build_source("s5", S5Config(degree=4, max_len=6, eval_seq_lens=[6]), seed=0)
    sets = source.eval_sets(2, 16)
    perms = source.task.perms
    even_3_cycle, transposition = perms.index((1, 2, 0, 3)), perms.index((1, 0, 2, 3))
    for offset, acc, group_acc in [(0, 1.0, 1.0), (even_3_cycle, 0.0, 1.0), (transposition, 0.0, 0.0)]:
        model = RunningProductTimes(source.task.table, offset)
        result = evaluate(model, sets, torch.device("cpu"), class_groups=source.class_groups)[6]
        assert result["acc"] == acc and result["group_acc"] == group_acc
        assert result["group_acc_by_position"] == [group_acc] * 6
    assert "group_acc" not in evaluate(model, sets, torch.device("cpu"))[6]


def test_long_batches_are_evaluated_a_few_rows_at_a_time(monkeypatch):
    """A batch whose logits would exceed EVAL_LOGITS goes through the model in smaller groups of rows, with
    the same results."""
    from psm_train.train import evaluate as evaluation

    torch.manual_seed(0)
    model = build_model("transformer", MODELS["transformer"], VOCAB).double()
    whole = evaluate(model, eval_sets(), torch.device("cpu"))
    rows = []
    model.register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[0]))
    monkeypatch.setattr(evaluation, "EVAL_LOGITS", 1)
    grouped = evaluate(model, eval_sets(), torch.device("cpu"))
    assert rows and max(rows) == 1
    for seq_len, w in whole.items():
        g = grouped[seq_len]
        assert g["acc_by_position"] == w["acc_by_position"] and g["scored"] == w["scored"]
        assert math.isclose(g["loss"], w["loss"], rel_tol=1e-12)
