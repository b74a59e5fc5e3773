"""Tests for beamvq.search: beam search against brute-force enumeration of all K^steps rollouts."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from beamvq import metrics as M
from beamvq import search as S

C, H, W = 2, 4, 5
K = 3


def make_step_fn(k: int, t_out: int, seed: int = 0):
    """A deterministic nonlinear K-candidate forecaster that reads the whole window."""
    g = torch.Generator().manual_seed(seed)
    gain = (torch.rand(k, generator=g) * 0.8 + 0.6).view(1, k, 1, 1, 1, 1)
    offset = (torch.randn(k, 1, C, H, W, generator=g) * 0.4).unsqueeze(0)
    lead = torch.arange(1, t_out + 1, dtype=torch.float32).view(1, 1, t_out, 1, 1, 1)

    def step_fn(window: torch.Tensor) -> torch.Tensor:
        base = torch.tanh(window[:, -1] + 0.3 * window.mean(1))  # (N, C, H, W)
        first = window[:, 0].mean((1, 2, 3)).view(-1, 1, 1, 1, 1, 1)
        return gain * base[:, None, None] + offset * lead * 0.5 + 0.2 * torch.sin(lead * first)

    return step_fn


def to_phys(t: torch.Tensor) -> torch.Tensor:
    return 2.0 * t + 1.0


def brute_force(step_fn, x, scorer, steps, reference, t_in):
    """Every one of the K^steps candidate sequences: (choices, trajectory, per-step scores)."""
    out = []
    for seq in itertools.product(range(K), repeat=steps):
        window, pieces, scores = x, [], []
        for s, c in enumerate(seq):
            piece = step_fn(window)[:, c]
            t_out = piece.shape[1]
            ref = None if reference is None else reference[:, s * t_out : (s + 1) * t_out]
            scores.append(scorer(to_phys(piece)[:, None], ref, inputs=to_phys(window))[:, 0])
            pieces.append(piece)
            window = torch.cat([window, piece], dim=1)[:, -t_in:]
        out.append((seq, torch.cat(pieces, dim=1), torch.stack(scores, dim=-1)))
    return out


def ranked_for_sample(results, b):
    return sorted(results, key=lambda r: -r[2][b].mean().item())


def _setup(t_in: int, t_out: int, steps: int, batch: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(100 + seed)
    x = torch.randn(batch, t_in, C, H, W, generator=g)
    reference = torch.randn(batch, steps * t_out, C, H, W, generator=g) * 1.5 + 1.0
    scorer = M.WeightedScorer([M.NegMSEScorer(), M.ConservationScorer(channel=1)], [1.0, 0.7])
    return x, reference, scorer, make_step_fn(K, t_out, seed)


@pytest.mark.parametrize(("t_in", "t_out"), [(3, 2), (2, 3)])
def test_wide_beam_equals_brute_force(t_in, t_out):
    steps, top_k = 3, 5
    x, reference, scorer, step_fn = _setup(t_in, t_out, steps)
    res = S.beam_search(
        step_fn,
        x,
        scorer,
        steps,
        beam_width=K ** (steps - 1),
        top_k=top_k,
        reference=reference,
        to_physical=to_phys,
    )
    assert res.trajectories.shape == (4, top_k, steps * t_out, C, H, W)
    assert res.scores.shape == (4, top_k) and res.step_scores.shape == (4, top_k, steps)
    assert res.choices.shape == (4, top_k, steps) and res.choices.dtype == torch.long
    brute = brute_force(step_fn, x, scorer, steps, reference, t_in)
    assert len(brute) == K**steps
    for b in range(x.shape[0]):
        best = ranked_for_sample(brute, b)[:top_k]
        for j, (seq, traj, step_scores) in enumerate(best):
            assert tuple(res.choices[b, j].tolist()) == seq
            torch.testing.assert_close(res.trajectories[b, j], traj[b])
            torch.testing.assert_close(res.step_scores[b, j], step_scores[b])
            torch.testing.assert_close(res.scores[b, j], step_scores[b].mean())
        assert (res.scores[b, :-1] >= res.scores[b, 1:]).all()


@pytest.mark.parametrize("beam_width", [1, 2])
def test_narrow_beam_is_never_better_than_brute_force(beam_width):
    t_in, t_out, steps = 2, 2, 3
    x, reference, scorer, step_fn = _setup(t_in, t_out, steps, batch=12, seed=1)
    res = S.beam_search(
        step_fn,
        x,
        scorer,
        steps,
        beam_width=beam_width,
        top_k=1,
        reference=reference,
        to_physical=to_phys,
    )
    brute = brute_force(step_fn, x, scorer, steps, reference, t_in)
    by_seq = {seq: (traj, sc) for seq, traj, sc in brute}
    gaps = []
    for b in range(x.shape[0]):
        best = ranked_for_sample(brute, b)[0][2][b].mean()
        assert res.scores[b, 0] <= best + 1e-5
        gaps.append((best - res.scores[b, 0]).item())
        # what the beam returns is a real rollout, scored as brute force scores it
        traj, sc = by_seq[tuple(res.choices[b, 0].tolist())]
        torch.testing.assert_close(res.trajectories[b, 0], traj[b])
        torch.testing.assert_close(res.scores[b, 0], sc[b].mean())
    if beam_width == 1:
        assert max(gaps) > 1e-3  # greedy misses the optimum somewhere: the check is not vacuous


def test_rollout_one_is_single_shot_topk():
    x, reference, scorer, step_fn = _setup(3, 4, 1, batch=5, seed=2)
    res = S.beam_search(
        step_fn, x, scorer, 1, beam_width=1, top_k=2, reference=reference, to_physical=to_phys
    )
    cands = step_fn(x)
    scores = scorer(to_phys(cands), reference, inputs=to_phys(x))
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :2]
    rows = torch.arange(5).unsqueeze(1)
    assert torch.equal(res.trajectories, cands[rows, order])
    assert torch.equal(res.scores, scores[rows, order])
    assert torch.equal(res.choices[..., 0], order)
    # top_k up to K works with any beam width at one step; beyond K it cannot
    assert S.beam_search(step_fn, x, scorer, 1, 1, K, reference, to_phys).scores.shape == (5, K)
    with pytest.raises(ValueError, match="top_k=4 exceeds"):
        S.beam_search(step_fn, x, scorer, 1, beam_width=1, top_k=4, reference=reference)


def test_one_step_fn_call_per_step_with_beams_folded():
    calls = []
    inner = make_step_fn(K, 2)

    def counting(window):
        calls.append(window.shape[0])
        return inner(window)

    x = torch.randn(3, 2, C, H, W)
    S.beam_search(counting, x, M.NonNegativityScorer(), 4, beam_width=4, top_k=2)
    assert calls == [3, 3 * 3, 3 * 4, 3 * 4]  # 1 beam, then min(4, 3), then 4 per sample


def test_bounded_step_calls_change_nothing():
    # on CPU a step's folded windows go to step_fn in near-equal calls of at most
    # max_call_elements window values; every result is that of one call per step
    x, reference, scorer, step_fn = _setup(2, 2, 3, batch=5, seed=1)
    kw = dict(beam_width=3, top_k=4, reference=reference, to_physical=to_phys)
    whole = S.beam_search(step_fn, x, scorer, 3, max_call_elements=None, **kw)
    calls = []

    def counting(window):
        calls.append(window.shape[0])
        return step_fn(window)

    per_window = x[0].numel()
    split = S.beam_search(counting, x, scorer, 3, max_call_elements=4 * per_window, **kw)
    # step 0: 5 windows -> 3 + 2; then 5 x 3 = 15 windows -> 4 calls of 4, 4, 4, 3
    assert calls == [3, 2] + [4, 4, 4, 3] * 2
    for a, b in zip(whole, split):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert S.windows_per_call(x, 4 * per_window) == 4
    assert S.windows_per_call(x, 1) == 1  # never below one window
    assert S.windows_per_call(x, None) is None
    assert S.windows_per_call(x) == S.CPU_CALL_ELEMENTS // per_window  # "auto" on CPU
    with pytest.raises(ValueError, match="max_call_elements"):
        S.windows_per_call(x, 0)


def test_sum_accumulation_ranks_like_mean():
    x, reference, scorer, step_fn = _setup(2, 2, 3, seed=3)
    kw = dict(beam_width=3, top_k=4, reference=reference, to_physical=to_phys)
    mean = S.beam_search(step_fn, x, scorer, 3, **kw)
    total = S.beam_search(step_fn, x, scorer, 3, accumulate="sum", **kw)
    assert torch.equal(mean.choices, total.choices)
    torch.testing.assert_close(total.scores, mean.scores * 3)
    torch.testing.assert_close(total.scores, total.step_scores.sum(-1))
    with pytest.raises(ValueError, match="accumulate"):
        S.beam_search(step_fn, x, scorer, 3, accumulate="max", **kw)


def test_score_trajectories_matches_beam_scores():
    x, reference, scorer, step_fn = _setup(3, 2, 3, seed=4)
    res = S.beam_search(
        step_fn, x, scorer, 3, beam_width=3, top_k=3, reference=reference, to_physical=to_phys
    )
    again = S.score_trajectories(scorer, x, res.trajectories, 3, reference, to_phys)
    torch.testing.assert_close(again.scores, res.scores)
    torch.testing.assert_close(again.step_scores, res.step_scores)


def test_reference_required_and_reference_free_search():
    x = torch.randn(2, 2, C, H, W)
    step_fn = make_step_fn(K, 2)
    with pytest.raises(ValueError, match="needs a reference"):
        S.beam_search(step_fn, x, M.NegMSEScorer(), 2, beam_width=2, top_k=1)
    with pytest.raises(ValueError, match="reference"):
        S.beam_search(step_fn, x, M.NegMSEScorer(), 2, 2, 1, reference=torch.zeros(2, 3, C, H, W))
    res = S.beam_search(step_fn, x, M.ConservationScorer(), 2, beam_width=2, top_k=2)
    assert res.scores.shape == (2, 2) and (res.scores <= 0).all()


def test_nan_scores_rank_last():
    x = torch.randn(2, 2, C, H, W)

    def nan_first(cands, reference=None, *, inputs=None):
        score = -torch.arange(cands.shape[1], dtype=torch.float32).expand(cands.shape[:2]).clone()
        score[:, 0] = float("nan")  # the otherwise best candidate
        return score

    res = S.beam_search(make_step_fn(K, 2), x, nan_first, 1, beam_width=K, top_k=K)
    assert res.choices[:, :, 0].tolist() == [[1, 2, 0], [1, 2, 0]]
    assert res.scores[:, -1].isneginf().all()


def test_ensemble_mean_and_weighted():
    traj = torch.tensor([0.0, 1.0, 4.0]).view(1, 3, 1, 1, 1, 1).expand(2, 3, 2, 1, 2, 2)
    scores = torch.tensor([[0.0, math.log(2.0), math.log(5.0)], [1.0, 1.0, 1.0]])
    mean = S.ensemble(traj, scores, mode="mean")
    torch.testing.assert_close(mean, torch.full((2, 2, 1, 2, 2), 5.0 / 3))
    # softmax weights (1, 2, 5) / 8 -> (0 + 2 + 20) / 8; equal scores -> the plain mean
    weights = S.ensemble_weights(scores, mode="weighted")
    torch.testing.assert_close(weights[0], torch.tensor([1 / 8, 2 / 8, 5 / 8]))
    weighted = S.ensemble(traj, scores, mode="weighted")
    torch.testing.assert_close(weighted[0], torch.full((2, 1, 2, 2), 22 / 8))
    torch.testing.assert_close(weighted[1], mean[1])
    # temperature 1/2 squares the odds: (1, 4, 25) / 30; a tiny temperature picks the best
    hot = S.ensemble(traj, scores, mode="weighted", temperature=0.5)
    torch.testing.assert_close(hot[0], torch.full((2, 1, 2, 2), (4 + 100) / 30))
    cold = S.ensemble(traj, scores, mode="weighted", temperature=1e-4)
    torch.testing.assert_close(cold[0], torch.full((2, 1, 2, 2), 4.0))
    with pytest.raises(ValueError, match="standardized"):
        S.ensemble(traj, scores, mode="median")
    with pytest.raises(ValueError, match="temperature"):
        S.ensemble(traj, scores, mode="weighted", temperature=0.0)


def test_standardized_ensemble_is_scale_free():
    # -MSE of good candidates differs by ~1e-4: the raw softmax is the plain mean
    scores = torch.tensor([[-0.0101, -0.0102, -0.0105], [-3.0, -3.0, -3.0]])
    raw = S.ensemble_weights(scores, mode="weighted")
    torch.testing.assert_close(raw[0], torch.full((3,), 1 / 3), atol=1e-4, rtol=0)
    std = S.ensemble_weights(scores, mode="standardized")
    z = S.standardize_scores(scores)
    # z of (-1, -2, -5) e-4 around the mean -2.667e-4, population std 1.700e-4
    torch.testing.assert_close(z[0], torch.tensor([0.98058, 0.39223, -1.37281]), atol=1e-4, rtol=0)
    assert z[0].mean().abs() < 1e-6 and z[0].pow(2).mean().sub(1).abs() < 1e-5
    torch.testing.assert_close(std[0], torch.softmax(z[0], 0))
    assert std[0, 0] > 2 * std[0, 2]
    torch.testing.assert_close(std[1], torch.full((3,), 1 / 3))  # equal scores: uniform
    # any positive affine map of the scores (units, offsets) gives the same weights
    for a, b in ((1e4, 3.0), (0.5, -7.0)):
        torch.testing.assert_close(S.ensemble_weights(a * scores.double() + b, "standardized"), std)
    # the temperature sharpens it the same way for every scorer: T -> 0 picks the best
    cold = S.ensemble_weights(scores, "standardized", temperature=1e-3)
    torch.testing.assert_close(cold[0], torch.tensor([1.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match="temperature"):
        S.ensemble_weights(scores, "standardized", temperature=-1.0)


def test_select_improving():
    ens = torch.tensor([1.0, 0.5, float("nan"), -1.0])
    plain = torch.tensor([0.0, 0.45, 0.0, -2.0])
    assert S.select_improving(ens, plain).tolist() == [True, True, False, True]
    assert S.select_improving(ens, plain, margin=0.1).tolist() == [True, False, False, True]


def test_search_pipeline_with_ensemble_selection():
    """The augmentation flow: search, ensemble, score ensemble vs plain forecast, select."""
    x, reference, scorer, step_fn = _setup(2, 2, 2, batch=6, seed=5)
    res = S.beam_search(
        step_fn, x, scorer, 2, beam_width=3, top_k=3, reference=reference, to_physical=to_phys
    )
    ens = S.ensemble(res.trajectories, res.scores, mode="weighted", temperature=0.1)
    plain = brute_force(step_fn, x, scorer, 2, reference, 2)[0][1]  # always candidate 0
    ens_s = S.score_trajectories(scorer, x, ens.unsqueeze(1), 2, reference, to_phys).scores[:, 0]
    plain_s = S.score_trajectories(scorer, x, plain.unsqueeze(1), 2, reference, to_phys).scores[
        :, 0
    ]
    # the best searched trajectory is never worse than the plain forecast (candidate 0 is searched)
    assert (res.scores[:, 0] >= plain_s - 1e-5).all()
    assert torch.isfinite(ens_s).all() and ens_s.shape == (6,)


def test_search_pipeline_by_hand():
    """Constant fields, -MSE, one step, K = 3 candidates (last input + 0, +1, -1), top 2."""
    offsets = torch.tensor([0.0, 1.0, -1.0]).view(1, 3, 1, 1, 1, 1)

    def step_fn(window):
        return window[:, None, -1:] + offsets

    x = torch.tensor([0.0, 1.0]).view(2, 1, 1, 1, 1).expand(2, 2, C, H, W)
    reference = torch.ones(2, 1, C, H, W)
    scorer = M.NegMSEScorer()
    res = S.beam_search(step_fn, x, scorer, 1, beam_width=3, top_k=2, reference=reference)
    # sample 0: candidates 0, 1, -1 score -1, 0, -4; sample 1: 1, 2, 0 score 0, -1, -1
    torch.testing.assert_close(res.scores, torch.tensor([[0.0, -1.0], [0.0, -1.0]]))
    assert res.choices[:, :, 0].tolist() == [[1, 0], [0, 1]]
    ens = S.ensemble(res.trajectories, res.scores)  # 0.5 and 1.5 everywhere
    torch.testing.assert_close(ens[:, 0, 0, 0, 0], torch.tensor([0.5, 1.5]))
    ens_s = S.score_trajectories(scorer, x, ens.unsqueeze(1), 1, reference).scores[:, 0]
    plain_s = S.score_trajectories(scorer, x, step_fn(x)[:, :1], 1, reference).scores[:, 0]
    torch.testing.assert_close(ens_s, torch.tensor([-0.25, -0.25]))
    torch.testing.assert_close(plain_s, torch.tensor([-1.0, 0.0]))
    # gains 0.75 and -0.25
    assert S.select_improving(ens_s, plain_s).tolist() == [True, False]
    assert S.select_improving(ens_s, plain_s, margin=0.7).tolist() == [True, False]
    assert S.select_improving(ens_s, plain_s, margin=0.8).tolist() == [False, False]
