"""FourCastNet-specific tests: grid checks, AFNO mixing semantics, latent split, presets."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from beamvq.backbones.base import count_parameters
from beamvq.backbones.fourcastnet import FourCastNet
from beamvq.nn.moe import MoEConfig, MoEFeedForward
from beamvq.nn.spectral import AFNOMixing

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "backbones"


def identity_afno(dim: int, num_blocks: int, threshold: float, fraction: float) -> AFNOMixing:
    """AFNO mixing with W1 = W2 = I (block-diagonal), zero biases."""
    mixing = AFNOMixing(dim, num_blocks, threshold, fraction)
    eye = torch.eye(dim // num_blocks).expand(num_blocks, -1, -1)
    with torch.no_grad():
        for w in (mixing.w1, mixing.w2):
            w.zero_()
            w[0] = eye
        mixing.b1.zero_()
        mixing.b2.zero_()
    return mixing


def cosine_tokens(height: int, width: int, modes: list[tuple[int, int, float]]) -> torch.Tensor:
    """``(1, H, W, 1)``: sum of ``a cos(2π(k1 i / H + k2 j / W))``, all spectral coefficients >= 0."""
    i = torch.arange(height, dtype=torch.float64).view(-1, 1)
    j = torch.arange(width, dtype=torch.float64).view(1, -1)
    field = sum(
        a * torch.cos(2 * math.pi * (k1 * i / height + k2 * j / width)) for k1, k2, a in modes
    )
    return field.float().view(1, height, width, 1)


def test_construction_on_a_bad_grid_names_the_allowed_sizes() -> None:
    with pytest.raises(ValueError, match=r"grid 30x48 is not allowed.*multiples of 4.*28x48"):
        FourCastNet(1, 1, 1, 1, height=30, width=48, patch_size=4)


def test_check_grid_messages() -> None:
    model = FourCastNet(
        1, 1, 1, 1, height=32, width=48, patch_size=4, embed_dim=16, depth=1, encoder_depth=1
    )
    model.check_grid(32, 48)
    with pytest.raises(ValueError, match=r"grid 32x50 is not allowed.*multiples of 4"):
        model.check_grid(32, 50)
    with pytest.raises(ValueError, match=r"built for 32x48.*height=16, width=24"):
        model(torch.randn(1, 1, 1, 16, 24))


def test_identity_afno_without_sparsity_passes_non_negative_spectra() -> None:
    x = cosine_tokens(16, 24, [(0, 0, 0.5), (2, 3, 1.0), (-1, 5, 0.25)]).expand(2, 16, 24, 8)
    mixing = identity_afno(8, 2, threshold=0.0, fraction=1.0)
    with torch.no_grad():
        torch.testing.assert_close(mixing(x), x, atol=1e-5, rtol=0)


def test_identity_afno_applies_relu_to_real_and_imaginary_parts() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 12, 16, 8)
    x_ft = torch.fft.rfft2(x, dim=(1, 2), norm="ortho")
    expected = torch.fft.irfft2(
        torch.complex(F.relu(x_ft.real), F.relu(x_ft.imag)), s=(12, 16), dim=(1, 2), norm="ortho"
    )
    with torch.no_grad():
        out = identity_afno(8, 4, threshold=0.0, fraction=1.0)(x)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    assert (out - x).abs().max() > 0.1


def test_soft_shrinkage_shrinks_every_coefficient_by_lambda() -> None:
    # One cosine of amplitude a on an H x W grid has two rfft coefficients of a * sqrt(HW) / 2
    # (ortho norm); when both sit in the stored half, shrinking each by λ scales the wave by
    # 1 - 2λ / (a sqrt(HW)).
    height, width, amplitude, lam = 16, 16, 1.0, 0.5
    x = cosine_tokens(height, width, [(3, 2, amplitude)])
    with torch.no_grad():
        out = identity_afno(8, 8, threshold=lam, fraction=1.0)(x.expand(1, height, width, 8))
    factor = 1 - 2 * lam / (amplitude * math.sqrt(height * width))
    torch.testing.assert_close(out[..., :1], factor * x, atol=1e-5, rtol=0)
    with torch.no_grad():
        silent = identity_afno(8, 8, threshold=10.0, fraction=1.0)(x.expand(1, height, width, 8))
    assert silent.abs().max() < 1e-6


def test_hard_thresholding_keeps_the_low_modes() -> None:
    low = cosine_tokens(16, 16, [(2, 1, 1.0), (0, 0, 0.5)])
    high = cosine_tokens(16, 16, [(6, 1, 1.0), (1, 7, 1.0)])
    mixing = identity_afno(8, 2, threshold=0.0, fraction=0.5)
    assert mixing.kept_mask(16, 16, torch.device("cpu")).sum() == 9 * 5
    with torch.no_grad():
        out = mixing((low + high).expand(1, 16, 16, 8))
    torch.testing.assert_close(out, low.expand(1, 16, 16, 8), atol=1e-5, rtol=0)


def test_afno_channel_mixing_is_block_diagonal() -> None:
    torch.manual_seed(0)
    mixing = AFNOMixing(8, num_blocks=2, sparsity_threshold=0.0)
    x = torch.randn(1, 8, 8, 8)
    bumped = x.clone()
    bumped[..., 1] += torch.randn(8, 8)  # channel 1 lies in block 0 (channels 0-3)
    with torch.no_grad():
        delta = mixing(bumped) - mixing(x)
    assert delta[..., :4].abs().max() > 1e-4
    assert delta[..., 4:].abs().max() < 1e-6


def test_fourcastnet_latent_split_and_gradients() -> None:
    torch.manual_seed(0)
    model = FourCastNet(
        3,
        2,
        2,
        1,
        height=32,
        width=48,
        patch_size=4,
        embed_dim=16,
        depth=3,
        encoder_depth=1,
        num_blocks=4,
    )
    x = torch.randn(2, 3, 2, 32, 48)
    enc = model.encode(x)
    assert model.latent_dim == 16
    assert enc.z.shape == (2, 16, 8, 12)
    y = model(x)
    assert y.shape == (2, 2, 1, 32, 48)
    torch.testing.assert_close(model.decode(model.translate(enc)), y)
    y.pow(2).mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_encoder_depth_outside_range_is_rejected() -> None:
    with pytest.raises(ValueError, match="encoder_depth"):
        FourCastNet(1, 1, 1, 1, height=8, width=8, depth=2, encoder_depth=3)


def test_presets() -> None:
    quick = yaml.safe_load((CONFIGS / "fourcastnet.yaml").read_text())["model"]["backbone"]
    assert quick["class_path"] == "beamvq.backbones.FourCastNet"
    assert count_parameters(FourCastNet(**quick["init_args"])) == 169_280
    paper = yaml.safe_load((CONFIGS / "fourcastnet_paper.yaml").read_text())["model"]["backbone"]
    args = paper["init_args"]
    assert (args["patch_size"], args["embed_dim"], args["depth"], args["num_blocks"]) == (
        8,
        768,
        12,
        8,
    )
    # Built on the meta device: the count needs shapes only, not 62 M random numbers.
    with torch.device("meta"):
        assert count_parameters(FourCastNet(**args)) == 62_347_008
        published_grid = {**args, "height": 720, "width": 1440}
        assert count_parameters(FourCastNet(**published_grid)) == 74_690_304


# -- MoE off: the published block, bit for bit ---------------------------------------------------
# Pinned from the code before the MoE option existed (commit a43737c): seed 0 weights, seed 1
# input, eval forward. With ``moe=None`` the backbone must build the same parameters in the same
# order (same state_dict, same initial values) and give the same outputs.
FOURCASTNET_DENSE_PARAMS = 6576
FOURCASTNET_DENSE_KEYS = 28
FOURCASTNET_DENSE_SUM = -19.00713195875869
FOURCASTNET_DENSE_VALUES = [
    -0.0383106,
    0.0165158,
    0.0058688,
    -0.3005597,
    0.4581507,
    0.2261470,
    0.1616922,
    -0.2855695,
    0.0814495,
    0.0234391,
    -0.2407655,
    0.1912751,
    0.2401803,
    -0.2261055,
    -0.1532551,
    -0.0946062,
    0.2808006,
]  # y.flatten()[::61]


def test_moe_off_is_the_dense_model_of_before() -> None:
    torch.manual_seed(0)
    model = FourCastNet(
        3,
        2,
        1,
        1,
        height=16,
        width=16,
        patch_size=4,
        embed_dim=16,
        depth=2,
        encoder_depth=1,
        num_blocks=4,
    )
    assert not any(isinstance(m, MoEFeedForward) for m in model.modules())
    assert count_parameters(model) == FOURCASTNET_DENSE_PARAMS
    assert len(model.state_dict()) == FOURCASTNET_DENSE_KEYS
    torch.manual_seed(1)
    x = torch.randn(2, 3, 1, 16, 16)
    with torch.no_grad():
        y = model.eval()(x)
    assert float(y.double().sum()) == pytest.approx(FOURCASTNET_DENSE_SUM, abs=1e-3)
    torch.testing.assert_close(
        y.flatten()[::61], torch.tensor(FOURCASTNET_DENSE_VALUES), rtol=0, atol=1e-5
    )
    # a state_dict of the dense model loads into a freshly built dense model: same output
    again = FourCastNet(
        3,
        2,
        1,
        1,
        height=16,
        width=16,
        patch_size=4,
        embed_dim=16,
        depth=2,
        encoder_depth=1,
        num_blocks=4,
    )
    again.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(again.eval()(x), y)


def test_moe_replaces_only_the_mlps() -> None:
    torch.manual_seed(0)
    dense = FourCastNet(
        3,
        2,
        1,
        1,
        height=16,
        width=16,
        patch_size=4,
        embed_dim=16,
        depth=2,
        encoder_depth=1,
        num_blocks=4,
    )
    moe = FourCastNet(
        3,
        2,
        1,
        1,
        height=16,
        width=16,
        patch_size=4,
        embed_dim=16,
        depth=2,
        encoder_depth=1,
        num_blocks=4,
        moe=MoEConfig(),
    )
    dense_keys = {k for k in dense.state_dict() if ".mlp." not in k}
    moe_keys = {k for k in moe.state_dict() if ".mlp." not in k}
    assert dense_keys == moe_keys
    layers = [m for m in moe.modules() if isinstance(m, MoEFeedForward)]
    assert layers
    mlps = [k for k in dense.state_dict() if ".mlp." in k]
    assert len(mlps) == 4 * len(layers)  # two Linear layers (weight, bias) per dense MLP
