"""The backbone contract shared by every forecaster in beamvq.

A backbone maps ``x: (B, T_in, C_in, H, W)`` to ``y: (B, T_out, C_out, H, W)`` through three
stages so that a vector-quantization bottleneck can sit between the encoder and the rest
(BeamVQ, arXiv 2405.17051 / 2502.18925):

``encode(x) -> Encoded``      the latent ``z`` (channel-first ``(B, D, ...)``) plus private extras
``translate(Encoded) -> Encoded``  latent dynamics (identity for pure encoder-decoders)
``decode(Encoded) -> y``      back to frames

``forward = decode ∘ translate ∘ encode``. ``latent_dim`` is ``D``, the channel width of ``z``;
the bottleneck is built from it. ``extras`` holds whatever the decoder needs besides ``z`` (skip
connections, recurrent state): a tensor, or a tuple/dict of tensors, each with batch first, so
``VQForecaster.candidates`` can repeat it for K candidates with one tree map.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar, NamedTuple

from torch import Tensor, nn

from beamvq.arguments import backbone_key, positive_int
from beamvq.nn.moe import begin_aux_collection, pop_aux_loss, pop_stats


class Encoded(NamedTuple):
    """What ``encode`` returns: the latent to quantize and backbone-private extras."""

    z: Tensor
    extras: Any = None


class Backbone(nn.Module, ABC):
    """Base class of the ten backbones.

    Subclasses call ``super().__init__(in_steps, out_steps, in_channels, out_channels)`` and set
    ``self.latent_dim`` (channel width of ``Encoded.z``). Constructors take flat typed arguments
    only: no config objects, no ``**kwargs``.

    ``grid_args`` declares a grid-bound backbone (one built for one grid size, e.g. with
    position embeddings): the names of its constructor arguments that take the grid's height
    and width, in that order. Tests, benchmarks and configs that build a backbone for a grid
    use :meth:`grid_kwargs` instead of guessing from the signature.
    """

    latent_dim: int
    grid_args: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def grid_kwargs(cls, height: int, width: int) -> dict[str, int]:
        """Constructor arguments for a ``height x width`` grid (empty for grid-free backbones)."""
        if cls.grid_args and len(cls.grid_args) != 2:
            raise TypeError(
                f"{cls.__name__}.grid_args must name (height, width), got {cls.grid_args}"
            )
        return dict(zip(cls.grid_args, (int(height), int(width))))

    def __init__(self, in_steps: int, out_steps: int, in_channels: int, out_channels: int) -> None:
        super().__init__()
        for name, value in (
            ("in_steps", in_steps),
            ("out_steps", out_steps),
            ("in_channels", in_channels),
            ("out_channels", out_channels),
        ):
            positive_int(backbone_key(type(self).__name__, name), value)
        self.in_steps = int(in_steps)
        self.out_steps = int(out_steps)
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)

    # -- grid constraints --------------------------------------------------------------------
    def check_grid(self, height: int, width: int) -> None:
        """Raise ``ValueError`` naming the allowed sizes when ``(height, width)`` cannot be used.

        The default accepts any grid; backbones with patches or pooling override it.
        """

    def check_input(self, x: Tensor) -> None:
        """Raise a clear ``ValueError`` when ``x`` is not ``(B, in_steps, in_channels, H, W)``."""
        name = type(self).__name__
        if x.ndim != 5:
            raise ValueError(
                f"{name}: input must be (B, T_in, C, H, W) with T_in={self.in_steps}, "
                f"C={self.in_channels}; got a {x.ndim}-d tensor of shape {tuple(x.shape)}"
            )
        if x.shape[1] != self.in_steps or x.shape[2] != self.in_channels:
            raise ValueError(
                f"{name}: input must be (B, T_in={self.in_steps}, C={self.in_channels}, H, W); "
                f"got shape {tuple(x.shape)}"
            )
        self.check_grid(int(x.shape[-2]), int(x.shape[-1]))

    # -- the contract ------------------------------------------------------------------------
    @abstractmethod
    def encode(self, x: Tensor) -> Encoded:
        """``(B, T_in, C_in, H, W)`` -> ``Encoded`` with ``z`` of shape ``(B, latent_dim, ...)``."""

    def translate(self, enc: Encoded) -> Encoded:
        """Latent dynamics; identity unless the backbone has a separate translator."""
        return enc

    @abstractmethod
    def decode(self, enc: Encoded) -> Tensor:
        """``Encoded`` -> ``(B, T_out, C_out, H, W)``."""

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        return self.decode(self.translate(self.encode(x)))

    # -- training hooks ----------------------------------------------------------------------
    # The forecast module calls these around each training step; the defaults serve every
    # backbone (they handle mixture-of-experts layers wherever a backbone has them, and do
    # nothing otherwise). Order within a step: begin_training_step -> forward(s) -> extra_loss
    # -> training_log_values.
    def begin_training_step(self, target: Tensor, progress: float) -> None:
        """Start of a training step, before its forward.

        ``target``: the step's normalized ground truth ``(B, T, C_out, H, W)`` (``T`` may span
        several rollout steps; a backbone reads its first ``out_steps`` frames). ``progress``:
        the share of training done, in ``[0, 1]`` (scheduled sampling follows it). What a
        backbone keeps from here is consumed by its next forward in training mode only.
        The default starts collecting the MoE layers' load-balancing losses.
        """
        begin_aux_collection(self)

    def extra_loss(self, pred: Tensor, target: Tensor) -> Tensor:
        """Backbone-specific training-loss term, added to the MSE by the module.

        ``pred``, ``target``: the step's normalized prediction and ground truth, both
        ``(B, T, C_out, H, W)``. The default is the MoE load-balancing loss of the forwards since
        :meth:`begin_training_step` (a zero scalar without MoE layers).
        """
        return pop_aux_loss(self, pred)

    def training_log_values(self) -> dict[str, Tensor]:
        """Scalars to log after a training step (``moe/*`` routing statistics by default:
        per-expert token share, recycled and dropped shares); empty without MoE layers."""
        stats = pop_stats(self)
        return {} if stats is None else stats.log_values()


def divisible_grid_error(name: str, height: int, width: int, factor: int, why: str) -> ValueError:
    """The one wording for 'this grid is not allowed' errors, naming the allowed sizes."""
    return ValueError(
        f"{name}: grid {height}x{width} is not allowed: height and width must be multiples of "
        f"{factor} ({why}); e.g. {max(factor, (height // factor) * factor)}x"
        f"{max(factor, (width // factor) * factor)}"
    )


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters (what papers report)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


__all__ = ["Backbone", "Encoded", "count_parameters", "divisible_grid_error"]
