"""A task on the trainer's progress bar for work a callback does between epochs (the search)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytorch_lightning as pl
from pytorch_lightning.callbacks import RichProgressBar


@contextmanager
def search_progress(
    trainer: pl.Trainer | None, total: int, description: str
) -> Iterator[Callable[[int], object]]:
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
