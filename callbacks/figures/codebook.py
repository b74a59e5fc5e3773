"""Code-bank usage: counts per code and the rank-frequency curve. BeamVQ's K alternative futures
differ only if many codes are alive (van den Oord et al. 2017, arXiv 1711.00937, on code-bank
collapse)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from beamvq.callbacks.tables import CodeUsage


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
