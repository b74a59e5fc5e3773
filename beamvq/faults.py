"""The non-finite guard of training: locate a NaN/Inf, then stop or skip (docs/reliability.md).

A NaN/Inf training loss, a NaN/Inf gradient, or NaN/Inf entering a quantized layer (where the ExMy
simulation of ``beamvq.quant`` would saturate an Inf to the format's largest finite value and
hide it from the loss) is reported with the global step and the first place that produced it:
the batch itself, a parameter, a buffer (code bank, normalization), or the first layer in
execution order whose output is not finite. Then ``nan_policy="stop"`` raises a
``FloatingPointError`` and ``"skip"`` drops the batch: no optimizer step, the buffers the forward
moved (the code bank's EMA, BatchNorm statistics) rolled back, counted in
``train/skipped_batches``; ``max_consecutive_skips`` skipped batches in a row stop the run. Every
DDP rank takes the decision together (one rank's NaN skips the batch on all of them). A NaN/Inf
validation loss is located too (``check_eval_loss``): ``"stop"`` raises, ``"skip"`` warns and goes
on with that epoch's metrics NaN (a checkpoint monitor never takes them for the best).

``FaultGuard`` holds the bookkeeping and the decisions; ``beamvq.module.ForecastModule`` owns
one and calls it from its training hooks. The module is seen here only through ``GuardedModule``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, Protocol

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from beamvq.nonfinite import (
    any_rank,
    attached_trainer,
    first_non_finite_gradient,
    gradient_cause,
    has_non_finite,
    quant_hook,
    restore_buffers,
    snapshot_buffers,
)
from beamvq.quant.layers import QUANT_CLASSES

log = logging.getLogger(__name__)

NAN_POLICIES = ("stop", "skip")
_QUANT_TYPES = tuple(set(QUANT_CLASSES.values()))
_OPERANDS = ("x", "w", "dy")

__all__ = [
    "NAN_POLICIES",
    "FaultConfig",
    "FaultGuard",
    "FaultSite",
    "GuardedModule",
    "attached_trainer",
]


@dataclass(frozen=True)
class FaultConfig:
    """``model.faults``: what a NaN/Inf loss, gradient or quantized-layer operand does in training.

    Args:
        nan_policy: ``"stop"`` raises ``FloatingPointError`` naming the step and the layer;
            ``"skip"`` skips the batch (no optimizer step, buffers such as the code bank rolled
            back) with a warning, and counts it in ``train/skipped_batches``.
        max_consecutive_skips: with ``"skip"``, this many skipped batches in a row stop the run
            (the fault is then not a rare batch).
    """

    nan_policy: Literal["stop", "skip"] = "stop"
    max_consecutive_skips: int = 20

    def __post_init__(self) -> None:
        if self.nan_policy not in NAN_POLICIES:
            raise ValueError(
                f"model.faults.nan_policy must be one of {NAN_POLICIES}, got {self.nan_policy!r}"
            )
        if self.max_consecutive_skips < 1:
            raise ValueError(
                f"model.faults.max_consecutive_skips must be >= 1, got {self.max_consecutive_skips}"
            )


class FaultSite(NamedTuple):
    """Where a NaN/Inf comes from: ``kind`` is ``"data"``, ``"parameter"``, ``"buffer"``,
    ``"layer"``, ``"loss"`` or ``"unknown"``; ``description`` says it in words."""

    kind: str
    description: str


class GuardedModule(Protocol):
    """What the guard uses of the LightningModule it protects (``ForecastModule``)."""

    model: nn.Module
    global_step: int
    current_epoch: int
    device: torch.device

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]: ...

    def parameters(self) -> Iterator[nn.Parameter]: ...

    def log(self, name: str, value: Any, **kwargs: Any) -> None: ...

    def training_loss(self, batch: Any) -> Tensor:
        """The scalar training loss of a physical batch (the forward the guard re-runs)."""
        ...


class FaultGuard:
    """The non-finite guard of one module: counters, quantized-layer flags and the decisions.

    ``skipped_batches`` travels in checkpoints (the module saves and restores it).
    """

    def __init__(self, config: FaultConfig) -> None:
        self.config = config
        self.skipped_batches = 0
        self._consecutive_skips = 0
        self._good_batches = 0  # finite batches since the last optimizer step
        self._quant_flags: dict[str, Tensor] = {}
        self._quant_hooks: list[RemovableHandle] = []
        self._eval_warned: tuple[str, int] | None = None  # (split, epoch) already warned about

    # -- quantized layers: flag non-finite operands before quantization hides them ---------------
    def install_quant_hooks(self, model: nn.Module) -> None:
        """Watch the operands of every quantized layer of ``model`` (named with prefix ``model``)."""
        if self._quant_hooks:
            return
        for name, layer in model.named_modules(prefix="model"):
            if not isinstance(layer, _QUANT_TYPES):
                continue
            flags = torch.zeros(len(_OPERANDS), dtype=torch.bool, device=layer.weight.device)
            self._quant_flags[name] = flags
            self._quant_hooks.append(layer.register_forward_hook(quant_hook(flags)))
        if self._quant_flags:
            log.info(
                "NaN/Inf checks on the operands of %d quantized layers", len(self._quant_flags)
            )

    def remove_quant_hooks(self) -> None:
        for h in self._quant_hooks:
            h.remove()
        self._quant_hooks, self._quant_flags = [], {}

    def _reset_flags(self, operands: tuple[str, ...]) -> None:
        cols = [_OPERANDS.index(o) for o in operands]
        for flags in self._quant_flags.values():
            flags[cols] = False

    def flagged_operand(self, operands: tuple[str, ...]) -> str | None:
        """``"NaN/Inf in operand <o> of quantized layer <name>"`` for the first flagged one."""
        if not self._quant_flags:
            return None
        cols = [_OPERANDS.index(o) for o in operands]
        names = list(self._quant_flags)
        table = torch.stack([self._quant_flags[n][cols] for n in names])  # (layers, operands)
        if not bool(table.any()):
            return None
        i, j = (int(v) for v in torch.nonzero(table)[0])
        return f"NaN/Inf in operand {operands[j]} of quantized layer {names[i]}"

    # -- a training batch --------------------------------------------------------------------------
    def start_batch(self, model: nn.Module) -> list[Tensor]:
        """Before a training forward: the buffers to roll back to; X/W flags cleared."""
        # buffers (code bank EMA, BatchNorm statistics) move in the forward: keep them so a bad
        # batch can be rolled back and diagnosed from the state it started from
        saved = snapshot_buffers(model)
        self._reset_flags(("x", "w"))
        return saved

    def batch_is_bad(self, host: GuardedModule, loss: Tensor) -> tuple[bool, bool, str | None]:
        """After the forward: (bad on any rank, bad on this rank, flagged quantized operand)."""
        operand = self.flagged_operand(("x", "w"))
        local_bad = not bool(torch.isfinite(loss)) or operand is not None
        return any_rank(attached_trainer(host), local_bad), local_bad, operand

    def good_batch(self) -> None:
        self._good_batches += 1

    def bad_batch(
        self,
        host: GuardedModule,
        batch: Any,
        batch_idx: int,
        saved: list[Tensor],
        local_bad: bool,
        operand: str | None,
    ) -> Tensor | None:
        """Handle a NaN/Inf training batch (on this or another rank) by the ``nan_policy``;
        returns what ``training_step`` returns (``None``: Lightning skips the step)."""
        restore_buffers(host.model, saved)
        site = self.locate(host, batch)  # every rank: the diagnosis is collective
        what, cause = "NaN/Inf training loss", site.description
        if operand is not None and site.kind not in ("data", "parameter", "buffer"):
            what = "NaN/Inf in the training forward"
            cause = f"{operand} (quantization would have saturated it to a finite value)"
        elif not local_bad:
            cause = "on another DDP rank"
        self._fault(host, f"{what} at {self._where(host, batch_idx)}: {cause}")
        trainer = attached_trainer(host)
        if trainer is None or trainer.world_size == 1:
            return None  # Lightning skips backward and the optimizer step
        # DDP cannot skip a backward on some ranks only: a zero loss through every parameter
        # keeps the gradient all-reduce in step and adds nothing to the accumulated gradients
        zero = torch.zeros((), device=host.device)
        return sum((p.sum() * 0.0 for p in host.parameters() if p.requires_grad), zero)

    def before_optimizer_step(self, host: GuardedModule, optimizer: torch.optim.Optimizer) -> None:
        """Skip or stop on a NaN/Inf gradient (parameter or quantized layer's dY)."""
        good, self._good_batches = self._good_batches, 0
        # dY flags gather over the micro-batches of an accumulation window
        operand = self.flagged_operand(("dy",))
        self._reset_flags(("dy",))
        if good == 0:
            # every batch since the last step was skipped: no step at all (AdamW leaves
            # parameters without gradients alone; zero gradients would still move them)
            optimizer.zero_grad(set_to_none=True)
            return
        trainer = attached_trainer(host)
        # under a GradScaler (16-mixed) Inf gradients are expected: the scaler skips those steps
        if trainer is not None and getattr(trainer.precision_plugin, "scaler", None) is not None:
            return
        local_bad = operand is not None
        if self._quant_flags:
            # quantized-layer flags are per rank (before the gradient all-reduce)
            local_bad = any_rank(trainer, local_bad)
        # gradients are already all-reduced: every rank finds the same parameter
        named = [(n, p.grad) for n, p in host.named_parameters() if p.grad is not None]
        bad_param = first_non_finite_gradient(named)
        if not local_bad and bad_param is None:
            self._consecutive_skips = 0
            return
        cause = gradient_cause(bad_param, operand)
        self._fault(host, f"NaN/Inf gradient at {self._where(host)}: {cause}")
        optimizer.zero_grad(set_to_none=True)  # "skip": AdamW leaves parameters without gradients

    # -- a validation or test batch ---------------------------------------------------------------
    def check_eval_loss(
        self, host: GuardedModule, loss: Tensor, batch: Any, batch_idx: int, split: str
    ) -> bool:
        """A NaN/Inf ``split`` (``"validation"``, ``"test"``) loss on any rank, located as in
        training: ``stop`` raises; ``skip`` warns once per epoch and keeps the batch (NaN metrics,
        not metrics without the windows the model fails on). Every rank must call it."""
        local_bad = not bool(torch.isfinite(loss).all())
        if not any_rank(attached_trainer(host), local_bad):
            return False
        site = self.locate(host, batch)  # every rank: the diagnosis is collective
        cause = site.description if local_bad else "on another DDP rank"
        message = f"NaN/Inf {split} loss at {self._where(host, batch_idx)}: {cause}"
        if self.config.nan_policy == "stop":
            raise FloatingPointError(
                f"{message}. Stopping (model.faults.nan_policy: stop; with "
                f"model.faults.nan_policy: skip the run goes on with NaN {split} metrics)"
            )
        if self._eval_warned != (split, host.current_epoch):
            self._eval_warned = (split, host.current_epoch)
            log.warning("%s; this epoch's %s metrics are NaN (nan_policy: skip)", message, split)
        return True

    # -- diagnosis and decision --------------------------------------------------------------------
    def locate(self, host: GuardedModule, batch: Any) -> FaultSite:
        """Where the NaN/Inf of this training batch's loss comes from.

        In this order: the batch itself, a parameter, a buffer (code bank, normalization), else
        the first layer (in execution order) whose output is not finite, found by re-running the
        training forward with forward hooks on every submodule; buffers and the random-number
        state are restored afterwards, so the diagnosis changes nothing. Every DDP rank must call
        it together (the code bank's forward synchronizes over ranks).
        """
        found = self._first_non_finite_layer(host, batch)
        for name in ("x", "y", "weight"):
            t = getattr(batch, name, None)
            if isinstance(t, Tensor) and has_non_finite(t):
                return FaultSite(
                    "data", f"the batch's {name} holds NaN/Inf (a data problem, not the model's)"
                )
        for name, p in host.named_parameters():
            if has_non_finite(p):
                return FaultSite("parameter", f"parameter {name} is NaN/Inf")
        for name, b in host.model.named_buffers(prefix="model"):
            if has_non_finite(b):
                return FaultSite("buffer", f"buffer {name} is NaN/Inf")
        if found.layer is not None:
            return FaultSite("layer", f"layer {found.layer} is the first to output NaN/Inf")
        if found.loss_finite:
            return FaultSite(
                "unknown", "the loss is finite when recomputed (a non-deterministic fault)"
            )
        return FaultSite("loss", "every layer's output is finite: the loss itself overflowed")

    def _first_non_finite_layer(self, host: GuardedModule, batch: Any) -> _Rerun:
        """Re-run the training forward with hooks on every layer; change nothing."""
        found: list[str] = []

        def hook_for(name: str) -> Callable[..., None]:
            def hook(module: nn.Module, args: Any, output: Any) -> None:
                if not found and has_non_finite(output):
                    found.append(f"{name} ({type(module).__name__})")

            return hook

        handles = [
            m.register_forward_hook(hook_for(name))
            for name, m in host.model.named_modules(prefix="model")
            if name != "model"
        ]
        saved = snapshot_buffers(host.model)
        devices = [torch.cuda.current_device()] if host.device.type == "cuda" else []
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=devices):
                loss = host.training_loss(batch)
        finally:
            for h in handles:
                h.remove()
            restore_buffers(host.model, saved)
        return _Rerun(found[0] if found else None, bool(torch.isfinite(loss)))

    @staticmethod
    def _where(host: GuardedModule, batch_idx: int | None = None) -> str:
        batch = "" if batch_idx is None else f", batch {batch_idx}"
        return f"global step {host.global_step} (epoch {host.current_epoch}{batch})"

    def _fault(self, host: GuardedModule, message: str) -> None:
        """Stop (``nan_policy="stop"``) or count and warn about a skipped batch."""
        if self.config.nan_policy == "stop":
            raise FloatingPointError(
                f"{message}. Stopping (model.faults.nan_policy: stop; set "
                "model.faults.nan_policy: skip to skip such batches)"
            )
        self.skipped_batches += 1
        self._consecutive_skips += 1
        limit = int(self.config.max_consecutive_skips)
        if self._consecutive_skips >= limit:
            raise FloatingPointError(
                f"{message}. Stopping: {self._consecutive_skips} batches in a row were skipped "
                f"(model.faults.max_consecutive_skips={limit})"
            )
        log.warning("%s; batch skipped (%d skipped so far)", message, self.skipped_batches)
        host.log("train/skipped_batches", float(self.skipped_batches), on_step=True, on_epoch=False)


class _Rerun(NamedTuple):
    """What re-running a bad batch's forward found: the first layer with a non-finite output
    (``"name (Class)"``) and whether the recomputed loss is finite."""

    layer: str | None
    loss_finite: bool
