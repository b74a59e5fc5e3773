"""CNO-specific tests: alias-free activation, band-limited resampling, grids, latent, presets."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from beamvq.backbones.base import count_parameters
from beamvq.backbones.cno import CNO
from beamvq.nn.spectral import FilteredLeakyReLU, band_limit, fourier_resample

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "backbones"


def band_limited_field(n: int, shift: float = 0.0, m: int | None = None) -> torch.Tensor:
    """A field with modes |k| <= 4 on an n x m grid (m = n), shifted by ``shift`` cells."""
    m = n if m is None else m
    i = torch.arange(n, dtype=torch.float64).view(-1, 1)
    j = torch.arange(m, dtype=torch.float64).view(1, -1)
    x, y = (i + shift) / n, j / m
    f = (
        torch.cos(2 * math.pi * (2 * x + y))
        + 0.7 * torch.sin(2 * math.pi * (x - 3 * y))
        + 0.5 * torch.cos(2 * math.pi * 4 * x)
        + 0.3
    )
    return f.float().view(1, 1, n, m)


def fourier_shift(x: torch.Tensor, shift: float) -> torch.Tensor:
    """Exact band-limited translation by ``shift`` cells along the first axis."""
    n = x.shape[-2]
    k = torch.fft.fftfreq(n, d=1.0 / n, dtype=torch.float64).view(-1, 1)
    x_ft = torch.fft.rfft2(x.double()) * torch.exp(2j * math.pi * k * shift / n)
    return torch.fft.irfft2(x_ft, s=x.shape[-2:]).float()


def test_resample_is_exact_on_band_limited_fields_and_never_aliases() -> None:
    u = band_limited_field(32)
    up = fourier_resample(u, (64, 48))
    torch.testing.assert_close(up, band_limited_field(64, m=48), atol=1e-5, rtol=0)
    torch.testing.assert_close(fourier_resample(up, (32, 32)), u, atol=1e-5, rtol=0)
    # Mode 12 exists on 32 points but not on 16: plain subsampling aliases it to mode 4,
    # the band-limited resampling removes it.
    i = torch.arange(32, dtype=torch.float32).view(1, 1, -1, 1).expand(1, 1, 32, 32)
    high = torch.cos(2 * math.pi * 12 * i / 32)
    assert high[..., ::2, ::2].abs().max() > 0.9
    assert fourier_resample(high, (16, 16)).abs().max() < 1e-6


@pytest.mark.parametrize("out_size", [(32, 32), (16, 16), (64, 64)])
def test_filtered_activation_has_no_energy_above_the_cutoff(out_size: tuple[int, int]) -> None:
    out = FilteredLeakyReLU()(band_limited_field(32), out_size)
    assert out.shape[-2:] == out_size
    spectrum = torch.fft.fft2(out.double()).abs()
    k1 = torch.fft.fftfreq(out_size[0], d=1.0 / out_size[0]).abs().view(-1, 1)
    k2 = torch.fft.fftfreq(out_size[1], d=1.0 / out_size[1]).abs().view(1, -1)
    above = (k1 > band_limit(out_size[0])) | (k2 > band_limit(out_size[1]))
    assert spectrum[..., above].max() < 1e-4 * spectrum.max()
    # ... and LeakyReLU did create new frequencies below it (the activation is not a no-op).
    lin = torch.fft.fft2(fourier_resample(band_limited_field(32), out_size).double()).abs()
    k = torch.sqrt(k1**2 + k2**2)
    assert spectrum[..., (k > 6) & ~above].max() > 1e-3 * spectrum.max()
    assert lin[..., (k > 6) & ~above].max() < 1e-6 * lin.max()


def test_filtered_activation_matches_the_continuous_activation() -> None:
    # Reference: LeakyReLU of the same function on a 512-point grid, low-passed to 32 points.
    u = band_limited_field(32)
    reference = fourier_resample(F.leaky_relu(band_limited_field(512), 0.01), (32, 32))
    filtered = FilteredLeakyReLU()(u)
    naive = F.leaky_relu(u, 0.01)
    err_filtered = (filtered - reference).abs().max()
    err_naive = (naive - reference).abs().max()
    assert err_filtered < 0.02
    assert err_filtered < 0.25 * err_naive


def test_filtered_activation_is_equivariant_to_subpixel_shifts() -> None:
    act = FilteredLeakyReLU()
    shift = 0.3
    out, out_shifted = act(band_limited_field(32)), act(band_limited_field(32, shift))
    err = (fourier_shift(out, shift) - out_shifted).abs().max()
    naive = F.leaky_relu(band_limited_field(32), 0.01)
    naive_shifted = F.leaky_relu(band_limited_field(32, shift), 0.01)
    err_naive = (fourier_shift(naive, shift) - naive_shifted).abs().max()
    assert err < 0.03
    assert err < 0.3 * err_naive


def test_unknown_resampling_is_rejected() -> None:
    with pytest.raises(ValueError, match="resampling"):
        CNO(1, 1, 1, 1, resampling="nearest")


@pytest.mark.parametrize(("height", "width"), [(32, 48), (24, 40)])
def test_cno_grids_latent_and_skips(height: int, width: int) -> None:
    torch.manual_seed(0)
    model = CNO(3, 2, 2, 1, num_levels=2, channel_multiplier=8, lift_project_width=8).eval()
    x = torch.randn(2, 3, 2, height, width)
    enc = model.encode(x)
    assert model.latent_dim == 16
    assert enc.z.shape == (2, 16, height // 4, width // 4)
    assert [s.shape for s in enc.extras] == [
        (2, 4, height, width),
        (2, 8, height // 2, width // 2),
    ]
    y = model(x)
    assert y.shape == (2, 2, 1, height, width)
    torch.testing.assert_close(model.decode(model.translate(enc)), y)


def test_check_grid_names_the_allowed_sizes() -> None:
    model = CNO(1, 1, 1, 1, num_levels=3, channel_multiplier=4, lift_project_width=4)
    model.check_grid(40, 24)
    with pytest.raises(ValueError, match=r"30x48 is not allowed.*multiples of 8"):
        model(torch.randn(1, 1, 1, 30, 48))


def test_bicubic_variant_without_batch_norm_trains_every_parameter() -> None:
    torch.manual_seed(0)
    model = CNO(
        2,
        1,
        1,
        2,
        num_levels=2,
        channel_multiplier=4,
        lift_project_width=4,
        batch_norm=False,
        resampling="bicubic",
    )
    y = model(torch.randn(2, 2, 1, 16, 24))
    assert y.shape == (2, 1, 2, 16, 24)
    y.pow(2).mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_presets() -> None:
    paper = yaml.safe_load((CONFIGS / "cno_paper.yaml").read_text())["model"]["backbone"]
    assert paper["class_path"] == "beamvq.backbones.CNO"
    assert count_parameters(CNO(**paper["init_args"])) == 2_606_929
    quick = yaml.safe_load((CONFIGS / "cno.yaml").read_text())["model"]["backbone"]["init_args"]
    assert count_parameters(CNO(**quick)) == 286_589
