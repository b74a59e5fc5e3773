"""ForecastModule options: the Surge learning-rate rule, the lat-lon metric accumulator, the exact
values of the loss terms, the grouped arguments, the optimizer's construction, and checkpoints of
the layout before ``beamvq.normalization``."""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from beamvq import metrics
from beamvq.backbones import ResNet
from beamvq.bottleneck import VQBottleneck
from beamvq.checkpointing import CKPT_KEY, save_state
from beamvq.ensemble import EnsembleConfig
from beamvq.evaluation import LatLonMetrics
from beamvq.faults import FaultConfig
from beamvq.module import ForecastModule, LossConfig
from beamvq.optim import LRSchedule, ParamGroup
from beamvq.tuning import lr_for_batch


class _DM:
    batch_size = 32


class _Trainer:
    datamodule = _DM()
    world_size = 2
    accumulate_grad_batches = 2


def test_surge_rule_sets_the_learning_rate_for_the_global_batch(monkeypatch) -> None:
    module = ForecastModule(
        ResNet(2, 2, 1, 1, width=8, n_blocks=2, norm_groups=4),
        lr_schedule=LRSchedule(scheduler="none", reference_batch_size=16, b_noise=64.0),
    )
    monkeypatch.setattr(ForecastModule, "trainer", property(lambda self: _Trainer()))
    opt = module.configure_optimizers()
    expected = lr_for_batch(32 * 2 * 2, 16, 1e-3, 64.0)
    assert opt.param_groups[0]["lr"] == pytest.approx(expected)
    # 128 is past B_noise = 64: the rule lowers the rate below the peak
    assert expected < lr_for_batch(64, 16, 1e-3, 64.0)


def test_surge_rule_arguments_go_together() -> None:
    with pytest.raises(ValueError, match="reference_batch_size and model.lr_schedule.b_noise"):
        ForecastModule(
            ResNet(2, 2, 1, 1, width=8, n_blocks=2, norm_groups=4),
            lr_schedule=LRSchedule(b_noise=10.0),
        )


def test_latlon_metrics_pool_like_the_functions() -> None:
    torch.manual_seed(0)
    lat = torch.linspace(-80, 80, 6)
    clim = torch.randn(2, 6, 8)
    m = LatLonMetrics(3)
    preds, targets = [], []
    for _ in range(2):
        p, t = torch.randn(4, 3, 2, 6, 8), torch.randn(4, 3, 2, 6, 8)
        m.update(p, t, lat, clim)
        preds.append(p)
        targets.append(t)
    out = m.compute()
    p, t = torch.cat(preds), torch.cat(targets)
    torch.testing.assert_close(
        torch.stack([out[f"lat_rmse_lead{i + 1}"] for i in range(3)]),
        metrics.lat_weighted_rmse(p, t, lat),
        rtol=1e-5,
        atol=1e-6,
    )
    acc = metrics.lat_weighted_acc(p, t, clim, lat)
    torch.testing.assert_close(out["acc"], acc.mean(), rtol=1e-5, atol=1e-6)


# -- the loss: exact values of its terms ---------------------------------------------------------

T_IN, T_OUT, K = 2, 2, 3


def vq_module(**kwargs: Any) -> ForecastModule:
    """A small VQ module in eval mode: the code bank does not move, so repeated forwards agree."""
    torch.manual_seed(0)
    bottleneck = functools.partial(VQBottleneck, codebook_size=16, kmeans_init=False)
    backbone = ResNet(T_IN, T_OUT, 1, 1, width=8, n_blocks=1)
    return ForecastModule(backbone, bottleneck, candidate_k=K, **kwargs).eval()


def fields(steps: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, T_IN, 1, 16, 16, generator=g)
    return x, torch.randn(2, steps * T_OUT, 1, 16, 16, generator=g)


def test_pool_weight_term_is_the_weighted_mean_of_the_sample_errors() -> None:
    module = vq_module()
    x, y = fields()
    w = 0.3  # a pool sample's weight beside a real window's 1
    with torch.no_grad():
        loss = module.compute_loss(x, y, torch.tensor([1.0, w]), True)
        pred = module.model(x).y
    torch.testing.assert_close(loss.pred, pred, rtol=0, atol=0)
    per_sample = ((pred.double() - y.double()) ** 2).mean(dim=(1, 2, 3, 4))
    expected = (per_sample[0] + w * per_sample[1]) / (1 + w)
    assert float(loss.parts["mse_norm"]) == pytest.approx(float(expected), rel=1e-6)
    assert abs(float(expected) - float(per_sample.mean())) > 1e-3  # the weight matters here
    # no candidate term: the loss is the weighted MSE plus the commitment loss
    torch.testing.assert_close(loss.total, loss.parts["mse_norm"] + loss.parts["commitment"])


def test_candidate_term_is_the_weighted_mean_error_of_the_k_candidates() -> None:
    module = vq_module(loss=LossConfig(candidate_weight=0.25))
    x, y = fields()
    weight = torch.tensor([1.0, 0.5])
    with torch.no_grad():
        loss = module.compute_loss(x, y, weight, True)
        cands = module.model.candidates(x, K)  # (B, K, T_out, C, H, W)
    assert cands.shape == (2, K, T_OUT, 1, 16, 16)
    per_sample = ((cands.double() - y.double()[:, None]) ** 2).mean(dim=(2, 3, 4, 5)).mean(1)
    expected = (weight.double() * per_sample).sum() / weight.sum()
    assert float(loss.parts["candidate_mse"]) == pytest.approx(float(expected), rel=1e-6)
    # the candidates are not all the forecast: the term differs from the forecast MSE
    assert abs(float(loss.parts["candidate_mse"]) - float(loss.parts["mse_norm"])) > 1e-3
    parts = loss.parts
    total = parts["mse_norm"] + parts["commitment"] + 0.25 * parts["candidate_mse"]
    torch.testing.assert_close(loss.total, total)
    # evaluation leaves the training-only term out
    with torch.no_grad():
        assert "candidate_mse" not in module.compute_loss(x, y, weight, False).parts


def test_first_step_loss_sees_only_the_first_steps_frames() -> None:
    module = vq_module(rollout_steps=2, loss=LossConfig(rollout="first"))
    x, y = fields(steps=2)
    ones = torch.ones(2)
    later = y.clone()
    later[:, T_OUT:] += 100.0  # the second step's target: outside the loss
    with torch.no_grad():
        first = module.compute_loss(x, y, ones, True)
        moved = module.compute_loss(x, later, ones, True)
        evaluated = module.compute_loss(x, y, ones, False)
        pred = module.model(x).y
    assert first.pred.shape == (2, T_OUT, 1, 16, 16)
    torch.testing.assert_close(first.pred, pred, rtol=0, atol=0)
    expected = ((pred.double() - y[:, :T_OUT].double()) ** 2).mean()
    assert float(first.parts["mse_norm"]) == pytest.approx(float(expected), rel=1e-6)
    assert torch.equal(first.total, moved.total)
    # validation/test still score the whole two-step rollout
    assert evaluated.pred.shape == (2, 2 * T_OUT, 1, 16, 16)
    full = ((evaluated.pred.double() - y.double()) ** 2).mean()
    assert float(evaluated.parts["mse_norm"]) == pytest.approx(float(full), rel=1e-6)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: LossConfig(rollout="last"), "model.loss.rollout"),  # type: ignore[arg-type]
        (lambda: LossConfig(candidate_weight=-1.0), "model.loss.candidate_weight"),
        (lambda: FaultConfig(max_consecutive_skips=0), "model.faults.max_consecutive_skips"),
        (lambda: LRSchedule(scheduler="linear"), "model.lr_schedule.scheduler"),  # type: ignore[arg-type]
        (lambda: LRSchedule(scheduler="none", min_lr=1e-4), "model.lr_schedule.min_lr"),
        (lambda: ParamGroup("model.*", lr_scale=0.0), "lr_scale"),
        (lambda: EnsembleConfig(members=-1), "model.ensemble.members"),
        (lambda: ForecastModule(ResNet(2, 2, 1, 1, width=8), loss=LossConfig(candidate_weight=0.1)),
         "model.loss.candidate_weight > 0 needs a model.bottleneck"),
        (lambda: ForecastModule(ResNet(2, 2, 1, 1, width=8), ensemble=EnsembleConfig(members=2)),
         "model.ensemble.members > 1 needs a model.bottleneck"),
    ],
)  # fmt: skip
def test_grouped_arguments_name_their_yaml_key(make: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make()


# -- the optimizer: injection, parameter groups, schedule ------------------------------------------


def fake_trainer(monkeypatch: pytest.MonkeyPatch, max_epochs: int = 5) -> None:
    trainer = type("T", (_Trainer,), {"max_epochs": max_epochs})()
    monkeypatch.setattr(ForecastModule, "trainer", property(lambda self: trainer))


def test_default_optimizer_is_adamw_with_a_cosine_to_max_epochs(monkeypatch) -> None:
    module = vq_module()
    fake_trainer(monkeypatch, max_epochs=5)
    config = module.configure_optimizers()
    opt, sched = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert type(opt) is torch.optim.AdamW and len(opt.param_groups) == 1
    group = opt.param_groups[0]
    assert group["lr"] == 1e-3 and group["weight_decay"] == 0.0
    assert [id(p) for p in group["params"]] == [id(p) for p in module.parameters()]
    assert isinstance(sched, torch.optim.lr_scheduler.CosineAnnealingLR)
    assert sched.T_max == 5 and sched.eta_min == 0.0
    assert config["lr_scheduler"]["interval"] == "epoch"


def test_injected_optimizer_and_a_cosine_floor(monkeypatch) -> None:
    sgd = functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9)
    module = vq_module(optimizer=sgd, lr_schedule=LRSchedule(min_lr=0.01))
    fake_trainer(monkeypatch, max_epochs=4)
    config = module.configure_optimizers()
    opt, sched = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert type(opt) is torch.optim.SGD and opt.param_groups[0]["momentum"] == 0.9
    lrs = [opt.param_groups[0]["lr"]]
    for _ in range(4):
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    # cosine from 0.1 to the floor 0.01 at max_epochs: 0.01 + 0.09 (1 + cos(pi t / 4)) / 2
    expected = [0.01 + 0.09 * (1 + math.cos(math.pi * t / 4)) / 2 for t in range(5)]
    assert lrs == pytest.approx(expected, rel=1e-12)


def test_parameter_groups_scale_the_rate_and_the_surge_rule_applies_to_each(monkeypatch) -> None:
    groups = [ParamGroup("model.backbone.decoder_blocks.*", lr_scale=0.1, weight_decay=0.5)]
    schedule = LRSchedule(scheduler="none", reference_batch_size=16, b_noise=64.0)
    module = vq_module(param_groups=groups, lr_schedule=schedule)
    monkeypatch.setattr(ForecastModule, "trainer", property(lambda self: _Trainer()))
    opt = module.configure_optimizers()
    names = {id(p): n for n, p in module.named_parameters()}
    default, blocks = opt.param_groups
    assert all(names[id(p)].startswith("model.backbone.decoder_blocks.") for p in blocks["params"])
    assert not any("decoder_blocks" in names[id(p)] for p in default["params"])
    assert len(default["params"]) + len(blocks["params"]) == len(names)
    surge = lr_for_batch(32 * 2 * 2, 16, 1e-3, 64.0)
    assert default["lr"] == pytest.approx(surge, rel=1e-12)
    assert blocks["lr"] == pytest.approx(lr_for_batch(128, 16, 1e-4, 64.0), rel=1e-12)
    assert blocks["lr"] == pytest.approx(0.1 * surge, rel=1e-12)
    assert default["weight_decay"] == 0.0 and blocks["weight_decay"] == 0.5


def test_a_parameter_group_that_matches_nothing_is_named() -> None:
    with pytest.raises(ValueError, match=r"model.param_groups\[0\].pattern 'model.experts.\*'"):
        vq_module(param_groups=[ParamGroup("model.experts.*")])


def test_optimizer_from_the_cli_configuration(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """``model.optimizer`` is LightningCLI's dependency injection: a class path and its init args;
    the top-level ``optimizer:`` of LightningCLI is off (it would bypass the module's groups)."""
    from beamvq.cli import BeamVQCLI, main

    args = [
        "--model.backbone", "beamvq.backbones.ResNet", "--model.backbone.in_steps", "2",
        "--model.backbone.out_steps", "2", "--model.backbone.in_channels", "1",
        "--model.backbone.out_channels", "1", "--data", "pytorch_lightning.LightningDataModule",
        "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path),
    ]  # fmt: skip
    cli = BeamVQCLI(
        ForecastModule, pl.LightningDataModule, subclass_mode_model=False,
        subclass_mode_data=True, auto_configure_optimizers=False, run=False,
        args=[*args, "--model.optimizer", "torch.optim.SGD", "--model.optimizer.lr", "0.05"],
    )  # fmt: skip
    opt = cli.model.optimizer_factory(cli.model.parameters())
    assert type(opt) is torch.optim.SGD and opt.param_groups[0]["lr"] == 0.05
    # no optimizer in the configuration: the module's default, written out
    cli = BeamVQCLI(
        ForecastModule, pl.LightningDataModule, subclass_mode_model=False,
        subclass_mode_data=True, auto_configure_optimizers=False, run=False, args=args,
    )  # fmt: skip
    opt = cli.model.optimizer_factory(cli.model.parameters())
    assert type(opt) is torch.optim.AdamW
    assert opt.defaults["lr"] == 1e-3 and opt.defaults["weight_decay"] == 0.0
    with pytest.raises(SystemExit):
        main(["fit", *args, "--optimizer", "torch.optim.SGD"])
    assert "--optimizer" in capsys.readouterr().err


# -- checkpoints written before the Normalizer ------------------------------------------------------


def test_a_checkpoint_with_top_level_normalization_buffers_loads(tmp_path: Path) -> None:
    old = vq_module()
    old.set_normalization(np.array([0.5]), np.array([2.0]))
    state = old.state_dict()
    assert {"normalizer.mean", "normalizer.std", "normalizer.ready"} <= set(state)
    # the layout of checkpoints written before beamvq.normalization
    legacy = {
        {"normalizer.mean": "norm_mean", "normalizer.std": "norm_std"}.get(k, k): v
        for k, v in state.items()
    }
    legacy["norm_ready"] = legacy.pop("normalizer.ready")
    assert "lat_deg" in legacy and "climatology" in legacy  # still top level
    path = tmp_path / "old.ckpt"
    torch.save(
        {
            "state_dict": legacy,
            "hyper_parameters": {},
            "pytorch-lightning_version": pl.__version__,
            CKPT_KEY: save_state(old.model, None, 0),
        },
        path,
    )
    torch.manual_seed(1)  # other initial weights: the load must overwrite them
    bottleneck = functools.partial(VQBottleneck, codebook_size=16, kmeans_init=False)
    new = ForecastModule.load_from_checkpoint(
        path, backbone=ResNet(T_IN, T_OUT, 1, 1, width=8, n_blocks=1), bottleneck=bottleneck,
        candidate_k=K, weights_only=False,
    )  # fmt: skip
    assert new.normalizer.is_set
    assert float(new.normalizer.mean) == 0.5 and float(new.normalizer.std) == 2.0
    for k, v in state.items():
        torch.testing.assert_close(new.state_dict()[k], v, rtol=0, atol=0, msg=k)
    # a plain load_state_dict of the old layout works too (strict)
    fresh = vq_module()
    fresh.load_state_dict(legacy)
    assert float(fresh.normalizer.std) == 2.0
