"""The numbers the reports show, as pure functions: metrics by lead time and threshold, code-bank
usage, and the record of one BeamVQ search epoch.

Per-lead metrics are the keys ``ForecastModule`` logs (``val/mse_lead{t}``, ``test/crps_lead{t}``,
...), per-threshold ones ``csi_{thr}``, ``pod_``, ``sucr_``, ``bias_`` (SEVIR protocol,
Veillette et al. 2020), per-variable ones ``{metric}/{variable}`` (``test/rmse/z500``, the
WeatherBench convention; logged with more than one channel). Code-bank usage follows van den Oord et al. 2017 (arXiv 1711.00937):
perplexity of the nearest-code distribution and the fraction of codes never used.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np

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
# per-variable metrics in the order of the table's columns (``beamvq.evaluation``)
VARIABLE_METRICS = ("rmse", "mse", "mae", "lat_rmse", "acc", "crps")
VARIABLE_LABELS = {
    "rmse": "RMSE",
    "mse": "MSE",
    "mae": "MAE",
    "lat_rmse": "lat. RMSE",
    "acc": "ACC",
    "crps": "CRPS",
}


class LeadTable(NamedTuple):
    """Metrics of one evaluation: ``by_lead[name]`` over ``leads`` (1, 2, ...) and
    ``by_threshold[name]`` over ``thresholds`` (the threshold tags of the keys, e.g. ``"74"``)."""

    leads: list[int]
    by_lead: dict[str, list[float]]
    thresholds: list[str]
    by_threshold: dict[str, list[float]]


def _collect(
    metrics: Mapping[str, Any], prefix: str
) -> tuple[dict[str, dict[int, float]], dict[str, dict[str, float]]]:
    """``{name: {lead: value}}`` and ``{name: {threshold tag: value}}`` of ``prefix``'s keys."""
    per_lead: dict[str, dict[int, float]] = {}
    per_thr: dict[str, dict[str, float]] = {}
    lead_re = re.compile(rf"^{re.escape(prefix)}/(.+)_lead(\d+)$")
    thr_re = re.compile(rf"^{re.escape(prefix)}/({'|'.join(THRESHOLD_METRICS)})_([-+0-9.eE]+)$")
    for key, value in metrics.items():
        if m := lead_re.match(key):
            per_lead.setdefault(m.group(1), {})[int(m.group(2))] = float(value)
        elif m := thr_re.match(key):
            per_thr.setdefault(m.group(1), {})[m.group(2)] = float(value)
    return per_lead, per_thr


def _series(per: dict[str, dict[Any, float]], names: list[str], at: list[Any]) -> dict:
    """``{name: [value at each of at]}`` (NaN where a key is missing), in the order of ``names``."""
    return {n: [per[n].get(t, float("nan")) for t in at] for n in names}


def lead_table(metrics: Mapping[str, Any], prefix: str) -> LeadTable:
    """Collect ``{prefix}/{name}_lead{t}`` and ``{prefix}/{csi|pod|sucr|bias}_{thr}`` keys."""
    per_lead, per_thr = _collect(metrics, prefix)
    leads = sorted({t for series in per_lead.values() for t in series})
    thresholds = sorted({t for series in per_thr.values() for t in series}, key=float)
    order = [n for n in LABELS if n in per_lead] + sorted(set(per_lead) - set(LABELS))
    kinds = [n for n in THRESHOLD_METRICS if n in per_thr]
    return LeadTable(
        leads, _series(per_lead, order, leads), thresholds, _series(per_thr, kinds, thresholds)
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


# the row of the pools over variables in normalized units (``{prefix}/{metric}_norm``)
NORMALIZED_ROW = "all (normalized)"


class VariableTable(NamedTuple):
    """Per-variable metrics of one evaluation: ``by_variable[metric]`` over ``variables`` (in the
    order logged, i.e. the channel order), pooled over lead times, physical units; the last
    row, ``NORMALIZED_ROW``, pools the variables in units of each one's training std."""

    variables: list[str]
    by_variable: dict[str, list[float]]


def variable_table(metrics: Mapping[str, Any], prefix: str) -> VariableTable:
    """Collect ``{prefix}/{metric}/{variable}`` keys (``VARIABLE_METRICS``); empty with one
    channel, which has no per-variable keys."""
    per: dict[str, dict[str, float]] = {}
    variables: list[str] = []
    var_re = re.compile(rf"^{re.escape(prefix)}/({'|'.join(VARIABLE_METRICS)})/(.+)$")
    for key, value in metrics.items():
        if m := var_re.match(key):
            per.setdefault(m.group(1), {})[m.group(2)] = float(value)
            if m.group(2) not in variables:
                variables.append(m.group(2))
    if variables:
        for n in VARIABLE_METRICS:
            if f"{prefix}/{n}_norm" in metrics:
                per.setdefault(n, {})[NORMALIZED_ROW] = float(metrics[f"{prefix}/{n}_norm"])
        if any(NORMALIZED_ROW in series for series in per.values()):
            variables.append(NORMALIZED_ROW)
    names = [n for n in VARIABLE_METRICS if n in per]
    return VariableTable(variables, _series(per, names, variables))


def markdown_variable_table(table: VariableTable) -> str:
    """The table as Markdown: one row per variable, one column per metric ("" when empty)."""
    if not table.variables:
        return ""
    names = list(table.by_variable)
    lines = [
        "| variable | " + " | ".join(VARIABLE_LABELS.get(n, n) for n in names) + " |",
        "|---|" + "---:|" * len(names),
    ]
    for i, v in enumerate(table.variables):
        lines.append(
            f"| {v} | " + " | ".join(f"{table.by_variable[n][i]:.4g}" for n in names) + " |"
        )
    return "\n".join(lines) + "\n"


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


class EpochRecord(NamedTuple):
    """What one search epoch of ``BeamSearchAugmentation`` did (the numbers it logs)."""

    epoch: int
    searched: int
    accepted: int
    added: int
    pool_size: int
    score_gain: float
    search_seconds: float
    train_seconds: float

    def metrics(self) -> dict[str, float]:
        """The ``augment/*`` values logged for this epoch."""
        ratio = self.search_to_train
        return {
            "augment/num_added": float(self.added),
            "augment/num_accepted": float(self.accepted),
            "augment/pool_size": float(self.pool_size),
            "augment/score_gain": self.score_gain,
            "augment/search_seconds": self.search_seconds,
            "augment/train_seconds": self.train_seconds,
            "augment/search_to_train": ratio,
        }

    @property
    def search_to_train(self) -> float:
        """Search time over the epoch's training time (NaN without a training time)."""
        t = self.train_seconds
        return self.search_seconds / t if t > 0 else float("nan")

    def summary(self) -> str:
        """One log line."""
        return (
            f"BeamSearchAugmentation epoch {self.epoch}: searched {self.searched}, accepted "
            f"{self.accepted}, added {self.added}, pool {self.pool_size}, gain "
            f"{self.score_gain:.4g}, search {self.search_seconds:.2f}s = "
            f"{self.search_to_train:.3f} x the training epoch"
        )
