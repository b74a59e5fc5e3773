"""Run reports: metrics by lead time, code-bank usage, the BeamVQ augmentation, W&B artifacts.

* ``LeadTimeReport``: the per-lead metrics ``ForecastModule`` logs (``val/mse_lead{t}``,
  ``val/csi_m_lead{t}``, ``test/crps_lead{t}``, ...) and the per-threshold ones (``csi_{thr}``,
  ``pod_``, ``sucr_``, ``bias_``; SEVIR protocol, Veillette et al. 2020) as line plots and tables;
  forecast skill is judged by how it decays with lead time, which BeamVQ claims to slow
  (arXiv 2405.17051: gains largest at long leads).
* ``CodebookUsageReport``: how often each code is the nearest one on validation inputs. The K
  alternative futures of BeamVQ differ only if many codes are alive (van den Oord et al. 2017,
  arXiv 1711.00937, on code-bank collapse), so the histogram, perplexity and dead codes tell
  whether the candidates can differ at all.
* ``AugmentationReport``: what ``beamvq.callbacks.beam_search.BeamSearchAugmentation`` did per epoch
  (searched/accepted/added, pool size, score gain) and a few pool pseudo-targets beside the truth
  and the plain forecast of the same input, at the longest lead.
* ``WandbArtifacts``: checkpoints (end of fit) and the prediction NetCDF (end of predict) as W&B
  artifacts, only when the run is online (an offline run cannot upload them; the files stay on
  disk).

Figures are PNGs under ``<default_root_dir>/plots`` and, with a ``WandbLogger``, W&B images,
tables, line charts and histograms.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import matplotlib.pyplot as plt
import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import BasePredictionWriter
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.utilities import rank_zero_only

from beamvq.callbacks.beam_search import BeamSearchAugmentation
from beamvq.callbacks.plots import (
    ERROR_CMAP,
    FieldStyle,
    field_limits,
    field_style,
    log_to_wandb,
    plot_dir,
    rmse,
    save_figure,
    wandb_image,
    wandb_loggers,
)
from beamvq.protocols import SOURCE_KINDS, PoolSamples

log = logging.getLogger(__name__)

# readable names of the module's metric keys
LABELS = {
    "mse": "MSE",
    "mae": "MAE",
    "csi_m": "CSI-M",
    "crps": "CRPS",
    "spread_skill": "spread/skill",
    "csi": "CSI",
    "pod": "POD",
    "sucr": "SUCR",
    "bias": "BIAS",
}
THRESHOLD_METRICS = ("csi", "pod", "sucr", "bias")


# -- metrics by lead time ------------------------------------------------------------------------
class LeadTable(NamedTuple):
    """Metrics of one evaluation: ``by_lead[name]`` over ``leads`` (1, 2, ...) and
    ``by_threshold[name]`` over ``thresholds`` (the threshold tags of the keys, e.g. ``"74"``)."""

    leads: list[int]
    by_lead: dict[str, list[float]]
    thresholds: list[str]
    by_threshold: dict[str, list[float]]


def lead_table(metrics: Mapping[str, Any], prefix: str) -> LeadTable:
    """Collect ``{prefix}/{name}_lead{t}`` and ``{prefix}/{csi|pod|sucr|bias}_{thr}`` keys."""
    per_lead: dict[str, dict[int, float]] = {}
    per_thr: dict[str, dict[str, float]] = {}
    lead_re = re.compile(rf"^{re.escape(prefix)}/(.+)_lead(\d+)$")
    thr_re = re.compile(rf"^{re.escape(prefix)}/({'|'.join(THRESHOLD_METRICS)})_([-+0-9.eE]+)$")
    for key, value in metrics.items():
        if m := lead_re.match(key):
            per_lead.setdefault(m.group(1), {})[int(m.group(2))] = float(value)
        elif m := thr_re.match(key):
            per_thr.setdefault(m.group(1), {})[m.group(2)] = float(value)
    leads = sorted({t for series in per_lead.values() for t in series})
    thresholds = sorted({t for series in per_thr.values() for t in series}, key=float)
    order = [n for n in LABELS if n in per_lead] + sorted(set(per_lead) - set(LABELS))
    return LeadTable(
        leads,
        {n: [per_lead[n].get(t, float("nan")) for t in leads] for n in order},
        thresholds,
        {
            n: [per_thr[n].get(t, float("nan")) for t in thresholds]
            for n in THRESHOLD_METRICS
            if n in per_thr
        },
    )


def markdown_table(table: LeadTable) -> str:
    """The table as Markdown: one row per lead time, then one row per threshold."""
    lines = []
    if table.leads:
        names = list(table.by_lead)
        lines.append("| lead | " + " | ".join(LABELS.get(n, n) for n in names) + " |")
        lines.append("|---:|" + "---:|" * len(names))
        for i, t in enumerate(table.leads):
            lines.append(
                f"| +{t} | " + " | ".join(f"{table.by_lead[n][i]:.4g}" for n in names) + " |"
            )
    if table.thresholds:
        names = list(table.by_threshold)
        lines.append("")
        lines.append(
            "| threshold | " + " | ".join(LABELS[n] for n in names) + " |  (pooled over leads)"
        )
        lines.append("|---:|" + "---:|" * len(names))
        for i, thr in enumerate(table.thresholds):
            lines.append(
                f"| {thr} | " + " | ".join(f"{table.by_threshold[n][i]:.4g}" for n in names) + " |"
            )
    return "\n".join(lines) + "\n"


def lead_figure(history: list[tuple[str, LeadTable]], title: str) -> plt.Figure:
    """One panel per per-lead metric (a line per entry of ``history``, e.g. per epoch) and, with
    thresholds, a grouped bar chart of CSI/POD/SUCR/BIAS of the last entry."""
    last = history[-1][1]
    names = list(last.by_lead)
    n_panels = len(names) + (1 if last.thresholds else 0)
    if n_panels == 0:
        raise ValueError(f"lead_figure: no per-lead or per-threshold metrics for {title!r}")
    cols = min(3, n_panels)
    rows = -(-n_panels // cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False, layout="constrained"
    )
    colours = plt.cm.viridis(np.linspace(0.1, 0.9, len(history)))
    for k, name in enumerate(names):
        ax = axes.flat[k]
        for (label, tab), colour in zip(history, colours):
            if name in tab.by_lead:
                ax.plot(tab.leads, tab.by_lead[name], "o-", color=colour, label=label, ms=3)
        ax.set_title(f"{LABELS.get(name, name)} by lead time")
        ax.set_xlabel("lead time (steps)")
        ax.set_xticks(last.leads)
        ax.grid(alpha=0.3)
        if name == "spread_skill":
            ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    if len(history) > 1:
        axes.flat[0].legend(fontsize=7, ncol=1 + len(history) // 8)
    if last.thresholds:
        ax = axes.flat[len(names)]
        width = 0.8 / max(1, len(last.by_threshold))
        pos = np.arange(len(last.thresholds))
        for i, (name, values) in enumerate(last.by_threshold.items()):
            ax.bar(pos + i * width, values, width, label=LABELS[name])
        ax.set_xticks(pos + 0.4 - width / 2, last.thresholds)
        ax.set_xlabel("threshold (pooled over leads)")
        ax.set_title(f"scores by threshold ({history[-1][0]})")
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3, axis="y")
    for ax in axes.flat[n_panels:]:
        ax.axis("off")
    fig.suptitle(title)
    return fig


def wandb_lead_objects(table: LeadTable, prefix: str) -> dict[str, Any]:
    """W&B tables of ``table`` and one line chart per per-lead metric."""
    import wandb

    out: dict[str, Any] = {}
    if table.leads:
        names = list(table.by_lead)
        rows = [[t, *(table.by_lead[n][i] for n in names)] for i, t in enumerate(table.leads)]
        wt = wandb.Table(columns=["lead_time", *names], data=rows)
        out[f"{prefix}/by_lead/table"] = wt
        for n in names:
            out[f"{prefix}/by_lead/{n}"] = wandb.plot.line(
                wt, "lead_time", n, title=f"{prefix} {LABELS.get(n, n)} by lead time"
            )
    if table.thresholds:
        names = list(table.by_threshold)
        rows = [
            [float(thr), *(table.by_threshold[n][i] for n in names)]
            for i, thr in enumerate(table.thresholds)
        ]
        out[f"{prefix}/by_threshold/table"] = wandb.Table(columns=["threshold", *names], data=rows)
    return out


class LeadTimeReport(pl.Callback):
    """Metrics by lead time (and threshold) after each validation and after test.

    Validation: ``val_leads.png`` (one line per epoch, so the reader sees skill improve with
    training, lead by lead) and W&B ``val/by_lead/*``; test: ``test_leads.png``,
    ``test_leads.md`` and W&B ``test/by_lead/*``.

    Args:
        dirpath: folder for the files; default ``<trainer.default_root_dir>/plots``.
        dpi: resolution of the PNGs.
    """

    def __init__(self, dirpath: str | None = None, dpi: int = 90) -> None:
        self.dirpath = dirpath
        self.dpi = int(dpi)
        self.val_history: list[tuple[str, LeadTable]] = []
        self.saved: list[Path] = []

    def _report(self, trainer: pl.Trainer, prefix: str) -> LeadTable | None:
        table = lead_table(trainer.callback_metrics, prefix)
        if not table.leads and not table.thresholds:
            log.info("LeadTimeReport: no %s/*_lead* metrics logged; nothing to report", prefix)
            return None
        return table

    @rank_zero_only
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        table = self._report(trainer, "val")
        if table is None:
            return
        self.val_history.append((f"epoch {trainer.current_epoch}", table))
        folder = plot_dir(trainer, self.dirpath)
        title = f"validation metrics by lead time (epochs 0-{trainer.current_epoch})"
        path = save_figure(lead_figure(self.val_history, title), folder / "val_leads.png", self.dpi)
        self.saved.append(path)
        if wandb_loggers(trainer):
            log_to_wandb(
                trainer,
                {**wandb_lead_objects(table, "val"), "val/by_lead/plot": wandb_image(path, title)},
            )

    @rank_zero_only
    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        table = self._report(trainer, "test")
        if table is None:
            return
        folder = plot_dir(trainer, self.dirpath)
        title = f"test metrics by lead time ({trainer.ckpt_path or 'current weights'})"
        path = save_figure(
            lead_figure([("test", table)], title), folder / "test_leads.png", self.dpi
        )
        md = folder / "test_leads.md"
        md.write_text(f"# {title}\n\n{markdown_table(table)}")
        self.saved.extend([path, md])
        if wandb_loggers(trainer):
            log_to_wandb(
                trainer,
                {
                    **wandb_lead_objects(table, "test"),
                    "test/by_lead/plot": wandb_image(path, title),
                },
            )


# -- code-bank usage -----------------------------------------------------------------------------
class CodeUsage(NamedTuple):
    """Counts per code ``(codebook_size,)`` and the summary numbers drawn from them."""

    counts: np.ndarray
    perplexity: float
    codes_used: int
    dead_fraction: float


def code_usage(counts: np.ndarray) -> CodeUsage:
    """Perplexity exp(H(p)) of the usage distribution, codes used and the fraction never used."""
    counts = np.asarray(counts, dtype=np.float64)
    p = counts / max(counts.sum(), 1.0)
    nz = p[p > 0]
    perplexity = float(np.exp(-(nz * np.log(nz)).sum())) if nz.size else 0.0
    used = int((counts > 0).sum())
    return CodeUsage(counts, perplexity, used, 1.0 - used / counts.size)


def usage_figure(usage: CodeUsage, title: str) -> plt.Figure:
    """Counts per code index, and the sorted usage (rank-frequency, log scale)."""
    n = usage.counts.size
    fig, axes = plt.subplots(1, 2, figsize=(10.0, 3.4), layout="constrained")
    axes[0].bar(np.arange(n), usage.counts, width=1.0, color="tab:blue")
    axes[0].set_xlabel("code index")
    axes[0].set_ylabel("nearest-code count")
    axes[0].set_xlim(-0.5, n - 0.5)
    frac = np.sort(usage.counts)[::-1] / max(usage.counts.sum(), 1.0)
    axes[1].semilogy(np.arange(1, n + 1), np.where(frac > 0, frac, np.nan), ".-", ms=3)
    axes[1].axhline(1.0 / n, color="grey", ls="--", lw=0.8, label="uniform")
    axes[1].set_xlim(0.5, n + 0.5)
    if usage.codes_used < n:
        # dead codes have no share to draw on a log scale: shade where they would be
        axes[1].axvspan(usage.codes_used + 0.5, n + 0.5, color="0.85", label="never nearest")
    axes[1].set_xlabel("code rank")
    axes[1].set_ylabel("share of tokens")
    axes[1].legend(fontsize=8)
    axes[1].grid(alpha=0.3)
    fig.suptitle(
        f"{title}\nperplexity {usage.perplexity:.1f} of {n}, {usage.codes_used} codes used, "
        f"{100 * usage.dead_fraction:.0f}% dead"
    )
    return fig


class CodebookUsageReport(pl.Callback):
    """Nearest-code usage over the first ``batches`` validation batches of each epoch.

    The validation inputs are encoded once more (eval mode, no gradients: retrieval never moves
    the code bank) and their nearest codes counted; counts are summed over DDP ranks. Logs
    ``codebook/val_perplexity``, ``codebook/val_codes_used``, ``codebook/val_dead_fraction``, the
    W&B histogram ``codebook/usage`` and ``codebook_usage.png`` (latest epoch). Does nothing for
    a model without a bottleneck.

    Args:
        dirpath: folder for the PNG; default ``<trainer.default_root_dir>/plots``.
        batches: validation batches counted per epoch.
        dpi: resolution of the PNG.
    """

    def __init__(self, dirpath: str | None = None, batches: int = 4, dpi: int = 90) -> None:
        if batches < 1:
            raise ValueError(f"CodebookUsageReport: batches must be >= 1, got {batches}")
        self.dirpath = dirpath
        self.batches = int(batches)
        self.dpi = int(dpi)
        self._counts: torch.Tensor | None = None
        self.usage: CodeUsage | None = None
        self.saved: list[Path] = []

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._counts = None

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        bottleneck = getattr(pl_module.model, "bottleneck", None)
        if trainer.sanity_checking or bottleneck is None or batch_idx >= self.batches:
            return
        with torch.no_grad():
            z = pl_module.model.backbone.encode(pl_module.normalize(batch.x)).z
            idx = bottleneck.topk_indices(z, 1)
        counts = torch.bincount(idx.reshape(-1), minlength=bottleneck.codebook_size)
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
        title = (
            f"code-bank usage on validation inputs, epoch {trainer.current_epoch} "
            f"({int(usage.counts.sum())} latent positions)"
        )
        path = plot_dir(trainer, self.dirpath) / "codebook_usage.png"
        save_figure(usage_figure(usage, title), path, self.dpi)
        self.saved.append(path)
        if wandb_loggers(trainer):
            import wandb

            n = usage.counts.size
            # W&B histograms hold at most 512 bins: larger code banks are grouped
            hist = np.histogram(np.arange(n), bins=min(n, 512), range=(0, n), weights=usage.counts)
            log_to_wandb(
                trainer,
                {
                    "codebook/usage": wandb.Histogram(np_histogram=hist),
                    "codebook/usage_plot": wandb_image(path, title),
                },
            )


# -- the BeamVQ augmentation ---------------------------------------------------------------------
def pool_truths(dm: Any, samples: PoolSamples) -> list[np.ndarray | None]:
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


class PoolExample(NamedTuple):
    """One pool sample of one channel at the drawn lead: last input, pseudo-target, plain
    forecast of the same input, truth (``None`` without a recorded future), score and age, and
    the RMSE of the pseudo-target and of the forecast over the whole horizon and every channel
    (what the search scored; NaN without a truth)."""

    last_input: np.ndarray
    pseudo: np.ndarray
    plain: np.ndarray
    truth: np.ndarray | None
    score: float
    age: int
    pseudo_rmse: float = float("nan")
    plain_rmse: float = float("nan")


def augmentation_figure(
    history: list[Any],
    examples: list[PoolExample],
    lead: int,
    pool_scores: np.ndarray,
    title: str,
    style: FieldStyle = FieldStyle(),
) -> plt.Figure:
    """Top: searched/accepted/added and pool size per epoch, score gain per epoch, the pool's
    score distribution. Below, one row per example at lead ``lead``: last input, truth,
    pseudo-target, plain forecast, their errors, and what the search changed (pseudo - forecast).
    """
    n_cols = 7
    fig = plt.figure(figsize=(15.0, 3.2 + 2.2 * len(examples)), layout="constrained")
    grid = fig.add_gridspec(1 + len(examples), n_cols, height_ratios=[1.4] + [1.0] * len(examples))
    epochs = [str(r.epoch) for r in history]
    pos = np.arange(len(epochs))
    ax = fig.add_subplot(grid[0, 0:3])
    w = 0.22
    ax.bar(pos - w, [r.searched for r in history], w, label="searched", color="0.7")
    ax.bar(pos, [r.accepted for r in history], w, label="accepted", color="tab:orange")
    ax.bar(pos + w, [r.added for r in history], w, label="added", color="tab:green")
    ax.plot(pos, [r.pool_size for r in history], "ko-", label="pool size", zorder=3)
    ax.set_xticks(pos, epochs)
    ax.set_xlim(-0.6, len(epochs) - 0.4)
    ax.set_xlabel("epoch")
    ax.set_title("samples per search epoch")
    ax.legend(fontsize=7, loc="upper left")
    ax = fig.add_subplot(grid[0, 3:5])
    gains = np.array([r.score_gain for r in history], dtype=float)
    ax.bar(pos, gains, 0.5, color=["tab:green" if g > 0 else "tab:red" for g in gains])
    for p, g in zip(pos, gains):
        ax.annotate(f"{g:.2g}", (p, g), ha="center", va="bottom" if g >= 0 else "top", fontsize=8)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(pos, epochs)
    ax.set_xlim(-0.6, len(epochs) - 0.4)
    ax.set_xlabel("epoch")
    ax.set_title("score gain of the ensemble over the plain\nforecast (mean over searched inputs)")
    ax = fig.add_subplot(grid[0, 5:7])
    if pool_scores.size:
        ax.hist(pool_scores, bins=min(20, max(3, pool_scores.size)), color="tab:purple")
    ax.set_xlabel("ensemble score (higher is better)")
    ax.set_title(f"scores of the {pool_scores.size} pool samples")
    kw = {"origin": style.origin, "interpolation": "nearest"}
    for r, ex in enumerate(examples, start=1):
        has_truth = ex.truth is not None
        fields = [ex.last_input, ex.pseudo, ex.plain] + ([ex.truth] if has_truth else [])
        vmin, vmax, cmap = field_limits(*fields)
        axes = [fig.add_subplot(grid[r, j]) for j in range(n_cols)]
        axes[0].imshow(ex.last_input, vmin=vmin, vmax=vmax, cmap=cmap, **kw)
        axes[0].set_title(f"pool #{ex.age} (score {ex.score:.3g})\nlast input", fontsize=9)
        axes[2].imshow(ex.pseudo, vmin=vmin, vmax=vmax, cmap=cmap, **kw)
        im = axes[3].imshow(ex.plain, vmin=vmin, vmax=vmax, cmap=cmap, **kw)
        if has_truth:
            axes[1].imshow(ex.truth, vmin=vmin, vmax=vmax, cmap=cmap, **kw)
            axes[1].set_title(f"truth +{lead}", fontsize=9)
            errs = (ex.pseudo - ex.truth, ex.plain - ex.truth)
            emax = max(float(np.abs(e).max()) for e in errs) or 1.0
            axes[2].set_title(
                f"pseudo-target +{lead}\nRMSE {rmse(ex.pseudo, ex.truth):.4g} "
                f"(all leads {ex.pseudo_rmse:.4g})",
                fontsize=8,
            )
            axes[3].set_title(
                f"plain forecast +{lead}\nRMSE {rmse(ex.plain, ex.truth):.4g} "
                f"(all leads {ex.plain_rmse:.4g})",
                fontsize=8,
            )
            im_e = axes[4].imshow(errs[0], vmin=-emax, vmax=emax, cmap=ERROR_CMAP, **kw)
            axes[4].set_title("pseudo - truth", fontsize=9)
            axes[5].imshow(errs[1], vmin=-emax, vmax=emax, cmap=ERROR_CMAP, **kw)
            axes[5].set_title("forecast - truth", fontsize=9)
            fig.colorbar(im_e, ax=axes[4:6], shrink=0.8, aspect=15)
        else:
            axes[1].text(0.5, 0.5, "no recorded\nfuture", ha="center", va="center")
            axes[2].set_title(f"pseudo-target +{lead}", fontsize=9)
            axes[3].set_title(f"plain forecast +{lead}", fontsize=9)
            axes[4].axis("off")
            axes[5].axis("off")
        fig.colorbar(im, ax=axes[0:4], shrink=0.8, aspect=15, label=style.label)
        diff = ex.pseudo - ex.plain
        dmax = float(np.abs(diff).max()) or 1.0
        im_d = axes[6].imshow(diff, vmin=-dmax, vmax=dmax, cmap=ERROR_CMAP, **kw)
        axes[6].set_title(f"pseudo - forecast\nmax |diff| {dmax:.2g}", fontsize=9)
        fig.colorbar(im_d, ax=axes[6], shrink=0.8, aspect=15)
        for a in axes:
            a.set_xticks([])
            a.set_yticks([])
    fig.suptitle(title)
    return fig


class AugmentationReport(pl.Callback):
    """A panel of the BeamVQ self-training after each search epoch.

    Reads ``BeamSearchAugmentation.history`` and the datamodule's pool (``dm.pool.samples()``);
    draws the newest ``examples`` pool samples with their truth
    (looked up among the training windows) and the plain forecast of the same input (the module
    in eval mode under ``no_grad``, so the code bank does not move). Works in any position of the
    callback list: a search epoch is reported at the next hook that sees it.

    Args:
        dirpath: folder for the PNGs; default ``<trainer.default_root_dir>/plots``.
        examples: pool samples drawn (0: the statistics only).
        channel: channel drawn.
        dpi: resolution of the PNGs.
    """

    def __init__(
        self, dirpath: str | None = None, examples: int = 3, channel: int = 0, dpi: int = 90
    ) -> None:
        if examples < 0 or channel < 0:
            raise ValueError(
                f"AugmentationReport: examples and channel must be >= 0, got {examples}, {channel}"
            )
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
        if stage == "fit" and self._search(trainer) is None:
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
        dm = trainer.datamodule
        examples = self.pool_examples(dm, pl_module)
        lead = int(dm.pool.samples().y.shape[1]) if dm.pool.size else 0
        title = (
            f"BeamVQ augmentation after epoch {record.epoch}: pool {record.pool_size}, "
            f"added {record.added} of {record.searched} searched, "
            f"score gain {record.score_gain:.3g}, search {record.search_seconds:.1f} s"
        )
        fig = augmentation_figure(
            list(search.history),
            examples,
            lead,
            dm.pool.samples().score.float().numpy(),
            title,
            field_style(trainer, self.channel),
        )
        path = plot_dir(trainer, self.dirpath) / f"augment_epoch{record.epoch:03d}.png"
        save_figure(fig, path, self.dpi)
        self.saved.append(path)
        if wandb_loggers(trainer):
            import wandb

            rows = [list(r) for r in search.history]
            log_to_wandb(
                trainer,
                {
                    "augment/panel": wandb_image(path, title),
                    "augment/history": wandb.Table(columns=list(record._fields), data=rows),
                },
            )

    def pool_examples(self, dm: Any, pl_module: pl.LightningModule) -> list[PoolExample]:
        """The newest ``examples`` pool samples, at the longest lead, with truth and forecast."""
        n = min(self.examples, int(dm.pool.size))
        if n == 0:
            return []
        pool = dm.pool.samples()
        newest = torch.argsort(pool.age, descending=True)[:n]
        chosen = PoolSamples(*(t[newest] for t in pool))
        x, pseudo = chosen.x, chosen.y
        truths = pool_truths(dm, chosen)
        was_training = pl_module.training
        pl_module.eval()
        try:
            with torch.no_grad():
                plain = pl_module(x.to(pl_module.device)).float().cpu()
        finally:
            pl_module.train(was_training)
        c, last = self.channel, pseudo.shape[1] - 1
        out = []
        for i in range(n):
            truth = truths[i]
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


# -- artifacts -----------------------------------------------------------------------------------
def wandb_online(logger: WandbLogger) -> bool:
    """Whether ``logger`` uploads: not ``offline=True``, no offline/disabled ``WANDB_MODE`` and a
    run that is neither offline nor disabled."""
    if getattr(logger, "_offline", False):
        return False
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun"):
        return False
    run = logger.experiment
    mode = str(getattr(getattr(run, "settings", None), "mode", "online")).lower()
    return mode not in ("offline", "disabled", "dryrun") and not getattr(run, "disabled", False)


class WandbArtifacts(pl.Callback):
    """Checkpoints (best and last, at the end of fit) and prediction NetCDF files (at the end of
    predict) as W&B artifacts of types ``model`` and ``predictions``, only on online runs.

    Offline runs are skipped with a log line: the files stay where the checkpoint callback and
    the prediction writer put them.
    """

    def __init__(self) -> None:
        self.logged: list[tuple[str, list[Path]]] = []

    def _log(self, trainer: pl.Trainer, kind: str, files: list[Path], meta: dict) -> None:
        files = [f for f in dict.fromkeys(files) if f.is_file()]
        if not files:
            return
        for logger in wandb_loggers(trainer):
            if not wandb_online(logger):
                log.info("WandbArtifacts: offline W&B run; %s files not uploaded: %s", kind, files)
                continue
            import wandb

            run = logger.experiment
            artifact = wandb.Artifact(f"{kind}-{run.id}", type=kind, metadata=meta)
            for f in files:
                artifact.add_file(str(f), name=f.name)
            run.log_artifact(artifact, aliases=["latest"])
            self.logged.append((kind, files))

    @rank_zero_only
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        files, meta = [], {}
        for cb in trainer.checkpoint_callbacks:
            for attr in ("best_model_path", "last_model_path"):
                if getattr(cb, attr, ""):
                    files.append(Path(getattr(cb, attr)))
            score = getattr(cb, "best_model_score", None)
            if score is not None:
                meta[f"best {getattr(cb, 'monitor', '')}"] = float(score)
        self._log(trainer, "model", files, meta)

    @rank_zero_only
    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        files = []
        for cb in trainer.callbacks:
            if isinstance(cb, BasePredictionWriter) and hasattr(cb, "output"):
                files.append(Path(cb._path(trainer) if hasattr(cb, "_path") else cb.output))
        self._log(trainer, "predictions", files, {"checkpoint": str(trainer.ckpt_path)})
