"""Beam search over autoregressive rollouts of a K-candidate forecaster, and self-ensembling.

BeamVQ (arXiv 2405.17051, 2502.18925) turns a deterministic encoder-decoder forecaster into a
K-candidate one through the K nearest codes of its code bank, searches the rollout with a beam
kept by a domain score, and combines the best trajectories into a pseudo-target for self-training.
The papers leave beam width, score accumulation and the ensemble rule open; beamvq's choices:

- A rollout of ``rollout_steps`` steps of ``T_out`` frames each. At step s every surviving beam
  (its last ``T_in`` frames: input frames followed by predicted ones) is expanded by ``step_fn``
  with beams folded into the batch (one call per step; on CPU calls of bounded size, below); the
  ``beams x K`` partial trajectories are scored and the best ``beam_width`` survive (stable sort:
  ties go to the earlier beam and the nearer code). At step 0 there is one beam per sample.
- The last step keeps the best ``top_k`` of all final expansions (``top_k`` may exceed
  ``beam_width``, up to ``beams x K``), so ``rollout_steps = 1`` is exactly the single-shot top-k
  filter of the K candidates, and a beam at least ``K^(steps-1)`` wide is exhaustive.
- ``accumulate="mean"`` (default) or ``"sum"`` over steps. All partial trajectories compared at a
  step have the same length, so both rank identically; the mean keeps the scale of a one-step
  score, so scores stay comparable across horizons and to single-shot scores, and the softmax
  temperature of the weighted ensemble need not change with ``rollout_steps``.
- NaN scores rank below every finite score (treated as -inf).
- On CPU the folded windows of a step go to ``step_fn`` in near-equal calls of at most
  ``CPU_CALL_ELEMENTS`` window values (``max_call_elements``). One call over every beam of every
  input made activations of hundreds of MB that were page-faulted in afresh on every call and
  streamed from DRAM: at 16 inputs per call that search ran at 0.66-0.80x the speed of a per-beam
  loop (docs/results.md, search cost). Every operation is per window, so the split changes
  nothing beyond the floating-point effects of the batch size on ``step_fn``.
- ``ensemble``: plain mean, softmax(scores / temperature)-weighted mean of the kept trajectories,
  or ``"standardized"``: softmax(z / temperature) with z the scores standardized per sample over
  the kept trajectories ((s - mean) / std). Raw scores depend on the scorer's units: -MSE of two
  good candidates differs by ~1e-4, so ``"weighted"`` at temperature 1 is the plain mean (measured
  in docs/results.md). Standardized scores make the temperature scale-free: at 1, a trajectory
  one standard deviation better gets e (2.7) times the weight, whatever the scorer.

Everything is a pure tensor function; call it under ``torch.no_grad()`` with the model in eval
mode (the caller's job).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from einops import rearrange, repeat
from torch import Tensor

__all__ = [
    "BeamResult",
    "TrajectoryScores",
    "beam_search",
    "score_trajectories",
    "ACCUMULATE_MODES",
    "ENSEMBLE_MODES",
    "final_trajectories",
    "standardize_scores",
    "ensemble_weights",
    "ensemble",
    "select_improving",
    "CPU_CALL_ELEMENTS",
    "windows_per_call",
]

#: Window values (N x T_in x C x H x W) per ``step_fn`` call of a search on CPU: 16 windows of the
#: overhead benchmark's 10 frames of 32x32 (64 candidate forecasts of a K = 4 SimVP), the most
#: that ran without page faults; 24 and more page-faulted their activations on every call
#: (``benchmarks/overhead.py``, docs/results.md, search cost).
CPU_CALL_ELEMENTS = 160 * 1024

ACCUMULATE_MODES = ("mean", "sum")


class BeamResult(NamedTuple):
    trajectories: Tensor  # (B, top_k, rollout_steps*T_out, C, H, W) model space, best first
    scores: Tensor  # (B, top_k) accumulated scores, descending
    step_scores: Tensor  # (B, top_k, rollout_steps) per-step scores of those trajectories
    choices: Tensor  # (B, top_k, rollout_steps) int64 candidate index (code rank) taken per step


class TrajectoryScores(NamedTuple):
    scores: Tensor  # (B, k) accumulated
    step_scores: Tensor  # (B, k, rollout_steps)


def final_trajectories(k: int, beam_width: int, rollout_steps: int) -> int:
    """How many trajectories the last step of a beam search ranks: the beams alive then
    (``min(beam_width, k^(rollout_steps-1))``) times ``k`` candidates each. ``top_k`` (the
    trajectories kept and combined) can be at most this."""
    return int(k) * min(int(beam_width), int(k) ** (int(rollout_steps) - 1))


def _identity(t: Tensor) -> Tensor:
    return t


def _take(t: Tensor, idx: Tensor) -> Tensor:
    """Per-sample gather along dim 1: t (B, N, ...), idx (B, n) -> (B, n, ...)."""
    rows = torch.arange(t.shape[0], device=t.device).unsqueeze(1)
    return t[rows, idx]


def _requires_reference(scorer: Callable[..., Tensor]) -> bool:
    return bool(getattr(scorer, "requires_reference", False))


def _check_common(
    x: Tensor,
    scorer: Callable[..., Tensor],
    rollout_steps: int,
    reference: Tensor | None,
    accumulate: str,
) -> None:
    if x.dim() != 5:
        raise ValueError(f"x must be (B, T_in, C, H, W), got {tuple(x.shape)}")
    if rollout_steps < 1:
        raise ValueError(f"rollout_steps must be >= 1, got {rollout_steps}")
    if accumulate not in ACCUMULATE_MODES:
        raise ValueError(f"accumulate must be one of {ACCUMULATE_MODES}, got {accumulate!r}")
    if reference is None and _requires_reference(scorer):
        raise ValueError(f"{type(scorer).__name__} needs a reference but reference is None")


def _check_reference(reference: Tensor | None, x: Tensor, horizon: int) -> None:
    if reference is None:
        return
    expected = (x.shape[0], horizon, *x.shape[2:])
    if tuple(reference.shape) != expected:
        raise ValueError(
            f"reference {tuple(reference.shape)} must be (B, rollout_steps*T_out, C, H, W) = {expected}"
        )


def _score_folded(
    scorer: Callable[..., Tensor],
    cands_phys: Tensor,
    reference: Tensor | None,
    window_phys: Tensor,
    n_beams: int,
) -> Tensor:
    """Score (B*n, K, ...) candidates of per-beam windows; the reference (B, ...) is repeated per beam."""
    ref = None if reference is None else repeat(reference, "b ... -> (b n) ...", n=n_beams)
    score = scorer(cands_phys, ref, inputs=window_phys)
    if score.shape != cands_phys.shape[:2]:
        raise ValueError(
            f"scorer returned {tuple(score.shape)}, expected {tuple(cands_phys.shape[:2])}"
        )
    # NaN would sort first in a descending sort; rank it last instead
    return torch.nan_to_num(score.float(), nan=float("-inf"), posinf=float("inf"))


def windows_per_call(window: Tensor, max_call_elements: int | str | None = "auto") -> int | None:
    """The most windows like ``window (N, T_in, C, H, W)`` to fold into one ``step_fn`` call:
    ``None`` (no limit) when ``max_call_elements`` is None, or "auto" off the CPU; otherwise
    ``max_call_elements`` ("auto": ``CPU_CALL_ELEMENTS``) over one window's values, at least 1."""
    if max_call_elements == "auto":
        if window.device.type != "cpu":
            return None
        max_call_elements = CPU_CALL_ELEMENTS
    if max_call_elements is None:
        return None
    if isinstance(max_call_elements, str) or int(max_call_elements) < 1:
        raise ValueError(
            f"max_call_elements must be >= 1, None or 'auto', got {max_call_elements!r}"
        )
    return max(1, int(max_call_elements) // max(1, window[:1].numel()))


def _expand(step_fn: Callable[[Tensor], Tensor], flat: Tensor, per_call: int | None) -> Tensor:
    """``step_fn`` over windows ``flat (N, ...)`` in ``ceil(N / per_call)`` near-equal calls."""
    n = flat.shape[0]
    if per_call is None or n <= per_call:
        return _check_candidates(step_fn(flat), flat)
    parts = flat.tensor_split(-(-n // per_call))
    return torch.cat([_check_candidates(step_fn(part), part) for part in parts])


def _check_candidates(cands: Tensor, flat: Tensor) -> Tensor:
    """``step_fn``'s output for windows ``flat (N, T_in, C, H, W)``, checked."""
    if cands.dim() != 6 or cands.shape[0] != flat.shape[0] or cands.shape[3:] != flat.shape[2:]:
        raise ValueError(
            f"step_fn returned {tuple(cands.shape)} for a window {tuple(flat.shape)}; "
            "expected (N, K, T_out, C, H, W) with the window's C, H, W"
        )
    return cands


def _kept(last: bool, n_beams: int, k: int, beam_width: int, top_k: int) -> int:
    """Trajectories kept after a step: ``top_k`` at the last step, else the beam width."""
    n_total = n_beams * k
    if last and top_k > n_total:
        raise ValueError(
            f"top_k={top_k} exceeds the {n_total} trajectories of the last step "
            f"(beams {n_beams} x K {k})"
        )
    return top_k if last else min(beam_width, n_total)


def beam_search(
    step_fn: Callable[[Tensor], Tensor],
    x: Tensor,
    scorer: Callable[..., Tensor],
    rollout_steps: int,
    beam_width: int,
    top_k: int,
    reference: Tensor | None = None,
    to_physical: Callable[[Tensor], Tensor] | None = None,
    accumulate: str = "mean",
    max_call_elements: int | str | None = "auto",
) -> BeamResult:
    """Beam search over ``rollout_steps`` autoregressive steps of a K-candidate forecaster.

    step_fn: window (N, T_in, C, H, W) -> cands (N, K, T_out, C, H, W) in model space, cands[:, 0]
    the nearest-code forecast. x: (B, T_in, C, H, W) model space. scorer: ``scorer(cands,
    reference, inputs=window) -> (B', K)``, higher is better, on physical fields. reference:
    (B, rollout_steps*T_out, C, H, W) physical, or None for reference-free scorers.
    to_physical: model space -> physical, acting on (..., C, H, W) (identity if None).
    max_call_elements: window values per ``step_fn`` call (see ``windows_per_call``): "auto"
    bounds calls on CPU only, None folds every beam of every input into one call per step.
    Returns the best ``top_k`` trajectories (model space) with their scores, best first.
    """
    _check_common(x, scorer, rollout_steps, reference, accumulate)
    per_call = windows_per_call(x, max_call_elements)
    if beam_width < 1 or top_k < 1:
        raise ValueError(f"beam_width and top_k must be >= 1, got {beam_width} and {top_k}")
    phys = to_physical or _identity
    batch, t_in = x.shape[:2]
    device = x.device

    windows = x.unsqueeze(1)  # (B, beams=1, T_in, C, H, W)
    trajectories: Tensor | None = None
    sums = torch.zeros(batch, 1, device=device)
    step_scores = torch.zeros(batch, 1, 0, device=device)
    choices = torch.zeros(batch, 1, 0, dtype=torch.long, device=device)

    for step in range(rollout_steps):
        n_beams = windows.shape[1]
        flat = rearrange(windows, "b n t c h w -> (b n) t c h w")
        cands = _expand(step_fn, flat, per_call)
        k, t_out = cands.shape[1:3]
        if step == 0:
            _check_reference(reference, x, rollout_steps * t_out)
        ref_step = None if reference is None else reference[:, step * t_out : (step + 1) * t_out]
        score = _score_folded(scorer, phys(cands), ref_step, phys(flat), n_beams)
        score = rearrange(score, "(b n) k -> b (n k)", b=batch)
        totals = repeat(sums, "b n -> b (n k)", k=k) + score

        n_keep = _kept(step == rollout_steps - 1, n_beams, k, beam_width, top_k)
        order = torch.sort(totals, dim=1, descending=True, stable=True).indices[:, :n_keep]
        parent = torch.div(order, k, rounding_mode="floor")
        rank = order % k

        piece = _take(rearrange(cands, "(b n) k t c h w -> b (n k) t c h w", b=batch), order)
        windows = torch.cat([_take(windows, parent), piece], dim=2)[:, :, -t_in:]
        trajectories = (
            piece if trajectories is None else torch.cat([_take(trajectories, parent), piece], 2)
        )
        sums = _take(totals, order)
        step_scores = torch.cat([_take(step_scores, parent), _take(score, order).unsqueeze(-1)], -1)
        choices = torch.cat([_take(choices, parent), rank.unsqueeze(-1)], -1)

    assert trajectories is not None
    scores = sums / rollout_steps if accumulate == "mean" else sums
    return BeamResult(
        trajectories=trajectories, scores=scores, step_scores=step_scores, choices=choices
    )


def score_trajectories(
    scorer: Callable[..., Tensor],
    x: Tensor,
    trajectories: Tensor,
    rollout_steps: int,
    reference: Tensor | None = None,
    to_physical: Callable[[Tensor], Tensor] | None = None,
    accumulate: str = "mean",
) -> TrajectoryScores:
    """Score whole trajectories exactly as ``beam_search`` scores them step by step.

    x (B, T_in, C, H, W) and trajectories (B, k, rollout_steps*T_out, C, H, W) in model space. At
    step s each trajectory's window is the last T_in frames of (x, its first s*T_out frames). Use
    it to score a self-ensemble (``trajectories = ens.unsqueeze(1)``) and the plain forecast on
    equal terms before ``select_improving``.
    """
    _check_common(x, scorer, rollout_steps, reference, accumulate)
    if (
        trajectories.dim() != 6
        or trajectories.shape[0] != x.shape[0]
        or trajectories.shape[3:] != x.shape[2:]
    ):
        raise ValueError(f"trajectories {tuple(trajectories.shape)} do not fit x {tuple(x.shape)}")
    horizon = trajectories.shape[2]
    if horizon % rollout_steps:
        raise ValueError(f"{horizon} frames do not split into {rollout_steps} steps")
    _check_reference(reference, x, horizon)
    phys = to_physical or _identity
    batch, n_traj = trajectories.shape[:2]
    t_in, t_out = x.shape[1], horizon // rollout_steps
    full = torch.cat([repeat(x, "b t c h w -> b n t c h w", n=n_traj), trajectories], dim=2)
    per_step = []
    for step in range(rollout_steps):
        start = t_in + step * t_out
        window = rearrange(full[:, :, start - t_in : start], "b n t c h w -> (b n) t c h w")
        cands = rearrange(full[:, :, start : start + t_out], "b n t c h w -> (b n) 1 t c h w")
        ref_step = None if reference is None else reference[:, step * t_out : (step + 1) * t_out]
        score = _score_folded(scorer, phys(cands), ref_step, phys(window), n_traj)
        per_step.append(rearrange(score, "(b n) 1 -> b n", b=batch))
    step_scores = torch.stack(per_step, dim=-1)
    scores = step_scores.mean(-1) if accumulate == "mean" else step_scores.sum(-1)
    return TrajectoryScores(scores=scores, step_scores=step_scores)


ENSEMBLE_MODES = ("mean", "weighted", "standardized")


def standardize_scores(scores: Tensor, eps: float = 1e-12) -> Tensor:
    """(s - mean) / std over the k trajectories of each sample (B, k), population std; a sample
    whose scores are all equal gets zeros. Invariant to any positive affine map of the scores.
    Computed in float64: close scores (-MSE of good candidates) cancel badly in float32."""
    s = scores.double()
    centred = s - s.mean(1, keepdim=True)
    std = centred.pow(2).mean(1, keepdim=True).sqrt()
    z = torch.where(std > eps, centred / std.clamp_min(eps), torch.zeros_like(centred))
    return z.float()


def ensemble_weights(scores: Tensor, mode: str = "mean", temperature: float = 1.0) -> Tensor:
    """Weights (B, k) summing to 1 over k: uniform, softmax(scores / temperature), or
    softmax(standardize_scores(scores) / temperature) (``mode="standardized"``)."""
    if scores.dim() != 2:
        raise ValueError(f"scores must be (B, k), got {tuple(scores.shape)}")
    if mode not in ENSEMBLE_MODES:
        raise ValueError(f"mode must be one of {ENSEMBLE_MODES}, got {mode!r}")
    if mode == "mean":
        return torch.full_like(scores, 1.0 / scores.shape[1], dtype=torch.float32)
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    s = standardize_scores(scores) if mode == "standardized" else scores.float()
    return torch.softmax(s / temperature, dim=1)


def ensemble(
    trajectories: Tensor, scores: Tensor, mode: str = "mean", temperature: float = 1.0
) -> Tensor:
    """Self-ensemble of the kept trajectories (B, k, ...) -> (B, ...).

    ``mode="mean"``: the plain mean. ``mode="weighted"``: softmax(scores / temperature)-weighted
    mean; a low temperature approaches the best trajectory, a high one the plain mean.
    ``mode="standardized"``: the same on per-sample standardized scores (scale-free temperature).
    """
    if trajectories.shape[:2] != scores.shape:
        raise ValueError(
            f"trajectories {tuple(trajectories.shape)} and scores {tuple(scores.shape)} differ"
        )
    weights = ensemble_weights(scores, mode, temperature)
    if mode == "mean":
        return trajectories.mean(1)
    shape = (*weights.shape, *([1] * (trajectories.dim() - 2)))
    return (weights.view(shape).to(trajectories.dtype) * trajectories).sum(1)


def select_improving(ensemble_scores: Tensor, plain_scores: Tensor, margin: float = 0.0) -> Tensor:
    """Bool mask (B,) of samples whose ensemble beats the plain forecast by more than ``margin``.

    Both scores higher-is-better and computed the same way (see ``score_trajectories``); a NaN on
    either side rejects the sample.
    """
    if ensemble_scores.shape != plain_scores.shape:
        raise ValueError(f"{tuple(ensemble_scores.shape)} vs {tuple(plain_scores.shape)}")
    return ensemble_scores > plain_scores + margin
