"""MQAR and S5 batches checked example by example in plain Python."""

import itertools
import math
import time
from pathlib import Path

import pytest
import torch

from psm_train.config import ConfigError, load_config
from psm_train.data import build_source
from psm_train.data.synthetic import IGNORE_INDEX, MQAR, S5, MQARConfig, S5Config, distance_buckets, permutation_table

MQAR_CONFIGS = [
    MQARConfig(vocab_size=64, num_kv_pairs=4, seq_len=32, power_a=0.01),  # 32 + 1 - 8 = 25: odd
    MQARConfig(vocab_size=64, num_kv_pairs=4, seq_len=33, power_a=1.0),  # even, uniform placement
    MQARConfig(vocab_size=10, num_kv_pairs=4, seq_len=16, power_a=0.5),  # every slot and key used
    MQARConfig(vocab_size=8192, num_kv_pairs=8, seq_len=256),
    MQARConfig(vocab_size=4, num_kv_pairs=1, seq_len=5, power_a=2.0),
    MQARConfig(vocab_size=64, num_kv_pairs=4, seq_len=40, query_placement="uniform", filler="random"),
    MQARConfig(vocab_size=10, num_kv_pairs=4, seq_len=16, filler="random"),  # every value used
]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def check_mqar_example(inputs: list[int], targets: list[int], cfg: MQARConfig) -> list[int]:
    """Assert one example is well formed; return its query slot indices."""
    d, half = cfg.num_kv_pairs, cfg.vocab_size // 2
    context = inputs[: 2 * d]
    keys, values = context[0::2], context[1::2]
    assert len(set(keys)) == d
    assert all(1 <= k < half for k in keys)
    assert all(half <= v < cfg.vocab_size for v in values)
    answer = dict(zip(keys, values))

    scored = [t for t, y in enumerate(targets) if y != IGNORE_INDEX]
    assert len(scored) == d
    assert sorted(inputs[t] for t in scored) == sorted(keys)  # each key queried once
    slots = []
    for t in scored:
        assert t >= 2 * d and (t - 2 * d) % 2 == 0
        assert targets[t] == answer[inputs[t]]
        if t + 1 < len(inputs) and cfg.filler == "zero":
            assert inputs[t + 1] == targets[t]  # the value follows its query key
        slots.append((t - 2 * d) // 2)

    if cfg.filler == "zero":
        query_tokens = set(scored) | {t + 1 for t in scored}
        filler = [x for t, x in enumerate(inputs) if t >= 2 * d and t not in query_tokens]
        assert all(x == 0 for x in filler)
    else:  # the authors' generator: distinct values, and any token of the vocabulary around the query keys
        assert len(set(values)) == d
        assert all(0 <= x < cfg.vocab_size for x in inputs)
    return slots


@pytest.mark.parametrize("cfg", MQAR_CONFIGS)
@pytest.mark.parametrize("seed", [0, 1, 7])
def test_mqar_examples(cfg: MQARConfig, seed: int) -> None:
    task = MQAR(cfg)
    inputs, targets = task.make_batch(16, cfg.seq_len, gen(seed))
    assert inputs.shape == targets.shape == (16, cfg.seq_len)
    assert inputs.dtype == targets.dtype == torch.int64
    space = (cfg.seq_len + 1 - 2 * cfg.num_kv_pairs) // 2
    for x, y in zip(inputs.tolist(), targets.tolist()):
        assert all(0 <= s < space for s in check_mqar_example(x, y, cfg))


def test_mqar_eval_lengths() -> None:
    cfg = MQARConfig(vocab_size=64, num_kv_pairs=4, seq_len=32, eval_seq_lens=[64, 32, 101, 64])
    task = MQAR(cfg)
    assert task.eval_seq_lens() == [32, 64, 101]
    assert task.train_seq_len(123) == 32
    for t in task.eval_seq_lens():
        inputs, targets = task.make_batch(4, t, gen(t))
        assert inputs.shape == (4, t)
        for x, y in zip(inputs.tolist(), targets.tolist()):
            check_mqar_example(x, y, cfg)


def test_mqar_determinism() -> None:
    task = MQAR(MQAR_CONFIGS[0])
    a = task.make_batch(8, 32, gen(3))
    b = task.make_batch(8, 32, gen(3))
    c = task.make_batch(8, 32, gen(4))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    # Draws do not touch the global RNG.
    torch.manual_seed(0)
    before = torch.rand(1)
    torch.manual_seed(0)
    task.make_batch(8, 32, gen(3))
    assert torch.equal(torch.rand(1), before)


def test_mqar_query_placement() -> None:
    """a = 0.01 puts queries near the context, a = 1.0 spreads them uniformly."""
    space = (128 + 1 - 8) // 2

    def mean_slot(power_a: float) -> float:
        cfg = MQARConfig(vocab_size=256, num_kv_pairs=4, seq_len=128, power_a=power_a)
        inputs, targets = MQAR(cfg).make_batch(512, 128, gen(0))
        slots = [s for x, y in zip(inputs.tolist(), targets.tolist()) for s in check_mqar_example(x, y, cfg)]
        return sum(slots) / len(slots)

    uniform = mean_slot(1.0)
    assert abs(uniform - (space - 1) / 2) < 2.0
    assert mean_slot(0.01) < uniform / 2


def test_mqar_uniform_placement_is_power_a_one() -> None:
    """query_placement uniform draws exactly what power_a = 1 (p ∝ k^0) draws; the default a is 0.01."""
    uniform = MQAR(MQARConfig(vocab_size=64, num_kv_pairs=4, seq_len=64, query_placement="uniform"))
    a_one = MQAR(MQARConfig(vocab_size=64, num_kv_pairs=4, seq_len=64, power_a=1.0))
    for x, y in zip(uniform.make_batch(8, 64, gen(2)), a_one.make_batch(8, 64, gen(2))):
        assert torch.equal(x, y)
    default = MQAR(MQARConfig(vocab_size=64, num_kv_pairs=4, seq_len=64))
    explicit = MQAR(MQARConfig(vocab_size=64, num_kv_pairs=4, seq_len=64, power_a=0.01))
    for x, y in zip(default.make_batch(8, 64, gen(2)), explicit.make_batch(8, 64, gen(2))):
        assert torch.equal(x, y)


def test_mqar_random_filler_spreads_over_the_vocabulary() -> None:
    """Filler positions hold uniform tokens: about vocab_size / 2 of them are values, the rest keys or 0."""
    cfg = MQARConfig(vocab_size=256, num_kv_pairs=4, seq_len=128, filler="random")
    inputs, targets = MQAR(cfg).make_batch(64, 128, gen(0))
    filler = inputs[:, 8:][targets[:, 8:] == IGNORE_INDEX]
    assert filler.unique().numel() > 250
    assert abs(float((filler >= 128).double().mean()) - 0.5) < 0.03


def test_mqar_key_positions() -> None:
    """Every scored position's key position points at its key in the context, and its value follows that key."""
    for cfg in MQAR_CONFIGS:
        task = MQAR(cfg)
        inputs, targets = task.make_batch(16, cfg.seq_len, gen(5))
        keys = task.key_positions(inputs, targets)
        assert keys.shape == targets.shape and keys.dtype == torch.int64
        scored = targets != IGNORE_INDEX
        assert bool((keys[~scored] == -1).all())
        rows, cols = scored.nonzero(as_tuple=True)
        at = keys[rows, cols]
        assert bool((at < 2 * cfg.num_kv_pairs).all()) and bool((at % 2 == 0).all())
        assert torch.equal(inputs[rows, at], inputs[rows, cols])
        assert torch.equal(inputs[rows, at + 1], targets[rows, cols])
    bad = targets.clone()
    bad[0, 1] = 5  # position 1 holds a value, no key
    with pytest.raises(ValueError, match="key_positions"):
        task.key_positions(inputs, bad)


def test_distance_buckets_by_hand() -> None:
    """Queries at 4, 10, 16, 20 with keys at 2, 0, 2, 0: buckets by chunk 8 and by chunk 4."""
    keys = torch.full((24,), -1)
    keys[[4, 10, 16, 20]] = torch.tensor([2, 0, 2, 0])
    by8 = distance_buckets(keys, 8)
    assert by8[[4, 10, 16, 20]].tolist() == [0, 1, 2, 2]
    assert distance_buckets(keys, 4)[[4, 10, 16, 20]].tolist() == [1, 2, 2, 2]
    assert distance_buckets(keys, 64)[[4, 10, 16, 20]].tolist() == [0, 0, 0, 0]
    assert bool((by8[keys < 0] == -1).all())
    with pytest.raises(ValueError, match="chunk"):
        distance_buckets(keys, 0)


def test_mqar_query_order_is_uniform() -> None:
    """The first context key is queried before the second half of the time.

    With only 4 slots and a strong skew, assigning keys to slots in draw order would give ~0.59.
    """
    cfg = MQARConfig(vocab_size=64, num_kv_pairs=2, seq_len=11, power_a=0.01)
    inputs, targets = MQAR(cfg).make_batch(4096, 11, gen(0))
    first_before = 0
    for x, y in zip(inputs.tolist(), targets.tolist()):
        queried = [x[t] for t, v in enumerate(y) if v != IGNORE_INDEX]
        first_before += queried[0] == x[0]
    assert abs(first_before / len(inputs) - 0.5) < 0.04


def test_mqar_speed() -> None:
    task = MQAR(MQARConfig())
    g = gen(0)
    task.make_batch(64, 512, g)
    best = min(_timed(lambda: task.make_batch(64, 512, g)) for _ in range(5))
    assert best < 0.05


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(num_kv_pairs=0), "num_kv_pairs"),
        (dict(vocab_size=17, num_kv_pairs=8), "vocab_size"),  # only 7 keys in [1, 8)
        (dict(seq_len=31, num_kv_pairs=8), "seq_len"),
        (dict(power_a=0.0), "power_a"),
        (dict(power_a=-1.0), "power_a"),
        (dict(query_placement="uniform", power_a=0.5), "power_a"),
        (dict(query_placement="spread"), "query_placement"),
        (dict(filler="noise"), "filler"),
        (dict(distance_chunk=-1), "distance_chunk"),
        (dict(eval_seq_lens=[512, 16]), "eval_seq_lens"),
    ],
)
def test_mqar_validate(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=f"^{name}:"):
        MQARConfig(**kwargs).validate()
    with pytest.raises(ValueError, match=f"^{name}:"):
        MQAR(MQARConfig(**kwargs))


def test_mqar_validate_accepts_minimum() -> None:
    MQARConfig(vocab_size=18, num_kv_pairs=8, seq_len=32, eval_seq_lens=[32]).validate()


PERMS = list(itertools.permutations(range(5)))


def compose(p: tuple[int, ...], s: tuple[int, ...]) -> tuple[int, ...]:
    """(p ∘ s)(i) = p(s(i))."""
    return tuple(p[s[i]] for i in range(len(p)))


@pytest.mark.parametrize("degree", [3, 4, 5])
def test_permutation_table(degree: int) -> None:
    """S_n for n = 3, 4 and the default 5: id order itertools.permutations(range(n)), id 0 the
    identity, the composition convention, and the group axioms (associativity over all n³ triples)."""
    perms, table = permutation_table(degree)
    if degree == 5:
        assert perms == PERMS and torch.equal(permutation_table()[1], table)  # the default is S5
    n = math.factorial(degree)
    assert perms == list(itertools.permutations(range(degree))) and perms[0] == tuple(range(degree))
    assert table.shape == (n, n) and table.dtype == torch.int64
    full = torch.arange(n)
    assert torch.equal(table[0], full) and torch.equal(table[:, 0], full)
    assert torch.equal(table.sort(dim=0).values, full[:, None].expand(n, n))  # every column a permutation
    assert torch.equal(table.sort(dim=1).values, full[None, :].expand(n, n))  # every row a permutation
    rows = table.tolist()
    for i, p in enumerate(perms):
        for j, s in enumerate(perms):
            assert perms[rows[i][j]] == compose(p, s)
    a, b, c = torch.meshgrid(full, full, full, indexing="ij")
    assert torch.equal(table[table[a, b], c], table[a, table[b, c]])


@pytest.mark.parametrize("seed", [0, 5])
def test_s5_targets(seed: int) -> None:
    task = S5(S5Config())
    assert task.vocab_size == 120
    inputs, targets = task.make_batch(8, 40, gen(seed))
    assert inputs.shape == targets.shape == (8, 40)
    assert inputs.dtype == targets.dtype == torch.int64
    assert int(inputs.min()) >= 0 and int(inputs.max()) < 120
    for x, y in zip(inputs.tolist(), targets.tolist()):
        state = tuple(range(5))
        for tok, tgt in zip(x, y):
            state = compose(PERMS[tok], state)
            assert PERMS[tgt] == state


def test_s5_determinism_and_coverage() -> None:
    task = S5(S5Config())
    a = task.make_batch(64, 20, gen(1))
    b = task.make_batch(64, 20, gen(1))
    c = task.make_batch(64, 20, gen(2))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    assert a[0].unique().numel() == 120  # 1280 uniform draws cover all 120 elements


def test_s5_lengths_without_curriculum() -> None:
    task = S5(S5Config(min_len=3, max_len=9, eval_seq_lens=[36, 9, 72]))
    lens = [task.train_seq_len(s) for s in range(300)]
    assert min(lens) == 3 and max(lens) == 9
    assert task.eval_seq_lens() == [9, 36, 72]


def test_s5_curriculum() -> None:
    cfg = S5Config(min_len=2, max_len=18, curriculum_steps=1000)
    task = S5(cfg)
    lens = [task.train_seq_len(s) for s in range(0, 1500, 5)]
    for step, n in zip(range(0, 1500, 5), lens):
        assert 2 <= n <= 2 + 16 * min(step, 1000) / 1000
    assert task.train_seq_len(0) == 2
    early, late = lens[:40], lens[-100:]
    assert sum(late) / len(late) > 2 * sum(early) / len(early)
    assert max(late) == 18
    # A function of the step alone: repeated calls and a fresh task agree.
    fresh = S5(cfg)
    assert [fresh.train_seq_len(s) for s in reversed(range(0, 1500, 5))] == lens[::-1]
    assert [task.train_seq_len(s) for s in range(0, 1500, 5)] == lens


def test_s3_targets_are_a_left_fold() -> None:
    task = S5(S5Config(degree=3))
    perms = list(itertools.permutations(range(3)))
    assert task.vocab_size == 6
    inputs, targets = task.make_batch(16, 30, gen(3))
    assert int(inputs.min()) >= 0 and int(inputs.max()) < 6
    assert inputs.unique().numel() == 6
    for x, y in zip(inputs.tolist(), targets.tolist()):
        for t in range(len(x)):
            state = (0, 1, 2)
            for tok in x[: t + 1]:  # σ_t = π_t ∘ … ∘ π_0, folded from the identity
                state = compose(perms[tok], state)
            assert perms[y[t]] == state


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(degree=1), "degree"),
        (dict(degree=7), "degree"),
        (dict(min_len=0), "min_len"),
        (dict(min_len=5, max_len=4), "max_len"),
        (dict(curriculum_steps=-1), "curriculum_steps"),
        (dict(eval_seq_lens=[18, 0]), "eval_seq_lens"),
    ],
)
def test_s5_validate(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=f"^{name}:"):
        S5Config(**kwargs).validate()
    with pytest.raises(ValueError, match=f"^{name}:"):
        S5(S5Config(**kwargs))


def test_s5_degree_from_the_command_line() -> None:
    """--set data.degree=N reaches the task; a bad degree names data.degree."""
    config = Path(__file__).parent.parent / "configs" / "results" / "s5_psm_c1.yaml"
    cfg = load_config(config, ["data.degree=3"])
    assert cfg.data.config.degree == 3
    assert build_source(cfg.data.name, cfg.data.config, 0).vocab_size == 6
    assert load_config(config).data.config.degree == 5
    with pytest.raises(ConfigError, match=r"data\.degree: expected an integer in \[2, 6\]"):
        load_config(config, ["data.degree=8"])


def cycle_sign(p: tuple[int, ...]) -> int:
    """0 even, 1 odd, from the cycle count: an n-element permutation with c cycles has sign (-1)^(n - c)."""
    seen, cycles = set(), 0
    for start in range(len(p)):
        if start not in seen:
            cycles += 1
            i = start
            while i not in seen:
                seen.add(i)
                i = p[i]
    return (len(p) - cycles) % 2


@pytest.mark.parametrize("degree", [2, 3, 4, 5])
def test_s5_class_groups_are_the_signs(degree: int) -> None:
    """The evaluation's class groups: each element's sign, a homomorphism onto {0, 1} with half the elements odd."""
    task = S5(S5Config(degree=degree))
    groups = task.class_groups
    assert groups.shape == (math.factorial(degree),) and groups.dtype == torch.int64
    assert groups.tolist() == [cycle_sign(p) for p in task.perms]
    assert int(groups.sum()) == math.factorial(degree) // 2 and int(groups[0]) == 0
    assert torch.equal(groups[task.table], groups[:, None] ^ groups[None, :])  # sign(p ∘ s) = sign(p) + sign(s) mod 2
    assert torch.equal(build_source("s5", S5Config(degree=degree), seed=0).class_groups, groups)
    assert build_source("mqar", MQARConfig(), seed=0).class_groups is None
