"""The papers' two-stage model (``beamvq.two_stage.TwoStage``) and its capacity-matched control:
shapes, K distinct candidates, identical trainable parameters with and without the bottleneck,
gradients into every part, the base forecast at initialisation, exact parameter counts, and the
two shipped configs parsed through the CLI."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from beamvq.backbones import SimVPv2
from beamvq.backbones.base import count_parameters
from beamvq.bottleneck import VQBottleneck
from beamvq.model import VQForecaster
from beamvq.two_stage import TwoStage, parameter_counts

ROOT = Path(__file__).resolve().parents[1]
T_IN, T_OUT, H = 3, 2, 16


def tiny_base() -> SimVPv2:
    return SimVPv2(T_IN, T_OUT, 1, 1, hid_s=4, hid_t=8, n_s=2, n_t=1, mlp_ratio=2.0)


def tiny_two_stage(residual: bool = True) -> TwoStage:
    return TwoStage(
        tiny_base(), hidden=4, latent_dim=4, downsample=1, res_blocks=1, refiner_hidden=8,
        refiner_depth=1, mlp_ratio=2.0, residual=residual,
    )  # fmt: skip


def bottleneck(codes: int = 16) -> functools.partial[VQBottleneck]:
    return functools.partial(VQBottleneck, codebook_size=codes, kmeans_init=False)


def window(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, T_IN, 1, H, H, generator=torch.Generator().manual_seed(0))


def test_shapes_and_latent() -> None:
    ts = tiny_two_stage()
    x = window()
    enc = ts.encode(x)
    # one latent_dim-vector per output frame and position of the VQ-VAE's halved grid
    assert enc.z.shape == (2, 4, T_OUT, H // 2, H // 2)
    assert enc.extras.shape == (2, T_OUT, 1, H, H)  # the base forecast, for the residual
    assert ts(x).shape == (2, T_OUT, 1, H, H)
    assert VQForecaster(ts, bottleneck())(x).y.shape == (2, T_OUT, 1, H, H)
    deeper = TwoStage(tiny_base(), hidden=4, latent_dim=4, downsample=2, refiner_depth=1)
    assert deeper.encode(x).z.shape == (2, 4, T_OUT, H // 4, H // 4)
    with pytest.raises(ValueError, match="TwoStage: grid 18x18 .* multiples of 4"):
        deeper.check_input(torch.randn(1, T_IN, 1, 18, 18))  # the base allows 18, the VQ-VAE not
    deeper.base.check_input(torch.randn(1, T_IN, 1, 18, 18))
    with pytest.raises(ValueError, match="T_in=3"):
        ts.check_input(torch.randn(1, T_IN + 1, 1, H, H))


def test_zero_initialised_correction_returns_the_base_forecast() -> None:
    torch.manual_seed(0)
    ts = tiny_two_stage()
    x = window()
    for model in (VQForecaster(ts), VQForecaster(ts, bottleneck())):
        model.eval()
        with torch.no_grad():
            assert torch.equal(model(x).y, ts.base(x))
            cands = model.candidates(x, 3) if model.bottleneck is not None else None
        if cands is not None:  # every candidate too: the correction is zero whatever the code
            assert torch.equal(cands, ts.base(x).unsqueeze(1).expand_as(cands))
    # the authors' form (no residual) reconstructs from the latent: not the base forecast
    plain = tiny_two_stage(residual=False).eval()
    with torch.no_grad():
        assert not torch.allclose(plain(x), plain.base(x))


def test_candidates_are_k_distinct_forecasts() -> None:
    torch.manual_seed(0)
    ts = tiny_two_stage()
    torch.nn.init.normal_(ts.vq_decoder.readout.weight, std=0.5)  # as after training starts
    model = VQForecaster(ts, bottleneck()).eval()
    x = window()
    with torch.no_grad():
        cands = model.candidates(x, 4)
        y = model(x).y
    assert cands.shape == (2, 4, T_OUT, 1, H, H)
    assert torch.allclose(cands[:, 0], y, atol=1e-6)  # candidate 0 is the nearest-code forecast
    flat = cands.flatten(2)
    for i in range(4):
        for j in range(i + 1, 4):
            assert (flat[:, i] - flat[:, j]).abs().amax(1).min() > 1e-4, (i, j)
    with pytest.raises(ValueError, match="needs a VQ bottleneck"):
        VQForecaster(tiny_two_stage()).candidates(x, 2)


def test_control_has_the_same_parameters_as_the_vq_arm_minus_the_bottleneck() -> None:
    torch.manual_seed(0)
    vq = VQForecaster(tiny_two_stage(), bottleneck())
    torch.manual_seed(0)
    control = VQForecaster(tiny_two_stage(), None)
    assert vq.bottleneck is not None
    assert count_parameters(control) == count_parameters(vq) - count_parameters(vq.bottleneck)
    # the EMA bottleneck trains nothing through the optimizer: the two arms are exactly matched
    assert count_parameters(vq.bottleneck) == 0
    assert count_parameters(control) == count_parameters(vq)
    # a bottleneck with trainable parts (a learned offset scale) is the one difference
    learned = VQForecaster(
        tiny_two_stage(),
        functools.partial(
            VQBottleneck, codebook_size=16, kmeans_init=False, forecast_path="continuous",
            learn_offset_scale=True,
        ),
    )  # fmt: skip
    assert count_parameters(learned) - count_parameters(control) == 1
    assert parameter_counts(learned)["bottleneck"] == 1


def test_gradients_reach_the_base_the_vqvae_and_the_refiner() -> None:
    torch.manual_seed(0)
    ts = tiny_two_stage()
    model = VQForecaster(ts, bottleneck()).train()
    x, y = window(), torch.randn(2, T_OUT, 1, H, H)
    # at initialisation the zero readout passes gradient to itself and to the base only
    (model(x).y - y).pow(2).mean().backward()
    assert ts.vq_decoder.readout.weight.grad.abs().sum() > 0
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in ts.refiner.parameters())
    model.zero_grad(set_to_none=True)
    torch.nn.init.normal_(ts.vq_decoder.readout.weight, std=0.1)  # after a first step
    out = model(x)
    loss = (
        (out.y - y).pow(2).mean()
        + out.aux_loss
        + (model.candidates(x, 3) - y[:, None]).pow(2).mean()
    )
    loss.backward()
    for name, part in (
        ("base", ts.base),
        ("vq_encoder", ts.vq_encoder),
        ("refiner", ts.refiner),
        ("vq_decoder", ts.vq_decoder),
    ):
        grads = [p.grad for p in part.parameters() if p.grad is not None]
        assert grads and sum(float(g.abs().sum()) for g in grads) > 0, name
    # the control trains the same parts without a bottleneck
    control = VQForecaster(tiny_two_stage()).train()
    torch.nn.init.normal_(control.backbone.vq_decoder.readout.weight, std=0.1)
    (control(x).y - y).pow(2).mean().backward()
    assert control.backbone.vq_encoder.layers[0].conv.weight.grad.abs().sum() > 0


def test_parameter_counts_exact() -> None:
    base = tiny_base()
    n_base = count_parameters(base)
    ts = TwoStage(
        base, hidden=4, latent_dim=4, downsample=1, res_blocks=1, refiner_hidden=8,
        refiner_depth=1, mlp_ratio=2.0,
    )  # fmt: skip
    # VQ-VAE encoder: ConvNormAct 1->4 (3x3 + GroupNorm) 36+4+8, ResidualBlock(4) 2x(144+8),
    # pre-VQ 1x1 4->4: 16+4; total 48 + 304 + 20 = 372
    assert count_parameters(ts.vq_encoder) == 372
    # refiner: one gSTA block at width T_OUT * 4 = 8, MLP 16 wide (in = out width: no 1x1):
    # 2 BatchNorms 32, attention 896 (1x1s 72 + 72, depthwise 5x5 208 and 7x7 400, gate 1x1
    # 8->16 144), MLP 440 (144 + 160 + 136), layer scales 16
    assert count_parameters(ts.refiner) == 1384
    # VQ-VAE decoder: 3x3 4->4 148, ResidualBlock 304, ConvNormAct upsample 4->16 (3x3) 592+8,
    # readout 1x1 4->1: 5; total 148 + 304 + 600 + 5 = 1057
    assert count_parameters(ts.vq_decoder) == 1057
    extra = 372 + 1384 + 1057
    counts = parameter_counts(VQForecaster(ts, bottleneck(16)))
    assert counts == {
        "base": n_base, "extra_stage": extra, "bottleneck": 0, "codebook": 16 * 4,
        "total": n_base + extra,
    }  # fmt: skip
    assert parameter_counts(ts) == {**counts, "codebook": 0}
    plain = SimVPv2(T_IN, T_OUT, 1, 1, hid_s=4, hid_t=8, n_s=2, n_t=1)
    assert parameter_counts(plain) == {
        "base": count_parameters(plain), "extra_stage": 0, "bottleneck": 0, "codebook": 0,
        "total": count_parameters(plain),
    }  # fmt: skip
    with pytest.raises(TypeError, match="parameter_counts"):
        parameter_counts(torch.nn.Linear(2, 2))


# -- the shipped configs, through the CLI ------------------------------------------------------


def parse(*configs: str) -> pl.LightningModule:
    from beamvq.cli import BeamVQCLI
    from beamvq.module import ForecastModule

    args = [item for c in configs for item in ("--config", str(ROOT / c))]
    cli = BeamVQCLI(
        ForecastModule, pl.LightningDataModule, subclass_mode_model=False,
        subclass_mode_data=True, auto_configure_optimizers=False, run=False,
        args=[*args, "--trainer.logger", "false", "--trainer.callbacks", "[]"],
    )  # fmt: skip
    return cli.model


def test_shipped_configs_build_the_two_arms_with_matched_parameters() -> None:
    vq = parse("configs/quickstart.yaml", "configs/beamvq/two_stage.yaml")
    control = parse("configs/quickstart.yaml", "configs/beamvq/two_stage_control.yaml")
    for module in (vq, control):
        bb = module.model.backbone
        assert type(bb) is TwoStage and type(bb.base) is SimVPv2 and bb.residual
        assert (bb.base.hid_s, bb.latent_dim, bb.downsample, bb.out_steps) == (16, 16, 2, 5)
    assert isinstance(vq.model.bottleneck, VQBottleneck) and control.model.bottleneck is None
    assert vq.model.bottleneck.forecast_path == "quantized"
    assert vq.model.bottleneck.vq.commitment_weight == 0.25
    assert (vq.candidate_k, vq.loss_config.candidate_weight) == (4, 4.0)
    assert control.loss_config.candidate_weight == 0.0
    # the numbers the YAML comments and the module docstring quote
    assert parameter_counts(vq) == {
        "base": 276_097, "extra_stage": 188_321, "bottleneck": 0, "codebook": 512 * 16,
        "total": 464_418,
    }  # fmt: skip
    assert parameter_counts(control) == {**parameter_counts(vq), "codebook": 0}


def test_control_config_drops_the_search_callback(capsys: pytest.CaptureFixture) -> None:
    from beamvq.cli import main

    for name, searched in (("two_stage", True), ("two_stage_control", False)):
        with pytest.raises(SystemExit):
            main(
                [
                    "fit", "--config", str(ROOT / "configs/quickstart.yaml"), "--config",
                    str(ROOT / f"configs/beamvq/{name}.yaml"), "--print_config",
                ]
            )  # fmt: skip
        out = capsys.readouterr().out
        for callback in ("BeamSearchAugmentation", "CodebookUsageReport", "AugmentationReport"):
            assert (callback in out) is searched, (name, callback)
        assert f"default_root_dir: runs/{name}" in out and "runs/quickstart" not in out
        assert "class_path: beamvq.two_stage.TwoStage" in out


def test_experiment_arms_two_stage_and_control_match_and_are_counted() -> None:
    """The fair protocol's arms (configs/experiments/arms/two_stage.yaml, control.yaml) wrap the
    experiment's U-Net with the same trainable parameters; the runner's checkpoint counter
    (benchmarks/experiment.py ``trainable_numel``, buffers excluded) agrees with them."""
    import sys

    from beamvq.backbones import UNet

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import experiment

    base = parse("configs/experiments/ns_scarce.yaml")
    arms = {
        name: parse("configs/experiments/ns_scarce.yaml", f"configs/experiments/arms/{name}.yaml")
        for name in ("two_stage", "control", "vq")
    }
    for name in ("two_stage", "control"):
        bb = arms[name].model.backbone
        assert type(bb) is TwoStage and type(bb.base) is UNet, name
        assert (bb.in_steps, bb.out_steps, arms[name].rollout_steps) == (4, 2, 4)
    assert arms["control"].model.bottleneck is None
    assert arms["two_stage"].model.bottleneck.forecast_path == "quantized"
    counts = {n: parameter_counts(m) for n, m in arms.items()}
    assert counts["two_stage"]["total"] == counts["control"]["total"]
    assert counts["two_stage"]["base"] == parameter_counts(base)["total"]
    assert counts["two_stage"]["extra_stage"] > 0
    for name, module in [("base", base), *arms.items()]:
        trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
        assert experiment.trainable_numel(module.state_dict()) == trainable, name
    # the vq arm adds only the learned offset scale to the base's trainable parameters
    assert counts["vq"]["total"] == parameter_counts(base)["total"] + 1
