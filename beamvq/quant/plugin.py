"""Lightning precision plugin and strategies for low-precision training with activation offload.

:class:`QuantPrecision` (a ``pytorch_lightning`` ``Precision`` plugin) converts the model in
place in ``convert_module`` (ExMy simulation of any format, real FP8 through torchao, or no
quantization) and wraps every training step in the activation-offload context of
:mod:`beamvq.quant.offload` (MEMO, arXiv 2407.12117). The ExMy formats, operand roles and
scalings follow *Scaling Laws for Floating-Point Quantization Training* (arXiv 2501.02423).

:class:`FP8OffloadStrategy` (one device) and :class:`FP8OffloadDDPStrategy` carry that plugin,
so a single ``--trainer.strategy`` choice selects everything. They are registered with
Lightning's ``StrategyRegistry`` when ``beamvq.quant`` is imported:

``fp8_offload``            one device, defaults below (real FP8 where possible, alpha = 1)
``fp8_offload_ddp``        DDP, ``start_method="popen"``
``fp8_offload_ddp_spawn``  DDP, ``start_method="spawn"``

In YAML, ``trainer.strategy: {class_path: beamvq.quant.plugin.FP8OffloadStrategy, init_args:
{quant: {...}}}`` sets any field of :class:`beamvq.quant.config.QuantConfig` (see
``configs/precision/``); on the command line ``--trainer.strategy.quant.fmt e3m2``. The strategies add a
:class:`QuantStatsLogger` callback that logs the offload byte counters every step
(``quant/kept_bytes``, ``quant/offloaded_bytes``, ``quant/recompute_bytes``,
``quant/fetched_bytes``).

The plugin composes with ``precision="32-true"`` (the default) only: mixed-precision autocast
plugins would be replaced silently otherwise, so the strategies refuse them with an error.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Generator
from datetime import timedelta
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.plugins.precision import Precision
from pytorch_lightning.strategies import DDPStrategy, SingleDeviceStrategy, StrategyRegistry
from torch import nn

from beamvq.arguments import one_of
from beamvq.quant.config import QuantConfig
from beamvq.quant.convert import ConversionReport, convert_to_quantized
from beamvq.quant.fp8 import convert_float8
from beamvq.quant.offload import ActivationOffload, OffloadStats

# DDPStrategy's start methods (Lightning checks them only when the processes are launched)
START_METHODS = ("popen", "spawn", "fork", "forkserver")

log = logging.getLogger(__name__)


class QuantPrecision(Precision):
    """Quantize GEMM operands (simulated ExMy or real FP8) and offload saved activations.

    ``quant``: what to quantize and offload (:class:`QuantConfig`; ``None``: its defaults, real
    FP8 where possible and offload alpha = 1).
    """

    def __init__(self, quant: QuantConfig | None = None) -> None:
        super().__init__()
        self.quant = quant if quant is not None else QuantConfig()
        self.recipe = self.quant.recipe()
        self.offload = ActivationOffload(
            self.quant.offload_alpha, self.quant.offload_modules, self.quant.token_dim
        )
        self.device: torch.device | None = None
        self.report: ConversionReport | None = None
        self._module: nn.Module | None = None

    def convert_module(self, module: nn.Module) -> nn.Module:
        """Convert ``module`` in place (idempotent) and remember it for the step context."""
        self._module = module
        quant = self.quant
        if quant.backend == "simulate":
            self.report = convert_to_quantized(
                module, self.recipe, quant.include, quant.exclude, conv=quant.quantize_conv
            )
        elif quant.backend == "torchao":
            device = self.device
            if device is None:
                device = (
                    torch.device("cuda", torch.cuda.current_device())
                    if torch.cuda.is_available()
                    else torch.device("cpu")
                )
            self.report = convert_float8(
                module,
                device,
                quant.torchao_recipe,
                quant.include,
                quant.exclude,
                quant.quantize_conv,
            )
        else:
            self.report = ConversionReport("none", [], [], [])
        if self.offload.enabled:
            candidates = [name for name, _ in self.offload.select_modules(module)]
            log.info(
                "Activation offload alpha=%s: %d candidate frame modules, outermost called first: %s",
                self.offload.alpha,
                len(candidates),
                candidates[:8],
            )
        return module

    @contextlib.contextmanager
    def train_step_context(self) -> Generator[None, None, None]:
        if self._module is None:
            yield
            return
        with self.offload.step(self._module):
            yield

    @property
    def stats(self) -> OffloadStats:
        """Saved-activation byte counters of the latest training step."""
        return self.offload.stats


class QuantStatsLogger(pl.Callback):
    """Logs the offload byte counters of :class:`QuantPrecision` after every training batch."""

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        plugin = trainer.strategy.precision_plugin
        if not isinstance(plugin, QuantPrecision):
            return
        stats = plugin.stats
        metrics = {
            "quant/kept_bytes": float(stats.kept_bytes),
            "quant/offloaded_bytes": float(stats.offloaded_bytes),
            "quant/recompute_bytes": float(stats.recompute_bytes),
            "quant/fetched_bytes": float(stats.fetched_bytes),
        }
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1)


class _QuantStrategyMixin:
    """Keeps the :class:`QuantPrecision` plugin against the Trainer's default one."""

    _quant: QuantPrecision

    @property
    def precision_plugin(self) -> Precision:
        return self._quant

    @precision_plugin.setter
    def precision_plugin(self, plugin: Precision | None) -> None:
        if plugin is None:
            return
        if isinstance(plugin, QuantPrecision):
            self._quant = plugin
            return
        if type(plugin) is Precision:
            # the Trainer's "32-true" default: the quantization plugin already covers it
            return
        raise ValueError(
            f"{type(self).__name__} carries its own precision plugin and composes with "
            f"precision='32-true' only; got {type(plugin).__name__}. Remove `precision` from the "
            "Trainer arguments or pick another strategy."
        )

    def setup(self, trainer: pl.Trainer) -> None:
        self._quant.device = self.root_device  # type: ignore[attr-defined]
        if not any(isinstance(c, QuantStatsLogger) for c in trainer.callbacks):
            trainer.callbacks.append(QuantStatsLogger())
        super().setup(trainer)  # type: ignore[misc]


def _device(device: str | None) -> torch.device | None:
    """``trainer.strategy.init_args.device`` as a ``torch.device`` (``None`` stays ``None``)."""
    if device is None:
        return None
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(
            f"trainer.strategy.init_args.device must be a torch device such as 'cpu' or "
            f"'cuda:0', got {device!r} ({err})"
        ) from None


class FP8OffloadStrategy(_QuantStrategyMixin, SingleDeviceStrategy):
    """One-device strategy with low-precision training and activation offload.

    ``device``: ``None`` takes the Trainer's device (``accelerator``/``devices``). ``quant``:
    the :class:`QuantConfig` of its :class:`QuantPrecision` plugin (``None``: the defaults).
    """

    strategy_name = "fp8_offload"

    def __init__(self, device: str | None = None, quant: QuantConfig | None = None) -> None:
        self._quant = QuantPrecision(quant)
        self._device_arg = _device(device)
        # filled by the Trainer with the devices it selected (accelerator / devices flags)
        self.parallel_devices: list[torch.device] | None = None
        super().__init__(device=device or "cpu", precision_plugin=self._quant)

    @property
    def root_device(self) -> torch.device:
        if self._device_arg is not None:
            return self._device_arg
        if self.parallel_devices:
            if len(self.parallel_devices) > 1:
                raise ValueError(
                    f"{self.strategy_name} runs on one device; use fp8_offload_ddp for "
                    f"{len(self.parallel_devices)} devices"
                )
            return self.parallel_devices[0]
        return torch.device("cpu")


class FP8OffloadDDPStrategy(_QuantStrategyMixin, DDPStrategy):
    """DDP strategy with low-precision training and activation offload.

    ``quant`` is the :class:`QuantConfig` of its :class:`QuantPrecision` plugin; the conversion
    happens before the model is wrapped in ``DistributedDataParallel``. The other arguments are
    ``DDPStrategy``'s.
    """

    strategy_name = "fp8_offload_ddp"

    def __init__(
        self,
        quant: QuantConfig | None = None,
        find_unused_parameters: bool = False,
        start_method: str = "popen",
        process_group_backend: str | None = None,
        timeout: timedelta = timedelta(minutes=30),
    ) -> None:
        one_of("trainer.strategy.init_args.start_method", start_method, START_METHODS)
        self._quant = QuantPrecision(quant)
        super().__init__(
            precision_plugin=self._quant,
            process_group_backend=process_group_backend,
            timeout=timeout,
            start_method=start_method,  # type: ignore[arg-type]
            find_unused_parameters=find_unused_parameters,
        )


def register_strategies() -> None:
    """Register the strategy names with Lightning (idempotent)."""
    StrategyRegistry.register(
        "fp8_offload",
        FP8OffloadStrategy,
        description="FP8/ExMy low-precision training with activation offload on one device",
        override=True,
    )
    for name, start_method in (("fp8_offload_ddp", "popen"), ("fp8_offload_ddp_spawn", "spawn")):
        StrategyRegistry.register(
            name,
            FP8OffloadDDPStrategy,
            description=f"FP8/ExMy training with activation offload, DDP ({start_method})",
            override=True,
            start_method=start_method,
        )
