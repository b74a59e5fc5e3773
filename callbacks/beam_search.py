"""BeamVQ self-training: beam search over the rollout, metric filter, self-ensemble, pool growth.

BeamVQ (arXiv 2405.17051, 2502.18925), stage 3: after the base forecaster has trained (stage 1),
its code bank gives K alternative futures per step (stage 2); a beam search over the
autoregressive rollout keeps the trajectories a domain metric prefers, the best ``top_k`` are
combined into one pseudo-target (self-ensemble), and the (input, pseudo-target) pairs join the
training set, epoch after epoch. This callback only orchestrates: the search and the ensemble are
the pure functions of ``beamvq.search``, the scorers those of ``beamvq.metrics``, and the
augmented pool (capped, checkpointed) belongs to the datamodule.

Choices the papers leave open, and ours:

- When: at the end of training epoch ``e`` when ``e >= start_epoch`` and ``(e - start_epoch)`` is
  a multiple of ``every_n_epochs``; never at the last epoch of the fit (no epoch would train on
  it) nor when the trainer is stopping. The search runs after the epoch's validation and before
  a checkpoint saved at the epoch's end (Lightning runs checkpoint callbacks last; ModelCheckpoint
  saves there when validation runs once per epoch), so that checkpoint holds the pool the next
  epoch trains on; a checkpoint saved at validation end holds the pool before this search.
- What: ``max_windows`` training windows, a subset drawn afresh each epoch (seeded by
  ``seed`` and the epoch, so a resumed run draws the same ones), through
  ``datamodule.training_windows`` only: never validation or test data. Optionally
  ``unlabelled_windows`` inputs with no recorded future (the last inputs of each training
  trajectory, whose future runs past the frames of its training windows; every input frame is
  a frame those windows already hold), which need a reference-free scorer.
- How: the module in eval mode under ``no_grad`` (the EMA code bank must not move; train mode is
  restored afterwards); each rank searches its share of the windows and the accepted samples are
  gathered, so every DDP rank adds the same samples in the same order.
- Filter: with ``only_improving`` a sample is kept only if its ensemble scores higher than the
  plain (nearest-code) forecast by more than ``margin`` on the same scorer, both scored step by
  step exactly as the search scores (``beamvq.search.score_trajectories``); non-finite
  pseudo-targets are always dropped. The pool stores the ensemble's score (the datamodule's
  ``"worst"`` policy drops the lowest; with two scorers of different scales prefer ``"oldest"``).
- Pseudo-targets are physical fields of the whole horizon ``rollout_steps × T_out``, the shape of
  real targets.
- ``trainer.reload_dataloaders_every_n_epochs`` must be 1: the training loader is rebuilt each
  epoch (cheap: the data are in memory), so new pool samples are trained on from the next epoch
  on. Any other value would skip or delay them depending on how the two periods align.

Logged each search epoch: ``augment/num_added``, ``augment/num_accepted``, ``augment/pool_size``,
``augment/score_gain`` (mean over searched samples of ensemble score - plain forecast score),
``augment/search_seconds``, ``augment/train_seconds`` (the epoch's wall time without
validation) and ``augment/search_to_train`` (their ratio); ``history`` keeps them per epoch.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

import pytorch_lightning as pl
import torch
from einops import rearrange
from pytorch_lightning.callbacks import RichProgressBar
from pytorch_lightning.utilities import rank_zero_info
from torch import Tensor

from beamvq import search
from beamvq.datamodules.io import write_netcdf
from beamvq.metrics import Scorer
from beamvq.protocols import SOURCE_KINDS, UnlabelledInputs

log = logging.getLogger(__name__)

_ACCUMULATE = ("mean", "sum")


class SearchOutput(NamedTuple):
    """Search results for N inputs (physical): pseudo-targets ``(N, T, C, H, W)``, the ensemble's
    and the plain forecast's scores ``(N,)`` and whether each sample is accepted ``(N,)``."""

    pseudo: Tensor
    ensemble_score: Tensor
    plain_score: Tensor
    accepted: Tensor


class Shard(NamedTuple):
    """One rank's share of N items: ``positions`` into the N (padded to the same length on every
    rank by repeating item 0) and ``valid`` marking the real ones."""

    positions: Tensor
    valid: Tensor


class Accepted(NamedTuple):
    """The samples one search epoch accepted, identical on every rank: physical inputs ``x``,
    pseudo-targets ``pseudo``, ensemble scores ``score``, their sources (``source_kind`` indexes
    ``beamvq.protocols.SOURCE_KINDS``; ``source_index`` the window index or unlabelled id); how
    many inputs were searched over all ranks and the mean score gain of the ensemble over the
    plain forecast."""

    x: Tensor
    pseudo: Tensor
    score: Tensor
    source_kind: Tensor
    source_index: Tensor
    searched: int
    gain: float


class EpochRecord(NamedTuple):
    """What one search epoch did (the numbers the callback logs)."""

    epoch: int
    searched: int
    accepted: int
    added: int
    pool_size: int
    score_gain: float
    search_seconds: float
    train_seconds: float


def shard(n: int, rank: int, world_size: int) -> Shard:
    """Round-robin share of ``n`` items for ``rank``, padded to ``ceil(n / world_size)``."""
    per_rank = math.ceil(n / world_size) if n else 0
    positions = torch.arange(per_rank, dtype=torch.long) * world_size + rank
    valid = positions < n
    return Shard(torch.where(valid, positions, torch.zeros_like(positions)), valid)


def merge_gathered(order_key: Tensor, keep: Tensor, *tensors: Tensor) -> list[Tensor]:
    """Keep the rows of gathered tensors where ``keep``, sorted by ``order_key``.

    After an all-gather the rows arrive rank by rank; sorting by the items' global position makes
    the result independent of the world size, so every rank adds the same samples in the same
    order (and a 2-rank run adds what a 1-rank run would).
    """
    rows = torch.nonzero(keep, as_tuple=False).flatten()
    rows = rows[torch.argsort(order_key[rows], stable=True)]
    return [t[rows] for t in tensors]


@contextmanager
def search_progress(
    trainer: pl.Trainer | None, total: int, description: str
) -> Iterator[Callable[[int], None]]:
    """Advance a ``total``-step task on the trainer's progress bar (rank 0; no-op without one).

    With a ``RichProgressBar`` the task joins the bar's own live display (a second rich display
    would raise); with the TQDM bar it is a transient tqdm line.
    """
    bar = None if trainer is None else trainer.progress_bar_callback
    if (
        trainer is None
        or not trainer.is_global_zero
        or bar is None
        or not bar.is_enabled
        or total == 0
    ):
        yield lambda n=1: None
        return
    if isinstance(bar, RichProgressBar) and bar.progress is not None:
        progress = bar.progress
        task = progress.add_task(description, total=total)
        try:
            yield lambda n=1: progress.update(task, advance=n, refresh=True)
        finally:
            progress.remove_task(task)
        return
    from tqdm.auto import tqdm

    with tqdm(total=total, desc=description, leave=False) as pbar:
        yield pbar.update


class BeamSearchAugmentation(pl.Callback):
    """Grow the training set with beam-searched, filtered, self-ensembled pseudo-targets.

    Args:
        scorer: a ``beamvq.metrics.Scorer`` (YAML ``class_path``), higher is better: e.g.
            ``CSIScorer`` for storms, ``NegMSEScorer`` or a ``WeightedScorer`` with physics scorers
            for fluids. A scorer with ``fit`` is fitted once on training-split targets.
        every_n_epochs: search every n-th epoch from ``start_epoch`` on.
        start_epoch: first epoch (0-based) whose end runs a search: the base model trains first.
        max_windows: training windows searched per epoch (``None``: all of them).
        beam_width: beams kept between rollout steps.
        top_k: trajectories combined into each pseudo-target.
        candidate_k: code-bank candidates per beam and step; ``None`` takes the module's
            ``candidate_k``.
        accumulate: ``"mean"`` or ``"sum"`` of per-step scores (see ``beamvq.search``).
        ensemble: ``"mean"``, ``"weighted"`` (softmax of scores / ``temperature``) or
            ``"standardized"`` (softmax of per-sample standardized scores / ``temperature``: the
            same temperature means the same thing for every scorer).
        temperature: softmax temperature of the weighted or standardized ensemble.
        only_improving: keep only samples whose ensemble beats the plain forecast.
        margin: how much it must beat it by (scorer units).
        unlabelled_windows: inputs with no recorded future searched per epoch (0: none).
        unlabelled_scorer: reference-free scorer for those; ``None`` uses ``scorer``, which must
            then be reference-free.
        fit_windows: training windows whose targets fit the scorers (``None``: all).
        search_batch_size: inputs searched in one call (memory: × beams × K forecasts).
            ``None``: 4 on CPU, 32 on an accelerator. On one CPU thread 16 inputs per call
            took 1.6× as long as 4 (the folded activations leave the caches; ``python
            benchmarks/overhead.py``, docs/results.md §3); on a GPU larger calls should win.
        seed: seed of the per-epoch window subsets.
        pool_output: NetCDF path where rank 0 writes the pool after each search (``None``: off).
    """

    def __init__(
        self,
        scorer: Scorer,
        every_n_epochs: int = 1,
        start_epoch: int = 1,
        max_windows: int | None = 64,
        beam_width: int = 4,
        top_k: int = 2,
        candidate_k: int | None = None,
        accumulate: str = "mean",
        ensemble: str = "mean",
        temperature: float = 1.0,
        only_improving: bool = True,
        margin: float = 0.0,
        unlabelled_windows: int = 0,
        unlabelled_scorer: Scorer | None = None,
        fit_windows: int | None = 256,
        search_batch_size: int | None = None,
        seed: int = 0,
        pool_output: str | None = None,
    ) -> None:
        super().__init__()
        for name, value in (
            ("every_n_epochs", every_n_epochs),
            ("beam_width", beam_width),
            ("top_k", top_k),
        ):
            if int(value) < 1:
                raise ValueError(f"BeamSearchAugmentation: {name} must be >= 1, got {value}")
        for name, value in (
            ("max_windows", max_windows),
            ("candidate_k", candidate_k),
            ("fit_windows", fit_windows),
            ("search_batch_size", search_batch_size),
        ):
            if value is not None and int(value) < 1:
                raise ValueError(
                    f"BeamSearchAugmentation: {name} must be >= 1 or None, got {value}"
                )
        if start_epoch < 0 or unlabelled_windows < 0:
            raise ValueError(
                "BeamSearchAugmentation: start_epoch and unlabelled_windows must be >= 0, got "
                f"{start_epoch} and {unlabelled_windows}"
            )
        if accumulate not in _ACCUMULATE:
            raise ValueError(f"BeamSearchAugmentation: accumulate must be one of {_ACCUMULATE}")
        if ensemble not in search.ENSEMBLE_MODES:
            raise ValueError(
                f"BeamSearchAugmentation: ensemble must be one of {search.ENSEMBLE_MODES}"
            )
        if temperature <= 0:
            raise ValueError(f"BeamSearchAugmentation: temperature must be > 0, got {temperature}")
        free_scorer = unlabelled_scorer if unlabelled_scorer is not None else scorer
        if unlabelled_windows > 0 and getattr(free_scorer, "requires_reference", False):
            raise ValueError(
                "BeamSearchAugmentation: unlabelled_windows > 0 needs a reference-free scorer "
                f"(the inputs have no recorded future), but {type(free_scorer).__name__} needs "
                "one: set unlabelled_scorer (e.g. SpectrumScorer, TKEScorer)"
            )
        self.scorer = scorer
        self.unlabelled_scorer = free_scorer
        self.every_n_epochs = int(every_n_epochs)
        self.start_epoch = int(start_epoch)
        self.max_windows = None if max_windows is None else int(max_windows)
        self.beam_width = int(beam_width)
        self.top_k = int(top_k)
        self.candidate_k = None if candidate_k is None else int(candidate_k)
        self.accumulate = accumulate
        self.ensemble = ensemble
        self.temperature = float(temperature)
        self.only_improving = bool(only_improving)
        self.margin = float(margin)
        self.unlabelled_windows = int(unlabelled_windows)
        self.fit_windows = None if fit_windows is None else int(fit_windows)
        self.search_batch_size = None if search_batch_size is None else int(search_batch_size)
        self.seed = int(seed)
        self.pool_output = pool_output
        self.history: list[EpochRecord] = []
        self._epoch_start = 0.0
        self._val_start: float | None = None
        self._val_seconds = 0.0

    # -- checks ---------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if trainer.reload_dataloaders_every_n_epochs != 1:
            raise ValueError(
                "BeamSearchAugmentation grows the training set each epoch: set "
                "trainer.reload_dataloaders_every_n_epochs: 1 (got "
                f"{trainer.reload_dataloaders_every_n_epochs})"
            )
        dm = trainer.datamodule
        needed = ["training_windows", "pool", "normalization", "info"]
        needed += ["unlabelled_inputs"] if self.unlabelled_windows else []
        missing = [name for name in needed if not hasattr(dm, name)]
        if dm is None or missing:
            raise TypeError(
                "BeamSearchAugmentation needs a datamodule with the augmented-pool API "
                f"(beamvq.datamodules.netcdf.NetCDFDataModule); {type(dm).__name__} lacks {missing}"
            )
        for name in ("search_step_fn", "normalize", "denormalize", "rollout_steps"):
            if not hasattr(pl_module, name):
                raise TypeError(
                    f"BeamSearchAugmentation needs a beamvq.module.ForecastModule; "
                    f"{type(pl_module).__name__} has no {name}"
                )
        k = self._k(pl_module)
        bottleneck = getattr(pl_module.model, "bottleneck", None)
        if k < 2 or bottleneck is None:
            raise ValueError(
                "BeamSearchAugmentation needs a model.bottleneck and candidate_k >= 2 (the beams "
                f"expand into code-bank candidates); got candidate_k={k}, bottleneck={bottleneck}"
            )
        steps = int(pl_module.rollout_steps)
        final = search.final_trajectories(k, self.beam_width, steps)
        if self.top_k > final:
            raise ValueError(
                f"BeamSearchAugmentation: top_k={self.top_k} exceeds the {final} trajectories of "
                f"the last step (beam_width={self.beam_width}, candidate_k={k}, "
                f"rollout_steps={steps})"
            )

    def _k(self, pl_module: pl.LightningModule) -> int:
        return int(self.candidate_k or pl_module.hparams.candidate_k)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # fitted at every fit start (cheap, deterministic): a resumed run gets the same climatology
        scorers = list({id(s): s for s in (self.scorer, self.unlabelled_scorer)}.values())
        to_fit = [s for s in scorers if callable(getattr(s, "fit", None))]
        if to_fit:
            _, _, y = trainer.datamodule.training_windows(
                max_windows=self.fit_windows, seed=self.seed
            )
            for s in to_fit:
                s.fit(y)
            rank_zero_info(
                f"BeamSearchAugmentation: fitted {[type(s).__name__ for s in to_fit]} on "
                f"{y.shape[0]} training targets"
            )

    # -- timing of the training epoch -------------------------------------------------------------
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_start = time.perf_counter()
        self._val_seconds = 0.0

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._val_start = time.perf_counter()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._val_start is not None:
            self._val_seconds += time.perf_counter() - self._val_start
            self._val_start = None

    # -- the search -----------------------------------------------------------------------------
    def due(self, trainer: pl.Trainer) -> bool:
        """Whether the end of the current epoch runs a search."""
        epoch = trainer.current_epoch
        if trainer.sanity_checking or trainer.should_stop or epoch < self.start_epoch:
            return False
        if (epoch - self.start_epoch) % self.every_n_epochs:
            return False
        max_epochs = trainer.max_epochs
        return not (max_epochs is not None and max_epochs > 0 and epoch + 1 >= max_epochs)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        train_seconds = time.perf_counter() - self._epoch_start - self._val_seconds
        if not self.due(trainer):
            return
        dm = trainer.datamodule
        start = time.perf_counter()
        was_training = pl_module.training
        pl_module.eval()
        try:
            # the numerics of validation (autocast under mixed precision), without gradients
            with torch.no_grad(), trainer.precision_plugin.forward_context():
                gathered = self._search_epoch(trainer, pl_module)
        finally:
            pl_module.train(was_training)
        x, pseudo, score, kind, index, n_searched, gain = gathered
        added = dm.pool.add(x, pseudo, score, kind, index) if x.shape[0] else 0
        search_seconds = time.perf_counter() - start
        record = EpochRecord(
            epoch=trainer.current_epoch,
            searched=n_searched,
            accepted=int(x.shape[0]),
            added=int(added),
            pool_size=int(dm.pool.size),
            score_gain=gain,
            search_seconds=search_seconds,
            train_seconds=train_seconds,
        )
        self.history.append(record)
        ratio = search_seconds / train_seconds if train_seconds > 0 else float("nan")
        values = {
            "augment/num_added": float(record.added),
            "augment/num_accepted": float(record.accepted),
            "augment/pool_size": float(record.pool_size),
            "augment/score_gain": record.score_gain,
            "augment/search_seconds": search_seconds,
            "augment/train_seconds": train_seconds,
            "augment/search_to_train": ratio,
        }
        for name, value in values.items():
            pl_module.log(name, value, on_step=False, on_epoch=True)
        rank_zero_info(
            f"BeamSearchAugmentation epoch {record.epoch}: searched {n_searched}, accepted "
            f"{record.accepted}, added {record.added}, pool {record.pool_size}, gain "
            f"{gain:.4g}, search {search_seconds:.2f}s = {ratio:.3f} x the training epoch"
        )
        if self.pool_output and trainer.is_global_zero and dm.pool.size:
            write_netcdf(dm.pool.to_dataset(dm.info()), self.pool_output)

    def _search_epoch(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Accepted:
        """Search this rank's share of the epoch's inputs, gather over ranks, keep the accepted."""
        dm = trainer.datamodule
        epoch = trainer.current_epoch
        device = pl_module.device
        rank, world = trainer.global_rank, trainer.world_size
        lab = dm.training_windows(max_windows=self.max_windows, seed=self.seed + 1_000_003 * epoch)
        free = self.unlabelled_inputs(dm, epoch)
        kinds = (SOURCE_KINDS.index("window"), SOURCE_KINDS.index("unlabelled"))
        parts = []
        # labelled windows first, then unlabelled inputs: one global order for the gather
        for offset, x_all, y_all, ids, kind, scorer in (
            (0, lab.x, lab.y, lab.index, kinds[0], self.scorer),
            (lab.x.shape[0], free.x, None, free.id, kinds[1], self.unlabelled_scorer),
        ):
            if x_all.shape[0] == 0:
                continue
            mine = shard(x_all.shape[0], rank, world)
            # inputs in the module's dtype and device, as the precision plugin feeds batches
            x_mine = trainer.precision_plugin.convert_input(x_all[mine.positions]).to(device)
            y_mine = None
            if y_all is not None:
                y_mine = trainer.precision_plugin.convert_input(y_all[mine.positions]).to(device)
            out = self.search(pl_module, x_mine, y_mine, scorer)
            # the pool keeps the inputs as the data hold them (not a low-precision copy)
            x_pool = x_all[mine.positions].to(device)
            source = torch.stack(
                [torch.full_like(mine.positions, kind), ids.long()[mine.positions]], dim=1
            ).to(device)
            parts.append(
                ((mine.positions + offset).to(device), mine.valid.to(device), x_pool, source, out)
            )
        if not parts:
            empty, none = torch.empty(0), torch.empty(0, dtype=torch.long)
            return Accepted(empty, empty, empty, none, none, 0, float("nan"))
        key = torch.cat([p[0] for p in parts])
        valid = torch.cat([p[1] for p in parts])
        x = torch.cat([p[2] for p in parts])
        source = torch.cat([p[3] for p in parts])
        pseudo = torch.cat([p[4].pseudo for p in parts])
        ens = torch.cat([p[4].ensemble_score for p in parts])
        plain = torch.cat([p[4].plain_score for p in parts])
        accepted = torch.cat([p[4].accepted for p in parts]) & valid
        flags = torch.stack([valid.float(), accepted.float()], dim=1)
        if world > 1:
            key, flags, x, source, pseudo, ens, plain = (
                rearrange(trainer.strategy.all_gather(t), "w n ... -> (w n) ...")
                for t in (key, flags, x, source, pseudo, ens, plain)
            )
        valid, accepted = flags[:, 0] > 0, flags[:, 1] > 0
        gain_all = (ens - plain)[valid]
        finite = torch.isfinite(gain_all)
        gain = float(gain_all[finite].mean()) if bool(finite.any()) else float("nan")
        x, pseudo, ens, source = merge_gathered(key, accepted, x, pseudo, ens, source)
        return Accepted(x, pseudo, ens, source[:, 0], source[:, 1], int(valid.sum()), gain)

    def unlabelled_inputs(self, dm: Any, epoch: int) -> UnlabelledInputs:
        """Up to ``unlabelled_windows`` physical inputs with no recorded future (training split),
        a fresh random subset each epoch (``ForecastData.unlabelled_inputs``)."""
        if self.unlabelled_windows == 0:
            return UnlabelledInputs(torch.empty(0, dtype=torch.long), torch.empty(0))
        return dm.unlabelled_inputs(self.unlabelled_windows, seed=[self.seed, epoch, 1])

    def inputs_per_call(self, device: torch.device) -> int:
        """``search_batch_size``, or its default for ``device``: 4 on CPU, 32 elsewhere."""
        if self.search_batch_size is not None:
            return self.search_batch_size
        return 4 if torch.device(device).type == "cpu" else 32

    def search(
        self, pl_module: pl.LightningModule, x: Tensor, y: Tensor | None, scorer: Scorer
    ) -> SearchOutput:
        """Beam search + self-ensemble + filter for physical inputs ``x`` (and targets ``y``).

        Call in eval mode under ``no_grad``. Searches ``search_batch_size`` inputs at a time.
        """
        step_fn: Callable[[Tensor], Tensor] = pl_module.search_step_fn(self._k(pl_module))
        steps = int(pl_module.rollout_steps)
        outs = []
        chunk = self.inputs_per_call(pl_module.device)
        n_batches = math.ceil(x.shape[0] / chunk)
        with search_progress(
            pl_module._trainer, n_batches, f"beam search: {x.shape[0]} inputs"
        ) as advance:
            for i in range(0, x.shape[0], chunk):
                outs.append(
                    self._search_batch(pl_module, step_fn, scorer, x[i : i + chunk],
                                       None if y is None else y[i : i + chunk], steps)
                )  # fmt: skip
                advance(1)
        if not outs:
            raise ValueError("BeamSearchAugmentation.search: no inputs")
        return SearchOutput(*(torch.cat(parts) for parts in zip(*outs)))

    def _search_batch(
        self,
        pl_module: Any,
        step_fn: Callable,
        scorer: Scorer,
        x: Tensor,
        ref: Tensor | None,
        steps: int,
    ) -> SearchOutput:
        """Search, ensemble and filter one call's physical inputs ``x`` (targets ``ref``)."""
        to_phys = pl_module.denormalize
        xb = pl_module.normalize(x)
        res = search.beam_search(
            step_fn, xb, scorer, steps, self.beam_width, self.top_k,
            reference=ref, to_physical=to_phys, accumulate=self.accumulate,
        )  # fmt: skip
        ens = search.ensemble(res.trajectories, res.scores, self.ensemble, self.temperature)
        plain = pl_module.model.rollout(xb, steps).y
        both = torch.stack([ens, plain], dim=1)
        scored = search.score_trajectories(
            scorer, xb, both, steps, reference=ref, to_physical=to_phys,
            accumulate=self.accumulate,
        )  # fmt: skip
        ens_score, plain_score = scored.scores[:, 0], scored.scores[:, 1]
        pseudo = to_phys(ens)
        ok = torch.isfinite(rearrange(pseudo, "b ... -> b (...)")).all(1)
        if self.only_improving:
            ok = ok & search.select_improving(ens_score, plain_score, self.margin)
        return SearchOutput(pseudo, ens_score, plain_score, ok)
