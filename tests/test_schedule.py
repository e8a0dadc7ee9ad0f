"""Learning-rate schedules: warmup + cosine, and warmup-stable-decay (WSD) with a 1 - sqrt decay."""

import math

import pytest

from psm_train.config import ConfigError, TrainConfig, build_dataclass
from psm_train.train.optim import lr_at


def _wsd(**kw) -> TrainConfig:
    return build_dataclass(TrainConfig, {"schedule": "wsd", "lr": 1.0, "min_lr_ratio": 0.1, **kw}, "train")


def test_wsd_warms_up_holds_then_decays_as_one_minus_sqrt():
    cfg = _wsd(steps=100, warmup_steps=10, decay_steps=20)
    assert [lr_at(s, cfg) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert all(lr_at(s, cfg) == 1.0 for s in range(10, 80))  # stable
    for s in (80, 85, 99):  # decay step k = s - 79 of 20: lr = floor + (1 - floor)(1 - sqrt(k / 20))
        assert lr_at(s, cfg) == pytest.approx(0.1 + 0.9 * (1 - math.sqrt((s - 79) / 20)))
    assert lr_at(99, cfg) == pytest.approx(0.1)  # the last step is at lr * min_lr_ratio
    assert lr_at(150, cfg) == pytest.approx(0.1)  # past the end: stays at the floor
    decay = [lr_at(s, cfg) for s in range(80, 100)]
    assert all(a > b for a, b in zip(decay, decay[1:]))


def test_wsd_stable_phase_does_not_depend_on_the_total_steps():
    """What makes decay branches possible: a run to 100 steps and one to 400 agree up to the first's decay."""
    short, long = _wsd(steps=100, warmup_steps=10, decay_steps=20), _wsd(steps=400, warmup_steps=10, decay_steps=80)
    assert [lr_at(s, short) for s in range(80)] == [lr_at(s, long) for s in range(80)]


def test_wsd_without_decay_is_constant_after_warmup():
    cfg = _wsd(steps=50, warmup_steps=5, decay_steps=0)
    assert [lr_at(s, cfg) for s in (5, 49, 60)] == [1.0, 1.0, 1.0]


def test_cosine_is_unchanged():
    cfg = build_dataclass(TrainConfig, {"steps": 110, "warmup_steps": 10, "lr": 1.0, "min_lr_ratio": 0.1}, "train")
    assert cfg.schedule == "cosine"
    assert lr_at(10, cfg) == pytest.approx(1.0) and lr_at(60, cfg) == pytest.approx(0.55)
    assert lr_at(110, cfg) == pytest.approx(0.1)


@pytest.mark.parametrize("fields, message", [
    ({"schedule": "linear"}, r"train\.schedule: expected cosine or wsd, got 'linear'"),
    ({"decay_steps": 10}, r"train\.decay_steps: 10 applies to schedule: wsd only"),
    ({"schedule": "wsd", "steps": 100, "warmup_steps": 10, "decay_steps": 91},
     r"train\.decay_steps: expected an integer in \[0, steps - warmup_steps\] = \[0, 90\], got 91"),
    ({"schedule": "wsd", "decay_steps": -1}, r"train\.decay_steps: expected an integer in"),
])
def test_bad_schedules_name_the_field(fields, message):
    with pytest.raises(ConfigError, match=message):
        build_dataclass(TrainConfig, fields, "train")
