"""Forecast panels at each validation epoch: input / truth / forecast / error.

Rendered with matplotlib to PNG under ``dirpath`` and, when the logger is a ``WandbLogger``,
logged as an image (offline runs keep it in the run folder for ``wandb sync``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytorch_lightning as pl  # noqa: E402
from pytorch_lightning.loggers import WandbLogger  # noqa: E402
from pytorch_lightning.utilities import rank_zero_only  # noqa: E402

log = logging.getLogger(__name__)


def forecast_panel(x: np.ndarray, y: np.ndarray, pred: np.ndarray, title: str, max_leads: int = 5) -> plt.Figure:
    """A figure for one sample of channel 0: last input, then truth/forecast/error per lead time.

    ``x (T_in, H, W)``, ``y`` and ``pred`` ``(T, H, W)``.
    """
    leads = np.unique(np.linspace(0, y.shape[0] - 1, min(max_leads, y.shape[0])).astype(int))
    vmin, vmax = float(min(y.min(), x[-1].min())), float(max(y.max(), x[-1].max()))
    err = pred - y
    emax = float(np.abs(err).max()) or 1.0
    fig, axes = plt.subplots(3, len(leads) + 1, figsize=(2.2 * (len(leads) + 1), 6.6), squeeze=False)
    axes[0, 0].imshow(x[-1], vmin=vmin, vmax=vmax, cmap="viridis")
    axes[0, 0].set_title("last input")
    for r in (1, 2):
        axes[r, 0].axis("off")
    for j, t in enumerate(leads, start=1):
        axes[0, j].imshow(y[t], vmin=vmin, vmax=vmax, cmap="viridis")
        axes[0, j].set_title(f"truth +{t + 1}")
        im = axes[1, j].imshow(pred[t], vmin=vmin, vmax=vmax, cmap="viridis")
        axes[1, j].set_title(f"forecast +{t + 1}")
        im_e = axes[2, j].imshow(err[t], vmin=-emax, vmax=emax, cmap="RdBu_r")
        axes[2, j].set_title(f"error +{t + 1}")
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(im, ax=axes[:2, 1:].ravel().tolist(), shrink=0.8)
    fig.colorbar(im_e, ax=axes[2, 1:].ravel().tolist(), shrink=0.8)
    fig.suptitle(title)
    return fig


class ForecastImageLogger(pl.Callback):
    """Plot the first validation sample of every validation epoch.

    Args:
        dirpath: folder for the PNGs; default ``<trainer.default_root_dir>/plots``.
        channel: channel to plot.
    """

    def __init__(self, dirpath: str | None = None, channel: int = 0) -> None:
        self.dirpath = dirpath
        self.channel = channel
        self._sample: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self.saved: list[Path] = []

    def on_validation_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
        batch_idx: int, dataloader_idx: int = 0,
    ) -> None:
        if batch_idx != 0 or trainer.sanity_checking or outputs is None:
            return
        c = self.channel
        self._sample = tuple(
            t[0, :, c].detach().float().cpu().numpy() for t in (outputs.x, outputs.y, outputs.pred)
        )

    @rank_zero_only
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._sample is None:
            return
        x, y, pred = self._sample
        self._sample = None
        folder = Path(self.dirpath or Path(trainer.default_root_dir) / "plots")
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"val_forecast_epoch{trainer.current_epoch:03d}.png"
        fig = forecast_panel(x, y, pred, f"validation sample 0, epoch {trainer.current_epoch}")
        fig.savefig(path, dpi=80)
        plt.close(fig)
        self.saved.append(path)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key="val/forecast", images=[str(path)], step=trainer.global_step)
