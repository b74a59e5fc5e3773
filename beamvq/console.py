"""What the ``beamvq`` command prints: log lines that survive the progress bar, and known
third-party noise filtered deliberately (never beamvq's own messages).

- **Log lines above the bar.** Rich's live display (Lightning's ``RichProgressBar``) redirects
  ``sys.stdout``/``sys.stderr`` while it runs and prints what they receive above the bar. A
  ``logging.StreamHandler`` keeps the stream it was created with, so its lines went around the
  redirect: the bar's next refresh erased them (the per-epoch ``BeamSearchAugmentation ...``
  summary) or they were glued to a bar line. ``CurrentStreamHandler`` writes to whatever
  ``sys.stderr`` is at the time of each record; ``route_logs_through_current_streams`` puts it in
  place of the plain stream handlers of the root logger and of Lightning's own logger.
- **Known noise.** ``NOISE`` lists third-party log messages that tell a beamvq user nothing: the
  pytorch-lightning 2.6 advertisement for its cloud logger, printed at every ``Trainer``.
  ``NOISY_WARNINGS`` the third-party deprecation warnings a beamvq user cannot act on: torch 2.13
  deprecating ``LeafSpec`` inside pytorch-lightning's own pytree copy (printed at every fit).
"""

from __future__ import annotations

import logging
import sys
import warnings
from typing import TextIO

__all__ = [
    "NOISE",
    "CurrentStreamHandler",
    "quiet_known_noise",
    "route_logs_through_current_streams",
]

#: (logger name, text that identifies the message): third-party lines filtered out
NOISE: tuple[tuple[str, str], ...] = (
    ("pytorch_lightning.utilities.rank_zero", "try installing [litlogger]"),
)
#: (message regex, category): third-party warnings filtered out
NOISY_WARNINGS: tuple[tuple[str, type[Warning]], ...] = (
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", Warning),
)
#: the loggers whose stream handlers are replaced: the root and Lightning's own (it does not
#: propagate to the root)
ROUTED = ("", "pytorch_lightning", "lightning.pytorch")


class CurrentStreamHandler(logging.StreamHandler):
    """A stream handler that writes to the current ``sys.stderr`` (or ``sys.stdout``) at every
    record, so a redirect installed later (Rich's live display) receives the line."""

    def __init__(self, which: str = "stderr") -> None:
        self.which = which
        super().__init__(self._current())

    def _current(self) -> TextIO:
        return sys.stdout if self.which == "stdout" else sys.stderr

    @property  # type: ignore[override]
    def stream(self) -> TextIO:
        return self._current()

    @stream.setter
    def stream(self, value: TextIO) -> None:  # logging.StreamHandler.__init__ assigns it
        pass


class _DropNoise(logging.Filter):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def route_logs_through_current_streams() -> None:
    """Replace the plain ``StreamHandler`` of each ``ROUTED`` logger by a
    ``CurrentStreamHandler`` with the same level and formatter (idempotent)."""
    for name in ROUTED:
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if type(handler) is not logging.StreamHandler:
                continue
            which = "stdout" if handler.stream is sys.__stdout__ else "stderr"
            current = CurrentStreamHandler(which)
            current.setLevel(handler.level)
            current.setFormatter(handler.formatter)
            for f in handler.filters:
                current.addFilter(f)
            logger.removeHandler(handler)
            logger.addHandler(current)


def quiet_known_noise() -> None:
    """Filter the ``NOISE`` messages at their loggers and the ``NOISY_WARNINGS`` (idempotent)."""
    for message, category in NOISY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name, text in NOISE:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNoise) and f.text == text for f in logger.filters):
            logger.addFilter(_DropNoise(text))
