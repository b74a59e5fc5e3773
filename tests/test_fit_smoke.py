"""``beamvq fit`` smoke over the ten backbone configs, through the real CLI entry point.

Each run composes ``configs/quickstart.yaml`` with ``configs/backbones/<name>.yaml`` exactly as
the README tells users to, and overrides only what a test must: a tiny generated Navier–Stokes
file (6 trajectories, 32x32, 12 frames) in ``tmp_path``, batch 2, ``fast_dev_run`` (one training
and one validation batch), no logger. The run's working directory is ``tmp_path``, so whatever
the quickstart's callbacks write to relative paths lands there, never in the repository; the
callbacks themselves are kept, so the smoke also covers them.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from beamvq.backbones import REGISTRY
from beamvq.cli import main
from datamodules.synthetic import write_navier_stokes

ROOT = Path(__file__).resolve().parents[1]
GRID = 32
DATA_ARGS = {"n_trajectories": 6, "resolution": GRID, "n_frames": 12}


@pytest.fixture(scope="module")
def ns_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny Navier–Stokes file shared by the ten runs (generated with ``DATA_ARGS``)."""
    return write_navier_stokes(tmp_path_factory.mktemp("data") / "ns32.nc", **DATA_ARGS)


def backbone_grid_args(name: str) -> list[str]:
    """Backbones built for one grid (``height``/``width`` in their YAML) get the test's grid."""
    config = yaml.safe_load((ROOT / "configs" / "backbones" / f"{name}.yaml").read_text())
    init_args = config["model"]["backbone"]["init_args"]
    if "height" not in init_args:
        return []
    return ["--model.backbone.init_args.height", str(GRID),
            "--model.backbone.init_args.width", str(GRID)]


@pytest.mark.parametrize("name", list(REGISTRY))
def test_fit_smoke(
    name: str, ns_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.chdir(tmp_path)
    data_args = [a for k, v in DATA_ARGS.items() for a in (f"--data.init_args.{k}", str(v))]
    cli = main([
        "fit",
        "--config", str(ROOT / "configs" / "quickstart.yaml"),
        "--config", str(ROOT / "configs" / "backbones" / f"{name}.yaml"),
        "--trainer.fast_dev_run", "1",
        "--trainer.logger", "false",
        "--trainer.default_root_dir", str(tmp_path / "run"),
        "--data.init_args.path", str(ns_file),
        "--data.init_args.batch_size", "2",
        *data_args,
        *backbone_grid_args(name),
    ])

    trainer = cli.trainer
    assert isinstance(cli.model.model.backbone, REGISTRY[name])
    assert trainer.state.finished, trainer.state.status
    assert trainer.global_step == 1
    assert cli.datamodule.grid == (GRID, GRID)
    metrics = trainer.callback_metrics
    for key in ("train/loss", "val/loss"):
        assert key in metrics, sorted(metrics)
        assert math.isfinite(float(metrics[key])), (key, float(metrics[key]))
