"""Forecasts from the user's own inputs: ``beamvq predict`` on a file of inputs alone, and the
Python API (``beamvq.load_forecaster(...).forecast(ds)``); docs/own_inputs.md.

One tiny quickstart model (16x16, one epoch) is trained per module; the inputs files are cut
from its data. Before ``data.predict`` a 5-frame file failed in setup with "the train split has
5 time steps", and ``beamvq.forecast`` did not exist.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import pytest
import torch
import xarray as xr

import beamvq
from beamvq.checkpoint_files import read_checkpoint
from beamvq.cli import main
from beamvq.datamodules.config import PredictConfig, WindowConfig
from beamvq.datamodules.netcdf import NetCDFDataModule

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "--data.init_args.generator.init_args.n_trajectories",
    "6",
    "--data.init_args.generator.init_args.resolution",
    "16",
    "--data.init_args.generator.init_args.n_frames",
    "12",
    "--data.init_args.loader.batch_size",
    "4",
    "--model.bottleneck.init_args.codebook_size",
    "32",
    "--trainer.logger",
    "false",
    "--trainer.enable_progress_bar",
    "false",
]
FIT = [
    "--trainer.max_epochs",
    "1",
    "--trainer.limit_train_batches",
    "2",
    "--trainer.limit_val_batches",
    "1",
]
# the inputs files hold these trajectories of the training data (of its 6)
PICK = [1, 3, 4]


class Run(NamedTuple):
    folder: Path
    config: Path
    ckpt: Path
    data: Path

    @property
    def predictions(self) -> Path:
        return self.folder / "run" / "predictions.nc"


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, figures_not_rendered_within: Any) -> Run:
    folder = tmp_path_factory.mktemp("own_inputs")
    text = (ROOT / "configs" / "quickstart.yaml").read_text()
    text = text.replace("runs/quickstart", str(folder / "run"))
    text = text.replace("data/navier_stokes_64.nc", str(folder / "ns.nc"))
    config = folder / "quickstart.yaml"
    config.write_text(text)
    mp = pytest.MonkeyPatch()
    mp.setenv("WANDB_MODE", "disabled")
    mp.chdir(folder)
    try:
        with figures_not_rendered_within():
            main(["fit", "--config", str(config), *TINY, *FIT])
    finally:
        mp.undo()
    return Run(folder, config, folder / "run" / "checkpoints" / "last.ckpt", folder / "ns.nc")


@pytest.fixture(scope="module")
def model(run: Run) -> beamvq.Forecaster:
    return beamvq.load_forecaster(run.ckpt)


def inputs(run: Run, frames: int = 5, shift: float = 0.0, dated: bool = False) -> xr.Dataset:
    """The last ``frames`` frames of trajectories ``PICK``: a file of inputs alone."""
    with xr.open_dataset(run.data) as ds:
        out = ds.isel(trajectory=PICK, time=slice(-frames, None)).load()
    out["vorticity"] = out["vorticity"] + np.float32(shift)
    if dated:
        out = out.assign_coords(time=pd.date_range("2000-01-01", periods=frames, freq="6h"))
    return out


def predict(run: Run, path: Path, *extra: str) -> xr.Dataset:
    """``beamvq predict`` of the file ``path`` with the run's config and checkpoint."""
    main(
        ["predict", "--config", str(run.config), *TINY, "--ckpt_path", str(run.ckpt),
         "--data.init_args.path", str(path), *extra]
    )  # fmt: skip
    with xr.open_dataset(run.predictions) as ds:
        return ds.load()


def direct_forecast(model: beamvq.Forecaster, ds: xr.Dataset) -> np.ndarray:
    """The checkpoint's module applied to the last 5 frames by hand: ``(S, T, H, W)``."""
    x = torch.from_numpy(ds["vorticity"].values[:, -5:, None].astype(np.float32))
    with torch.inference_mode():
        return model.module(x)[:, :, 0].numpy()


# -- (a) beamvq predict on a file of inputs alone -------------------------------------------------
def test_predict_forecasts_an_inputs_only_file_with_the_checkpoints_statistics(
    run: Run, model: beamvq.Forecaster, tmp_path: Path
) -> None:
    saved = read_checkpoint(str(run.ckpt))["state_dict"]
    std = float(saved["normalizer.std"])
    shift = 5.0 * std  # far from the training data: own statistics would undo it exactly
    ds = inputs(run, shift=shift)
    ds.to_netcdf(tmp_path / "five.nc")
    out = predict(run, tmp_path / "five.nc")

    fc = out["vorticity"]
    assert fc.dims == ("sample", "lead_time", "y", "x") and fc.shape == (3, 5, 16, 16)
    assert out["trajectory"].values.tolist() == ds["trajectory"].values.tolist()
    last = float(ds["time"].values[-1])
    np.testing.assert_array_equal(out["init_time"].values, [last] * 3)
    np.testing.assert_allclose(out["lead_time"].values, [1, 2, 3, 4, 5])
    np.testing.assert_allclose(out["valid_time"].values[0], last + np.arange(1, 6))
    assert out["vorticity_members"].shape == (3, 4, 5, 16, 16)  # quickstart: ensemble.members 4

    # the checkpoint's statistics: the module as restored, applied by hand, gives the file
    torch.testing.assert_close(model.module.normalizer.mean, saved["normalizer.mean"])
    torch.testing.assert_close(model.module.normalizer.std, saved["normalizer.std"])
    np.testing.assert_allclose(fc.values, direct_forecast(model, ds), rtol=1e-5, atol=1e-5)
    # statistics of the inputs' own would give the unshifted inputs' forecast, shifted
    plain = direct_forecast(model, inputs(run))
    assert np.abs(fc.values - shift - plain).max() > 0.05 * std

    # the Python API's forecast of the same inputs is the file's, members included
    api = model.forecast(ds, members=4)
    np.testing.assert_allclose(api["vorticity"].values, fc.values, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        api["vorticity_members"].values, out["vorticity_members"].values, rtol=1e-5, atol=1e-5
    )
    assert "five.nc" in out.attrs["source"] and str(run.ckpt) in out.attrs["history"]


def test_predict_dated_inputs_at_chosen_init_times_get_valid_times(
    run: Run, model: beamvq.Forecaster, tmp_path: Path
) -> None:
    ds = inputs(run, frames=8, dated=True)  # 8 < one window of 10 frames: no recorded future
    ds.to_netcdf(tmp_path / "dated.nc")
    times = "[2000-01-02T00:00, 2000-01-02T18:00]"  # frames 5 and 8: the inputs ending there
    out = predict(run, tmp_path / "dated.nc", "--data.init_args.predict.times", times)

    init = np.array(["2000-01-02T00:00", "2000-01-02T18:00"], "datetime64[ns]")
    np.testing.assert_array_equal(out["init_time"].values, np.repeat(init[None], 3, 0).ravel())
    assert out["trajectory"].values.tolist() == sorted(PICK * 2)
    six_hours = np.timedelta64(6, "h").astype("timedelta64[ns]")
    np.testing.assert_array_equal(out["lead_time"].values, six_hours * np.arange(1, 6))
    np.testing.assert_array_equal(
        out["valid_time"].values, out["init_time"].values[:, None] + six_hours * np.arange(1, 6)
    )
    assert out["vorticity"].shape == (6, 5, 16, 16)
    # the first init time's inputs are frames 1..5: the API's forecast of the 5-frame file
    api = model.forecast(ds.isel(time=slice(0, 5)))
    np.testing.assert_allclose(out["vorticity"].values[::2], api["vorticity"].values, atol=1e-5)


# -- (b) what is refused, naming the file and the variable or count --------------------------------
def test_predict_refuses_too_few_frames_naming_file_and_count(run: Run, tmp_path: Path) -> None:
    inputs(run, frames=3).to_netcdf(tmp_path / "three.nc")
    with pytest.raises(ValueError, match=r"three\.nc: 3 time step\(s\), .*in_steps=5"):
        predict(run, tmp_path / "three.nc")


def test_predict_refuses_a_missing_variable_naming_file_and_variable(
    run: Run, tmp_path: Path
) -> None:
    inputs(run).rename(vorticity="w").to_netcdf(tmp_path / "renamed.nc")
    with pytest.raises(ValueError, match=r"renamed\.nc: variable\(s\) \['vorticity'\] not in"):
        predict(run, tmp_path / "renamed.nc")


def test_api_refuses_inputs_that_do_not_fit_the_checkpoint(
    run: Run, model: beamvq.Forecaster
) -> None:
    ds = inputs(run)
    with pytest.raises(ValueError, match=r"ds_in: 4 time step\(s\)"):
        model.forecast(ds.isel(time=slice(1, None)))
    with pytest.raises(ValueError, match=r"ds_in: variable\(s\) \['vorticity'\] not in"):
        model.forecast(ds.rename(vorticity="w"))
    with pytest.raises(ValueError, match=r"grid \(y, x\): checkpoint \[16, 16\], ds_in \[16, 8\]"):
        model.forecast(ds.isel(x=slice(0, 8)))
    with pytest.raises(
        ValueError, match=r"variables \(channel order\): checkpoint \['vorticity'\]"
    ):
        model.forecast(ds.rename(vorticity="w"), variables=["w"])
    with pytest.raises(ValueError, match=r"data.predict.times: 2001-01-01 is not a time of ds_in"):
        model.forecast(inputs(run, dated=True), init=["2001-01-01"])


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"init": "first"}, r"data.predict.init must be one of"),
        ({"init": "times"}, r"needs data.predict.times"),
        ({"init": "last", "times": ["2000"]}, r"with data.predict.init='last' drop them"),
    ],
)
def test_predict_settings_are_checked_when_built(settings: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PredictConfig(**settings)


def test_inputs_alone_are_for_predict_only(run: Run, tmp_path: Path) -> None:
    inputs(run).to_netcdf(tmp_path / "five.nc")
    windows = WindowConfig(in_steps=5, out_steps=5)
    dm = NetCDFDataModule(
        tmp_path / "five.nc", ["vorticity"], windows, predict=PredictConfig("last")
    )
    with pytest.raises(ValueError, match=r"data.predict.init='last' .* beamvq fit needs"):
        dm.setup("fit")
    dm.setup("predict")
    assert dm.normalization is None and dm.predict_split == "inputs"  # the checkpoint's stats
    with pytest.raises(ValueError, match=r"five\.nc: no 'train' windows"):
        dm.training_windows()


# -- (c) the Python API ----------------------------------------------------------------------
def test_api_round_trip(run: Run, model: beamvq.Forecaster, tmp_path: Path) -> None:
    assert beamvq.load_forecaster is __import__("beamvq.forecast").forecast.load_forecaster
    assert model.channels == ["vorticity"] and (model.in_steps, model.lead_steps) == (5, 5)
    assert model.device == torch.device("cpu") and not model.module.training
    ds = inputs(run, frames=8, dated=True)
    out = model.forecast(ds, members=3)
    assert out["vorticity"].shape == (3, 5, 16, 16)
    members = out["vorticity_members"]
    assert members.dims == ("sample", "member", "lead_time", "y", "x") and members.shape[1] == 3
    np.testing.assert_allclose(out["vorticity_ens_mean"].values, members.values.mean(1), atol=1e-6)
    np.testing.assert_allclose(out["vorticity_ens_spread"].values, members.values.std(1), atol=1e-6)
    assert out["vorticity"].attrs["units"] == ds["vorticity"].attrs["units"]
    np.testing.assert_array_equal(out["init_time"].values, [ds["time"].values[-1]] * 3)

    every = model.forecast(ds, init="every")  # 8 frames: 4 inputs of 5 per trajectory
    assert every["vorticity"].shape == (12, 5, 16, 16)
    np.testing.assert_allclose(every["vorticity"].values[3::4], out["vorticity"].values, atol=1e-5)
    chosen = model.forecast(ds, init=[np.datetime64("2000-01-02T12:00")])
    np.testing.assert_allclose(
        chosen["vorticity"].values, every["vorticity"].values[2::4], atol=1e-5
    )

    # a file gives what its dataset gives; the result writes as NetCDF
    ds.to_netcdf(tmp_path / "dated.nc")
    from_file = model.forecast(tmp_path / "dated.nc")
    np.testing.assert_allclose(from_file["vorticity"].values, out["vorticity"].values, atol=1e-6)
    out.to_netcdf(tmp_path / "forecast.nc")
    with xr.open_dataset(tmp_path / "forecast.nc") as back:
        np.testing.assert_array_equal(back["valid_time"].values, out["valid_time"].values)
    with pytest.raises(FileNotFoundError, match=r"load_forecaster: checkpoint file not found"):
        beamvq.load_forecaster(tmp_path / "none.ckpt")


def test_api_members_need_a_count_of_two_or_more(run: Run, model: beamvq.Forecaster) -> None:
    with pytest.raises(ValueError, match=r"members=1: give 2 or more"):
        model.forecast(inputs(run), members=1)
    with pytest.raises(ValueError, match=r"the code bank holds 32 codes"):
        model.forecast(inputs(run), members=33)
