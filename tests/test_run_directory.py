"""One run directory (issue 14, item 3): ``trainer.default_root_dir`` moves the W&B run, the
checkpoints, the predictions and the plots together (``beamvq.run_paths``); every subcommand saves
its own resolved config, and a fit from the saved ``config_fit.yaml`` runs and resumes; validate
and test never replace the fit's plots and name the checkpoint's epoch; W&B runs carry the
subcommand (``job_type``) and the run (``group``), the learning rate is logged, and a test run
names the fit run of its checkpoint. Through the real CLI with the shipped quickstart config, W&B
offline (no network); matplotlib's rendering is skipped (conftest.py)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import wandb
from jsonargparse import Namespace
from pytorch_lightning.callbacks import LearningRateMonitor

from beamvq.callbacks.prediction_writer import NetCDFPredictionWriter
from beamvq.cli import main
from beamvq.run_paths import derive_run_settings, file_in_run, logger_save_dir, wandb_run_names

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "quickstart.yaml")
TINY = [
    "--data.init_args.path", "ns.nc",
    "--data.init_args.generator.init_args.n_trajectories", "6",
    "--data.init_args.generator.init_args.resolution", "32",
    "--data.init_args.generator.init_args.n_frames", "12",
    "--data.init_args.loader.batch_size", "4",
    "--model.bottleneck.init_args.codebook_size", "32",
    "--trainer.limit_train_batches", "2",
    "--trainer.limit_val_batches", "1",
    "--trainer.limit_test_batches", "1",
    "--trainer.limit_predict_batches", "1",
    "--trainer.enable_progress_bar", "false",
]  # fmt: skip
# two epochs (the quickstart's search starts at epoch 1, never the last: none runs), so the
# checkpoint's epoch (1) differs from the epoch 0 that validate used to write
FIT = [*TINY, "--trainer.max_epochs", "2"]


def _mtimes(folder: Path, prefix: str) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.glob(f"{prefix}*")}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, figures_not_rendered_within: Any) -> Any:
    tmp = tmp_path_factory.mktemp("rundir")
    # an earlier test's W&B process-wide setup (its mode, its folders) must not carry over
    wandb.teardown()
    mp = pytest.MonkeyPatch()
    mp.setenv("WANDB_MODE", "offline")
    mp.setenv("WANDB_SILENT", "true")
    mp.setenv("WANDB_DIR", str(tmp / "wandb_dir"))
    mp.chdir(tmp)
    import beamvq.callbacks.forecast_images as images

    titles: list[str] = []
    panel = images.forecast_panel

    def recording_panel(sample: Any, title: str, *args: Any, **kwargs: Any) -> Any:
        titles.append(title)
        return panel(sample, title, *args, **kwargs)

    mp.setattr(images, "forecast_panel", recording_panel)
    root = "runs/moved"
    out = SimpleNamespace(tmp=tmp, root=tmp / root, titles=titles)
    try:
        with figures_not_rendered_within():
            out.fit = main(["fit", "--config", CONFIG, *FIT, "--trainer.default_root_dir", root])
            out.fit_titles = list(titles)
            out.val_plots = _mtimes(out.root / "plots", "val_")
            for sub in ("validate", "test", "predict"):
                args = [sub, "--config", CONFIG, *TINY, "--trainer.default_root_dir", root]
                setattr(out, sub, main([*args, "--ckpt_path", "last"]))
            out.checkpoints = sorted(p.name for p in (out.root / "checkpoints").glob("*"))
    finally:
        mp.undo()
    return out


@pytest.fixture(scope="module")
def refit(run: Any, figures_not_rendered_within: Any) -> Any:
    """A fit from the first run's saved ``config_fit.yaml`` into another root, then resumed
    there (``--ckpt_path last``, where its ``config_fit.yaml`` already is)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("WANDB_MODE", "offline")
    mp.setenv("WANDB_SILENT", "true")
    mp.chdir(run.tmp)
    saved = str(run.root / "config_fit.yaml")
    args = ["fit", "--config", saved, "--trainer.default_root_dir", "runs/refit"]
    try:
        with figures_not_rendered_within():
            first = main([*args, "--trainer.max_epochs", "1"])
            resumed = main([*args, "--trainer.max_epochs", "2", "--ckpt_path", "last"])
    finally:
        mp.undo()
    return SimpleNamespace(first=first, resumed=resumed, root=run.tmp / "runs" / "refit")


def test_one_root_moves_logger_checkpoints_predictions_and_plots(run: Any) -> None:
    root = run.root
    assert (root / "checkpoints" / "last.ckpt").is_file()
    assert (root / "checkpoints" / "epoch=1-step=4.ckpt").is_file()  # the top-1 file
    assert len(list((root / "wandb").glob("offline-run-*"))) == 4  # fit, validate, test, predict
    assert (root / "plots" / "val_forecast_epoch001.png").is_file()
    assert (root / "predictions.nc").is_file()
    # the config's runs/quickstart is only the default of default_root_dir: nothing went there,
    # nor into the working directory or $WANDB_DIR
    assert not (run.tmp / "runs" / "quickstart").exists()
    assert not (run.tmp / "wandb").exists() and not (run.tmp / "wandb_dir").exists()
    trainer = run.fit.trainer
    assert trainer.logger.save_dir == "runs/moved"  # relative to the working directory (tmp)
    assert Path(trainer.checkpoint_callback.dirpath) == (root / "checkpoints").resolve()


def test_each_subcommand_saves_its_own_config(run: Any) -> None:
    names = {p.name for p in run.root.glob("config*.yaml")}
    assert names == {f"config_{s}.yaml" for s in ("fit", "validate", "test", "predict")}
    fit = (run.root / "config_fit.yaml").read_text()
    predict = (run.root / "config_predict.yaml").read_text()
    assert "return_predictions" in predict and "return_predictions" not in fit
    # the paths as given (unset), not as derived: a fit from the file follows its own root
    assert "runs/moved/checkpoints" not in fit and "dirpath: null" in fit


def test_a_fit_from_its_saved_config_moves_with_the_root_and_resumes(run: Any, refit: Any) -> None:
    folder = refit.root
    assert refit.first.trainer.current_epoch == 1 and refit.resumed.trainer.current_epoch == 2
    assert refit.resumed.trainer.ckpt_path == str((folder / "checkpoints" / "last.ckpt").resolve())
    assert (folder / "config_fit.yaml").is_file()
    assert len(list((folder / "wandb").glob("offline-run-*"))) == 2
    # the first run's folder is untouched by the fits from its config
    assert sorted(p.name for p in (run.root / "checkpoints").iterdir()) == run.checkpoints
    assert refit.resumed.trainer.logger.experiment.group == "refit"


def test_validate_and_test_keep_the_fit_plots_and_name_the_checkpoint_epoch(run: Any) -> None:
    plots = run.root / "plots"
    assert run.val_plots and _mtimes(plots, "val_") == run.val_plots  # not one rewritten
    for name in ("forecast", "ensemble", "leads", "codebook_usage"):
        assert (plots / f"validate_{name}_epoch001.png").is_file(), name
    assert (plots / "test_forecast.png").is_file()
    assert run.fit_titles == ["validation sample 0, epoch 0", "validation sample 0, epoch 1"]
    # validate, then test: the checkpoint's epoch (1), not the epoch 0 of a fresh trainer
    assert run.titles[2:4] == ["validation sample 0, epoch 1", "test sample 0, epoch 1"]


def test_wandb_runs_are_grouped_by_run_and_typed_by_subcommand(run: Any) -> None:
    fit = run.fit.trainer.logger.experiment
    assert (fit.group, fit.job_type, fit.name) == ("moved", "fit", "moved")
    for sub in ("validate", "test", "predict"):
        other = getattr(run, sub).trainer.logger.experiment
        assert (other.group, other.job_type, other.name) == ("moved", sub, f"moved-{sub}")
        assert other.config["fit_run_id"] == fit.id, sub
    test_id = run.test.trainer.logger.experiment.id
    (file,) = (run.root / "wandb").glob(f"offline-run-*-{test_id}/run-{test_id}.wandb")
    assert b"test/mse" in file.read_bytes()  # the test metrics are in that run


def test_learning_rate_is_logged(run: Any) -> None:
    (monitor,) = [c for c in run.fit.trainer.callbacks if isinstance(c, LearningRateMonitor)]
    lrs = monitor.lrs["lr-AdamW"]
    assert lrs[0] == pytest.approx(1e-3) and lrs[-1] < lrs[0]  # cosine over 2 epochs
    fit_id = run.fit.trainer.logger.experiment.id
    (file,) = (run.root / "wandb").glob(f"offline-run-*-{fit_id}/run-{fit_id}.wandb")
    assert b"lr-AdamW" in file.read_bytes()


def _trainer_section(**logger: Any) -> Namespace:
    return Namespace(
        default_root_dir="runs/x",
        logger=Namespace(
            class_path="pytorch_lightning.loggers.WandbLogger", init_args=Namespace(**logger)
        ),
        callbacks=[
            Namespace(
                class_path="pytorch_lightning.callbacks.ModelCheckpoint",
                init_args=Namespace(dirpath="elsewhere/ck"),
            ),
            Namespace(
                class_path="pytorch_lightning.callbacks.ModelCheckpoint",
                init_args=Namespace(dirpath=None),
            ),
            Namespace(
                class_path="beamvq.callbacks.beam_search.BeamSearchAugmentation",
                init_args=Namespace(pool_output="pool.nc"),
            ),
        ],
    )


def test_derived_paths_and_names_and_what_is_given_wins() -> None:
    derived = _trainer_section(save_dir=".", group=None, job_type=None, name=None)
    assert derive_run_settings(derived, "test") == "runs/x"
    assert derived.logger.init_args.as_dict() == {
        "save_dir": "runs/x", "group": "x", "job_type": "test", "name": "x-test",
    }  # fmt: skip
    ck_given, ck_unset, search = (c.init_args for c in derived.callbacks)
    assert ck_given.dirpath == "elsewhere/ck" and ck_unset.dirpath == "runs/x/checkpoints"
    assert search.pool_output == "runs/x/pool.nc"
    given = _trainer_section(save_dir="logs", group="g", job_type="j", name="n")
    derive_run_settings(given, "fit")
    assert given.logger.init_args.as_dict() == {
        "save_dir": "logs", "group": "g", "job_type": "j", "name": "n",
    }  # fmt: skip
    assert logger_save_dir("r", None) == "r" and logger_save_dir("r", "./") == "r"
    assert logger_save_dir("r", "/abs/logs") == "/abs/logs"
    assert file_in_run("r", "p.nc") == "r/p.nc" and file_in_run("r", "./p.nc") == "./p.nc"
    assert file_in_run("r", None) is None and file_in_run("r", "s3://b/p.nc") == "s3://b/p.nc"
    assert wandb_run_names("runs/quickstart", "fit") == {
        "group": "quickstart", "job_type": "fit", "name": "quickstart",
    }  # fmt: skip


def test_prediction_writer_file_follows_the_root(tmp_path: Path) -> None:
    trainer = SimpleNamespace(default_root_dir=str(tmp_path / "run"))
    assert NetCDFPredictionWriter().output_path(trainer) == tmp_path / "run" / "predictions.nc"
    assert NetCDFPredictionWriter("own.nc").output_path(trainer) == tmp_path / "run" / "own.nc"
    assert NetCDFPredictionWriter("out/own.nc").output_path(trainer) == Path("out/own.nc")
    assert NetCDFPredictionWriter(str(tmp_path / "a.nc")).output_path(trainer) == tmp_path / "a.nc"
