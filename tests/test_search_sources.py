"""Issue 17's inputs through the real CLI: a scarce labelled split, unlabelled trajectories,
pushforward targets, the pool's recorded sources, the pool's signal share and ``init_from``."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
import yaml

from beamvq.cli import main
from beamvq.datamodules.synthetic import write_navier_stokes
from beamvq.protocols import SOURCE_KINDS

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"


def callbacks_fragment(path: Path, target: str) -> Path:
    search = {
        "class_path": "beamvq.callbacks.beam_search.BeamSearchAugmentation",
        "init_args": {
            "start_epoch": 0,
            "target": target,
            "inputs": {"windows": None, "unlabelled": 4},
            "search": {"beam_width": 2, "top_k": 2, "only_improving": False},
            "scorer": {"class_path": "beamvq.metrics.NegMSEScorer"},
            "unlabelled_scorer": {
                "class_path": "beamvq.metrics.SpectrumScorer",
                "init_args": {"from_vorticity": True},
            },
            "pool_output": str(path.parent / f"pool_{target}.nc"),
        },
    }
    signal = {"class_path": "beamvq.callbacks.pool_signal.PoolSignalShare"}
    path.write_text(yaml.safe_dump({"trainer": {"callbacks": [search, signal]}}))
    return path


# 15 frames: a window is 5 + 5 frames and a pushforward sample needs the window 5 frames later
FRAMES = 15


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Navier-Stokes file both fits read (written once)."""
    path = tmp_path_factory.mktemp("data") / "ns.nc"
    return write_navier_stokes(path, n_trajectories=10, resolution=32, n_frames=FRAMES)


def fit(tmp_path: Path, data: Path, target: str, *extra: str):
    return main([
        "fit",
        "--config", str(QUICKSTART),
        "--config", str(callbacks_fragment(tmp_path / f"cb_{target}.yaml", target)),
        "--trainer.max_epochs", "2",
        "--trainer.limit_train_batches", "1.0",
        "--trainer.limit_val_batches", "1",
        "--trainer.num_sanity_val_steps", "0",
        "--trainer.logger", "false",
        "--trainer.enable_checkpointing", "false",
        "--trainer.default_root_dir", str(tmp_path / f"run_{target}"),
        "--data.init_args.path", str(data),
        "--data.init_args.generator.init_args.n_trajectories", "10",
        "--data.init_args.generator.init_args.resolution", "32",
        "--data.init_args.generator.init_args.n_frames", str(FRAMES),
        "--data.init_args.loader.batch_size", "2",
        "--data.init_args.splits.train_samples", "2",
        "--data.init_args.splits.unlabelled_samples", "2",
        "--model.bottleneck.init_args.codebook_size", "32",
        *extra,
    ])  # fmt: skip


@pytest.mark.parametrize("target", ["pseudo", "pushforward"])
def test_pool_records_new_inputs_and_trains(
    target: str, data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["beamvq"])
    torch.set_num_threads(1)
    cli = fit(tmp_path, data, target)
    dm = cli.datamodule
    train_samples = np.unique(dm.dataset("train").starts[:, 0])
    assert len(train_samples) == 2  # the scarce labelled split
    pool = xr.open_dataset(tmp_path / f"pool_{target}.nc")
    kinds = {SOURCE_KINDS[int(k)] for k in pool["source_kind"].values}
    assert "unlabelled" in kinds, kinds
    expected = "pushforward" if target == "pushforward" else "window"
    assert expected in kinds, kinds
    assert "validation" not in kinds
    share = float(cli.trainer.callback_metrics["augment/pool_signal_share"])
    assert 0.0 < share < 1.0, share
    pool.close()

    if target == "pseudo":
        return
    # a new fit starts from these weights (init_from): its first state equals the checkpoint
    ckpt = tmp_path / "end.ckpt"
    cli.trainer.save_checkpoint(ckpt)
    warm = fit(tmp_path, data, "pseudo", "--model.init_from", str(ckpt),
               "--trainer.max_epochs", "0")  # fmt: skip
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    now = warm.model.state_dict()
    for key, value in saved.items():
        if value.is_floating_point():
            assert torch.equal(now[key], value), key
    assert math.isfinite(float(warm.model.normalizer.std.sum()))


def test_the_authors_protocol_pools_only_validation_inputs_when_the_leak_is_named(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # configs/experiments/arms/authors_leak.yaml: no training windows, validation inputs labelled
    # by the plain forecast, no filter; the pool records every sample's source as "validation"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["beamvq"])
    torch.set_num_threads(1)
    frag = callbacks_fragment(tmp_path / "cb_authors.yaml", "pseudo")
    cfg = yaml.safe_load(frag.read_text())
    search = cfg["trainer"]["callbacks"][0]["init_args"]
    search["inputs"] = {"windows": 0, "validation": 4, "allow_validation_leak": True}
    search["search"] = {"beam_width": 1, "top_k": 1, "only_improving": False}
    frag.write_text(yaml.safe_dump(cfg))
    cli = main([
        "fit", "--config", str(QUICKSTART), "--config", str(frag),
        "--trainer.max_epochs", "2", "--trainer.limit_val_batches", "1",
        "--trainer.num_sanity_val_steps", "0", "--trainer.logger", "false",
        "--trainer.enable_checkpointing", "false",
        "--trainer.default_root_dir", str(tmp_path / "run_authors"),
        "--data.init_args.path", str(data),
        "--data.init_args.generator.init_args.n_trajectories", "10",
        "--data.init_args.generator.init_args.resolution", "32",
        "--data.init_args.generator.init_args.n_frames", str(FRAMES),
        "--data.init_args.loader.batch_size", "2", "--data.init_args.splits.train_samples", "2",
        "--model.bottleneck.init_args.codebook_size", "32",
    ])  # fmt: skip
    pool = cli.datamodule.pool.samples()
    kinds = {SOURCE_KINDS[int(k)] for k in pool.source_kind}
    assert kinds == {"validation"} and pool.x.shape[0] == 4
