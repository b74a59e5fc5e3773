"""BeamVQ self-training, orchestrated: when to search, on what, over the ranks, into the pool.

BeamVQ (arXiv 2405.17051, 2502.18925), stage 3: a beam search over the autoregressive rollout
keeps the trajectories a domain metric prefers, the best ``top_k`` are combined into one
pseudo-target, and the (input, pseudo-target) pairs join the training set, epoch after epoch. The
step itself (search, self-ensemble, filter) is ``beamvq.selftrain.self_train_step``, the scorers
are ``beamvq.metrics``, the augmented pool (capped, checkpointed) belongs to the datamodule
(``beamvq.protocols.Pool``) and the DDP shard/gather is ``beamvq.distributed``. Our choices:

- When: at the end of training epoch ``e`` when ``e >= start_epoch`` and ``(e - start_epoch)`` is
  a multiple of ``every_n_epochs``; never at the last epoch of the fit (no epoch would train on
  it) nor when the trainer is stopping. The search runs after the epoch's validation and before
  a checkpoint saved at the epoch's end (Lightning runs checkpoint callbacks last), so that
  checkpoint holds the pool the next epoch trains on.
- What (``inputs``, ``SearchInputs``): ``windows`` training windows drawn afresh each epoch
  (seeded by ``seed`` and the epoch, so a resumed run draws the same ones) through
  ``ForecastData.training_windows`` only, never validation or test data; optionally
  ``unlabelled`` inputs whose future is never read (``ForecastData.unlabelled_inputs``: new
  trajectories or files of inputs), which need a reference-free scorer; and, only for
  reproducing the authors' protocol, ``validation`` inputs labelled by the plain forecast
  (refused unless ``allow_validation_leak``; the pool marks them, so reports can say so).
- Targets of the training windows (``target``): ``"pseudo"`` (the papers: the self-ensemble of
  the best trajectories, scored against the window's truth — self-distillation, since that
  truth is also the training target) or ``"pushforward"`` (ours, after Stochastic PushForward,
  arXiv 2508.18565): each of the ``top_k`` best trajectories advances the input by one forecast
  step, and the pair (that model-made input, the recorded future of the window starting one
  step later) joins the pool with a true target.
- How: the module in eval mode under ``no_grad`` (the EMA code bank must not move; train mode is
  restored afterwards); each rank searches its share and the shares are gathered in one global
  order, so every DDP rank adds the same samples in the same order. The pool stores physical
  inputs as the data hold them, pseudo-targets of the whole horizon and the ensemble's score.
- ``trainer.reload_dataloaders_every_n_epochs`` must be 1: new pool samples are trained on from
  the next epoch on.

Logged each search epoch: ``augment/num_added``, ``augment/num_accepted``, ``augment/pool_size``,
``augment/score_gain`` (mean over searched samples of ensemble score - plain forecast score),
``augment/search_seconds``, ``augment/train_seconds`` (the epoch's wall time without
validation) and ``augment/search_to_train`` (their ratio); ``history`` keeps them per epoch.
``beamvq.callbacks.pool_signal.PoolSignalShare`` logs how much of the training signal the pool
gets.
"""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path
from typing import Any, Literal, NamedTuple

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info
from torch import Tensor

from beamvq.callbacks.checks import data_channels, require
from beamvq.callbacks.progress import search_progress
from beamvq.callbacks.search_inputs import TARGETS, SearchInputs, check_arguments, check_scorers
from beamvq.callbacks.tables import EpochRecord
from beamvq.datamodules.io import write_netcdf
from beamvq.distributed import check_ranks_agree, map_sharded
from beamvq.metrics import Scorer
from beamvq.protocols import SOURCE_KINDS, ForecastData, SearchableModel, UnlabelledInputs
from beamvq.selftrain import (
    SearchConfig,
    SelfTrainResult,
    calls_needed,
    plain_labels,
    pushforward_step,
    self_train_step,
)

__all__ = ["Accepted", "BeamSearchAugmentation", "EpochRecord", "SearchInputs"]
WHO = "BeamSearchAugmentation"


class Accepted(NamedTuple):
    """The samples one search epoch accepted, identical on every rank: physical inputs ``x``,
    pseudo-targets ``pseudo``, ensemble scores ``score``, their sources (``source_kind`` indexes
    ``beamvq.protocols.SOURCE_KINDS``; ``source_index`` the window index or unlabelled id); how
    many inputs were searched over all ranks and the mean score gain over the plain forecast."""

    x: Tensor
    pseudo: Tensor
    score: Tensor
    source_kind: Tensor
    source_index: Tensor
    searched: int
    gain: float


class _Job(NamedTuple):
    """One kind of input to search: physical inputs, targets (``None``: unlabelled), source ids,
    how its rows are made (``pseudo``, ``pushforward``, ``plain``) and the scorer."""

    x: Tensor
    y: Tensor | None
    ids: Tensor
    how: str
    scorer: Scorer


class BeamSearchAugmentation(pl.Callback):
    """Grow the training set with beam-searched, filtered, self-ensembled pseudo-targets.

    Args:
        scorer: a ``beamvq.metrics.Scorer`` (YAML ``class_path``), higher is better, e.g.
            ``CSIScorer`` for storms, ``NegMSEScorer`` or a ``WeightedScorer`` for fluids; one
            with ``fit`` is fitted on training-split targets at every fit start.
        search: how to search, combine and filter (``beamvq.selftrain.SearchConfig``).
        every_n_epochs: search every n-th epoch from ``start_epoch`` on.
        start_epoch: first epoch (0-based) whose end runs a search: the base model trains first.
        inputs: what each search draws (``SearchInputs``: training windows, unlabelled inputs,
            the authors' validation inputs).
        target: what the training windows give the pool: ``"pseudo"`` (self-ensembled
            pseudo-targets, the papers) or ``"pushforward"`` (model-made inputs with true
            targets, see the module docstring).
        unlabelled_scorer: reference-free scorer for those; ``None`` uses ``scorer``.
        fit_windows: training windows whose targets fit the scorers (``None``: all).
        search_batch_size: inputs per search call (memory: × beams × K forecasts); ``None``: 4
            on CPU, 32 on an accelerator (on one CPU thread 16 per call took 1.6× as long as 4:
            ``python benchmarks/overhead.py``, docs/results.md §3).
        seed: seed of the per-epoch window subsets.
        pool_output: NetCDF path where rank 0 writes the pool after each search (``None``: off).
    """

    def __init__(
        self,
        scorer: Scorer,
        search: SearchConfig = SearchConfig(),
        every_n_epochs: int = 1,
        start_epoch: int = 1,
        inputs: SearchInputs = SearchInputs(),
        target: Literal["pseudo", "pushforward"] = "pseudo",
        unlabelled_scorer: Scorer | None = None,
        fit_windows: int | None = 256,
        search_batch_size: int | None = None,
        seed: int = 0,
        pool_output: str | None = None,
    ) -> None:
        super().__init__()
        free_scorer = unlabelled_scorer if unlabelled_scorer is not None else scorer
        numbers = dict(every_n_epochs=every_n_epochs, start_epoch=start_epoch,
                       fit_windows=fit_windows, search_batch_size=search_batch_size)  # fmt: skip
        check_arguments(numbers, free_scorer, int(inputs.unlabelled))
        if target not in TARGETS:
            raise ValueError(f"{WHO}: init_args.target must be one of {TARGETS}, got {target!r}")
        self.scorer, self.unlabelled_scorer, self.search_config = scorer, free_scorer, search
        self.every_n_epochs, self.start_epoch = int(every_n_epochs), int(start_epoch)
        self.inputs, self.target = inputs, target
        self.fit_windows, self.search_batch_size = fit_windows, search_batch_size
        self.seed, self.pool_output = int(seed), pool_output
        self.history: list[EpochRecord] = []
        self._epoch_start, self._val_seconds = 0.0, 0.0
        self._val_start: float | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if trainer.reload_dataloaders_every_n_epochs != 1:
            raise ValueError(
                f"{WHO} grows the training set each epoch: set trainer."
                "reload_dataloaders_every_n_epochs: 1 (got "
                f"{trainer.reload_dataloaders_every_n_epochs})"
            )
        dm = require(trainer.datamodule, ForecastData, WHO, "datamodule")
        self.resolved(require(pl_module, SearchableModel, WHO, "module"))
        check_scorers(self.scorer, self.unlabelled_scorer, data_channels(dm))
        if self.pool_output and Path(self.pool_output).is_dir():
            raise ValueError(f"{WHO}: init_args.pool_output {self.pool_output} is a folder")

    def resolved(self, model: SearchableModel) -> SearchConfig:
        """The search settings for ``model`` (its ``candidate_k`` and ``rollout_steps`` where
        ``search`` leaves them unset), checked."""
        k = self.search_config.candidate_k or model.candidate_k
        if k < 2 or model.codebook_size == 0:
            raise ValueError(
                f"{WHO} needs a model.bottleneck and candidate_k >= 2 (the beams expand into "
                f"code-bank candidates); got candidate_k={k}, codebook_size={model.codebook_size}"
            )
        if k > model.codebook_size:
            key = "search.candidate_k" if self.search_config.candidate_k else "model.candidate_k"
            raise ValueError(
                f"{WHO}: {key} = {k} is larger than model.bottleneck.init_args.codebook_size = "
                f"{model.codebook_size} (each candidate is another code)"
            )
        config = self.search_config.resolved(k, model.rollout_steps)
        if config.rollout_steps != model.rollout_steps:
            raise ValueError(
                f"{WHO}: search.rollout_steps={config.rollout_steps} but pseudo-targets must span "
                f"the model's model.rollout_steps={model.rollout_steps}: leave it unset"
            )
        return config

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # fitted at every fit start (cheap, deterministic): a resumed run gets the same climatology
        scorers = list({id(s): s for s in (self.scorer, self.unlabelled_scorer)}.values())
        # ``fit`` is optional: only scorers with a climatology (spectrum, TKE) have one
        to_fit = [s for s in scorers if callable(getattr(s, "fit", None))]
        if to_fit:
            y = trainer.datamodule.training_windows(self.fit_windows, seed=self.seed).y
            for s in to_fit:
                s.fit(y)
            names = [type(s).__name__ for s in to_fit]
            rank_zero_info(f"{WHO}: fitted {names} on {y.shape[0]} training targets")

    # -- timing of the training epoch, without validation -----------------------------------------
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_start, self._val_seconds = time.perf_counter(), 0.0

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
        dm: ForecastData = trainer.datamodule
        start = time.perf_counter()
        was_training = pl_module.training
        pl_module.eval()
        try:
            # the numerics of validation (autocast under mixed precision), without gradients
            with torch.no_grad(), trainer.precision_plugin.forward_context():
                got = self._search_epoch(trainer, pl_module)
        finally:
            pl_module.train(was_training)
        n = int(got.x.shape[0])
        added = dm.pool.add(*got[:5]) if n else 0
        record = EpochRecord(trainer.current_epoch, got.searched, n, int(added), int(dm.pool.size),
                             got.gain, time.perf_counter() - start, train_seconds)  # fmt: skip
        self.history.append(record)
        for name, value in record.metrics().items():
            pl_module.log(name, value, on_step=False, on_epoch=True)
        for name, value in self._rank_checksums(trainer, pl_module, dm).items():
            pl_module.log(f"beamvq/checksum_{name}", value, on_step=False, on_epoch=True)
        rank_zero_info(record.summary())
        if self.pool_output and trainer.is_global_zero and dm.pool.size:
            # the datamodule's pool describes itself as a dataset (not part of protocols.Pool)
            write_netcdf(dm.pool.to_dataset(dm.info()), self.pool_output)

    @staticmethod
    def _rank_checksums(
        trainer: pl.Trainer, pl_module: pl.LightningModule, dm: ForecastData
    ) -> dict[str, float]:
        """Checksums of the pool and the code bank after the search, compared over the DDP
        ranks: a difference stops the run (``RanksDisagree``) instead of training on copies that
        drifted apart (docs/reliability.md)."""
        pool = dm.pool.samples()
        bank = [b for n, b in pl_module.named_buffers() if "_codebook." in n]
        groups = {"pool": [pool.x, pool.y, pool.score], "codebank": bank}

        def gather(t: Tensor) -> Tensor:
            return trainer.strategy.all_gather(t.to(pl_module.device))

        return check_ranks_agree(gather, trainer.world_size, groups)

    def _search_epoch(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Accepted:
        """Search this rank's share of the epoch's inputs, gather over ranks, keep the accepted."""
        dm: ForecastData = trainer.datamodule
        epoch = trainer.current_epoch
        lab = dm.training_windows(
            max_windows=self.inputs.windows, seed=self.seed + 1_000_003 * epoch
        )
        free = self.unlabelled_inputs(dm, epoch)
        val = self.validation_inputs(dm, epoch)
        # labelled windows, unlabelled inputs, validation inputs: the global order of the pool
        jobs = [
            _Job(lab.x, lab.y, lab.index, self.target, self.scorer),
            _Job(free.x, None, free.id, "unlabelled", self.unlabelled_scorer),
            _Job(val.x, None, val.id, "validation", self.unlabelled_scorer),
        ]
        rank, world, gather = trainer.global_rank, trainer.world_size, trainer.strategy.all_gather
        parts = [
            map_sharded(job.x.shape[0], rank, world, gather, partial(self._rows, trainer, pl_module, job))
            for job in jobs
            if job.x.shape[0]
        ]  # fmt: skip
        if not parts:
            empty, none = torch.empty(0), torch.empty(0, dtype=torch.long)
            return Accepted(empty, empty, empty, none, none, 0, float("nan"))
        # every job gives M rows per input (M = 1 but for pushforward's top_k members)
        x, source, pseudo, ens, plain, ok = (
            torch.cat([t.flatten(0, 1) for t in p]) for p in zip(*parts)
        )
        gain_all = (ens - plain)[source[:, 0] != SOURCE_KINDS.index("validation")]
        finite = torch.isfinite(gain_all)
        gain = float(gain_all[finite].mean()) if bool(finite.any()) else float("nan")
        kind, index = source[ok].unbind(1)
        return Accepted(x[ok], pseudo[ok], ens[ok], kind, index, int(x.shape[0]), gain)

    def _rows(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, job: _Job, at: Tensor
    ) -> tuple[Tensor, ...]:
        """Inputs ``at`` of ``job``, searched. Per input, ``M`` rows (1, or ``top_k`` for
        pushforward): physical input, source (kind, index), target, ensemble score, plain score,
        accepted; on the module's device."""
        device, convert = pl_module.device, trainer.precision_plugin.convert_input
        # inputs in the module's dtype and device, as the precision plugin feeds batches
        x = convert(job.x[at]).to(device)
        y = None if job.y is None else convert(job.y[at]).to(device)
        if job.how == "pushforward":
            return self._pushforward_rows(trainer, pl_module, job.ids[at], x, y)
        if job.how == "validation":
            pseudo = plain_labels(pl_module.normalize(x), pl_module.forecast, pl_module.rollout_steps,
                                  pl_module.denormalize, self.inputs_per_call(device))  # fmt: skip
            zero = pseudo.new_zeros(pseudo.shape[0])
            out = SelfTrainResult(pseudo, zero, zero, _finite(pseudo))
        else:
            out = self.search(pl_module, x, y, job.scorer, trainer)
        kind = SOURCE_KINDS.index("window" if job.how == "pseudo" else job.how)
        source = torch.stack([torch.full_like(at, kind), job.ids.long()[at]], 1).to(device)
        # the pool keeps the inputs as the data hold them (not a low-precision copy)
        rows = (job.x[at].to(device), source, *out)
        return tuple(t.unsqueeze(1) for t in rows)

    def _pushforward_rows(
        self, trainer: pl.Trainer, model: Any, ids: Tensor, x: Tensor, y: Tensor | None
    ) -> tuple[Tensor, ...]:
        """Rows of pushforward samples: each of the ``top_k`` trajectories advances the input by
        one forecast step; the target is the recorded future of the window starting that step
        later (``ForecastData.successor_windows``); inputs without one are not accepted."""
        config, chunk = self.resolved(model), self.inputs_per_call(x.device)
        total = calls_needed(x.shape[0], chunk)
        with search_progress(trainer, total, f"pushforward: {x.shape[0]} inputs") as advance:
            res = pushforward_step(
                model.normalize(x), model.search_step_fn(config.candidate_k), self.scorer,
                config, reference=y, to_physical=model.denormalize, chunk=chunk, on_chunk=advance,
            )  # fmt: skip
        dm: ForecastData = trainer.datamodule
        t_out = y.shape[1] // config.rollout_steps
        succ = dm.successor_windows(ids, t_out)
        has = succ >= 0
        target = torch.zeros((x.shape[0], *y.shape[1:]), dtype=res.inputs.dtype)
        if bool(has.any()):
            target[has] = dm.training_targets(succ[has]).to(target.dtype)
        m = res.inputs.shape[1]
        target = target.to(x.device).unsqueeze(1).expand(-1, m, *target.shape[1:])
        kind = torch.full_like(succ, SOURCE_KINDS.index("pushforward"))
        source = torch.stack([kind, succ], 1).to(x.device).unsqueeze(1).expand(-1, m, 2)
        ok = has.to(x.device).unsqueeze(1) & _finite(res.inputs.flatten(0, 1)).view(-1, m)
        return res.inputs, source, target, res.scores, res.scores, ok

    def unlabelled_inputs(self, dm: ForecastData, epoch: int) -> UnlabelledInputs:
        """Up to ``inputs.unlabelled`` physical inputs with no recorded future, a fresh random
        subset each epoch (``ForecastData.unlabelled_inputs``)."""
        if self.inputs.unlabelled == 0:
            return UnlabelledInputs(torch.empty(0, dtype=torch.long), torch.empty(0))
        return dm.unlabelled_inputs(self.inputs.unlabelled, seed=[self.seed, epoch, 1])

    def validation_inputs(self, dm: ForecastData, epoch: int) -> UnlabelledInputs:
        """Up to ``inputs.validation`` validation inputs (the authors' leaking protocol)."""
        if self.inputs.validation == 0:
            return UnlabelledInputs(torch.empty(0, dtype=torch.long), torch.empty(0))
        return dm.validation_inputs(self.inputs.validation, seed=[self.seed, epoch, 2])

    def inputs_per_call(self, device: torch.device | str) -> int:
        """``search_batch_size``, or its default for ``device``: 4 on CPU, 32 elsewhere."""
        if self.search_batch_size is not None:
            return int(self.search_batch_size)
        return 4 if torch.device(device).type == "cpu" else 32

    def search(
        self, model: SearchableModel, x: Tensor, y: Tensor | None, scorer: Scorer,
        trainer: pl.Trainer | None = None,
    ) -> SelfTrainResult:  # fmt: skip
        """``beamvq.selftrain.self_train_step`` for physical inputs ``x`` (and targets ``y``) on
        the module's device, ``inputs_per_call`` at a time, on ``trainer``'s progress bar. Call
        in eval mode under ``no_grad``."""
        config, chunk = self.resolved(model), self.inputs_per_call(x.device)
        total = calls_needed(x.shape[0], chunk)
        with search_progress(trainer, total, f"beam search: {x.shape[0]} inputs") as advance:
            return self_train_step(
                model.normalize(x), model.search_step_fn(config.candidate_k), model.forecast,
                scorer, config, reference=y, to_physical=model.denormalize, chunk=chunk,
                on_chunk=advance,
            )  # fmt: skip


def _finite(t: Tensor) -> Tensor:
    """Per row of ``t (N, ...)``: all values finite."""
    return torch.isfinite(t.flatten(1)).all(1)
