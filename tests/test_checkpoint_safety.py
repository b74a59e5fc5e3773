"""Checkpoints that hold what they promise and loads that refuse what they must (issue 15, items
1, 2 and 4), through the ``beamvq`` CLI on the quickstart config at test size.

- ``last.ckpt`` holds the end of every epoch (``beamvq.callbacks.last_checkpoint``), also after
  epochs whose validation loss got worse, and a second fit into the folder replaces it; a fit
  resumed from it ends bit-identical to an uninterrupted one; a user's plain
  ``ModelCheckpoint(save_last: true)`` still works, with a warning naming the fix.
- ``validate``/``test``/``predict`` without weights (no ``--ckpt_path``, or ``last`` with no
  checkpoint) are refused before any work, in one line on the console.
- Empty, truncated, garbage and pickled-code checkpoints are refused naming the file and what is
  wrong, never suggesting unsafe loading; ``--weights_only false`` is refused; a checkpoint's
  class paths never make beamvq import a module outside beamvq and the configuration's packages.

The test callbacks below are named by class path in the YAML (``test_checkpoint_safety.*``):
pytest puts ``tests/`` on ``sys.path``.
"""

from __future__ import annotations

import io
import random
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import yaml
from pytorch_lightning.callbacks import ModelCheckpoint

from beamvq.callbacks.last_checkpoint import LastCheckpoint, after_model_checkpoints
from beamvq.checkpointing import CheckpointRefused, check_ckpt_path
from beamvq.cli import main
from beamvq.command import console_main

ROOT = Path(__file__).resolve().parents[1]
GEN = "--data.init_args.generator.init_args."
TINY = [
    f"{GEN}n_trajectories", "6", f"{GEN}resolution", "16", f"{GEN}n_frames", "12",
    "--data.init_args.loader.batch_size", "4", "--trainer.limit_train_batches", "3",
    "--trainer.limit_val_batches", "2", "--trainer.limit_predict_batches", "1",
    "--model.backbone.init_args.hid_s", "8", "--model.backbone.init_args.hid_t", "16",
    "--model.backbone.init_args.n_s", "2", "--model.backbone.init_args.n_t", "1",
    "--model.bottleneck.init_args.codebook_size", "16", "--trainer.enable_progress_bar", "false",
    "--trainer.logger", "false",
]  # fmt: skip
KEEP = ("ModelCheckpoint", "LastCheckpoint", "BeamSearchAugmentation")


class WorseningValidation(pl.Callback):
    """Test-only: the validation targets move away from the data each epoch, so ``val/loss``
    gets worse after epoch 0 and ``ModelCheckpoint`` saves nothing after it."""

    def on_validation_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, *args: Any
    ) -> None:
        batch.y.add_(100.0 * trainer.current_epoch)


class Interrupted(Exception):
    """What ``Interrupt`` raises."""


class Interrupt(pl.Callback):
    """Test-only: stop the fit with an exception at batch 1 of ``epoch`` (a crash, a kill)."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if trainer.current_epoch == self.epoch and batch_idx == 1:
            raise Interrupted(f"interrupted at epoch {self.epoch}")


def config(
    tmp: Path, name: str, extra: list[dict] | tuple = (), keep: tuple[str, ...] = KEEP
) -> Path:
    """The quickstart with outputs in ``tmp/name``, data at ``tmp/ns.nc``, only the ``keep``
    callbacks (plus ``extra``), and a search that adds every candidate it scores."""
    text = (ROOT / "configs" / "quickstart.yaml").read_text()
    text = text.replace("runs/quickstart", str(tmp / name))
    text = text.replace("data/navier_stokes_64.nc", str(tmp / "ns.nc"))
    cfg = yaml.safe_load(text)
    callbacks = [c for c in cfg["trainer"]["callbacks"] if c["class_path"].endswith(keep)]
    for c in callbacks:
        if c["class_path"].endswith("BeamSearchAugmentation"):
            c["init_args"]["search"]["only_improving"] = False
    cfg["trainer"]["callbacks"] = callbacks + list(extra)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def fit(cfg: Path, epochs: int, *extra: str) -> Any:
    return main(["fit", "--config", str(cfg), *TINY, "--trainer.max_epochs", str(epochs), *extra])


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key, value in a.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, b[key]), key
        else:
            assert value == b[key], key


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["beamvq"])  # main(args) warns about pytest's own


# -- item 1: last.ckpt is the end of every epoch ----------------------------------------------------
def test_last_ckpt_holds_the_final_epoch_when_validation_worsens(tmp_path: Path) -> None:
    cfg = yaml.safe_load(config(tmp_path, "worse").read_text())
    # LastCheckpoint listed before the ModelCheckpoint: its place in the list does not matter
    cfg["trainer"]["callbacks"].sort(key=lambda c: not c["class_path"].endswith("LastCheckpoint"))
    cfg["trainer"]["callbacks"].append({"class_path": "test_checkpoint_safety.WorseningValidation"})
    path = tmp_path / "worse.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    cli = fit(path, 3)

    (mc,) = [c for c in cli.trainer.callbacks if isinstance(c, ModelCheckpoint)]
    assert Path(mc.best_model_path).name.startswith("epoch=0"), "val/loss did not get worse"
    folder = tmp_path / "worse" / "checkpoints"
    assert [p.name for p in folder.glob("last*.ckpt")] == ["last.ckpt"]
    last = torch.load(folder / "last.ckpt", weights_only=True)
    assert last["epoch"] == 2 and last["global_step"] == cli.trainer.global_step
    assert_same_tensors(last["state_dict"], cli.model.state_dict())
    # the pool the search grew (after epoch 1, a worse epoch) is in it
    assert cli.datamodule.pool.size > 0
    assert_same_tensors(last[type(cli.datamodule).__qualname__], cli.datamodule.state_dict())
    # and the ModelCheckpoint's bookkeeping of the last epoch (saved after it, not before)
    assert last["callbacks"][mc.state_key]["best_model_path"] == mc.best_model_path


def test_a_second_fit_into_the_same_folder_replaces_last_ckpt(tmp_path: Path) -> None:
    cfg = config(tmp_path, "again")
    fit(cfg, 1)
    cli = fit(cfg, 1, "--seed_everything", "1")
    folder = tmp_path / "again" / "checkpoints"
    assert [p.name for p in folder.glob("last*.ckpt")] == ["last.ckpt"]
    last = torch.load(folder / "last.ckpt", weights_only=True)
    assert_same_tensors(last["state_dict"], cli.model.state_dict())


def test_a_fit_resumed_from_last_ckpt_ends_as_an_uninterrupted_one(tmp_path: Path) -> None:
    straight = fit(config(tmp_path, "straight"), 3)
    assert straight.datamodule.pool.size > 0, "BeamVQ added nothing: the test is void"

    stop = {"class_path": "test_checkpoint_safety.Interrupt", "init_args": {"epoch": 2}}
    cfg = config(tmp_path, "resumed", extra=[stop])
    with pytest.raises(Interrupted):
        fit(cfg, 3)
    last = tmp_path / "resumed" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["epoch"] == 1
    resumed = fit(config(tmp_path, "resumed"), 3, "--ckpt_path", "last")

    assert resumed.trainer.ckpt_path == str(last)
    assert resumed.trainer.global_step == straight.trainer.global_step
    assert_same_tensors(resumed.model.state_dict(), straight.model.state_dict())
    assert_same_tensors(resumed.datamodule.state_dict(), straight.datamodule.state_dict())
    metrics = {k: float(v) for k, v in straight.trainer.callback_metrics.items() if "val/" in k}
    assert metrics == {
        k: float(v) for k, v in resumed.trainer.callback_metrics.items() if "val/" in k
    }


def test_a_plain_model_checkpoint_with_save_last_still_works(tmp_path: Path) -> None:
    folder = tmp_path / "plain" / "checkpoints"
    mc = {
        "class_path": "pytorch_lightning.callbacks.ModelCheckpoint",
        "init_args": {"dirpath": str(folder), "monitor": "val/loss", "save_last": True},
    }
    cfg = config(tmp_path, "plain", extra=[mc], keep=("BeamSearchAugmentation",))
    with pytest.warns(UserWarning, match="last_checkpoint.LastCheckpoint"):
        fit(cfg, 1)
    assert (folder / "last.ckpt").is_file()
    cli = main(["validate", "--config", str(cfg), *TINY, "--ckpt_path", "last"])
    assert cli.trainer.ckpt_path == str(folder / "last.ckpt")


def test_last_checkpoint_goes_after_every_model_checkpoint() -> None:
    last, mc, other = LastCheckpoint(), ModelCheckpoint(), pl.Callback()
    assert after_model_checkpoints([last, mc, other]) == [mc, other, last]


# -- item 2: no forecast from random weights ----------------------------------------------------------
@pytest.mark.parametrize("subcommand", ["validate", "test", "predict"])
def test_evaluating_without_a_checkpoint_is_refused_before_any_work(
    tmp_path: Path, subcommand: str
) -> None:
    cfg = config(tmp_path, "untrained")
    with pytest.raises(CheckpointRefused, match=f"beamvq {subcommand} needs trained weights"):
        main([subcommand, "--config", str(cfg), *TINY])
    assert not (tmp_path / "ns.nc").exists()  # the data were not even generated


def test_ckpt_path_last_without_a_checkpoint_is_refused(tmp_path: Path) -> None:
    cfg = config(tmp_path, "untrained")
    folder = tmp_path / "untrained" / "checkpoints"
    with pytest.raises(CheckpointRefused, match=rf"no checkpoint last\*\.ckpt in {folder}"):
        main(["predict", "--config", str(cfg), *TINY, "--ckpt_path", "last"])
    assert not (tmp_path / "ns.nc").exists()
    assert not (tmp_path / "untrained" / "predictions.nc").exists()


def test_the_console_prints_a_refusal_as_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    cfg = config(tmp_path, "untrained")
    monkeypatch.setattr(sys, "argv", ["beamvq", "predict", "--config", str(cfg)])
    with pytest.raises(SystemExit) as exit_info:
        console_main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "beamvq: error: beamvq predict needs trained weights" in err
    assert "Traceback" not in err


# -- item 4: checkpoint errors --------------------------------------------------------------------
def _truncated() -> bytes:
    buf = io.BytesIO()
    torch.save({"state_dict": {"w": torch.ones(64)}}, buf)
    return buf.getvalue()[: len(buf.getvalue()) // 2]


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", "the file is empty"),
        (random.Random(0).randbytes(2000), "not a readable PyTorch checkpoint"),
        (b"hello world\n" * 10, "not a readable PyTorch checkpoint"),
        (_truncated(), "not a readable PyTorch checkpoint"),
    ],
    ids=["empty", "garbage", "text", "truncated"],
)
def test_a_broken_checkpoint_is_named_with_what_is_wrong(
    tmp_path: Path, content: bytes, reason: str
) -> None:
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(content)
    cfg = config(tmp_path, "broken")
    with pytest.raises(CheckpointRefused) as err:
        main(["predict", "--config", str(cfg), *TINY, "--ckpt_path", str(bad)])
    message = str(err.value)
    assert str(bad) in message and reason in message
    assert "weights_only` set to `False`" not in message and "=False" not in message


class Payload:
    """Unpickling it creates ``marker``: the stand-in for code run by a crafted checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple:
        return (open, (self.marker, "w"))


def _crafted_last(tmp_path: Path, name: str) -> Path:
    marker = tmp_path / "payload-ran"
    folder = tmp_path / name / "checkpoints"
    folder.mkdir(parents=True)
    torch.save({"state_dict": {}, "payload": Payload(marker)}, folder / "last.ckpt")
    return marker


def test_a_pickled_payload_behind_ckpt_path_last_is_refused(tmp_path: Path) -> None:
    marker = _crafted_last(tmp_path, "crafted")
    cfg = config(tmp_path, "crafted")
    last = tmp_path / "crafted" / "checkpoints" / "last.ckpt"
    with pytest.raises(CheckpointRefused, match=rf"{last}: refused: .*\bopen\b") as err:
        main(["predict", "--config", str(cfg), *TINY, "--ckpt_path", "last"])
    assert "=False" not in str(err.value)
    assert not marker.exists()


@pytest.mark.parametrize("ckpt", ["last", "explicit"])
def test_weights_only_false_is_refused(tmp_path: Path, ckpt: str) -> None:
    marker = _crafted_last(tmp_path, "crafted")
    cfg = config(tmp_path, "crafted")
    path = "last" if ckpt == "last" else str(tmp_path / "crafted" / "checkpoints" / "last.ckpt")
    with pytest.raises(CheckpointRefused, match="--weights_only false: refused"):
        main(
            ["predict", "--config", str(cfg), *TINY, "--weights_only", "false", "--ckpt_path", path]
        )
    assert not marker.exists()


def test_a_checkpoints_class_path_imports_nothing_outside_beamvq(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = f"beamvq_test_side_effect_{uuid.uuid4().hex[:8]}"
    marker = tmp_path / "imported"
    (tmp_path / f"{module}.py").write_text(f"open({str(marker)!r}, 'w').close()\nclass B: ...\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    crafted = tmp_path / "crafted.ckpt"  # passes the safe loader: only plain values
    torch.save(
        {"state_dict": {}, "hyper_parameters": {"backbone": {"class_path": f"{module}.B"}}}, crafted
    )
    configured = {
        "backbone": {"class_path": "beamvq.backbones.SimVPv2"},
        "bottleneck": {"class_path": "beamvq.bottleneck.VQBottleneck"},
    }
    with pytest.raises(
        CheckpointRefused, match=rf"model.backbone: checkpoint {module}.B \(not imported"
    ):
        check_ckpt_path(str(crafted), configured)
    assert not marker.exists() and module not in sys.modules
    # the class path the configuration names: no refusal
    check_ckpt_path(str(crafted), {"backbone": {"class_path": f"{module}.B"}})
