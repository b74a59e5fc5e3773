"""Fourier Neural Operator, the 2-D Navier–Stokes "FNO-2d" variant.

Li, Kovachki, Azizzadenesheli, Liu, Bhattacharya, Stuart, Anandkumar, *Fourier Neural Operator
for Parametric Partial Differential Equations*, ICLR 2021 (arXiv 2010.08895); reference code
``fourier_2d_time.py`` of github.com/neuraloperator/neuraloperator.

Architecture (as in the reference): the ``T_in`` input frames are stacked in channels and two
coordinate channels ``(x, y)`` on ``linspace(0, 1)`` are appended; a pointwise lift ``P``
(``nn.Linear`` to ``width``); ``num_layers`` Fourier layers ``u <- σ(K u + W u)`` with ``K`` a
:class:`~beamvq.nn.spectral.SpectralConv2d` on the lowest ``modes x modes`` modes and ``W`` a 1x1
convolution, GELU after every layer but the last; a pointwise projection ``Q``
(``width -> projection_width -> T_out * C_out``, GELU between). The ``T_out`` frames come out in
one shot (stacked in channels), not one step at a time as in the reference's recurrent loop.

Where the latent sits: ``encode`` = coordinates + lift + the first ``encoder_layers`` Fourier
layers; ``z = (B, width, H, W)``, full resolution (an FNO never downsamples, so the
per-position vector of width ``width`` is what the VQ bottleneck quantizes). ``translate`` is the
identity. ``decode`` = the remaining Fourier layers + projection.

Choices the paper leaves open or that differ between versions of the reference:

- Grids: any ``H, W``. On a grid too coarse for ``modes`` the spectral layers use every mode the
  grid has (``min(modes, H // 2)`` rows, ``min(modes, W // 2 + 1)`` columns), the
  discretization-invariant reading of the operator; see ``SpectralConv2d``. No padding is applied:
  the benchmark fields are periodic (the reference's padding for non-periodic domains is
  commented out for Navier–Stokes).
- ``batch_norm=True`` applies ``BatchNorm2d`` after each ``K u + W u`` as the paper-era code
  did; the current reference defines these layers but no longer uses them. The activation is
  GELU (current reference) in both cases; the paper-era code used ReLU (no parameters, so the
  count below is unaffected).

Parameter count (complex spectral weights counted as 2 reals, as the paper does):
``lift (T_in*C_in + 2 + 1)*width`` + per layer ``4*width²*modes²`` (K) ``+ width² + width`` (W)
``[+ 2*width`` (BatchNorm)] ``+ projection (width + 1)*proj + (proj + 1)*T_out*C_out``.

The paper reports **414,517** parameters for FNO-2D on Navier–Stokes. That is exactly
``FNO(in_steps=10, out_steps=1, in_channels=1, out_channels=1, modes=8, width=20,
batch_norm=True)``: 260 + 4 * (102,400 + 420 + 40) + 2,688 + 129. With the reference script's
``modes = 12`` the same network has 926,517 (926,357 without BatchNorm); the reference's own
comment loads a model named ``..._m8_w20``, consistent with the published figure being the
``modes = 8`` network.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from beamvq.arguments import backbone_key, non_negative_int, positive_int
from beamvq.backbones.base import Backbone, Encoded
from beamvq.nn.spectral import SpectralConv2d


class FourierLayer(nn.Module):
    """One FNO layer ``σ(K u + W u)`` (optionally batch-normalized before ``σ``)."""

    def __init__(self, width: int, modes: int, batch_norm: bool, activation: bool) -> None:
        super().__init__()
        self.spectral = SpectralConv2d(width, width, modes, modes)
        self.pointwise = nn.Conv2d(width, width, kernel_size=1)
        self.norm: nn.Module = nn.BatchNorm2d(width) if batch_norm else nn.Identity()
        self.activation = activation

    def forward(self, u: Tensor) -> Tensor:
        u = self.norm(self.spectral(u) + self.pointwise(u))
        return F.gelu(u) if self.activation else u


class FNO(Backbone):
    """FNO-2d with time stacked in channels; ``z`` is the field after ``encoder_layers`` layers.

    Args:
        in_steps, out_steps, in_channels, out_channels: the backbone contract.
        modes: Fourier modes kept per axis in every spectral layer (``modes1 = modes2``).
        width: channel width of the Fourier layers, and so the latent width ``D``.
        num_layers: number of Fourier layers (4 in the paper).
        encoder_layers: how many of them ``encode`` runs (0 .. ``num_layers``).
        projection_width: hidden width of the projection ``Q`` (128 in the paper).
        batch_norm: BatchNorm after each Fourier layer, as the paper-era reference code.
    """

    def __init__(
        self,
        in_steps: int,
        out_steps: int,
        in_channels: int,
        out_channels: int,
        modes: int = 12,
        width: int = 20,
        num_layers: int = 4,
        encoder_layers: int = 2,
        projection_width: int = 128,
        batch_norm: bool = False,
    ) -> None:
        super().__init__(in_steps, out_steps, in_channels, out_channels)
        key = partial(backbone_key, "FNO")
        for arg, value in (
            ("modes", modes), ("width", width), ("num_layers", num_layers),
            ("projection_width", projection_width),
        ):  # fmt: skip
            positive_int(key(arg), value)
        non_negative_int(key("encoder_layers"), encoder_layers)
        if not encoder_layers <= num_layers:
            raise ValueError(
                f"{key('encoder_layers')} must be in [0, num_layers={num_layers}], got "
                f"{encoder_layers}"
            )
        self.modes = modes
        self.width = width
        self.latent_dim = width
        self.encoder_layers = encoder_layers
        # + 2: the (x, y) coordinate channels of the reference.
        self.lift = nn.Linear(in_steps * in_channels + 2, width)
        self.layers = nn.ModuleList(
            FourierLayer(width, modes, batch_norm, activation=i < num_layers - 1)
            for i in range(num_layers)
        )
        self.project_hidden = nn.Linear(width, projection_width)
        self.project_out = nn.Linear(projection_width, out_steps * out_channels)

    @staticmethod
    def coordinates(x: Tensor) -> Tensor:
        """``(B, H, W, 2)`` grid coordinates on ``[0, 1]`` (first axis, second axis)."""
        batch, height, width = x.shape[0], x.shape[-2], x.shape[-1]
        kw = {"device": x.device, "dtype": x.dtype}
        grid_h, grid_w = torch.meshgrid(
            torch.linspace(0, 1, height, **kw), torch.linspace(0, 1, width, **kw), indexing="ij"
        )
        grid = torch.stack((grid_h, grid_w), dim=-1)
        return grid.expand(batch, height, width, 2)

    def encode(self, x: Tensor) -> Encoded:
        u = rearrange(x, "b t c h w -> b h w (t c)")
        u = torch.cat((u, self.coordinates(x)), dim=-1)
        u = rearrange(self.lift(u), "b h w d -> b d h w")
        for layer in self.layers[: self.encoder_layers]:
            u = layer(u)
        return Encoded(z=u)

    def decode(self, enc: Encoded) -> Tensor:
        u = enc.z
        for layer in self.layers[self.encoder_layers :]:
            u = layer(u)
        u = rearrange(u, "b d h w -> b h w d")
        u = self.project_out(F.gelu(self.project_hidden(u)))
        return rearrange(u, "b h w (t c) -> b t c h w", t=self.out_steps, c=self.out_channels)


__all__ = ["FNO", "FourierLayer"]
