"""Model zoo: registry, shapes, gradients, Keras semantics and the paper's parameter counts."""

from __future__ import annotations

import pytest

from dunet_deploy.errors import DunetError

torch = pytest.importorskip("torch")

from dunet_deploy.models import (  # noqa: E402
    PAPER_SEADD123_PARAMS,
    DUNet,
    create_model,
    keras_param_count,
    list_models,
    model_info,
    model_kwargs,
)
from dunet_deploy.models.layers import SamePadConv, SqueezeExcite  # noqa: E402

# Paper Table 2 and Table 5 (Keras counting: trainable + BN moving mean/variance).
PAPER_COUNTS = {
    "dunet": 8_640_163,
    "dunet_add1": 7_802_210,
    "dunet_add12": 7_970_019,
    "dunet_add23": 8_635_043,
    "dunet_add123": 8_636_260,
    "dunet_seadd12": 7_971_299,
    "unet2d": 7_771_297,
    "unet2d_original": 31_030_593,
    "unet3d": 22_597_826,
}


def test_registry_lists_every_variant():
    assert set(PAPER_COUNTS) | {"dunet_seadd123"} == set(list_models())


@pytest.mark.parametrize("name", sorted(PAPER_COUNTS))
def test_keras_parameter_count_matches_paper(name):
    model = create_model(name)
    assert keras_param_count(model) == PAPER_COUNTS[name]


def test_seadd123_count_is_ours_not_the_papers():
    # Same SE block as SEAdd-23 at level 1 (32 ch, r=16): +1,217 (fusion) +256 (two SEs).
    n = keras_param_count(create_model("dunet_seadd123"))
    assert n == 8_640_163 + 1_217 + 256 == 8_641_636
    assert n != PAPER_SEADD123_PARAMS


@pytest.mark.parametrize("name", list_models())
def test_forward_backward_shapes(name):
    torch.manual_seed(0)
    model = create_model(name)
    c = model_info(name).kwargs["in_channels"]
    assert len(model_info(name).slab_offsets) == c
    x = torch.randn(2, c, 32, 32, requires_grad=True)
    y = model(x)
    assert y.shape == (2, 1, 32, 32)
    assert torch.all((y >= 0) & (y <= 1))
    y.mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    # Every parameter takes part in the output.
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing


@pytest.mark.parametrize("name", ["dunet", "unet3d"])
def test_non_square_input_and_eval_determinism(name):
    model = create_model(name).eval()
    x = torch.randn(1, 4, 32, 48)
    with torch.no_grad():
        a, b = model(x), model(x)
    assert a.shape == (1, 1, 32, 48)
    assert torch.equal(a, b)  # dropout is off in eval mode


def test_wrong_channel_count_is_rejected():
    with pytest.raises(ValueError, match=r"expected input \[N, 4, H, W\]"):
        create_model("dunet")(torch.randn(1, 1, 32, 32))


def test_create_model_overrides_and_records_args():
    m = create_model("dunet", base_filters=16, fusion_levels=(3, 2))
    assert isinstance(m, DUNet)
    assert m.model_name == "dunet"
    assert m.model_args == {**model_kwargs("dunet"), "base_filters": 16, "fusion_levels": [2, 3]}
    assert keras_param_count(m) < 8_640_163 / 3


def test_unknown_model_and_bad_fusion():
    with pytest.raises(DunetError, match="unknown model 'nope'"):
        create_model("nope")
    with pytest.raises(ValueError, match="fusion must be"):
        DUNet(fusion="concat")
    with pytest.raises(ValueError, match="subset"):
        DUNet(fusion_levels=(4,))


def test_keras_batchnorm_semantics_and_he_init():
    m = create_model("dunet")
    bns = [mod for mod in m.modules() if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm)]
    assert bns and all(b.eps == 1e-3 and b.momentum == 0.01 for b in bns)
    conv = m.blocks[2].body[0]  # 64 -> 128, 3x3: fan_in 576
    std = conv.weight.std().item()
    # He normal truncated at 2 sigma has std 0.88 * sqrt(2/fan_in).
    assert abs(std - 0.88 * (2 / 576) ** 0.5) < 0.05 * (2 / 576) ** 0.5
    assert conv.weight.abs().max().item() <= 2 * (2 / 576) ** 0.5 + 1e-6
    assert torch.count_nonzero(conv.bias) == 0


def test_same_padding_for_even_kernel_pads_right_bottom():
    conv = SamePadConv(1, 1, kernel_size=2)
    with torch.no_grad():
        conv.conv.weight.zero_()
        conv.conv.weight[0, 0, 0, 0] = 1.0  # picks the top-left tap of each window
        conv.conv.bias.zero_()
    x = torch.arange(1.0, 10.0).reshape(1, 1, 3, 3)
    # TF 'same' with kernel 2: window at (i, j) covers (i..i+1, j..j+1), padding after.
    assert torch.equal(conv(x), x)
    with torch.no_grad():
        conv.conv.weight.zero_()
        conv.conv.weight[0, 0, 1, 1] = 1.0  # bottom-right tap: shifts up-left, zeros at the end
    expected = torch.tensor([[5.0, 6.0, 0.0], [8.0, 9.0, 0.0], [0.0, 0.0, 0.0]])
    assert torch.equal(conv(x)[0, 0], expected)


def test_squeeze_excite_reweights_channels():
    se = SqueezeExcite(32)
    x = torch.randn(2, 32, 8, 8)
    y = se(x)
    ratio = y / x
    # One weight per (sample, channel), in (0, 1).
    assert torch.allclose(ratio, ratio[:, :, :1, :1].expand_as(ratio), atol=1e-5)
    assert torch.all((ratio > 0) & (ratio < 1))
    assert sum(p.numel() for p in se.parameters()) == 2 * 32 * 2
