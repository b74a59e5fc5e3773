"""Batch-size-aware learning rates for Adam and the gradient noise scale that sets them.

Two references:

- Li et al. 2024, "Surge Phenomenon in Optimal Learning Rate and Batch Size Scaling"
  (arXiv 2405.14578): for Adam-style optimizers the best learning rate first rises, then falls
  with the batch size B,

      lr(B) = lr_max / (1/2 (sqrt(B_noise / B) + sqrt(B / B_noise))),

  peaking at ``B = B_noise`` and symmetric in ``log B`` around it. One tuned pair ``(B0, lr0)``
  fixes ``lr_max = lr0 * 1/2 (sqrt(B_noise / B0) + sqrt(B0 / B_noise))``. For ``B << B_noise`` the
  rule is square-root scaling ``lr ∝ sqrt(B)``; past ``B_noise`` larger batches want *smaller*
  learning rates.
- McCandlish et al. 2018, "An Empirical Model of Large-Batch Training" (arXiv 1812.06162),
  Appendix A: the simple noise scale ``B_simple = tr(Σ) / |G|²`` (Σ the per-example gradient
  covariance, G the true gradient), estimated without per-example gradients from the squared norms
  of gradients at two batch sizes ``B_small < B_big``:

      |G|²   ≈ (B_big |G_big|² − B_small |G_small|²) / (B_big − B_small)
      tr(Σ)  ≈ (|G_small|² − |G_big|²) / (1 / B_small − 1 / B_big)

  Both are unbiased but very noisy, so each is smoothed by an exponential moving average before
  taking the ratio. ``B_simple`` is a rough estimate of the Surge paper's ``B_noise`` (it tends to
  overestimate it).

Our choices (the papers leave them open):

- :class:`NoiseScaleMonitor` measures every ``every_n_steps`` training batches: it splits the batch
  into two halves, takes the gradient of each half (``B_small = B // 2``), and uses their mean as
  the whole-batch gradient (``B_big = 2 * (B // 2)``; an odd last sample is dropped). That is one
  extra forward/backward over the batch per measurement, i.e. a ``1 / every_n_steps`` overhead.
  It needs the module's ``loss_for_noise_scale(batch) -> Tensor`` returning the batch's training
  loss as a *mean over samples* (the half-batch gradients are averaged as if it were).
- The measurement runs in the module's current (training) mode so the gradients are those of the
  training loss, but it must not disturb training: all buffers (BatchNorm statistics, the EMA code
  bank of the VQ bottleneck) are restored afterwards and the random-number state is forked, so a
  run with the monitor follows exactly the same trajectory as one without it. Gradients are taken
  with ``torch.autograd.grad``, so ``.grad`` and DDP's gradient hooks are untouched.
- Under DDP each rank estimates from its local batch; rank zero's estimate is logged.
- The EMAs are bias-corrected like Adam's moments; the correction cancels in the ratio, but the
  logged ``tuning/grad_sq`` and ``tuning/trace_cov`` are then unbiased from the first measurement.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info
from torch import Tensor

__all__ = [
    "NoiseEstimate",
    "NoiseScaleEMA",
    "NoiseScaleMonitor",
    "lr_for_batch",
    "lr_max_from_reference",
    "batch_size_of",
    "noise_scale_estimates",
    "resolve_learning_rate",
    "split_batch",
    "surge_lr",
]


def _check_positive(**values: float) -> None:
    for name, value in values.items():
        if not (value > 0 and math.isfinite(value)):
            raise ValueError(f"{name} must be a positive finite number, got {value}")


def _surge_factor(batch_size: float, b_noise: float) -> float:
    """``1/2 (sqrt(B_noise / B) + sqrt(B / B_noise))``: 1 at ``B = B_noise``, larger elsewhere."""
    return 0.5 * (math.sqrt(b_noise / batch_size) + math.sqrt(batch_size / b_noise))


def surge_lr(batch_size: float, lr_max: float, b_noise: float) -> float:
    """The Surge rule: best Adam learning rate at ``batch_size`` given its peak ``lr_max`` at
    ``b_noise``."""
    _check_positive(batch_size=batch_size, lr_max=lr_max, b_noise=b_noise)
    return lr_max / _surge_factor(batch_size, b_noise)


def lr_max_from_reference(b0: float, lr0: float, b_noise: float) -> float:
    """Peak learning rate implied by one tuned pair ``(b0, lr0)``."""
    _check_positive(b0=b0, lr0=lr0, b_noise=b_noise)
    return lr0 * _surge_factor(b0, b_noise)


def lr_for_batch(batch_size: float, b0: float, lr0: float, b_noise: float) -> float:
    """Transfer a tuned ``(b0, lr0)`` to ``batch_size`` with the Surge rule.

    Computed as ``lr0 * factor(b0) / factor(B)`` rather than through ``lr_max``, so that
    ``B == b0`` returns ``lr0`` bit for bit.
    """
    _check_positive(batch_size=batch_size, b0=b0, lr0=lr0, b_noise=b_noise)
    return lr0 * (_surge_factor(b0, b_noise) / _surge_factor(batch_size, b_noise))


def resolve_learning_rate(
    batch_size: int, reference_batch_size: int, reference_lr: float, b_noise: float
) -> float:
    """The learning rate to train with at ``batch_size``, transferred from a tuned reference.

    ``batch_size`` is the global batch (per-device batch × devices × accumulation), the quantity
    the rule is about. Logs the choice on rank zero.
    """
    lr = lr_for_batch(batch_size, reference_batch_size, reference_lr, b_noise)
    rank_zero_info(
        f"learning rate {lr:.4g} for batch size {batch_size} (Surge rule, arXiv 2405.14578: "
        f"reference lr {reference_lr:.4g} at batch {reference_batch_size}, B_noise {b_noise:.4g}, "
        f"peak lr {lr_max_from_reference(reference_batch_size, reference_lr, b_noise):.4g})"
    )
    return lr


class NoiseEstimate(NamedTuple):
    """Unbiased single-measurement estimates of ``|G|²`` and ``tr(Σ)``."""

    grad_sq: float
    trace_cov: float


def noise_scale_estimates(
    sq_norm_small: float, sq_norm_big: float, b_small: float, b_big: float
) -> NoiseEstimate:
    """McCandlish et al. (2018), Appendix A: ``|G|²`` and ``tr(Σ)`` from squared gradient norms
    measured at batch sizes ``b_small < b_big``."""
    _check_positive(b_small=b_small, b_big=b_big)
    if not b_small < b_big:
        raise ValueError(f"need b_small < b_big, got {b_small} and {b_big}")
    grad_sq = (b_big * sq_norm_big - b_small * sq_norm_small) / (b_big - b_small)
    trace_cov = (sq_norm_small - sq_norm_big) / (1.0 / b_small - 1.0 / b_big)
    return NoiseEstimate(float(grad_sq), float(trace_cov))


class NoiseScaleEMA:
    """Bias-corrected exponential moving averages of ``|G|²`` and ``tr(Σ)`` and their ratio."""

    def __init__(self, decay: float = 0.95) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.decay = float(decay)
        self.count = 0
        self._grad_sq = 0.0
        self._trace_cov = 0.0

    def update(self, estimate: NoiseEstimate) -> None:
        self.count += 1
        self._grad_sq = self.decay * self._grad_sq + (1.0 - self.decay) * estimate.grad_sq
        self._trace_cov = self.decay * self._trace_cov + (1.0 - self.decay) * estimate.trace_cov

    def _correction(self) -> float:
        return 1.0 - self.decay**self.count

    @property
    def grad_sq(self) -> float:
        """Smoothed ``|G|²`` (NaN before the first update)."""
        return self._grad_sq / self._correction() if self.count else math.nan

    @property
    def trace_cov(self) -> float:
        """Smoothed ``tr(Σ)`` (NaN before the first update)."""
        return self._trace_cov / self._correction() if self.count else math.nan

    @property
    def b_noise(self) -> float:
        """``tr(Σ) / |G|²`` of the smoothed values; NaN while it is not defined (no update yet, or
        a non-positive smoothed ``|G|²``, which noisy early measurements can give)."""
        if self.count == 0 or self._grad_sq <= 0.0:
            return math.nan
        return self._trace_cov / self._grad_sq

    def state_dict(self) -> dict[str, float]:
        return {
            "decay": self.decay,
            "count": self.count,
            "grad_sq": self._grad_sq,
            "trace_cov": self._trace_cov,
        }

    def load_state_dict(self, state: Mapping[str, float]) -> None:
        self.decay = float(state["decay"])
        self.count = int(state["count"])
        self._grad_sq = float(state["grad_sq"])
        self._trace_cov = float(state["trace_cov"])


def split_batch(batch: Any, start: int, stop: int) -> Any:
    """Samples ``start:stop`` (along dim 0) of every tensor in a batch.

    Batches may be tensors or (named) tuples, lists and mappings of them; anything else (labels,
    metadata, 0-d tensors) is passed through unchanged.
    """
    if isinstance(batch, Tensor):
        return batch[start:stop] if batch.ndim else batch
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(split_batch(v, start, stop) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(split_batch(v, start, stop) for v in batch)
    if isinstance(batch, Mapping):
        return {k: split_batch(v, start, stop) for k, v in batch.items()}
    return batch


def batch_size_of(batch: Any) -> int | None:
    """Length along dim 0 of the first batched tensor found in ``batch`` (``None`` if none)."""
    if isinstance(batch, Tensor):
        return int(batch.shape[0]) if batch.ndim else None
    if isinstance(batch, Mapping):
        children = list(batch.values())
    elif isinstance(batch, (list, tuple)):
        children = list(batch)
    else:
        children = []
    for child in children:
        size = batch_size_of(child)
        if size is not None:
            return size
    return None


class NoiseScaleMonitor(pl.Callback):
    """Estimate the gradient noise scale during training and log ``tuning/b_noise``.

    Every ``every_n_steps`` training batches the batch is split in two halves; the squared norms of
    the half-batch gradients and of their mean give one :func:`noise_scale_estimates` measurement,
    smoothed by :class:`NoiseScaleEMA` with ``decay``. Logs ``tuning/b_noise``,
    ``tuning/grad_sq`` and ``tuning/trace_cov``. The module must define
    ``loss_for_noise_scale(batch) -> Tensor`` (the batch's mean training loss).
    """

    def __init__(self, every_n_steps: int = 10, decay: float = 0.95) -> None:
        super().__init__()
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps = int(every_n_steps)
        self.ema = NoiseScaleEMA(decay)
        self._batches_seen = 0

    @property
    def b_noise(self) -> float:
        """Current smoothed estimate of the noise scale (NaN until defined)."""
        return self.ema.b_noise

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and not callable(getattr(pl_module, "loss_for_noise_scale", None)):
            raise TypeError(
                f"NoiseScaleMonitor needs {type(pl_module).__name__}.loss_for_noise_scale(batch) "
                "-> Tensor (the scalar mean training loss of a batch); define it or remove the "
                "callback"
            )

    def measure(self, pl_module: pl.LightningModule, batch: Any) -> NoiseEstimate:
        """One measurement on ``batch`` without side effects on the module or the RNG."""
        n = batch_size_of(batch) or 0
        half = n // 2
        if half < 1:
            raise ValueError(f"NoiseScaleMonitor needs batches of at least 2 samples, got {n}")
        params = [p for p in pl_module.parameters() if p.requires_grad]
        buffers = {name: b.detach().clone() for name, b in pl_module.named_buffers()}
        device = pl_module.device
        rng_devices: list[int] = []
        if device.type == "cuda":
            rng_devices = [
                device.index if device.index is not None else torch.cuda.current_device()
            ]
        with torch.random.fork_rng(devices=rng_devices), torch.enable_grad():
            halves = []
            for start in (0, half):
                loss = pl_module.loss_for_noise_scale(split_batch(batch, start, start + half))
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                # a parameter the loss does not reach has a zero gradient
                halves.append(
                    [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
                )
        with torch.no_grad():
            for name, b in pl_module.named_buffers():
                b.copy_(buffers[name])
            sq_1 = sum(g.double().square().sum() for g in halves[0])
            sq_2 = sum(g.double().square().sum() for g in halves[1])
            # |(g1 + g2) / 2|², the squared norm of the whole-batch gradient
            sq_big = sum(
                (0.5 * (a.double() + b.double())).square().sum()
                for a, b in zip(halves[0], halves[1])
            )
        sq_small = 0.5 * (float(sq_1) + float(sq_2))
        return noise_scale_estimates(sq_small, float(sq_big), half, 2 * half)

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self._batches_seen += 1
        if (self._batches_seen - 1) % self.every_n_steps:
            return
        if (batch_size_of(batch) or 0) < 2:
            # e.g. the one-sample last batch of an epoch (drop_last=False): nothing to split
            return
        self.ema.update(self.measure(pl_module, batch))
        values = {"tuning/grad_sq": self.ema.grad_sq, "tuning/trace_cov": self.ema.trace_cov}
        if math.isfinite(self.ema.b_noise) and self.ema.b_noise > 0:
            values["tuning/b_noise"] = self.ema.b_noise
        for name, value in values.items():
            pl_module.log(name, value, on_step=True, on_epoch=False, rank_zero_only=True)

    def state_dict(self) -> dict[str, Any]:
        return {"ema": self.ema.state_dict(), "batches_seen": self._batches_seen}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.ema.load_state_dict(state_dict["ema"])
        self._batches_seen = int(state_dict["batches_seen"])
