"""Pure helpers of benchmarks/cost_protocol.py and benchmarks/overhead.py (no training)."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import cost_protocol as gain  # noqa: E402
import overhead  # noqa: E402

from beamvq import metrics, search  # noqa: E402


def test_protocol_label() -> None:
    p = gain.Protocol()
    assert replace(p, beam_width=1, top_k=1).label(p) == "beam_width=1 top_k=1"
    assert p.label(p) == "default"


@pytest.mark.parametrize("steps", [1, 2, 3])
def test_looped_search_equals_batched(steps: int) -> None:
    torch.manual_seed(0)
    shift = torch.randn(4, 1, 1, 1, 1)  # K = 4 candidates, offsets of the last frame

    def step_fn(window: torch.Tensor) -> torch.Tensor:
        last = window[:, -1:]  # (N, 1, C, H, W)
        return last.unsqueeze(1) * 0.9 + shift.unsqueeze(0)

    x = torch.randn(3, 2, 1, 4, 4)
    ref = torch.randn(3, steps, 1, 4, 4)
    scorer = metrics.NegMSEScorer()
    a = search.beam_search(step_fn, x, scorer, steps, 3, 2, reference=ref)
    b = overhead.looped_beam_search(step_fn, x, scorer, steps, 3, 2, ref, lambda t: t)
    assert torch.allclose(a.trajectories, b.trajectories)
    assert torch.allclose(a.scores, b.scores)


@pytest.mark.parametrize("dataset", ["ns", "storm"])
def test_every_scorer_setting_builds(dataset: str) -> None:
    for name in ("default", "negmse", "csi", "ssim", "negmse+spectrum"):
        scorer = gain.make_scorer(dataset, replace(gain.Protocol(), scorer=name))
        y = torch.rand(2, 3, 1, 16, 16) * (255 if dataset == "storm" else 1)
        if callable(getattr(scorer, "fit", None)):  # the callback fits scorers that have a fit
            scorer.fit(y)
        scores = scorer(y.unsqueeze(1).expand(2, 2, 3, 1, 16, 16), y, inputs=y)
        assert scores.shape == (2, 2) and bool(torch.isfinite(scores).all()), name
