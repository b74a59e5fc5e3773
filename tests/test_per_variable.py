"""Per-variable skill: ``val/rmse/z500``-style metrics per channel (WeatherBench naming), pools in
normalized units beside the physical-unit ones, per-variable report tables, and a -MSE scorer
that one variable's units do not decide."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from beamvq import metrics as M
from beamvq import summary
from beamvq.backbones import ResNet
from beamvq.bottleneck import VQBottleneck
from beamvq.callbacks.beam_search import BeamSearchAugmentation
from beamvq.callbacks.lead_time import LeadTimeReport
from beamvq.callbacks.search_inputs import SearchInputs
from beamvq.callbacks.tables import NORMALIZED_ROW, markdown_variable_table, variable_table
from beamvq.datamodules.config import LoaderConfig, SelectionConfig, SplitConfig, WindowConfig
from beamvq.datamodules.era5 import ERA5LikeGenerator
from beamvq.datamodules.netcdf import NetCDFDataModule
from beamvq.ensemble import EnsembleConfig
from beamvq.evaluation import SplitMetrics
from beamvq.module import ForecastModule
from beamvq.selftrain import SearchConfig

ROOT = Path(__file__).resolve().parents[1]
NAMES = ["z500", "t850"]
SCALE = torch.tensor([1000.0, 1.0])  # geopotential-like vs temperature-like units


def _two_variable_field(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Target, forecast (B, T, C, H, W) and ensemble (B, M, T, C, H, W) on 2 channels whose
    scales differ by 1000, with relative errors 10% on the first and 50% on the second."""
    g = torch.Generator().manual_seed(seed)
    b, t, c, h, w = 5, 3, 2, 4, 6
    s = SCALE.view(1, 1, c, 1, 1)
    y = torch.randn(b, t, c, h, w, generator=g, dtype=torch.float64) * s + 5 * s
    rel = torch.tensor([0.1, 0.5], dtype=torch.float64).view(1, 1, c, 1, 1)
    pred = y + torch.randn(b, t, c, h, w, generator=g, dtype=torch.float64) * s * rel
    members = y.unsqueeze(1) + torch.randn(b, 3, t, c, h, w, generator=g, dtype=torch.float64) * (
        s * rel
    ).unsqueeze(1)
    return y.float(), pred.float(), members.float()


# -- the accumulators ---------------------------------------------------------------------------


def test_per_variable_metrics_equal_a_hand_computation_per_channel() -> None:
    y, pred, members = _two_variable_field()
    lat = torch.linspace(-70.0, 70.0, y.shape[-2])
    clim = y.mean(0).mean(0)  # (C, H, W)
    std = torch.tensor([900.0, 1.5])
    m = SplitMetrics(y.shape[1], members=3, channels=2)
    for sl in (slice(0, 2), slice(2, None)):  # two batches: pooled, not averaged
        m.update(pred[sl], y[sl], lat, clim)
        m.update_ensemble(members[sl], y[sl])
    out = {k: float(v) for k, v in m.compute(True, NAMES, std).items()}
    w = torch.cos(torch.deg2rad(lat.double()))
    w = (w / w.mean()).view(-1, 1)
    p64, y64, mem64, clim64 = pred.double(), y.double(), members.double(), clim.double()
    mse, mae = [], []
    for c, name in enumerate(NAMES):
        err = p64[:, :, c] - y64[:, :, c]
        mse.append(float(err.square().mean()))
        mae.append(float(err.abs().mean()))
        assert out[f"mse/{name}"] == pytest.approx(mse[c], rel=1e-5)
        assert out[f"rmse/{name}"] == pytest.approx(mse[c] ** 0.5, rel=1e-5)
        assert out[f"mae/{name}"] == pytest.approx(mae[c], rel=1e-5)
        lat_mse = float((err.square() * w).mean())
        assert out[f"lat_rmse/{name}"] == pytest.approx(lat_mse**0.5, rel=1e-5)
        f, o = p64[:, :, c] - clim64[c], y64[:, :, c] - clim64[c]
        acc = (w * f * o).sum((-2, -1)) / (
            (w * f * f).sum((-2, -1)) * (w * o * o).sum((-2, -1))
        ).sqrt()
        assert out[f"acc/{name}"] == pytest.approx(float(acc.mean()), rel=1e-5)
        # CRPS, energy form, of the channel's members
        mc, yc = mem64[:, :, :, c], y64[:, :, c]
        skill = (mc - yc.unsqueeze(1)).abs().mean(1)
        pairs = (mc.unsqueeze(1) - mc.unsqueeze(2)).abs().mean((1, 2))
        assert out[f"crps/{name}"] == pytest.approx(float((skill - 0.5 * pairs).mean()), rel=1e-5)
    # the physical pool is the mean over both channels (the first one's units dominate it) ...
    assert out["mse"] == pytest.approx(sum(mse) / 2, rel=1e-5)
    assert out["mse"] > 0.99 * mse[0] / 2
    # ... the normalized pool divides each channel by its training std first
    mse_norm = sum(mse[c] / std[c].item() ** 2 for c in range(2)) / 2
    assert out["mse_norm"] == pytest.approx(mse_norm, rel=1e-5)
    assert out["rmse_norm"] == pytest.approx(mse_norm**0.5, rel=1e-5)
    assert out["mae_norm"] == pytest.approx(
        sum(mae[c] / std[c].item() for c in range(2)) / 2, rel=1e-5
    )
    lat_norm = sum(out[f"lat_rmse/{n}"] ** 2 / std[c].item() ** 2 for c, n in enumerate(NAMES)) / 2
    assert out["lat_rmse_norm"] == pytest.approx(lat_norm**0.5, rel=1e-5)
    crps_norm = sum(out[f"crps/{n}"] / std[c].item() for c, n in enumerate(NAMES)) / 2
    assert out["crps_norm"] == pytest.approx(crps_norm, rel=1e-5)
    # the second variable (50% errors) is the worse forecast, which only the normalized view shows
    assert mse[1] / std[1].item() ** 2 > mse[0] / std[0].item() ** 2


def test_pooled_metrics_keep_their_values_and_one_channel_keeps_its_names() -> None:
    y, pred, members = _two_variable_field(1)
    lat = torch.linspace(-70.0, 70.0, y.shape[-2])
    clim = y.mean((0, 1))
    pooled = SplitMetrics(y.shape[1], thresholds=[5.0], members=3)  # today's accumulators
    split = SplitMetrics(y.shape[1], thresholds=[5.0], members=3, channels=2)
    for m in (pooled, split):
        m.update(pred, y, lat, clim)
        m.update_ensemble(members, y)
    before = pooled.compute(True)
    after = split.compute(True, NAMES, torch.ones(2))
    for k, v in before.items():
        assert torch.equal(after[k], v), k  # every existing key, bit for bit
    new = set(after) - set(before)
    assert {"mse/z500", "rmse/t850", "lat_rmse/z500", "acc/t850", "crps/z500"} <= new
    assert {"mse_norm", "rmse_norm", "mae_norm", "lat_rmse_norm", "crps_norm"} <= new
    assert all("/" in k or k.endswith("_norm") for k in new)
    # one channel: exactly today's keys, whatever names and statistics are given
    one = SplitMetrics(y.shape[1], members=3, channels=1)
    one.update(pred[:, :, :1], y[:, :, :1], lat, clim[:1])
    one.update_ensemble(members[:, :, :, :1], y[:, :, :1])
    ref = SplitMetrics(y.shape[1], members=3)
    ref.update(pred[:, :, :1], y[:, :, :1], lat, clim[:1])
    ref.update_ensemble(members[:, :, :, :1], y[:, :, :1])
    assert set(one.compute(True, ["z500"], torch.ones(1))) == set(ref.compute(True))
    # no names: the channels are called ch0, ch1; no std: no normalized pools
    anon = SplitMetrics(y.shape[1], channels=2)
    anon.update(pred, y, lat, clim)
    keys = set(anon.compute(False))
    assert {"mse/ch0", "rmse/ch1"} <= keys and not any(k.endswith("_norm") for k in keys)


# -- the report tables --------------------------------------------------------------------------


def _logged() -> dict[str, float]:
    return {
        "test/mse": 5.0e5, "test/rmse": 707.0, "test/mse_lead1": 4.0e5, "test/mse_norm": 0.5,
        "test/rmse_norm": 0.7071, "test/rmse/z500": 1000.0, "test/rmse/t850": 2.0,
        "test/mse/z500": 1.0e6, "test/mse/t850": 4.0, "test/acc/z500": 0.9, "test/acc/t850": 0.5,
    }  # fmt: skip


def test_variable_tables_have_a_row_per_variable() -> None:
    table = variable_table(_logged(), "test")
    assert table.variables == ["z500", "t850", NORMALIZED_ROW]
    assert table.by_variable["rmse"] == [1000.0, 2.0, 0.7071]
    assert table.by_variable["acc"][:2] == [0.9, 0.5]
    md = markdown_variable_table(table)
    assert "| variable | RMSE | MSE | ACC |" in md and "| t850 | 2 | 4 | 0.5 |" in md
    assert f"| {NORMALIZED_ROW} | 0.7071 | 0.5 |" in md
    assert variable_table({"test/mse": 1.0, "test/mse_lead1": 1.0}, "test").variables == []
    # beamvq.summary: a "By variable" section; overall and per-lead rows as before
    base = summary.collect(_logged(), "base", "a.ckpt")
    new = summary.collect({**_logged(), "test/rmse/t850": 1.0}, "beamvq", "b.ckpt")
    assert "rmse/z500" not in base.overall and base.overall["mse"] == 5.0e5
    text = summary.markdown([base, new])
    assert "## By variable (pooled over lead times)" in text
    assert "| t850 | 2 | 1 | -50.0% |" in text and "| z500 | 1000 | 1000 | +0.0% |" in text
    assert f"| {NORMALIZED_ROW} | 0.7071 | 0.7071 |" in text
    one = summary.collect({"test/mse": 2.0, "test/mse_lead1": 1.0}, "a", "a")
    assert "By variable" not in summary.markdown([one])


# -- the scorer ---------------------------------------------------------------------------------


def _candidates() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference and 2 candidates on (z, t) with training std (1000, 1): candidate 0 is 1% of a
    std off in z but 3 std off in t; candidate 1 is 2% of a std off in z and exact in t."""
    g = torch.Generator().manual_seed(0)
    train = torch.randn(64, 2, 2, 4, 4, generator=g) * SCALE.view(1, 1, 2, 1, 1)
    ref = torch.randn(1, 2, 2, 4, 4, generator=g) * SCALE.view(1, 1, 2, 1, 1)
    cands = ref.unsqueeze(1).repeat(1, 2, 1, 1, 1, 1)
    cands[0, 0, :, 0] += 10.0
    cands[0, 0, :, 1] += 3.0
    cands[0, 1, :, 0] += 20.0
    return train, ref, cands


def test_normalized_neg_mse_ranks_by_every_variable() -> None:
    train, ref, cands = _candidates()
    plain = M.NegMSEScorer()
    assert plain.fit is None  # the default needs no training data (no fit step runs for it)
    raw = plain(cands, ref)
    assert int(raw.argmax(1)) == 0  # the z units decide: 3 std in t count for nothing
    scorer = M.NegMSEScorer(normalize=True)
    with pytest.raises(RuntimeError, match="fit"):
        scorer(cands, ref)
    assert callable(scorer.fit) and scorer.fit(train) is scorer
    std = train.transpose(0, 2).reshape(2, -1).std(1)
    torch.testing.assert_close(scorer.channel_std, std, rtol=1e-5, atol=0)
    score = scorer(cands, ref)
    assert int(score.argmax(1)) == 1
    per_c = (cands - ref.unsqueeze(1)).square().mean((2, 4, 5))  # (B, K, C)
    torch.testing.assert_close(score, -(per_c / std.square()).mean(-1), rtol=1e-5, atol=0)
    # per-variable weights do the same without training data
    weighted = M.NegMSEScorer(channel_weights=[1e-6, 1.0])
    assert weighted.fit is None and int(weighted(cands, ref).argmax(1)) == 1
    with pytest.raises(ValueError, match="2 channels"):
        M.NegMSEScorer(channel_weights=[1.0, 1.0, 1.0])(cands, ref)
    # a WeightedScorer forwards fit to it
    combo = M.WeightedScorer([M.NegMSEScorer(normalize=True)], [1.0]).fit(train)
    torch.testing.assert_close(combo(cands, ref), score)


def test_neg_mse_options_leave_one_channel_unchanged() -> None:
    g = torch.Generator().manual_seed(2)
    cands, ref = torch.randn(3, 4, 2, 1, 5, 5, generator=g), torch.randn(3, 2, 1, 5, 5, generator=g)
    plain = M.NegMSEScorer()(cands, ref)
    torch.testing.assert_close(M.NegMSEScorer(channel_weights=[1.0])(cands, ref), plain)
    scaled = M.NegMSEScorer(normalize=True).fit(torch.randn(8, 2, 1, 5, 5, generator=g) * 3)
    assert torch.equal(scaled(cands, ref).argsort(1), plain.argsort(1))


def test_csi_scorer_can_count_one_channel() -> None:
    ref = torch.zeros(1, 1, 2, 2, 2)
    ref[..., 0, :, :] = 5.0e4  # geopotential: above any VIL threshold everywhere
    ref[0, 0, 1, 0, 0] = 1.0
    cands = ref.unsqueeze(1).repeat(1, 2, 1, 1, 1, 1)
    cands[0, 1, 0, 1, 0, 0] = 0.0  # candidate 1 misses the event in channel 1
    both = M.CSIScorer([0.5])(cands, ref)
    one = M.CSIScorer([0.5], channel=1)(cands, ref)
    assert one.tolist() == [[1.0, 0.0]]
    assert both[0, 1] > 0.5  # diluted by channel 0's hits
    with pytest.raises(ValueError, match="out of range"):
        M.CSIScorer([0.5], channel=2)(cands, ref)


# -- through the module ---------------------------------------------------------------------------


def _era5_dm(path: Path) -> NetCDFDataModule:
    return NetCDFDataModule(
        path=str(path), variables=["z", "t", "t2m"], windows=WindowConfig(2, 2),
        selection=SelectionConfig(levels=[500, 850]), loader=LoaderConfig(batch_size=3),
        splits=SplitConfig(
            train_period=("2000-01-01", "2000-01-06"), val_period=("2000-01-07", "2000-01-08"),
            test_period=("2000-01-09", "2000-01-10"),
        ),
        generator=ERA5LikeGenerator(n_times=40, resolution_deg=22.5),
    )  # fmt: skip


def test_module_logs_test_metrics_per_variable(tmp_path: Path) -> None:
    dm = _era5_dm(tmp_path / "era5.nc")
    torch.manual_seed(0)
    bottleneck = functools.partial(VQBottleneck, codebook_size=8, kmeans_init=False)
    module = ForecastModule(
        ResNet(2, 2, 5, 5, width=8, n_blocks=1), bottleneck, candidate_k=2,
        ensemble=EnsembleConfig(members=2),
    )  # fmt: skip
    report = LeadTimeReport(dirpath=str(tmp_path / "plots"))
    trainer = pl.Trainer(
        accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[report], default_root_dir=str(tmp_path),
    )  # fmt: skip
    out = trainer.test(module, dm, verbose=False)[0]
    names = dm.channel_names
    assert names == ["z500", "z850", "t500", "t850", "t2m"]
    # the same forecasts over the whole test split at once, channel by channel
    ds = dm.dataset("test")
    x = torch.stack([ds[i].x for i in range(len(ds))])
    y = torch.stack([ds[i].y for i in range(len(ds))])
    module.eval()
    with torch.no_grad():
        pred = module(x)
        members = module.ensemble_members(x).fields
    std = module.normalizer.std.double()
    err = (pred.double() - y.double()).transpose(1, 2).reshape(len(ds), 5, -1)
    mse = err.square().mean((0, 2))
    lat = module.lat_deg
    for c, name in enumerate(names):
        assert out[f"test/mse/{name}"] == pytest.approx(float(mse[c]), rel=1e-4)
        assert out[f"test/rmse/{name}"] == pytest.approx(float(mse[c].sqrt()), rel=1e-4)
        assert out[f"test/mae/{name}"] == pytest.approx(float(err[:, c].abs().mean()), rel=1e-4)
        lat_rmse = M.lat_weighted_rmse(pred[:, :, c : c + 1], y[:, :, c : c + 1], lat)
        assert out[f"test/lat_rmse/{name}"] == pytest.approx(
            float(lat_rmse.square().mean().sqrt()), rel=1e-4
        )
        acc = M.lat_weighted_acc(pred, y, module.climatology, lat)[..., c]
        assert out[f"test/acc/{name}"] == pytest.approx(float(acc.mean()), rel=1e-4, abs=1e-6)
        crps = M.crps_ensemble(members[:, :, :, c : c + 1], y[:, :, c : c + 1])
        assert out[f"test/crps/{name}"] == pytest.approx(float(crps.mean()), rel=1e-4)
    assert out["test/mse_norm"] == pytest.approx(float((mse / std.square()).mean()), rel=1e-4)
    # the physical pool is (almost) the geopotentials' alone; the normalized one is not
    assert out["test/mse"] == pytest.approx(float(mse.mean()), rel=1e-4)
    assert float(mse[:2].sum()) > 0.99 * float(mse.sum())
    # the test report's table has a row per variable and the normalized pool
    md = (tmp_path / "plots" / "test_leads.md").read_text()
    assert "## By variable" in md and all(f"| {n} |" in md for n in names)
    assert f"| {NORMALIZED_ROW} |" in md


def test_the_search_callback_fits_the_normalized_scorer(tmp_path: Path) -> None:
    dm = _era5_dm(tmp_path / "era5.nc")
    torch.manual_seed(0)
    bottleneck = functools.partial(VQBottleneck, codebook_size=8, kmeans_init=False)
    module = ForecastModule(ResNet(2, 2, 5, 5, width=8, n_blocks=1), bottleneck, candidate_k=2)
    scorer = M.NegMSEScorer(normalize=True)
    search = BeamSearchAugmentation(
        scorer, SearchConfig(beam_width=2, top_k=2, only_improving=False), start_epoch=0,
        inputs=SearchInputs(windows=4),
    )  # fmt: skip
    trainer = pl.Trainer(
        accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[search], max_epochs=2, limit_train_batches=1,
        limit_val_batches=1, reload_dataloaders_every_n_epochs=1, default_root_dir=str(tmp_path),
    )  # fmt: skip
    trainer.fit(module, dm)
    assert scorer.channel_std is not None and dm.pool.size > 0
    # fitted on training targets: about the datamodule's normalization std, channel by channel
    ratio = scorer.channel_std.double() / torch.as_tensor(dm.normalization.std).double()
    assert bool(((ratio > 0.5) & (ratio < 2.0)).all()), ratio
    assert "val/rmse/z500" in trainer.callback_metrics


def test_era5_like_cli_test_logs_rmse_per_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from beamvq.cli import main

    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setattr(sys, "argv", ["beamvq"])  # main's args only
    monkeypatch.chdir(tmp_path)
    data = [
        "--config", str(ROOT / "configs" / "quickstart.yaml"),
        "--config", str(ROOT / "configs" / "data" / "era5_like.yaml"),
        "--data.init_args.path", str(tmp_path / "era5.nc"),
        "--data.init_args.generator.init_args.n_times", "48",
        "--data.init_args.splits.train_period", "[2000-01-01, 2000-01-08]",
        "--data.init_args.splits.val_period", "[2000-01-09, 2000-01-10]",
        "--data.init_args.splits.test_period", "[2000-01-11, 2000-01-12]",
        "--data.init_args.loader.batch_size", "2",
        "--model.backbone.init_args.hid_s", "4", "--model.backbone.init_args.hid_t", "8",
        "--model.backbone.init_args.n_s", "2", "--model.backbone.init_args.n_t", "1",
        "--model.bottleneck.init_args.codebook_size", "8",
        "--model.ensemble.members", "2", "--model.candidate_k", "2",
        "--trainer.logger", "false", "--trainer.callbacks", "null",
        "--trainer.default_root_dir", str(tmp_path / "run"),
    ]  # fmt: skip
    fit = main(
        ["fit", *data, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1",
         "--trainer.limit_val_batches", "1"]
    )  # fmt: skip
    assert "val/rmse/t850" in fit.trainer.callback_metrics
    (ckpt,) = (tmp_path / "run").rglob("*.ckpt")
    cli = main(["test", *data, "--trainer.limit_test_batches", "1", "--ckpt_path", str(ckpt)])
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
    for name in ("z500", "z850", "t500", "t850", "t2m"):
        for kind in ("rmse", "mse", "mae", "lat_rmse", "acc", "crps"):
            assert f"test/{kind}/{name}" in metrics, (kind, name)
    for kind in ("mse_norm", "rmse_norm", "lat_rmse_norm", "crps_norm", "mse", "lat_rmse"):
        assert f"test/{kind}" in metrics, kind
    # temperature skill is visible: kelvins, not the geopotential's m^2 s^-2
    assert metrics["test/rmse/t850"] < 0.1 * metrics["test/rmse/z500"]
