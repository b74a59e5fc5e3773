"""Pure helpers of benchmarks/beamvq_gain.py and benchmarks/overhead.py (no training)."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import beamvq_gain as gain  # noqa: E402
import overhead  # noqa: E402

from beamvq import metrics, search  # noqa: E402


def test_spectrum_error_is_zero_on_truth_and_grows_with_noise() -> None:
    torch.manual_seed(0)
    y = torch.randn(3, 4, 1, 16, 16)
    assert torch.allclose(gain.spectrum_error(y, y), torch.zeros(3, dtype=torch.float64))
    noisy = gain.spectrum_error(y + 0.5 * torch.randn_like(y), y)
    assert noisy.shape == (3,) and bool((noisy > 0.01).all())
    # doubling the vorticity quadruples every shell's energy: |log 4| everywhere
    assert torch.allclose(gain.spectrum_error(2 * y, y), torch.full((3,), 4.0).log().double())


def test_abs_divergence_small_for_smooth_fields() -> None:
    x = torch.linspace(0, 2 * torch.pi, 33)[:-1]
    w = (torch.sin(x)[None, :] * torch.cos(x)[:, None]).expand(2, 3, 1, 32, 32)
    assert (
        float(gain.abs_divergence(w).max()) < 1e-6
    )  # one mode: FD and spectral agree (fp32 input)


def test_rel_change_and_label() -> None:
    assert gain.rel_change([0.5], [1.0]) == "-50.0%"
    assert gain.rel_change([1.2, 1.4], [1.0, 1.0]) == "+30.0%"
    assert gain.mean_std([1.0, 3.0]).startswith("2.000 ± 1.414")
    p = gain.Protocol()
    assert replace(p, beam_width=1, top_k=1).label(p) == "beam_width=1 top_k=1"
    assert p.label(p) == "default"


def _row(arm: str, seed: int, mse: float, vq_path: str = "continuous") -> dict:
    ev = {"mse": mse, "rel_l2": mse, "mse_lead": [mse, mse], "rel_l2_lead": [mse, mse],
          "spectrum_err": 1.0, "div": 0.1}  # fmt: skip
    protocol = {**gain.asdict(gain.Protocol()), "vq_path": vq_path}
    return {"backbone": "fno", "dataset": "ns", "arm": arm, "seed": seed, "train_seconds": 1.0,
            "test": ev, "val": ev, "augment": [], "protocol": protocol}  # fmt: skip


def test_report_averages_seeds_and_relative_change() -> None:
    rows = [
        _row("base", 0, 1.0),
        _row("base", 1, 3.0),
        _row("beamvq", 0, 1.0),
        _row("beamvq", 1, 1.0),
    ]
    text = gain.report(rows)
    assert "| fno | 0,1 | 2.000 ± 1.414 | 1.000 ± 0.000 | -50.0% |" in text
    assert "mse beamvq: -50.0% (over 1 backbones)" in text


def test_report_sets_the_papers_bottleneck_apart_and_counts_a_shared_base_once() -> None:
    rows = [
        _row("base", 0, 1.0),
        _row("beamvq", 0, 0.5),
        # a second results file: the papers' bottleneck, with the same base training again
        _row("base", 0, 1.0, vq_path="quantized"),
        _row("beamvq", 0, 4.0, vq_path="quantized"),
    ]
    text = gain.report(rows)
    assert "| MSE base | MSE beamvq-paper | MSE beamvq | Δ beamvq-paper | Δ beamvq |" in text
    assert "| fno | 0 | 1.000 | 4.000 | 0.500 | +300.0% | -50.0% |" in text  # no ± : one base
    assert "max 1.0 s (3 runs)" in text  # the base training once
    short = gain.summary([*rows, _row("base", 1, 2.0), _row("beamvq", 1, 2.5)])
    # seeds both arms ran: paper 0 -> (4 - 1) / 1; ours 0, 1 -> (1.5 - 1.5) / 1.5, better in 1 of 2
    assert "| fno | +300.0% (0/1) | +0.0% (1/2) |" in short


def test_ablation_settings_are_distinct() -> None:
    settings = gain.ablation_settings(gain.Protocol())
    protocols = [q for _, q in settings]
    assert len(set(map(str, protocols))) == len(protocols)
    labels = dict(settings)
    assert labels["default"] == gain.Protocol()
    paper = labels["papers' bottleneck (quantized, commitment 0.25)"]
    assert (paper.vq_path, paper.commitment_weight) == ("quantized", 0.25)
    assert "continuous path (proposed)" not in labels  # the default already is


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
