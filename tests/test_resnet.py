"""ResNet specifics: the FNO-paper-sized preset, full-resolution latent on any grid, the
encoder/decoder split of the residual blocks, the basic block itself."""

from __future__ import annotations

import pytest
import torch

from beamvq.backbones.base import count_parameters
from beamvq.backbones.resnet import ResNet
from beamvq.nn.conv import ResidualBlock

FNO_RESNET_NS = 266_641  # FNO paper, Table 1 (Navier–Stokes)


def test_paper_preset_has_18_conv_layers_and_about_the_fno_size() -> None:
    model = ResNet(10, 1, 1, 1, width=42, n_blocks=8, norm_groups=6)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 18
    n = count_parameters(model)
    # lift 10*9*42 + GN 84; 8 blocks of 2 x (9*42*42 + 84); projection 42*9 + 1
    assert n == 10 * 9 * 42 + 84 + 8 * 2 * (9 * 42 * 42 + 84) + 42 * 9 + 1 == 259_603
    assert abs(n - FNO_RESNET_NS) / FNO_RESNET_NS < 0.03


@pytest.mark.parametrize(
    ("t_in", "t_out", "h", "w"), [(5, 5, 16, 16), (4, 2, 17, 23), (2, 6, 32, 48)]
)
def test_full_resolution_latent_on_any_grid(t_in: int, t_out: int, h: int, w: int) -> None:
    torch.manual_seed(0)
    model = ResNet(t_in, t_out, 2, 3, width=16, n_blocks=3, norm_groups=4)
    model.check_grid(h, w)  # no constraint
    x = torch.randn(2, t_in, 2, h, w)
    enc = model.encode(x)
    assert enc.z.shape == (2, 16, h, w) and model.latent_dim == 16
    assert enc.extras is None
    y = model.decode(model.translate(enc))
    assert y.shape == (2, t_out, 3, h, w)
    (y * torch.randn_like(y)).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []


def test_blocks_are_split_between_encoder_and_decoder() -> None:
    model = ResNet(2, 2, 1, 1, width=8, n_blocks=5)
    assert len(model.encoder_blocks) == 2 and len(model.decoder_blocks) == 3
    # The latent is what the decoder reads: changing it changes the forecast.
    model.eval()
    enc = model.encode(torch.randn(1, 2, 1, 8, 8))
    assert (model.decode(enc) - model.decode(enc._replace(z=enc.z * 0.5))).abs().max() > 1e-4


def test_time_is_stacked_in_channels() -> None:
    model = ResNet(3, 2, 2, 1, width=8, n_blocks=2)
    assert model.lift[0].in_channels == 6
    assert model.project.out_channels == 2


def test_residual_block_with_silenced_second_conv_is_relu_of_input() -> None:
    torch.manual_seed(0)
    block = ResidualBlock(8, norm_groups=4)
    x = torch.randn(2, 8, 6, 5)
    assert block(x).shape == x.shape
    with torch.no_grad():
        block.norm2.weight.zero_()  # the residual branch contributes its bias (0) only
    torch.testing.assert_close(block(x), torch.relu(x))


def test_invalid_hyper_parameters_raise() -> None:
    with pytest.raises(ValueError, match="norm_groups"):
        ResNet(2, 2, 1, 1, width=12, norm_groups=8)
    with pytest.raises(ValueError, match="kernel_size"):
        ResNet(2, 2, 1, 1, kernel_size=4)
    with pytest.raises(ValueError, match="n_blocks"):
        ResNet(2, 2, 1, 1, n_blocks=0)
