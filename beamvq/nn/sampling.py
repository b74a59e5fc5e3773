"""(Reverse) scheduled sampling for the recurrent backbones (ConvLSTM, PredRNN).

- Scheduled sampling: Bengio et al., "Scheduled Sampling for Sequence Prediction with Recurrent
  Neural Networks", NeurIPS 2015, as PredRNN trains with it (Wang et al. NeurIPS 2017; OpenSTL
  ``openstl/utils/predrnn_utils.py::schedule_sampling``): while decoding, the next input is the
  true frame with probability ``eta`` and the model's own prediction otherwise; ``eta`` falls
  linearly from ``start_value`` to 0 at ``stop`` and stays 0.
- Reverse scheduled sampling: PredRNN-V2 (Wang et al., TPAMI 2022, arXiv 2103.09504; OpenSTL
  ``reserve_schedule_sampling_exp``): while *encoding*, each input frame after the first is the
  true frame with probability ``r_eta`` (0.5, rising as ``1 - 0.5 exp(-(p - start) / alpha)``
  to 1 at ``reverse_stop``) and the model's prediction of it otherwise, so the encoder learns
  long-term dynamics from its own forecasts; decoding uses scheduled sampling with ``eta``
  falling linearly from 0.5 at ``reverse_start`` to 0 at ``reverse_stop``.

The draw is one Bernoulli per sample and frame (the whole frame is true or predicted), from the
global torch generator, as OpenSTL draws per ``(sample, frame)`` with numpy.

Progress ``p`` is the share of training done, in ``[0, 1]``. The references count optimizer
iterations; the defaults are OpenSTL's Moving-MNIST settings (``configs/mmnist/PredRNN.py``,
``PredRNNv2.py``: ``sampling_stop_iter = 50,000``; ``r_sampling_step_1 = 25,000``,
``r_sampling_step_2 = 50,000``, ``r_exp_alpha = 5,000``) over the 80,000 iterations of PredRNN's
own Moving-MNIST scripts (``--max_iterations 80000``): 0.625, 0.3125, 0.625 and 0.0625.
(PredRNN-V2's script uses ``r_exp_alpha = 2,500``, i.e. 0.03125.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

SAMPLING_MODES = ("scheduled", "reverse")

#: the YAML key of these settings, named in every message
_KEY = "model.backbone.init_args.sampling"


@dataclass(frozen=True)
class ScheduledSampling:
    """The sampling schedule of a recurrent backbone (YAML: ``sampling:``); see the module doc.

    Args:
        mode: ``"scheduled"`` (PredRNN) or ``"reverse"`` (PredRNN-V2: reverse in the encoder,
            scheduled from 0.5 in the decoder).
        start_value: ``eta`` at the start of scheduled sampling (1.0).
        stop: progress at which ``eta`` reaches 0 (scheduled mode).
        reverse_start, reverse_stop: progress where the reverse schedule starts moving and
            where it ends (``r_eta = 1``, ``eta = 0``).
        reverse_alpha: time constant of ``r_eta``'s exponential rise, in progress units.
    """

    mode: str = "scheduled"
    start_value: float = 1.0
    stop: float = 0.625
    reverse_start: float = 0.3125
    reverse_stop: float = 0.625
    reverse_alpha: float = 0.0625

    def __post_init__(self) -> None:
        problems = []
        if self.mode not in SAMPLING_MODES:
            problems.append(f"{_KEY}.mode must be one of {SAMPLING_MODES}, got {self.mode!r}")
        if not 0 <= self.start_value <= 1:
            problems.append(f"{_KEY}.start_value must be in [0, 1], got {self.start_value}")
        if not self.stop > 0:
            problems.append(f"{_KEY}.stop must be > 0, got {self.stop}")
        if not 0 <= self.reverse_start < self.reverse_stop:
            problems.append(
                f"{_KEY}.reverse_start must be >= 0 and below sampling.reverse_stop, got "
                f"{self.reverse_start} and {self.reverse_stop}"
            )
        if not self.reverse_alpha > 0:
            problems.append(f"{_KEY}.reverse_alpha must be > 0, got {self.reverse_alpha}")
        if problems:
            raise ValueError("; ".join(problems))


class TrueFrameProbabilities(NamedTuple):
    """Probability that an input frame is the true one: while encoding (frames after the first)
    and while decoding (each fed-back frame)."""

    encoder: float
    decoder: float


def true_frame_probabilities(
    schedule: ScheduledSampling, progress: float
) -> TrueFrameProbabilities:
    """The schedule at ``progress`` (share of training done, clipped to ``[0, 1]``)."""
    p = min(1.0, max(0.0, float(progress)))
    if schedule.mode == "scheduled":
        eta = schedule.start_value * max(0.0, 1.0 - p / schedule.stop)
        return TrueFrameProbabilities(1.0, eta)
    start, stop = schedule.reverse_start, schedule.reverse_stop
    if p < start:
        return TrueFrameProbabilities(0.5, 0.5)
    if p < stop:
        r_eta = 1.0 - 0.5 * math.exp(-(p - start) / schedule.reverse_alpha)
        return TrueFrameProbabilities(r_eta, 0.5 - 0.5 * (p - start) / (stop - start))
    return TrueFrameProbabilities(1.0, 0.0)


def mix_frames(true: Tensor, predicted: Tensor, prob_true: float) -> Tensor:
    """Per sample, ``true`` with probability ``prob_true``, else ``predicted`` (``(B, ...)``)."""
    if prob_true >= 1.0:
        return true
    if prob_true <= 0.0:
        return predicted
    shape = (true.shape[0],) + (1,) * (true.ndim - 1)
    mask = (torch.rand(shape, device=true.device) < prob_true).to(predicted.dtype)
    return mask * true + (1 - mask) * predicted


class Teacher(NamedTuple):
    """What ``begin_training_step`` hands a recurrent backbone: the true output frames of the
    first rollout step ``(B, T_out, C, H, W)`` and the probabilities at this step's progress."""

    frames: Tensor
    probs: TrueFrameProbabilities


__all__ = [
    "SAMPLING_MODES",
    "ScheduledSampling",
    "Teacher",
    "TrueFrameProbabilities",
    "mix_frames",
    "true_frame_probabilities",
]
