"""Forecast figures a researcher reads: panels, ensemble panels and a rollout animation.

At each validation epoch (and at the end of ``test``) the first sample of the first batch is
drawn: its input frames, then truth / forecast / error per lead time (``forecast_panel``); when
the model has a VQ code bank, its ensemble (members, mean, spread, error of the mean;
``ensemble_panel``) — the K alternative futures of BeamVQ (arXiv 2502.18925, stage 2), or the
module's beam-searched ``predict`` members. At the end of ``fit`` the last validation sample
becomes an animated GIF of the rollout (``rollout_animation``).

Every figure is a PNG under ``<default_root_dir>/plots`` (readable without W&B) and, when the
logger is a ``WandbLogger``, a W&B image or video (offline runs keep them in the run folder for
``wandb sync``). Fields are drawn with north/up at the top (``origin="lower"`` when the y
coordinate increases), colour bars name the variable and its units, and every error panel
states its RMSE, so a reader does not have to guess scale or orientation.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from matplotlib import animation  # noqa: E402
from pytorch_lightning.loggers import WandbLogger  # noqa: E402
from pytorch_lightning.utilities import rank_zero_only  # noqa: E402

from beamvq.protocols import ForecastData  # noqa: E402

log = logging.getLogger(__name__)

# errors get a colour map of their own, so they are never mistaken for a diverging field
ERROR_CMAP = "PuOr_r"
SPREAD_CMAP = "magma"


class FieldStyle(NamedTuple):
    """How to draw one channel: its name and units (colour-bar label), image origin and the
    colour map of the field itself (``None``: chosen from the values)."""

    name: str = "field"
    units: str = ""
    origin: str = "lower"
    cmap: str | None = None

    @property
    def label(self) -> str:
        return f"{self.name} [{self.units}]" if self.units else self.name


class Sample(NamedTuple):
    """One sample of one channel (physical units): ``x (T_in, H, W)``, ``y`` and ``pred``
    ``(T, H, W)``, ensemble ``members (M, T, H, W)`` or ``None``."""

    x: np.ndarray
    y: np.ndarray
    pred: np.ndarray
    members: np.ndarray | None


# -- helpers shared by the report callbacks ------------------------------------------------------
def plot_dir(trainer: pl.Trainer, dirpath: str | None) -> Path:
    """``dirpath`` or ``<trainer.default_root_dir>/plots``, created."""
    folder = Path(dirpath) if dirpath else Path(trainer.default_root_dir) / "plots"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def wandb_loggers(trainer: pl.Trainer) -> list[WandbLogger]:
    return [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]


def log_to_wandb(trainer: pl.Trainer, data: Mapping[str, Any]) -> None:
    """Log W&B objects (images, tables, videos) at the trainer's global step, on every
    ``WandbLogger``; ``trainer/global_step`` is the step axis the logger defines for all keys."""
    for logger in wandb_loggers(trainer):
        logger.experiment.log({**data, "trainer/global_step": trainer.global_step})


def wandb_image(path: Path, caption: str | None = None) -> Any:
    import wandb

    return wandb.Image(str(path), caption=caption)


def save_figure(fig: plt.Figure, path: Path, dpi: int) -> Path:
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return path


def field_style(trainer: pl.Trainer, channel: int) -> FieldStyle:
    """Name, units and orientation of ``channel`` from the datamodule's labels
    (``ForecastData.info()``: a channel is one variable at one level, e.g. ``z500``, with the
    attributes of ``z``); generic labels for a datamodule without them."""
    dm = trainer.datamodule
    if not isinstance(dm, ForecastData):
        return FieldStyle(f"channel {channel}", "", "lower")
    info = dm.info()
    if channel < len(info.channels):
        name, attrs = info.channels[channel].name, info.channels[channel].attrs
    else:
        name, attrs = f"channel {channel}", {}
    origin = "lower"
    y = np.asarray(info.y.values)
    if y.size > 1:
        # descending latitude (ERA5: 90 -> -90) is already north-up when drawn from the top
        origin = "lower" if y[-1] > y[0] else "upper"
    return FieldStyle(name, str(attrs.get("units", "")), origin)


def field_limits(*arrays: np.ndarray) -> tuple[float, float, str]:
    """Shared colour limits and a colour map: a diverging one, centred on 0, for fields of both
    signs (vorticity, anomalies), otherwise viridis over the range."""
    lo = float(min(np.nanmin(a) for a in arrays))
    hi = float(max(np.nanmax(a) for a in arrays))
    if lo < 0 < hi and min(-lo, hi) > 0.25 * max(-lo, hi):
        m = max(-lo, hi)
        return -m, m, "RdBu_r"
    if hi <= lo:
        hi = lo + 1.0
    return lo, hi, "viridis"


def rmse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(np.nanmean((a - b) ** 2)))


def _leads(n: int, max_leads: int) -> np.ndarray:
    return np.unique(np.linspace(0, n - 1, min(max_leads, n)).round().astype(int))


def _bare(ax: plt.Axes) -> None:
    ax.set_xticks([])
    ax.set_yticks([])


# -- figures -------------------------------------------------------------------------------------
def forecast_panel(
    sample: Sample, title: str, style: FieldStyle = FieldStyle(), max_leads: int = 5
) -> plt.Figure:
    """Inputs (last frames), then truth / forecast / error at up to ``max_leads`` lead times."""
    x, y, pred = sample.x, sample.y, sample.pred
    leads = _leads(y.shape[0], max_leads)
    n_cols = len(leads)
    inputs = np.arange(max(0, x.shape[0] - n_cols), x.shape[0])
    vmin, vmax, auto_cmap = field_limits(x[inputs], y, pred)
    cmap = style.cmap or auto_cmap
    err = pred - y
    emax = float(np.nanmax(np.abs(err[leads]))) or 1.0
    # rows as tall as the grid's aspect needs (a 32 x 64 lat-lon grid is half as tall)
    row_h = 2.1 * y.shape[-2] / y.shape[-1] + 0.45
    fig, axes = plt.subplots(
        4,
        n_cols,
        figsize=(2.1 * n_cols + 1.4, 4 * row_h + 0.6),
        squeeze=False,
        layout="constrained",
    )
    kw = {"origin": style.origin, "interpolation": "nearest"}
    for j in range(n_cols):
        ax = axes[0, j]
        if j < len(inputs):
            t = inputs[j]
            im = ax.imshow(x[t], vmin=vmin, vmax=vmax, cmap=cmap, **kw)
            ax.set_title(f"input t{t - x.shape[0] + 1:+d}" if t < x.shape[0] - 1 else "input t0")
        else:
            ax.axis("off")
    for j, t in enumerate(leads):
        axes[1, j].imshow(y[t], vmin=vmin, vmax=vmax, cmap=cmap, **kw)
        axes[1, j].set_title(f"truth +{t + 1}")
        im = axes[2, j].imshow(pred[t], vmin=vmin, vmax=vmax, cmap=cmap, **kw)
        axes[2, j].set_title(f"forecast +{t + 1}")
        im_e = axes[3, j].imshow(err[t], vmin=-emax, vmax=emax, cmap=ERROR_CMAP, **kw)
        axes[3, j].set_title(f"error +{t + 1}\nRMSE {rmse(pred[t], y[t]):.3g}", fontsize=9)
    for ax in axes.flat:
        _bare(ax)
    axes[0, 0].set_ylabel("input")
    axes[1, 0].set_ylabel("truth")
    axes[2, 0].set_ylabel("forecast")
    axes[3, 0].set_ylabel("forecast - truth")
    fig.colorbar(im, ax=axes[:3, :].ravel().tolist(), shrink=0.6, label=style.label)
    fig.colorbar(im_e, ax=axes[3, :].ravel().tolist(), shrink=0.9, label="error")
    fig.suptitle(f"{title}\n{style.label}, RMSE over all leads {rmse(pred, y):.3g}")
    return fig


def ensemble_panel(
    sample: Sample,
    title: str,
    style: FieldStyle = FieldStyle(),
    max_leads: int = 3,
    max_members: int = 4,
) -> plt.Figure:
    """Per lead time (rows): truth, the first ``max_members`` members, ensemble mean, spread (std
    over all members) and the error of the mean."""
    if sample.members is None:
        raise ValueError("ensemble_panel: the sample has no ensemble members")
    y, members = sample.y, sample.members
    leads = _leads(y.shape[0], max_leads)
    shown = members[: min(max_members, members.shape[0])]
    mean, spread = members.mean(0), members.std(0)
    vmin, vmax, auto_cmap = field_limits(y, shown, mean)
    cmap = style.cmap or auto_cmap
    err = mean - y
    emax = float(np.nanmax(np.abs(err[leads]))) or 1.0
    smax = float(np.nanmax(spread[leads])) or 1.0
    n_cols = 1 + shown.shape[0] + 3
    fig, axes = plt.subplots(
        len(leads),
        n_cols,
        figsize=(2.0 * n_cols + 1.6, (2.0 * y.shape[-2] / y.shape[-1] + 0.5) * len(leads) + 1.2),
        squeeze=False,
        layout="constrained",
    )
    kw = {"origin": style.origin, "interpolation": "nearest"}
    for r, t in enumerate(leads):
        row = axes[r]
        im = row[0].imshow(y[t], vmin=vmin, vmax=vmax, cmap=cmap, **kw)
        row[0].set_title(f"truth +{t + 1}", fontsize=9)
        for i in range(shown.shape[0]):
            row[1 + i].imshow(shown[i, t], vmin=vmin, vmax=vmax, cmap=cmap, **kw)
            row[1 + i].set_title(
                f"member {i} +{t + 1}\nRMSE {rmse(shown[i, t], y[t]):.3g}", fontsize=9
            )
        j = 1 + shown.shape[0]
        row[j].imshow(mean[t], vmin=vmin, vmax=vmax, cmap=cmap, **kw)
        row[j].set_title(f"mean +{t + 1}\nRMSE {rmse(mean[t], y[t]):.3g}", fontsize=9)
        im_s = row[j + 1].imshow(spread[t], vmin=0, vmax=smax, cmap=SPREAD_CMAP, **kw)
        row[j + 1].set_title(f"spread +{t + 1}\nmean {float(spread[t].mean()):.3g}", fontsize=9)
        im_e = row[j + 2].imshow(err[t], vmin=-emax, vmax=emax, cmap=ERROR_CMAP, **kw)
        row[j + 2].set_title(f"mean - truth +{t + 1}", fontsize=9)
    for ax in axes.flat:
        _bare(ax)
    bottom = {"location": "bottom", "shrink": 0.8, "aspect": 30}
    fig.colorbar(im, ax=axes[-1, : n_cols - 2].tolist(), label=style.label, **bottom)
    fig.colorbar(im_s, ax=axes[-1, n_cols - 2], label="spread (std)", **{**bottom, "aspect": 10})
    fig.colorbar(im_e, ax=axes[-1, n_cols - 1], label="mean - truth", **{**bottom, "aspect": 10})
    spread_all, skill_all = float(np.sqrt((spread**2).mean())), rmse(mean, y)
    m = members.shape[0]
    # the spread/skill ratio with the finite-ensemble factor (Fortuin et al. 2014): 1 is ideal
    ratio = np.sqrt((m + 1) / m) * spread_all / skill_all if skill_all > 0 else float("nan")
    fig.suptitle(
        f"{title}: {m} members, {style.label}\nspread {spread_all:.3g} vs RMSE of the mean "
        f"{skill_all:.3g} (spread/skill {ratio:.2f}; 1 = calibrated, < 1 = over-confident)"
    )
    return fig


def rollout_animation(
    sample: Sample,
    path: Path,
    title: str,
    style: FieldStyle = FieldStyle(),
    fps: int = 2,
    dpi: int = 80,
) -> Path:
    """A GIF of one rollout: the input frames, then truth | forecast | error per lead time, with
    the RMSE curve growing lead by lead beside them."""
    x, y, pred = sample.x, sample.y, sample.pred
    vmin, vmax, auto_cmap = field_limits(x, y, pred)
    cmap = style.cmap or auto_cmap
    err = pred - y
    emax = float(np.nanmax(np.abs(err))) or 1.0
    curve = np.array([rmse(pred[t], y[t]) for t in range(y.shape[0])])
    fig, axes = plt.subplots(
        1, 4, figsize=(12.0, 3.4), layout="constrained", width_ratios=[1, 1, 1, 1.1]
    )
    kw = {"origin": style.origin, "interpolation": "nearest"}
    blank = np.full_like(y[0], np.nan)
    im_t = axes[0].imshow(x[0], vmin=vmin, vmax=vmax, cmap=cmap, **kw)
    im_f = axes[1].imshow(blank, vmin=vmin, vmax=vmax, cmap=cmap, **kw)
    im_e = axes[2].imshow(blank, vmin=-emax, vmax=emax, cmap=ERROR_CMAP, **kw)
    for ax in axes[:3]:
        _bare(ax)
    fig.colorbar(im_f, ax=axes[:2].tolist(), shrink=0.8, label=style.label)
    fig.colorbar(im_e, ax=axes[2], shrink=0.8, label="forecast - truth")
    leads = np.arange(1, y.shape[0] + 1)
    (line,) = axes[3].plot([], [], "o-", color="tab:red", ms=4)
    axes[3].set_xlim(0.5, y.shape[0] + 0.5)
    axes[3].set_ylim(0, 1.1 * float(curve.max()) or 1.0)
    axes[3].set_xlabel("lead time (steps)")
    axes[3].set_title("RMSE by lead time")
    axes[3].set_ylabel(f"RMSE [{style.units}]" if style.units else "RMSE")
    axes[3].grid(alpha=0.3)
    waiting = [
        ax.text(0.5, 0.5, "(inputs)", ha="center", va="center", transform=ax.transAxes)
        for ax in axes[1:3]
    ]
    head = fig.suptitle(title)
    n_in = x.shape[0]

    def draw(i: int) -> list[Any]:
        if i < n_in:
            im_t.set_data(x[i])
            im_f.set_data(blank)
            im_e.set_data(blank)
            step = i - n_in + 1
            axes[0].set_title(f"input t{step:+d}" if step else "input t0")
            axes[1].set_title("forecast")
            axes[2].set_title("error")
            line.set_data([], [])
        else:
            t = i - n_in
            im_t.set_data(y[t])
            im_f.set_data(pred[t])
            im_e.set_data(err[t])
            axes[0].set_title(f"truth +{t + 1}")
            axes[1].set_title(f"forecast +{t + 1}")
            axes[2].set_title(f"error +{t + 1}")
            line.set_data(leads[: t + 1], curve[: t + 1])
        for txt in waiting:
            txt.set_visible(i < n_in)
        head.set_text(f"{title} - frame {i + 1}/{n_in + y.shape[0]}")
        return [im_t, im_f, im_e, line, *waiting]

    anim = animation.FuncAnimation(fig, draw, frames=n_in + y.shape[0], blit=False)
    anim.save(str(path), writer=animation.PillowWriter(fps=fps), dpi=dpi)
    plt.close(fig)
    return path


# -- the callback --------------------------------------------------------------------------------
def ensemble_of(
    pl_module: pl.LightningModule, x: torch.Tensor, members: int | None
) -> torch.Tensor | None:
    """Physical ensemble ``(B, M, T, C, H, W)`` of physical inputs ``x``, or ``None`` without a
    code bank. ``members=None`` draws what ``predict`` writes (the module's ``ensemble_size``,
    beam-searched when it is set up so) and otherwise the ``candidate_k`` code-bank rollouts."""
    model = getattr(pl_module, "model", None)
    if getattr(model, "bottleneck", None) is None:
        return None
    hp = pl_module.hparams
    m = int(members) if members is not None else int(pl_module.ensemble_size)
    with torch.no_grad():
        if members is None and m >= 2:
            return pl_module.ensemble_members(x).fields
        m = m if m >= 2 else int(hp.get("candidate_k", 1))
        if m < 2:
            return None
        fields = model.candidate_rollout(pl_module.normalize(x), m, pl_module.rollout_steps)
        return pl_module.denormalize(fields)


class ForecastImageLogger(pl.Callback):
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
        if channel < 0 or max_leads < 1 or fps < 1 or dpi < 10:
            raise ValueError(
                "ForecastImageLogger: channel must be >= 0, max_leads and fps >= 1, dpi >= 10; "
                f"got channel={channel}, max_leads={max_leads}, fps={fps}, dpi={dpi}"
            )
        if members is not None and members < 2:
            raise ValueError(f"ForecastImageLogger: members must be >= 2 or None, got {members}")
        self.dirpath = dirpath
        self.channel = int(channel)
        self.max_leads = int(max_leads)
        self.ensemble = bool(ensemble)
        self.members = members
        self.animation = bool(animation)
        self.fps = int(fps)
        self.dpi = int(dpi)
        self._sample: Sample | None = None
        self._last_val: Sample | None = None
        self._last_val_epoch: int | None = None
        self.saved: list[Path] = []

    def _capture(self, pl_module: pl.LightningModule, outputs: Any) -> None:
        c = self.channel
        if outputs.x.shape[2] <= c:
            raise ValueError(
                f"ForecastImageLogger: channel={c} but the data have {outputs.x.shape[2]} channel(s)"
            )
        x, y, pred = (
            t[0, :, c].detach().float().cpu().numpy() for t in (outputs.x, outputs.y, outputs.pred)
        )
        members = None
        if self.ensemble:
            ens = ensemble_of(pl_module, outputs.x[:1], self.members)
            if ens is not None:
                members = ens[0, :, :, c].detach().float().cpu().numpy()
        self._sample = Sample(x, y, pred, members)

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if batch_idx == 0 and not trainer.sanity_checking and outputs is not None:
            self._capture(pl_module, outputs)

    def on_test_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if batch_idx == 0 and outputs is not None:
            self._capture(pl_module, outputs)

    def _draw(self, trainer: pl.Trainer, stage: str, epoch: int | None) -> None:
        if self._sample is None:
            return
        sample, self._sample = self._sample, None
        if stage == "val":
            self._last_val, self._last_val_epoch = sample, epoch
        folder = plot_dir(trainer, self.dirpath)
        style = field_style(trainer, self.channel)
        what = "validation" if stage == "val" else "test"
        title = f"{what} sample 0" + ("" if epoch is None else f", epoch {epoch}")
        suffix = "" if epoch is None else f"_epoch{epoch:03d}"
        paths = {
            f"{stage}/forecast": save_figure(
                forecast_panel(sample, title, style, self.max_leads),
                folder / f"{stage}_forecast{suffix}.png",
                self.dpi,
            )
        }
        if sample.members is not None:
            paths[f"{stage}/ensemble"] = save_figure(
                ensemble_panel(sample, title, style),
                folder / f"{stage}_ensemble{suffix}.png",
                self.dpi,
            )
        self.saved.extend(paths.values())
        log_to_wandb(trainer, {k: wandb_image(p, title) for k, p in paths.items()})

    @rank_zero_only
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._draw(trainer, "val", trainer.current_epoch)

    @rank_zero_only
    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._draw(trainer, "test", None)

    @rank_zero_only
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.animation:
            return
        if self._last_val is None:
            log.info("ForecastImageLogger: no validation sample was drawn; no rollout animation")
            return
        path = plot_dir(trainer, self.dirpath) / "val_rollout.gif"
        title = f"validation sample 0, epoch {self._last_val_epoch}"
        rollout_animation(self._last_val, path, title, field_style(trainer, self.channel), self.fps)
        self.saved.append(path)
        if wandb_loggers(trainer):
            import wandb

            log_to_wandb(trainer, {"val/rollout": wandb.Video(str(path), format="gif")})
