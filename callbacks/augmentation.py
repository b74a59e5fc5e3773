"""A panel of the BeamVQ self-training after each search epoch (arXiv 2405.17051, stage 3).

What ``BeamSearchAugmentation`` did per epoch (its public ``history``: searched / accepted /
added, pool size, score gain) and a few pool pseudo-targets beside the truth of the training
window they came from (found by the source the pool records, ``ForecastData.training_targets``)
and the plain forecast of the same input.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_only

from beamvq.callbacks import wandb_media
from beamvq.callbacks.beam_search import BeamSearchAugmentation
from beamvq.callbacks.checks import at_least, check_channel
from beamvq.callbacks.figures.augmentation import PoolExample, augmentation_figure
from beamvq.callbacks.figures.style import plot_dir, rmse, save_figure
from beamvq.callbacks.forecast_images import data_style
from beamvq.protocols import SOURCE_KINDS, ForecastData, PoolSamples, SearchableModel

log = logging.getLogger(__name__)
WHO = "AugmentationReport"


def pool_truths(dm: ForecastData, samples: PoolSamples) -> list[np.ndarray | None]:
    """The recorded future ``(T, C, H, W)`` of each pool sample: its training window's target
    when the sample came from a window (``source_kind``), else ``None`` (unlabelled inputs)."""
    window = SOURCE_KINDS.index("window")
    from_window = (samples.source_kind == window) & (samples.source_index >= 0)
    found: list[np.ndarray | None] = [None] * int(samples.x.shape[0])
    rows = torch.nonzero(from_window).flatten()
    if rows.numel():
        targets = dm.training_targets(samples.source_index[rows])
        for r, y in zip(rows.tolist(), targets):
            found[r] = y.numpy()
    return found


def plain_forecast(pl_module: pl.LightningModule, x: torch.Tensor) -> torch.Tensor:
    """The deterministic physical forecast of physical inputs ``x``, in eval mode under
    ``no_grad`` (the code bank does not move); the module's mode is restored."""
    model: SearchableModel = pl_module  # type: ignore[assignment]
    was_training = pl_module.training
    pl_module.eval()
    try:
        with torch.no_grad():
            xn = model.normalize(x.to(pl_module.device))
            return model.denormalize(model.forecast(xn, model.rollout_steps)).float().cpu()
    finally:
        pl_module.train(was_training)


class AugmentationReport(pl.Callback):
    """``augment_epoch<e>.png`` and W&B ``augment/panel``, ``augment/history`` after each
    search epoch: it is reported at the next hook that sees it, so the callback works in any
    position of the callback list.

    Args:
        dirpath: folder for the PNGs; default ``<trainer.default_root_dir>/plots``.
        examples: newest pool samples drawn (0: the statistics only).
        channel: channel drawn.
        dpi: resolution of the PNGs.
    """

    def __init__(
        self, dirpath: str | None = None, examples: int = 3, channel: int = 0, dpi: int = 90
    ) -> None:
        at_least(WHO, 0, examples=examples, channel=channel)
        at_least(WHO, 10, dpi=dpi)
        self.dirpath = dirpath
        self.examples = int(examples)
        self.channel = int(channel)
        self.dpi = int(dpi)
        self._reported = -1
        self.saved: list[Path] = []

    @staticmethod
    def _search(trainer: pl.Trainer) -> BeamSearchAugmentation | None:
        found = [cb for cb in trainer.callbacks if isinstance(cb, BeamSearchAugmentation)]
        return found[0] if found else None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        check_channel(WHO, self.channel, trainer.datamodule)
        if self._search(trainer) is None:
            log.warning("AugmentationReport: no BeamSearchAugmentation callback; nothing to report")

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._report(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._report(trainer, pl_module)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._report(trainer, pl_module)

    @rank_zero_only
    def _report(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        search = self._search(trainer)
        if search is None or not search.history or search.history[-1].epoch <= self._reported:
            return
        record = search.history[-1]
        self._reported = record.epoch
        dm: ForecastData = trainer.datamodule
        examples = self.pool_examples(dm, pl_module)
        pool = dm.pool.samples()
        lead = int(pool.y.shape[1]) if dm.pool.size else 0
        title = (
            f"BeamVQ augmentation after epoch {record.epoch}: pool {record.pool_size}, "
            f"added {record.added} of {record.searched} searched, "
            f"score gain {record.score_gain:.3g}, search {record.search_seconds:.1f} s"
        )
        style = data_style(trainer, self.channel)
        fig = augmentation_figure(
            search.history, examples, lead, pool.score.float().numpy(), title, style
        )
        folder = plot_dir(trainer.default_root_dir, self.dirpath)
        path = save_figure(fig, folder / f"augment_epoch{record.epoch:03d}.png", self.dpi)
        self.saved.append(path)
        if wandb_media.wandb_loggers(trainer):
            media = {
                "augment/panel": wandb_media.image(path, title),
                "augment/history": wandb_media.table(record._fields, search.history),
            }
            wandb_media.log_media(trainer, media)

    def pool_examples(self, dm: ForecastData, pl_module: pl.LightningModule) -> list[PoolExample]:
        """The newest ``examples`` pool samples, at the longest lead, with truth and forecast."""
        n = min(self.examples, int(dm.pool.size))
        if n == 0:
            return []
        pool = dm.pool.samples()
        newest = torch.argsort(pool.age, descending=True)[:n]
        chosen = PoolSamples(*(t[newest] for t in pool))
        x, pseudo = chosen.x, chosen.y
        truths = pool_truths(dm, chosen)
        plain = plain_forecast(pl_module, x)
        c, last = self.channel, pseudo.shape[1] - 1
        out = []
        for i, truth in enumerate(truths):
            out.append(
                PoolExample(
                    x[i, -1, c].numpy(),
                    pseudo[i, last, c].numpy(),
                    plain[i, last, c].numpy(),
                    None if truth is None else truth[last, c],
                    float(chosen.score[i]),
                    int(chosen.age[i]),
                    float("nan") if truth is None else rmse(pseudo[i].numpy(), truth),
                    float("nan") if truth is None else rmse(plain[i].numpy(), truth),
                )
            )
        return out
