"""The built-in datasets through the NetCDF datamodule: shallow water, ERA5-like from the CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from beamvq.cli import main
from beamvq.datamodules.config import SelectionConfig, SplitConfig, WindowConfig
from beamvq.datamodules.era5 import ERA5LikeGenerator
from beamvq.datamodules.netcdf import NetCDFDataModule
from beamvq.datamodules.shallow_water import DOMAIN_HALF_WIDTH, ShallowWaterGenerator

ROOT = Path(__file__).resolve().parents[1]


def test_shallow_water_datamodule_conserves_mass(tmp_path: Path) -> None:
    res = 32
    dm = NetCDFDataModule(
        path=str(tmp_path / "sw.nc"),
        variables=["h", "u", "v"],
        windows=WindowConfig(in_steps=4, out_steps=4),
        splits=SplitConfig(fractions=(0.5, 0.25, 0.25)),
        generator=ShallowWaterGenerator(n_trajectories=4, resolution=res, n_frames=21),
    )
    dm.prepare_data()
    dm.setup()
    assert dm.channel_names == ["h", "u", "v"] and dm.grid == (res, res)
    assert dm.latitude is None
    assert dm.time_step == pytest.approx(0.05)
    cell_area = (2 * DOMAIN_HALF_WIDTH / res) ** 2
    # total water of every frame of every window, from what the loader hands the model
    for split in ("train", "val", "test"):
        ds = dm.dataset(split)
        for i in range(len(ds)):
            item = ds[i]
            frames = np.concatenate([item.x[:, 0].numpy(), item.y[:, 0].numpy()])
            mass = frames.astype(np.float64).sum(axis=(1, 2)) * cell_area
            # the dam break only redistributes water: outflow by T=1 is ~5e-4 of it at 32^2
            np.testing.assert_allclose(mass, mass[0], rtol=1e-3)
            assert (frames > 0).all()
    # initially at rest, 2 m of water inside the dam and 1 m outside
    first = dm.array[:, 0]
    assert set(np.unique(first[:, 0])) == {1.0, 2.0}
    np.testing.assert_array_equal(first[:, 1:], 0.0)


def test_era5_like_datamodule_generates_once(tmp_path: Path) -> None:
    path = tmp_path / "e.nc"
    dm = NetCDFDataModule(
        path=str(path),
        variables=["z", "t", "t2m"],
        windows=WindowConfig(in_steps=4, out_steps=4),
        selection=SelectionConfig(levels=[500, 850], time_step="6h"),
        splits=SplitConfig(
            train_period=("2000-01-01", "2000-01-08"),
            val_period=("2000-01-09", "2000-01-10"),
            test_period=("2000-01-11", "2000-01-12"),
        ),
        generator=ERA5LikeGenerator(n_times=48),
    )
    dm.prepare_data()
    stamp = path.stat().st_mtime_ns
    dm.setup()
    assert path.stat().st_mtime_ns == stamp
    assert dm.channel_names == ["z500", "z850", "t500", "t850", "t2m"]
    assert dm.grid == (32, 64) and dm.latitude[0] == pytest.approx(87.1875)
    assert [len(dm.plan.starts[s]) for s in ("train", "val", "test")] == [32 - 7, 8 - 7, 8 - 7]


@pytest.mark.parametrize(
    ("data", "channels", "steps"),
    [("navier_stokes", 1, 5), ("shallow_water", 3, 10), ("era5_like", 5, 4)],
)
def test_data_configs_compose_with_the_quickstart(
    capsys: pytest.CaptureFixture, data: str, channels: int, steps: int
) -> None:
    with pytest.raises(SystemExit):
        main(
            [
                "fit",
                "--config",
                str(ROOT / "configs" / "quickstart.yaml"),
                "--config",
                str(ROOT / "configs" / "data" / f"{data}.yaml"),
                "--print_config",
            ]
        )
    text = capsys.readouterr().out
    assert f"in_channels: {channels}" in text and f"out_channels: {channels}" in text
    assert f"in_steps: {steps}" in text


def test_era5_like_config_trains_from_the_cli(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.chdir(tmp_path)
    cli = main(
        [
            "fit",
            "--config",
            str(ROOT / "configs" / "quickstart.yaml"),
            "--config",
            str(ROOT / "configs" / "data" / "era5_like.yaml"),
            "--data.init_args.path",
            str(tmp_path / "era5.nc"),
            "--data.init_args.generator.init_args.n_times",
            "48",
            "--data.init_args.splits.train_period",
            "[2000-01-01, 2000-01-08]",
            "--data.init_args.splits.val_period",
            "[2000-01-09, 2000-01-10]",
            "--data.init_args.splits.test_period",
            "[2000-01-11, 2000-01-12]",
            "--data.init_args.loader.batch_size",
            "4",
            "--model.backbone.init_args.hid_s",
            "8",
            "--model.backbone.init_args.hid_t",
            "16",
            "--model.bottleneck.init_args.codebook_size",
            "16",
            "--trainer.max_epochs",
            "1",
            "--trainer.limit_train_batches",
            "2",
            "--trainer.limit_val_batches",
            "1",
            "--trainer.logger",
            "false",
            "--trainer.callbacks",
            "null",
            "--trainer.enable_checkpointing",
            "false",
        ]
    )
    dm = cli.datamodule
    assert dm.num_channels == 5 and dm.latitude is not None
    assert dm.climatology.shape == (5, 32, 64)
    metrics = cli.trainer.callback_metrics
    assert "val/loss" in metrics and np.isfinite(float(metrics["val/loss"]))
    # the model normalizes with the training split's statistics of the five channels
    np.testing.assert_allclose(cli.model.normalizer.mean.numpy(), dm.normalization.mean)
    # lat-lon data: latitude-weighted metrics are chosen automatically
    np.testing.assert_allclose(cli.model.lat_deg.numpy(), dm.latitude)
    for key in ("val/lat_rmse", "val/acc", "val/lat_rmse_lead1", "val/acc_lead4"):
        assert key in metrics and np.isfinite(float(metrics[key])), key
    assert -1.0 <= float(metrics["val/acc"]) <= 1.0
    # normalized-space MSE and physical lat-RMSE describe the same errors: RMSE is physical
    assert float(metrics["val/lat_rmse"]) > 1.0  # z500 errors are in m^2 s^-2, far above 1
