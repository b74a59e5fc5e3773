"""Code-bank usage on validation inputs: how often each code is the nearest one.

BeamVQ's K alternative futures differ only if many codes are alive (van den Oord et al. 2017,
arXiv 1711.00937, on code-bank collapse), so the histogram, perplexity and dead codes tell
whether the candidates can differ at all.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_only

from beamvq.callbacks import wandb_media
from beamvq.callbacks.checks import at_least, require
from beamvq.callbacks.evaluated import EvaluatedWeights, epoch_suffix, validation_prefix
from beamvq.callbacks.figures.codebook import usage_figure
from beamvq.callbacks.figures.style import plot_dir, save_figure
from beamvq.callbacks.tables import CodeUsage, code_usage
from beamvq.protocols import SearchableModel


class CodebookUsageReport(EvaluatedWeights):
    """Nearest-code usage over the first ``batches`` validation batches of each epoch.

    The validation inputs are encoded once more (``SearchableModel.code_indices``: eval mode, no
    gradients, retrieval never moves the code bank) and their nearest codes counted; counts are
    summed over DDP ranks. Logs ``codebook/val_perplexity``, ``codebook/val_codes_used``,
    ``codebook/val_dead_fraction``, the W&B histogram ``codebook/usage`` and
    ``codebook_usage.png`` (latest epoch; ``beamvq validate`` writes
    ``validate_codebook_usage_epoch<e>.png``, the evaluated checkpoint's epoch). Does nothing for
    a model without a code bank.

    Args:
        dirpath: folder for the PNG; default ``<trainer.default_root_dir>/plots``.
        batches: validation batches counted per epoch.
        dpi: resolution of the PNG.
    """

    def __init__(self, dirpath: str | None = None, batches: int = 4, dpi: int = 90) -> None:
        at_least("CodebookUsageReport", 1, batches=batches)
        at_least("CodebookUsageReport", 10, dpi=dpi)
        self.dirpath = dirpath
        self.batches = int(batches)
        self.dpi = int(dpi)
        self._counts: torch.Tensor | None = None
        self.usage: CodeUsage | None = None
        self.saved: list[Path] = []

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        require(pl_module, SearchableModel, "CodebookUsageReport", "module")

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._counts = None

    def on_validation_batch_end(
        self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:  # fmt: skip
        model: SearchableModel = pl_module
        if trainer.sanity_checking or model.codebook_size == 0 or batch_idx >= self.batches:
            return
        with torch.no_grad():
            idx = model.code_indices(model.normalize(batch.x))
        counts = torch.bincount(idx.reshape(-1), minlength=model.codebook_size)
        self._counts = counts if self._counts is None else self._counts + counts

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self._counts is None:
            return
        counts = trainer.strategy.reduce(self._counts.float(), reduce_op="sum")
        self.usage = usage = code_usage(counts.cpu().numpy())
        for name, value in (
            ("val_perplexity", usage.perplexity),
            ("val_codes_used", float(usage.codes_used)),
            ("val_dead_fraction", usage.dead_fraction),
        ):
            # counts are summed over ranks already: every rank logs the same value
            pl_module.log(f"codebook/{name}", value, on_epoch=True)
        self._draw(trainer, usage)

    @rank_zero_only
    def _draw(self, trainer: pl.Trainer, usage: CodeUsage) -> None:
        epoch = self.evaluated_epoch(trainer)
        title = (
            f"code-bank usage on validation inputs, epoch {epoch} "
            f"({int(usage.counts.sum())} latent positions)"
        )
        fit = validation_prefix(trainer) == "val"  # beamvq validate: a file of its own
        name = "codebook_usage.png" if fit else f"validate_codebook_usage{epoch_suffix(epoch)}.png"
        path = plot_dir(trainer.default_root_dir, self.dirpath) / name
        save_figure(usage_figure(usage, title), path, self.dpi)
        self.saved.append(path)
        if wandb_media.wandb_loggers(trainer):
            media = {
                "codebook/usage": wandb_media.code_histogram(usage.counts),
                "codebook/usage_plot": wandb_media.image(path, title),
            }
            wandb_media.log_media(trainer, media)
