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

Training can use PredRNN's scheduled sampling or PredRNN-V2's reverse scheduled sampling
(``sampling``, :mod:`beamvq.nn.sampling`; off by default, so training runs the free rollout as
evaluation always does). It needs the true frames and the training progress, which the module
hands over through the backbone hook ``begin_training_step(target, progress)``; the next
training-mode ``encode`` (reverse sampling) and ``decode`` (scheduled sampling) use them, then
they are dropped, so only the first rollout step of a training step is teacher-forced and
candidate decodes run free. Differences from OpenSTL's cell (no dead ``conv_o``/``conv_last`` weights, forget
bias 1.0 actually added, grid-free layer norm) are listed in ``beamvq/nn/recurrent.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

from torch import Tensor

from beamvq.arguments import backbone_key, int_list, odd_int, positive_int
from beamvq.backbones.base import Backbone, Encoded, divisible_grid_error
from beamvq.nn.recurrent import ConvLSTMStack, PatchRecurrentStack
from beamvq.nn.sampling import ScheduledSampling, Teacher, true_frame_probabilities


class PatchRecurrentBackbone(Backbone):
    """Backbone contract over a ``PatchRecurrentStack`` (shared by ConvLSTM and PredRNN).

    Subclasses call ``super().__init__(in_steps, out_steps, in_channels, out_channels)``, then
    ``self.set_sampling(sampling)`` and set ``self.stack``; ``latent_dim`` is the top layer's
    width.
    """

    stack: PatchRecurrentStack
    sampling: ScheduledSampling | None = None
    _teacher: Teacher | None = None

    def check_stack_arguments(
        self, num_hidden: Sequence[int], filter_size: int, patch_size: int
    ) -> None:
        """The stack's arguments, named by their YAML keys, before the stack is built."""
        key = partial(backbone_key, type(self).__name__)
        int_list(key("num_hidden"), num_hidden)
        odd_int(key("filter_size"), filter_size)
        positive_int(key("patch_size"), patch_size)

    def set_sampling(self, sampling: ScheduledSampling | None) -> None:
        """Validate and keep the (reverse) scheduled-sampling option (``None``: off)."""
        if sampling is not None and self.in_channels != self.out_channels:
            raise ValueError(
                f"{type(self).__name__}: sampling needs in_channels == out_channels (a true or "
                f"predicted frame replaces an input frame); got {self.in_channels} and "
                f"{self.out_channels}"
            )
        self.sampling = sampling
        self._teacher = None

    def begin_training_step(self, target: Tensor, progress: float) -> None:
        """Keep the first ``out_steps`` true frames and the schedule at ``progress`` for the
        next training forward (see the module docstring)."""
        super().begin_training_step(target, progress)
        if self.sampling is None:
            return
        if target.shape[1] < self.out_steps:
            raise ValueError(
                f"{type(self).__name__}.begin_training_step: target has {target.shape[1]} "
                f"frames, scheduled sampling needs out_steps={self.out_steps}"
            )
        probs = true_frame_probabilities(self.sampling, progress)
        self._teacher = Teacher(target[:, : self.out_steps].detach(), probs)

    def _active_teacher(self, batch: int) -> Teacher | None:
        teacher = self._teacher
        if not self.training or teacher is None or teacher.frames.shape[0] != batch:
            return None
        return teacher

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
        teacher = self._active_teacher(x.shape[0])
        enc = self.stack.encode(x, 1.0 if teacher is None else teacher.probs.encoder)
        return Encoded(z=enc.z, extras=enc.extras)

    def decode(self, enc: Encoded) -> Tensor:
        """Rollout of ``out_steps`` frames from ``z``, ``(B, T_out, C_out, H, W)``: free, or
        scheduled-sampled once after ``begin_training_step`` in training."""
        teacher = self._active_teacher(enc.z.shape[0])
        if teacher is None:
            return self.stack.decode(enc.z, enc.extras, self.out_steps)
        self._teacher = None  # consumed: later rollout steps and candidate decodes run free
        return self.stack.decode(
            enc.z, enc.extras, self.out_steps, teacher.frames, teacher.probs.decoder
        )


class ConvLSTM(PatchRecurrentBackbone):
    """ConvLSTM forecaster (Shi et al. 2015) in OpenSTL's form; see the module docstring.

    Args:
        in_steps, out_steps, in_channels, out_channels: the backbone contract.
        num_hidden: channels of each ConvLSTM layer, bottom to top; the last is ``latent_dim``.
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
        self.stack = ConvLSTMStack(
            in_channels, out_channels, out_steps, num_hidden, filter_size, patch_size, layer_norm
        )


__all__ = ["ConvLSTM", "PatchRecurrentBackbone"]
