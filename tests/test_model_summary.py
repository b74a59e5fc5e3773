"""callbacks/model_summary.py: the fit's summary without Lightning's FLOPs column (always 0
here), every other column and total kept."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from rich.console import Console

from beamvq.callbacks.model_summary import ParameterSummary, summary_columns

ROOT = Path(__file__).resolve().parents[1]

DATA = [
    (" ", ["0", "1"]),
    ("Name", ["model", "normalizer"]),
    ("Type", ["VQForecaster", "Normalizer"]),
    ("Params", ["276 K", "0"]),
    ("Mode", ["train", "train"]),
    ("FLOPs", ["0", "0"]),
]


def test_the_flops_column_is_dropped_and_the_rest_kept() -> None:
    names = [n for n, _ in summary_columns(DATA)]
    assert names == [" ", "Name", "Type", "Params", "Mode"]


def test_the_printed_summary_has_no_flops(monkeypatch: pytest.MonkeyPatch) -> None:
    out = io.StringIO()
    console = Console(file=out, width=120)
    monkeypatch.setattr("rich.get_console", lambda: console)
    ParameterSummary.summarize(DATA, 276_000, 276_000, 1.104, {"train": 98, "eval": 0}, 0)
    text = out.getvalue()
    assert "VQForecaster" in text and "276 K" in text and "Trainable params" in text
    assert "FLOPs" not in text


def test_the_cli_adds_it_unless_a_summary_is_configured(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pytorch_lightning.callbacks import ModelSummary

    from beamvq.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    gen = "--data.init_args.generator.init_args."
    args = ["fit", "--config", str(ROOT / "configs" / "quickstart.yaml"), "--trainer.logger",
            "false", "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1",
            "--trainer.limit_val_batches", "1", "--trainer.default_root_dir", str(tmp_path / "run"),
            f"{gen}n_trajectories", "6", f"{gen}resolution", "16", f"{gen}n_frames", "12",
            "--data.init_args.loader.batch_size", "2"]  # fmt: skip
    summaries = [c for c in main(args).trainer.callbacks if isinstance(c, ModelSummary)]
    assert [type(c) for c in summaries] == [ParameterSummary]
    off = main([*args, "--trainer.enable_model_summary", "false"]).trainer.callbacks
    assert not any(isinstance(c, ModelSummary) for c in off)
