"""The affine models in float64: chunkwise forward = recurrent step, state carry, generation, configs."""

import pytest
import torch

from psm_train.models.affine_lm import AffineLM, AffineMixer
from psm_train.models.gla import GLA, GLAConfig
from psm_train.models.linear_attention import LinearAttention, LinearAttentionConfig
from psm_train.models.mamba2 import Mamba2, Mamba2Config
from psm_train.models.retnet import RetNet, RetNetConfig

VOCAB = 29
T = 11  # not a multiple of chunk_size
MODELS = {
    "gla": (GLA, GLAConfig(d_model=32, n_layers=2, n_heads=2, chunk_size=4)),
    "mamba2": (Mamba2, Mamba2Config(d_model=32, n_layers=2, chunk_size=4, head_dim=16, d_state=8)),
    "retnet": (RetNet, RetNetConfig(d_model=32, n_layers=2, n_heads=2, chunk_size=4)),
    "linear_attention": (LinearAttention, LinearAttentionConfig(d_model=32, n_layers=2, n_heads=2, chunk_size=4)),
    "linear_attention_elu": (
        LinearAttention,
        LinearAttentionConfig(d_model=32, n_layers=2, n_heads=2, chunk_size=4, feature_map="elu"),
    ),
    "gla_no_mlp": (GLA, GLAConfig(d_model=32, n_layers=2, n_heads=2, chunk_size=4, mlp_ratio=0.0)),
}


def build(name: str) -> AffineLM:
    torch.manual_seed(0)
    cls, cfg = MODELS[name]
    model = cls(cfg, VOCAB).double()
    # Larger weights than the init, so that every layer changes the output measurably.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.3)
    return model.eval()


def mixer(name: str) -> AffineMixer:
    return build(name).layers[0].mixer


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def assert_state_close(a, b):
    assert relative_error(a.state, b.state) <= 1e-10
    assert (a.conv is None) == (b.conv is None)
    if a.conv is not None:
        assert relative_error(a.conv, b.conv) <= 1e-12


def inputs() -> torch.Tensor:
    """x [2, T, d_model] for the mixers above."""
    return torch.randn(2, T, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_mixer_chunkwise_equals_recurrent(name):
    m = mixer(name)
    x = inputs()
    with torch.no_grad():
        y, final = m(x)
        state, ys = None, []
        for t in range(T):
            y_t, state = m.step(x[:, t], state)
            ys.append(y_t)
    assert y.shape == x.shape
    assert relative_error(torch.stack(ys, dim=1), y) <= 1e-10
    assert_state_close(state, final)


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("split", [1, 4, 6])
def test_mixer_state_carry(name, split):
    m = mixer(name)
    x = inputs()
    with torch.no_grad():
        whole, s_whole = m(x)
        first, s_mid = m(x[:, :split])
        second, s_end = m(x[:, split:], s_mid)
    assert relative_error(torch.cat((first, second), dim=1), whole) <= 1e-10
    assert_state_close(s_end, s_whole)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_generation_reproduces_forward(name):
    model = build(name)
    tokens = torch.randint(0, VOCAB, (3, T), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        parallel = model(tokens)
        gen = model.init_generation(3)
        nbytes = gen.nbytes()
        online = []
        for t in range(T):
            online.append(gen.step(tokens[:, t]))
            assert gen.nbytes() == nbytes  # constant in the number of tokens seen
    assert parallel.shape == (3, T, VOCAB)
    assert relative_error(torch.stack(online, dim=1), parallel) <= 1e-9
    assert gen.describe() == {"tokens": T, "state_bytes": nbytes}
    assert nbytes > 0


def test_mamba2_state_holds_conv_cache():
    m = mixer("mamba2")
    state = m.init_state(2)
    # [B, H, d_state, head_dim] and [B, d_inner + 2 d_state, conv_width - 1]
    assert state.state.shape == (2, 4, 8, 16)
    assert state.conv.shape == (2, 64 + 16, 3)


def test_mamba2_init():
    m = mixer("mamba2")
    dt = torch.nn.functional.softplus(m.dt_bias)
    assert ((dt >= 1e-3 - 1e-12) & (dt <= 0.1 + 1e-12)).all()
    assert ((-m.A_log.exp() <= -1) & (-m.A_log.exp() >= -16)).all()


def test_retnet_decays():
    m = mixer("retnet")
    x = torch.zeros(1, dtype=torch.float64)
    torch.testing.assert_close(m.log_gamma(x).exp(), torch.tensor([1 - 2**-5, 1 - 2**-6], dtype=torch.float64))


def test_retnet_decays_exact_in_float64_after_a_float32_build():
    """A model built in float32 and moved to float64 has the float64 decays, not float32's rounding of them."""
    m = mixer("retnet").float().double()
    exact = torch.log1p(-(2.0 ** (-5.0 - torch.arange(2, dtype=torch.float64))))
    assert torch.equal(m.log_gamma(torch.zeros(1, dtype=torch.float64)), exact)


@pytest.mark.parametrize(
    "cfg, field",
    [
        (GLAConfig(d_model=0), "d_model"),
        (GLAConfig(n_layers=-1), "n_layers"),
        (GLAConfig(chunk_size=0), "chunk_size"),
        (GLAConfig(mlp_ratio=-1.0), "mlp_ratio"),
        (GLAConfig(d_model=32, n_heads=3), "n_heads"),
        (GLAConfig(gate_logit_normalizer=0.0), "gate_logit_normalizer"),
        (RetNetConfig(d_model=30, n_heads=4), "n_heads"),
        (LinearAttentionConfig(feature_map="relu"), "feature_map"),
        (LinearAttentionConfig(n_heads=0), "n_heads"),
        (Mamba2Config(d_model=32, head_dim=24), "head_dim"),
        (Mamba2Config(d_model=32, head_dim=16, n_heads=2), "n_heads"),
        (Mamba2Config(d_state=0), "d_state"),
    ],
)
def test_validate_names_the_field(cfg, field):
    with pytest.raises(ValueError, match=f"^{field}: "):
        cfg.validate()


def test_default_configs_validate():
    for cfg in (GLAConfig(), Mamba2Config(), RetNetConfig(), LinearAttentionConfig()):
        cfg.validate()
    Mamba2Config(d_model=32, head_dim=16, n_heads=4).validate()
