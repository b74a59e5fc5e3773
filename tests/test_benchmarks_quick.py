"""Pure helpers of benchmarks/cost_protocol.py, overhead.py and quickstart_facts.py (no training)."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import cost_protocol as gain  # noqa: E402
import overhead  # noqa: E402
import quickstart_facts  # noqa: E402

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


def test_quickstart_facts_read_the_callbacks_lines() -> None:
    from beamvq.callbacks.tables import EpochRecord

    lines = [
        EpochRecord(e, 32, a, a, p, 0.01, 2.5, 25.0).summary()
        for e, a, p in ((1, 9, 9), (2, 7, 16))
    ]
    found = quickstart_facts.parse_searches("noise\n" + "\n".join(lines) + "\n")
    assert [int(f["pool"]) for f in found] == [9, 16]
    assert found[0]["searched"] == 32 and found[1]["ratio"] == pytest.approx(0.1)
    text = quickstart_facts.facts("\n".join(lines), 100.0, quickstart_facts.configured_windows())
    assert "pool size: 0 -> 9 -> 16" in text
    # the README's config: the windows the callback is asked to search
    assert quickstart_facts.configured_windows() == 32
