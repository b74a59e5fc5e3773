"""Leftovers cleaned, nothing accepted silently, outputs checked early (issue 15, items 6-8).

- 6: a killed cache conversion's temporary folder, a killed write's ``.<name>.*.tmp`` and the
  best-epoch files a killed fit saved after its last ``last.ckpt`` are removed by the next run,
  in one log line, and nothing else is;
- 7: a constant variable is named (and normalized by 1), undeclared fill values such as 1e30 are
  refused with the variable and where, a split a run needs without windows is refused (a fit
  without validation warned about), a NaN validation loss stops like a training one;
- 8: output folders that cannot be created, written or are full are refused before any work,
  and a failing write names its file.

The tests of the last section go through the wiring in ``beamvq/module.py``, ``beamvq/cli.py``,
``datamodules/netcdf.py`` and ``datamodules/prepared.py`` (one call each).
"""

from __future__ import annotations

import errno
import functools
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, NamedTuple

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import xarray as xr
import yaml
from pytorch_lightning.callbacks import ModelCheckpoint

from beamvq.backbones import ResNet
from beamvq.bottleneck import VQBottleneck
from beamvq.callbacks.last_checkpoint import LastCheckpoint, top_k_file_pattern
from beamvq.checkpoint_files import Refusal
from beamvq.checkpoint_io import AtomicCheckpointIO
from beamvq.datamodules.cache import ensure_cache
from beamvq.datamodules.check import EmptySplit, check_stage_windows
from beamvq.datamodules.config import LoaderConfig, SplitConfig, WindowConfig
from beamvq.datamodules.io import owner_tag, remove_stale_temporaries, write_netcdf
from beamvq.datamodules.netcdf import NetCDFDataModule
from beamvq.datamodules.reading import training_moments
from beamvq.datamodules.synthetic import write_navier_stokes
from beamvq.faults import FaultConfig
from beamvq.module import ForecastModule
from beamvq.optim import LRSchedule
from beamvq.output_checks import (
    OutputLocation,
    OutputNotWritable,
    check_output_locations,
    trainer_output_locations,
)

ROOT = Path(__file__).resolve().parents[1]
T_IN, T_OUT = 2, 2


@pytest.fixture(scope="module")
def ns_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ns") / "ns.nc"
    write_navier_stokes(path, n_trajectories=6, resolution=16, n_frames=9, seed=1)
    return path


def make_dm(path: Path | str, fractions: tuple = (0.5, 0.25, 0.25)) -> NetCDFDataModule:
    return NetCDFDataModule(
        path=str(path), variables=["vorticity"], windows=WindowConfig(T_IN, T_OUT),
        loader=LoaderConfig(batch_size=4), splits=SplitConfig(fractions=fractions),
    )  # fmt: skip


def make_module(**kwargs: Any) -> ForecastModule:
    torch.manual_seed(0)
    bottleneck = functools.partial(VQBottleneck, codebook_size=16, kmeans_init=False)
    args: dict = dict(candidate_k=3, lr_schedule=LRSchedule(scheduler="none"), **kwargs)
    return ForecastModule(ResNet(T_IN, T_OUT, 1, 1, width=8, n_blocks=1), bottleneck, **args)


def run_killed(script: str) -> None:
    """Run ``script`` in a fresh Python that SIGKILLs itself half-way (a killed job)."""
    code = "import os, signal\nfrom pathlib import Path\n" + textwrap.dedent(script)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr


def dead_owner() -> str:
    """The ``<host>-<pid>`` tag of a process of this host that has ended."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return owner_tag().rsplit("-", 1)[0] + f"-{proc.pid}"


def age(path: Path, seconds: float) -> None:
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        t = time.time() - seconds
        os.utime(p, (t, t))


# -- 6: leftovers ---------------------------------------------------------------------------------
class _Stats(NamedTuple):
    count: np.ndarray


def test_a_killed_cache_conversion_is_removed_by_the_next_run(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root, name, shape = tmp_path / "cache", "ns-0123456789abcdef", (1, 8, 1, 64, 64)
    run_killed(f"""
        import numpy as np
        from beamvq.datamodules.cache import ensure_cache
        def reader(out):
            out[:] = 1.0  # half a conversion on disk, then the kill
            out.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        ensure_cache(Path({str(root)!r}), {name!r}, {shape}, reader)
    """)
    (killed,) = root.iterdir()
    assert killed.name.startswith(f".{name}.") and killed.name.endswith(".tmp")
    # an earlier beamvq's leftover (no writer in its name): removed once untouched for an hour
    old = root / ".era5-fedcba9876543210.abcd_123.tmp"
    old.mkdir()
    age(old, 7200)
    recent = root / ".era5-fedcba9876543210.zzzz_123.tmp"  # maybe another version converting
    live = (
        root / f".era5-fedcba9876543210.{owner_tag().rsplit('-', 1)[0]}-{os.getppid()}.a1b2c3d4.tmp"
    )
    mine = root / ".my-own-folder.tmp"
    for keep in (recent, live, mine):
        keep.mkdir()

    def reader(out: np.ndarray) -> _Stats:
        out[:] = 2.0
        return _Stats(np.ones(2))

    with caplog.at_level(logging.INFO, logger="beamvq.datamodules"):
        entry = ensure_cache(root, name, shape, reader)
    assert np.load(entry.data_file, mmap_mode="r")[0, 0, 0, 0, 0] == 2.0
    assert not killed.exists() and not old.exists()
    assert recent.is_dir() and live.is_dir() and mine.is_dir()
    lines = [r.message for r in caplog.records if "removed" in r.message]
    assert len(lines) == 1, lines
    assert re.search(
        r"removed 2 temporaries \(1[23]\d\.\d KiB\) left by an interrupted cache "
        r"conversion",
        lines[0],
    ), lines[0]
    assert str(killed) in lines[0] and str(old) in lines[0]


def test_a_killed_write_leaves_no_temporary_for_good(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    target = tmp_path / "predictions.nc"
    run_killed(f"""
        import numpy as np, xarray as xr
        from beamvq.datamodules.io import write_netcdf
        def killed(self, path, **kwargs):
            Path(path).write_bytes(bytes(8192))
            os.kill(os.getpid(), signal.SIGKILL)
        xr.Dataset.to_netcdf = killed
        write_netcdf(xr.Dataset({{"v": ("x", np.zeros(3))}}), {str(target)!r})
    """)
    (killed,) = tmp_path.glob(".predictions.nc.*.tmp")
    live = tmp_path / f".predictions.nc.{owner_tag().rsplit('-', 1)[0]}-{os.getppid()}.abcdefgh.tmp"
    other = tmp_path / ".predictions.nc.backup.tmp"  # not the writer's naming
    dead = tmp_path / f".predictions.nc.{dead_owner()}.12345678.tmp"
    for path in (live, other, dead):
        path.write_bytes(b"x")
    with caplog.at_level(logging.INFO, logger="beamvq.datamodules"):
        removed = remove_stale_temporaries(target)
    assert sorted(removed) == sorted([killed, dead])
    assert live.exists() and other.exists()
    (line,) = [r.message for r in caplog.records if "removed" in r.message]
    assert f"left by an interrupted write of {target}" in line and str(killed) in line
    # the next write of the target removes them too
    dead.write_bytes(b"x")
    write_netcdf(xr.Dataset({"v": ("x", np.zeros(3))}), target)
    assert not dead.exists() and live.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["predictions.nc", live.name, other.name]
    )


def _trainer(folder: Path, epochs: int) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu", max_epochs=epochs, logger=False, enable_progress_bar=False,
        enable_model_summary=False, limit_train_batches=2, limit_val_batches=1,
        num_sanity_val_steps=0, default_root_dir=folder,
        callbacks=[ModelCheckpoint(dirpath=folder / "ck", monitor="val/loss", save_top_k=1),
                   LastCheckpoint()],
    )  # fmt: skip


def test_a_resumed_fit_removes_the_best_files_its_killed_run_left(
    tmp_path: Path, ns_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _trainer(tmp_path, 1).fit(make_module(), make_dm(ns_file))
    ck = tmp_path / "ck"
    assert sorted(p.name for p in ck.iterdir()) == ["epoch=0-step=2.ckpt", "last.ckpt"]
    last = ck / "last.ckpt"
    after = last.stat().st_mtime + 5
    # what a run killed in epoch 1 leaves: the epoch's best file (and a temporary of one), saved
    # after last.ckpt and unknown to the top-k bookkeeping last.ckpt holds
    stale = ck / "epoch=1-step=4.ckpt"
    stale_tmp = ck / ".epoch=1-step=4.ckpt.4242.0123abcd.tmp"
    earlier = ck / "epoch=0-step=1.ckpt"  # of an earlier fit into the folder: kept
    users = ck / "my-best.ckpt"  # a name the ModelCheckpoint does not make: kept
    shutil.copy(ck / "epoch=0-step=2.ckpt", stale)
    for path, mtime in ((stale, after), (stale_tmp, after), (earlier, after - 100), (users, after)):
        if not path.exists():
            path.write_bytes(b"x")
        os.utime(path, (mtime, mtime))
    trainer = _trainer(tmp_path, 2)
    with caplog.at_level(logging.INFO, logger="beamvq.callbacks"):
        # our own file; its hyper-parameters hold the bottleneck partial
        trainer.fit(make_module(), make_dm(ns_file), ckpt_path=str(last), weights_only=False)
    best = {Path(p).name for p in trainer.checkpoint_callback.best_k_models}
    assert len(best) == 1
    assert {p.name for p in ck.glob("epoch=*")} == best | {earlier.name}
    assert users.exists() and not stale_tmp.exists()
    (line,) = [r.message for r in caplog.records if "removed" in r.message]
    assert "removed 2 checkpoint file(s) that the interrupted run saved after" in line
    assert str(stale) in line and str(stale_tmp) in line


def test_top_k_names_follow_the_filename_template(tmp_path: Path) -> None:
    default = top_k_file_pattern(ModelCheckpoint(dirpath=tmp_path))
    assert default.match("epoch=3-step=120.ckpt") and default.match("epoch=3-step=120-v1.ckpt")
    assert not default.match("last.ckpt") and not default.match("epoch=3-step=120.ckpt.bak")
    named = top_k_file_pattern(
        ModelCheckpoint(dirpath=tmp_path, filename="{epoch:03d}-{val_mse:.4f}")
    )
    assert named.match("epoch=007-val_mse=0.1234.ckpt") and named.match(
        "epoch=007-val_mse=nan.ckpt"
    )
    # another callback's names in the same folder are not this one's
    assert not top_k_file_pattern(ModelCheckpoint(filename="{epoch}")).match("epoch=1-step=8.ckpt")
    plain = top_k_file_pattern(ModelCheckpoint(filename="best"))
    assert (
        plain.match("best.ckpt") and plain.match("best-v2.ckpt") and not plain.match("bestx.ckpt")
    )


# -- 7: nothing accepted silently ------------------------------------------------------------------
def grid_file(path: Path, fields: dict[str, np.ndarray]) -> str:
    """A NetCDF of ``(time, y, x)`` variables, 6-hourly from 2000-01-01."""
    n_t, n_y, n_x = next(iter(fields.values())).shape
    coords = {
        "time": np.arange(n_t) * np.timedelta64(6, "h") + np.datetime64("2000-01-01"),
        "y": np.arange(n_y) * 1.0,
        "x": np.arange(n_x) * 2.0,
    }
    ds = xr.Dataset({k: (("time", "y", "x"), v) for k, v in fields.items()}, coords=coords)
    return str(write_netcdf(ds, path))


def grid_dm(path: str, variables: list[str], **kwargs: Any) -> NetCDFDataModule:
    args: dict = dict(windows=WindowConfig(2, 2), splits=SplitConfig(fractions=(0.6, 0.2, 0.2)))
    return NetCDFDataModule(path=path, variables=variables, **(args | kwargs))


def test_a_constant_variable_is_named_and_normalized_by_one(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    shape = (20, 8, 8)
    fields = {
        "u": rng.normal(0, 3, shape).astype(np.float32),
        "zero": np.zeros(shape, np.float32),
        # float32 rounding "variation" of a constant pressure: normalizing by it amplifies noise
        "p": (1e5 + rng.uniform(0, 0.05, shape)).astype(np.float32),
    }
    dm = grid_dm(grid_file(tmp_path / "c.nc", fields), ["u", "zero", "p"])
    dm.setup()
    np.testing.assert_allclose(dm.normalization.std[1:], [1.0, 1.0])
    assert 2.5 < dm.normalization.std[0] < 3.5
    p = dm.prepared()
    with pytest.warns(UserWarning) as record:
        moments = training_moments(p.layout, p.stats, p.plan.frames["train"], "c.nc")
    messages = [str(w.message) for w in record]
    assert len(messages) == 2, messages
    assert messages[0].startswith(
        "c.nc: variable 'zero' is constant in the training split (0 everywhere, std 0): it is "
        "normalized by 1 instead of its std and forecast as a constant"
    )
    assert "variable 'p' is constant in the training split (values 100000 .. 100000" in messages[1]
    np.testing.assert_allclose(moments.std, dm.normalization.std)
    assert "warning: variable 'zero' is constant in the training split" in dm.check()


def test_fill_values_beyond_any_data_are_refused_naming_where(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    t = (280 + rng.normal(0, 10, (20, 8, 8))).astype(np.float32)
    t[5, 3, 4] = 1e30
    t[9, 0, 0] = -1e30
    path = grid_file(tmp_path / "fill.nc", {"t": t})
    with pytest.raises(ValueError) as err:
        grid_dm(path, ["t"]).setup()
    msg = str(err.value)
    assert msg.startswith(f"{path}: variable 't' holds values far outside its range: 1e+30 at ")
    assert "time 2000-01-02T06:00 (time index 5 of the file), y=3 x=8" in msg
    assert "2 frame(s) hold such values" in msg and "make them NaN" in msg
    # rare large values that are data (a storm in mostly-dry frames) pass
    rain = np.zeros((20, 8, 8), np.float32)
    rain[3, 2:4, 2:4] = 150.0
    rain[11, 5, 5] = 4000.0
    rain[12, 1:6, 1:7] = rng.uniform(0, 30, (5, 6))
    grid_dm(grid_file(tmp_path / "rain.nc", {"rain": rain}), ["rain"]).setup()


def test_a_split_a_run_needs_without_windows_is_refused(ns_file: Path) -> None:
    dm = make_dm(ns_file, fractions=(1, 0, 0))
    dm.setup()
    label, splits = str(ns_file), dm.splits
    with pytest.raises(EmptySplit) as err:
        check_stage_windows(dm.plan, splits, "predict", label)
    assert isinstance(err.value, Refusal)
    assert str(err.value) == (
        f"{label}: beamvq predict (data.splits.predict_split='test') needs windows of the test "
        "split, but it holds no frame (data.splits.fractions=[1.0, 0.0, 0.0]): it would write "
        "nothing. Give the test split data or set data.splits.predict_split."
    )
    with pytest.raises(EmptySplit, match="beamvq validate needs windows of the val split"):
        check_stage_windows(dm.plan, splits, "validate", label)
    warning = check_stage_windows(dm.plan, splits, "fit", label)
    assert warning is not None and "the val split holds no frame" in warning
    assert "fit trains without validation" in warning and "saves no checkpoint" in warning
    assert check_stage_windows(make_dm(ns_file).prepared().plan, splits, "fit", label) is None


class EvalPoison:
    """Forward hook: NaN output in eval mode only (a rollout that overflows in validation)."""

    def __init__(self, module: ForecastModule) -> None:
        self.module = module

    def __call__(self, layer: torch.nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        return output * math.nan if not self.module.training else output


def poison_first_conv(module: ForecastModule) -> str:
    name, layer = next(
        (n, m)
        for n, m in module.model.named_modules(prefix="model")
        if isinstance(m, torch.nn.Conv2d)
    )
    layer.register_forward_hook(EvalPoison(module))
    return name


def _eval_loss(module: ForecastModule, batch: Any) -> torch.Tensor:
    x, y = module.normalize(batch.x), module.normalize(batch.y)
    return module.compute_loss(x, y, batch.weight, False).total


def test_a_nan_validation_loss_is_located_and_stops(caplog: pytest.LogCaptureFixture) -> None:
    module = make_module()
    name = poison_first_conv(module)
    module.eval()
    batch = SimpleNamespace(
        x=torch.randn(2, T_IN, 1, 16, 16), y=torch.randn(2, T_OUT, 1, 16, 16), weight=torch.ones(2)
    )
    with torch.no_grad():
        loss = _eval_loss(module, batch)
        assert not module.guard.check_eval_loss(module, torch.tensor(1.0), batch, 0, "validation")
        with pytest.raises(FloatingPointError) as err:
            module.guard.check_eval_loss(module, loss, batch, 3, "validation")
    assert str(err.value).startswith(
        f"NaN/Inf validation loss at global step 0 (epoch 0, batch 3): layer {name} (Conv2d) is "
        "the first to output NaN/Inf. Stopping (model.faults.nan_policy: stop"
    )
    skipping = make_module(faults=FaultConfig(nan_policy="skip"))
    poison_first_conv(skipping)
    skipping.eval()
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="beamvq.faults"):
        loss = _eval_loss(skipping, batch)
        assert skipping.guard.check_eval_loss(skipping, loss, batch, 0, "validation")
        assert skipping.guard.check_eval_loss(skipping, loss, batch, 1, "validation")
    (line,) = [r.message for r in caplog.records]  # once per epoch
    assert "NaN/Inf validation loss" in line and "metrics are NaN" in line
    assert skipping.skipped_batches == 0  # no training batch was skipped


# -- 8: output locations ---------------------------------------------------------------------------
def test_output_folders_are_checked_before_any_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    setting = "trainer.default_root_dir"
    with pytest.raises(OutputNotWritable) as err:
        check_output_locations([OutputLocation(setting, blocker / "run", setting)])
    assert isinstance(err.value, Refusal)
    assert str(err.value).startswith(
        f"trainer.default_root_dir: cannot create the folder {blocker / 'run'} (Not a directory); "
        "change trainer.default_root_dir"
    )
    fine = tmp_path / "runs" / "x"
    check_output_locations([OutputLocation(setting, fine, setting)])
    assert fine.is_dir() and list(fine.iterdir()) == []  # the probe is gone

    real_write = Path.write_bytes

    def read_only(self: Path, data: bytes) -> int:
        if self.name.startswith(".beamvq-write-probe."):
            raise OSError(errno.EROFS, "Read-only file system")
        return real_write(self, data)

    monkeypatch.setattr(Path, "write_bytes", read_only)
    what = "the prediction file /data/out/p.nc"
    with pytest.raises(
        OutputNotWritable, match=rf"^{re.escape(f'{what}: cannot write in the folder {fine} ')}"
    ):
        check_output_locations([OutputLocation(what, fine, "the writer's output")])
    monkeypatch.setattr(Path, "write_bytes", real_write)

    usage = shutil.disk_usage(tmp_path)._replace(free=12 * 2**20)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage)
    with pytest.raises(OutputNotWritable) as err:
        check_output_locations([OutputLocation("the checkpoint folder", fine, "dirpath")])
    assert str(err.value) == (
        f"the checkpoint folder: only 12 MiB free on the filesystem of {fine}, below the 50 MiB "
        "a run needs for its outputs; free some space or change dirpath"
    )


def test_the_output_locations_of_each_stage(tmp_path: Path) -> None:
    trainer = pl.Trainer(
        accelerator="cpu", logger=pl.loggers.CSVLogger(tmp_path / "logs"), default_root_dir=tmp_path
    )
    fit = trainer_output_locations(trainer, "fit", [tmp_path / "ck"], [tmp_path / "p.nc"])
    assert [(loc.what, loc.folder) for loc in fit] == [
        ("trainer.default_root_dir", tmp_path),
        ("the logger's save_dir (CSVLogger)", tmp_path / "logs"),
        ("the checkpoint folder", tmp_path / "ck"),
    ]
    predict = trainer_output_locations(trainer, "predict", [tmp_path / "ck"], [tmp_path / "p.nc"])
    assert [loc.folder for loc in predict] == [tmp_path / "logs", tmp_path]
    assert predict[1].what == f"the prediction file {tmp_path / 'p.nc'}"


def test_a_failing_write_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full_disk(self: xr.Dataset, path: str, **kwargs: Any) -> None:
        Path(path).write_bytes(b"partial")
        raise RuntimeError("NetCDF: HDF error")

    monkeypatch.setattr(xr.Dataset, "to_netcdf", full_disk)
    target = tmp_path / "out" / "predictions.nc"
    with pytest.raises(
        OSError, match=rf"^cannot write {re.escape(str(target))}: NetCDF: HDF error \("
    ):
        write_netcdf(xr.Dataset({"v": ("x", np.zeros(3))}), target)
    assert list(target.parent.iterdir()) == []

    class FullDisk(AtomicCheckpointIO):
        def write(self, checkpoint: dict, f: Any) -> None:
            f.write(b"partial")
            raise RuntimeError("[enforce fail] PytorchStreamWriter failed writing file data/0")

    ckpt = tmp_path / "ck" / "last.ckpt"
    with pytest.raises(
        OSError, match=rf"^cannot write the checkpoint {re.escape(str(ckpt))}: .*Stream"
    ):
        FullDisk().save_checkpoint({"a": 1}, ckpt)
    assert list(ckpt.parent.iterdir()) == []


# -- through the wiring (module, CLI, datamodule) --------------------------------------------------
def test_a_nan_validation_loss_stops_the_fit(ns_file: Path) -> None:
    module = make_module()
    name = poison_first_conv(module)
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_train_batches=2,
        limit_val_batches=1, num_sanity_val_steps=0,
    )  # fmt: skip
    with pytest.raises(FloatingPointError) as err:
        trainer.fit(module, make_dm(ns_file))
    assert str(err.value).startswith(
        f"NaN/Inf validation loss at global step 2 (epoch 0, batch 0): layer {name} (Conv2d)"
    )


def test_the_datamodule_warns_and_refuses_before_any_work(tmp_path: Path, ns_file: Path) -> None:
    with pytest.raises(EmptySplit, match="needs windows of the test split, but it holds no frame"):
        make_dm(ns_file, fractions=(1, 0, 0)).setup("predict")
    with pytest.warns(UserWarning, match="fit trains without validation"):
        make_dm(ns_file, fractions=(1, 0, 0)).setup("fit")
    shape = (20, 8, 8)
    fields = {"u": np.random.default_rng(0).normal(size=shape), "zero": np.zeros(shape)}
    with pytest.warns(UserWarning, match="variable 'zero' is constant in the training split"):
        grid_dm(grid_file(tmp_path / "c.nc", fields), ["u", "zero"]).setup("fit")


def test_an_output_folder_that_cannot_be_made_is_refused_on_the_console(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from beamvq.command import console_main

    monkeypatch.chdir(tmp_path)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    text = (ROOT / "configs" / "quickstart.yaml").read_text()
    cfg = yaml.safe_load(text.replace("runs/quickstart", str(blocker / "run")))
    cfg["data"]["init_args"]["path"] = str(tmp_path / "never-generated.nc")
    keep = ("ModelCheckpoint", "LastCheckpoint")
    cfg["trainer"]["callbacks"] = [
        c for c in cfg["trainer"]["callbacks"] if c["class_path"].endswith(keep)
    ]
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    argv = ["beamvq", "fit", "--config", str(tmp_path / "c.yaml"), "--trainer.logger", "false"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_:
        console_main()
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("beamvq: error: ") and f"cannot create the folder {blocker}" in err
    assert not (tmp_path / "never-generated.nc").exists()  # before any work
