"""Forecast figures: a forecast panel (inputs, then truth / forecast / error per lead time) and an
ensemble panel (members, mean, spread, error of the mean).

The ensemble is BeamVQ's K alternative futures (arXiv 2502.18925, stage 2) or the module's
beam-searched ``predict`` members; its spread/skill ratio carries the finite-ensemble factor of
Fortuin et al. 2014 (1 is calibrated).
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from beamvq.callbacks.figures.style import (
    ERROR_CMAP,
    SPREAD_CMAP,
    FieldStyle,
    Sample,
    bare,
    field_limits,
    lead_indices,
    rmse,
)


def forecast_panel(
    sample: Sample, title: str, style: FieldStyle = FieldStyle(), max_leads: int = 5
) -> plt.Figure:
    """Inputs (last frames), then truth / forecast / error at up to ``max_leads`` lead times."""
    x, y, pred = sample.x, sample.y, sample.pred
    leads = lead_indices(y.shape[0], max_leads)
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
        bare(ax)
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
    leads = lead_indices(y.shape[0], max_leads)
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
        bare(ax)
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
