"""U-Net specifics: grid rule and its message, bottleneck latent with batch-first skips, the
Ronneberger-width preset, skip concatenation, repeating extras for K candidates."""

from __future__ import annotations

import pytest
import torch

from beamvq.backbones.base import count_parameters
from beamvq.backbones.unet import UNet
from beamvq.nn.conv import DoubleConv


def _small(t_in: int = 3, t_out: int = 2, depth: int = 2) -> UNet:
    torch.manual_seed(0)
    return UNet(t_in, t_out, 2, 1, base_width=8, depth=depth, norm_groups=4)


def test_grid_error_names_the_allowed_sizes() -> None:
    model = _small(depth=3)
    model.check_grid(32, 48)
    with pytest.raises(ValueError) as info:
        model.check_grid(36, 50)
    msg = str(info.value)
    assert "UNet" in msg and "36x50" in msg and "multiples of 8" in msg and "32x48" in msg
    with pytest.raises(ValueError, match="multiples of 8"):
        model(torch.randn(1, 3, 2, 20, 16))


@pytest.mark.parametrize(("t_in", "t_out"), [(3, 3), (4, 1), (2, 5)])
def test_bottleneck_latent_and_batch_first_skips(t_in: int, t_out: int) -> None:
    model = _small(t_in, t_out)
    x = torch.randn(2, t_in, 2, 32, 48)
    enc = model.encode(x)
    assert enc.z.shape == (2, 32, 8, 12) and model.latent_dim == 32
    assert isinstance(enc.extras, tuple)
    assert [s.shape for s in enc.extras] == [(2, 8, 32, 48), (2, 16, 16, 24)]
    y = model.decode(model.translate(enc))
    assert y.shape == (2, t_out, 1, 32, 48)
    (y * torch.randn_like(y)).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []


def test_repeated_extras_give_per_candidate_forecasts() -> None:
    # What VQForecaster.candidates does: repeat every extras tensor along batch, one z per row.
    model = _small().eval()
    enc = model.encode(torch.randn(1, 3, 2, 16, 16))
    k = 3
    z_k = torch.cat([enc.z, enc.z + 0.5, enc.z - 0.5])
    extras_k = tuple(s.repeat(k, 1, 1, 1) for s in enc.extras)
    y_k = model.decode(enc._replace(z=z_k, extras=extras_k))
    torch.testing.assert_close(y_k[:1], model.decode(enc))
    assert (y_k[1] - y_k[0]).abs().max() > 1e-4


def test_decoder_concatenates_the_skips() -> None:
    model = _small().eval()
    enc = model.encode(torch.randn(1, 3, 2, 16, 16))
    assert model.up_conv[-1].body[0].in_channels == 2 * 8
    zeroed = tuple(torch.zeros_like(s) for s in enc.extras)
    assert (model.decode(enc) - model.decode(enc._replace(extras=zeroed))).abs().max() > 1e-4


def test_paper_preset_parameter_count() -> None:
    # Ronneberger widths 64..1024 (4 levels), FNO Navier–Stokes I/O (10 frames in, 1 out).
    with torch.device("meta"):
        model = UNet(10, 1, 1, 1, base_width=64, depth=4)
    assert count_parameters(model) == 31_041_665


def test_double_conv_keeps_grid_and_normalizes() -> None:
    torch.manual_seed(0)
    block = DoubleConv(3, 8, norm_groups=2)
    y = block(torch.randn(2, 3, 7, 9) * 10 + 5)
    assert y.shape == (2, 8, 7, 9)
    assert (y >= 0).all()  # ends in ReLU
    assert y.mean() < 1.0  # GroupNorm removed the input's scale and offset


def test_invalid_hyper_parameters_raise() -> None:
    with pytest.raises(ValueError, match="norm_groups"):
        UNet(2, 2, 1, 1, base_width=12, norm_groups=8)
    with pytest.raises(ValueError, match="depth"):
        UNet(2, 2, 1, 1, depth=0)
