"""Run reports: a tiny fit hands W&B the forecast, ensemble, lead-time, code-bank and
augmentation media (the calls on W&B's public ``Run.log`` are recorded, and the offline run
folder holds the media files), PNGs that are not blank, a rollout GIF, a CF prediction file, and
a summary table; no network is touched."""

from __future__ import annotations

import socket
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import netCDF4
import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import wandb
import xarray as xr
from PIL import Image
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import WandbLogger

from beamvq import summary
from beamvq.callbacks.artifacts import WandbArtifacts
from beamvq.callbacks.augmentation import AugmentationReport, pool_truths
from beamvq.callbacks.beam_search import BeamSearchAugmentation
from beamvq.callbacks.codebook import CodebookUsageReport
from beamvq.callbacks.figures.augmentation import PoolExample, augmentation_figure
from beamvq.callbacks.figures.style import save_figure
from beamvq.callbacks.forecast_images import ForecastImageLogger
from beamvq.callbacks.lead_time import LeadTimeReport
from beamvq.callbacks.prediction_writer import NetCDFPredictionWriter
from beamvq.callbacks.tables import EpochRecord, code_usage, lead_table, markdown_table
from beamvq.cli import main
from beamvq.datamodules.config import WindowConfig
from beamvq.datamodules.netcdf import NetCDFDataModule
from beamvq.datamodules.synthetic import write_navier_stokes

ROOT = Path(__file__).resolve().parents[1]
CONFIG = """
seed_everything: 0
trainer:
  accelerator: cpu
  devices: 1
  max_epochs: 2
  precision: 32-true
  default_root_dir: {run}
  log_every_n_steps: 1
  limit_train_batches: 2
  limit_val_batches: 1
  limit_test_batches: 1
  limit_predict_batches: 1
  num_sanity_val_steps: 0
  reload_dataloaders_every_n_epochs: 1
  logger:
    class_path: pytorch_lightning.loggers.WandbLogger
    init_args: {{project: beamvq, name: tiny, save_dir: {run}}}
  callbacks:
    - class_path: pytorch_lightning.callbacks.ModelCheckpoint
      init_args: {{dirpath: {run}/checkpoints, save_last: true, save_top_k: -1}}
    - class_path: beamvq.callbacks.beam_search.BeamSearchAugmentation
      init_args:
        start_epoch: 0
        inputs: {{windows: 6}}
        search: {{beam_width: 2, top_k: 2, only_improving: false}}
        scorer: {{class_path: beamvq.metrics.NegMSEScorer}}
    - class_path: beamvq.callbacks.forecast_images.ForecastImageLogger
    - class_path: beamvq.callbacks.lead_time.LeadTimeReport
    - class_path: beamvq.callbacks.codebook.CodebookUsageReport
    - class_path: beamvq.callbacks.augmentation.AugmentationReport
    - class_path: beamvq.callbacks.artifacts.WandbArtifacts
    - class_path: pytorch_lightning.callbacks.RichProgressBar
    - class_path: beamvq.callbacks.prediction_writer.NetCDFPredictionWriter
      init_args: {{output: {run}/predictions.nc}}
model:
  backbone:
    class_path: beamvq.backbones.SimVPv2
    init_args: {{in_steps: 3, out_steps: 3, in_channels: 1, out_channels: 1,
                hid_s: 8, hid_t: 16, n_s: 2, n_t: 1}}
  bottleneck:
    class_path: beamvq.bottleneck.VQBottleneck
    init_args: {{codebook_size: 16}}
  candidate_k: 3
  loss: {{candidate_weight: 0.1}}
  ensemble: {{members: 3}}
data:
  class_path: beamvq.datamodules.netcdf.NetCDFDataModule
  init_args:
    path: {data}
    variables: [vorticity]
    windows: {{in_steps: 3, out_steps: 3}}
    loader: {{batch_size: 4}}
    generator:
      class_path: beamvq.datamodules.synthetic.NavierStokesGenerator
      init_args: {{n_trajectories: 6, resolution: 16, n_frames: 10}}
"""


def _no_network(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Refuse in-process connections other than local ones (W&B's own service is local)."""
    attempts: list[Any] = []
    real = socket.socket.connect

    def connect(self: socket.socket, address: Any) -> Any:
        local = isinstance(address, (str, bytes)) or str(address[0]) in (
            "127.0.0.1",
            "localhost",
            "::1",
        )
        if not local:
            attempts.append(address)
            raise OSError(f"test: network access to {address} refused")
        return real(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    return attempts


class WandbCalls:
    """What our code hands to W&B through its public API: every ``wandb.Run.log`` payload and
    every ``WandbLogger.log_hyperparams`` argument (recorded, then passed on to W&B)."""

    def __init__(self, mp: pytest.MonkeyPatch) -> None:
        self.logged: list[dict[str, Any]] = []
        self.hyperparams: list[dict[str, Any]] = []
        real_log, real_hparams = wandb.Run.log, WandbLogger.log_hyperparams

        def log(run: Any, data: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
            self.logged.append(dict(data))
            return real_log(run, data, *args, **kwargs)

        def log_hyperparams(logger: WandbLogger, params: Any) -> None:
            self.hyperparams.append(dict(params))
            real_hparams(logger, params)

        mp.setattr(wandb.Run, "log", log)
        mp.setattr(WandbLogger, "log_hyperparams", log_hyperparams)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    tmp = tmp_path_factory.mktemp("reports")
    mp = pytest.MonkeyPatch()
    mp.setenv("WANDB_MODE", "offline")
    mp.setenv("WANDB_SILENT", "true")
    mp.chdir(tmp)
    attempts = _no_network(mp)
    calls = WandbCalls(mp)
    try:
        cfg = tmp / "tiny.yaml"
        cfg.write_text(CONFIG.format(run=tmp / "run", data=tmp / "ns.nc"))
        # as from the console: the prediction file's history names this command
        mp.setattr(sys, "argv", ["beamvq", "fit", "--config", str(cfg)])
        fit = main()
        fit_calls = SimpleNamespace(logged=list(calls.logged), hyperparams=list(calls.hyperparams))
        ckpts = sorted((tmp / "run" / "checkpoints").glob("epoch=*.ckpt"))
        mp.setattr(
            sys, "argv", ["beamvq", "predict", "--config", str(cfg), "--ckpt_path", str(ckpts[-1])]
        )
        main()
        md = summary.main(
            ["--config", str(cfg), "--ckpt", str(ckpts[0]), "--ckpt", str(ckpts[-1]),
             "--out", str(tmp / "run" / "summary" / "summary.md"), "--no-logger"]
        )  # fmt: skip
    finally:
        mp.undo()
    return SimpleNamespace(
        root=tmp / "run",
        fit=fit,
        ckpt=ckpts[-1],
        summary=md,
        network_attempts=attempts,
        wandb=fit_calls,
    )


def _callback(trainer: Any, kind: type) -> Any:
    return next(cb for cb in trainer.callbacks if isinstance(cb, kind))


def _values(calls: SimpleNamespace, key: str) -> list[Any]:
    return [d[key] for d in calls.logged if key in d]


def _variance(path: Path) -> float:
    return float(np.asarray(Image.open(path).convert("L"), dtype=np.float64).var())


def test_offline_wandb_run_holds_the_report(run: SimpleNamespace) -> None:
    runs = list((run.root / "wandb").glob("offline-run-*"))
    fit_run = [r for r in runs if (r / "files" / "media" / "videos").is_dir()]
    assert len(fit_run) == 1, runs
    media = fit_run[0] / "files" / "media"
    for key in ("val/forecast", "val/ensemble", "val/by_lead/plot", "codebook/usage_plot"):
        images = list((media / "images").glob(f"{key}_*.png"))
        assert len(images) == 2, key  # one per validation epoch
    assert list((media / "images").glob("augment/panel_*.png"))
    gifs = list((media / "videos" / "val").glob("rollout_*.gif"))
    assert len(gifs) == 1 and Image.open(gifs[0]).n_frames == 3 + 3
    assert not run.network_attempts


def test_wandb_gets_the_report_objects(run: SimpleNamespace) -> None:
    trainer, calls = run.fit.trainer, run.wandb
    metrics = trainer.callback_metrics
    # media go out at the trainer's step, one call per report
    for key in ("val/forecast", "val/ensemble", "val/by_lead/plot", "codebook/usage_plot"):
        images = _values(calls, key)
        assert len(images) == 2 and all(isinstance(i, wandb.Image) for i in images), key
    assert all("trainer/global_step" in d for d in calls.logged)
    (video,) = _values(calls, "val/rollout")
    assert isinstance(video, wandb.Video)
    # the per-lead table holds the metrics the module logged at the last validation, and each
    # per-lead metric gets a line chart drawn from that table
    table = _values(calls, "val/by_lead/table")[-1]
    assert table.columns[:3] == ["lead_time", "mse", "mae"]
    assert [r[0] for r in table.data] == [1, 2, 3]
    np.testing.assert_allclose(
        [r[1] for r in table.data], [float(metrics[f"val/mse_lead{t}"]) for t in (1, 2, 3)]
    )
    chart = _values(calls, "val/by_lead/mse")[-1]
    assert isinstance(chart, wandb.plot.CustomChart) and chart.table is table
    # the code-bank histogram holds the counts the report computed (16 codes, 16 bins)
    hist = _values(calls, "codebook/usage")[-1]
    usage = _callback(trainer, CodebookUsageReport).usage
    assert isinstance(hist, wandb.Histogram) and len(hist.histogram) == 16
    np.testing.assert_array_equal(hist.histogram, usage.counts)
    assert _values(calls, "codebook/val_perplexity")[-1] == pytest.approx(usage.perplexity)
    # the search history as a table, one row per search epoch
    (history,) = _values(calls, "augment/history")
    search = _callback(trainer, BeamSearchAugmentation)
    assert history.columns == list(EpochRecord._fields)
    assert history.data == [list(r) for r in search.history]
    assert _values(calls, "augment/num_added") == [float(r.added) for r in search.history]
    # the resolved config, recorded by the CLI
    assert any("config" in p and "trainer" in p["config"] for p in calls.hyperparams)


def test_pngs_show_something(run: SimpleNamespace) -> None:
    plots = run.root / "plots"
    names = {p.name for p in plots.glob("*.png")}
    expected = {
        "val_forecast_epoch000.png",
        "val_forecast_epoch001.png",
        "val_ensemble_epoch001.png",
        "val_leads.png",
        "codebook_usage.png",
        "augment_epoch000.png",
    }
    assert expected <= names, names
    for name in expected:
        assert _variance(plots / name) > 100.0, name  # a blank figure has ~0 variance
    gif = Image.open(plots / "val_rollout.gif")
    frames = []
    for i in range(gif.n_frames):
        gif.seek(i)
        frames.append(np.asarray(gif.convert("L"), dtype=np.float64))
    assert len(frames) == 6 and np.abs(frames[-1] - frames[0]).mean() > 1.0


def test_callbacks_report_what_the_run_did(run: SimpleNamespace) -> None:
    trainer = run.fit.trainer
    dm = trainer.datamodule
    leads = _callback(trainer, LeadTimeReport)
    assert [label for label, _ in leads.val_history] == ["epoch 0", "epoch 1"]
    usage = _callback(trainer, CodebookUsageReport).usage
    assert usage.counts.shape == (16,) and usage.counts.sum() > 0
    assert float(trainer.callback_metrics["codebook/val_codes_used"]) == usage.codes_used
    report = _callback(trainer, AugmentationReport)
    assert [p.name for p in report.saved] == ["augment_epoch000.png"]
    # pool samples are drawn with the truth of the training window they came from; the plain
    # forecast runs in eval mode (the code bank does not move) and train mode comes back
    module = run.fit.model
    module.train()
    codes = module.model.bottleneck.codebook.clone()
    examples = report.pool_examples(dm, module)
    assert module.training
    torch.testing.assert_close(module.model.bottleneck.codebook, codes, rtol=0, atol=0)
    assert len(examples) == 3
    assert all(ex.truth is not None and ex.truth.shape == (16, 16) for ex in examples)
    assert all(np.isfinite([ex.pseudo_rmse, ex.plain_rmse]).all() for ex in examples)
    assert _callback(trainer, WandbArtifacts).logged == []  # offline: nothing uploaded


def test_prediction_file_is_cf(run: SimpleNamespace) -> None:
    path = run.root / "predictions.nc"
    with netCDF4.Dataset(path) as nc:  # the C library ncdump uses
        assert nc.Conventions == "CF-1.8"
        assert "predict" in nc.history and str(run.ckpt) in nc.history
        assert nc["vorticity"].units == "s-1" and nc["vorticity"].long_name
        assert nc["lead_time"].units and nc["lead_time"].long_name
        assert nc["x"].axis == "X" and nc["y"].axis == "Y"
        assert nc["vorticity_members"].dimensions == ("sample", "member", "lead_time", "y", "x")
    with xr.open_dataset(path) as ds:
        assert ds["vorticity"].dims == ("sample", "lead_time", "y", "x")
        spread = ds["vorticity_members"].std("member")
        np.testing.assert_allclose(ds["vorticity_ens_spread"], spread, rtol=1e-4, atol=1e-6)


def test_summary_compares_two_checkpoints(run: SimpleNamespace) -> None:
    text = run.summary.read_text()
    assert "| metric | base | beamvq | Δ |" in text
    rows = [line for line in text.splitlines() if line.startswith("| +")]
    assert [r.split("|")[1].strip() for r in rows] == ["+1", "+2", "+3"]
    assert "MSE base" in text and "CRPS beamvq" in text
    png = run.summary.with_name("summary_leads.png")
    assert png.is_file() and _variance(png) > 100.0
    for label in ("base", "beamvq"):
        assert (run.summary.parent / label / "plots" / "test_leads.md").is_file()
        assert (run.summary.parent / label / "plots" / "test_forecast.png").is_file()


def test_lead_table_and_markdown() -> None:
    metrics = {
        "val/mse_lead2": 4.0, "val/mse_lead1": 1.0, "val/csi_m_lead1": 0.5,
        "val/csi_m_lead2": 0.25, "val/csi_74": 0.3, "val/csi_16": 0.6, "val/pod_16": 0.7,
        "val/csi_m": 0.4, "test/mse_lead1": 9.0, "val/mse": 2.5,
    }  # fmt: skip
    table = lead_table(metrics, "val")
    assert table.leads == [1, 2]
    assert table.by_lead == {"mse": [1.0, 4.0], "csi_m": [0.5, 0.25]}
    assert table.thresholds == ["16", "74"]
    assert table.by_threshold["csi"] == [0.6, 0.3]
    assert np.isnan(table.by_threshold["pod"][1])
    md = markdown_table(table)
    assert "| +2 | 4 | 0.25 |" in md and "| 16 | 0.6 | 0.7 |" in md


def test_code_usage_numbers() -> None:
    u = code_usage(np.array([5, 5, 5, 5, 0, 0, 0, 0]))
    assert u.perplexity == pytest.approx(4.0) and u.codes_used == 4 and u.dead_fraction == 0.5


def test_summary_labels_and_markdown() -> None:
    base = summary.collect({"test/mse": 2.0, "test/mse_lead1": 1.0, "test/csi_16": 0.5}, "a", "a")
    new = summary.collect({"test/mse": 1.0, "test/mse_lead1": 0.5, "test/csi_16": 0.6}, "b", "b")
    md = summary.markdown([base, new])
    assert "| MSE | 2 | 1 | -50.0% |" in md
    assert "| +1 | 0.5 | -50.0% |" not in md and "| +1 | 1 | 0.5 | -50.0% |" in md
    assert "| 16 | 0.5 | 0.6 | +20.0% |" in md
    assert summary._labels(["x.ckpt", "y.ckpt"], None) == ["base", "beamvq"]
    with pytest.raises(ValueError, match="--label"):
        summary._labels(["x.ckpt", "y.ckpt"], ["one"])


def test_augmentation_panel_without_truth(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    field = rng.normal(size=(8, 8))
    record = EpochRecord(0, 4, 1, 1, 1, 0.5, 0.1, 1.0)
    unlabelled = PoolExample(field, field + 0.1, field, None, -1.0, 0)
    fig = augmentation_figure([record], [unlabelled], 3, np.array([-1.0]), "no truth")
    assert _variance(save_figure(fig, tmp_path / "a.png", 60)) > 100.0


def test_pool_truths_come_from_the_recorded_source(tmp_path: Path) -> None:
    path = write_navier_stokes(tmp_path / "ns.nc", n_trajectories=4, resolution=16, n_frames=10)
    dm = NetCDFDataModule(
        path=str(path), variables=["vorticity"], windows=WindowConfig(in_steps=3, out_steps=3)
    )
    dm.prepare_data()
    dm.setup("fit")
    ds = dm.dataset("train")
    picked = [1, len(ds) - 1]
    windows = [ds[i] for i in picked]
    x = torch.stack([w.x for w in windows] + [torch.zeros_like(windows[0].x)])
    y = torch.stack([w.y for w in windows] + [torch.zeros_like(windows[0].y)])
    # two training windows (by index) and one unlabelled input (id 0): no pixel matching
    dm.pool.add(x, y + 1.0, torch.zeros(3), torch.tensor([0, 0, 1]), torch.tensor([*picked, 0]))
    truth = pool_truths(dm, dm.pool.samples())
    for w, t in zip(windows, truth[:2]):
        np.testing.assert_array_equal(t, w.y.numpy())
    assert truth[2] is None  # an input with no recorded future


class RecordingRun:
    """The public members of a ``wandb.Run`` that ``WandbArtifacts`` uses, recording the
    artifacts it is handed instead of uploading them."""

    def __init__(self, offline: bool) -> None:
        self.id, self.offline, self.disabled = "abc", offline, False
        self.artifacts: list[tuple[Any, list[str]]] = []

    def log_artifact(self, artifact: Any, aliases: list[str]) -> None:
        self.artifacts.append((artifact, aliases))


def test_artifacts_only_when_online(tmp_path: Path) -> None:
    ckpt = tmp_path / "last.ckpt"
    ckpt.write_bytes(b"weights")
    preds = tmp_path / "predictions.nc"
    preds.write_bytes(b"netcdf")
    checkpoint = ModelCheckpoint(dirpath=tmp_path, monitor="val/loss")
    # what ModelCheckpoint's public attributes hold after a fit
    checkpoint.best_model_path = checkpoint.last_model_path = str(ckpt)
    checkpoint.best_model_score = torch.tensor(0.5)
    for offline in (True, False):
        recording = RecordingRun(offline)
        cb = WandbArtifacts()
        trainer = pl.Trainer(
            logger=WandbLogger(save_dir=str(tmp_path), experiment=recording),
            callbacks=[checkpoint, cb, NetCDFPredictionWriter(str(preds))],
            default_root_dir=tmp_path, enable_progress_bar=False, enable_model_summary=False,
        )  # fmt: skip
        cb.on_fit_end(trainer, None)
        cb.on_predict_end(trainer, None)
        if offline:
            assert recording.artifacts == [] and cb.logged == []
            continue
        (model, aliases), (predictions, _) = recording.artifacts
        assert model.type == "model" and model.name.startswith("model-abc")
        assert aliases == ["latest"]
        assert [f.name for f in cb.logged[0][1]] == ["last.ckpt"]  # best == last: one file
        assert model.metadata == {"best val/loss": 0.5}
        assert predictions.type == "predictions"
        assert [f.name for f in cb.logged[1][1]] == ["predictions.nc"]


def test_report_fragment_appends_callbacks(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(ROOT / "configs/beamvq/ns.yaml"),
              "--config", str(ROOT / "configs/report.yaml"), "--print_config"])  # fmt: skip
    out = capsys.readouterr().out
    for name in ("ModelCheckpoint", "BeamSearchAugmentation", "ForecastImageLogger",
                 "LeadTimeReport", "CodebookUsageReport", "AugmentationReport", "WandbArtifacts",
                 "RichProgressBar"):  # fmt: skip
        assert f".{name}" in out, name


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="members"):
        ForecastImageLogger(members=1)
    with pytest.raises(ValueError, match="batches"):
        CodebookUsageReport(batches=0)
    with pytest.raises(ValueError, match="examples"):
        AugmentationReport(examples=-1)
