"""``ForecastModule``: the one LightningModule that trains every backbone with BeamVQ.

This file is the forecasting path: forward, loss, the train/val/test/predict steps and the
optimizer. Its parts live beside it: metric accumulators in ``beamvq.evaluation``, the non-finite
guard in ``beamvq.faults``, checkpoint identity/compatibility/RNG state in
``beamvq.checkpointing``, normalization in ``beamvq.normalization``, the ensemble's
configuration in ``beamvq.ensemble`` and the optimizer's construction in ``beamvq.optim``.

Loss (BeamVQ, arXiv 2502.18925 and the authors' code): the forecast MSE (over the whole
autoregressive rollout, or its first step) + the bottleneck's commitment loss + optionally
``loss.candidate_weight`` × the mean MSE of the K code-bank candidates against the target, which
trains the decoder to turn every retrieved code into a plausible future. Real windows weigh 1,
pseudo-labelled pool samples weigh what the datamodule says (below 1 by default).

Data arrive in physical units; the module normalizes with the training split's per-channel
statistics and computes every metric on de-normalized fields, pooled over the whole split.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.cli import OptimizerCallable
from torch import Tensor

from beamvq import optim
from beamvq.arguments import check_module_arguments
from beamvq.backbones.base import Backbone
from beamvq.bottleneck import VQBottleneck
from beamvq.checkpointing import CKPT_KEY, check_checkpoint, check_data, restore_state, save_state
from beamvq.ensemble import EnsembleConfig, fit_scorer
from beamvq.evaluation import SplitMetrics, split_values
from beamvq.faults import FaultConfig, FaultGuard, FaultSite, attached_trainer
from beamvq.init_weights import load_weights
from beamvq.losses import Loss, LossConfig, candidate_term
from beamvq.model import VQForecaster
from beamvq.normalization import Normalizer, legacy_keys_pre_hook, upgrade_legacy_keys
from beamvq.optim import LRSchedule, ParamGroup
from beamvq.protocols import Members
from beamvq.selftrain import SearchConfig, search_members

__all__ = ["ForecastModule", "Loss", "LossConfig", "Prediction", "StepOutput"]


class StepOutput(NamedTuple):
    """What validation/test steps return (physical units), e.g. for plotting callbacks."""

    loss: Tensor
    x: Tensor
    y: Tensor
    pred: Tensor


class Prediction(NamedTuple):
    """What ``predict_step`` returns: physical forecast ``(B, T, C, H, W)``, ensemble members
    ``(B, K, T, C, H, W)`` or ``None``, the window indices in the predict split, and the members'
    beam-search scores ``(B, K)`` (best first) when they were beam-searched, else ``None``."""

    forecast: Tensor
    members: Tensor | None
    index: Tensor
    member_scores: Tensor | None = None


class ForecastModule(pl.LightningModule):
    """Train, evaluate and predict any backbone, with or without the VQ bottleneck.

    Args:
        backbone: any ``beamvq.backbones`` class (chosen by ``class_path`` in YAML).
        bottleneck: a bottleneck factory called with the backbone's latent width, or ``None``.
        rollout_steps: autoregressive steps; the horizon is ``rollout_steps × T_out``.
        candidate_k: K, the number of code-bank candidates per forecast (loss, search, ensemble).
        loss: ``LossConfig`` (rollout ``"full"``/``"first"``, candidate term weight).
        optimizer: a ``torch.optim`` class with its arguments (LightningCLI dependency
            injection); ``None``: AdamW at lr 1e-3, weight decay 0 (``beamvq.optim``).
        lr_schedule: ``LRSchedule`` (cosine or constant, its floor, the Surge rule).
        param_groups: ``ParamGroup`` rules giving matching parameters their own lr scale.
        csi_thresholds: thresholds (physical units) for CSI/POD/SUCR/BIAS in validate/test.
        ensemble: ``EnsembleConfig``, the members ``predict`` writes and ``test`` scores.
        faults: ``FaultConfig``, what a NaN/Inf in training does (``beamvq.faults``).
        init_from: a checkpoint whose weights (and normalization) a new fit starts from, e.g.
            BeamVQ's stage 3 fine-tuning the stage-1 base (checked like any checkpoint; the
            optimizer, epochs and pool start afresh; ``--ckpt_path`` resumes instead).
    """

    def __init__(
        self,
        backbone: Backbone,
        bottleneck: Callable[[int], VQBottleneck] | None = None,
        rollout_steps: int = 1,
        candidate_k: int = 4,
        loss: LossConfig = LossConfig(),
        optimizer: OptimizerCallable | None = None,
        lr_schedule: LRSchedule = LRSchedule(),
        param_groups: list[ParamGroup] | None = None,
        csi_thresholds: list[float] | None = None,
        ensemble: EnsembleConfig = EnsembleConfig(),
        faults: FaultConfig = FaultConfig(),
        init_from: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = VQForecaster(backbone, bottleneck)
        # every argument, and the pairs that must agree (K against the code bank), before any work
        check_module_arguments(
            self.model, rollout_steps, candidate_k, loss, ensemble, csi_thresholds
        )
        self.rollout_steps = int(rollout_steps)
        self._candidate_k = int(candidate_k)
        self.loss_config, self.ensemble_config, self.lr_schedule = loss, ensemble, lr_schedule
        self.optimizer_factory = optimizer
        self.param_group_rules = list(param_groups or ())
        optim.param_groups(self.named_parameters(), self.param_group_rules)  # patterns match
        self.normalizer = Normalizer(backbone.out_channels)
        # checkpoints written before the Normalizer hold its buffers at the top level
        self.register_load_state_dict_pre_hook(legacy_keys_pre_hook)
        horizon = self.rollout_steps * backbone.out_steps
        thresholds = tuple(csi_thresholds or ())
        channels = int(backbone.out_channels)  # > 1: also per-variable metrics (beamvq.evaluation)
        val_members = ensemble.members if ensemble.validate else 0
        self.val_metrics = SplitMetrics(horizon, thresholds, val_members, channels)
        self.test_metrics = SplitMetrics(horizon, thresholds, ensemble.members, channels)
        self._scorer_fitted = False
        self._initialized = False
        # lat-lon grids: latitudes (degrees) and the training climatology, set in setup; kept
        # in the checkpoint so predict/test weigh the same way
        self.register_buffer("lat_deg", torch.empty(0))
        self.register_buffer("climatology", torch.empty(0))
        self.guard = FaultGuard(faults)

    # -- normalization and data ------------------------------------------------------------------
    def set_normalization(self, mean: np.ndarray | Tensor, std: np.ndarray | Tensor) -> None:
        self.normalizer.set(mean, std)

    def normalize(self, field: Tensor) -> Tensor:
        return self.normalizer.normalize(field)

    def denormalize(self, field: Tensor) -> Tensor:
        return self.normalizer.denormalize(field)

    def setup(self, stage: str) -> None:
        trainer = attached_trainer(self)
        dm = trainer.datamodule if trainer is not None else None
        if dm is None:
            return
        check_data(self.model, self.rollout_steps, dm)
        # a checkpoint restored after setup overwrites these with its own statistics
        if getattr(dm, "normalization", None) is not None and not self.normalizer.is_set:
            self.set_normalization(dm.normalization.mean, dm.normalization.std)
        lat = getattr(dm, "latitude", None)
        if lat is not None and self.lat_deg.numel() == 0:
            self.lat_deg = torch.as_tensor(np.asarray(lat), dtype=torch.float32)
            self.climatology = torch.as_tensor(np.asarray(dm.climatology), dtype=torch.float32)
        if stage == "fit" and self.hparams.init_from and not self._initialized:
            # before Lightning restores a --ckpt_path: a resumed fit keeps its own weights
            load_weights(self, self.hparams.init_from, trainer)
            self._initialized = True
        if stage in ("test", "predict") and not self._scorer_fitted:
            self._scorer_fitted = fit_scorer(self.ensemble_config.scorer, dm)

    # -- beamvq.protocols.SearchableModel ---------------------------------------------------------
    @property
    def candidate_k(self) -> int:
        """K, the code-bank candidates per forecast step."""
        return self._candidate_k

    @property
    def codebook_size(self) -> int:
        """Codes in the bottleneck's code bank (0 without a bottleneck)."""
        bn = self.model.bottleneck
        return 0 if bn is None else int(bn.codebook_size)

    @property
    def ensemble_size(self) -> int:
        """M, the members of the ``predict`` ensemble (0 or 1: deterministic only)."""
        return int(self.ensemble_config.members)

    def forward(self, x: Tensor) -> Tensor:
        """Physical input ``(B, T_in, C, H, W)`` -> physical rollout ``(B, T, C, H, W)``."""
        return self.denormalize(self.forecast(self.normalize(x), self.rollout_steps))

    def forecast(self, x: Tensor, steps: int) -> Tensor:
        """Deterministic autoregressive forecast ``(B, steps × T_out, C, H, W)`` of a normalized
        input (model space); call in eval mode under ``no_grad`` for inference."""
        return self.model.rollout(x, steps).y

    def search_step_fn(self, k: int | None = None) -> Callable[[Tensor], Tensor]:
        """The K-candidate forecaster that ``beamvq.search.beam_search`` expands.

        Normalized window ``(N, T_in, C, H, W)`` -> normalized candidates
        ``(N, k, T_out, C, H, W)``, candidate 0 the nearest-code forecast; ``k`` defaults to
        ``candidate_k``. Pair it with ``denormalize`` as the search's ``to_physical``. Call it in
        eval mode under ``no_grad`` (retrieval then reads the code bank and never moves it).
        """
        k = int(self.candidate_k if k is None else k)
        if k > 1 and self.model.bottleneck is None:
            raise ValueError(
                f"search_step_fn: k={k} needs a model.bottleneck (code-bank candidates)"
            )
        return functools.partial(self.model.candidates, k=k)

    def code_indices(self, x: Tensor) -> Tensor | None:
        """Nearest-code indices of the latent of a normalized input (``None`` without a code
        bank); reads the code bank without moving it."""
        bn = self.model.bottleneck
        if bn is None:
            return None
        return bn.topk_indices(self.model.backbone.encode(x).z, 1)

    def ensemble_members(self, x: Tensor, members: int | None = None) -> Members:
        """Ensemble members of physical inputs ``x`` (``beamvq.ensemble``): ``members`` of them,
        by default the ``predict`` ensemble (``ensemble.members``, beam-searched when set up so);
        another count gives that many rank-aligned code-bank rollouts."""
        m = int(self.ensemble_size if members is None else members)
        if m < 2:
            raise ValueError(f"ensemble_members needs at least 2 members, got {m}")
        xn = self.normalize(x)
        cfg = self.ensemble_config
        if cfg.beam_width == 0 or members is not None:
            fields = self.model.candidate_rollout(xn, m, self.rollout_steps)
            return Members(self.denormalize(fields), None)
        config = SearchConfig(
            beam_width=int(cfg.beam_width),
            top_k=m,
            candidate_k=self.candidate_k,
            rollout_steps=self.rollout_steps,
        )
        return search_members(
            xn, self.search_step_fn(), cfg.scorer, config, to_physical=self.denormalize
        )

    # -- loss and steps ----------------------------------------------------------------------------
    def compute_loss(self, x: Tensor, y: Tensor, weight: Tensor, train: bool) -> Loss:
        """Loss on normalized ``x, y`` with per-sample ``weight``; ``train`` adds the training-only
        terms (first-step rollout, candidate term, code usage)."""
        steps = self.rollout_steps if (self.loss_config.rollout == "full" or not train) else 1
        out = self.model.rollout(x, steps)
        target = y[:, : out.y.shape[1]]
        per_sample = ((out.y - target) ** 2).flatten(1).mean(1)
        mse = (weight * per_sample).sum() / weight.sum()
        total = mse + out.aux_loss
        parts = {"mse_norm": mse.detach(), "commitment": out.aux_loss.detach()}
        cfg = self.loss_config
        if train and cfg.candidate_weight > 0:
            cand = candidate_term(self.model, x, y, weight, cfg, self.candidate_k, steps)
            total = total + cfg.candidate_weight * cand
            parts[f"candidate_{cfg.candidate_loss}"] = cand.detach()
            bn = self.model.bottleneck
            if isinstance(bn.log_offset_scale, torch.nn.Parameter):
                parts["offset_scale"] = bn.log_offset_scale.detach().exp()
        if train:
            # backbone-specific terms (MoE load balancing, TAU's differential divergence)
            extra = self.model.backbone.extra_loss(out.y, target)
            total = total + extra
            parts["backbone_extra"] = extra.detach()
        if train and out.indices is not None:
            stats = VQBottleneck.usage(out.indices, self.model.bottleneck.codebook_size)
            parts["perplexity"] = stats.perplexity
            parts["codes_used"] = stats.codes_used.float()
        return Loss(total, parts, out.y)

    def training_loss(self, batch: Any) -> Tensor:
        """Scalar training loss of a physical batch (the non-finite guard re-runs it)."""
        x, y = self.normalize(batch.x), self.normalize(batch.y)
        return self.compute_loss(x, y, batch.weight, True).total

    def loss_for_noise_scale(self, batch: Any) -> Tensor:
        """Scalar training loss of a batch (used by the gradient-noise-scale monitor)."""
        return self.training_loss(batch)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        saved = self.guard.start_batch(self.model)
        progress = optim.training_progress(self.trainer)
        self.model.backbone.begin_training_step(self.normalize(batch.y), progress)
        loss = self.compute_loss(
            self.normalize(batch.x), self.normalize(batch.y), batch.weight, True
        )
        bad, local_bad, operand = self.guard.batch_is_bad(self, loss.total)
        if bad:
            return self.guard.bad_batch(self, batch, batch_idx, saved, local_bad, operand)
        self.guard.good_batch()
        bs = batch.x.shape[0]
        self.log("train/loss", loss.total, prog_bar=True, batch_size=bs)
        for name, value in loss.parts.items():
            group = "codebook" if name in ("perplexity", "codes_used") else "train"
            self.log(f"{group}/{name}", value, batch_size=bs)
        for name, value in self.model.backbone.training_log_values().items():
            self.log(name, value, batch_size=bs)
        return loss.total

    def _eval_step(
        self, batch: Any, metrics: SplitMetrics, prefix: str, batch_idx: int
    ) -> StepOutput:
        loss = self.compute_loss(
            self.normalize(batch.x), self.normalize(batch.y), batch.weight, False
        )
        split = "validation" if prefix == "val" else "test"
        self.guard.check_eval_loss(self, loss.total, batch, batch_idx, split)
        pred_phys = self.denormalize(loss.pred)
        metrics.update(pred_phys, batch.y, self.lat_deg, self.climatology)
        self.log(
            f"{prefix}/loss",
            loss.total,
            prog_bar=prefix == "val",
            batch_size=batch.x.shape[0],
            sync_dist=True,
        )
        return StepOutput(loss.total, batch.x, batch.y, pred_phys)

    def validation_step(self, batch: Any, batch_idx: int) -> StepOutput:
        out = self._eval_step(batch, self.val_metrics, "val", batch_idx)
        if self.val_metrics.ensemble is not None:  # rank-aligned members: no search
            members = self.ensemble_members(batch.x, self.ensemble_size).fields
            self.val_metrics.update_ensemble(members, batch.y)
        return out

    def test_step(self, batch: Any, batch_idx: int) -> StepOutput:
        out = self._eval_step(batch, self.test_metrics, "test", batch_idx)
        if self.test_metrics.ensemble is not None:
            self.test_metrics.update_ensemble(self.ensemble_members(batch.x).fields, batch.y)
        return out

    def _split_values(self, metrics: SplitMetrics) -> dict[str, Tensor]:
        """The split's pooled metrics (``beamvq.evaluation.split_values``)."""
        std = self.normalizer.std if self.normalizer.is_set else None
        return split_values(metrics, attached_trainer(self), bool(self.lat_deg.numel()), std)

    def on_validation_epoch_end(self) -> None:
        values = self._split_values(self.val_metrics)
        self.log_dict({f"val/{k}": v for k, v in values.items()})

    def on_test_epoch_end(self) -> None:
        values = self._split_values(self.test_metrics)
        self.log_dict({f"test/{k}": v for k, v in values.items()})

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Prediction:
        forecast = self.denormalize(self.forecast(self.normalize(batch.x), self.rollout_steps))
        if self.ensemble_size < 2:
            return Prediction(forecast, None, batch.index, None)
        members = self.ensemble_members(batch.x)
        return Prediction(forecast, members.fields, batch.index, members.scores)

    # -- the non-finite guard (beamvq.faults) ----------------------------------------------------
    @property
    def skipped_batches(self) -> int:
        """Training batches skipped for a NaN/Inf (``faults.nan_policy: skip``); checkpointed."""
        return self.guard.skipped_batches

    def locate_non_finite(self, batch: Any) -> FaultSite:
        """Where the NaN/Inf of this training batch's loss comes from (``FaultGuard.locate``)."""
        return self.guard.locate(self, batch)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.guard.before_optimizer_step(self, optimizer)

    # quantized layers: the ExMy simulation saturates Inf to the format's largest value, which
    # would hide it from the loss; the guard flags non-finite operands before quantization
    def on_train_start(self) -> None:
        self.guard.install_quant_hooks(self.model)

    def on_train_end(self) -> None:
        self.guard.remove_quant_hooks()

    # -- checkpoints (beamvq.checkpointing) -------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CKPT_KEY] = save_state(self.model, attached_trainer(self), self.skipped_batches)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("state_dict") or {}
        upgrade_legacy_keys(state)
        # the lat-lon buffers' shapes come from the data: size them like the checkpoint's
        for name in ("lat_deg", "climatology"):
            if name in state:
                setattr(self, name, torch.empty_like(state[name]))
        trainer = attached_trainer(self)
        check_checkpoint(checkpoint, self, trainer)
        self.guard.skipped_batches = restore_state(checkpoint, trainer)

    # -- optimisation (beamvq.optim) ---------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        rescale = (
            optim.surge_rule(self.lr_schedule, self.trainer) if self.lr_schedule.surge else None
        )
        experts = optim.expert_groups(self.model, self.trainer, self.lr_schedule.b_noise)
        opt = optim.build_optimizer(
            self.optimizer_factory,
            self.named_parameters(),
            experts + self.param_group_rules,
            rescale,
        )
        if self.lr_schedule.scheduler == "none":
            return opt
        sched = optim.build_scheduler(opt, self.lr_schedule, self.trainer.max_epochs)
        return {"optimizer": opt, "lr_scheduler": sched}
