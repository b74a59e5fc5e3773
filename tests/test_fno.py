"""FNO-specific tests: the paper's parameter count, spectral truncation, grids, latent split."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml

from beamvq.backbones.base import count_parameters
from beamvq.backbones.fno import FNO
from beamvq.nn.spectral import SpectralConv2d

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "backbones"


def plane_wave(height: int, width: int, k1: int, k2: int) -> torch.Tensor:
    """``cos(2π(k1 i / H + k2 j / W))`` as a ``(1, 1, H, W)`` tensor."""
    i = torch.arange(height, dtype=torch.float64).view(-1, 1)
    j = torch.arange(width, dtype=torch.float64).view(1, -1)
    wave = torch.cos(2 * math.pi * (k1 * i / height + k2 * j / width))
    return wave.float().view(1, 1, height, width)


def identity_spectral(modes1: int, modes2: int) -> SpectralConv2d:
    """A 1->1 spectral layer whose weight is 1 on every kept mode: an ideal low-pass filter."""
    layer = SpectralConv2d(1, 1, modes1, modes2)
    with torch.no_grad():
        for w in (layer.weights1, layer.weights2):
            w.zero_()
            w[..., 0] = 1.0
    return layer


def test_paper_parameter_count_is_414517() -> None:
    model = FNO(10, 1, 1, 1, modes=8, width=20, num_layers=4, batch_norm=True)
    assert count_parameters(model) == 414_517


def test_parameter_count_formula_at_reference_modes_12() -> None:
    with_bn = FNO(10, 1, 1, 1, modes=12, width=20, batch_norm=True)
    without_bn = FNO(10, 1, 1, 1, modes=12, width=20)
    assert count_parameters(with_bn) == 926_517
    assert count_parameters(without_bn) == 926_357
    # lift + 4 * (spectral + pointwise) + projection, complex weights as 2 reals.
    expected = (12 + 1) * 20 + 4 * (4 * 20 * 20 * 12 * 12 + 20 * 20 + 20) + 21 * 128 + 129
    assert count_parameters(without_bn) == expected


def test_paper_yaml_matches_published_count() -> None:
    args = yaml.safe_load((CONFIGS / "fno_paper.yaml").read_text())["model"]["backbone"]
    assert args["class_path"] == "beamvq.backbones.FNO"
    assert count_parameters(FNO(**args["init_args"])) == 414_517
    quick = yaml.safe_load((CONFIGS / "fno.yaml").read_text())["model"]["backbone"]["init_args"]
    assert 100_000 <= count_parameters(FNO(**quick)) <= 1_000_000


@pytest.mark.parametrize(
    ("k1", "k2", "passes"),
    [(2, 3, True), (-3, 2, True), (0, 0, True), (5, 1, False), (-5, 1, False), (1, 6, False)],
)
def test_spectral_conv_truncates_modes(k1: int, k2: int, passes: bool) -> None:
    torch.manual_seed(0)
    layer = SpectralConv2d(1, 3, modes1=4, modes2=4)
    with torch.no_grad():
        out = layer(plane_wave(32, 32, k1, k2))
    if passes:
        assert out.abs().max() > 1e-3
    else:
        assert out.abs().max() < 1e-6


def test_identity_weights_are_an_ideal_low_pass() -> None:
    layer = identity_spectral(4, 4)
    low = plane_wave(32, 24, 3, 2) + 0.5 * plane_wave(32, 24, -1, 3)
    high = plane_wave(32, 24, 9, 1) + plane_wave(32, 24, 2, 7)
    with torch.no_grad():
        out = layer(low + high)
    torch.testing.assert_close(out, low, atol=1e-5, rtol=0)


def test_coarse_grid_uses_every_existing_mode() -> None:
    # modes 12 on 16x16: all 16 rows and all 9 rfft columns exist, so the identity layer is exact.
    layer = identity_spectral(12, 12)
    x = torch.randn(2, 1, 16, 16)
    assert layer.kept_modes(16, 16) == (8, 9)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x, atol=1e-5, rtol=0)


def test_spectral_conv_is_discretization_invariant() -> None:
    # The same low mode sampled at 32x32 and 16x16 maps to the same function: the coarse grid
    # must pick the weights of the same (negative) frequencies as the fine one.
    torch.manual_seed(0)
    layer = SpectralConv2d(1, 2, modes1=12, modes2=12)
    fine = plane_wave(32, 32, -2, 1) + plane_wave(32, 32, 3, 2)
    coarse = fine[..., ::2, ::2]
    with torch.no_grad():
        out_fine, out_coarse = layer(fine), layer(coarse)
    torch.testing.assert_close(out_fine[..., ::2, ::2], out_coarse, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(("height", "width"), [(32, 48), (17, 23), (16, 16)])
def test_fno_grids_latent_and_split(height: int, width: int) -> None:
    torch.manual_seed(0)
    model = FNO(3, 2, 2, 1, modes=6, width=8, num_layers=3, encoder_layers=1).eval()
    x = torch.randn(2, 3, 2, height, width)
    enc = model.encode(x)
    assert enc.z.shape == (2, 8, height, width)
    assert model.latent_dim == 8
    y = model(x)
    assert y.shape == (2, 2, 1, height, width)
    torch.testing.assert_close(model.decode(model.translate(enc)), y)


def test_batch_norm_variant_trains_every_parameter() -> None:
    torch.manual_seed(0)
    model = FNO(2, 1, 1, 1, modes=4, width=8, batch_norm=True)
    y = model(torch.randn(3, 2, 1, 16, 24))
    y.pow(2).mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_encoder_layers_outside_range_is_rejected() -> None:
    with pytest.raises(ValueError, match="encoder_layers"):
        FNO(1, 1, 1, 1, num_layers=4, encoder_layers=5)
