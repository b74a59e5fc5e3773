"""How ``ForecastModule`` builds its optimizer: parameter groups, the Surge rule, the schedule.

The optimizer is injected (LightningCLI's dependency injection, ``model.optimizer`` typed
``pytorch_lightning.cli.OptimizerCallable``): any ``torch.optim`` class with its ``init_args``,
e.g. ``{class_path: torch.optim.AdamW, init_args: {lr: 0.001, weight_decay: 0.0}}``; ``None``
is that AdamW. The module calls it with its parameter groups and then adjusts each group's
learning rate:

1. ``model.param_groups``: parameters whose name matches a group's ``pattern`` train at
   ``lr_scale`` × the optimizer's ``lr`` (and their own ``weight_decay`` if given), e.g. the
   experts of a mixture-of-experts layer; every other parameter is in the first group.
2. ``model.lr_schedule.reference_batch_size`` / ``b_noise``: the optimizer's ``lr`` is the rate
   tuned at that batch size, and every group's rate is transferred to the run's global batch by
   the Surge rule (Li et al. 2024, arXiv 2405.14578; ``beamvq.tuning``).
3. ``model.lr_schedule.scheduler``: ``"cosine"`` anneals every group per epoch from its rate to
   ``min_lr`` over ``trainer.max_epochs`` (``CosineAnnealingLR``; ``min_lr > 0`` keeps a
   fine-tuning stage from stalling at a vanishing rate), ``"none"`` keeps the rates constant.

Why the schedule is a typed choice and not an injected ``LRSchedulerCallable``: such a callable
is called with the optimizer only, so a cosine schedule could not know ``T_max``, the run's
``trainer.max_epochs``, and every config would have to repeat it (and silently disagree with
``--trainer.max_epochs`` overrides). LightningCLI's top-level ``optimizer:``/``lr_scheduler:``
keys are turned off in ``beamvq.cli``: they would replace this construction and drop the Surge
rule and the parameter groups.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any, Literal

import torch
from torch import nn

from beamvq.nn.moe import MoEFeedForward, expert_lr_ratio
from beamvq.tuning import resolve_learning_rate

__all__ = [
    "LRSchedule",
    "ParamGroup",
    "build_optimizer",
    "build_scheduler",
    "expert_groups",
    "global_batch_size",
    "training_progress",
    "param_groups",
    "surge_rule",
]

SCHEDULERS = ("cosine", "none")


@dataclass(frozen=True)
class ParamGroup:
    """``model.param_groups[i]``: the parameters whose full name (``model.backbone...``) matches
    ``pattern`` (shell-style, ``fnmatch``) train at ``lr_scale`` × the optimizer's ``lr``, with
    ``weight_decay`` when given (else the optimizer's). A parameter joins the first group that
    matches."""

    pattern: str
    lr_scale: float = 1.0
    weight_decay: float | None = None

    def __post_init__(self) -> None:
        if not self.pattern:
            raise ValueError("model.param_groups: pattern must not be empty")
        if not (self.lr_scale > 0 and math.isfinite(self.lr_scale)):
            raise ValueError(
                f"model.param_groups ({self.pattern!r}): lr_scale must be a positive finite "
                f"number, got {self.lr_scale}"
            )
        if self.weight_decay is not None and not self.weight_decay >= 0:
            raise ValueError(
                f"model.param_groups ({self.pattern!r}): weight_decay must be >= 0, got "
                f"{self.weight_decay}"
            )


@dataclass(frozen=True)
class LRSchedule:
    """``model.lr_schedule``: how the optimizer's learning rate is set over batch size and epochs.

    Args:
        scheduler: ``"cosine"`` (per epoch, to ``min_lr`` at ``trainer.max_epochs``) or
            ``"none"`` (constant).
        min_lr: the cosine's floor (``eta_min``, the same for every group).
        reference_batch_size, b_noise: when given, the optimizer's ``lr`` is the rate tuned at
            ``reference_batch_size`` and each group uses the Surge rule's rate for the actual
            global batch, ``b_noise`` being the gradient noise scale (``beamvq.tuning``).
    """

    scheduler: Literal["cosine", "none"] = "cosine"
    min_lr: float = 0.0
    reference_batch_size: int | None = None
    b_noise: float | None = None

    def __post_init__(self) -> None:
        if self.scheduler not in SCHEDULERS:
            raise ValueError(
                f"model.lr_schedule.scheduler must be 'cosine' or 'none', got {self.scheduler!r}"
            )
        if not self.min_lr >= 0:
            raise ValueError(f"model.lr_schedule.min_lr must be >= 0, got {self.min_lr}")
        if self.min_lr > 0 and self.scheduler != "cosine":
            raise ValueError("model.lr_schedule.min_lr is the floor of scheduler: cosine")
        if (self.reference_batch_size is None) != (self.b_noise is None):
            raise ValueError(
                "model.lr_schedule.reference_batch_size and model.lr_schedule.b_noise go "
                "together (the Surge rule needs the batch size the optimizer's lr was tuned at "
                "and the gradient noise scale)"
            )

    @property
    def surge(self) -> bool:
        """Whether the Surge rule rescales the learning rates."""
        return self.reference_batch_size is not None


def param_groups(
    named: Iterable[tuple[str, nn.Parameter]], groups: Sequence[ParamGroup]
) -> tuple[list[dict[str, Any]], list[float]]:
    """Torch parameter groups and the lr scale of each: first the parameters no pattern matches
    (left out when there are none), then one group per ``ParamGroup`` in order.

    Raises ``ValueError`` naming a group whose pattern matches no parameter.
    """
    members: list[list[nn.Parameter]] = [[] for _ in range(len(groups) + 1)]
    for name, p in named:
        i = next((i for i, g in enumerate(groups) if fnmatchcase(name, g.pattern)), -1)
        members[i + 1].append(p)
    out: list[dict[str, Any]] = []
    scales: list[float] = []
    if members[0]:
        out.append({"params": members[0]})
        scales.append(1.0)
    for i, (g, params) in enumerate(zip(groups, members[1:])):
        if not params:
            raise ValueError(
                f"model.param_groups[{i}].pattern {g.pattern!r} matches no parameter (names look "
                "like model.backbone.<layer>.weight)"
            )
        group: dict[str, Any] = {"params": params}
        if g.weight_decay is not None:
            group["weight_decay"] = g.weight_decay
        out.append(group)
        scales.append(g.lr_scale)
    return out, scales


def global_batch_size(trainer: Any) -> int:
    """Samples per optimizer step: per-device batch × devices × gradient accumulation."""
    dm = trainer.datamodule
    if dm is None or not hasattr(dm, "batch_size"):
        raise ValueError("the learning-rate rules need a datamodule with a batch_size")
    return int(dm.batch_size) * trainer.world_size * trainer.accumulate_grad_batches


def expert_groups(model: nn.Module, trainer: Any, b_noise: float | None) -> list[ParamGroup]:
    """Expert-specific learning rates (Hunyuan-Large, arXiv 2411.02265): the specialized experts
    of each mixture-of-experts layer of ``model`` in a group of their own, at
    ``beamvq.nn.moe.expert_lr_ratio`` × the dense rate for the global batch; none without MoE."""
    layers = [
        (n, m) for n, m in model.named_modules(prefix="model") if isinstance(m, MoEFeedForward)
    ]
    if not layers:
        return []
    batch = global_batch_size(trainer)
    return [
        ParamGroup(f"{name}.experts.*", lr_scale=expert_lr_ratio(layer.config, batch, b_noise))
        for name, layer in layers
    ]


def training_progress(trainer: Any) -> float:
    """Share of the fit done, in [0, 1] (what scheduled sampling follows); 0 when unknown."""
    total = trainer.estimated_stepping_batches
    if not (isinstance(total, (int, float)) and math.isfinite(total) and total > 0):
        return 0.0
    return min(1.0, float(trainer.global_step) / float(total))


def surge_rule(schedule: LRSchedule, trainer: Any) -> Callable[[float], float]:
    """The Surge rule for ``trainer``'s global batch (per-device batch × devices × accumulation):
    the tuned rate at ``schedule.reference_batch_size`` -> the rate to train with."""
    dm = trainer.datamodule
    if dm is None or not hasattr(dm, "batch_size"):
        raise ValueError(
            "model.lr_schedule.reference_batch_size needs a datamodule with a batch_size"
        )
    global_batch = global_batch_size(trainer)
    ref, b_noise = schedule.reference_batch_size, schedule.b_noise
    return lambda lr: resolve_learning_rate(global_batch, ref, lr, b_noise)


def build_optimizer(
    optimizer: Callable[[Iterable], torch.optim.Optimizer] | None,
    named: Iterable[tuple[str, nn.Parameter]],
    groups: Sequence[ParamGroup],
    rescale: Callable[[float], float] | None = None,
) -> torch.optim.Optimizer:
    """``optimizer`` (``None``: AdamW at lr 1e-3 without weight decay) over the parameter
    groups; each group's lr is scaled, then passed through ``rescale`` (the Surge rule)."""
    named = list(named)
    if not groups:
        # one group of every parameter in order: exactly what optimizer(module.parameters()) does
        torch_groups: list[Any] = [p for _, p in named]
        scales = [1.0]
    else:
        torch_groups, scales = param_groups(named, groups)
    if optimizer is None:
        opt = torch.optim.AdamW(torch_groups, lr=1e-3, weight_decay=0.0)
    else:
        opt = optimizer(torch_groups)
    for group, scale in zip(opt.param_groups, scales):
        lr = group["lr"] * scale
        group["lr"] = rescale(lr) if rescale is not None else lr
    return opt


def build_scheduler(
    opt: torch.optim.Optimizer, schedule: LRSchedule, max_epochs: int | None
) -> dict[str, Any] | None:
    """The Lightning ``lr_scheduler`` config of ``schedule`` (``None`` for a constant rate)."""
    if schedule.scheduler == "none":
        return None
    epochs = max(1, int(max_epochs or 1))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs, eta_min=schedule.min_lr)
    return {"scheduler": sched, "interval": "epoch"}
