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
{...}}`` sets any argument (see ``configs/precision/``). The strategies add a
:class:`QuantStatsLogger` callback that logs the offload byte counters every step
(``quant/kept_bytes``, ``quant/offloaded_bytes``, ``quant/recompute_bytes``,
``quant/fetched_bytes``).

The plugin composes with ``precision="32-true"`` (the default) only: mixed-precision autocast
plugins would be replaced silently otherwise, so the strategies refuse them with an error.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Generator
from datetime import timedelta
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.plugins.precision import Precision
from pytorch_lightning.strategies import DDPStrategy, SingleDeviceStrategy, StrategyRegistry
from torch import nn

from beamvq.quant.convert import ConversionReport, convert_to_quantized
from beamvq.quant.fp8 import RECIPES, convert_float8
from beamvq.quant.layers import QuantRecipe
from beamvq.quant.offload import ActivationOffload, OffloadStats

log = logging.getLogger(__name__)

BACKENDS: tuple[str, ...] = ("simulate", "torchao", "none")


class QuantPrecision(Precision):
    """Quantize GEMM operands (simulated ExMy or real FP8) and offload saved activations.

    Args:
        backend: ``"simulate"`` (ExMy fake quantization of Linear/Conv layers, any device),
            ``"torchao"`` (real FP8 Linear layers on GPUs with compute capability >= 8.9;
            elsewhere the simulated torchao recipe, with a logged warning), ``"none"``.
        fmt, special: format of X/W operands (``"e4m3"`` + ``"fn"`` is OCP E4M3, max 448;
            ``special="none"`` is the paper's convention, E4M3 max 480).
        grad_fmt, grad_special: format of dY operands (``None``: same as ``fmt``).
        targets: operand roles to quantize (``x, w, dy_dx, w_dx, dy_dw, x_dw``); ``None``: all.
        granularity: ``"none"``, ``"tensor"``, ``"channel"`` or ``"block"`` scaling.
        block_size: elements per scale for ``"block"``.
        scale_pow2: round scales down to powers of two.
        quantize_conv: also convert Conv/ConvTranspose layers; with ``"torchao"`` (which has no
            FP8 convolution) they run the simulated torchao recipe.
        torchao_recipe: ``"tensorwise"``, ``"rowwise"`` or ``"rowwise_with_gw_hp"``.
        include, exclude: regular expressions on qualified layer names.
        offload_alpha: fraction of each saved activation offloaded (rest recomputed);
            ``None`` disables offload (saved bytes are still counted).
        offload_modules: regular expressions selecting the modules whose calls may become
            offload frames (``None``: every module inside the backbone; the outermost one
            actually called becomes the frame).
        token_dim: axis along which ``offload_alpha`` splits a saved activation.
    """

    def __init__(
        self,
        backend: str = "torchao",
        fmt: str = "e4m3",
        special: str = "fn",
        grad_fmt: str | None = "e5m2",
        grad_special: str = "ieee",
        targets: list[str] | None = None,
        granularity: str = "tensor",
        block_size: int = 32,
        scale_pow2: bool = False,
        quantize_conv: bool = True,
        torchao_recipe: str = "tensorwise",
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        offload_alpha: float | None = 1.0,
        offload_modules: list[str] | None = None,
        token_dim: int = -2,
    ) -> None:
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if torchao_recipe not in RECIPES:
            raise ValueError(f"torchao_recipe must be one of {RECIPES}, got {torchao_recipe!r}")
        self.backend = backend
        # built now so that a bad format or target fails when the config is parsed
        self.recipe = QuantRecipe.build(
            fmt, special, grad_fmt, grad_special, targets, granularity, block_size, scale_pow2
        )
        self.quantize_conv = quantize_conv
        self.torchao_recipe = torchao_recipe
        self.include = include
        self.exclude = exclude
        self.offload = ActivationOffload(offload_alpha, offload_modules, token_dim)
        self.device: torch.device | None = None
        self.report: ConversionReport | None = None
        self._module: nn.Module | None = None

    def convert_module(self, module: nn.Module) -> nn.Module:
        """Convert ``module`` in place (idempotent) and remember it for the step context."""
        self._module = module
        if self.backend == "simulate":
            self.report = convert_to_quantized(
                module,
                self.recipe,
                self.include,
                self.exclude,
                linear=True,
                conv=self.quantize_conv,
            )
        elif self.backend == "torchao":
            device = self.device
            if device is None:
                device = (
                    torch.device("cuda", torch.cuda.current_device())
                    if torch.cuda.is_available()
                    else torch.device("cpu")
                )
            self.report = convert_float8(
                module, device, self.torchao_recipe, self.include, self.exclude, self.quantize_conv
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


class FP8OffloadStrategy(_QuantStrategyMixin, SingleDeviceStrategy):
    """One-device strategy with low-precision training and activation offload.

    ``device``: ``None`` takes the Trainer's device (``accelerator``/``devices``). The other
    arguments are those of :class:`QuantPrecision`.
    """

    strategy_name = "fp8_offload"

    def __init__(
        self,
        device: str | None = None,
        backend: str = "torchao",
        fmt: str = "e4m3",
        special: str = "fn",
        grad_fmt: str | None = "e5m2",
        grad_special: str = "ieee",
        targets: list[str] | None = None,
        granularity: str = "tensor",
        block_size: int = 32,
        scale_pow2: bool = False,
        quantize_conv: bool = True,
        torchao_recipe: str = "tensorwise",
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        offload_alpha: float | None = 1.0,
        offload_modules: list[str] | None = None,
        token_dim: int = -2,
    ) -> None:
        quant = precision_from(locals())
        self._quant = quant
        self._device_arg = torch.device(device) if device is not None else None
        # filled by the Trainer with the devices it selected (accelerator / devices flags)
        self.parallel_devices: list[torch.device] | None = None
        super().__init__(device=device or "cpu", precision_plugin=quant)

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

    The quantization/offload arguments are those of :class:`QuantPrecision`; the conversion
    happens before the model is wrapped in ``DistributedDataParallel``.
    """

    strategy_name = "fp8_offload_ddp"

    def __init__(
        self,
        backend: str = "torchao",
        fmt: str = "e4m3",
        special: str = "fn",
        grad_fmt: str | None = "e5m2",
        grad_special: str = "ieee",
        targets: list[str] | None = None,
        granularity: str = "tensor",
        block_size: int = 32,
        scale_pow2: bool = False,
        quantize_conv: bool = True,
        torchao_recipe: str = "tensorwise",
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        offload_alpha: float | None = 1.0,
        offload_modules: list[str] | None = None,
        token_dim: int = -2,
        find_unused_parameters: bool = False,
        start_method: str = "popen",
        process_group_backend: str | None = None,
        timeout: timedelta = timedelta(minutes=30),
    ) -> None:
        quant = precision_from(locals())
        self._quant = quant
        super().__init__(
            precision_plugin=quant,
            process_group_backend=process_group_backend,
            timeout=timeout,
            start_method=start_method,  # type: ignore[arg-type]
            find_unused_parameters=find_unused_parameters,
        )


def precision_from(arguments: dict[str, Any]) -> QuantPrecision:
    """The ``QuantPrecision`` of a strategy's constructor arguments (its ``locals()``).

    The strategies repeat ``QuantPrecision``'s arguments in their own signatures, flat and typed,
    so that YAML and ``--trainer.strategy.init_args.*`` see them; this passes them on by name.
    """
    return QuantPrecision(**{name: arguments[name] for name in _PRECISION_ARGS})


_PRECISION_ARGS = tuple(inspect.signature(QuantPrecision.__init__).parameters)[1:]


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
