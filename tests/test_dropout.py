"""model.dropout: off by default and bit-identical to no dropout, active in training only, validated, configurable."""

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from psm_train.config import ConfigError, load_config
from psm_train.models import MODELS
from psm_train.models.affine_lm import AffineBlock
from psm_train.models.layers import Block
from psm_train.parallelize import apply_activation_checkpointing
from tests.test_models import SMALL, VOCAB, small_model

T = 23
NAMES = sorted(SMALL)


def tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (3, T), generator=torch.Generator().manual_seed(1))


def forward(model: nn.Module, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    return model(tokens())


@pytest.mark.parametrize("name", NAMES)
def test_zero_dropout_changes_nothing(name):
    plain = small_model(name).train()  # the config without the field
    zero = small_model(name, dropout=0.0).train()
    rng = torch.get_rng_state()
    with torch.no_grad():
        out = zero(tokens())
        # p = 0 is an exact identity that draws no random numbers, so runs keep their RNG stream.
        assert torch.equal(torch.get_rng_state(), rng)
        assert torch.equal(out, plain(tokens()))
        assert torch.equal(out, zero.eval()(tokens()))


@pytest.mark.parametrize("name", NAMES)
def test_dropout_acts_in_training_only(name):
    model = small_model(name, dropout=0.3).train()
    reference = small_model(name)  # same seed: same weights, no dropout
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))
    # One dropout on the embeddings and one per block (Agg and Inf blocks alike for Transformer-PSM).
    drops = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    n_blocks = sum(isinstance(m, (Block, AffineBlock)) for m in model.modules())
    assert len(drops) == 1 + n_blocks and all(m.p == 0.3 for m in drops)
    reached = set()
    for m in drops:
        m.register_forward_hook(lambda m, args, out: reached.add(m))
    with torch.no_grad():
        first, second = forward(model, 1), forward(model, 2)
        assert not torch.equal(first, second)
        assert torch.equal(first, forward(model, 1))
        assert len(reached) == len(drops)
        model.eval()
        expected = reference(tokens())
        assert torch.equal(forward(model, 1), expected) and torch.equal(forward(model, 2), expected)
        x = tokens()
        state, ref_state = model.init_generation(3), reference.init_generation(3)
        for t in range(T):
            assert torch.equal(state.step(x[:, t]), ref_state.step(x[:, t]))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("every", [1, 2])
def test_activation_checkpointing_redraws_the_same_masks(name, every):
    """The trainer recomputes each (or every other) block in the backward: it must drop the same units again."""
    plain, wrapped = small_model(name, dropout=0.3).train(), small_model(name, dropout=0.3).train()
    apply_activation_checkpointing(wrapped, every)
    blocks = [m for m in plain.modules() if isinstance(m, (Block, AffineBlock))]
    wrappers = [m for m in wrapped.modules() if type(m).__name__ == "CheckpointWrapper"]
    assert len(blocks) > 1 and len(wrappers) == len(blocks[::every])
    losses = [forward(m, 1).square().mean() for m in (plain, wrapped)]
    assert torch.equal(*losses)
    for loss in losses:
        loss.backward()
    for (_, a), (_, b) in zip(plain.named_parameters(), wrapped.named_parameters()):
        assert torch.equal(a.grad, b.grad)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("value", [1.0, -0.1, float("nan")])
def test_validate_rejects_out_of_range(name, value):
    cfg = MODELS[name][0](**SMALL[name], dropout=value)
    with pytest.raises(ValueError, match=rf"dropout: expected a number in \[0, 1\), got {value}"):
        cfg.validate()


@pytest.mark.parametrize("name", NAMES)
def test_config_file_and_override(name, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(f"model: {{name: {name}, dropout: 0.25}}\ndata: {{task: s5}}\n")
    assert load_config(path).model.config.dropout == 0.25
    cfg = load_config(path, ["model.dropout=0.1"])
    assert cfg.model.config.dropout == 0.1 and cfg.to_dict()["model"]["dropout"] == 0.1
    with pytest.raises(ConfigError, match=r"run.yaml: model\.dropout: expected a number in \[0, 1\), got 1.0"):
        load_config(path, ["model.dropout=1"])


def test_shipped_config_takes_the_override():
    config = Path(__file__).parent.parent / "configs" / "mqar_tiny.yaml"
    assert load_config(config).model.config.dropout == 0.0
    assert load_config(config, ["model.dropout=0.1"]).model.config.dropout == 0.1


def _record_masks(rank: int, world: int, raw: dict, out: Path) -> None:
    """Train with every training-mode dropout's zero pattern recorded, then write this rank's first one."""
    import torch.nn.functional as F

    from psm_train.config import config_from_dict
    from psm_train.train.loop import train

    real, masks = F.dropout, []

    def recording(x, p=0.5, training=True, inplace=False):
        y = real(x, p, training, inplace)
        if training and p > 0:
            masks.append((y == 0).flatten()[:512].tolist())
        return y

    F.dropout = recording
    train(config_from_dict(raw, "test"))
    (out / f"rank{rank}.json").write_text(json.dumps(masks[0]))


@pytest.mark.parametrize("parallel", [{}, {"sp": 2}], ids=["dp2", "sp2"])
def test_ranks_draw_different_masks(tmp_path, parallel):
    """Weights come from the shared seed, dropout masks from a per-rank stream: two data-parallel ranks,
    or the two slices of one sequence, do not share masks."""
    from tests.multiprocess import run_ranks
    from tests.test_distributed_training import run_config

    raw = run_config(tmp_path / "run", "transformer_psm", steps=1, parallel=parallel)
    raw["model"]["dropout"] = 0.5
    run_ranks(_record_masks, 2, raw, tmp_path)
    first, second = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert len(first) == len(second) == 512 and any(first) and first != second
