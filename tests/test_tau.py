"""TAU specifics: OpenSTL's parameter count, the static x dynamic attention, the shared SimVP
encoder/decoder, T_in != T_out and the differential divergence regularization."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from beamvq.backbones.base import count_parameters
from beamvq.backbones.simvp import SimVPv2
from beamvq.backbones.tau import DIFF_DIV_WEIGHT, TAU, tau_differential_divergence
from beamvq.nn.simvp import GatedLargeKernelAttention, TemporalAttentionUnit, tau_block

OPENSTL_TAU_MMNIST = 44.7e6  # OpenSTL model zoo, Moving MNIST 10 -> 10


def test_paper_preset_parameter_count_matches_openstl() -> None:
    # configs/mmnist/TAU.py: hid_S 64, hid_T 512, N_S 4, N_T 8 (meta device: no allocation).
    with torch.device("meta"):
        model = TAU(10, 10, 1, 1, hid_s=64, hid_t=512, n_s=4, n_t=8, mlp_ratio=8.0)
    n = count_parameters(model)
    assert n == 44_656_001
    assert abs(n - OPENSTL_TAU_MMNIST) / OPENSTL_TAU_MMNIST < 0.02
    assert round(n / 1e6, 1) == 44.7


def test_tau_differs_from_simvp_only_in_the_translator_attention() -> None:
    torch.manual_seed(0)
    tau = TAU(3, 3, 1, 1, hid_s=4, hid_t=16, n_s=2, n_t=2)
    simvp = SimVPv2(3, 3, 1, 1, hid_s=4, hid_t=16, n_s=2, n_t=2)
    kinds = {type(m) for m in tau.translator.modules()}
    assert TemporalAttentionUnit in kinds and GatedLargeKernelAttention not in kinds
    # Encoder and decoder are the same modules with the same shapes.
    enc_shapes = [p.shape for p in tau.encoder.parameters()]
    assert enc_shapes == [p.shape for p in simvp.encoder.parameters()]
    dec_shapes = [p.shape for p in tau.decoder.parameters()]
    assert dec_shapes == [p.shape for p in simvp.decoder.parameters()]


@pytest.mark.parametrize(("t_in", "t_out"), [(4, 4), (5, 2), (2, 5)])
def test_shapes_and_gradients(t_in: int, t_out: int) -> None:
    torch.manual_seed(0)
    model = TAU(t_in, t_out, 2, 3, hid_s=4, hid_t=16, n_s=2, n_t=2)
    x = torch.randn(2, t_in, 2, 16, 24)
    y = model(x)
    assert y.shape == (2, t_out, 3, 16, 24)
    assert model.encode(x).z.shape == (2, 4, t_in, 8, 12)
    (y * torch.randn_like(y)).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []


def test_temporal_attention_is_static_times_dynamic_times_input() -> None:
    torch.manual_seed(0)
    unit = TemporalAttentionUnit(8)
    x = torch.randn(2, 8, 9, 11)
    lk = unit.large_kernel
    static = F.conv2d(x, lk.local.weight, lk.local.bias, padding=2, groups=8)
    static = F.conv2d(static, lk.dilated.weight, lk.dilated.bias, padding=9, dilation=3, groups=8)
    static = F.conv2d(static, unit.proj.weight, unit.proj.bias)
    fc1, fc2 = unit.excite[0].weight, unit.excite[2].weight
    dynamic = torch.sigmoid(torch.relu(x.mean(dim=(2, 3)) @ fc1.T) @ fc2.T)
    expected = dynamic[:, :, None, None] * static * x
    torch.testing.assert_close(unit(x), expected)


def test_dynamic_attention_sees_the_whole_frame() -> None:
    # The squeeze-excitation pools globally, so a change far away alters every pixel's gate,
    # unlike the local static branch.
    torch.manual_seed(0)
    unit = TemporalAttentionUnit(8).eval()
    x = torch.randn(1, 8, 64, 64)
    x2 = x.clone()
    x2[..., 63, 63] += 50.0
    diff = (unit(x) - unit(x2))[..., :20, :20]
    assert diff.abs().max() > 0


@pytest.mark.parametrize(("dim", "squeeze"), [(640, 16), (512, 16), (64, 16), (32, 8)])
def test_squeeze_excitation_width_follows_openstl(dim: int, squeeze: int) -> None:
    # OpenSTL: reduction = max(dim // 16, 4); hidden = dim // reduction.
    assert TemporalAttentionUnit(dim).excite[0].out_features == squeeze


def test_tau_block_keeps_shape() -> None:
    block = tau_block(12, mlp_ratio=2.0).eval()
    x = torch.randn(2, 12, 7, 5)
    assert block(x).shape == x.shape


def _openstl_diff_div_reg(pred: torch.Tensor, true: torch.Tensor, tau: float) -> torch.Tensor:
    b, t = pred.shape[:2]
    gp = (pred[:, 1:] - pred[:, :-1]).reshape(b, t - 1, -1)
    gb = (true[:, 1:] - true[:, :-1]).reshape(b, t - 1, -1)
    p, q = F.softmax(gp / tau, -1), F.softmax(gb / tau, -1)
    return (p * torch.log(p / (q + 1e-12) + 1e-12)).mean()


def test_differential_divergence_values() -> None:
    torch.manual_seed(0)
    target = torch.randn(2, 5, 1, 6, 6)
    pred = target + 0.3 * torch.randn_like(target)
    loss = tau_differential_divergence(pred, target, tau=0.1)
    torch.testing.assert_close(loss, _openstl_diff_div_reg(pred, target, 0.1), rtol=1e-4, atol=1e-6)
    assert loss > 0
    # Zero for identical sequences, and for a constant offset per frame (same differences up to
    # a shift, which the softmax ignores).
    assert tau_differential_divergence(target, target).abs() < 1e-7
    offset = torch.arange(5.0).reshape(1, 5, 1, 1, 1)
    assert tau_differential_divergence(target + offset, target).abs() < 1e-6
    # A single frame has no differences.
    assert tau_differential_divergence(pred[:, :1], target[:, :1]) == 0


def test_differential_divergence_has_gradient_and_checks_shapes() -> None:
    target = torch.randn(1, 3, 2, 4, 4)
    pred = torch.randn(1, 3, 2, 4, 4, requires_grad=True)
    tau_differential_divergence(pred, target).backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="same shape"):
        tau_differential_divergence(pred, target[:, :2])
    with pytest.raises(ValueError, match="tau"):
        tau_differential_divergence(target, target, tau=0.0)


def test_differential_divergence_is_taus_default_training_term() -> None:
    # OpenSTL's TAU method: loss = MSE + alpha * diff_div_reg, alpha = 0.1
    assert DIFF_DIV_WEIGHT == 0.1
    torch.manual_seed(0)
    model = TAU(3, 4, 1, 1, hid_s=4, hid_t=16, n_s=2, n_t=2)
    assert model.diff_div_weight == 0.1
    x = torch.randn(2, 3, 1, 8, 8)
    model.begin_training_step(torch.zeros(2, 4, 1, 8, 8), 0.0)
    pred = model(x)
    y = pred.detach() + 0.3 * torch.randn_like(pred)
    extra = model.extra_loss(pred, y)
    assert torch.equal(extra, 0.1 * tau_differential_divergence(pred, y))
    # OpenSTL's formula (eps-clamped log ratio) agrees where no probability is below its eps
    torch.testing.assert_close(extra, 0.1 * _openstl_diff_div_reg(pred, y, 0.1), rtol=1e-4, atol=0)
    assert float(extra.detach()) > 0
    # the module's loss with the hook: the regularizer's gradient reaches the backbone
    (F.mse_loss(pred, y) + extra).backward()
    assert all(p.grad is not None for p in model.parameters())
    # switchable; T <= 2 gives no term, as OpenSTL's `if T <= 2: return 0`
    off = TAU(3, 4, 1, 1, hid_s=4, hid_t=16, n_s=2, n_t=2, diff_div_weight=0.0)
    assert float(off.extra_loss(pred, y)) == 0.0
    assert float(model.extra_loss(pred[:, :2], y[:, :2])) == 0.0
    with pytest.raises(ValueError, match="diff_div_weight must be >= 0"):
        TAU(3, 4, 1, 1, diff_div_weight=-1.0)
    # SimVP-v2 trains with the MSE alone
    simvp = SimVPv2(3, 4, 1, 1, hid_s=4, hid_t=16, n_s=2, n_t=2)
    assert float(simvp.extra_loss(pred, y)) == 0.0


def test_tau_yaml_configs_build_with_the_regularizer() -> None:
    configs = Path(__file__).resolve().parents[1] / "configs" / "backbones"
    for name in ("tau.yaml", "tau_paper.yaml"):
        args = yaml.safe_load((configs / name).read_text())["model"]["backbone"]["init_args"]
        with torch.device("meta"):
            model = TAU(**args)
        assert model.diff_div_weight == args.get("diff_div_weight", 0.1) == 0.1
