"""Metric accumulators of the evaluation: pooled over the whole split and over DDP ranks.

Every accumulator keeps *sums* (errors, contingency counts, CRPS weighted by the values behind
it) and divides only in ``compute``, so the result equals the formula of ``beamvq.metrics``
applied to the whole split at once, on one process or many (``torchmetrics`` sums the states
over ranks). The SEVIR protocol (Veillette et al. 2020) pools contingency counts before forming
CSI/POD/SUCR/BIAS; CRPS is the energy form (Gneiting & Raftery 2007); spread/skill follows
Fortuin et al. (2014); latitude-weighted RMSE and ACC follow WeatherBench (Rasp et al. 2020).

``SplitMetrics`` bundles what one split (validation or test) pools, so the module updates and
logs one object per split.

Per variable (WeatherBench convention, one name per channel): with more than one channel the
accumulators also keep per-channel sums, pooled over lead times, and ``compute`` adds
``mse/<name>``, ``rmse/<name>``, ``mae/<name>``, ``lat_rmse/<name>``, ``acc/<name>`` and
``crps/<name>`` (``<name>`` a channel name such as ``z500``), plus scores pooled over channels
in normalized units, each channel's error divided by its training std: ``mse_norm`` (=
mean over channels of ``mse/<name> / std²``), ``rmse_norm``, ``mae_norm``, ``lat_rmse_norm`` and
``crps_norm``. The pooled physical-unit metrics (``mse``, ``lat_rmse``, ``crps``, ...) keep their
names and values; with several variables they mix units (the largest-unit variable dominates).
With one channel only the pooled names are logged (the per-variable ones would repeat them).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics import Metric

from beamvq import metrics

__all__ = [
    "EnsembleMetrics",
    "ForecastMetrics",
    "LatLonMetrics",
    "SplitMetrics",
    "channel_labels",
    "per_variable",
]


def channel_labels(names: Sequence[str] | None, channels: int) -> list[str]:
    """Key-safe channel names (``z500``...): ``names`` when there are ``channels`` of them, else
    ``ch0``, ``ch1``, ...; characters other than letters, digits, ``_ . -`` become ``_``."""
    if names is None or len(names) != channels:
        return [f"ch{c}" for c in range(channels)]
    return [re.sub(r"[^A-Za-z0-9_.-]+", "_", str(n)) or f"ch{c}" for c, n in enumerate(names)]


def per_variable(
    name: str, values: Tensor, names: Sequence[str], std: Tensor | None, power: int
) -> dict[str, Tensor]:
    """``{name/<channel>: value}`` of per-channel ``values (C,)``, and with ``std (C,)`` the
    normalized pool ``{name}_norm`` = mean over channels of ``values / std**power``."""
    out = {f"{name}/{n}": values[c] for c, n in enumerate(names)}
    if std is not None:
        out[f"{name}_norm"] = (values / std.to(values).pow(power)).mean()
    return out


class ForecastMetrics(Metric):
    """Pooled error sums per lead time (+ contingency counts at thresholds), DDP-safe.

    ``channels > 1``: also per-channel error sums pooled over lead times, which ``compute``
    reports per variable (``mse/<name>``...) and, given the training std, in normalized units.
    """

    full_state_update = False

    def __init__(
        self, lead_times: int, thresholds: Sequence[float] = (), channels: int = 1
    ) -> None:
        super().__init__()
        self.thresholds = tuple(float(t) for t in thresholds)
        self.channels = int(channels)
        for name in ("sq_err", "abs_err", "count"):
            self.add_state(name, torch.zeros(lead_times, dtype=torch.float64), dist_reduce_fx="sum")
        for name in ("sq_err_c", "abs_err_c", "count_c"):
            self.add_state(
                name, torch.zeros(self.channels, dtype=torch.float64), dist_reduce_fx="sum"
            )
        self.add_state("rel_l2_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("n_samples", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        n_thr = len(self.thresholds)
        # counts per (lead, threshold): pooled over leads for CSI, kept per lead for CSI-M by lead
        for name in ("hits", "misses", "false_alarms", "correct_negatives"):
            self.add_state(
                name, torch.zeros(lead_times, n_thr, dtype=torch.float64), dist_reduce_fx="sum"
            )

    def update(self, pred: Tensor, target: Tensor) -> None:
        sums = metrics.error_sums(pred, target)
        self.sq_err += sums.sq_err.double()
        self.abs_err += sums.abs_err.double()
        self.count += sums.count.double()
        self.rel_l2_sum += metrics.rel_l2(pred, target).double() * pred.shape[0]
        self.n_samples += pred.shape[0]
        if self.channels > 1:
            diff = pred.double() - target.double()
            self.sq_err_c += diff.square().sum((0, 1, 3, 4))
            self.abs_err_c += diff.abs().sum((0, 1, 3, 4))
            self.count_c += float(diff.numel() // diff.shape[2])
        if self.thresholds:
            c = metrics.contingency_counts(pred, target, self.thresholds, per_lead=True)
            self.hits += c.hits.double()
            self.misses += c.misses.double()
            self.false_alarms += c.false_alarms.double()
            self.correct_negatives += c.correct_negatives.double()

    def compute(
        self, names: Sequence[str] | None = None, std: Tensor | None = None
    ) -> dict[str, Tensor]:
        """Every metric; with ``channels > 1`` also per variable (``names``: the channel names,
        else ``ch0``...) and, with the training ``std (C,)``, the ``*_norm`` pools."""
        mse_lead = self.sq_err / self.count.clamp_min(1)
        mae_lead = self.abs_err / self.count.clamp_min(1)
        out = {
            "mse": self.sq_err.sum() / self.count.sum().clamp_min(1),
            "mae": self.abs_err.sum() / self.count.sum().clamp_min(1),
            "rel_l2": self.rel_l2_sum / self.n_samples.clamp_min(1),
        }
        out["rmse"] = out["mse"].sqrt()
        for t in range(mse_lead.shape[0]):
            out[f"mse_lead{t + 1}"] = mse_lead[t]
            out[f"mae_lead{t + 1}"] = mae_lead[t]
        if self.thresholds:
            per_lead = metrics.Contingency(
                self.hits, self.misses, self.false_alarms, self.correct_negatives
            )
            c = metrics.Contingency(*(f.sum(0) for f in per_lead))
            csi = metrics.csi(c)
            pod, sucr, bias = metrics.pod(c), metrics.sucr(c), metrics.bias(c)
            for i, thr in enumerate(self.thresholds):
                tag = f"{thr:g}"
                out[f"csi_{tag}"] = csi[i]
                out[f"pod_{tag}"] = pod[i]
                out[f"sucr_{tag}"] = sucr[i]
                out[f"bias_{tag}"] = bias[i]
            out["csi_m"] = metrics.csi_m(c)
            csi_m_lead = metrics.csi_m(per_lead)
            for t in range(csi_m_lead.shape[0]):
                out[f"csi_m_lead{t + 1}"] = csi_m_lead[t]
        if self.channels > 1:
            labels = channel_labels(names, self.channels)
            count = self.count_c.clamp_min(1)
            mse_c = self.sq_err_c / count
            out.update(per_variable("mse", mse_c, labels, std, 2))
            out.update(per_variable("mae", self.abs_err_c / count, labels, std, 1))
            out.update(per_variable("rmse", mse_c.sqrt(), labels, None, 1))
            if std is not None:
                out["rmse_norm"] = out["mse_norm"].sqrt()
        return {k: v.float() for k, v in out.items()}


class EnsembleMetrics(Metric):
    """Pooled CRPS and spread/skill per lead time of an M-member ensemble, DDP-safe.

    Per batch the formulas of ``beamvq.metrics`` (``crps_ensemble``, ``spread_skill``) give
    per-lead means; they are pooled as sums weighted by the number of values behind them, so the
    result equals the formula applied to the whole set at once.

    ``channels > 1``: also CRPS per channel pooled over lead times (``crps/<name>``, and
    ``crps_norm`` = mean over channels of CRPS / training std).
    """

    full_state_update = False

    def __init__(self, lead_times: int, n_members: int, channels: int = 1) -> None:
        super().__init__()
        if n_members < 2:
            raise ValueError(f"EnsembleMetrics needs at least two members, got {n_members}")
        self.n_members = int(n_members)
        self.channels = int(channels)
        for name in ("crps_sum", "var_sum", "sq_err_sum", "count"):
            self.add_state(name, torch.zeros(lead_times, dtype=torch.float64), dist_reduce_fx="sum")
        for name in ("crps_sum_c", "count_c"):
            self.add_state(
                name, torch.zeros(self.channels, dtype=torch.float64), dist_reduce_fx="sum"
            )

    def update(self, members: Tensor, target: Tensor) -> None:
        if members.shape[1] != self.n_members:
            raise ValueError(f"expected {self.n_members} members, got {members.shape[1]}")
        n = target.numel() // target.shape[1]  # values behind each per-lead mean
        ss = metrics.spread_skill(members, target)
        self.crps_sum += metrics.crps_ensemble(members, target).double() * n
        self.var_sum += ss.spread.double().square() * n
        self.sq_err_sum += ss.skill.double().square() * n
        self.count += n
        if self.channels > 1:
            # the channel dim in the lead position: per-channel means pooled over lead times
            n_c = target.numel() // target.shape[2]
            crps_c = metrics.crps_ensemble(members.transpose(2, 3), target.transpose(1, 2))
            self.crps_sum_c += crps_c.double() * n_c
            self.count_c += n_c

    def compute(
        self, names: Sequence[str] | None = None, std: Tensor | None = None
    ) -> dict[str, Tensor]:
        factor = math.sqrt((self.n_members + 1) / self.n_members)
        count = self.count.clamp_min(1)
        total = self.count.sum().clamp_min(1)
        spread_lead, skill_lead = (self.var_sum / count).sqrt(), (self.sq_err_sum / count).sqrt()
        spread, skill = (self.var_sum.sum() / total).sqrt(), (self.sq_err_sum.sum() / total).sqrt()
        out = {
            "crps": self.crps_sum.sum() / total,
            "spread": spread,
            "skill": skill,
            "spread_skill": factor * spread / skill,
        }
        crps_lead = self.crps_sum / count
        for t in range(crps_lead.shape[0]):
            out[f"crps_lead{t + 1}"] = crps_lead[t]
            out[f"spread_skill_lead{t + 1}"] = factor * spread_lead[t] / skill_lead[t]
        if self.channels > 1:
            crps_c = self.crps_sum_c / self.count_c.clamp_min(1)
            out.update(per_variable("crps", crps_c, channel_labels(names, self.channels), std, 1))
        return {k: v.float() for k, v in out.items()}


class LatLonMetrics(Metric):
    """Latitude-weighted RMSE and ACC per lead time, pooled over the set (WeatherBench), DDP-safe.

    RMSE: sqrt of the cos(latitude)-weighted squared error pooled over samples, channels and the
    grid; ACC: mean over samples and channels of ``metrics.lat_weighted_acc`` against the
    training-split climatology. ``channels > 1``: also both per channel, pooled over lead times
    (``lat_rmse/<name>``, ``acc/<name>``, and ``lat_rmse_norm`` in units of the training std).
    """

    full_state_update = False

    def __init__(self, lead_times: int, channels: int = 1) -> None:
        super().__init__()
        self.channels = int(channels)
        for name in ("sq_err", "count", "acc_sum", "acc_count"):
            self.add_state(name, torch.zeros(lead_times, dtype=torch.float64), dist_reduce_fx="sum")
        for name in ("sq_err_c", "count_c", "acc_sum_c", "acc_count_c"):
            self.add_state(
                name, torch.zeros(self.channels, dtype=torch.float64), dist_reduce_fx="sum"
            )

    def update(self, pred: Tensor, target: Tensor, lat: Tensor, climatology: Tensor) -> None:
        w = metrics.latitude_weights(lat).to(pred.dtype).view(-1, 1)
        weighted = (pred - target).square() * w
        self.sq_err += weighted.sum((0, 2, 3, 4)).double()
        self.count += float(pred.shape[0] * pred.shape[2] * pred.shape[3] * pred.shape[4])
        acc = metrics.lat_weighted_acc(pred, target, climatology, lat)  # (B, T, C)
        self.acc_sum += acc.sum((0, 2)).double()
        self.acc_count += float(acc.shape[0] * acc.shape[2])
        if self.channels > 1:
            self.sq_err_c += weighted.double().sum((0, 1, 3, 4))
            self.count_c += float(pred.shape[0] * pred.shape[1] * pred.shape[3] * pred.shape[4])
            self.acc_sum_c += acc.double().sum((0, 1))
            self.acc_count_c += float(acc.shape[0] * acc.shape[1])

    def compute(
        self, names: Sequence[str] | None = None, std: Tensor | None = None
    ) -> dict[str, Tensor]:
        rmse_lead = (self.sq_err / self.count.clamp_min(1)).sqrt()
        acc_lead = self.acc_sum / self.acc_count.clamp_min(1)
        out = {
            "lat_rmse": (self.sq_err.sum() / self.count.sum().clamp_min(1)).sqrt(),
            "acc": self.acc_sum.sum() / self.acc_count.sum().clamp_min(1),
        }
        for t in range(rmse_lead.shape[0]):
            out[f"lat_rmse_lead{t + 1}"] = rmse_lead[t]
            out[f"acc_lead{t + 1}"] = acc_lead[t]
        if self.channels > 1:
            labels = channel_labels(names, self.channels)
            lat_mse_c = self.sq_err_c / self.count_c.clamp_min(1)
            out.update(per_variable("lat_rmse", lat_mse_c.sqrt(), labels, None, 1))
            if std is not None:
                out["lat_rmse_norm"] = (lat_mse_c / std.to(lat_mse_c).square()).mean().sqrt()
            out.update(
                per_variable("acc", self.acc_sum_c / self.acc_count_c.clamp_min(1), labels, None, 0)
            )
        return {k: v.float() for k, v in out.items()}


class SplitMetrics(nn.Module):
    """What one evaluation split pools: ``ForecastMetrics`` always, ``LatLonMetrics`` on lat-lon
    grids (when ``update`` is given latitudes), ``EnsembleMetrics`` when ``members > 1``; with
    ``channels > 1`` each also per variable (module docstring)."""

    def __init__(
        self, lead_times: int, thresholds: Sequence[float] = (), members: int = 0, channels: int = 1
    ) -> None:
        super().__init__()
        self.forecast = ForecastMetrics(lead_times, thresholds, channels)
        self.latlon = LatLonMetrics(lead_times, channels)
        self.ensemble = EnsembleMetrics(lead_times, members, channels) if members > 1 else None

    def update(self, pred: Tensor, target: Tensor, lat: Tensor, climatology: Tensor) -> None:
        """Physical forecast and target ``(B, T, C, H, W)``; ``lat`` empty: not a lat-lon grid."""
        self.forecast.update(pred, target)
        if lat.numel():
            self.latlon.update(pred, target, lat, climatology)

    def update_ensemble(self, members: Tensor, target: Tensor) -> None:
        """Physical members ``(B, M, T, C, H, W)`` against the target (needs ``members > 1``)."""
        if self.ensemble is None:
            raise ValueError("SplitMetrics.update_ensemble: built without ensemble members")
        self.ensemble.update(members, target)

    def compute(
        self, latlon: bool, names: Sequence[str] | None = None, std: Tensor | None = None
    ) -> dict[str, Tensor]:
        """Every metric of the split (lat-lon ones when ``latlon``), then reset for the next.

        ``names``: the channel names of the per-variable keys; ``std (C,)``: the training split's
        per-channel std, for the ``*_norm`` pools (``None``: none). Both matter only with more
        than one channel."""
        values = self.forecast.compute(names, std)
        self.forecast.reset()
        if latlon:
            values.update(self.latlon.compute(names, std))
            self.latlon.reset()
        if self.ensemble is not None:
            values.update(self.ensemble.compute(names, std))
            self.ensemble.reset()
        return values


def split_values(
    metrics: SplitMetrics, trainer: Any, lat_weighted: bool, std: Tensor | None
) -> dict[str, Tensor]:
    """A split's pooled metrics; with several channels also per variable, named by the
    datamodule's ``channel_names`` (``val/rmse/z500``) or its ``info().channels``
    (``beamvq.protocols.DataInfo``), and the ``*_norm`` pools in units of the training ``std``."""
    dm = trainer.datamodule if trainer is not None else None
    names = getattr(dm, "channel_names", None)
    if names is None and metrics.forecast.channels > 1 and callable(getattr(dm, "info", None)):
        names = [c.name for c in dm.info().channels]
    return metrics.compute(lat_weighted, names, std)
