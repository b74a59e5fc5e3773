"""How fields are drawn: labels and units, orientation, shared colour limits, saving.

Fields are drawn with north/up at the top (``origin="lower"`` when the y coordinate increases),
colour bars name the variable and its units, errors get a colour map of their own, and every
error panel states its RMSE, so a reader does not have to guess scale or orientation.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from beamvq.protocols import DataInfo  # noqa: E402

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


def field_style(info: DataInfo | None, channel: int) -> FieldStyle:
    """Name, units and orientation of ``channel`` from the data's labels
    (``ForecastData.info()``: a channel is one variable at one level, e.g. ``z500``, with the
    attributes of ``z``); generic labels without them (``info=None``)."""
    if info is None:
        return FieldStyle(f"channel {channel}", "", "lower")
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


def lead_indices(n: int, max_leads: int) -> np.ndarray:
    """Up to ``max_leads`` lead indices spread evenly over ``n``, first and last included."""
    return np.unique(np.linspace(0, n - 1, min(max_leads, n)).round().astype(int))


def bare(ax: plt.Axes) -> None:
    ax.set_xticks([])
    ax.set_yticks([])


def plot_dir(default_root_dir: str | Path, dirpath: str | None) -> Path:
    """``dirpath`` or ``<default_root_dir>/plots``, created."""
    folder = Path(dirpath) if dirpath else Path(default_root_dir) / "plots"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def save_figure(fig: plt.Figure, path: Path, dpi: int) -> Path:
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return path
