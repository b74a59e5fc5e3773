"""End to end through the real CLI: fit -> checkpoint, W&B offline run with an image, PNG,
predict -> NetCDF in physical units; and the bad inputs that must stop before training."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xarray as xr

from beamvq.cli import main
from beamvq.datamodules.synthetic import write_navier_stokes

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "--data.init_args.generator.init_args.n_trajectories",
    "6",
    "--data.init_args.generator.init_args.resolution",
    "32",
    "--data.init_args.generator.init_args.n_frames",
    "12",
    "--data.init_args.loader.batch_size",
    "4",
    "--trainer.max_epochs",
    "1",
    "--trainer.limit_train_batches",
    "3",
    "--trainer.limit_val_batches",
    "2",
    "--trainer.limit_predict_batches",
    "2",
    "--model.bottleneck.init_args.codebook_size",
    "32",
]


def quickstart_in(tmp_path: Path) -> Path:
    """The quickstart config with every output redirected into ``tmp_path``."""
    text = (ROOT / "configs" / "quickstart.yaml").read_text()
    text = text.replace("runs/quickstart", str(tmp_path / "run"))
    text = text.replace("data/navier_stokes_64.nc", str(tmp_path / "ns.nc"))
    cfg = tmp_path / "quickstart.yaml"
    cfg.write_text(text)
    return cfg


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory, figures_not_rendered_within: Any) -> Path:
    # the report callbacks hand their files to W&B as usual; matplotlib's rendering of them is
    # skipped (conftest.py): test_reports.py renders for real and checks what the files show
    tmp_path = tmp_path_factory.mktemp("cli")
    mp = pytest.MonkeyPatch()
    mp.setenv("WANDB_MODE", "offline")
    mp.setenv("WANDB_SILENT", "true")
    mp.chdir(tmp_path)
    try:
        cfg = quickstart_in(tmp_path)
        with figures_not_rendered_within():
            main(["fit", "--config", str(cfg), *TINY])
        main(
            [
                "predict",
                "--config",
                str(cfg),
                *TINY,
                "--ckpt_path",
                str(tmp_path / "run" / "checkpoints" / "last.ckpt"),
            ]
        )
    finally:
        mp.undo()
    return tmp_path


def test_fit_leaves_checkpoint_wandb_run_and_png(fitted: Path) -> None:
    assert (fitted / "run" / "checkpoints" / "last.ckpt").is_file()
    pngs = list((fitted / "run" / "plots").glob("*.png"))
    assert pngs
    runs = list((fitted / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) >= 1
    media = [m for run in runs for m in run.glob("files/media/images/**/*.png")]
    assert media, "the offline W&B run holds no forecast image"
    # the resolved config is saved in the run directory, one file per subcommand (and logged to
    # W&B as hyper-parameters)
    config = (fitted / "run" / "config_fit.yaml").read_text()
    assert "NavierStokesGenerator" in config and "SimVPv2" in config


def test_predict_writes_physical_netcdf(fitted: Path) -> None:
    path = fitted / "run" / "predictions.nc"
    with xr.open_dataset(path) as ds, xr.open_dataset(fitted / "ns.nc") as truth:
        fc = ds["vorticity"]
        assert fc.dims == ("sample", "lead_time", "y", "x")
        assert fc.shape[1:] == (5, 32, 32)
        assert ds.attrs["Conventions"] == "CF-1.8" and "checkpoint" in ds.attrs["history"]
        assert fc.attrs["units"] == "s-1"
        np.testing.assert_allclose(ds.x.values, truth.x.values)
        # de-normalized: same magnitude as the physical field, not unit variance
        scale = float(truth.vorticity.std())
        assert 0.2 * scale < float(fc.std()) < 5 * scale
        assert abs(float(fc.mean())) < scale
        # windows map back to real trajectories and times
        assert set(ds.trajectory.values.tolist()) <= set(truth.trajectory.values.tolist())
        assert set(ds.init_time.values.tolist()) <= set(truth.time.values.tolist())
        if "vorticity_members" in ds:
            assert ds["vorticity_members"].dims == ("sample", "member", "lead_time", "y", "x")


def run_fit(tmp_path: Path, *extra: str) -> None:
    cfg = quickstart_in(tmp_path)
    main(["fit", "--config", str(cfg), *TINY, "--trainer.logger", "false", *extra])


@pytest.fixture()
def tiny_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.chdir(tmp_path)
    return write_navier_stokes(tmp_path / "ns.nc", n_trajectories=6, resolution=32, n_frames=12)


def test_missing_checkpoint(tmp_path: Path, tiny_file: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        run_fit(tmp_path, "--ckpt_path", str(tmp_path / "nope.ckpt"))


def test_missing_file_without_generation(tmp_path: Path, tiny_file: Path) -> None:
    cfg = quickstart_in(tmp_path)
    with pytest.raises(FileNotFoundError, match="missing.nc"):
        main(
            [
                "fit",
                "--config",
                str(cfg),
                *TINY,
                "--trainer.logger",
                "false",
                "--data.init_args.generator",
                "null",
                "--data.init_args.path",
                str(tmp_path / "missing.nc"),
            ]
        )


def test_missing_variable(tmp_path: Path, tiny_file: Path) -> None:
    cfg = quickstart_in(tmp_path)
    with pytest.raises(ValueError, match=r"ns.nc: variable\(s\) \['temperature'\] not in"):
        main(
            [
                "fit",
                "--config",
                str(cfg),
                "--trainer.logger",
                "false",
                "--data.init_args.path",
                str(tiny_file),
                "--data.init_args.variables",
                "[temperature]",
            ]
        )


def test_window_longer_than_series(tmp_path: Path, tiny_file: Path) -> None:
    with pytest.raises(
        ValueError,
        match=r"ns.nc: .*one window needs in_steps \+ out_steps x rollout_steps = 8 \+ 5 x 1 = 13",
    ):
        run_fit(
            tmp_path,
            "--data.init_args.windows.in_steps",
            "8",
            "--model.backbone.init_args.in_steps",
            "8",
        )


def test_nan_in_data(tmp_path: Path, tiny_file: Path) -> None:
    with xr.open_dataset(tiny_file) as ds:
        bad = ds.load()
    bad["vorticity"][0, 0, 0, 0] = np.nan
    bad.to_netcdf(tmp_path / "nan.nc")
    with pytest.raises(ValueError, match="'vorticity' has 1 NaN"):
        run_fit(tmp_path, "--data.init_args.path", str(tmp_path / "nan.nc"))


def test_unknown_class_is_named(
    tmp_path: Path, tiny_file: Path, capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(SystemExit):
        run_fit(tmp_path, "--model.backbone", "beamvq.backbones.NoSuchNet")
    assert "NoSuchNet" in capsys.readouterr().err


def test_shape_mismatch_between_data_and_model(tmp_path: Path, tiny_file: Path) -> None:
    with pytest.raises(ValueError, match="data.windows.in_steps=4 but the model expects 5"):
        run_fit(tmp_path, "--data.init_args.windows.in_steps", "4")


def test_print_config_composes(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(
            [
                "fit",
                "--config",
                str(ROOT / "configs/quickstart.yaml"),
                "--config",
                str(ROOT / "configs/backbones/fno.yaml"),
                "--print_config",
            ]
        )
    out = capsys.readouterr().out
    assert "beamvq.backbones.FNO" in out and "NavierStokesGenerator" in out
    json.dumps(out)  # printable text
