"""MQAR accuracy by the chunk distance between a query and its key, counted by evaluate()."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from psm_train.data import build_source
from psm_train.data.synthetic import IGNORE_INDEX, MQAR, MQARConfig, RecallDistance, S5Config
from psm_train.distributed.layout import ParallelLayout
from psm_train.models import build_model
from psm_train.parallelize import apply_sequence_parallel
from psm_train.train.evaluate import distance_metrics, evaluate
from tests.multiprocess import run_ranks
from tests.test_sequence_parallel import MODELS

VOCAB = 16  # keys in [1, 8), values in [8, 16)


def hand_made_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Two examples of 2 pairs, T = 24; queries at 4, 10 (row 0) and 16, 20 (row 1), keys at 2, 0, 2, 0."""
    inputs = torch.zeros(2, 24, dtype=torch.int64)
    targets = torch.full((2, 24), IGNORE_INDEX)
    inputs[0, :4] = torch.tensor([1, 9, 2, 10])
    inputs[1, :4] = torch.tensor([3, 11, 4, 12])
    for row, t, key, value in ((0, 4, 2, 10), (0, 10, 1, 9), (1, 16, 4, 12), (1, 20, 3, 11)):
        inputs[row, t] = key
        targets[row, t] = value
    return inputs, targets


class Answers(nn.Module):
    """Predicts the fixed ``answers`` [B, T] at the scored positions (the evaluate() model contract)."""

    def __init__(self, answers: torch.Tensor, chunk_size: int | None, vocab: int = VOCAB):
        super().__init__()
        self.answers, self.vocab = answers, vocab
        self.cfg = SimpleNamespace(chunk_size=chunk_size) if chunk_size else SimpleNamespace()
        self.sequence_layout = "contiguous"

    def forward(self, inputs: torch.Tensor, scored: torch.Tensor, **_) -> torch.Tensor:
        return nn.functional.one_hot(self.answers[scored], self.vocab).double()


@pytest.mark.parametrize(
    "model_chunk, task_chunk, acc, scored",
    [
        (8, 0, {"same": 1.0, "1": 1.0, ">=2": 0.5}, {"same": 1, "1": 1, ">=2": 2}),  # the model's chunk
        (8, 4, {"same": None, "1": 1.0, ">=2": 2 / 3}, {"same": 0, "1": 1, ">=2": 3}),  # the task's chunk wins
        (None, 0, {"same": 0.75, "1": None, ">=2": None}, {"same": 4, "1": 0, ">=2": 0}),  # no chunk_size: 64
    ],
)
def test_counts_by_distance(model_chunk, task_chunk, acc, scored) -> None:
    inputs, targets = hand_made_batch()
    answers = targets.clone()
    answers[1, 20] = 8  # the query at 20 (key at 0) is answered wrong
    task = MQAR(MQARConfig(vocab_size=VOCAB, num_kv_pairs=2, seq_len=24, distance_chunk=task_chunk))
    assert task.key_positions(inputs, targets)[targets != IGNORE_INDEX].tolist() == [2, 0, 2, 0]
    result = evaluate(Answers(answers, model_chunk), {24: [(inputs, targets)]}, torch.device("cpu"),
                      recall_distance=task.recall_distance)[24]
    assert result["acc"] == 0.75 and result["scored"] == 4
    assert result["distance_chunk"] == (task_chunk or model_chunk or 64)
    assert result["acc_by_distance"] == acc
    assert result["scored_by_distance"] == scored
    names = dict(zip(("same", "1", ">=2"), ("acc_d0", "acc_d1", "acc_d2+")))
    flat = {names[k]: v for k, v in acc.items() if v is not None}
    assert distance_metrics(result) == flat
    assert {k: result[k] for k in ("acc_d0", "acc_d1", "acc_d2+") if k in result} == flat


def test_generated_batches_counted_in_plain_python() -> None:
    """On a drawn batch (uniform placement, random filler) the counts equal a plain-Python count."""
    source = build_source("mqar", MQARConfig(vocab_size=64, num_kv_pairs=4, seq_len=64, query_placement="uniform",
                                             filler="random", distance_chunk=16), seed=0)
    assert isinstance(source.recall_distance, RecallDistance)
    inputs, targets = source.eval_sets(1, 8)[64][0]
    answers = torch.where(torch.arange(64) % 4 == 0, targets, 0)  # right exactly at positions divisible by 4
    result = evaluate(Answers(answers, 32, vocab=64), {64: [(inputs, targets)]}, torch.device("cpu"),
                      recall_distance=source.recall_distance)[64]
    correct, scored = [0, 0, 0], [0, 0, 0]
    for x, y in zip(inputs.tolist(), targets.tolist()):
        context_keys = x[0:8:2]
        for t, value in enumerate(y):
            if value != IGNORE_INDEX:
                key_at = 2 * context_keys.index(x[t])
                bucket = min(t // 16 - key_at // 16, 2)
                scored[bucket] += 1
                correct[bucket] += t % 4 == 0
    assert result["distance_chunk"] == 16
    assert list(result["scored_by_distance"].values()) == scored and sum(scored) == 32
    assert list(result["acc_by_distance"].values()) == [c / s if s else None for c, s in zip(correct, scored)]
    assert scored[2] > 0  # uniform placement reaches two chunks and more


def test_other_tasks_have_no_recall_distance() -> None:
    assert build_source("s5", S5Config(), seed=0).recall_distance is None


def mqar_sets() -> tuple[MQAR, dict[int, list[tuple[torch.Tensor, torch.Tensor]]]]:
    task = MQAR(MQARConfig(vocab_size=37, num_kv_pairs=4, seq_len=64, query_placement="uniform", filler="random",
                           distance_chunk=16))
    return task, {64: [task.make_batch(2, 64, torch.Generator().manual_seed(i)) for i in range(3)]}


def _by_distance_on_ranks(rank: int, world: int, want: dict) -> None:
    layout = ParallelLayout(rank, world, sp=2)
    torch.manual_seed(0)
    model = build_model("transformer_psm", MODELS["transformer_psm"], 37).double()
    task, sets = mqar_sets()
    got = evaluate(model, sets, torch.device("cpu"), None, layout, apply_sequence_parallel(model, layout.sequence_parallel()),
                   recall_distance=task.recall_distance)[64]
    for key in ("distance_chunk", "acc_by_distance", "scored_by_distance"):
        assert got[key] == want[key], f"rank {rank} {key}: {got[key]} vs {want[key]}"


def test_dp2_x_sp2_counts_equal_single_process() -> None:
    """Split sequences find keys that lie on the other rank's slice; the counts are summed over the world."""
    torch.manual_seed(0)
    model = build_model("transformer_psm", MODELS["transformer_psm"], 37).double()
    task, sets = mqar_sets()
    want = evaluate(model, sets, torch.device("cpu"), recall_distance=task.recall_distance)[64]
    assert sum(want["scored_by_distance"].values()) == 3 * 2 * 4 and want["scored_by_distance"]["same"] > 0
    run_ranks(_by_distance_on_ranks, 4, want)
