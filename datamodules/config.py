"""The NetCDF datamodule's settings, grouped as they read in YAML (docs/data.md).

Each group is a frozen dataclass that LightningCLI (jsonargparse) fills from a nested mapping of
``data.init_args``, so one setting is one YAML key, ``data.<group>.<field>``::

    data:
      class_path: beamvq.datamodules.netcdf.NetCDFDataModule
      init_args:
        path: data/era5_*.nc
        variables: [z, t]
        windows: {in_steps: 4, out_steps: 4}
        selection: {levels: [500, 850], time_step: 6h}
        splits: {train_period: ["2000", "2015"], val_period: ["2016", "2016"]}

and on the command line ``--data.init_args.windows.in_steps 4``. A group not written keeps every
default; a group written in part keeps the defaults of the fields it leaves out (several
``--config`` files merge field by field). Every value is checked when the group is built (when
the config is parsed, before any file is opened); a bad value stops with one message naming its
YAML key, e.g. ``data.windows.in_steps must be >= 1, got 0``.
"""

from __future__ import annotations

from dataclasses import dataclass

SPLITS = ("train", "val", "test")
NAN_POLICIES = ("fill", "mask")
POOL_POLICIES = ("oldest", "worst")
# what ``beamvq predict`` forecasts from (``PredictConfig.init``)
PREDICT_INITS = ("auto", "split", "last", "every", "times")


def _set(obj: object, name: str, value: object) -> None:
    # the groups are frozen (a shared default instance cannot change); __post_init__ normalizes
    object.__setattr__(obj, name, value)


def _pair(key: str, value: object, kind: type) -> tuple | None:
    """``value`` as a ``(start, end)`` tuple of ``kind`` (or None), the message naming ``key``."""
    if value is None:
        return None
    if len(value) != 2:  # type: ignore[arg-type]
        raise ValueError(f"data.{key} must be (start, end), got {value}")
    return tuple(kind(v) for v in value)  # type: ignore[union-attr]


@dataclass(frozen=True)
class WindowConfig:
    """The frames of one window (YAML ``data.windows``).

    Args:
        in_steps: input frames ``T_in``.
        out_steps: frames per forecast step ``T_out``.
        rollout_steps: autoregressive steps per window; the target holds ``rollout_steps × T_out``.
        stride: time steps between consecutive window starts.
    """

    in_steps: int = 5
    out_steps: int = 5
    rollout_steps: int = 1
    stride: int = 1

    def __post_init__(self) -> None:
        for name in ("in_steps", "out_steps", "rollout_steps", "stride"):
            value = getattr(self, name)
            if int(value) < 1:
                raise ValueError(f"data.windows.{name} must be >= 1, got {value}")
            _set(self, name, int(value))

    @property
    def target_steps(self) -> int:
        return self.out_steps * self.rollout_steps

    @property
    def length(self) -> int:
        """Frames of one window: ``in_steps + out_steps × rollout_steps``."""
        return self.in_steps + self.target_steps


@dataclass(frozen=True)
class SelectionConfig:
    """What part of the files becomes the array (YAML ``data.selection``).

    Args:
        levels: level labels (e.g. hPa) selected for every variable that has a level dim; None
            keeps all levels. Each (variable, level) is one channel named ``f"{var}{level:g}"``.
        time_range: ``(start, end)`` labels (inclusive) of the time span to use.
        time_step: spacing of the frames of a window, a duration for dated axes (``"6h"``) or a
            number for numeric ones; frames off this grid (counted from the first kept time) are
            skipped. None: the most common spacing of the file.
        lat_range: ``(lo, hi)`` box on the y coordinate (degrees for lat/lon grids).
        lon_range: ``(lo, hi)`` box on the x coordinate; a longitude box may wrap, e.g.
            ``(340, 40)``.
    """

    levels: list[float] | None = None
    time_range: tuple[str, str] | None = None
    time_step: str | None = None
    lat_range: tuple[float, float] | None = None
    lon_range: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if self.levels is not None:
            _set(self, "levels", [float(v) for v in self.levels])
        _set(self, "time_range", _pair("selection.time_range", self.time_range, str))
        _set(self, "lat_range", _pair("selection.lat_range", self.lat_range, float))
        _set(self, "lon_range", _pair("selection.lon_range", self.lon_range, float))


@dataclass(frozen=True)
class SplitConfig:
    """How the data split into train/val/test (YAML ``data.splits``).

    Args:
        fractions: fractions of samples (trajectories) for train/val/test, or of the time axis
            (contiguous blocks) for a single series; ignored when periods are given.
        train_period: ``(start, end)`` time labels (inclusive, partial dates allowed) of the
            training split; giving it switches to date splits, and a split without a period is
            empty.
        val_period: the same for the validation split.
        test_period: the same for the test split.
        seed: seed of the trajectory shuffle before splitting.
        predict_split: the split whose windows ``predict`` forecasts.
        train_samples: labelled training samples: the first N samples of the training split in
            its seeded shuffle order (a random subset, the same for every N' > N up to N); None
            keeps them all. For data-scarcity studies: validation and test stay the same, and
            the statistics come from these N only. Sample (trajectory) splits only.
        unlabelled_samples: the next M training samples after ``train_samples`` give unlabelled
            inputs (``in_steps`` frames at every window start; their futures are never read)
            for BeamVQ's reference-free search. They never enter the statistics.
        unlabelled_path: NetCDF file(s) (a path, glob or list) of further unlabelled inputs with
            the same variables and grid: every admissible ``in_steps``-frame start is an input.
        future_free_tail: also offer the training trajectories' last inputs, whose future is not
            recorded (frames the training windows already hold), as unlabelled inputs.
    """

    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)
    train_period: tuple[str, str] | None = None
    val_period: tuple[str, str] | None = None
    test_period: tuple[str, str] | None = None
    seed: int = 0
    predict_split: str = "test"
    train_samples: int | None = None
    unlabelled_samples: int = 0
    unlabelled_path: str | list[str] | None = None
    future_free_tail: bool = True

    def __post_init__(self) -> None:
        fr = self.fractions
        if len(fr) != 3 or min(fr) < 0 or sum(fr) <= 0:
            raise ValueError(f"data.splits.fractions must be three non-negative numbers, got {fr}")
        _set(self, "fractions", tuple(float(f) for f in fr))
        if self.predict_split not in SPLITS:
            raise ValueError(
                f"data.splits.predict_split must be one of {SPLITS}, got {self.predict_split!r}"
            )
        if self.train_period is None and (
            self.val_period is not None or self.test_period is not None
        ):
            raise ValueError(
                "data.splits.val_period/test_period need data.splits.train_period (date splits)"
            )
        for split in SPLITS:
            key = f"{split}_period"
            _set(self, key, _pair(f"splits.{key}", getattr(self, key), str))
        _set(self, "seed", int(self.seed))
        self._check_sample_counts()

    def _check_sample_counts(self) -> None:
        """``train_samples`` and ``unlabelled_samples``: their ranges, and sample splits only."""
        if self.train_samples is not None and int(self.train_samples) < 1:
            raise ValueError(
                f"data.splits.train_samples must be >= 1 or null, got {self.train_samples}"
            )
        if int(self.unlabelled_samples) < 0:
            raise ValueError(
                f"data.splits.unlabelled_samples must be >= 0, got {self.unlabelled_samples}"
            )
        if self.by_date and (self.train_samples is not None or self.unlabelled_samples):
            raise ValueError(
                "data.splits.train_samples and data.splits.unlabelled_samples pick samples "
                "(trajectories) of a sample split; they do not apply to date splits"
            )

    @property
    def subsets_samples(self) -> bool:
        """Whether the training split is cut into labelled and unlabelled samples."""
        return self.train_samples is not None or int(self.unlabelled_samples) > 0

    @property
    def periods(self) -> dict[str, tuple[str, str] | None]:
        """The period of every split (all None without date splits)."""
        return {split: getattr(self, f"{split}_period") for split in SPLITS}

    @property
    def by_date(self) -> bool:
        return self.train_period is not None


@dataclass(frozen=True)
class DimsConfig:
    """Dim names in the files (YAML ``data.dims``); None detects a dim from the conventional
    names and the CF ``axis``/``standard_name`` attributes (``beamvq.datamodules.conventions``).

    Args:
        sample: the trajectory/ensemble dim; absent in the file means one series.
        time: the time dim.
        y: the y (latitude) dim.
        x: the x (longitude) dim.
        level: the level dim.
    """

    sample: str = "trajectory"
    time: str | None = None
    y: str | None = None
    x: str | None = None
    level: str | None = None

    def __post_init__(self) -> None:
        given: dict[str, str] = {}
        for role in ("sample", "time", "y", "x", "level"):
            name = getattr(self, role)
            if name is None and role != "sample":
                continue
            if not isinstance(name, str) or not name.strip():
                raise ValueError(
                    f"data.dims.{role} must be a dim name (a non-empty string), got {name!r}"
                )
            if name in given:
                raise ValueError(
                    f"data.dims.{role} and data.dims.{given[name]} name the same dim {name!r}: "
                    "each role needs its own dim"
                )
            given[name] = role

    def role(self, name: str) -> str | None:
        """The dim given for ``name`` (``"time"``, ``"y"``, ``"x"`` or ``"level"``)."""
        return getattr(self, name)


@dataclass(frozen=True)
class QualityConfig:
    """What missing values the data may hold (YAML ``data.quality``).

    Args:
        max_nan_fraction: largest fraction of NaN/Inf (or ``_FillValue``) values allowed per
            variable and file; above it setup stops. An all-NaN variable always stops.
        nan_policy: what happens to the NaNs that are allowed: ``"fill"`` replaces them with the
            channel's training mean; ``"mask"`` drops every window that touches a frame with NaNs.
    """

    max_nan_fraction: float = 0.0
    nan_policy: str = "fill"

    def __post_init__(self) -> None:
        if self.nan_policy not in NAN_POLICIES:
            raise ValueError(
                f"data.quality.nan_policy must be one of {NAN_POLICIES}, got {self.nan_policy!r}"
            )
        if not 0.0 <= self.max_nan_fraction <= 1.0:
            raise ValueError(
                f"data.quality.max_nan_fraction must be in [0, 1], got {self.max_nan_fraction}"
            )
        _set(self, "max_nan_fraction", float(self.max_nan_fraction))


@dataclass(frozen=True)
class CacheConfig:
    """The memory-mapped cache for archives larger than RAM (YAML ``data.cache``).

    Args:
        above_mb: above this array size (MiB), convert once to a memory-mapped cache instead of
            loading into memory (0: always use the cache).
        dir: folder of the cache; None is ``$BEAMVQ_CACHE`` or ``~/.cache/beamvq``. For a
            multi-node run point it at a shared filesystem (or set ``per_node``).
        per_node: True when ``dir`` is node-local: every node converts its own copy (local
            rank 0); False: global rank 0 converts once for all nodes.
    """

    above_mb: float = 2048.0
    dir: str | None = None
    per_node: bool = False

    def __post_init__(self) -> None:
        above = self.above_mb
        if isinstance(above, bool) or not isinstance(above, (int, float)) or not above >= 0:
            raise ValueError(f"data.cache.above_mb must be a size in MiB >= 0, got {above!r}")
        if self.dir is not None and (not isinstance(self.dir, str) or not self.dir.strip()):
            raise ValueError(f"data.cache.dir must be a folder path or null, got {self.dir!r}")
        _set(self, "above_mb", float(self.above_mb))
        _set(self, "per_node", bool(self.per_node))


@dataclass(frozen=True)
class LoaderConfig:
    """DataLoader settings (YAML ``data.loader``).

    Args:
        batch_size: windows per batch (per process).
        num_workers: DataLoader worker processes.
    """

    batch_size: int = 8
    num_workers: int = 0

    def __post_init__(self) -> None:
        if int(self.batch_size) < 1:
            raise ValueError(f"data.loader.batch_size must be >= 1, got {self.batch_size}")
        if int(self.num_workers) < 0:
            raise ValueError(f"data.loader.num_workers must be >= 0, got {self.num_workers}")
        _set(self, "batch_size", int(self.batch_size))
        _set(self, "num_workers", int(self.num_workers))


@dataclass(frozen=True)
class PoolConfig:
    """BeamVQ's augmented pool (YAML ``data.pool``; ``beamvq.datamodules.pool``).

    Args:
        capacity: most pseudo-labelled samples kept (0 keeps none).
        policy: which to drop when full: ``"oldest"`` or ``"worst"`` (lowest score).
        weight: loss weight of pool samples relative to real windows.
        share: the capacity as a share of the training windows instead (the papers add 30-100 %
            of the training set, BeamVQ's authors as many pseudo-samples as real ones: 1.0);
            set at setup from the training split, it replaces ``capacity``. None: ``capacity``.
    """

    capacity: int = 256
    policy: str = "worst"
    weight: float = 0.5
    share: float | None = None

    def __post_init__(self) -> None:
        if int(self.capacity) < 0:
            raise ValueError(f"data.pool.capacity must be >= 0, got {self.capacity}")
        if self.policy not in POOL_POLICIES:
            raise ValueError(
                f"data.pool.policy must be one of {POOL_POLICIES}, got {self.policy!r}"
            )
        if not float(self.weight) >= 0.0:
            raise ValueError(f"data.pool.weight must be >= 0, got {self.weight}")
        if self.share is not None and not 0.0 < float(self.share) <= 10.0:
            raise ValueError(f"data.pool.share must be in (0, 10] or null, got {self.share}")
        _set(self, "capacity", int(self.capacity))
        _set(self, "weight", float(self.weight))


@dataclass(frozen=True)
class PredictConfig:
    """What ``beamvq predict`` forecasts from (YAML ``data.predict``; docs/own_inputs.md).

    ``split`` forecasts the windows of ``data.splits.predict_split``, which need a training split
    and a recorded future. The other modes forecast from the file's inputs alone (the user's own
    data): no split, no future, no statistics of their own (the checkpoint's normalize them), the
    file's variables and grid checked against the checkpoint's. An init time is the time label
    of an input's last frame (``init_time`` of the prediction file).

    Args:
        init: ``"last"``: each sample's latest ``in_steps`` consecutive frames; ``"every"``:
            every input of ``in_steps`` consecutive frames, ``data.windows.stride`` apart;
            ``"times"``: the inputs ending at ``times``, for every sample; ``"split"``: the
            windows of ``data.splits.predict_split`` (before this setting, the only mode);
            ``"auto"``: in ``predict``, ``"times"`` when ``times`` are given, else ``"last"``
            for a file with fewer frames than one window (``in_steps + out_steps x
            rollout_steps``: it records no future); ``"split"`` otherwise and in the other
            stages, as before.
        times: init times, ISO dates (``"2000-01-03T06:00"``) for a dated time axis or numbers
            for a numeric one; each must be a time of the file with ``in_steps`` consecutive
            frames ending there.
    """

    init: str = "auto"
    times: list[str | float] | None = None

    def __post_init__(self) -> None:
        if self.init not in PREDICT_INITS:
            raise ValueError(f"data.predict.init must be one of {PREDICT_INITS}, got {self.init!r}")
        if self.times is not None:
            if isinstance(self.times, (str, bytes)) or not len(self.times):
                raise ValueError(
                    f"data.predict.times must be a non-empty list of init times, got {self.times!r}"
                )
            # numbers as YAML reads them (12.5, 2000.0) back to labels ("12.5", "2000")
            _set(self, "times", [f"{t:g}" if isinstance(t, float) else str(t) for t in self.times])
        if self.init == "times" and self.times is None:
            raise ValueError("data.predict.init='times' needs data.predict.times (init times)")
        if self.times is not None and self.init not in ("times", "auto"):
            raise ValueError(
                f"data.predict.times are init times of data.predict.init='times'; with "
                f"data.predict.init={self.init!r} drop them or set init: times"
            )

    @property
    def from_inputs(self) -> bool:
        """Whether the mode (when not ``auto``) forecasts from inputs alone."""
        return self.init in ("last", "every", "times")
