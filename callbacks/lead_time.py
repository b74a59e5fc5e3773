"""Metrics by lead time (and threshold) after each validation and after test.

The per-lead metrics ``ForecastModule`` logs (``val/mse_lead{t}``, ``val/csi_m_lead{t}``,
``test/crps_lead{t}``, ...) and the per-threshold ones (``csi_{thr}``, ``pod_``, ``sucr_``,
``bias_``; SEVIR protocol, Veillette et al. 2020) as line plots and tables: forecast skill is
judged by how it decays with lead time, which BeamVQ claims to slow (arXiv 2405.17051). With
several variables the test report adds a table of the per-variable metrics (``test/rmse/z500``...,
pooled over lead times), since the pooled physical-unit ones mix units.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_only

from beamvq.callbacks import wandb_media
from beamvq.callbacks.checks import at_least
from beamvq.callbacks.evaluated import EvaluatedWeights, epoch_suffix, validation_prefix
from beamvq.callbacks.figures.leads import lead_figure
from beamvq.callbacks.figures.style import plot_dir, save_figure
from beamvq.callbacks.tables import (
    LeadTable,
    lead_table,
    markdown_table,
    markdown_variable_table,
    variable_table,
)

log = logging.getLogger(__name__)


class LeadTimeReport(EvaluatedWeights):
    """Validation: ``val_leads.png`` (one line per epoch, so the reader sees skill improve with
    training, lead by lead; ``beamvq validate``: ``validate_leads_epoch<e>.png``, the evaluated
    checkpoint's epoch) and W&B ``val/by_lead/*``; test: ``test_leads.png``,
    ``test_leads.md`` (with several variables also a row per variable) and W&B
    ``test/by_lead/*``; with several variables also W&B ``{val,test}/by_variable/table``.

    Args:
        dirpath: folder for the files; default ``<trainer.default_root_dir>/plots``.
        dpi: resolution of the PNGs.
    """

    def __init__(self, dirpath: str | None = None, dpi: int = 90) -> None:
        at_least("LeadTimeReport", 10, dpi=dpi)
        self.dirpath = dirpath
        self.dpi = int(dpi)
        self.val_history: list[tuple[str, LeadTable]] = []
        self.saved: list[Path] = []

    def _table(self, trainer: pl.Trainer, prefix: str) -> LeadTable | None:
        table = lead_table(trainer.callback_metrics, prefix)
        if not table.leads and not table.thresholds:
            log.info("LeadTimeReport: no %s/*_lead* metrics logged; nothing to report", prefix)
            return None
        return table

    def _publish(
        self, trainer: pl.Trainer, table: LeadTable, prefix: str, plot: Path, title: str
    ) -> None:
        if wandb_media.wandb_loggers(trainer):
            objects = wandb_media.lead_objects(table, prefix)
            variables = variable_table(trainer.callback_metrics, prefix)
            if variables.variables:
                names = list(variables.by_variable)
                rows = [
                    [v, *(variables.by_variable[n][i] for n in names)]
                    for i, v in enumerate(variables.variables)
                ]
                objects[f"{prefix}/by_variable/table"] = wandb_media.table(
                    ["variable", *names], rows
                )
            image = wandb_media.image(plot, title)
            wandb_media.log_media(trainer, {**objects, f"{prefix}/by_lead/plot": image})

    @rank_zero_only
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        table = self._table(trainer, "val")
        if table is None:
            return
        epoch = self.evaluated_epoch(trainer)
        label = "untrained" if epoch is None else f"epoch {epoch}"
        folder = plot_dir(trainer.default_root_dir, self.dirpath)
        if validation_prefix(trainer) == "val":  # the fit's validations, one line each
            self.val_history.append((label, table))
            title = f"validation metrics by lead time (epochs 0-{epoch})"
            figure, name = lead_figure(self.val_history, title), "val_leads.png"
        else:  # beamvq validate: the checkpoint's own file, never the fit's
            title = f"validation metrics by lead time ({label}, {trainer.ckpt_path or 'current'})"
            figure, name = (
                lead_figure([(label, table)], title),
                f"validate_leads{epoch_suffix(epoch)}.png",
            )
        path = save_figure(figure, folder / name, self.dpi)
        self.saved.append(path)
        self._publish(trainer, table, "val", path, title)

    @rank_zero_only
    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        table = self._table(trainer, "test")
        if table is None:
            return
        folder = plot_dir(trainer.default_root_dir, self.dirpath)
        epoch = self.evaluated_epoch(trainer)
        label = "untrained" if epoch is None else f"epoch {epoch}"
        title = f"test metrics by lead time ({label}, {trainer.ckpt_path or 'current weights'})"
        figure = lead_figure([("test", table)], title)
        path = save_figure(figure, folder / "test_leads.png", self.dpi)
        md = folder / "test_leads.md"
        text = f"# {title}\n\n{markdown_table(table)}"
        variables = markdown_variable_table(variable_table(trainer.callback_metrics, "test"))
        if variables:
            text += f"\n## By variable (pooled over lead times, physical units)\n\n{variables}"
        md.write_text(text)
        self.saved.extend([path, md])
        self._publish(trainer, table, "test", path, title)
