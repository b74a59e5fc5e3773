"""BeamSearchAugmentation: the training set grows with searched, filtered, ensembled
pseudo-targets; the model (code bank included) is untouched; only training data are read; the
pool survives a checkpoint exactly; DDP shards merge to the single-rank result; the configs run
BeamVQ from the CLI."""

from __future__ import annotations

import csv
import functools
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import xarray as xr
import yaml
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger

from beamvq.backbones import ResNet
from beamvq.bottleneck import VQBottleneck
from beamvq.callbacks.beam_search import BeamSearchAugmentation
from beamvq.callbacks.search_inputs import SearchInputs
from beamvq.cli import main
from beamvq.datamodules.config import LoaderConfig, PoolConfig, SplitConfig, WindowConfig
from beamvq.datamodules.netcdf import NetCDFDataModule
from beamvq.datamodules.splits import future_free_starts
from beamvq.datamodules.synthetic import NavierStokesGenerator, write_navier_stokes
from beamvq.datamodules.windows import WindowDataset
from beamvq.metrics import NegMSEScorer, SpectrumScorer
from beamvq.module import ForecastModule
from beamvq.selftrain import SearchConfig

ROOT = Path(__file__).resolve().parents[1]
T_IN, T_OUT, STEPS, K = 2, 2, 2, 3


@pytest.fixture(scope="module")
def ns_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ns") / "ns.nc"
    write_navier_stokes(path, n_trajectories=6, resolution=16, n_frames=9, seed=2)
    return path


class SpyDataModule(NetCDFDataModule):
    """Records which data the callback asks for while ``recording``."""

    def __init__(self, path: str) -> None:
        super().__init__(
            path=path, variables=["vorticity"], windows=WindowConfig(T_IN, T_OUT, STEPS),
            loader=LoaderConfig(batch_size=4), splits=SplitConfig(fractions=(0.5, 0.25, 0.25)),
            pool=PoolConfig(capacity=1000),
            generator=NavierStokesGenerator(n_trajectories=6, resolution=16, n_frames=9),
        )  # fmt: skip
        self.recording = False
        self.calls: list[tuple] = []

    def _record(self, *call: Any) -> None:
        if self.recording:
            self.calls.append(call)

    def dataset(self, split: str):  # type: ignore[no-untyped-def]
        self._record("dataset", split)
        return super().dataset(split)

    def training_windows(self, max_windows: int | None = None, seed: int = 0):  # type: ignore[no-untyped-def]
        self._record("training_windows", max_windows, seed)
        return super().training_windows(max_windows, seed)

    def val_dataloader(self):  # type: ignore[no-untyped-def]
        self._record("val_dataloader")
        return super().val_dataloader()

    def test_dataloader(self):  # type: ignore[no-untyped-def]
        self._record("test_dataloader")
        return super().test_dataloader()


class SpyAugmentation(BeamSearchAugmentation):
    """Snapshots the whole module state around each epoch-end search."""

    checks: list[tuple[int, bool, bool, bool]]

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        dm = trainer.datamodule
        due = self.due(trainer)
        before = {k: v.clone() for k, v in pl_module.state_dict().items()}
        dm.recording = True
        try:
            super().on_train_epoch_end(trainer, pl_module)
        finally:
            dm.recording = False
        after = pl_module.state_dict()
        same = all(torch.equal(before[k], after[k]) for k in before)
        if not hasattr(self, "checks"):
            self.checks = []
        self.checks.append((trainer.current_epoch, due, same, pl_module.training))


class EpochStart(pl.Callback):
    """Length of the training set and pool size at the start of every epoch."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, int, int]] = []
        self.pools: list[dict] = []

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        dm = trainer.datamodule
        n = len(trainer.train_dataloader.dataset)
        self.seen.append((trainer.current_epoch, n, dm.pool.size))
        self.pools.append(
            {k: v.clone() if torch.is_tensor(v) else v for k, v in dm.state_dict().items()}
        )


def make_module(**kwargs: Any) -> ForecastModule:
    torch.manual_seed(0)
    bottleneck = functools.partial(VQBottleneck, codebook_size=16, kmeans_init=False)
    args: dict = dict(rollout_steps=STEPS, candidate_k=K)
    args.update(kwargs)
    return ForecastModule(ResNet(T_IN, T_OUT, 1, 1, width=8, n_blocks=1), bottleneck, **args)


def make_trainer(callbacks: list, max_epochs: int, **kwargs: Any) -> pl.Trainer:
    args: dict = dict(
        accelerator="cpu", max_epochs=max_epochs, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_train_batches=2,
        limit_val_batches=1, reload_dataloaders_every_n_epochs=1, callbacks=callbacks,
    )  # fmt: skip
    args.update(kwargs)
    return pl.Trainer(**args)


# -- the callback in a fit ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def fitted(ns_file: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("fit")
    dm = SpyDataModule(str(ns_file))
    module = make_module()
    spectrum = SpectrumScorer(from_vorticity=True)
    cb = SpyAugmentation(
        NegMSEScorer(), SearchConfig(beam_width=2, top_k=2, only_improving=False),
        start_epoch=0, inputs=SearchInputs(windows=5, unlabelled=3), unlabelled_scorer=spectrum,
        search_batch_size=2, pool_output=str(tmp / "pool.nc"),
    )  # fmt: skip
    starts = EpochStart()
    trainer = make_trainer([cb, starts], 3, logger=CSVLogger(str(tmp), name="csv"))
    trainer.fit(module, dm)
    return dict(dm=dm, cb=cb, starts=starts, trainer=trainer, tmp=tmp, spectrum=spectrum)


def test_pool_grows_and_the_next_epoch_trains_on_it(fitted: dict) -> None:
    dm, cb, starts = fitted["dm"], fitted["cb"], fitted["starts"]
    n_train = len(dm.dataset("train"))
    # searches after epochs 0 and 1; the last epoch (2) is skipped
    assert [r.epoch for r in cb.history] == [0, 1]
    for r in cb.history:
        assert r.searched == 5 + 3 and r.accepted == r.added == 8  # only_improving off, no NaN
        assert r.search_seconds > 0 and r.train_seconds > 0
    assert [r.pool_size for r in cb.history] == [8, 16]
    assert starts.seen == [(0, n_train, 0), (1, n_train + 8, 8), (2, n_train + 16, 16)]
    assert dm.pool.samples().y.shape == (16, STEPS * T_OUT, 1, 16, 16)
    assert torch.isfinite(dm.pool.samples().y).all()
    assert fitted["spectrum"].clim_spectrum is not None  # fitted once on training targets


def test_search_leaves_the_model_untouched_and_restores_train_mode(fitted: dict) -> None:
    checks = fitted["cb"].checks
    assert [(epoch, due) for epoch, due, _, _ in checks] == [(0, True), (1, True), (2, False)]
    for _, _, same, training in checks:
        assert same, "the search changed the module state (code bank, EMA buffers or weights)"
        assert training


def test_search_reads_training_data_only(fitted: dict) -> None:
    dm = fitted["dm"]
    asked = {c[0] for c in dm.calls}
    assert "training_windows" in asked
    assert not asked & {"val_dataloader", "test_dataloader"}
    assert {c[1] for c in dm.calls if c[0] == "dataset"} == {"train"}
    # every pool input is a slice of a training trajectory; 5 per search are training windows
    ds = dm.dataset("train")
    train_samples = np.unique(ds.starts[:, 0])
    data = torch.from_numpy(ds.data)
    window_x = torch.stack([ds[i].x for i in range(len(ds))])
    n_windows = 0
    for x in dm.pool.samples().x:
        hits = [
            (s, t0)
            for s in train_samples
            for t0 in range(data.shape[1] - T_IN + 1)
            if torch.equal(data[s, t0 : t0 + T_IN], x)
        ]
        assert hits, "a pool input is not a slice of a training trajectory"
        n_windows += bool((window_x == x).flatten(1).all(1).any())
    assert n_windows == 10


def test_augment_metrics_logged(fitted: dict) -> None:
    cb = fitted["cb"]
    path = next(fitted["tmp"].glob("csv/**/metrics.csv"))
    rows = [r for r in csv.DictReader(path.open()) if r.get("augment/num_added")]
    assert [float(r["augment/pool_size"]) for r in rows] == [8.0, 16.0]
    for row, rec in zip(rows, cb.history):
        assert float(row["augment/num_added"]) == rec.added
        assert float(row["augment/search_seconds"]) == pytest.approx(rec.search_seconds, rel=1e-5)
        ratio = rec.search_seconds / rec.train_seconds
        assert float(row["augment/search_to_train"]) == pytest.approx(ratio, rel=1e-5)
        assert np.isfinite(float(row["augment/score_gain"]))


def test_pool_written_to_netcdf(fitted: dict) -> None:
    dm = fitted["dm"]
    ds = xr.open_dataset(fitted["tmp"] / "pool.nc")
    np.testing.assert_array_equal(
        ds["vorticity_input"].values, dm.pool.samples().x[:, :, 0].numpy()
    )
    np.testing.assert_array_equal(
        ds["vorticity_pseudo_target"].values, dm.pool.samples().y[:, :, 0].numpy()
    )
    np.testing.assert_array_equal(ds["score"].values, dm.pool.samples().score.numpy())
    assert ds["vorticity_pseudo_target"].dims == ("pool", "lead_time", "y", "x")
    ds.close()


# -- the filter and the ensemble, by hand ----------------------------------------------------------


def test_single_step_search_is_the_top_k_filter_by_hand() -> None:
    module = make_module(rollout_steps=1, candidate_k=4).eval()
    module.set_normalization(np.array([0.5]), np.array([2.0]))
    g = torch.Generator().manual_seed(3)
    x = torch.randn(7, T_IN, 1, 16, 16, generator=g)
    y = torch.randn(7, T_OUT, 1, 16, 16, generator=g)
    cb = BeamSearchAugmentation(
        NegMSEScorer(), SearchConfig(beam_width=4, top_k=2), search_batch_size=3
    )
    with torch.no_grad():
        out = cb.search(module, x, y, cb.scorer)
        cands = module.denormalize(module.model.candidates(module.normalize(x), 4))
    mse = (cands - y[:, None]).square().flatten(2).mean(2)  # (B, K)
    best = torch.sort(-mse, dim=1, descending=True, stable=True).indices[:, :2]
    ens = cands[torch.arange(7)[:, None], best].mean(1)
    ens_score = -(ens - y).square().flatten(1).mean(1)
    plain_score = -mse[:, 0]
    torch.testing.assert_close(out.pseudo, ens, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.ensemble_score, ens_score, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.plain_score, plain_score, rtol=1e-5, atol=1e-6)
    assert torch.equal(out.accepted, ens_score > plain_score)
    strict = BeamSearchAugmentation(NegMSEScorer(), SearchConfig(beam_width=4, margin=1e9))
    off = BeamSearchAugmentation(NegMSEScorer(), SearchConfig(beam_width=4, only_improving=False))
    with torch.no_grad():
        assert not strict.search(module, x, y, strict.scorer).accepted.any()
        assert off.search(module, x, y, off.scorer).accepted.all()


def test_future_free_starts() -> None:
    starts = np.array([[0, 0], [0, 2], [0, 4], [3, 0], [3, 1]])
    got = future_free_starts(starts, target_steps=2)
    np.testing.assert_array_equal(got, [[0, 5], [0, 6], [3, 2], [3, 3]])
    # inputs of 2 frames end within the last window (4 frames) of their sample
    for s, t0 in got:
        t_last = starts[starts[:, 0] == s, 1].max()
        assert t0 + 2 - 1 <= t_last + 4 - 1


def test_window_inputs_read_any_start_and_fill_missing_values() -> None:
    data = np.arange(2 * 9 * 2 * 1 * 1, dtype=np.float32).reshape(2, 9, 2, 1, 1)
    data[1, 6, 1] = np.nan
    ds = WindowDataset(data, np.array([[1, 0]]), in_steps=2, target_steps=4)
    ds.fill = np.array([-1.0, -2.0], np.float32)
    x = ds.inputs(np.array([[1, 4], [1, 5], [0, 7]]))
    expected = np.stack([data[1, 4:6], data[1, 5:7], data[0, 7:9]])
    expected[np.isnan(expected)] = -2.0  # channel 1's fill value
    assert x.dtype == np.float32
    np.testing.assert_array_equal(x, expected)


def test_unlabelled_inputs_come_after_the_last_training_windows(ns_file: Path) -> None:
    dm = SpyDataModule(str(ns_file))
    dm.setup("fit")
    train = dm.dataset("train")
    data = dm.dataset("train").data  # physical (S, T, C, H, W), in memory
    want = future_free_starts(train.starts, dm.target_steps)
    # 9 frames, windows of 2 + 2x2 = 6 frames: starts 0..3 per sample, future-free t0 = 4..7
    assert sorted(set(want[:, 1].tolist())) == [4, 5, 6, 7]
    assert set(want[:, 0]) == set(train.starts[:, 0]) and len(want) == 4 * len(set(want[:, 0]))
    cb = BeamSearchAugmentation(SpectrumScorer(), inputs=SearchInputs(unlabelled=100))
    dm.recording = True
    free = cb.unlabelled_inputs(dm, epoch=0)
    x = free.x
    assert free.id.tolist() == list(range(len(want)))  # ids: positions in the full list
    assert {c[1] for c in dm.calls if c[0] == "dataset"} == {"train"}  # never val or test
    expected = np.stack([data[s, t0 : t0 + T_IN] for s, t0 in want])
    np.testing.assert_array_equal(x.numpy(), expected)
    # a fresh random subset each epoch, reproducible
    two = BeamSearchAugmentation(SpectrumScorer(), inputs=SearchInputs(unlabelled=2), seed=5)
    a, b = two.unlabelled_inputs(dm, epoch=3), two.unlabelled_inputs(dm, epoch=3)
    assert a.x.shape == (2, T_IN, 1, 16, 16) and torch.equal(a.x, b.x)
    np.testing.assert_array_equal(a.x.numpy(), expected[a.id.numpy()])
    a, b = a.x, b.x
    epochs = [two.unlabelled_inputs(dm, epoch=e).x for e in range(6)]
    assert any(not torch.equal(epochs[0], e) for e in epochs[1:])


# -- checks before work -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("module_kwargs", "trainer_kwargs", "cb_kwargs", "match"),
    [
        ({}, dict(reload_dataloaders_every_n_epochs=0), {}, "reload_dataloaders_every_n_epochs"),
        ({}, dict(reload_dataloaders_every_n_epochs=2), {}, "reload_dataloaders_every_n_epochs"),
        ({}, {}, dict(top_k=7), "top_k=7 exceeds"),
        ({}, {}, dict(rollout_steps=1), "search.rollout_steps=1 but pseudo-targets must span"),
        (dict(candidate_k=1), {}, {}, "candidate_k >= 2"),
    ],
)  # fmt: skip
def test_fails_before_training(
    ns_file: Path, module_kwargs: dict, trainer_kwargs: dict, cb_kwargs: dict, match: str
) -> None:
    module = make_module(**module_kwargs)
    cb = BeamSearchAugmentation(NegMSEScorer(), SearchConfig(beam_width=2, **cb_kwargs))
    trainer = make_trainer([cb], 2, **trainer_kwargs)
    with pytest.raises(ValueError, match=match):
        trainer.fit(module, SpyDataModule(str(ns_file)))
    assert trainer.global_step == 0


class NoPoolData(pl.LightningDataModule):
    """Windows but no augmented pool: not a beamvq.protocols.ForecastData."""

    normalization = None
    batch_size = 4

    def training_windows(self, max_windows: int | None = None, seed: int = 0) -> None: ...


def test_setup_names_what_the_datamodule_and_the_module_lack() -> None:
    cb = BeamSearchAugmentation(NegMSEScorer())
    trainer = make_trainer([cb], 1)
    trainer.datamodule = NoPoolData()  # as Trainer.fit attaches it
    with pytest.raises(TypeError, match=r"ForecastData; NoPoolData lacks \['info', 'pool', "):
        cb.setup(trainer, make_module(), "fit")
    trainer.datamodule = None
    with pytest.raises(TypeError, match="needs a datamodule"):
        cb.setup(trainer, make_module(), "fit")
    trainer.datamodule = SpyDataModule(str(ROOT / "missing.nc"))
    with pytest.raises(TypeError, match=r"SearchableModel; Linear lacks \['candidate_k', 'code"):
        cb.setup(trainer, torch.nn.Linear(2, 2), "fit")  # type: ignore[arg-type]


def test_unlabelled_windows_need_a_reference_free_scorer() -> None:
    with pytest.raises(ValueError, match="reference-free scorer"):
        BeamSearchAugmentation(NegMSEScorer(), inputs=SearchInputs(unlabelled=4))


# -- resume ---------------------------------------------------------------------------------------


def test_resume_restores_the_pool_exactly(ns_file: Path, tmp_path: Path) -> None:
    ckpt = ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", save_top_k=-1)
    dm_a = SpyDataModule(str(ns_file))
    cb_a = BeamSearchAugmentation(NegMSEScorer(), SearchConfig(beam_width=2, only_improving=False),
                                  start_epoch=0, inputs=SearchInputs(windows=4))  # fmt: skip
    make_trainer([cb_a, ckpt], 2, enable_checkpointing=True).fit(make_module(), dm_a)
    assert [r.epoch for r in cb_a.history] == [0] and dm_a.pool.size == 4
    saved = torch.load(tmp_path / "epoch=0.ckpt", weights_only=False)
    state = saved[type(dm_a).__qualname__]
    assert torch.equal(state["pool_x"], dm_a.pool.samples().x)

    dm_b = SpyDataModule(str(ns_file))
    starts = EpochStart()
    cb_b = BeamSearchAugmentation(
        NegMSEScorer(), SearchConfig(beam_width=2), start_epoch=0, inputs=SearchInputs(windows=4)
    )
    make_trainer([cb_b, starts], 2).fit(
        make_module(), dm_b, ckpt_path=str(tmp_path / "epoch=0.ckpt"), weights_only=False
    )
    assert [s[0] for s in starts.seen] == [1]  # resumed at epoch 1
    assert starts.seen[0][1] == len(dm_b.dataset("train")) + 4  # and trained on the pool
    restored = starts.pools[0]
    expected = dm_a.state_dict()
    assert restored.keys() == expected.keys()
    for key, value in expected.items():
        if torch.is_tensor(value):
            assert torch.equal(restored[key], value), key
        else:
            assert restored[key] == value, key


# -- the configs, from the CLI ------------------------------------------------------------------


def shrink_config(name: str, tmp: Path) -> Path:
    """``configs/<name>`` at test size, every output under ``tmp``."""
    cfg = yaml.safe_load((ROOT / "configs" / name).read_text())
    tr = cfg["trainer"]
    tr.update(max_epochs=2, limit_train_batches=1, limit_val_batches=1, limit_test_batches=1,
              logger=False, enable_progress_bar=False, enable_model_summary=False,
              default_root_dir=str(tmp / "run"))  # fmt: skip
    kept = []
    for cb in tr["callbacks"]:
        args = cb.setdefault("init_args", {})
        # plots and reports are tested elsewhere; no progress bar with enable_progress_bar=False
        if cb["class_path"].rsplit(".", 1)[-1] in (
            "ForecastImageLogger",
            "LeadTimeReport",
            "CodebookUsageReport",
            "AugmentationReport",
            "WandbArtifacts",
            "RichProgressBar",
        ):
            continue
        # checkpoints go to <default_root_dir>/checkpoints (the configs name no dirpath)
        if "dirpath" in args:
            args["dirpath"] = str(tmp / "ckpt")
        if "output" in args:
            args["output"] = str(tmp / "pred.nc")
        if cb["class_path"].endswith("BeamSearchAugmentation"):
            args.update(start_epoch=0, every_n_epochs=1, fit_windows=8)
            inputs = args.setdefault("inputs", {})
            inputs["windows"] = 2
            args.setdefault("search", {})["beam_width"] = 2
            if args.get("pool_output"):
                args["pool_output"] = str(tmp / "pool.nc")
            if inputs.get("unlabelled"):
                inputs["unlabelled"] = 2
        kept.append(cb)
    tr["callbacks"] = kept
    data = cfg["data"]["init_args"]
    steps = data["windows"]
    window = steps["in_steps"] + steps["out_steps"] * steps["rollout_steps"]
    data.update(path=str(tmp / "data.nc"), loader={"batch_size": 4})
    gen = data["generator"]["init_args"]
    gen.update(n_trajectories=6, n_frames=window + 1)
    for key in ("resolution", "height", "width"):
        if key in gen:
            gen[key] = 16
    cfg["model"]["bottleneck"]["init_args"]["codebook_size"] = 32
    cfg["model"]["backbone"]["init_args"].update(hid_s=8, hid_t=16, n_s=2, n_t=1)
    path = tmp / name.replace("/", "_")
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("name", ["quickstart.yaml", "beamvq/ns.yaml", "beamvq/storm.yaml"])
def test_configs_run_beamvq_from_the_cli(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.chdir(tmp_path)
    cfg = shrink_config(name, tmp_path)
    cli = main(["fit", "--config", str(cfg)])
    (cb,) = [c for c in cli.trainer.callbacks if isinstance(c, BeamSearchAugmentation)]
    unlabelled = cb.inputs.unlabelled
    assert [r.epoch for r in cb.history] == [0]
    assert cb.history[0].searched == 2 + unlabelled
    assert cli.datamodule.pool.size == cb.history[0].added == cb.history[0].accepted
    if name == "beamvq/ns.yaml":
        # the beam-searched test ensemble from the checkpoint, through the CLI
        test = main(["test", "--config", str(cfg), "--ckpt_path", "last"])
        assert "test/crps" in test.trainer.callback_metrics


@pytest.mark.parametrize("name", ["quickstart.yaml", "beamvq/ns.yaml", "beamvq/storm.yaml"])
def test_configs_use_the_continuous_bottleneck_and_the_paper_fragment_restores_the_papers(
    name: str, capsys: pytest.CaptureFixture
) -> None:
    def bottleneck(*extra: str) -> dict:
        with pytest.raises(SystemExit):
            main(["fit", "--config", str(ROOT / "configs" / name), *extra, "--print_config"])
        return yaml.safe_load(capsys.readouterr().out)["model"]["bottleneck"]["init_args"]

    ours = bottleneck()
    assert (ours["forecast_path"], ours["commitment_weight"]) == ("continuous", 0.02)
    paper = bottleneck("--config", str(ROOT / "configs/beamvq/paper_bottleneck.yaml"))
    assert (paper["forecast_path"], paper["commitment_weight"]) == ("quantized", 0.25)
    assert paper["codebook_size"] == ours["codebook_size"] == 512  # the rest is kept
    assert paper["decay"] == ours["decay"] == 0.99


def test_inputs_per_search_call_default_to_the_device() -> None:
    cb = BeamSearchAugmentation(NegMSEScorer())
    assert cb.inputs_per_call(torch.device("cpu")) == 4  # measured fastest on one CPU thread
    assert cb.inputs_per_call(torch.device("cuda")) == 32
    assert BeamSearchAugmentation(NegMSEScorer(), search_batch_size=7).inputs_per_call("cpu") == 7
    with pytest.raises(ValueError, match="search_batch_size must be >= 1"):
        BeamSearchAugmentation(NegMSEScorer(), search_batch_size=0)
