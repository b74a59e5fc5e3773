"""``ForecastModule``: the one LightningModule that trains every backbone with BeamVQ.

Loss (BeamVQ, arXiv 2502.18925 and the authors' code): the forecast MSE (over the whole
autoregressive rollout, or its first step) + the bottleneck's commitment loss + optionally
``candidate_loss_weight`` × the mean MSE of the K code-bank candidates against the target, which
trains the decoder to turn every retrieved code into a plausible future. Real windows weigh 1,
pseudo-labelled pool samples weigh what the datamodule says (below 1 by default).

Data arrive in physical units; the module normalizes with per-channel statistics of the training
split, held in buffers so they travel in the checkpoint, and computes every metric on
de-normalized fields. Metric sums are pooled over the whole evaluation set (and over DDP ranks)
before dividing: MSE/MAE per lead time, and at ``csi_thresholds`` the contingency counts (SEVIR
protocol, Veillette et al. 2020) from which CSI/POD/SUCR/BIAS, CSI-M and CSI-M per lead follow.

Ensembles (BeamVQ stage 2, arXiv 2502.18925): with ``predict_members = M > 1`` the module turns
the deterministic forecaster into a probabilistic one. Members are either the M rank-aligned
code-bank rollouts (member i uses its i-th nearest code at every step), or, with
``predict_beam_width > 0``, the M best trajectories of a beam search (``beamvq.search``) scored
by a reference-free ``predict_scorer`` (the inputs of ``predict`` have no recorded future).
``predict`` writes them beside the deterministic forecast; ``test`` also pools CRPS per lead
(energy form, Gneiting & Raftery 2007) and spread/skill (Fortuin et al. 2014) over the set.

Reliability (docs/reliability.md): a NaN/Inf training loss, a NaN/Inf gradient, or NaN/Inf
entering a quantized layer (where the ExMy simulation would saturate an Inf to a finite value) is
reported with the global step and the first layer that produced it, then stops the run
(``nan_policy="stop"``, a ``FloatingPointError``) or skips the batch (``"skip"``: no optimizer
step, the code bank and other buffers rolled back, counted in ``train/skipped_batches``). The
decision is taken on every DDP rank together. Checkpoints carry the model's and the data's
identity (backbone, shapes, variables, grid): loading one into a model or data it does not fit
stops with a ``ValueError`` naming the difference. During ``fit`` they also carry every rank's
random-number state, restored on resume so that a resumed CPU run ends bit-identical to an
uninterrupted one.
"""

from __future__ import annotations

import functools
import logging
import math
import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import pytorch_lightning as pl
import torch
import torch.distributed as dist
from pytorch_lightning.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten
from torchmetrics import Metric

from beamvq import metrics, search
from beamvq.backbones.base import Backbone
from beamvq.bottleneck import VQBottleneck
from beamvq.model import VQForecaster
from beamvq.protocols import Members
from beamvq.quant.layers import QUANT_CLASSES
from beamvq.tuning import resolve_learning_rate

log = logging.getLogger(__name__)

NAN_POLICIES = ("stop", "skip")
# checkpoint key of what beamvq adds: model/data identity, RNG states, fault counters
CKPT_KEY = "beamvq"
_QUANT_TYPES = tuple(set(QUANT_CLASSES.values()))
_OPERANDS = ("x", "w", "dy")
_SHARDED_STRATEGIES = (FSDPStrategy, DeepSpeedStrategy, ModelParallelStrategy)


def class_path(obj: object) -> str:
    """``module.QualName`` of ``obj``'s class."""
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def collect_rng_state() -> dict[str, Any]:
    """The random-number states of this process: torch (CPU, CUDA if started), NumPy, Python.

    Only tensors and plain Python values, so a checkpoint holding them still loads with
    ``torch.load(weights_only=True)`` (the default of torch >= 2.6).
    """
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": str(name),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Set the states ``collect_rng_state`` returned."""
    torch.set_rng_state(state["torch"])
    npy = state["numpy"]
    keys = npy["keys"].numpy().astype(np.uint32)
    np.random.set_state((npy["name"], keys, npy["pos"], npy["has_gauss"], npy["gauss"]))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _quant_hook(flags: Tensor) -> Callable[..., None]:
    """Forward hook of a quantized layer: flag non-finite X, W (now) and dY (in backward)."""

    def flag_dy(grad: Tensor) -> None:
        flags[2] |= ~torch.isfinite(grad).all()

    def hook(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> None:
        with torch.no_grad():
            flags[0] |= ~torch.isfinite(args[0]).all()
            flags[1] |= ~torch.isfinite(module.weight).all()
        if isinstance(output, Tensor) and output.requires_grad:
            output.register_hook(flag_dy)

    return hook


def _has_non_finite(value: Any) -> bool:
    leaves, _ = tree_flatten(value)
    return any(
        isinstance(t, Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all())
        for t in leaves
    )


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


class FaultSite(NamedTuple):
    """Where a NaN/Inf comes from: ``kind`` is ``"data"``, ``"parameter"``, ``"buffer"``,
    ``"layer"``, ``"loss"`` or ``"unknown"``; ``description`` says it in words."""

    kind: str
    description: str


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
        if self.thresholds:
            c = metrics.contingency_counts(pred, target, self.thresholds, per_lead=True)
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
        return {k: v.float() for k, v in out.items()}


class EnsembleMetrics(Metric):
    """Pooled CRPS and spread/skill per lead time of an M-member ensemble, DDP-safe.

    Per batch the formulas of ``beamvq.metrics`` (``crps_ensemble``, ``spread_skill``) give
    per-lead means; they are pooled as sums weighted by the number of values behind them, so the
    result equals the formula applied to the whole set at once.
    """

    full_state_update = False

    def __init__(self, lead_times: int, n_members: int) -> None:
        super().__init__()
        if n_members < 2:
            raise ValueError(f"EnsembleMetrics needs at least two members, got {n_members}")
        self.n_members = int(n_members)
        for name in ("crps_sum", "var_sum", "sq_err_sum", "count"):
            self.add_state(name, torch.zeros(lead_times, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, members: Tensor, target: Tensor) -> None:
        if members.shape[1] != self.n_members:
            raise ValueError(f"expected {self.n_members} members, got {members.shape[1]}")
        n = target.numel() // target.shape[1]  # values behind each per-lead mean
        ss = metrics.spread_skill(members, target)
        self.crps_sum += metrics.crps_ensemble(members, target).double() * n
        self.var_sum += ss.spread.double().square() * n
        self.sq_err_sum += ss.skill.double().square() * n
        self.count += n

    def compute(self) -> dict[str, Tensor]:
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
        return {k: v.float() for k, v in out.items()}


class LatLonMetrics(Metric):
    """Latitude-weighted RMSE and ACC per lead time, pooled over the set (WeatherBench), DDP-safe.

    RMSE: sqrt of the cos(latitude)-weighted squared error pooled over samples, channels and the
    grid; ACC: mean over samples and channels of ``metrics.lat_weighted_acc`` against the
    training-split climatology.
    """

    full_state_update = False

    def __init__(self, lead_times: int) -> None:
        super().__init__()
        for name in ("sq_err", "count", "acc_sum", "acc_count"):
            self.add_state(name, torch.zeros(lead_times, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, pred: Tensor, target: Tensor, lat: Tensor, climatology: Tensor) -> None:
        w = metrics.latitude_weights(lat).to(pred.dtype).view(-1, 1)
        self.sq_err += ((pred - target).square() * w).sum((0, 2, 3, 4)).double()
        self.count += float(pred.shape[0] * pred.shape[2] * pred.shape[3] * pred.shape[4])
        acc = metrics.lat_weighted_acc(pred, target, climatology, lat)  # (B, T, C)
        self.acc_sum += acc.sum((0, 2)).double()
        self.acc_count += float(acc.shape[0] * acc.shape[2])

    def compute(self) -> dict[str, Tensor]:
        rmse_lead = (self.sq_err / self.count.clamp_min(1)).sqrt()
        acc_lead = self.acc_sum / self.acc_count.clamp_min(1)
        out = {
            "lat_rmse": (self.sq_err.sum() / self.count.sum().clamp_min(1)).sqrt(),
            "acc": self.acc_sum.sum() / self.acc_count.sum().clamp_min(1),
        }
        for t in range(rmse_lead.shape[0]):
            out[f"lat_rmse_lead{t + 1}"] = rmse_lead[t]
            out[f"acc_lead{t + 1}"] = acc_lead[t]
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
        predict_members: ensemble members M written by ``predict`` and scored (CRPS, spread/skill)
            by ``test`` (0 or 1: deterministic only).
        predict_beam_width: 0: members are the M rank-aligned code-bank rollouts; > 0: the M best
            trajectories of a beam search of this width over the rollout, expanding each beam
            into ``candidate_k`` code-bank candidates, scored by ``predict_scorer``.
        predict_scorer: a reference-free ``beamvq.metrics.Scorer`` (e.g. ``SpectrumScorer``,
            ``NonNegativityScorer``) for the beam-searched members; scorers with a ``fit`` are
            fitted on training-split targets of the datamodule before predict/test.
        lr_reference_batch_size, lr_b_noise: when given, ``lr`` is the learning rate tuned at
            ``lr_reference_batch_size`` and the optimizer uses the Surge rule's rate for the
            actual global batch (arXiv 2405.14578; ``beamvq.tuning``), logged at start.
        nan_policy: what a NaN/Inf loss, gradient or quantized-layer operand does in training:
            ``"stop"`` raises ``FloatingPointError`` naming the step and the layer; ``"skip"``
            skips the batch (no optimizer step, buffers such as the code bank rolled back) with
            a warning, and counts it in ``train/skipped_batches``.
        nan_max_consecutive_skips: with ``"skip"``, this many skipped batches in a row stop the
            run (the fault is then not a rare batch).
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
        predict_beam_width: int = 0,
        predict_scorer: metrics.Scorer | None = None,
        lr_reference_batch_size: int | None = None,
        lr_b_noise: float | None = None,
        nan_policy: str = "stop",
        nan_max_consecutive_skips: int = 20,
    ) -> None:
        super().__init__()
        if nan_policy not in NAN_POLICIES:
            raise ValueError(f"model.nan_policy must be one of {NAN_POLICIES}, got {nan_policy!r}")
        if nan_max_consecutive_skips < 1:
            raise ValueError(
                f"model.nan_max_consecutive_skips must be >= 1, got {nan_max_consecutive_skips}"
            )
        if (lr_reference_batch_size is None) != (lr_b_noise is None):
            raise ValueError(
                "model.lr_reference_batch_size and model.lr_b_noise go together (the Surge rule "
                "needs the reference batch size of model.lr and the gradient noise scale)"
            )
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
        self._check_predict_search(
            predict_members,
            predict_beam_width,
            predict_scorer,
            candidate_k,
            rollout_steps,
            bottleneck is not None,
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
        self.test_ensemble_metrics = (
            EnsembleMetrics(horizon, predict_members) if predict_members > 1 else None
        )
        self.predict_scorer = predict_scorer
        self._predict_scorer_fitted = False
        # lat-lon grids: latitudes (degrees) and the training climatology, set in setup; kept
        # in the checkpoint so predict/test weigh the same way
        self.register_buffer("lat_deg", torch.empty(0))
        self.register_buffer("climatology", torch.empty(0))
        self.val_latlon = LatLonMetrics(horizon)
        self.test_latlon = LatLonMetrics(horizon)
        # numerical-fault bookkeeping (see the module docstring); the count travels in checkpoints
        self.skipped_batches = 0
        self._consecutive_skips = 0
        self._good_batches = 0  # finite batches since the last optimizer step
        self._quant_flags: dict[str, Tensor] = {}
        self._quant_hooks: list[Any] = []

    @staticmethod
    def _check_predict_search(
        members: int,
        beam_width: int,
        scorer: metrics.Scorer | None,
        k: int,
        steps: int,
        has_bottleneck: bool,
    ) -> None:
        if beam_width < 0:
            raise ValueError(f"model.predict_beam_width must be >= 0, got {beam_width}")
        if beam_width == 0:
            if scorer is not None:
                raise ValueError(
                    "model.predict_scorer is only used by the beam search: set "
                    "model.predict_beam_width > 0 or drop model.predict_scorer"
                )
            return
        if scorer is None:
            raise ValueError("model.predict_beam_width > 0 needs a model.predict_scorer")
        if getattr(scorer, "requires_reference", False):
            raise ValueError(
                f"model.predict_scorer: {type(scorer).__name__} needs the truth, which predict "
                "does not have; use a reference-free scorer (e.g. SpectrumScorer, TKEScorer, "
                "ConservationScorer, NonNegativityScorer)"
            )
        if not has_bottleneck or k < 2:
            raise ValueError(
                "model.predict_beam_width > 0 needs a model.bottleneck and model.candidate_k >= 2 "
                "(the beams expand into code-bank candidates)"
            )
        # the last step keeps the best M of (beams alive) x K trajectories
        final = search.final_trajectories(k, beam_width, steps)
        if not 1 <= members <= final:
            raise ValueError(
                f"model.predict_members={members} must be in [1, {final}] with "
                f"predict_beam_width={beam_width}, candidate_k={k}, rollout_steps={steps}"
            )

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
        lat = getattr(dm, "latitude", None)
        if lat is not None and self.lat_deg.numel() == 0:
            self.lat_deg = torch.as_tensor(np.asarray(lat), dtype=torch.float32)
            self.climatology = torch.as_tensor(np.asarray(dm.climatology), dtype=torch.float32)
        if stage in ("test", "predict"):
            self.fit_predict_scorer(dm)

    # -- checkpoints: identity, mismatches, RNG state -------------------------------------------
    def identity(self) -> dict[str, Any]:
        """What a checkpoint of this model must match: backbone class and shapes, bottleneck.

        ``rollout_steps`` is not part of it: a model trained on one step may forecast several.
        """
        bb, bn = self.model.backbone, self.model.bottleneck
        return {
            "backbone": class_path(bb),
            "in_steps": int(bb.in_steps),
            "out_steps": int(bb.out_steps),
            "in_channels": int(bb.in_channels),
            "out_channels": int(bb.out_channels),
            "latent_dim": int(bb.latent_dim),
            "bottleneck": None if bn is None else class_path(bn),
            "codebook_shape": None if bn is None else list(bn.codebook.shape),
        }

    @staticmethod
    def data_identity(dm: Any) -> dict[str, Any]:
        """What a checkpoint records of the data it was trained on (class, channels, grid)."""
        out: dict[str, Any] = {"datamodule": type(dm).__qualname__}
        names = getattr(dm, "channel_names", None)
        if names is not None:
            out["variables"] = [str(n) for n in names]
        grid = getattr(dm, "grid", None)
        if grid is not None:
            out["grid"] = [int(g) for g in grid]
        return out

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        dm = self._trainer.datamodule if self._trainer is not None else None
        extra: dict[str, Any] = {
            "model": self.identity(),
            "data": None if dm is None else self.data_identity(dm),
            "skipped_batches": self.skipped_batches,
        }
        if self._trainer is not None and self._trainer.state.fn == "fit":
            # every rank's stream (Lightning calls this hook on all ranks; rank 0 writes)
            states = [collect_rng_state()]
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                states = [None] * dist.get_world_size()
                dist.all_gather_object(states, collect_rng_state())
            extra["rng"] = states
        checkpoint[CKPT_KEY] = extra

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # the lat-lon buffers' shapes come from the data: size them like the checkpoint's
        state = checkpoint.get("state_dict", {})
        for name in ("lat_deg", "climatology"):
            if name in state:
                setattr(self, name, torch.empty_like(state[name]))
        self.check_checkpoint(checkpoint)
        extra = checkpoint.get(CKPT_KEY) or {}
        self.skipped_batches = int(extra.get("skipped_batches", 0))
        trainer = self._trainer
        states = extra.get("rng")
        if trainer is not None and trainer.state.fn == "fit" and states:
            rank = trainer.global_rank
            if len(states) != trainer.world_size:
                log.warning(
                    "the checkpoint holds the random-number states of %d rank(s), this run has "
                    "%d: the resumed run draws other random numbers than an uninterrupted one",
                    len(states),
                    trainer.world_size,
                )
            restore_rng_state(states[rank % len(states)])

    def check_checkpoint(self, checkpoint: Mapping[str, Any]) -> None:
        """Raise ``ValueError`` naming every way ``checkpoint`` does not fit this model and data.

        Compares the recorded model identity (backbone class, steps, channels, latent width,
        code bank), the weights' names and shapes, and the data the checkpoint was trained on
        (variables, grid, and for ``fit`` the datamodule class that owns the augmented pool)
        against this model and the trainer's datamodule; the message also lists the backbone's
        and bottleneck's constructor arguments that differ, when both sides hold them.
        """
        problems: list[str] = []
        extra = checkpoint.get(CKPT_KEY) or {}
        saved_id = extra.get("model")
        if saved_id:
            mine = self.identity()
            for key in mine:
                if key in saved_id and saved_id[key] != mine[key]:
                    problems.append(f"{key}: checkpoint {saved_id[key]}, this model {mine[key]}")
        strategy = self._trainer.strategy if self._trainer is not None else None
        # sharding strategies hold sharded (or not yet materialized) weights at this point
        if not isinstance(strategy, _SHARDED_STRATEGIES):
            problems += self._weight_differences(checkpoint.get("state_dict") or {})
        dm = self._trainer.datamodule if self._trainer is not None else None
        saved_data = extra.get("data")
        if dm is not None and saved_data:
            mine_data = self.data_identity(dm)
            for key, label in (("variables", "data variables"), ("grid", "data grid (y, x)")):
                if key in saved_data and key in mine_data and saved_data[key] != mine_data[key]:
                    problems.append(
                        f"{label}: checkpoint {saved_data[key]}, this data {mine_data[key]}"
                    )
            fitting = self._trainer.state.fn == "fit"
            if fitting and saved_data.get("datamodule") not in (None, mine_data["datamodule"]):
                problems.append(
                    f"datamodule: the checkpoint's state (augmented pool) was saved by "
                    f"{saved_data['datamodule']}, this run uses {mine_data['datamodule']}, which "
                    "Lightning would not restore it into"
                )
        if problems:
            # constructor arguments explain a structural difference; alone (dropout, EMA decay)
            # they are legitimate changes between fit and predict and are not errors
            hints = self._init_arg_differences(checkpoint.get("hyper_parameters") or {})
            ckpt = getattr(self._trainer, "ckpt_path", None) if self._trainer is not None else None
            where = f"checkpoint {ckpt}" if ckpt else "the checkpoint"
            raise ValueError(
                f"{where} does not fit this model/data:\n  - "
                + "\n  - ".join(problems)
                + (
                    "\nconstructor arguments that differ:\n  - " + "\n  - ".join(hints)
                    if hints
                    else ""
                )
                + "\nUse the configuration the checkpoint was trained with (the run's config.yaml; "
                "its hyper-parameters are stored in the checkpoint) or train a new model."
            )

    def _init_arg_differences(self, saved_hparams: Mapping[str, Any]) -> list[str]:
        """Backbone/bottleneck constructor arguments that differ (both sides as configuration)."""
        out = []
        for part in ("backbone", "bottleneck"):
            saved, mine = saved_hparams.get(part), self.hparams.get(part)
            if not (isinstance(saved, Mapping) and isinstance(mine, Mapping)):
                continue
            saved_args, mine_args = saved.get("init_args") or {}, mine.get("init_args") or {}
            for key in sorted(set(saved_args) | set(mine_args)):
                if saved_args.get(key) != mine_args.get(key):
                    out.append(
                        f"model.{part}.init_args.{key}: checkpoint {saved_args.get(key)!r}, "
                        f"this model {mine_args.get(key)!r}"
                    )
        return out

    def _weight_differences(self, saved_state: Mapping[str, Any], limit: int = 5) -> list[str]:
        """Weights whose shapes differ, and (under strict loading) missing or unexpected ones."""
        mine = self.state_dict()
        shape = [
            f"weight {k}: checkpoint {tuple(v.shape)}, this model {tuple(mine[k].shape)}"
            for k, v in saved_state.items()
            if k in mine and isinstance(v, Tensor) and tuple(v.shape) != tuple(mine[k].shape)
        ]
        out = shape[:limit] + (
            [f"... {len(shape) - limit} more weights"] if len(shape) > limit else []
        )
        if self.strict_loading:
            missing = [k for k in mine if k not in saved_state]
            unexpected = [k for k in saved_state if k not in mine]
            if missing:
                out.append(
                    f"weights missing from the checkpoint: {missing[:limit]} ({len(missing)})"
                )
            if unexpected:
                out.append(
                    f"weights this model does not have: {unexpected[:limit]} ({len(unexpected)})"
                )
        return out

    def fit_predict_scorer(self, dm: Any, max_windows: int = 256) -> None:
        """Fit ``predict_scorer`` (if it has a ``fit``) once, on training-split targets of ``dm``."""
        fit = getattr(self.predict_scorer, "fit", None)
        if not callable(fit) or self._predict_scorer_fitted:
            return
        if not hasattr(dm, "training_windows"):
            raise ValueError(
                f"model.predict_scorer {type(self.predict_scorer).__name__} must be fitted on "
                f"training data, but the datamodule {type(dm).__name__} has no training_windows()"
            )
        _, _, y = dm.training_windows(max_windows=max_windows, seed=0)
        fit(y)
        self._predict_scorer_fitted = True

    def check_data(self, dm: Any) -> None:
        """Fail before any work when the data and the model disagree on shapes."""
        bb = self.model.backbone
        expected = {
            "in_steps": bb.in_steps,
            "out_steps": bb.out_steps,
            "rollout_steps": self.rollout_steps,
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

    def search_step_fn(self, k: int | None = None) -> Callable[[Tensor], Tensor]:
        """The K-candidate forecaster that ``beamvq.search.beam_search`` expands.

        Normalized window ``(N, T_in, C, H, W)`` -> normalized candidates
        ``(N, k, T_out, C, H, W)``, candidate 0 the nearest-code forecast; ``k`` defaults to
        ``candidate_k``. Pair it with ``denormalize`` as the search's ``to_physical``. Call it in
        eval mode under ``no_grad`` (retrieval then reads the code bank and never moves it).
        """
        k = int(self.hparams.candidate_k if k is None else k)
        if k > 1 and self.model.bottleneck is None:
            raise ValueError(
                f"search_step_fn: k={k} needs a model.bottleneck (code-bank candidates)"
            )
        return functools.partial(self.model.candidates, k=k)

    # -- beamvq.protocols.SearchableModel ---------------------------------------------------------
    @property
    def candidate_k(self) -> int:
        """K, the code-bank candidates per forecast step."""
        return int(self.hparams.candidate_k)

    @property
    def codebook_size(self) -> int:
        """Codes in the bottleneck's code bank (0 without a bottleneck)."""
        bn = self.model.bottleneck
        return 0 if bn is None else int(bn.codebook_size)

    def forecast(self, x: Tensor, steps: int) -> Tensor:
        """Deterministic autoregressive forecast ``(B, steps × T_out, C, H, W)`` of a normalized
        input (model space); call in eval mode under ``no_grad`` for inference."""
        return self.model.rollout(x, steps).y

    def code_indices(self, x: Tensor) -> Tensor | None:
        """Nearest-code indices of the latent of a normalized input (``None`` without a code
        bank); reads the code bank without moving it."""
        bn = self.model.bottleneck
        if bn is None:
            return None
        return bn.topk_indices(self.model.backbone.encode(x).z, 1)

    def ensemble_members(self, x: Tensor, members: int | None = None) -> Members:
        """Ensemble members of physical inputs ``x`` (see the class doc): ``members`` of them, by
        default the ``predict`` ensemble (``predict_members``, beam-searched when set up so);
        another count gives that many rank-aligned code-bank rollouts."""
        m = int(self.hparams.predict_members if members is None else members)
        if m < 2:
            raise ValueError(f"ensemble_members needs at least 2 members, got {m}")
        xn = self.normalize(x)
        if self.hparams.predict_beam_width == 0 or members is not None:
            fields = self.model.candidate_rollout(xn, m, self.rollout_steps)
            return Members(self.denormalize(fields), None)
        res = search.beam_search(
            self.search_step_fn(),
            xn,
            self.predict_scorer,
            rollout_steps=self.rollout_steps,
            beam_width=int(self.hparams.predict_beam_width),
            top_k=m,
            to_physical=self.denormalize,
        )
        return Members(self.denormalize(res.trajectories), res.scores)

    def compute_loss(
        self, x: Tensor, y: Tensor, weight: Tensor, train: bool
    ) -> tuple[Tensor, dict[str, Tensor], Tensor]:
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
        loss, _, _ = self.compute_loss(
            self.normalize(batch.x), self.normalize(batch.y), batch.weight, True
        )
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        # buffers (code bank EMA, BatchNorm statistics) move in the forward: keep them so a bad
        # batch can be rolled back and diagnosed from the state it started from
        saved = self._snapshot_buffers()
        self._reset_quant_flags(("x", "w"))
        loss, parts, _ = self.compute_loss(
            self.normalize(batch.x), self.normalize(batch.y), batch.weight, True
        )
        operand = self._flagged_operand(("x", "w"))
        local_bad = not bool(torch.isfinite(loss)) or operand is not None
        if self._any_rank(local_bad):
            return self._skip_or_stop(batch, batch_idx, saved, local_bad, operand)
        self._good_batches += 1
        bs = batch.x.shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        for name, value in parts.items():
            group = "codebook" if name in ("perplexity", "codes_used") else "train"
            self.log(f"{group}/{name}", value, batch_size=bs)
        return loss

    # -- numerical faults ------------------------------------------------------------------------
    def _any_rank(self, decision: bool) -> bool:
        """``decision`` on any DDP rank (all ranks must skip or stop together)."""
        if self._trainer is None:
            return decision
        return bool(self._trainer.strategy.reduce_boolean_decision(decision, all=False))

    def _snapshot_buffers(self) -> list[Tensor]:
        return [b.detach().clone() for b in self.model.buffers()]

    def _restore_buffers(self, saved: list[Tensor]) -> None:
        with torch.no_grad():
            for buf, value in zip(self.model.buffers(), saved):
                buf.copy_(value)

    def _where(self, batch_idx: int | None = None) -> str:
        batch = "" if batch_idx is None else f", batch {batch_idx}"
        return f"global step {self.global_step} (epoch {self.current_epoch}{batch})"

    def locate_non_finite(self, batch: Any) -> FaultSite:
        """Where the NaN/Inf of this training batch's loss comes from.

        In this order: the batch itself, a parameter, a buffer (code bank, normalization), else
        the first layer (in execution order) whose output is not finite, found by re-running the
        training forward with forward hooks on every submodule; buffers and the random-number
        state are restored afterwards, so the diagnosis changes nothing. Every DDP rank must call
        it together (the code bank's forward synchronizes over ranks).
        """
        found: list[str] = []

        def hook_for(name: str) -> Callable[..., None]:
            def hook(module: nn.Module, args: Any, output: Any) -> None:
                if not found and _has_non_finite(output):
                    found.append(f"{name} ({type(module).__name__})")

            return hook

        handles = [
            m.register_forward_hook(hook_for(name))
            for name, m in self.model.named_modules(prefix="model")
            if name != "model"
        ]
        saved = self._snapshot_buffers()
        devices = [torch.cuda.current_device()] if self.device.type == "cuda" else []
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=devices):
                loss, _, _ = self.compute_loss(
                    self.normalize(batch.x), self.normalize(batch.y), batch.weight, True
                )
        finally:
            for h in handles:
                h.remove()
            self._restore_buffers(saved)
        for name in ("x", "y", "weight"):
            t = getattr(batch, name, None)
            if isinstance(t, Tensor) and _has_non_finite(t):
                return FaultSite(
                    "data", f"the batch's {name} holds NaN/Inf (a data problem, not the model's)"
                )
        for name, p in self.named_parameters():
            if _has_non_finite(p):
                return FaultSite("parameter", f"parameter {name} is NaN/Inf")
        for name, b in self.model.named_buffers(prefix="model"):
            if _has_non_finite(b):
                return FaultSite("buffer", f"buffer {name} is NaN/Inf")
        if found:
            return FaultSite("layer", f"layer {found[0]} is the first to output NaN/Inf")
        if bool(torch.isfinite(loss)):
            return FaultSite(
                "unknown", "the loss is finite when recomputed (a non-deterministic fault)"
            )
        return FaultSite("loss", "every layer's output is finite: the loss itself overflowed")

    def _skip_or_stop(
        self,
        batch: Any,
        batch_idx: int,
        saved: list[Tensor],
        local_bad: bool,
        operand: str | None,
    ) -> Tensor | None:
        """Handle a NaN/Inf training batch (on this or another rank) by the ``nan_policy``."""
        self._restore_buffers(saved)
        site = self.locate_non_finite(batch)  # every rank: the diagnosis is collective
        what, cause = "NaN/Inf training loss", site.description
        if operand is not None and site.kind not in ("data", "parameter", "buffer"):
            what = "NaN/Inf in the training forward"
            cause = f"{operand} (quantization would have saturated it to a finite value)"
        elif not local_bad:
            cause = "on another DDP rank"
        self._fault(f"{what} at {self._where(batch_idx)}: {cause}")
        if self._trainer is None or self._trainer.world_size == 1:
            return None  # Lightning skips backward and the optimizer step
        # DDP cannot skip a backward on some ranks only: a zero loss through every parameter
        # keeps the gradient all-reduce in step and adds nothing to the accumulated gradients
        return sum(
            (p.sum() * 0.0 for p in self.parameters() if p.requires_grad),
            self.norm_mean.new_zeros(()),
        )

    def _fault(self, message: str) -> None:
        """Stop (``nan_policy="stop"``) or count and warn about a skipped batch."""
        if self.hparams.nan_policy == "stop":
            raise FloatingPointError(
                f"{message}. Stopping (model.nan_policy: stop; set model.nan_policy: skip to "
                "skip such batches)"
            )
        self.skipped_batches += 1
        self._consecutive_skips += 1
        limit = int(self.hparams.nan_max_consecutive_skips)
        if self._consecutive_skips >= limit:
            raise FloatingPointError(
                f"{message}. Stopping: {self._consecutive_skips} batches in a row were skipped "
                f"(model.nan_max_consecutive_skips={limit})"
            )
        log.warning("%s; batch skipped (%d skipped so far)", message, self.skipped_batches)
        self.log("train/skipped_batches", float(self.skipped_batches), on_step=True, on_epoch=False)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        good, self._good_batches = self._good_batches, 0
        # dY flags gather over the micro-batches of an accumulation window
        operand = self._flagged_operand(("dy",))
        self._reset_quant_flags(("dy",))
        if good == 0:
            # every batch since the last step was skipped: no step at all (AdamW leaves
            # parameters without gradients alone; zero gradients would still move them)
            optimizer.zero_grad(set_to_none=True)
            return
        # under a GradScaler (16-mixed) Inf gradients are expected: the scaler skips those steps
        if getattr(self.trainer.precision_plugin, "scaler", None) is not None:
            return
        local_bad = operand is not None
        if self._quant_flags:
            # quantized-layer flags are per rank (before the gradient all-reduce)
            local_bad = self._any_rank(local_bad)
        # gradients are already all-reduced: every rank finds the same parameter
        bad_param = self._non_finite_gradient()
        if not local_bad and bad_param is None:
            self._consecutive_skips = 0
            return
        if bad_param is not None:
            cause = f"parameter {bad_param} (layer {bad_param.rpartition('.')[0] or bad_param})"
        elif operand is not None:
            cause = f"{operand} (quantization would have saturated it to a finite value)"
        else:
            cause = "in a quantized layer's gradient on another DDP rank"
        self._fault(f"NaN/Inf gradient at {self._where()}: {cause}")
        optimizer.zero_grad(set_to_none=True)  # "skip": AdamW leaves parameters without gradients

    def _non_finite_gradient(self) -> str | None:
        """Name of the first parameter with a NaN/Inf gradient, or None (one sync when finite)."""
        named = [(n, p.grad) for n, p in self.named_parameters() if p.grad is not None]
        if not named:
            return None
        grads = [g for _, g in named]
        total_norm = getattr(torch.nn.utils, "get_total_norm", None)
        if total_norm is not None:
            norm = total_norm(grads, error_if_nonfinite=False)
        else:
            norm = torch.linalg.vector_norm(
                torch.stack([torch.linalg.vector_norm(g) for g in grads])
            )
        if bool(torch.isfinite(norm)):
            return None
        # the norm can overflow with finite gradients: name a parameter only if one is NaN/Inf
        return next((n for n, g in named if _has_non_finite(g)), None)

    # quantized layers: the ExMy simulation saturates Inf to the format's largest value, which
    # would hide it from the loss; flag non-finite operands before quantization instead
    def on_train_start(self) -> None:
        self._install_quant_hooks()

    def on_train_end(self) -> None:
        for h in self._quant_hooks:
            h.remove()
        self._quant_hooks, self._quant_flags = [], {}

    def _install_quant_hooks(self) -> None:
        if self._quant_hooks:
            return
        for name, layer in self.model.named_modules(prefix="model"):
            if not isinstance(layer, _QUANT_TYPES):
                continue
            flags = torch.zeros(len(_OPERANDS), dtype=torch.bool, device=layer.weight.device)
            self._quant_flags[name] = flags
            self._quant_hooks.append(layer.register_forward_hook(_quant_hook(flags)))
        if self._quant_flags:
            log.info(
                "NaN/Inf checks on the operands of %d quantized layers", len(self._quant_flags)
            )

    def _reset_quant_flags(self, operands: tuple[str, ...]) -> None:
        cols = [_OPERANDS.index(o) for o in operands]
        for flags in self._quant_flags.values():
            flags[cols] = False

    def _flagged_operand(self, operands: tuple[str, ...]) -> str | None:
        """``"operand <o> of quantized layer <name>"`` for the first flagged one, else None."""
        if not self._quant_flags:
            return None
        cols = [_OPERANDS.index(o) for o in operands]
        names = list(self._quant_flags)
        table = torch.stack([self._quant_flags[n][cols] for n in names])  # (layers, operands)
        if not bool(table.any()):
            return None
        i, j = (int(v) for v in torch.nonzero(table)[0])
        return f"NaN/Inf in operand {operands[j]} of quantized layer {names[i]}"

    def _eval_step(self, batch: Any, metric: ForecastMetrics, prefix: str) -> StepOutput:
        x, y = self.normalize(batch.x), self.normalize(batch.y)
        loss, _, pred = self.compute_loss(x, y, batch.weight, False)
        pred_phys = self.denormalize(pred)
        metric.update(pred_phys, batch.y)
        if self.lat_deg.numel():
            latlon = self.val_latlon if prefix == "val" else self.test_latlon
            latlon.update(pred_phys, batch.y, self.lat_deg, self.climatology)
        self.log(
            f"{prefix}/loss",
            loss,
            prog_bar=prefix == "val",
            batch_size=batch.x.shape[0],
            sync_dist=True,
        )
        return StepOutput(loss, batch.x, batch.y, pred_phys)

    def validation_step(self, batch: Any, batch_idx: int) -> StepOutput:
        return self._eval_step(batch, self.val_metrics, "val")

    def test_step(self, batch: Any, batch_idx: int) -> StepOutput:
        out = self._eval_step(batch, self.test_metrics, "test")
        if self.test_ensemble_metrics is not None:
            self.test_ensemble_metrics.update(self.ensemble_members(batch.x).fields, batch.y)
        return out

    def _log_metrics(self, metric: ForecastMetrics, prefix: str) -> None:
        values = metric.compute()
        if self.lat_deg.numel():
            latlon = self.val_latlon if prefix == "val" else self.test_latlon
            values.update(latlon.compute())
            latlon.reset()
        self.log_dict({f"{prefix}/{k}": v for k, v in values.items()})
        metric.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_metrics(self.val_metrics, "val")

    def on_test_epoch_end(self) -> None:
        self._log_metrics(self.test_metrics, "test")
        if self.test_ensemble_metrics is not None:
            values = self.test_ensemble_metrics.compute()
            self.log_dict({f"test/{k}": v for k, v in values.items()})
            self.test_ensemble_metrics.reset()

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Prediction:
        forecast = self.denormalize(
            self.model.rollout(self.normalize(batch.x), self.rollout_steps).y
        )
        if self.hparams.predict_members < 2:
            return Prediction(forecast, None, batch.index, None)
        members = self.ensemble_members(batch.x)
        return Prediction(forecast, members.fields, batch.index, members.scores)

    # -- optimisation ----------------------------------------------------------------------------
    def learning_rate(self) -> float:
        """``lr``, or the Surge rule's rate for the global batch when a reference is configured."""
        ref = self.hparams.lr_reference_batch_size
        if ref is None:
            return float(self.hparams.lr)
        dm = self.trainer.datamodule
        if dm is None or not hasattr(dm, "batch_size"):
            raise ValueError("model.lr_reference_batch_size needs a datamodule with a batch_size")
        global_batch = (
            int(dm.batch_size) * self.trainer.world_size * self.trainer.accumulate_grad_batches
        )
        return resolve_learning_rate(global_batch, ref, self.hparams.lr, self.hparams.lr_b_noise)

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(
            self.parameters(), lr=self.learning_rate(), weight_decay=self.hparams.weight_decay
        )
        if self.hparams.scheduler == "none":
            return opt
        epochs = max(1, int(self.trainer.max_epochs or 1))
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}
