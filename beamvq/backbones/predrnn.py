"""PredRNN backbone: Wang et al., "PredRNN: Recurrent Neural Networks for Predictive Learning using
Spatiotemporal LSTMs", NeurIPS 2017, and "PredRNN: A Recurrent Neural Network for Spatiotemporal
Predictive Learning", TPAMI 2022 (arXiv 2103.09504), as OpenSTL's ``PredRNN_Model``.

Frames are cut into ``patch_size x patch_size`` patches stacked into channels, a stack of
spatiotemporal LSTM (ST-LSTM) cells runs over time, and a bias-free 1x1 convolution reads the
top hidden state out to the next frame's patches. Each cell has a temporal memory ``C`` (per
layer, along time) and a spatiotemporal memory ``M`` that zigzags: bottom -> top within a time
step, and the top layer's ``M`` enters the bottom layer at the next step. ``M`` passes through
every layer, so all layers have the same width. OpenSTL's Moving-MNIST preset:
``num_hidden=[128, 128, 128, 128]``, ``filter_size=5``, ``patch_size=4``, no layer norm.

The encode / translate / decode split is the one of ``beamvq.backbones.convlstm`` (shared
``PatchRecurrentBackbone``): ``z`` is the top layer's ``h`` after the last input frame; ``extras``
holds the lower layers' ``h``, every layer's ``C``, and ``m`` (the top layer's ``M`` after the
last input frame, which the bottom layer reads at the first decoding step); ``decode`` reads
frame 1 out of ``z`` and feeds each prediction back as the next input, never a future frame.
Training can use PredRNN's scheduled sampling or PredRNN-V2's reverse scheduled sampling
(``sampling``, off by default; see ``beamvq.backbones.convlstm`` and :mod:`beamvq.nn.sampling`).
PredRNN-V2's memory decoupling loss is not implemented.
"""

from __future__ import annotations

from collections.abc import Sequence

from beamvq.backbones.convlstm import PatchRecurrentBackbone
from beamvq.nn.recurrent import SpatioTemporalLSTMStack
from beamvq.nn.sampling import ScheduledSampling


class PredRNN(PatchRecurrentBackbone):
    """PredRNN forecaster (Wang et al. 2017) in OpenSTL's form; see the module docstring.

    Args:
        in_steps, out_steps, in_channels, out_channels: the backbone contract.
        num_hidden: channels of each ST-LSTM layer, bottom to top, all equal; the last is
            ``latent_dim``.
        filter_size: odd kernel size of the gate convolutions.
        patch_size: side of the space-to-depth patches; H and W must be multiples of it.
        layer_norm: normalize each gate convolution over (C, H, W) per sample.
        sampling: (reverse) scheduled sampling in training (:mod:`beamvq.nn.sampling`);
            ``None`` (default): the free rollout.
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
        sampling: ScheduledSampling | None = None,
    ) -> None:
        super().__init__(in_steps, out_steps, in_channels, out_channels)
        self.check_stack_arguments(num_hidden, filter_size, patch_size)
        self.set_sampling(sampling)
        self.stack = SpatioTemporalLSTMStack(
            in_channels, out_channels, out_steps, num_hidden, filter_size, patch_size, layer_norm
        )


__all__ = ["PredRNN"]
