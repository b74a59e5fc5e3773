"""BeamVQ's self-training step and the predict-time search, as pure functions of tensors.

BeamVQ (arXiv 2405.17051, 2502.18925), stage 3: a beam search over the autoregressive rollout of
the K-candidate forecaster keeps the trajectories a domain metric prefers; the best ``top_k`` are
combined into one pseudo-target (self-ensemble); a pseudo-target is accepted when it is finite
and, with ``only_improving``, when its score beats the plain (nearest-code) forecast's by more
than ``margin`` (the filter of the papers' "metric-driven" selection). The search, scoring and
ensemble rules are those of ``beamvq.search``; this module chains them, in chunks of inputs
(memory grows with inputs × beams × K forecasts per call; on CPU the model calls
within one are bounded, ``beamvq.search.CPU_CALL_ELEMENTS``), for two callers:

- ``self_train_step``: ``beamvq.callbacks.beam_search.BeamSearchAugmentation`` (pseudo-targets for
  the augmented pool);
- ``search_members``: the module's beam-searched ``predict`` ensemble (its best trajectories).

Units: inputs ``x`` are in model space (normalized, what the step function takes); references,
scores and everything returned are physical (the scorers read physical fields and the pool and
the prediction files hold physical fields); ``to_physical`` maps model space to physical.

Nothing here touches a model's mode or gradients: call under ``torch.no_grad()`` with the model
in eval mode (retrieval then reads the code bank and never moves it).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch
from einops import rearrange
from torch import Tensor

from beamvq import search
from beamvq.protocols import Members, StepFn

__all__ = [
    "ForecastFn",
    "PushforwardResult",
    "calls_needed",
    "SearchConfig",
    "SelfTrainResult",
    "plain_labels",
    "pushforward_step",
    "search_members",
    "self_train_step",
]

# normalized input (N, T_in, C, H, W), rollout steps -> normalized deterministic rollout
# (N, steps × T_out, C, H, W) (``beamvq.protocols.SearchableModel.forecast``)
ForecastFn = Callable[[Tensor, int], Tensor]
Scorer = Callable[..., Tensor]


def _at_least(errors: list[str], name: str, value: int | None, low: int, optional: bool) -> None:
    if value is None and optional:
        return
    if value is None or int(value) < low:
        tail = " or null" if optional else ""
        errors.append(f"search.{name} must be >= {low}{tail}, got {value}")


@dataclass(frozen=True)
class SearchConfig:
    """How to search, combine and filter (YAML: the ``search`` block of ``BeamSearchAugmentation``).

    Attributes:
        beam_width: beams kept between rollout steps.
        top_k: trajectories kept at the last step and combined into each pseudo-target (the
            members of a predict-time search); at most ``beamvq.search.final_trajectories``.
        candidate_k: code-bank candidates per beam and step; ``None``: the model's ``candidate_k``.
        accumulate: ``"mean"`` or ``"sum"`` of per-step scores (see ``beamvq.search``).
        ensemble: ``"mean"``, ``"weighted"`` (softmax of scores / ``temperature``) or
            ``"standardized"`` (softmax of per-sample standardized scores / ``temperature``).
        temperature: softmax temperature of the weighted or standardized ensemble (> 0).
        only_improving: accept a pseudo-target only if its score beats the plain forecast's.
        margin: how much it must beat it by (scorer units).
        rollout_steps: autoregressive steps searched; ``None``: the model's ``rollout_steps``.
    """

    beam_width: int = 4
    top_k: int = 2
    candidate_k: int | None = None
    accumulate: str = "mean"
    ensemble: str = "mean"
    temperature: float = 1.0
    only_improving: bool = True
    margin: float = 0.0
    rollout_steps: int | None = None

    def __post_init__(self) -> None:
        errors: list[str] = []
        for name in ("beam_width", "top_k"):
            _at_least(errors, name, getattr(self, name), 1, optional=False)
        for name in ("candidate_k", "rollout_steps"):
            _at_least(errors, name, getattr(self, name), 1, optional=True)
        if self.accumulate not in search.ACCUMULATE_MODES:
            errors.append(f"search.accumulate must be one of {search.ACCUMULATE_MODES}")
        if self.ensemble not in search.ENSEMBLE_MODES:
            errors.append(f"search.ensemble must be one of {search.ENSEMBLE_MODES}")
        if not self.temperature > 0:
            errors.append(f"search.temperature must be > 0, got {self.temperature}")
        if isinstance(self.margin, bool) or not math.isfinite(self.margin):
            errors.append(f"search.margin must be a finite number, got {self.margin}")
        if not errors:
            errors += self._top_k_errors()
        if errors:
            raise ValueError("; ".join(errors))

    def _top_k_errors(self) -> list[str]:
        """``top_k`` against the trajectories of the last step, once K and the steps are known."""
        if self.candidate_k is None or self.rollout_steps is None:
            return []
        final = search.final_trajectories(self.candidate_k, self.beam_width, self.rollout_steps)
        if self.top_k <= final:
            return []
        return [
            f"search.top_k={self.top_k} exceeds the {final} trajectories of the last step "
            f"(search.beam_width={self.beam_width}, candidate_k={self.candidate_k}, "
            f"rollout_steps={self.rollout_steps})"
        ]

    def resolved(self, candidate_k: int, rollout_steps: int) -> SearchConfig:
        """This config with the model's ``candidate_k`` and ``rollout_steps`` where it leaves them
        unset; checked again (``top_k`` against the trajectories of the last step)."""
        return dataclasses.replace(
            self,
            candidate_k=int(candidate_k if self.candidate_k is None else self.candidate_k),
            rollout_steps=int(rollout_steps if self.rollout_steps is None else self.rollout_steps),
        )


class SelfTrainResult(NamedTuple):
    """Self-training results for N inputs, physical: pseudo-targets ``(N, T, C, H, W)`` over the
    whole horizon ``rollout_steps × T_out``, the ensemble's and the plain forecast's scores
    ``(N,)`` and whether each pseudo-target is accepted ``(N,)``."""

    pseudo: Tensor
    ensemble_score: Tensor
    plain_score: Tensor
    accepted: Tensor


def _identity(t: Tensor) -> Tensor:
    return t


def _steps(config: SearchConfig) -> int:
    if config.rollout_steps is None:
        raise ValueError("SearchConfig.rollout_steps is unset: pass config.resolved(k, steps)")
    return int(config.rollout_steps)


def _chunks(n: int, chunk: int | None) -> Iterator[slice]:
    if n == 0:
        raise ValueError("the search got no inputs")
    size = n if chunk is None else int(chunk)
    if size < 1:
        raise ValueError(f"inputs per search call must be >= 1, got {chunk}")
    for start in range(0, n, size):
        yield slice(start, start + size)


def _self_train_call(
    x: Tensor,
    step_fn: StepFn,
    forecast: ForecastFn,
    scorer: Scorer,
    config: SearchConfig,
    reference: Tensor | None,
    to_physical: Callable[[Tensor], Tensor],
) -> SelfTrainResult:
    """Search, ensemble and filter the inputs of one call (see ``self_train_step``)."""
    steps = _steps(config)
    res = search.beam_search(
        step_fn, x, scorer, steps, config.beam_width, config.top_k,
        reference=reference, to_physical=to_physical, accumulate=config.accumulate,
    )  # fmt: skip
    ens = search.ensemble(res.trajectories, res.scores, config.ensemble, config.temperature)
    # the plain forecast in calls of the size the search bounds its step calls to (on CPU)
    per_call = search.windows_per_call(x) or x.shape[0]
    parts = x.tensor_split(-(-x.shape[0] // per_call))
    plain = torch.cat([forecast(part, steps) for part in parts])
    # the ensemble and the plain forecast are scored step by step exactly as the search scores
    scored = search.score_trajectories(
        scorer, x, torch.stack([ens, plain], dim=1), steps,
        reference=reference, to_physical=to_physical, accumulate=config.accumulate,
    )  # fmt: skip
    ens_score, plain_score = scored.scores[:, 0], scored.scores[:, 1]
    pseudo = to_physical(ens)
    ok = torch.isfinite(rearrange(pseudo, "b ... -> b (...)")).all(1)
    if config.only_improving:
        ok = ok & search.select_improving(ens_score, plain_score, config.margin)
    return SelfTrainResult(pseudo, ens_score, plain_score, ok)


def self_train_step(
    x: Tensor,
    step_fn: StepFn,
    forecast: ForecastFn,
    scorer: Scorer,
    config: SearchConfig,
    reference: Tensor | None = None,
    to_physical: Callable[[Tensor], Tensor] | None = None,
    chunk: int | None = None,
    on_chunk: Callable[[int], object] | None = None,
) -> SelfTrainResult:
    """BeamVQ's self-training step for inputs ``x (N, T_in, C, H, W)`` (model space).

    Per call of ``chunk`` inputs (``None``: all at once): ``beamvq.search.beam_search`` with
    ``step_fn`` (the K-candidate step, see ``beamvq.protocols.StepFn``), the self-ensemble of
    the best ``config.top_k`` trajectories, the plain forecast ``forecast(x, rollout_steps)``,
    both scored by ``scorer`` against ``reference (N, rollout_steps × T_out, C, H, W)``
    (physical; ``None`` for reference-free scorers), and the filter (finite, and with
    ``only_improving`` better than the plain forecast by more than ``margin``). ``config`` must
    have ``rollout_steps`` set (``SearchConfig.resolved``). ``on_chunk(1)`` is called after each
    call (a progress bar). Every operation is per sample, so results do not depend on ``chunk``
    beyond the floating-point effects of the batch size on the step function.
    """
    phys = to_physical or _identity
    outs = []
    for part in _chunks(x.shape[0], chunk):
        ref = None if reference is None else reference[part]
        outs.append(_self_train_call(x[part], step_fn, forecast, scorer, config, ref, phys))
        if on_chunk is not None:
            on_chunk(1)
    return SelfTrainResult(*(torch.cat(parts) for parts in zip(*outs)))


class PushforwardResult(NamedTuple):
    """Pushforward inputs for N inputs, physical: ``inputs (N, top_k, T_in, C, H, W)``, each input
    advanced by the first ``T_out`` frames of one of its ``top_k`` best trajectories (the model's
    own states), and those trajectories' search ``scores (N, top_k)``."""

    inputs: Tensor
    scores: Tensor


def advance(x: Tensor, frames: Tensor) -> Tensor:
    """The last ``T_in`` frames of ``x (N, T_in, ...)`` followed by each member's ``frames
    (N, M, T, ...)``: ``(N, M, T_in, ...)``."""
    t_in = x.shape[1]
    lead = x.unsqueeze(1).expand(-1, frames.shape[1], *x.shape[1:])
    return torch.cat([lead, frames], dim=2)[:, :, -t_in:]


def pushforward_step(
    x: Tensor,
    step_fn: StepFn,
    scorer: Scorer,
    config: SearchConfig,
    reference: Tensor | None = None,
    to_physical: Callable[[Tensor], Tensor] | None = None,
    chunk: int | None = None,
    on_chunk: Callable[[int], object] | None = None,
) -> PushforwardResult:
    """The search's choice of the model's own states as new inputs (pushforward; Stochastic
    PushForward, arXiv 2508.18565, builds such a set of model-generated inputs with true targets
    between epochs; Brandstetter et al. 2022 train on them so errors do not compound).

    Per input ``x (N, T_in, C, H, W)`` (model space): the beam search of ``self_train_step``
    keeps its ``config.top_k`` best trajectories by ``scorer`` (against ``reference``, physical),
    and each trajectory's first forecast step advances the input by ``T_out`` frames. Paired with
    the recorded future of the window that starts ``T_out`` frames later, each is a training
    sample whose input the model made and whose target is true.
    """
    phys = to_physical or _identity
    steps = _steps(config)
    inputs, scores = [], []
    for part in _chunks(x.shape[0], chunk):
        ref = None if reference is None else reference[part]
        res = search.beam_search(
            step_fn, x[part], scorer, steps, config.beam_width, config.top_k,
            reference=ref, to_physical=phys, accumulate=config.accumulate,
        )  # fmt: skip
        t_out = res.trajectories.shape[2] // steps
        inputs.append(phys(advance(x[part], res.trajectories[:, :, :t_out])))
        scores.append(res.scores)
        if on_chunk is not None:
            on_chunk(1)
    return PushforwardResult(torch.cat(inputs), torch.cat(scores))


def plain_labels(
    x: Tensor,
    forecast: ForecastFn,
    steps: int,
    to_physical: Callable[[Tensor], Tensor] | None = None,
    chunk: int | None = None,
) -> Tensor:
    """The plain forecasts ``(N, steps × T_out, C, H, W)`` (physical) of inputs ``x`` (model
    space) as pseudo-labels, unfiltered: the authors' protocol, which labels held-out inputs this
    way (no search, no ensemble, no metric filter)."""
    phys = to_physical or _identity
    return torch.cat([phys(forecast(x[part], steps)) for part in _chunks(x.shape[0], chunk)])


def search_members(
    x: Tensor,
    step_fn: StepFn,
    scorer: Scorer,
    config: SearchConfig,
    reference: Tensor | None = None,
    to_physical: Callable[[Tensor], Tensor] | None = None,
    chunk: int | None = None,
) -> Members:
    """The predict-time ensemble: the ``config.top_k`` best trajectories of a beam search of
    inputs ``x`` (model space), physical ``(N, top_k, rollout_steps × T_out, C, H, W)``, best
    first, with their accumulated scores ``(N, top_k)``; ``chunk`` inputs per call."""
    phys = to_physical or _identity
    steps = _steps(config)
    fields, scores = [], []
    for part in _chunks(x.shape[0], chunk):
        ref = None if reference is None else reference[part]
        res = search.beam_search(
            step_fn, x[part], scorer, steps, config.beam_width, config.top_k,
            reference=ref, to_physical=phys, accumulate=config.accumulate,
        )  # fmt: skip
        fields.append(phys(res.trajectories))
        scores.append(res.scores)
    return Members(torch.cat(fields), torch.cat(scores))


def calls_needed(n: int, chunk: int | None) -> int:
    """How many search calls ``n`` inputs take at ``chunk`` inputs per call."""
    return 0 if n == 0 else (1 if chunk is None else math.ceil(n / int(chunk)))
