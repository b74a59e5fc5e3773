"""Non-finite detection helpers of the fault guard (``beamvq.faults``): tensors and gradients
checked for NaN/Inf, the quantized layers' operand flags, buffer snapshots for a skipped batch,
and the DDP-wide decision. Pure functions of tensors, modules and the trainer."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

__all__ = [
    "any_rank",
    "attached_trainer",
    "first_non_finite_gradient",
    "gradient_cause",
    "has_non_finite",
    "quant_hook",
    "restore_buffers",
    "snapshot_buffers",
]


def has_non_finite(value: Any) -> bool:
    leaves, _ = tree_flatten(value)
    return any(
        isinstance(t, Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all())
        for t in leaves
    )


def quant_hook(flags: Tensor) -> Callable[..., None]:
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


def attached_trainer(host: Any) -> pl.Trainer | None:
    """The trainer ``host`` is attached to, or ``None`` (a module used outside a Trainer)."""
    try:
        return host.trainer
    except RuntimeError:  # LightningModule.trainer raises when no trainer is attached
        return None


def any_rank(trainer: pl.Trainer | None, decision: bool) -> bool:
    """``decision`` on any DDP rank (all ranks must skip or stop together)."""
    if trainer is None:
        return decision
    return bool(trainer.strategy.reduce_boolean_decision(decision, all=False))


def snapshot_buffers(model: nn.Module) -> list[Tensor]:
    """Copies of every buffer of ``model`` (the code bank's EMA, BatchNorm statistics, ...)."""
    return [b.detach().clone() for b in model.buffers()]


def restore_buffers(model: nn.Module, saved: list[Tensor]) -> None:
    """Put back the buffers ``snapshot_buffers`` copied."""
    with torch.no_grad():
        for buf, value in zip(model.buffers(), saved):
            buf.copy_(value)


def first_non_finite_gradient(named: list[tuple[str, Tensor]]) -> str | None:
    """Name of the first parameter with a NaN/Inf gradient, or None (one sync when finite)."""
    if not named:
        return None
    grads = [g for _, g in named]
    total_norm = getattr(torch.nn.utils, "get_total_norm", None)
    if total_norm is not None:
        norm = total_norm(grads, error_if_nonfinite=False)
    else:
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    if bool(torch.isfinite(norm)):
        return None
    # the norm can overflow with finite gradients: name a parameter only if one is NaN/Inf
    return next((n for n, g in named if has_non_finite(g)), None)


def gradient_cause(bad_param: str | None, operand: str | None) -> str:
    """The cause of a NaN/Inf gradient in words: a parameter, a flagged operand, another rank."""
    if bad_param is not None:
        return f"parameter {bad_param} (layer {bad_param.rpartition('.')[0] or bad_param})"
    if operand is not None:
        return f"{operand} (quantization would have saturated it to a finite value)"
    return "in a quantized layer's gradient on another DDP rank"
