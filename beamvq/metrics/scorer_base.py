"""The candidate scorer's contract: ``Scorer`` (what every scorer of the beam search is) and the
channel check the scorers of one channel share (``beamvq.metrics.scorers``,
``beamvq.metrics.physics_scorers``).

A scorer's constructor checks each of its arguments (messages name the YAML key, ``init_args.*``
of the scorer); the channels it reads can only be checked against the data, which its user does
before the first batch through ``check_channels``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from torch import Tensor

__all__ = ["Scorer", "check_channel"]


class Scorer(ABC):
    """A candidate scorer: ``scorer(cands, reference, inputs=...) -> (B, K)``, higher is better.

    cands (B, K, T, C, H, W), reference (B, T, C, H, W) or None, inputs (B, T_in, C, H, W) or None:
    all physical. Plain classes (not nn.Module) with flat typed constructors so YAML can build them
    by class_path. Scores are only compared between candidates of the same sample.
    """

    requires_reference: bool = False
    #: the attributes holding a channel index this scorer reads (``None``: not used)
    channel_arguments: tuple[str, ...] = ("channel", "u_channel", "v_channel")

    def check_channels(self, channels: int, where: str) -> None:
        """Raise ``ValueError`` when a channel this scorer reads is not among the data's
        ``channels``; ``where`` is the scorer's YAML key (``model.ensemble.scorer``)."""
        for name in self.channel_arguments:
            index = getattr(self, name, None)
            if index is not None and not -channels <= int(index) < channels:
                raise ValueError(
                    f"{where}: {type(self).__name__} init_args.{name} = {index} is out of range "
                    f"for the data's {channels} channel(s)"
                )

    @abstractmethod
    def __call__(
        self, cands: Tensor, reference: Tensor | None = None, *, inputs: Tensor | None = None
    ) -> Tensor: ...

    def _check(self, cands: Tensor, reference: Tensor | None, inputs: Tensor | None) -> None:
        if cands.dim() != 6:
            raise ValueError(f"cands must be (B, K, T, C, H, W), got {tuple(cands.shape)}")
        if self.requires_reference and reference is None:
            raise ValueError(f"{type(self).__name__} needs a reference")
        if reference is not None and reference.shape != cands.shape[:1] + cands.shape[2:]:
            raise ValueError(
                f"reference {tuple(reference.shape)} does not match cands {tuple(cands.shape)}"
            )
        if inputs is not None and (
            inputs.dim() != 5
            or inputs.shape[0] != cands.shape[0]
            or inputs.shape[2:] != cands.shape[3:]
        ):
            raise ValueError(
                f"inputs {tuple(inputs.shape)} must be (B, T_in, C, H, W) for cands {tuple(cands.shape)}"
            )


def check_channel(cands: Tensor, *channels: int | None) -> None:
    for ch in channels:
        if ch is not None and not -cands.shape[3] <= ch < cands.shape[3]:
            raise ValueError(f"channel {ch} out of range for {cands.shape[3]} channels")
