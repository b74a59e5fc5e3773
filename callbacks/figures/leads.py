"""Metrics by lead time: one panel per per-lead metric (a line per evaluation, e.g. per epoch)
and CSI/POD/SUCR/BIAS by threshold. Forecast skill is judged by how it decays with lead time,
which BeamVQ claims to slow (arXiv 2405.17051: gains largest at long leads)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from beamvq.callbacks.tables import LABELS, LeadTable


def _lead_panel(ax: plt.Axes, name: str, history: list[tuple[str, LeadTable]]) -> None:
    colours = plt.cm.viridis(np.linspace(0.1, 0.9, len(history)))
    for (label, tab), colour in zip(history, colours):
        if name in tab.by_lead:
            ax.plot(tab.leads, tab.by_lead[name], "o-", color=colour, label=label, ms=3)
    ax.set_title(f"{LABELS.get(name, name)} by lead time")
    ax.set_xlabel("lead time (steps)")
    ax.set_xticks(history[-1][1].leads)
    ax.grid(alpha=0.3)
    if name == "spread_skill":
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")


def _threshold_panel(ax: plt.Axes, label: str, table: LeadTable) -> None:
    width = 0.8 / max(1, len(table.by_threshold))
    pos = np.arange(len(table.thresholds))
    for i, (name, values) in enumerate(table.by_threshold.items()):
        ax.bar(pos + i * width, values, width, label=LABELS[name])
    ax.set_xticks(pos + 0.4 - width / 2, table.thresholds)
    ax.set_xlabel("threshold (pooled over leads)")
    ax.set_title(f"scores by threshold ({label})")
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")


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
    for k, name in enumerate(names):
        _lead_panel(axes.flat[k], name, history)
    if len(history) > 1:
        axes.flat[0].legend(fontsize=7, ncol=1 + len(history) // 8)
    if last.thresholds:
        _threshold_panel(axes.flat[len(names)], history[-1][0], last)
    for ax in axes.flat[n_panels:]:
        ax.axis("off")
    fig.suptitle(title)
    return fig
