"""SimVP-v2 (gSTA) specifics: OpenSTL's parameter count, T_in != T_out, the gSTA block, the
full-resolution skip, the grid rule."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from beamvq.backbones.base import count_parameters
from beamvq.backbones.simvp import SimVPv2
from beamvq.nn.conv import ConvNormAct
from beamvq.nn.simvp import (
    GatedLargeKernelAttention,
    LargeKernelConv,
    MetaTranslator,
    SimVPEncoder,
    TimeMix,
    downsampling_pattern,
    gsta_block,
)

OPENSTL_SIMVP_GSTA_MMNIST = 46.8e6  # OpenSTL model zoo, Moving MNIST 10 -> 10


def _small(in_steps: int = 4, out_steps: int = 4, c_in: int = 2, c_out: int = 1) -> SimVPv2:
    torch.manual_seed(0)
    return SimVPv2(in_steps, out_steps, c_in, c_out, hid_s=8, hid_t=16, n_s=2, n_t=2)


def test_paper_preset_parameter_count_matches_openstl() -> None:
    # configs/mmnist/simvp/SimVP_gSTA.py: hid_S 64, hid_T 512, N_S 4, N_T 8; built on the meta
    # device so no memory is allocated for 47M weights.
    with torch.device("meta"):
        model = SimVPv2(10, 10, 1, 1, hid_s=64, hid_t=512, n_s=4, n_t=8, mlp_ratio=8.0)
    n = count_parameters(model)
    assert n == 46_769_665
    assert abs(n - OPENSTL_SIMVP_GSTA_MMNIST) / OPENSTL_SIMVP_GSTA_MMNIST < 0.02
    assert round(n / 1e6, 1) == 46.8


def test_quickstart_defaults_are_small() -> None:
    n = count_parameters(SimVPv2(5, 5, 1, 1))
    assert 100_000 < n < 1_000_000


@pytest.mark.parametrize(("t_in", "t_out"), [(4, 4), (4, 2), (3, 6)])
def test_shapes_and_latent_layout(t_in: int, t_out: int) -> None:
    model = _small(t_in, t_out).eval()
    x = torch.randn(2, t_in, 2, 16, 24)
    enc = model.encode(x)
    # n_s = 2 halves the grid once; z is channel-first with one hid_s vector per frame/position.
    assert enc.z.shape == (2, 8, t_in, 8, 12)
    assert model.latent_dim == 8
    assert enc.extras.shape == (2, t_in, 8, 16, 24)
    moved = model.translate(enc)
    assert moved.z.shape == (2, 8, t_out, 8, 12)
    assert moved.extras is enc.extras
    y = model.decode(moved)
    assert y.shape == (2, t_out, 1, 16, 24)
    torch.testing.assert_close(y, model(x))
    # A time mix exists (and only then) when the skip must change length.
    assert isinstance(model.skip_mix, TimeMix) == (t_in != t_out)


def test_every_parameter_gets_a_gradient_when_t_out_differs() -> None:
    model = _small(4, 3)
    x = torch.randn(2, 4, 2, 16, 16)
    loss = (model(x) * torch.randn(2, 3, 1, 16, 16)).sum()
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []


def test_time_mix_starts_as_last_frame_copy() -> None:
    mix = TimeMix(3, 5)
    x = torch.randn(2, 3, 4, 6, 6)
    y = mix(x)
    assert y.shape == (2, 5, 4, 6, 6)
    for s in range(5):
        torch.testing.assert_close(y[:, s], x[:, -1])


def test_decoder_uses_the_full_resolution_skip_and_the_latent() -> None:
    model = _small().eval()
    x = torch.randn(1, 4, 2, 16, 16)
    enc = model.translate(model.encode(x))
    y = model.decode(enc)
    y_no_skip = model.decode(enc._replace(extras=torch.zeros_like(enc.extras)))
    y_new_z = model.decode(enc._replace(z=enc.z + 1.0))
    assert (y - y_no_skip).abs().max() > 1e-4
    assert (y - y_new_z).abs().max() > 1e-4


def test_downsampling_pattern_follows_openstl() -> None:
    assert downsampling_pattern(4) == [False, True, False, True]
    assert downsampling_pattern(3) == [False, True, False]
    enc = SimVPEncoder(1, 4, n_layers=4)
    out = enc(torch.randn(1, 1, 32, 48))
    assert out.latent.shape == (1, 4, 8, 12)
    assert out.skip.shape == (1, 4, 32, 48)


def test_grid_must_be_divisible_by_the_downsampling() -> None:
    model = SimVPv2(2, 2, 1, 1, hid_s=4, hid_t=8, n_s=4, n_t=2)
    model.check_grid(36, 20)
    with pytest.raises(ValueError, match="multiples of 4"):
        model.check_grid(30, 20)
    with pytest.raises(ValueError, match="SimVPv2"):
        model(torch.randn(1, 2, 1, 16, 18))
    # n_s = 1 never downsamples: any grid works.
    SimVPv2(2, 2, 1, 1, hid_s=4, hid_t=8, n_s=1, n_t=2)(torch.randn(1, 2, 1, 7, 11))


def test_gsta_block_keeps_shape_and_is_identity_with_zero_layer_scale() -> None:
    torch.manual_seed(0)
    block = gsta_block(12, mlp_ratio=4.0).eval()
    x = torch.randn(2, 12, 9, 7)
    assert block(x).shape == x.shape
    assert (block(x) - x).abs().max() > 0
    with torch.no_grad():
        block.layer_scale_1.zero_()
        block.layer_scale_2.zero_()
    torch.testing.assert_close(block(x), x)


def test_gated_attention_matches_a_direct_computation() -> None:
    torch.manual_seed(0)
    unit = GatedLargeKernelAttention(6)
    x = torch.randn(2, 6, 10, 10)
    lk = unit.large_kernel
    a = F.conv2d(x, lk.local.weight, lk.local.bias, padding=2, groups=6)
    a = F.conv2d(a, lk.dilated.weight, lk.dilated.bias, padding=9, dilation=3, groups=6)
    fg = F.conv2d(a, unit.proj.weight, unit.proj.bias)
    expected = torch.sigmoid(fg[:, 6:]) * fg[:, :6]
    torch.testing.assert_close(unit(x), expected)


def test_large_kernel_decomposition_covers_23x23() -> None:
    # depthwise 5x5 then 7x7 dilated by 3: reach 2 + 9 = 11 pixels each way.
    lk = LargeKernelConv(1, kernel_size=21, dilation=3)
    assert lk.local.kernel_size == (5, 5) and lk.dilated.kernel_size == (7, 7)
    with torch.no_grad():
        for conv in (lk.local, lk.dilated):
            conv.weight.fill_(1.0)
            conv.bias.zero_()
    impulse = torch.zeros(1, 1, 31, 31)
    impulse[..., 15, 15] = 1.0
    support = lk(impulse)[0, 0] != 0
    rows = support.any(dim=1).nonzero().flatten()
    assert (rows.min().item(), rows.max().item()) == (4, 26)


def test_translator_widths() -> None:
    tr = MetaTranslator(24, 32, 12, depth=3, block=gsta_block)
    convs = [m for m in tr.layers if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(24, 32), (32, 12)]
    assert tr(torch.randn(2, 24, 5, 5)).shape == (2, 12, 5, 5)


def test_drop_path_is_stochastic_in_training_only() -> None:
    torch.manual_seed(0)
    model = SimVPv2(2, 2, 1, 1, hid_s=4, hid_t=8, n_s=2, n_t=3, drop_path=0.5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_scale" in name:
                p.fill_(1.0)  # make the residual branches matter
    x = torch.randn(4, 2, 1, 8, 8)
    model.train()
    outs = [model(x) for _ in range(4)]
    assert any((outs[0] - o).abs().max() > 1e-6 for o in outs[1:])
    model.eval()
    torch.testing.assert_close(model(x), model(x))


def test_invalid_hyper_parameters_raise() -> None:
    with pytest.raises(ValueError, match="hid_s"):
        SimVPv2(2, 2, 1, 1, hid_s=5)
    with pytest.raises(ValueError, match="n_t"):
        SimVPv2(2, 2, 1, 1, n_t=0)


def test_conv_norm_act_resamples_by_two() -> None:
    x = torch.randn(2, 4, 12, 18)
    assert ConvNormAct(4, 6, stride=2)(x).shape == (2, 6, 6, 9)
    assert ConvNormAct(4, 6, upsample=True)(x).shape == (2, 6, 24, 36)
    assert ConvNormAct(4, 6, kernel_size=5)(x).shape == (2, 6, 12, 18)
    with pytest.raises(ValueError, match="exclude"):
        ConvNormAct(4, 6, stride=2, upsample=True)
    with pytest.raises(ValueError, match="GroupNorm"):
        ConvNormAct(4, 5, norm_groups=2)
