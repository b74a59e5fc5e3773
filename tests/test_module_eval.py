"""ForecastModule evaluation and ensembles: pooled CSI family and CSI-M per lead, pooled CRPS and
spread/skill in ``test``, rank-aligned and beam-searched ``predict`` members written to NetCDF."""

from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import xarray as xr

from beamvq import metrics, search
from beamvq.backbones import ResNet
from beamvq.bottleneck import VQBottleneck
from beamvq.callbacks.prediction_writer import NetCDFPredictionWriter
from beamvq.datamodules.config import LoaderConfig, SplitConfig, WindowConfig
from beamvq.datamodules.netcdf import NetCDFDataModule
from beamvq.datamodules.synthetic import NavierStokesGenerator, write_navier_stokes
from beamvq.ensemble import EnsembleConfig
from beamvq.evaluation import EnsembleMetrics, ForecastMetrics
from beamvq.module import ForecastModule

T_IN, T_OUT, STEPS, K = 2, 2, 2, 3


@pytest.fixture(scope="module")
def ns_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ns") / "ns.nc"
    write_navier_stokes(path, n_trajectories=6, resolution=16, n_frames=9, seed=1)
    return path


def make_dm(path: Path) -> NetCDFDataModule:
    return NetCDFDataModule(
        path=str(path), variables=["vorticity"], windows=WindowConfig(T_IN, T_OUT, STEPS),
        loader=LoaderConfig(batch_size=4), splits=SplitConfig(fractions=(0.5, 0.25, 0.25)),
        generator=NavierStokesGenerator(n_trajectories=6, resolution=16, n_frames=9),
    )  # fmt: skip


def make_module(**kwargs: object) -> ForecastModule:
    torch.manual_seed(0)
    # no k-means init: the random code bank gives distinct candidates without training
    bottleneck = functools.partial(VQBottleneck, codebook_size=16, kmeans_init=False)
    args: dict = dict(rollout_steps=STEPS, candidate_k=K)
    args.update(kwargs)
    return ForecastModule(ResNet(T_IN, T_OUT, 1, 1, width=8, n_blocks=1), bottleneck, **args)


def trainer(**kwargs: object) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, **kwargs,
    )  # fmt: skip


# -- pooled metrics ------------------------------------------------------------------------------


def test_ensemble_metrics_pool_equals_whole_set() -> None:
    g = torch.Generator().manual_seed(0)
    members = torch.randn(7, 4, 3, 1, 5, 6, generator=g)
    target = torch.randn(7, 3, 1, 5, 6, generator=g) * 1.3
    m = EnsembleMetrics(3, 4)
    m.update(members[:2], target[:2])
    m.update(members[2:], target[2:])
    out = m.compute()
    crps = metrics.crps_ensemble(members, target)
    ss = metrics.spread_skill(members, target)
    for t in range(3):
        assert out[f"crps_lead{t + 1}"].item() == pytest.approx(crps[t].item(), rel=1e-5)
        assert out[f"spread_skill_lead{t + 1}"].item() == pytest.approx(
            ss.ratio[t].item(), rel=1e-5
        )
    assert out["crps"].item() == pytest.approx(crps.mean().item(), rel=1e-5)
    spread = ss.spread.square().mean().sqrt()
    skill = ss.skill.square().mean().sqrt()
    assert out["spread"].item() == pytest.approx(spread.item(), rel=1e-5)
    assert out["skill"].item() == pytest.approx(skill.item(), rel=1e-5)
    assert out["spread_skill"].item() == pytest.approx(
        math.sqrt(5 / 4) * (spread / skill).item(), rel=1e-5
    )


def test_csi_counts_are_pooled_over_batches_and_per_lead() -> None:
    """Batch 1: lead 1 one hit; batch 2: lead 1 three false alarms, lead 2 one hit one miss.

    Pooled CSI at 0.5 = H / (H + M + F) = 2 / (2 + 1 + 3) = 1/3; the mean of the two batches'
    CSIs would be (1 + 1/5) / 2 = 0.6. CSI-M per lead: lead 1 = 1 / 4, lead 2 = 1 / 2.
    """
    m = ForecastMetrics(2, thresholds=[0.5])
    pred = torch.zeros(1, 2, 1, 2, 2)
    target = torch.zeros(1, 2, 1, 2, 2)
    pred[0, 0, 0, 0, 0] = target[0, 0, 0, 0, 0] = 1.0
    m.update(pred, target)
    pred = torch.zeros(1, 2, 1, 2, 2)
    target = torch.zeros(1, 2, 1, 2, 2)
    pred[0, 0, 0, 1] = 1.0
    pred[0, 0, 0, 0, 1] = 1.0  # 3 false alarms at lead 1
    pred[0, 1, 0, 0, 0] = target[0, 1, 0, 0, 0] = 1.0  # hit at lead 2
    target[0, 1, 0, 1, 1] = 1.0  # miss at lead 2
    m.update(pred, target)
    out = m.compute()
    assert out["csi_0.5"].item() == pytest.approx(1 / 3)
    assert out["pod_0.5"].item() == pytest.approx(2 / 3)
    assert out["sucr_0.5"].item() == pytest.approx(2 / 5)
    assert out["bias_0.5"].item() == pytest.approx(5 / 3)
    assert out["csi_m"].item() == pytest.approx(1 / 3)
    assert out["csi_m_lead1"].item() == pytest.approx(1 / 4)
    assert out["csi_m_lead2"].item() == pytest.approx(1 / 2)


# -- test with members ---------------------------------------------------------------------------


def test_test_logs_pooled_crps_and_spread_skill(ns_file: Path) -> None:
    dm = make_dm(ns_file)
    module = make_module(ensemble=EnsembleConfig(members=3), csi_thresholds=[0.0])
    result = trainer().test(module, dm, verbose=False)[0]
    # the same members computed over the whole test split at once
    ds = dm.dataset("test")
    x = torch.stack([ds[i].x for i in range(len(ds))])
    y = torch.stack([ds[i].y for i in range(len(ds))])
    module.eval()
    with torch.no_grad():
        members = module.ensemble_members(x).fields
    assert members.shape == (len(ds), 3, STEPS * T_OUT, 1, 16, 16)
    crps = metrics.crps_ensemble(members, y)
    ss = metrics.spread_skill(members, y)
    assert result["test/crps"] == pytest.approx(crps.mean().item(), rel=1e-4)
    for t in range(STEPS * T_OUT):
        assert result[f"test/crps_lead{t + 1}"] == pytest.approx(crps[t].item(), rel=1e-4)
        assert result[f"test/spread_skill_lead{t + 1}"] == pytest.approx(
            ss.ratio[t].item(), rel=1e-4
        )
        assert f"test/csi_m_lead{t + 1}" in result
    assert result["test/spread"] > 0  # the code-bank members differ


def test_deterministic_test_logs_no_ensemble_metrics(ns_file: Path) -> None:
    result = trainer().test(make_module(), make_dm(ns_file), verbose=False)[0]
    assert "test/mse_lead4" in result
    assert not any(k.startswith(("test/crps", "test/spread")) for k in result)


def test_validation_logs_the_rank_aligned_ensemble_every_epoch(ns_file: Path) -> None:
    # issue 17: calibration watched while training; the same numbers as test on the same windows
    dm = make_dm(ns_file)
    module = make_module(ensemble=EnsembleConfig(members=3))
    val = trainer().validate(module, dm, verbose=False)[0]
    dm.setup("validate")
    ds = dm.dataset("val")
    x = torch.stack([ds[i].x for i in range(len(ds))])
    y = torch.stack([ds[i].y for i in range(len(ds))])
    module.eval()
    with torch.no_grad():
        members = module.ensemble_members(x).fields
    assert val["val/crps"] == pytest.approx(
        metrics.crps_ensemble(members, y).mean().item(), rel=1e-4
    )
    ss = metrics.spread_skill(members, y).ratio
    assert val["val/spread_skill_lead1"] == pytest.approx(ss[0].item(), rel=1e-4)
    # off on request, and never without members
    off = make_module(ensemble=EnsembleConfig(members=3, validate=False))
    for m in (off, make_module()):
        result = trainer().validate(m, dm, verbose=False)[0]
        assert "val/mse" in result and not any(k.startswith("val/crps") for k in result)


# -- predict ------------------------------------------------------------------------------------


def test_predict_rank_aligned_members(ns_file: Path) -> None:
    module = make_module(ensemble=EnsembleConfig(members=3))
    preds = trainer(limit_predict_batches=1).predict(module, make_dm(ns_file))
    p = preds[0]
    assert p.members.shape == (p.forecast.shape[0], 3, *p.forecast.shape[1:])
    assert p.member_scores is None
    # member 0 uses the nearest code at every step: the deterministic forecast
    torch.testing.assert_close(p.members[:, 0], p.forecast)
    assert (p.members[:, 1] - p.members[:, 0]).abs().max() > 0


def test_predict_beam_members_are_best_first_and_written(ns_file: Path, tmp_path: Path) -> None:
    scorer = metrics.SpectrumScorer(from_vorticity=True)
    module = make_module(ensemble=EnsembleConfig(members=3, beam_width=2, scorer=scorer))
    out = tmp_path / "pred.nc"
    dm = make_dm(ns_file)
    preds = trainer(callbacks=[NetCDFPredictionWriter(str(out))]).predict(module, dm)
    assert scorer.clim_spectrum is not None  # fitted on training targets in setup
    _, _, y_train = dm.training_windows(max_windows=256, seed=0)
    clim = metrics.SpectrumScorer(from_vorticity=True).fit(y_train).clim_spectrum
    torch.testing.assert_close(scorer.clim_spectrum, clim)

    p = preds[0]
    assert p.members.shape == (p.forecast.shape[0], 3, STEPS * T_OUT, 1, 16, 16)
    assert (p.member_scores[:, :-1] >= p.member_scores[:, 1:]).all()
    # the reported scores are the members' own scores, rescored independently
    x_all = torch.stack([dm.dataset("test")[i].x for i in range(p.forecast.shape[0])])
    module.eval()
    with torch.no_grad():
        xn = module.normalize(x_all)
        rescored = search.score_trajectories(
            scorer, xn, module.normalize(p.members), STEPS, to_physical=module.denormalize
        ).scores
    torch.testing.assert_close(rescored, p.member_scores, rtol=1e-4, atol=1e-5)

    ds = xr.open_dataset(out)
    n = sum(q.forecast.shape[0] for q in preds)
    assert ds["vorticity_members"].dims == ("sample", "member", "lead_time", "y", "x")
    assert ds["vorticity_members"].shape == (n, 3, STEPS * T_OUT, 16, 16)
    assert ds["member_score"].shape == (n, 3)
    members = torch.cat([q.members for q in preds])[:, :, :, 0].numpy()
    np.testing.assert_allclose(ds["vorticity_members"].values, members, rtol=1e-6)
    np.testing.assert_allclose(ds["vorticity_ens_mean"].values, members.mean(1), rtol=1e-5)
    np.testing.assert_allclose(ds["vorticity_ens_spread"].values, members.std(1), rtol=1e-4)
    assert "best first" in ds["vorticity_members"].attrs["long_name"]
    ds.close()


def test_search_step_fn_candidate_zero_is_the_forecast() -> None:
    module = make_module().eval()
    x = torch.randn(3, T_IN, 1, 16, 16)
    with torch.no_grad():
        cands = module.search_step_fn()(x)
        assert cands.shape == (3, K, T_OUT, 1, 16, 16)
        torch.testing.assert_close(cands[:, 0], module.model(x).y)
        assert module.search_step_fn(2)(x).shape[1] == 2


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(members=2, beam_width=2, scorer=metrics.NegMSEScorer()), "needs the truth"),
        (dict(members=2, scorer=metrics.NonNegativityScorer()), "ensemble.beam_width > 0"),
        (dict(members=2, beam_width=2), "needs a model.ensemble.scorer"),
        (dict(members=7, beam_width=2, scorer=metrics.NonNegativityScorer()),
         r"ensemble.members=7 must be in \[1, 6\]"),
        (dict(beam_width=-1), "ensemble.beam_width must be >= 0"),
    ],
)  # fmt: skip
def test_bad_predict_search_arguments_fail_at_construction(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_module(ensemble=EnsembleConfig(**kwargs))
