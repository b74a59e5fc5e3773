"""The sizes and settings the module and the callbacks read off a datamodule (read-only).

``SettingsView`` gives ``NetCDFDataModule`` (``beamvq.datamodules.netcdf``) one property per value
of its settings groups that a reader asks for by name: the window's frames (``in_steps``,
``out_steps``, ``rollout_steps``, ``stride``, ``target_steps``, ``window``), the loader's
(``batch_size``, ``num_workers``) and the split ``predict`` forecasts (``predict_split``). They
hold no state: each reads the group the datamodule was built with, and ``predict_split`` also
what setup chose (``inputs_mode``: a forecast from the file's inputs alone, ``data.predict``).
"""

from __future__ import annotations

from beamvq.datamodules.config import LoaderConfig, SplitConfig, WindowConfig
from beamvq.datamodules.prepared import INPUTS

__all__ = ["SettingsView"]


class SettingsView:
    """Read-only properties over the ``windows``, ``loader`` and ``splits`` settings groups."""

    windows: WindowConfig
    loader: LoaderConfig
    splits: SplitConfig
    # set by setup: the own-inputs mode (beamvq.datamodules.own_inputs), or None
    _inputs_mode: str | None = None

    @property
    def in_steps(self) -> int:
        return self.windows.in_steps

    @property
    def out_steps(self) -> int:
        return self.windows.out_steps

    @property
    def rollout_steps(self) -> int:
        return self.windows.rollout_steps

    @property
    def stride(self) -> int:
        return self.windows.stride

    @property
    def target_steps(self) -> int:
        return self.windows.target_steps

    @property
    def window(self) -> int:
        return self.windows.length

    @property
    def batch_size(self) -> int:
        return self.loader.batch_size

    @property
    def num_workers(self) -> int:
        return self.loader.num_workers

    @property
    def inputs_mode(self) -> str | None:
        """After setup: ``"last"``, ``"every"`` or ``"times"`` when ``predict`` forecasts from
        the file's inputs alone (``data.predict``), else None (the windows of the splits)."""
        return self._inputs_mode

    @property
    def predict_split(self) -> str:
        """The split ``predict`` forecasts: ``"inputs"`` for inputs alone, else
        ``data.splits.predict_split``."""
        return INPUTS if self._inputs_mode is not None else self.splits.predict_split
