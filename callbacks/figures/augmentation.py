"""The BeamVQ self-training panel: what each search epoch did (searched, accepted, added, pool
size, score gain), the pool's scores, and pool pseudo-targets beside the truth and the plain
forecast of the same input (BeamVQ, arXiv 2405.17051, stage 3)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import matplotlib.pyplot as plt
import numpy as np

from beamvq.callbacks.figures.style import ERROR_CMAP, FieldStyle, bare, field_limits, rmse
from beamvq.callbacks.tables import EpochRecord

N_COLS = 7


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


def _epoch_axis(ax: plt.Axes, epochs: list[str]) -> None:
    ax.set_xticks(np.arange(len(epochs)), epochs)
    ax.set_xlim(-0.6, len(epochs) - 0.4)
    ax.set_xlabel("epoch")


def _history_row(
    fig: plt.Figure, grid: Any, history: Sequence[EpochRecord], pool_scores: np.ndarray
) -> None:
    epochs = [str(r.epoch) for r in history]
    pos = np.arange(len(epochs))
    ax = fig.add_subplot(grid[0, 0:3])
    w = 0.22
    ax.bar(pos - w, [r.searched for r in history], w, label="searched", color="0.7")
    ax.bar(pos, [r.accepted for r in history], w, label="accepted", color="tab:orange")
    ax.bar(pos + w, [r.added for r in history], w, label="added", color="tab:green")
    ax.plot(pos, [r.pool_size for r in history], "ko-", label="pool size", zorder=3)
    _epoch_axis(ax, epochs)
    ax.set_title("samples per search epoch")
    ax.legend(fontsize=7, loc="upper left")
    _gain_panel(fig.add_subplot(grid[0, 3:5]), history)
    ax = fig.add_subplot(grid[0, 5:7])
    if pool_scores.size:
        ax.hist(pool_scores, bins=min(20, max(3, pool_scores.size)), color="tab:purple")
    ax.set_xlabel("ensemble score (higher is better)")
    ax.set_title(f"scores of the {pool_scores.size} pool samples")


def _gain_panel(ax: plt.Axes, history: Sequence[EpochRecord]) -> None:
    pos = np.arange(len(history))
    gains = np.array([r.score_gain for r in history], dtype=float)
    ax.bar(pos, gains, 0.5, color=["tab:green" if g > 0 else "tab:red" for g in gains])
    for p, g in zip(pos, gains):
        ax.annotate(f"{g:.2g}", (p, g), ha="center", va="bottom" if g >= 0 else "top", fontsize=8)
    ax.axhline(0, color="k", lw=0.8)
    _epoch_axis(ax, [str(r.epoch) for r in history])
    ax.set_title("score gain of the ensemble over the plain\nforecast (mean over searched inputs)")


def _truth_panels(
    fig: plt.Figure, axes: list[plt.Axes], ex: PoolExample, lead: int, limits: tuple, kw: dict
) -> None:
    """Truth and the errors of the pseudo-target and of the forecast (columns 1, 4, 5)."""
    assert ex.truth is not None
    vmin, vmax, cmap = limits
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


def _example_row(
    fig: plt.Figure, grid: Any, row: int, ex: PoolExample, lead: int, style: FieldStyle
) -> None:
    kw = {"origin": style.origin, "interpolation": "nearest"}
    has_truth = ex.truth is not None
    fields = [ex.last_input, ex.pseudo, ex.plain] + ([ex.truth] if has_truth else [])
    limits = field_limits(*fields)
    vmin, vmax, cmap = limits
    axes = [fig.add_subplot(grid[row, j]) for j in range(N_COLS)]
    axes[0].imshow(ex.last_input, vmin=vmin, vmax=vmax, cmap=cmap, **kw)
    axes[0].set_title(f"pool #{ex.age} (score {ex.score:.3g})\nlast input", fontsize=9)
    axes[2].imshow(ex.pseudo, vmin=vmin, vmax=vmax, cmap=cmap, **kw)
    im = axes[3].imshow(ex.plain, vmin=vmin, vmax=vmax, cmap=cmap, **kw)
    if has_truth:
        _truth_panels(fig, axes, ex, lead, limits, kw)
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
        bare(a)


def augmentation_figure(
    history: Sequence[EpochRecord],
    examples: Sequence[PoolExample],
    lead: int,
    pool_scores: np.ndarray,
    title: str,
    style: FieldStyle = FieldStyle(),
) -> plt.Figure:
    """Top: searched/accepted/added and pool size per epoch, score gain per epoch, the pool's
    score distribution. Below, one row per example at lead ``lead``: last input, truth,
    pseudo-target, plain forecast, their errors, and what the search changed (pseudo - forecast).
    """
    fig = plt.figure(figsize=(15.0, 3.2 + 2.2 * len(examples)), layout="constrained")
    grid = fig.add_gridspec(1 + len(examples), N_COLS, height_ratios=[1.4] + [1.0] * len(examples))
    _history_row(fig, grid, history, pool_scores)
    for row, ex in enumerate(examples, start=1):
        _example_row(fig, grid, row, ex, lead, style)
    fig.suptitle(title)
    return fig
