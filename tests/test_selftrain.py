"""beamvq.selftrain: the self-training step (search, self-ensemble, filter) and the predict-time
search, against hand-computed values and brute-force enumeration; chunking does not change the
results; the config names its YAML keys when it is wrong."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from beamvq import metrics as M
from beamvq import search as S
from beamvq.selftrain import SearchConfig, calls_needed, search_members, self_train_step

C, H, W = 1, 2, 3
OFFSETS = torch.tensor([0.0, 1.0, -1.0])  # K = 3 candidates; candidate 0 repeats the last frame


def offset_step(window: torch.Tensor) -> torch.Tensor:
    """Candidates k of one frame: the window's last frame + OFFSETS[k] (constant fields stay
    constant, so every score below is computed by hand)."""
    return window[:, None, -1:] + OFFSETS.view(1, -1, 1, 1, 1, 1)


def offset_forecast(x: torch.Tensor, steps: int) -> torch.Tensor:
    """The plain forecast of ``offset_step``: candidate 0 at every step."""
    return x[:, -1:].repeat(1, steps, 1, 1, 1)


def const(values: list[float], frames: int = 1) -> torch.Tensor:
    """Constant fields ``(len(values), frames, C, H, W)``."""
    return torch.tensor(values).view(-1, 1, 1, 1, 1).expand(-1, frames, C, H, W).clone()


def test_the_step_by_hand() -> None:
    # two samples, last input 0 and 1, reference 1 at both steps, -MSE, beam 2, top 2, K 3.
    # Sample 0, step 1: candidates 0, 1, -1 score -1, 0, -4: beams 1 (0) and 0 (-1). Step 2,
    # totals: from 1: 0, -1, -1; from 0: -2, -1, -5: best two are [1, 1] (0) and [1, 2] (-1).
    # The mean ensemble [1, 1.5] scores (0 - 0.25) / 2 = -0.125; the plain forecast [0, 0]: -1.
    # Sample 1: the search keeps [1, 1] and [1, 2] again; the plain forecast [1, 1] scores 0.
    x = const([0.0, 1.0], frames=2)
    reference = const([1.0, 1.0], frames=2)
    config = SearchConfig(beam_width=2, top_k=2, rollout_steps=2)
    out = self_train_step(x, offset_step, offset_forecast, M.NegMSEScorer(), config, reference)
    pseudo = torch.tensor([1.0, 1.5]).view(1, 2, 1, 1, 1).expand(2, 2, C, H, W)
    torch.testing.assert_close(out.pseudo, pseudo)
    torch.testing.assert_close(out.ensemble_score, torch.tensor([-0.125, -0.125]))
    torch.testing.assert_close(out.plain_score, torch.tensor([-1.0, 0.0]))
    assert out.accepted.tolist() == [True, False]  # only sample 0 beats its plain forecast
    # the margin: 0.875 better passes 0.8 and fails 0.9; without the filter both are kept
    margin = self_train_step(
        x, offset_step, offset_forecast, M.NegMSEScorer(),
        SearchConfig(beam_width=2, top_k=2, rollout_steps=2, margin=0.8), reference,
    )  # fmt: skip
    assert margin.accepted.tolist() == [True, False]
    strict = SearchConfig(beam_width=2, top_k=2, rollout_steps=2, margin=0.9)
    args = (offset_step, offset_forecast, M.NegMSEScorer())
    assert self_train_step(x, *args, strict, reference).accepted.tolist() == [False, False]
    off = SearchConfig(beam_width=2, top_k=2, rollout_steps=2, only_improving=False)
    assert self_train_step(x, *args, off, reference).accepted.tolist() == [True, True]


def test_weighted_ensemble_by_hand_and_physical_units() -> None:
    # sample 0 of the hand test; softmax([0, -0.5] / 0.25) weighs [1, 1] and [1, 2]
    x = const([0.0], frames=2)
    reference = const([3.0, 3.0], frames=2)  # physical = 2 * model + 1: the same ranking
    config = SearchConfig(
        beam_width=2, top_k=2, rollout_steps=2, ensemble="weighted", temperature=0.25
    )
    out = self_train_step(
        x, offset_step, offset_forecast, M.NegMSEScorer(), config, reference,
        to_physical=lambda t: 2.0 * t + 1.0,
    )  # fmt: skip
    # physical trajectories [3, 3] and [3, 5] score 0 and -4 / 2 = -2 (mean over steps)
    w = torch.softmax(torch.tensor([0.0, -2.0]) / 0.25, 0)
    second = 3.0 * w[0] + 5.0 * w[1]
    torch.testing.assert_close(out.pseudo[0, :, 0, 0, 0], torch.stack([torch.tensor(3.0), second]))
    torch.testing.assert_close(out.ensemble_score, -((second - 3.0) ** 2 / 2).view(1))
    torch.testing.assert_close(out.plain_score, torch.tensor([-4.0]))  # plain [1, 1]: -4 per step


def test_non_finite_pseudo_targets_are_always_rejected() -> None:
    x = const([0.0, float("nan"), 1.0], frames=2)
    reference = const([1.0, 1.0, 1.0], frames=2)
    off = SearchConfig(beam_width=2, top_k=2, rollout_steps=2, only_improving=False)
    out = self_train_step(x, offset_step, offset_forecast, M.NegMSEScorer(), off, reference)
    assert out.accepted.tolist() == [True, False, True]
    assert torch.isnan(out.pseudo[1]).all() and torch.isfinite(out.pseudo[[0, 2]]).all()


# -- against brute force and the pure search functions --------------------------------------------


def random_step(seed: int = 0):  # type: ignore[no-untyped-def]
    """A deterministic nonlinear K-candidate forecaster (per sample) that reads the whole window."""
    g = torch.Generator().manual_seed(seed)
    offset = torch.randn(1, 3, 2, C, H, W, generator=g) * 0.5

    def step_fn(window: torch.Tensor) -> torch.Tensor:
        base = torch.tanh(window[:, -2:] + 0.3 * window.mean(1, keepdim=True))  # (N, 2, C, H, W)
        return base[:, None] * torch.tensor([1.0, 0.8, 1.2]).view(1, 3, 1, 1, 1, 1) + offset

    def forecast(x: torch.Tensor, steps: int) -> torch.Tensor:
        pieces, window = [], x
        for _ in range(steps):
            piece = step_fn(window)[:, 0]
            pieces.append(piece)
            window = torch.cat([window, piece], 1)[:, -x.shape[1] :]
        return torch.cat(pieces, 1)

    return step_fn, forecast


def brute_force_top(step_fn, x, reference, scorer, steps, top_k):  # type: ignore[no-untyped-def]
    """The ``top_k`` best of all 3^steps trajectories per sample, by mean step score."""
    trajs, scores = [], []
    for seq in itertools.product(range(3), repeat=steps):
        window, pieces, step_scores = x, [], []
        for s, c in enumerate(seq):
            piece = step_fn(window)[:, c]
            ref = reference[:, 2 * s : 2 * s + 2]
            step_scores.append(scorer(piece[:, None], ref, inputs=window)[:, 0])
            pieces.append(piece)
            window = torch.cat([window, piece], 1)[:, -x.shape[1] :]
        trajs.append(torch.cat(pieces, 1))
        scores.append(torch.stack(step_scores, -1).mean(-1))
    trajs, scores = torch.stack(trajs, 1), torch.stack(scores, 1)
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :top_k]
    rows = torch.arange(x.shape[0])[:, None]
    return trajs[rows, order], scores[rows, order]


def test_an_exhaustive_beam_gives_the_brute_force_ensemble() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 3, C, H, W, generator=g)
    reference = torch.randn(5, 6, C, H, W, generator=g)
    step_fn, forecast = random_step()
    scorer = M.NegMSEScorer()
    config = SearchConfig(beam_width=9, top_k=4, rollout_steps=3)  # 3^(3-1) = 9: exhaustive
    out = self_train_step(x, step_fn, forecast, scorer, config, reference)
    best, _ = brute_force_top(step_fn, x, reference, scorer, 3, 4)
    torch.testing.assert_close(out.pseudo, best.mean(1))
    ens = S.score_trajectories(scorer, x, best.mean(1, keepdim=True), 3, reference).scores[:, 0]
    plain = S.score_trajectories(scorer, x, forecast(x, 3)[:, None], 3, reference).scores[:, 0]
    torch.testing.assert_close(out.ensemble_score, ens)
    torch.testing.assert_close(out.plain_score, plain)
    members = search_members(x, step_fn, scorer, config, reference)
    torch.testing.assert_close(members.fields, best)


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, None])
def test_chunking_does_not_change_the_results(chunk: int | None) -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(7, 3, C, H, W, generator=g)
    reference = torch.randn(7, 4, C, H, W, generator=g)
    step_fn, forecast = random_step(3)
    scorer = M.WeightedScorer([M.NegMSEScorer(), M.ConservationScorer()], [1.0, 0.5])
    config = SearchConfig(beam_width=2, top_k=3, rollout_steps=2, ensemble="standardized")
    whole = self_train_step(x, step_fn, forecast, scorer, config, reference)
    calls: list[int] = []
    parts = self_train_step(
        x, step_fn, forecast, scorer, config, reference, chunk=chunk, on_chunk=calls.append
    )
    for a, b in zip(whole, parts):
        assert torch.equal(a, b)
    assert len(calls) == calls_needed(7, chunk) == (1 if chunk is None else math.ceil(7 / chunk))
    m_whole = search_members(x, step_fn, scorer, config, reference)
    m_parts = search_members(x, step_fn, scorer, config, reference, chunk=chunk)
    assert torch.equal(m_whole.fields, m_parts.fields)
    assert torch.equal(m_whole.scores, m_parts.scores)


def test_model_calls_are_bounded_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    # the search's step calls and the plain forecast hold at most CPU_CALL_ELEMENTS window
    # values each (4 windows here), whatever the inputs per search call; results unchanged
    g = torch.Generator().manual_seed(4)
    x = torch.randn(7, 3, C, H, W, generator=g)
    reference = torch.randn(7, 4, C, H, W, generator=g)
    step_fn, forecast = random_step(5)
    config = SearchConfig(beam_width=2, top_k=3, rollout_steps=2)
    whole = self_train_step(x, step_fn, forecast, M.NegMSEScorer(), config, reference)
    monkeypatch.setattr(S, "CPU_CALL_ELEMENTS", 4 * x[0].numel())
    steps: list[int] = []
    plain: list[int] = []

    def counting_step(window: torch.Tensor) -> torch.Tensor:
        steps.append(window.shape[0])
        return step_fn(window)

    def counting_forecast(x: torch.Tensor, n: int) -> torch.Tensor:
        plain.append(x.shape[0])
        return forecast(x, n)

    bounded = self_train_step(
        x, counting_step, counting_forecast, M.NegMSEScorer(), config, reference
    )
    assert steps == [4, 3] + [4, 4, 3, 3] and plain == [4, 3]  # 7 windows, then 7 x 2 beams
    for a, b in zip(whole, bounded):
        assert torch.equal(a, b)


def test_members_are_the_beam_search_in_physical_units() -> None:
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 3, C, H, W, generator=g)
    step_fn, _ = random_step(5)
    scorer = M.NonNegativityScorer()

    def phys(t: torch.Tensor) -> torch.Tensor:
        return 3.0 * t - 0.5

    config = SearchConfig(beam_width=2, top_k=3, rollout_steps=2)
    res = S.beam_search(step_fn, x, scorer, 2, 2, 3, to_physical=phys)
    members = search_members(x, step_fn, scorer, config, to_physical=phys)
    assert torch.equal(members.fields, phys(res.trajectories))
    assert torch.equal(members.scores, res.scores)


# -- the config ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(beam_width=0), "search.beam_width must be >= 1, got 0"),
        (dict(top_k=0), "search.top_k must be >= 1"),
        (dict(candidate_k=0), "search.candidate_k must be >= 1 or null"),
        (dict(rollout_steps=0), "search.rollout_steps must be >= 1 or null"),
        (dict(accumulate="max"), "search.accumulate must be one of"),
        (dict(ensemble="median"), "search.ensemble must be one of"),
        (dict(temperature=0.0), "search.temperature must be > 0"),
        (
            dict(top_k=7, beam_width=2, candidate_k=3, rollout_steps=2),
            r"search.top_k=7 exceeds the 6 trajectories",
        ),
    ],
)
def test_bad_configs_name_their_yaml_key(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SearchConfig(**kwargs)


def test_resolved_takes_the_model_settings_where_unset_and_checks_again() -> None:
    config = SearchConfig(beam_width=2, top_k=5)
    resolved = config.resolved(candidate_k=3, rollout_steps=2)
    assert (resolved.candidate_k, resolved.rollout_steps) == (3, 2)
    assert SearchConfig(candidate_k=4, rollout_steps=1).resolved(3, 2).candidate_k == 4
    with pytest.raises(ValueError, match="search.top_k=5 exceeds the 3 trajectories"):
        config.resolved(candidate_k=3, rollout_steps=1)
    with pytest.raises(ValueError, match="rollout_steps is unset"):
        self_train_step(const([0.0]), offset_step, offset_forecast, M.NegMSEScorer(), config)
    with pytest.raises(ValueError, match="no inputs"):
        self_train_step(const([0.0])[:0], offset_step, offset_forecast, M.NegMSEScorer(), resolved)
