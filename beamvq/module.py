"""``ForecastModule``: the one LightningModule that trains every backbone with BeamVQ.

Loss (BeamVQ, arXiv 2502.18925 and the authors' code): the forecast MSE (over the whole
autoregressive rollout, or its first step) + the bottleneck's commitment loss + optionally
``candidate_loss_weight`` × the mean MSE of the K code-bank candidates against the target, which
trains the decoder to turn every retrieved code into a plausible future. Real windows weigh 1,
pseudo-labelled pool samples weigh what the datamodule says (below 1 by default).

Data arrive in physical units; the module normalizes with per-channel statistics of the training
split, held in buffers so they travel in the checkpoint, and computes every metric on
de-normalized fields. Metric sums are pooled over the whole evaluation set (and over DDP ranks)
before dividing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
import pytorch_lightning as pl
import torch
from torch import Tensor
from torchmetrics import Metric

from beamvq import metrics
from beamvq.backbones.base import Backbone
from beamvq.bottleneck import VQBottleneck
from beamvq.model import VQForecaster

log = logging.getLogger(__name__)


class StepOutput(NamedTuple):
    """What validation/test steps return (physical units), e.g. for plotting callbacks."""

    loss: Tensor
    x: Tensor
    y: Tensor
    pred: Tensor


class Prediction(NamedTuple):
    """What ``predict_step`` returns: physical forecast ``(B, T, C, H, W)``, ensemble members
    ``(B, K, T, C, H, W)`` or ``None``, and the window indices in the predict split."""

    forecast: Tensor
    members: Tensor | None
    index: Tensor


class ForecastMetrics(Metric):
    """Pooled error sums per lead time (+ contingency counts at thresholds), DDP-safe."""

    full_state_update = False

    def __init__(self, lead_times: int, thresholds: Sequence[float] = ()) -> None:
        super().__init__()
        self.thresholds = tuple(float(t) for t in thresholds)
        for name in ("sq_err", "abs_err", "count"):
            self.add_state(name, torch.zeros(lead_times, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("rel_l2_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("n_samples", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        n_thr = len(self.thresholds)
        for name in ("hits", "misses", "false_alarms", "correct_negatives"):
            self.add_state(name, torch.zeros(n_thr, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, pred: Tensor, target: Tensor) -> None:
        sums = metrics.error_sums(pred, target)
        self.sq_err += sums.sq_err.double()
        self.abs_err += sums.abs_err.double()
        self.count += sums.count.double()
        self.rel_l2_sum += metrics.rel_l2(pred, target).double() * pred.shape[0]
        self.n_samples += pred.shape[0]
        if self.thresholds:
            c = metrics.contingency_counts(pred, target, self.thresholds)
            self.hits += c.hits.double()
            self.misses += c.misses.double()
            self.false_alarms += c.false_alarms.double()
            self.correct_negatives += c.correct_negatives.double()

    def compute(self) -> dict[str, Tensor]:
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
            c = metrics.Contingency(self.hits, self.misses, self.false_alarms, self.correct_negatives)
            csi = metrics.csi(c)
            for i, thr in enumerate(self.thresholds):
                tag = f"{thr:g}"
                out[f"csi_{tag}"] = csi[i]
                out[f"pod_{tag}"] = metrics.pod(c)[i]
                out[f"sucr_{tag}"] = metrics.sucr(c)[i]
                out[f"bias_{tag}"] = metrics.bias(c)[i]
            out["csi_m"] = torch.nanmean(csi)
        return {k: v.float() for k, v in out.items()}


class ForecastModule(pl.LightningModule):
    """Train, evaluate and predict any backbone, with or without the VQ bottleneck.

    Args:
        backbone: any ``beamvq.backbones`` class (chosen by ``class_path`` in YAML).
        bottleneck: a bottleneck factory called with the backbone's latent width, or ``None``.
        rollout_steps: autoregressive steps; the horizon is ``rollout_steps × T_out``.
        rollout_loss: ``"full"`` (MSE over the whole rollout) or ``"first"`` (first step only;
            the rollout is still used for evaluation).
        lr, weight_decay: AdamW settings.
        scheduler: ``"cosine"`` (per epoch, to ``max_epochs``) or ``"none"``.
        candidate_k: K, the number of code-bank candidates per forecast.
        candidate_loss_weight: weight of the mean candidate MSE term (0 turns it off).
        csi_thresholds: thresholds (physical units) for CSI/POD/SUCR/BIAS in validate/test.
        predict_members: ensemble members written by ``predict`` (0: deterministic only).
    """

    def __init__(
        self,
        backbone: Backbone,
        bottleneck: Callable[[int], VQBottleneck] | None = None,
        rollout_steps: int = 1,
        rollout_loss: str = "full",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        scheduler: str = "cosine",
        candidate_k: int = 4,
        candidate_loss_weight: float = 0.0,
        csi_thresholds: list[float] | None = None,
        predict_members: int = 0,
    ) -> None:
        super().__init__()
        if rollout_loss not in ("full", "first"):
            raise ValueError(f"model.rollout_loss must be 'full' or 'first', got {rollout_loss!r}")
        if scheduler not in ("cosine", "none"):
            raise ValueError(f"model.scheduler must be 'cosine' or 'none', got {scheduler!r}")
        if rollout_steps < 1 or candidate_k < 1 or predict_members < 0:
            raise ValueError(
                "model.rollout_steps and model.candidate_k must be >= 1 and predict_members >= 0; "
                f"got {rollout_steps}, {candidate_k}, {predict_members}"
            )
        if (candidate_loss_weight > 0 or predict_members > 1) and bottleneck is None:
            raise ValueError(
                "model.candidate_loss_weight > 0 and model.predict_members > 1 need a "
                "model.bottleneck (the candidates come from its code bank)"
            )
        self.save_hyperparameters()
        self.model = VQForecaster(backbone, bottleneck)
        self.rollout_steps = int(rollout_steps)
        c = backbone.out_channels
        self.register_buffer("norm_mean", torch.zeros(c))
        self.register_buffer("norm_std", torch.ones(c))
        self.register_buffer("norm_ready", torch.zeros((), dtype=torch.bool))
        horizon = self.rollout_steps * backbone.out_steps
        thresholds = tuple(csi_thresholds or ())
        self.val_metrics = ForecastMetrics(horizon, thresholds)
        self.test_metrics = ForecastMetrics(horizon, thresholds)

    # -- normalization -------------------------------------------------------------------------
    def set_normalization(self, mean: np.ndarray | Tensor, std: np.ndarray | Tensor) -> None:
        mean_t = torch.as_tensor(np.asarray(mean), dtype=torch.float32).reshape(-1)
        std_t = torch.as_tensor(np.asarray(std), dtype=torch.float32).reshape(-1)
        if mean_t.numel() != self.norm_mean.numel():
            raise ValueError(
                f"normalization has {mean_t.numel()} channels but the backbone outputs "
                f"{self.norm_mean.numel()} (backbone out_channels vs data.variables)"
            )
        self.norm_mean.copy_(mean_t)
        self.norm_std.copy_(std_t)
        self.norm_ready.fill_(True)

    def normalize(self, field: Tensor) -> Tensor:
        return (field - self.norm_mean[:, None, None]) / self.norm_std[:, None, None]

    def denormalize(self, field: Tensor) -> Tensor:
        return field * self.norm_std[:, None, None] + self.norm_mean[:, None, None]

    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule if self._trainer is not None else None
        if dm is None:
            return
        self.check_data(dm)
        # a checkpoint restored after setup overwrites these with its own statistics
        if getattr(dm, "normalization", None) is not None and not bool(self.norm_ready):
            self.set_normalization(dm.normalization.mean, dm.normalization.std)

    def check_data(self, dm: Any) -> None:
        """Fail before any work when the data and the model disagree on shapes."""
        bb = self.model.backbone
        expected = {
            "in_steps": bb.in_steps, "out_steps": bb.out_steps, "rollout_steps": self.rollout_steps,
        }
        for name, want in expected.items():
            have = getattr(dm, name, want)
            if have != want:
                raise ValueError(
                    f"data.{name}={have} but the model expects {want} "
                    f"(model.backbone.init_args / model.{name} must match the data)"
                )
        n_channels = getattr(dm, "num_channels", bb.in_channels)
        if n_channels != bb.in_channels or n_channels != bb.out_channels:
            raise ValueError(
                f"the data has {n_channels} channel(s) but the backbone takes in_channels="
                f"{bb.in_channels}, out_channels={bb.out_channels}"
            )
        grid = getattr(dm, "grid", None)
        if grid is not None:
            bb.check_grid(*grid)

    # -- steps ---------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        """Physical input ``(B, T_in, C, H, W)`` -> physical rollout ``(B, T, C, H, W)``."""
        return self.denormalize(self.model.rollout(self.normalize(x), self.rollout_steps).y)

    def compute_loss(self, x: Tensor, y: Tensor, weight: Tensor, train: bool) -> tuple[Tensor, dict[str, Tensor], Tensor]:
        """Loss on normalized ``x, y``; returns (loss, parts to log, normalized prediction)."""
        steps = self.rollout_steps if (self.hparams.rollout_loss == "full" or not train) else 1
        out = self.model.rollout(x, steps)
        target = y[:, : out.y.shape[1]]
        per_sample = ((out.y - target) ** 2).flatten(1).mean(1)
        mse = (weight * per_sample).sum() / weight.sum()
        loss = mse + out.aux_loss
        parts = {"mse_norm": mse.detach(), "commitment": out.aux_loss.detach()}
        if train and self.hparams.candidate_loss_weight > 0:
            t_out = self.model.backbone.out_steps
            cands = self.model.candidates(x, self.hparams.candidate_k)
            cand_per_sample = ((cands - y[:, None, :t_out]) ** 2).flatten(2).mean(2).mean(1)
            cand = (weight * cand_per_sample).sum() / weight.sum()
            loss = loss + self.hparams.candidate_loss_weight * cand
            parts["candidate_mse"] = cand.detach()
        if train and out.indices is not None:
            stats = VQBottleneck.usage(out.indices, self.model.bottleneck.codebook_size)
            parts["perplexity"] = stats.perplexity
            parts["codes_used"] = stats.codes_used.float()
        return loss, parts, out.y

    def loss_for_noise_scale(self, batch: Any) -> Tensor:
        """Scalar training loss of a batch (used by the gradient-noise-scale monitor)."""
        loss, _, _ = self.compute_loss(self.normalize(batch.x), self.normalize(batch.y), batch.weight, True)
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss, parts, _ = self.compute_loss(self.normalize(batch.x), self.normalize(batch.y), batch.weight, True)
        bs = batch.x.shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        for name, value in parts.items():
            group = "codebook" if name in ("perplexity", "codes_used") else "train"
            self.log(f"{group}/{name}", value, batch_size=bs)
        return loss

    def _eval_step(self, batch: Any, metric: ForecastMetrics, prefix: str) -> StepOutput:
        x, y = self.normalize(batch.x), self.normalize(batch.y)
        loss, _, pred = self.compute_loss(x, y, batch.weight, False)
        pred_phys = self.denormalize(pred)
        metric.update(pred_phys, batch.y)
        self.log(f"{prefix}/loss", loss, prog_bar=prefix == "val", batch_size=batch.x.shape[0], sync_dist=True)
        return StepOutput(loss, batch.x, batch.y, pred_phys)

    def validation_step(self, batch: Any, batch_idx: int) -> StepOutput:
        return self._eval_step(batch, self.val_metrics, "val")

    def test_step(self, batch: Any, batch_idx: int) -> StepOutput:
        return self._eval_step(batch, self.test_metrics, "test")

    def _log_metrics(self, metric: ForecastMetrics, prefix: str) -> None:
        values = metric.compute()
        self.log_dict({f"{prefix}/{k}": v for k, v in values.items()})
        metric.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_metrics(self.val_metrics, "val")

    def on_test_epoch_end(self) -> None:
        self._log_metrics(self.test_metrics, "test")

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Prediction:
        x = self.normalize(batch.x)
        forecast = self.denormalize(self.model.rollout(x, self.rollout_steps).y)
        members = None
        k = self.hparams.predict_members
        if k > 1:
            members = self.denormalize(self.model.candidate_rollout(x, k, self.rollout_steps))
        return Prediction(forecast, members, batch.index)

    # -- optimisation ----------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(
            self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay
        )
        if self.hparams.scheduler == "none":
            return opt
        epochs = max(1, int(self.trainer.max_epochs or 1))
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}
