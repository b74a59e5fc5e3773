"""A GIF of one rollout: the input frames, then truth | forecast | error per lead time, with the
RMSE curve growing lead by lead beside them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
from matplotlib import animation

from beamvq.callbacks.figures.style import (
    ERROR_CMAP,
    FieldStyle,
    Sample,
    bare,
    field_limits,
    rmse,
)


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
        bare(ax)
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
