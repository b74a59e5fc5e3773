"""Convolutional recurrent cells and the patch-based recurrent stack shared by ConvLSTM and PredRNN.

References:

- ConvLSTM cell: Shi et al., "Convolutional LSTM Network: A Machine Learning Approach for
  Precipitation Nowcasting", NeurIPS 2015 (arXiv 1506.04214), as in OpenSTL's ``ConvLSTMCell``
  (``openstl/modules/convlstm_modules.py``): gates from ``conv_x(x) + conv_h(h)``, no bias, no
  peepholes.
- Spatiotemporal LSTM (ST-LSTM) cell: Wang et al., "PredRNN: Recurrent Neural Networks for
  Predictive Learning using Spatiotemporal LSTMs", NeurIPS 2017, and PredRNN, TPAMI 2022
  (arXiv 2103.09504), as in OpenSTL's ``SpatioTemporalLSTMCell``
  (``openstl/modules/predrnn_modules.py``): a temporal memory ``C`` and a spatiotemporal memory
  ``M``, ``H = o * tanh(conv1x1([C, M]))``.
- The stack (OpenSTL's ``ConvLSTM_Model`` / ``PredRNN_Model``): frames are cut into
  ``patch_size x patch_size`` patches stacked into channels (space-to-depth), run through a stack
  of cells, and a bias-free 1x1 convolution reads the top hidden state out to the next frame's
  patches. PredRNN's ``M`` zigzags: bottom -> top within a step, and the top layer's ``M`` enters
  the bottom layer at the next step.

Choices that differ from OpenSTL, and why:

- OpenSTL's ``ConvLSTMCell`` builds ``conv_o`` and ``conv_last`` but never uses them (its forward
  only reads ``conv_x`` and ``conv_h``). They are left out here, so every parameter is trained;
  OpenSTL's published 15.0 M for its Moving-MNIST ConvLSTM counts these 3.41 M dead weights (its
  published FLOPs do not), see ``tests/test_convlstm.py``.
- OpenSTL's ``ConvLSTMCell`` defines ``_forget_bias = 1.0`` but never adds it; here both cells add
  the constant forget-gate bias of 1.0 (as OpenSTL's ST-LSTM does), so an untrained cell keeps its
  memory instead of halving it every step. It adds no parameter.
- ``layer_norm``: OpenSTL uses ``nn.LayerNorm([C, H, W])``, which ties the model to one grid size.
  ``nn.GroupNorm(1, C)`` normalizes over the same ``(C, H, W)`` elements per sample, with a
  per-channel instead of a per-pixel affine, so the model works on any grid.
- The stride argument of OpenSTL is dropped: any stride but 1 breaks the recurrence's shapes.

The encode/decode split used by the backbones (see ``PatchRecurrentStack``): ``encode`` runs the
stack over the ``T_in`` input frames and returns the top layer's hidden state after the last
input frame as ``z``, the rest of the recurrent state as ``extras``; ``decode`` puts ``z`` back
as the top hidden state, reads frame 1 out of it, and rolls the stack forward feeding each
prediction back as the next input. This is OpenSTL's schedule without teacher forcing: the
forecast never sees a future frame. In training, (reverse) scheduled sampling
(:mod:`beamvq.nn.sampling`) may replace inputs by true frames (decoder) or by the model's own
predictions (encoder); evaluation always runs the free rollout.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import NamedTuple

import torch
from einops import rearrange
from torch import Tensor, nn

from beamvq.nn.sampling import mix_frames

# The constant added to the forget gates' pre-activation (Gers et al. 2000; OpenSTL's ST-LSTM).
FORGET_BIAS: float = 1.0


def patchify(x: Tensor, patch_size: int) -> Tensor:
    """Space-to-depth: ``(..., C, H, W)`` -> ``(..., C * p * p, H / p, W / p)``."""
    return rearrange(x, "... c (h p1) (w p2) -> ... (c p1 p2) h w", p1=patch_size, p2=patch_size)


def unpatchify(x: Tensor, patch_size: int) -> Tensor:
    """Depth-to-space, inverse of ``patchify``: ``(..., C p p, h, w)`` -> ``(..., C, h p, w p)``."""
    return rearrange(x, "... (c p1 p2) h w -> ... c (h p1) (w p2)", p1=patch_size, p2=patch_size)


def _gate_conv(
    in_channels: int, out_channels: int, filter_size: int, layer_norm: bool
) -> nn.Module:
    """Bias-free 'same' convolution, optionally followed by a per-sample norm over (C, H, W)."""
    conv = nn.Conv2d(in_channels, out_channels, filter_size, padding=filter_size // 2, bias=False)
    if not layer_norm:
        return conv
    return nn.Sequential(conv, nn.GroupNorm(1, out_channels))


def _check_filter_size(filter_size: int) -> None:
    if filter_size < 1 or filter_size % 2 == 0:
        # An even kernel with padding k // 2 changes the map size; the recurrence cannot absorb it.
        raise ValueError(f"filter_size must be a positive odd integer, got {filter_size}")


class LSTMOut(NamedTuple):
    """New hidden state and temporal memory of a ConvLSTM cell."""

    h: Tensor
    c: Tensor


class STLSTMOut(NamedTuple):
    """New hidden state, temporal memory ``C`` and spatiotemporal memory ``M`` (ST-LSTM)."""

    h: Tensor
    c: Tensor
    m: Tensor


class ConvLSTMCell(nn.Module):
    """ConvLSTM cell (Shi et al. 2015) in OpenSTL's form: gates from two bias-free convolutions.

    ``i, f, g, o = split(conv_x(x) + conv_h(h))``; ``c' = σ(f + 1) c + σ(i) tanh(g)``;
    ``h' = σ(o) tanh(c')``. Maps keep their size (odd ``filter_size``, 'same' padding).
    """

    def __init__(
        self, in_channels: int, num_hidden: int, filter_size: int, layer_norm: bool = False
    ) -> None:
        super().__init__()
        _check_filter_size(filter_size)
        self.num_hidden = num_hidden
        self.conv_x = _gate_conv(in_channels, 4 * num_hidden, filter_size, layer_norm)
        self.conv_h = _gate_conv(num_hidden, 4 * num_hidden, filter_size, layer_norm)

    def forward(self, x: Tensor, h: Tensor, c: Tensor) -> LSTMOut:
        i, f, g, o = torch.split(self.conv_x(x) + self.conv_h(h), self.num_hidden, dim=1)
        c_new = torch.sigmoid(f + FORGET_BIAS) * c + torch.sigmoid(i) * torch.tanh(g)
        h_new = torch.sigmoid(o) * torch.tanh(c_new)
        return LSTMOut(h=h_new, c=c_new)


class SpatioTemporalLSTMCell(nn.Module):
    """ST-LSTM cell (PredRNN, Wang et al. 2017, eq. 3), in OpenSTL's form.

    Temporal memory ``C`` (gates from ``x`` and ``h``), spatiotemporal memory ``M`` (gates from
    ``x`` and ``m``), output gate from ``x``, ``h`` and ``conv_o([C', M'])``, and
    ``h' = σ(o) tanh(conv_last([C', M']))`` with a 1x1 ``conv_last``. ``M`` has the same width
    as ``h``, which is why PredRNN stacks need equal widths in all layers.
    """

    def __init__(
        self, in_channels: int, num_hidden: int, filter_size: int, layer_norm: bool = False
    ) -> None:
        super().__init__()
        _check_filter_size(filter_size)
        self.num_hidden = num_hidden
        self.conv_x = _gate_conv(in_channels, 7 * num_hidden, filter_size, layer_norm)
        self.conv_h = _gate_conv(num_hidden, 4 * num_hidden, filter_size, layer_norm)
        self.conv_m = _gate_conv(num_hidden, 3 * num_hidden, filter_size, layer_norm)
        self.conv_o = _gate_conv(2 * num_hidden, num_hidden, filter_size, layer_norm)
        self.conv_last = nn.Conv2d(2 * num_hidden, num_hidden, kernel_size=1, bias=False)

    def forward(self, x: Tensor, h: Tensor, c: Tensor, m: Tensor) -> STLSTMOut:
        i_x, f_x, g_x, i_xm, f_xm, g_xm, o_x = torch.split(self.conv_x(x), self.num_hidden, dim=1)
        i_h, f_h, g_h, o_h = torch.split(self.conv_h(h), self.num_hidden, dim=1)
        i_m, f_m, g_m = torch.split(self.conv_m(m), self.num_hidden, dim=1)

        # temporal memory C: gates from the input and the layer's own previous h
        forget_c = torch.sigmoid(f_x + f_h + FORGET_BIAS)
        c_new = forget_c * c + torch.sigmoid(i_x + i_h) * torch.tanh(g_x + g_h)
        # spatiotemporal memory M: gates from the input and the M handed over (zigzag)
        forget_m = torch.sigmoid(f_xm + f_m + FORGET_BIAS)
        m_new = forget_m * m + torch.sigmoid(i_xm + i_m) * torch.tanh(g_xm + g_m)
        memory = torch.cat([c_new, m_new], dim=1)
        o = torch.sigmoid(o_x + o_h + self.conv_o(memory))
        h_new = o * torch.tanh(self.conv_last(memory))
        return STLSTMOut(h=h_new, c=c_new, m=m_new)


class RecurrentEncoding(NamedTuple):
    """What ``PatchRecurrentStack.encode`` returns.

    ``z``: the top layer's hidden state after the last input frame,
    ``(B, num_hidden[-1], H/p, W/p)``.
    ``extras``: the rest of the recurrent state as a flat dict of batch-first tensors:
    ``h{i}`` for every layer but the top (its ``h`` is ``z``), ``c{i}`` for every layer, and
    ``m`` (PredRNN only, the top layer's spatiotemporal memory).
    """

    z: Tensor
    extras: dict[str, Tensor]


class PatchRecurrentStack(nn.Module, ABC):
    """Patches -> stacked recurrent cells -> 1x1 readout, split into ``encode`` and ``decode``.

    ``encode(x)`` runs the stack over all ``T_in`` input frames (patches) from a zero state.
    ``decode(z, extras, steps)`` sets the top hidden state to ``z`` and produces ``steps`` frames:
    frame 1 is ``readout(z)``; frame ``k + 1`` is the readout of the top hidden state after one
    more stack step whose input is frame ``k`` (the model's own prediction). ``z`` therefore
    shapes frame 1 directly and every later frame through the recurrence (it is the top layer's
    ``h`` for the next step, and frame 1 is the next input). This is exactly OpenSTL's schedule
    with the true-frame mask at zero: no future frame is ever an input.

    When ``out_channels != in_channels`` a prediction cannot be fed back as an input frame, so a
    second bias-free 1x1 readout (``feedback``) predicts the next input frame (all input
    variables) from the same hidden state. It exists only when it is used, i.e. when
    ``out_steps > 1`` and the channel counts differ.

    Subclasses build ``self.cells`` and define ``step`` (and extend ``zero_state`` if they carry
    more state than each layer's ``h`` and ``c``).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        out_steps: int,
        num_hidden: Sequence[int],
        patch_size: int,
    ) -> None:
        super().__init__()
        num_hidden = [int(n) for n in num_hidden]
        if not num_hidden or min(num_hidden) < 1:
            raise ValueError(
                f"num_hidden must be a non-empty list of positive ints, got {num_hidden}"
            )
        if patch_size < 1:
            raise ValueError(f"patch_size must be >= 1, got {patch_size}")
        self.num_hidden = num_hidden
        self.patch_size = int(patch_size)
        self.in_patch_channels = in_channels * patch_size * patch_size
        top = num_hidden[-1]
        self.readout = nn.Conv2d(top, out_channels * patch_size * patch_size, 1, bias=False)
        self.feedback: nn.Conv2d | None = None
        if in_channels != out_channels and out_steps > 1:
            self.feedback = nn.Conv2d(top, self.in_patch_channels, 1, bias=False)

    @property
    def num_layers(self) -> int:
        return len(self.num_hidden)

    @property
    def top_key(self) -> str:
        """Key of the top layer's hidden state (``z``) in the state dict."""
        return f"h{self.num_layers - 1}"

    def zero_state(self, frame: Tensor) -> dict[str, Tensor]:
        """The all-zero state (``h{i}``, ``c{i}``) for patch frames ``(B, C p^2, h, w)``."""
        b, _, h, w = frame.shape
        state: dict[str, Tensor] = {}
        for i, n in enumerate(self.num_hidden):
            state[f"h{i}"] = frame.new_zeros(b, n, h, w)
            state[f"c{i}"] = frame.new_zeros(b, n, h, w)
        return state

    @abstractmethod
    def step(self, frame: Tensor, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """One time step of the whole stack on a patch frame ``(B, C p^2, h, w)``."""

    def encode(self, x: Tensor, true_prob: float = 1.0) -> RecurrentEncoding:
        """``(B, T_in, C_in, H, W)`` -> ``z`` (top hidden state after the last frame), the rest.

        ``true_prob < 1`` (reverse scheduled sampling, training only): each input frame after
        the first is, per sample, the true one with that probability and otherwise the
        readout of the previous step (the model's prediction of it).
        """
        frames = patchify(x, self.patch_size)
        state = self.zero_state(frames[:, 0])
        for t in range(frames.shape[1]):
            frame = frames[:, t]
            if t > 0 and true_prob < 1.0:
                frame = mix_frames(frame, self.readout(state[self.top_key]), true_prob)
            state = self.step(frame, state)
        z = state.pop(self.top_key)
        return RecurrentEncoding(z=z, extras=state)

    def decode(
        self,
        z: Tensor,
        extras: dict[str, Tensor],
        steps: int,
        teacher: Tensor | None = None,
        true_prob: float = 0.0,
    ) -> Tensor:
        """Rollout of ``steps`` frames from ``z``: ``(B, steps, C_out, H, W)``.

        Free by default. With ``teacher`` (the true frames ``(B, >= steps - 1, C_out, H, W)``,
        scheduled sampling in training), the input after output frame ``k`` is, per sample, the
        true frame ``k`` with probability ``true_prob`` and the prediction otherwise.
        """
        if (
            steps > 1
            and self.feedback is None
            and self.readout.out_channels != self.in_patch_channels
        ):
            raise ValueError(
                "this stack was built for out_steps=1 with in_channels != out_channels; "
                f"it cannot roll out {steps} steps"
            )
        state = {**extras, self.top_key: z}
        frames: list[Tensor] = []
        for k in range(steps):
            top = state[self.top_key]
            frames.append(self.readout(top))
            if k == steps - 1:
                break
            next_input = frames[-1] if self.feedback is None else self.feedback(top)
            if teacher is not None:
                true = patchify(teacher[:, k], self.patch_size)
                next_input = mix_frames(true, next_input, true_prob)
            state = self.step(next_input, state)
        return unpatchify(torch.stack(frames, dim=1), self.patch_size)


class ConvLSTMStack(PatchRecurrentStack):
    """A stack of ``ConvLSTMCell``: layer ``i`` reads layer ``i - 1``'s new ``h`` (OpenSTL)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        out_steps: int,
        num_hidden: Sequence[int],
        filter_size: int,
        patch_size: int,
        layer_norm: bool = False,
    ) -> None:
        super().__init__(in_channels, out_channels, out_steps, num_hidden, patch_size)
        widths = [self.in_patch_channels, *self.num_hidden[:-1]]
        self.cells = nn.ModuleList(
            ConvLSTMCell(w_in, w, filter_size, layer_norm)
            for w_in, w in zip(widths, self.num_hidden)
        )

    def step(self, frame: Tensor, state: dict[str, Tensor]) -> dict[str, Tensor]:
        new: dict[str, Tensor] = {}
        inp = frame
        for i, cell in enumerate(self.cells):
            out = cell(inp, state[f"h{i}"], state[f"c{i}"])
            new[f"h{i}"], new[f"c{i}"] = out.h, out.c
            inp = out.h
        return new


class SpatioTemporalLSTMStack(PatchRecurrentStack):
    """A stack of ``SpatioTemporalLSTMCell`` with PredRNN's zigzag memory flow.

    Within a step ``M`` goes bottom -> top (layer ``i`` reads layer ``i - 1``'s new ``M``); the top
    layer's ``M`` is the state's ``m`` and enters the bottom layer at the next step. All layers
    must have the same width because ``M`` passes through every one of them.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        out_steps: int,
        num_hidden: Sequence[int],
        filter_size: int,
        patch_size: int,
        layer_norm: bool = False,
    ) -> None:
        super().__init__(in_channels, out_channels, out_steps, num_hidden, patch_size)
        if len(set(self.num_hidden)) != 1:
            raise ValueError(
                "PredRNN needs the same num_hidden in every layer (the spatiotemporal memory M "
                f"flows through all of them), got {self.num_hidden}"
            )
        widths = [self.in_patch_channels, *self.num_hidden[:-1]]
        self.cells = nn.ModuleList(
            SpatioTemporalLSTMCell(w_in, w, filter_size, layer_norm)
            for w_in, w in zip(widths, self.num_hidden)
        )

    def zero_state(self, frame: Tensor) -> dict[str, Tensor]:
        state = super().zero_state(frame)
        b, _, h, w = frame.shape
        state["m"] = frame.new_zeros(b, self.num_hidden[0], h, w)
        return state

    def step(self, frame: Tensor, state: dict[str, Tensor]) -> dict[str, Tensor]:
        new: dict[str, Tensor] = {}
        inp, m = frame, state["m"]
        for i, cell in enumerate(self.cells):
            out = cell(inp, state[f"h{i}"], state[f"c{i}"], m)
            new[f"h{i}"], new[f"c{i}"] = out.h, out.c
            inp, m = out.h, out.m
        new["m"] = m
        return new


__all__ = [
    "FORGET_BIAS",
    "ConvLSTMCell",
    "ConvLSTMStack",
    "LSTMOut",
    "PatchRecurrentStack",
    "RecurrentEncoding",
    "STLSTMOut",
    "SpatioTemporalLSTMCell",
    "SpatioTemporalLSTMStack",
    "patchify",
    "unpatchify",
]
