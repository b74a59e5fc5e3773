"""Start a fit from another run's weights: BeamVQ's stages as the papers run them.

BeamVQ (arXiv 2502.18925) trains the base forecaster first (stage 1), then turns it into a
K-candidate model and self-trains it (stages 2-3). ``ForecastModule(init_from=...)`` starts a
new fit from a stage-1 checkpoint: its weights and normalization statistics are loaded, while
the optimizer, the learning-rate schedule, the epoch count and the augmented pool start afresh
(``--ckpt_path`` would resume the old fit instead). The checkpoint may lack the bottleneck (a
base model fine-tuned with a code bank: the code bank then starts fresh, k-means-initialised on
the first training batch); every other weight must be there with its shape, and the backbone,
steps, channels and data must be those of this run.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import pytorch_lightning as pl

from beamvq.checkpoint_files import read_checkpoint as read_safely
from beamvq.checkpointing import data_identity, model_identity, weight_differences
from beamvq.normalization import upgrade_legacy_keys

log = logging.getLogger(__name__)

# parts of the model a stage-1 checkpoint may lack: they start as this run builds them
FRESH_PREFIXES = ("model.bottleneck.",)
# identity keys that describe those parts
FRESH_IDENTITY = ("bottleneck", "codebook_shape")


def read_checkpoint(path: str) -> Mapping[str, Any]:
    """The checkpoint at ``path`` (safe loading only), or one message naming the file and what is
    wrong (``beamvq.checkpoint_files.read_checkpoint``)."""
    return read_safely(path, "model.init_from")


def init_problems(
    checkpoint: Mapping[str, Any], module: pl.LightningModule, trainer: pl.Trainer | None
) -> list[str]:
    """Every way the checkpoint's weights cannot start ``module`` (empty: they can)."""
    saved = dict(checkpoint["state_dict"])
    upgrade_legacy_keys(saved)
    extra = checkpoint.get("beamvq") or {}
    problems = _weight_problems(saved, module.state_dict())
    problems += _identity_problems(extra.get("model") or {}, module)
    problems += _data_problems(extra.get("data") or {}, trainer)
    return problems


def _weight_problems(saved: Mapping[str, Any], mine: Mapping[str, Any]) -> list[str]:
    """Shapes that differ, weights missing (but for the fresh parts) and weights unexpected."""
    problems = weight_differences(saved, mine, strict=False)
    missing = [k for k in mine if k not in saved and not k.startswith(FRESH_PREFIXES)]
    unexpected = [k for k in saved if k not in mine]
    if missing:
        problems.append(f"weights missing from the checkpoint: {missing[:5]} ({len(missing)})")
    if unexpected:
        problems.append(f"weights this model does not have: {unexpected[:5]} ({len(unexpected)})")
    return problems


def _identity_problems(saved_id: Mapping[str, Any], module: pl.LightningModule) -> list[str]:
    """The model identity's differences (backbone, steps, channels), the fresh parts' aside."""
    return [
        f"{key}: checkpoint {saved_id[key]}, this model {value}"
        for key, value in model_identity(module.model).items()
        if key in saved_id and key not in FRESH_IDENTITY and saved_id[key] != value
    ]


def _data_problems(saved_data: Mapping[str, Any], trainer: pl.Trainer | None) -> list[str]:
    """The data's differences (variables, grid) from the one the checkpoint was trained on."""
    dm = trainer.datamodule if trainer is not None else None
    if dm is None or not saved_data:
        return []
    mine_data = data_identity(dm)
    return [
        f"data {key}: checkpoint {saved_data[key]}, this data {mine_data[key]}"
        for key in ("variables", "grid")
        if key in saved_data and key in mine_data and saved_data[key] != mine_data[key]
    ]


def load_weights(module: pl.LightningModule, path: str, trainer: pl.Trainer | None) -> None:
    """Load ``path``'s weights into ``module`` (see the module docstring), or raise naming what
    does not fit."""
    checkpoint = read_checkpoint(path)
    problems = init_problems(checkpoint, module, trainer)
    if problems:
        raise ValueError(
            f"model.init_from {path} cannot start this model:\n  - " + "\n  - ".join(problems)
        )
    saved = dict(checkpoint["state_dict"])
    upgrade_legacy_keys(saved)
    result = module.load_state_dict(saved, strict=False)
    fresh = sorted({k.split(".")[1] for k in result.missing_keys if k.count(".") >= 1})
    log.info(
        "initialized from %s (%d tensors)%s",
        path,
        len(saved),
        f"; fresh: {', '.join(fresh)}" if fresh else "",
    )
