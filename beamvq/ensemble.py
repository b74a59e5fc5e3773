"""The ``predict``/``test`` ensemble of BeamVQ's stage 2 (arXiv 2502.18925): its configuration.

With ``members = M > 1`` the module turns the deterministic forecaster into a probabilistic one.
Members are either the M rank-aligned code-bank rollouts (member i uses its i-th nearest code at
every step), or, with ``beam_width > 0``, the M best trajectories of a beam search
(``beamvq.search``) scored by a reference-free ``scorer`` (the inputs of ``predict`` have no
recorded future). ``predict`` writes them beside the deterministic forecast; ``test`` also pools
CRPS and spread/skill per lead over the set (``beamvq.evaluation.EnsembleMetrics``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from beamvq import metrics, search

__all__ = ["EnsembleConfig", "fit_scorer"]


@dataclass(frozen=True)
class EnsembleConfig:
    """``model.ensemble``: the members ``predict`` writes and ``test`` scores.

    Args:
        members: ensemble members M (0 or 1: deterministic only).
        beam_width: 0: members are the M rank-aligned code-bank rollouts; > 0: the M best
            trajectories of a beam search of this width over the rollout, expanding each beam
            into ``model.candidate_k`` code-bank candidates, scored by ``scorer``.
        scorer: a reference-free ``beamvq.metrics.Scorer`` (e.g. ``SpectrumScorer``,
            ``NonNegativityScorer``) for the beam-searched members; scorers with a ``fit`` are
            fitted on training-split targets of the datamodule before predict/test.
        validate: with ``members >= 2``, also score the ensemble at every validation epoch
            (``val/crps``, ``val/spread_skill``), with the ``members`` rank-aligned code-bank
            rollouts (no beam search: M extra rollouts per validation batch), so calibration is
            watched while training, not only at ``test``.
    """

    members: int = 0
    beam_width: int = 0
    scorer: metrics.Scorer | None = None
    validate: bool = True

    def __post_init__(self) -> None:
        if self.members < 0:
            raise ValueError(f"model.ensemble.members must be >= 0, got {self.members}")
        if self.beam_width < 0:
            raise ValueError(f"model.ensemble.beam_width must be >= 0, got {self.beam_width}")
        if self.beam_width == 0:
            if self.scorer is not None:
                raise ValueError(
                    "model.ensemble.scorer is only used by the beam search: set "
                    "model.ensemble.beam_width > 0 or drop model.ensemble.scorer"
                )
            return
        if self.scorer is None:
            raise ValueError("model.ensemble.beam_width > 0 needs a model.ensemble.scorer")
        if getattr(self.scorer, "requires_reference", False):
            raise ValueError(
                f"model.ensemble.scorer: {type(self.scorer).__name__} needs the truth, which "
                "predict does not have; use a reference-free scorer (e.g. SpectrumScorer, "
                "TKEScorer, ConservationScorer, NonNegativityScorer)"
            )

    def check(self, candidate_k: int, rollout_steps: int, has_bottleneck: bool) -> None:
        """Raise ``ValueError`` when the model cannot give these members."""
        if self.members > 1 and not has_bottleneck:
            raise ValueError(
                "model.ensemble.members > 1 needs a model.bottleneck (the members come from its "
                "code bank)"
            )
        if self.beam_width == 0:
            return
        if not has_bottleneck or candidate_k < 2:
            raise ValueError(
                "model.ensemble.beam_width > 0 needs a model.bottleneck and model.candidate_k >= 2 "
                "(the beams expand into code-bank candidates)"
            )
        # the last step keeps the best M of (beams alive) x K trajectories
        final = search.final_trajectories(candidate_k, self.beam_width, rollout_steps)
        if not 1 <= self.members <= final:
            raise ValueError(
                f"model.ensemble.members={self.members} must be in [1, {final}] with "
                f"ensemble.beam_width={self.beam_width}, candidate_k={candidate_k}, "
                f"rollout_steps={rollout_steps}"
            )


def fit_scorer(scorer: metrics.Scorer | None, dm: Any, max_windows: int = 256) -> bool:
    """Fit ``scorer`` (if it has a ``fit``) on training-split targets of ``dm``; returns whether
    it was fitted."""
    fit = getattr(scorer, "fit", None)
    if not callable(fit):
        return False
    if not hasattr(dm, "training_windows"):
        raise ValueError(
            f"model.ensemble.scorer {type(scorer).__name__} must be fitted on training data, but "
            f"the datamodule {type(dm).__name__} has no training_windows()"
        )
    _, _, y = dm.training_windows(max_windows=max_windows, seed=0)
    fit(y)
    return True
