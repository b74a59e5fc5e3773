"""ConvLSTM backbone: Shi et al., "Convolutional LSTM Network: A Machine Learning Approach for
Precipitation Nowcasting", NeurIPS 2015 (arXiv 1506.04214), as OpenSTL's ``ConvLSTM_Model``.

Frames are cut into ``patch_size x patch_size`` patches stacked into channels (space-to-depth),
a stack of ConvLSTM cells (``num_hidden`` channels per layer, ``filter_size`` kernels) runs over
time, and a bias-free 1x1 convolution reads the top hidden state out to the next frame's patches.
OpenSTL's Moving-MNIST preset: ``num_hidden=[128, 128, 128, 128]``, ``filter_size=5``,
``patch_size=4``, no layer norm.

The encode / translate / decode split (shared with PredRNN through ``PatchRecurrentBackbone``):

- ``encode``: run the stack over the ``T_in`` input frames from a zero state. ``z`` is the top
  layer's hidden state after the last input frame, ``(B, num_hidden[-1], H/p, W/p)``; ``extras``
  is a flat dict of the rest of the recurrent state (``h{i}`` of the lower layers, ``c{i}`` of
  all layers, and ``m`` for PredRNN), every tensor batch-first.
- ``translate``: identity (the recurrence is the decoder's job).
- ``decode``: put the (possibly quantized) ``z`` back as the top hidden state. Output frame 1 is
  the readout of ``z``; output frame ``k + 1`` is the readout after one more stack step fed with
  output frame ``k``. So ``z`` shapes every output frame, and no future frame is ever an input.
  This is OpenSTL's rollout with its true-frame mask at zero (its test-time behaviour).

Teacher forcing / scheduled sampling is not implemented: training and evaluation run the same
free rollout. Differences from OpenSTL's cell (no dead ``conv_o``/``conv_last`` weights, forget
bias 1.0 actually added, grid-free layer norm) are listed in ``beamvq/nn/recurrent.py``.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from beamvq.backbones.base import Backbone, Encoded, divisible_grid_error
from beamvq.nn.recurrent import ConvLSTMStack, PatchRecurrentStack


class PatchRecurrentBackbone(Backbone):
    """Backbone contract over a ``PatchRecurrentStack`` (shared by ConvLSTM and PredRNN).

    Subclasses call ``super().__init__(in_steps, out_steps, in_channels, out_channels)`` and then
    set ``self.stack``; ``latent_dim`` is the top layer's width.
    """

    stack: PatchRecurrentStack

    @property
    def latent_dim(self) -> int:
        return self.stack.num_hidden[-1]

    @property
    def patch_size(self) -> int:
        return self.stack.patch_size

    def check_grid(self, height: int, width: int) -> None:
        p = self.patch_size
        if height % p or width % p:
            raise divisible_grid_error(
                type(self).__name__, height, width, p, f"frames are cut into {p}x{p} patches"
            )

    def encode(self, x: Tensor) -> Encoded:
        """``(B, T_in, C_in, H, W)`` -> ``z`` = top hidden state after the last input frame."""
        enc = self.stack.encode(x)
        return Encoded(z=enc.z, extras=enc.extras)

    def decode(self, enc: Encoded) -> Tensor:
        """Free rollout of ``out_steps`` frames from ``z``, ``(B, T_out, C_out, H, W)``."""
        return self.stack.decode(enc.z, enc.extras, self.out_steps)


class ConvLSTM(PatchRecurrentBackbone):
    """ConvLSTM forecaster (Shi et al. 2015) in OpenSTL's form; see the module docstring.

    Args:
        in_steps, out_steps, in_channels, out_channels: the backbone contract.
        num_hidden: channels of each ConvLSTM layer, bottom to top; the last is ``latent_dim``.
        filter_size: odd kernel size of the gate convolutions.
        patch_size: side of the space-to-depth patches; H and W must be multiples of it.
        layer_norm: normalize each gate convolution over (C, H, W) per sample.
    """

    def __init__(
        self,
        in_steps: int,
        out_steps: int,
        in_channels: int,
        out_channels: int,
        num_hidden: Sequence[int] = (32, 32),
        filter_size: int = 5,
        patch_size: int = 4,
        layer_norm: bool = False,
    ) -> None:
        super().__init__(in_steps, out_steps, in_channels, out_channels)
        self.stack = ConvLSTMStack(
            in_channels, out_channels, out_steps, num_hidden, filter_size, patch_size, layer_norm
        )


__all__ = ["ConvLSTM", "PatchRecurrentBackbone"]
