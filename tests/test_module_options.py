"""ForecastModule options: the Surge learning-rate rule and the lat-lon metric accumulator."""

from __future__ import annotations

import pytest
import torch

from beamvq import metrics
from beamvq.backbones import ResNet
from beamvq.evaluation import LatLonMetrics
from beamvq.module import ForecastModule
from beamvq.optim import LRSchedule
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
