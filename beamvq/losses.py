"""The training loss's terms beyond the forecast MSE: the candidate term of BeamVQ.

BeamVQ (arXiv 2502.18925 and the authors' code) adds the K code-bank candidates' MSE against the
target, so the decoder turns every retrieved code into a plausible future (the authors: the sum
over K at weight 1, straight-through to the encoder, on the one forecast step of their models).
Pulling every candidate toward the truth also collapses their spread: the members end up
near-identical (spread/skill 0.11 measured on the quickstart), and a search over them has little
to choose from. beamvq offers, beside the authors' term, the ensemble's **CRPS** (Gneiting &
Raftery 2007, the fair estimator of Ferro 2014): a proper score, minimised when the members are
draws from the forecast distribution, so it trains the spread to match the error (pair it with
``VQBottleneck(learn_offset_scale=True)``). Either term can cover the first rollout step or
every step (rank-aligned members, ``VQForecaster.candidate_rollout``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

from torch import Tensor

from beamvq.model import VQForecaster

__all__ = ["CANDIDATE_LOSSES", "Loss", "LossConfig", "candidate_term", "fair_crps"]

CANDIDATE_LOSSES = ("mse", "crps")


@dataclass(frozen=True)
class LossConfig:
    """``model.loss``: what the training loss is made of.

    Args:
        rollout: ``"full"`` (MSE over the whole rollout) or ``"first"`` (first step only; the
            rollout is still used for evaluation).
        candidate_weight: weight of the candidate term (0 turns it off; needs a bottleneck). The
            authors' sum over K candidates at weight 1 is ``candidate_weight: K`` with ``mse``.
        candidate_loss: ``"mse"`` (the mean over the K candidates of their MSE, the papers') or
            ``"crps"`` (the fair CRPS of the K candidates as an ensemble, ours).
        candidate_steps: ``"first"`` (the candidates of the first forecast step) or ``"all"``
            (the K rank-aligned members over every rollout step).
    """

    rollout: Literal["full", "first"] = "full"
    candidate_weight: float = 0.0
    candidate_loss: Literal["mse", "crps"] = "mse"
    candidate_steps: Literal["first", "all"] = "first"

    def __post_init__(self) -> None:
        if self.rollout not in ("full", "first"):
            raise ValueError(f"model.loss.rollout must be 'full' or 'first', got {self.rollout!r}")
        if not self.candidate_weight >= 0:
            raise ValueError(
                f"model.loss.candidate_weight must be >= 0, got {self.candidate_weight}"
            )
        if self.candidate_loss not in CANDIDATE_LOSSES:
            raise ValueError(
                f"model.loss.candidate_loss must be one of {CANDIDATE_LOSSES}, got "
                f"{self.candidate_loss!r}"
            )
        if self.candidate_steps not in ("first", "all"):
            raise ValueError(
                f"model.loss.candidate_steps must be 'first' or 'all', got {self.candidate_steps!r}"
            )


class Loss(NamedTuple):
    """``compute_loss``'s result: the scalar loss, its parts to log (detached), and the
    normalized prediction ``(B, T, C, H, W)``."""

    total: Tensor
    parts: dict[str, Tensor]
    pred: Tensor


def fair_crps(members: Tensor, target: Tensor) -> Tensor:
    """Per-sample fair CRPS ``(B,)`` of members ``(B, K, ...)`` against ``target (B, ...)``:
    mean over values of ``mean_k |X_k − y| − Σ_{k≠l} |X_k − X_l| / (2K(K−1))`` (K ≥ 2)."""
    k = members.shape[1]
    if k < 2:
        raise ValueError(f"fair_crps needs at least 2 members, got {k}")
    skill = (members - target.unsqueeze(1)).abs().mean(1)
    pairs = (members.unsqueeze(1) - members.unsqueeze(2)).abs().sum((1, 2))
    return (skill - pairs / (2 * k * (k - 1))).flatten(1).mean(1)


def candidate_term(
    model: VQForecaster, x: Tensor, y: Tensor, weight: Tensor, config: LossConfig, k: int,
    steps: int,
) -> Tensor:  # fmt: skip
    """The weighted candidate term on normalized ``x``, ``y`` (per-sample ``weight``), before
    ``candidate_weight``: MSE or CRPS of ``k`` candidates over the first or all ``steps``."""
    if config.candidate_steps == "all":
        cands = model.candidate_rollout(x, k, steps)
    else:
        cands = model.candidates(x, k)
    target = y[:, : cands.shape[2]]
    if config.candidate_loss == "crps":
        per_sample = fair_crps(cands, target)
    else:
        per_sample = ((cands - target.unsqueeze(1)) ** 2).flatten(2).mean(2).mean(1)
    return (weight * per_sample).sum() / weight.sum()
