"""Forecast figures a researcher reads, at each validation epoch, after test and after fit.

The first sample of the first validation (test) batch is drawn: its input frames, then truth /
forecast / error per lead time (``figures.forecast.forecast_panel``); when the model has a VQ
code bank, its ensemble (members, mean, spread, error of the mean; ``ensemble_panel``): the K
alternative futures of BeamVQ (arXiv 2502.18925, stage 2) or the module's beam-searched
``predict`` members. At the end of ``fit`` the last validation sample becomes an animated GIF of
the rollout (``figures.animation.rollout_animation``). Every figure is a PNG under
``<default_root_dir>/plots`` (readable without W&B) and, with a ``WandbLogger``, a W&B image or
video (offline runs keep them in the run folder for ``wandb sync``). Names: ``val_*_epoch<e>.png``
for the validations of a fit, ``validate_*_epoch<e>.png`` for ``beamvq validate`` and
``test_*.png`` for ``beamvq test``, titled with the epoch of the evaluated checkpoint
(``beamvq.callbacks.evaluated``), so validate and test never replace the fit's figures.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities import rank_zero_only

from beamvq.callbacks import wandb_media
from beamvq.callbacks.checks import at_least, check_channel
from beamvq.callbacks.evaluated import EvaluatedWeights, epoch_suffix, validation_prefix
from beamvq.callbacks.figures.animation import rollout_animation
from beamvq.callbacks.figures.forecast import ensemble_panel, forecast_panel
from beamvq.callbacks.figures.style import FieldStyle, Sample, field_style, plot_dir, save_figure
from beamvq.protocols import ForecastData, SearchableModel

log = logging.getLogger(__name__)
WHO = "ForecastImageLogger"


def data_style(trainer: pl.Trainer, channel: int) -> FieldStyle:
    """``field_style`` from the datamodule's labels (generic ones for other datamodules)."""
    dm = trainer.datamodule
    return field_style(dm.info() if isinstance(dm, ForecastData) else None, channel)


def panel_members(model: Any, x: torch.Tensor, members: int | None) -> torch.Tensor | None:
    """Physical ensemble ``(B, M, T, C, H, W)`` of physical inputs ``x``, or ``None`` without a
    code bank. ``members=None`` draws what ``predict`` writes (the module's ``ensemble_size``,
    beam-searched when it is set up so) and otherwise the ``candidate_k`` code-bank rollouts."""
    if not isinstance(model, SearchableModel) or model.codebook_size == 0:
        return None
    # the predict ensemble's size is a module setting outside the protocol; 0 when unset
    predict = int(model.ensemble_size)
    with torch.no_grad():
        if members is None and predict >= 2:
            return model.ensemble_members(x).fields
        m = members if members is not None else model.candidate_k
        return model.ensemble_members(x, m).fields if m >= 2 else None


class ForecastImageLogger(EvaluatedWeights):
    """Forecast and ensemble panels of the first validation (and test) sample; a rollout GIF at
    the end of fit.

    Args:
        dirpath: folder for the PNGs and the GIF; default ``<trainer.default_root_dir>/plots``.
        channel: channel to plot.
        max_leads: lead times shown in the forecast panel (evenly spread over the horizon).
        ensemble: draw the ensemble panel when the model has a code bank.
        members: ensemble size for the panel; ``None`` uses the module's ``ensemble_size``
            (its ``predict`` ensemble) or else ``candidate_k`` code-bank rollouts.
        animation: write the rollout GIF at the end of fit.
        fps: frames per second of the GIF.
        dpi: resolution of the PNGs.
    """

    def __init__(
        self,
        dirpath: str | None = None,
        channel: int = 0,
        max_leads: int = 5,
        ensemble: bool = True,
        members: int | None = None,
        animation: bool = True,
        fps: int = 2,
        dpi: int = 90,
    ) -> None:
        at_least(WHO, 0, channel=channel)
        at_least(WHO, 1, max_leads=max_leads, fps=fps)
        at_least(WHO, 10, dpi=dpi)
        if members is not None:
            at_least(WHO, 2, members=members)
        self.dirpath, self.channel, self.max_leads = dirpath, int(channel), int(max_leads)
        self.ensemble, self.members, self.animation = bool(ensemble), members, bool(animation)
        self.fps, self.dpi = int(fps), int(dpi)
        self._sample: Sample | None = None
        self._last_val: Sample | None = None
        self._last_val_epoch: int | None = None
        self.saved: list[Path] = []

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """The channel against the data and the panel's members against the code bank, before
        the first batch."""
        super().setup(trainer, pl_module, stage)
        check_channel(WHO, self.channel, trainer.datamodule)
        size = int(getattr(pl_module, "codebook_size", 0) or 0)
        if self.ensemble and self.members is not None and size and self.members > size:
            raise ValueError(
                f"{WHO}: init_args.members = {self.members} is larger than "
                f"model.bottleneck.init_args.codebook_size = {size} (one code per member)"
            )

    def _capture(self, pl_module: pl.LightningModule, outputs: Any) -> None:
        c = self.channel
        if outputs.x.shape[2] <= c:
            raise ValueError(
                f"ForecastImageLogger: channel={c} but the data have {outputs.x.shape[2]} channel(s)"
            )
        x, y, pred = (
            t[0, :, c].detach().float().cpu().numpy() for t in (outputs.x, outputs.y, outputs.pred)
        )
        ens = panel_members(pl_module, outputs.x[:1], self.members) if self.ensemble else None
        members = None if ens is None else ens[0, :, :, c].detach().float().cpu().numpy()
        self._sample = Sample(x, y, pred, members)

    def on_validation_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
        batch_idx: int, dataloader_idx: int = 0,
    ) -> None:  # fmt: skip
        if batch_idx == 0 and not trainer.sanity_checking and outputs is not None:
            self._capture(pl_module, outputs)

    def on_test_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
        batch_idx: int, dataloader_idx: int = 0,
    ) -> None:  # fmt: skip
        if batch_idx == 0 and outputs is not None:
            self._capture(pl_module, outputs)

    def _draw(self, trainer: pl.Trainer, stage: str) -> None:
        if self._sample is None:
            return
        sample, self._sample = self._sample, None
        epoch = self.evaluated_epoch(trainer)
        if stage == "val" and trainer.state.fn == TrainerFn.FITTING:
            self._last_val, self._last_val_epoch = sample, epoch
        folder = plot_dir(trainer.default_root_dir, self.dirpath)
        style = data_style(trainer, self.channel)
        what = "validation" if stage == "val" else "test"
        title = f"{what} sample 0" + ("" if epoch is None else f", epoch {epoch}")
        # the fit's validations val_*_epoch<e>, beamvq validate validate_*_epoch<e>, test test_*
        prefix = validation_prefix(trainer) if stage == "val" else stage
        suffix = epoch_suffix(epoch) if stage == "val" else ""
        panels = {f"{stage}/forecast": lambda: forecast_panel(sample, title, style, self.max_leads)}
        if sample.members is not None:
            panels[f"{stage}/ensemble"] = lambda: ensemble_panel(sample, title, style)
        # one figure open at a time: drawn, saved and closed before the next
        paths = {
            key: save_figure(draw(), folder / f"{prefix}_{key.split('/')[1]}{suffix}.png", self.dpi)
            for key, draw in panels.items()
        }
        self.saved.extend(paths.values())
        if wandb_media.wandb_loggers(trainer):
            images = {key: wandb_media.image(p, title) for key, p in paths.items()}
            wandb_media.log_media(trainer, images)

    @rank_zero_only
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._draw(trainer, "val")

    @rank_zero_only
    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._draw(trainer, "test")

    @rank_zero_only
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.animation:
            return
        if self._last_val is None:
            log.info("ForecastImageLogger: no validation sample was drawn; no rollout animation")
            return
        path = plot_dir(trainer.default_root_dir, self.dirpath) / "val_rollout.gif"
        title = f"validation sample 0, epoch {self._last_val_epoch}"
        style = data_style(trainer, self.channel)
        self.saved.append(rollout_animation(self._last_val, path, title, style, self.fps))
        if wandb_media.wandb_loggers(trainer):
            wandb_media.log_media(trainer, {"val/rollout": wandb_media.gif(path)})
