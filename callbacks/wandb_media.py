"""What the report callbacks hand to Weights & Biases, through public APIs only.

Media go to ``WandbLogger.experiment.log`` (one call per report, at the trainer's global step:
``trainer/global_step`` is the step axis ``WandbLogger`` defines for every key), as ``wandb.Image``,
``wandb.Video``, ``wandb.Table``, ``wandb.Histogram`` and ``wandb.plot.line`` objects; whether a
run uploads is read from the run's public ``offline``/``disabled`` properties; artifacts go
through ``wandb.Artifact`` and ``run.log_artifact``. ``wandb`` is imported only when a
``WandbLogger`` is configured.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
from pytorch_lightning.loggers import WandbLogger

from beamvq.callbacks.tables import LABELS, LeadTable

log = logging.getLogger(__name__)

# W&B histograms hold at most 512 bins
MAX_HISTOGRAM_BINS = 512


def wandb_loggers(trainer: pl.Trainer) -> list[WandbLogger]:
    """The trainer's ``WandbLogger``s (none: nothing goes to W&B)."""
    return [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]


def log_media(trainer: pl.Trainer, data: Mapping[str, Any]) -> None:
    """Log W&B objects at the trainer's global step on every ``WandbLogger``."""
    for logger in wandb_loggers(trainer):
        logger.experiment.log({**data, "trainer/global_step": trainer.global_step})


def image(path: Path, caption: str | None = None) -> Any:
    import wandb

    return wandb.Image(str(path), caption=caption)


def gif(path: Path) -> Any:
    import wandb

    return wandb.Video(str(path), format="gif")


def table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> Any:
    import wandb

    return wandb.Table(columns=list(columns), data=[list(r) for r in rows])


def code_histogram(counts: np.ndarray) -> Any:
    """Counts per code index as a W&B histogram; larger code banks are grouped into 512 bins."""
    import wandb

    n = counts.size
    hist = np.histogram(np.arange(n), bins=min(n, MAX_HISTOGRAM_BINS), range=(0, n), weights=counts)
    return wandb.Histogram(np_histogram=hist)


def lead_objects(lead: LeadTable, prefix: str) -> dict[str, Any]:
    """W&B tables of ``lead`` and one line chart per per-lead metric."""
    import wandb

    out: dict[str, Any] = {}
    if lead.leads:
        names = list(lead.by_lead)
        rows = [[t, *(lead.by_lead[n][i] for n in names)] for i, t in enumerate(lead.leads)]
        wt = table(["lead_time", *names], rows)
        out[f"{prefix}/by_lead/table"] = wt
        for n in names:
            out[f"{prefix}/by_lead/{n}"] = wandb.plot.line(
                wt, "lead_time", n, title=f"{prefix} {LABELS.get(n, n)} by lead time"
            )
    if lead.thresholds:
        names = list(lead.by_threshold)
        rows = [
            [float(thr), *(lead.by_threshold[n][i] for n in names)]
            for i, thr in enumerate(lead.thresholds)
        ]
        out[f"{prefix}/by_threshold/table"] = table(["threshold", *names], rows)
    return out


def uploads(logger: WandbLogger) -> bool:
    """Whether ``logger``'s run uploads: neither offline (``WandbLogger(offline=True)`` or
    ``WANDB_MODE=offline``) nor disabled."""
    run = logger.experiment
    return not (bool(run.offline) or bool(run.disabled))


def log_artifact(
    logger: WandbLogger, kind: str, files: Sequence[Path], meta: Mapping[str, Any]
) -> bool:
    """Upload ``files`` as one artifact ``<kind>-<run id>`` of type ``kind`` (alias ``latest``);
    ``False`` (with a log line) when the run is offline: the files stay on disk."""
    if not uploads(logger):
        log.info("WandbArtifacts: offline W&B run; %s files not uploaded: %s", kind, list(files))
        return False
    import wandb

    run = logger.experiment
    artifact = wandb.Artifact(f"{kind}-{run.id}", type=kind, metadata=dict(meta))
    for f in files:
        artifact.add_file(str(f), name=f.name)
    run.log_artifact(artifact, aliases=["latest"])
    return True
