"""Tests of the Surge learning-rate rule and the gradient-noise-scale estimator (beamvq/tuning.py)."""

from __future__ import annotations

import logging
import math
from typing import NamedTuple

import pytest
import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from beamvq.tuning import (
    NoiseEstimate,
    NoiseScaleEMA,
    NoiseScaleMonitor,
    batch_size_of,
    lr_for_batch,
    lr_max_from_reference,
    noise_scale_estimates,
    resolve_learning_rate,
    split_batch,
    surge_lr,
)

# -- the Surge rule ------------------------------------------------------------------------------


def test_surge_peaks_at_b_noise() -> None:
    assert surge_lr(64, 1e-3, 64) == 1e-3
    sizes = [2**k for k in range(12)]
    lrs = [surge_lr(b, 1e-3, 64) for b in sizes]
    assert max(lrs) == lrs[sizes.index(64)]
    # rises before the peak, falls after it
    assert all(a < b for a, b in zip(lrs[:6], lrs[1:7]))
    assert all(a > b for a, b in zip(lrs[6:], lrs[7:]))


def test_surge_is_symmetric_in_log_batch() -> None:
    b_noise = 48.0
    for b in (1.0, 3.0, 17.0, 200.0):
        assert surge_lr(b, 2e-3, b_noise) == pytest.approx(
            surge_lr(b_noise**2 / b, 2e-3, b_noise), rel=1e-12
        )


def test_hand_computed_values() -> None:
    # B_noise = 64, B = 16: factor 1/2 (sqrt(4) + sqrt(1/4)) = 1.25
    assert surge_lr(16, 1e-3, 64) == pytest.approx(8e-4, rel=1e-15)
    assert surge_lr(256, 1e-3, 64) == pytest.approx(8e-4, rel=1e-15)
    # tuned at B0 = 256 with lr0 = 1e-3: the peak (at 64) is 1.25e-3, and B = 16 gets 1e-3 back
    assert lr_max_from_reference(256, 1e-3, 64) == pytest.approx(1.25e-3, rel=1e-15)
    assert lr_for_batch(16, 256, 1e-3, 64) == pytest.approx(1e-3, rel=1e-15)
    assert lr_for_batch(64, 256, 1e-3, 64) == pytest.approx(1.25e-3, rel=1e-15)
    # B = 4 * B_noise: factor 1/2 (1/2 + 2) = 1.25 too; B = 9 * B_noise: 1/2 (1/3 + 3) = 5/3
    assert surge_lr(9 * 64, 1e-3, 64) == pytest.approx(6e-4, rel=1e-15)


def test_reference_reproduced_exactly() -> None:
    for b0, lr0, b_noise in ((32, 3e-4, 7.3), (100, 1.7e-3, 1234.5), (8, 0.1, 8)):
        assert lr_for_batch(b0, b0, lr0, b_noise) == lr0


def test_large_noise_scale_is_square_root_scaling() -> None:
    # far below B_noise the rule is the Adam square-root rule lr ∝ sqrt(B)
    assert lr_for_batch(64, 16, 1e-3, 1e9) == pytest.approx(2e-3, rel=1e-3)


def test_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="b_noise"):
        surge_lr(16, 1e-3, 0.0)
    with pytest.raises(ValueError, match="batch_size"):
        lr_for_batch(-1, 16, 1e-3, 10.0)
    with pytest.raises(ValueError, match="b_noise"):
        lr_for_batch(8, 16, 1e-3, math.nan)


def test_resolve_learning_rate_logs(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO):
        lr = resolve_learning_rate(16, 256, 1e-3, 64.0)
    assert lr == pytest.approx(1e-3, rel=1e-15)
    assert "Surge" in caplog.text and "batch size 16" in caplog.text
    assert resolve_learning_rate(256, 256, 1e-3, 64.0) == 1e-3


# -- the noise-scale estimator --------------------------------------------------------------------


def test_estimates_exact_on_expected_norms() -> None:
    # E|G_B|² = |G|² + tr(Σ)/B: plugging in the expectations returns the truth exactly
    g2, tr = 4.0, 64.0
    est = noise_scale_estimates(g2 + tr / 16, g2 + tr / 32, 16, 32)
    assert est.grad_sq == pytest.approx(g2, rel=1e-12)
    assert est.trace_cov == pytest.approx(tr, rel=1e-12)
    with pytest.raises(ValueError, match="b_small < b_big"):
        noise_scale_estimates(1.0, 1.0, 32, 16)


def test_ema_estimate_converges_to_known_noise_scale() -> None:
    # per-example gradients g_i = G + xi_i, xi_i ~ N(0, sigma² I_d): tr(Σ) = d sigma²
    gen = torch.Generator().manual_seed(0)
    d, sigma, batch = 64, 1.0, 32
    grad = torch.full((d,), 0.25)  # |G|² = 4
    truth = d * sigma**2 / float(grad.square().sum())  # 16
    ema = NoiseScaleEMA(decay=0.99)
    assert math.isnan(ema.b_noise)
    for _ in range(800):
        per_example = grad + sigma * torch.randn(batch, d, generator=gen)
        g1, g2 = per_example[: batch // 2].mean(0), per_example[batch // 2 :].mean(0)
        small = 0.5 * float(g1.square().sum() + g2.square().sum())
        big = float((0.5 * (g1 + g2)).square().sum())
        ema.update(noise_scale_estimates(small, big, batch // 2, batch))
    assert ema.b_noise == pytest.approx(truth, rel=0.1)
    assert ema.grad_sq == pytest.approx(4.0, rel=0.1)
    assert ema.trace_cov == pytest.approx(d * sigma**2, rel=0.1)


def test_ema_bias_correction_and_state() -> None:
    ema = NoiseScaleEMA(decay=0.9)
    ema.update(NoiseEstimate(grad_sq=2.0, trace_cov=10.0))
    # one update: the bias-corrected averages are the measurement itself
    assert ema.grad_sq == pytest.approx(2.0) and ema.trace_cov == pytest.approx(10.0)
    assert ema.b_noise == pytest.approx(5.0)
    ema.update(NoiseEstimate(grad_sq=4.0, trace_cov=10.0))
    assert ema.grad_sq == pytest.approx((0.9 * 0.1 * 2 + 0.1 * 4) / (1 - 0.81))
    other = NoiseScaleEMA()
    other.load_state_dict(ema.state_dict())
    assert other.b_noise == ema.b_noise and other.count == 2
    negative = NoiseScaleEMA()
    negative.update(NoiseEstimate(grad_sq=-1.0, trace_cov=3.0))
    assert math.isnan(negative.b_noise)


class _Pair(NamedTuple):
    x: Tensor
    y: Tensor


def test_split_batch_structures() -> None:
    batch = _Pair(torch.arange(6), torch.arange(12).reshape(6, 2))
    part = split_batch(batch, 2, 4)
    assert isinstance(part, _Pair)
    assert part.x.tolist() == [2, 3] and part.y.tolist() == [[4, 5], [6, 7]]
    mixed = {"a": [torch.ones(4, 3), "label"], "s": torch.tensor(2.0)}
    part = split_batch(mixed, 0, 2)
    assert part["a"][0].shape == (2, 3) and part["a"][1] == "label"
    assert part["s"].item() == 2.0
    assert batch_size_of(mixed) == 4 and batch_size_of(batch) == 6
    assert batch_size_of({"s": torch.tensor(1.0)}) is None


# -- the Lightning callback -----------------------------------------------------------------------


class _LinearRegression(pl.LightningModule):
    """``y = x·w* + eps`` fitted by ``y_hat = x·w``; with ``lr=0`` the weights stay at ``w0``."""

    def __init__(self, w0: Tensor, lr: float = 0.0) -> None:
        super().__init__()
        self.linear = nn.Linear(w0.numel(), 1, bias=False)
        with torch.no_grad():
            self.linear.weight.copy_(w0[None])
        self.lr = lr

    def loss_for_noise_scale(self, batch: list[Tensor]) -> Tensor:
        x, y = batch
        return 0.5 * (self.linear(x)[:, 0] - y).square().mean()

    def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        return self.loss_for_noise_scale(batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def _trainer(callbacks: list[pl.Callback], max_steps: int) -> pl.Trainer:
    return pl.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )


def test_callback_estimates_linear_regression_noise_scale() -> None:
    gen = torch.Generator().manual_seed(1)
    d, n = 8, 4096
    w_star = torch.randn(d, generator=gen)
    delta = torch.randn(d, generator=gen)
    delta = delta / delta.norm()  # |w0 - w*| = 1
    x = torch.randn(n, d, generator=gen)
    y = x @ w_star + torch.randn(n, generator=gen)
    w0 = w_star + delta
    # the truth for sampling from this dataset: per-example gradients in closed form
    per_example = x * (x @ w0 - y)[:, None]
    mean = per_example.mean(0)
    truth = float((per_example - mean).square().sum(1).mean() / mean.square().sum())
    assert 10 < truth < 30  # about d (|delta|² + s²) + |delta|² = 17 in expectation

    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)
    monitor = NoiseScaleMonitor(every_n_steps=1, decay=0.95)
    trainer = _trainer([monitor], max_steps=250)
    torch.manual_seed(0)
    trainer.fit(_LinearRegression(w0), loader)
    logged = float(trainer.callback_metrics["tuning/b_noise"])
    assert logged == pytest.approx(monitor.b_noise, rel=1e-6)  # logged as float32
    assert truth / 2 < logged < truth * 2, (logged, truth)
    assert monitor.ema.count == 250
    assert float(trainer.callback_metrics["tuning/trace_cov"]) > 0


class _Noisy(pl.LightningModule):
    """Dropout and BatchNorm: training randomness and buffers the monitor must not disturb."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.Dropout(0.5))
        self.head = nn.Linear(16, 1)

    def loss_for_noise_scale(self, batch: list[Tensor]) -> Tensor:
        x, y = batch
        return (self.head(self.net(x))[:, 0] - y).square().mean()

    def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        return self.loss_for_noise_scale(batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit_noisy(callbacks: list[pl.Callback]) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, 4, generator=gen), torch.randn(64, generator=gen))
    torch.manual_seed(0)
    model = _Noisy()
    _trainer(callbacks, max_steps=6).fit(model, DataLoader(data, batch_size=16))
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_callback_leaves_training_unchanged() -> None:
    plain = _fit_noisy([])
    monitor = NoiseScaleMonitor(every_n_steps=2)
    monitored = _fit_noisy([monitor])
    assert monitor.ema.count == 3
    assert plain.keys() == monitored.keys()
    for name in plain:
        assert torch.equal(plain[name], monitored[name]), name


def test_callback_requires_loss_method() -> None:
    class _NoLoss(_Noisy):
        loss_for_noise_scale = None  # type: ignore[assignment]

        def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
            x, y = batch
            return (self.head(self.net(x))[:, 0] - y).square().mean()

    data = TensorDataset(torch.randn(8, 4), torch.randn(8))
    with pytest.raises(TypeError, match="loss_for_noise_scale"):
        _trainer([NoiseScaleMonitor()], max_steps=1).fit(_NoLoss(), DataLoader(data, batch_size=4))


def test_callback_state_roundtrip() -> None:
    monitor = NoiseScaleMonitor(every_n_steps=3, decay=0.5)
    monitor.ema.update(NoiseEstimate(1.0, 8.0))
    monitor._batches_seen = 7
    other = NoiseScaleMonitor(every_n_steps=3, decay=0.5)
    other.load_state_dict(monitor.state_dict())
    assert other.b_noise == 8.0 and other._batches_seen == 7
    with pytest.raises(ValueError, match="every_n_steps"):
        NoiseScaleMonitor(every_n_steps=0)
