"""``beamvq fit`` smoke over the ten backbone configs, through the real CLI entry point.

Each run composes ``configs/quickstart.yaml`` with ``configs/backbones/<name>.yaml`` exactly as
the README tells users to, and overrides only what a test must: a tiny generated Navier–Stokes
file (6 trajectories, 32x32, 12 frames) in ``tmp_path``, batch 2, one training batch per epoch,
one validation batch at the last epoch only, no logger. The quickstart's callbacks are kept,
BeamVQ's ``BeamSearchAugmentation`` included: the fit lasts ``start_epoch + 2`` epochs, so the
search runs exactly once (never at the last epoch) on every backbone. The run's working directory
is ``tmp_path``, so whatever the callbacks write to relative paths lands there, never in the
repository.

The report callbacks' matplotlib rendering (``Figure.savefig`` of each PNG and the rollout GIF's
``Animation.save``) took about 20 of the 25-35 s of each fit, and it is the same drawing of the
same ``(T, H, W)`` arrays whatever the backbone. It is done for real for the quickstart's own
backbone (the files must be there and be real images; ``test_reports.py`` checks what they show);
for the other backbones every callback still runs, its model calls and the figure's construction
included, and only that last write is replaced by a stand-in image (the ``figures_not_rendered``
fixture of ``conftest.py``) that records the file it was handed.

Runs use one torch thread: on shared cores, two OpenMP threads wait on each other (a small matmul
measured 65x slower with 2 threads than with 1 under load), which made this file several times
slower.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from beamvq.backbones import REGISTRY
from beamvq.callbacks.beam_search import BeamSearchAugmentation
from beamvq.cli import main
from beamvq.datamodules.synthetic import write_navier_stokes

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
GRID = 32
DATA_ARGS = {"n_trajectories": 6, "resolution": GRID, "n_frames": 12}


@pytest.fixture(scope="module")
def ns_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny Navier–Stokes file shared by the ten runs (generated with ``DATA_ARGS``)."""
    return write_navier_stokes(tmp_path_factory.mktemp("data") / "ns32.nc", **DATA_ARGS)


@pytest.fixture
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def quickstart_backbone() -> str:
    """The registry name of the quickstart's own backbone."""
    class_path = yaml.safe_load(QUICKSTART.read_text())["model"]["backbone"]["class_path"]
    (name,) = [n for n, cls in REGISTRY.items() if cls.__name__ == class_path.rsplit(".", 1)[1]]
    return name


@pytest.fixture
def rendered(name: str, request: pytest.FixtureRequest) -> list[Path] | None:
    """``None`` for the quickstart's backbone (its figures are rendered); for the others the
    paths handed to the skipped rendering (``figures_not_rendered``, see the module docstring)."""
    if name == quickstart_backbone():
        return None
    return request.getfixturevalue("figures_not_rendered")


def search_start_epoch() -> int:
    """``start_epoch`` of the quickstart's ``BeamSearchAugmentation`` (its default if unset)."""
    config = yaml.safe_load(QUICKSTART.read_text())
    for callback in config["trainer"].get("callbacks") or []:
        if callback["class_path"].endswith(BeamSearchAugmentation.__name__):
            return int((callback.get("init_args") or {}).get("start_epoch", 1))
    raise AssertionError(f"{QUICKSTART} has no BeamSearchAugmentation callback")


def backbone_grid_args(name: str) -> list[str]:
    """Backbones built for one grid (``Backbone.grid_args``) get the test's grid."""
    grid = REGISTRY[name].grid_kwargs(GRID, GRID)
    return [
        a for key, value in grid.items() for a in (f"--model.backbone.init_args.{key}", str(value))
    ]


@pytest.mark.parametrize("name", list(REGISTRY))
def test_fit_smoke(
    name: str,
    ns_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    one_thread: None,
    rendered: list[Path] | None,
) -> None:
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["beamvq"])  # pytest's own arguments are not the CLI's
    search_epoch = search_start_epoch()
    data_args = [
        a
        for k, v in DATA_ARGS.items()
        for a in (f"--data.init_args.generator.init_args.{k}", str(v))
    ]
    cli = main([
        "fit",
        "--config", str(QUICKSTART),
        "--config", str(ROOT / "configs" / "backbones" / f"{name}.yaml"),
        "--trainer.max_epochs", str(search_epoch + 2),
        # validation (and the figures drawn after it) at the last epoch only
        "--trainer.check_val_every_n_epoch", str(search_epoch + 2),
        "--trainer.limit_train_batches", "1",
        "--trainer.limit_val_batches", "1",
        "--trainer.num_sanity_val_steps", "0",
        "--trainer.logger", "false",
        "--trainer.default_root_dir", str(tmp_path / "run"),
        "--data.init_args.path", str(ns_file),
        "--data.init_args.loader.batch_size", "2",
        *data_args,
        *backbone_grid_args(name),
    ])  # fmt: skip

    trainer = cli.trainer
    assert isinstance(cli.model.model.backbone, REGISTRY[name])
    assert cli.datamodule.grid == (GRID, GRID)
    assert trainer.state.finished, trainer.state.status
    assert trainer.global_step == search_epoch + 2
    metrics = trainer.callback_metrics
    for key in ("train/loss", "val/loss"):
        assert key in metrics, sorted(metrics)
        assert math.isfinite(float(metrics[key])), (key, float(metrics[key]))

    (search,) = [cb for cb in trainer.callbacks if isinstance(cb, BeamSearchAugmentation)]
    (record,) = search.history
    n_train = len(cli.datamodule.dataset("train"))
    assert record.epoch == search_epoch
    assert record.searched == min(n_train, search.inputs.windows or n_train)
    assert 0 <= record.added <= record.accepted <= record.searched
    assert record.pool_size == cli.datamodule.pool.size == record.added
    assert math.isfinite(record.score_gain)

    # the report callbacks wrote their figures (for real for the quickstart's backbone)
    last = search_epoch + 1
    plots = tmp_path / "run" / "plots"
    expected = {
        f"val_forecast_epoch{last:03d}.png", f"val_ensemble_epoch{last:03d}.png", "val_leads.png",
        "codebook_usage.png", f"augment_epoch{search_epoch:03d}.png", "val_rollout.gif",
    }  # fmt: skip
    files = {p.name: p for p in plots.iterdir()}
    assert expected <= set(files), sorted(files)
    if rendered is None:  # real figures, not the 2x2 stand-ins
        assert all(min(Image.open(files[f]).size) > 50 for f in expected), sorted(files)
    else:
        assert {p.name for p in rendered} == set(files), (rendered, sorted(files))
