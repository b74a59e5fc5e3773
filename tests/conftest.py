"""Test-wide settings: one torch thread (the test tensors are tiny; on a 2-core machine thread
hand-offs cost more than they save), kept so after every test, W&B kept off the network, and the
distributed launch variables a test sets undone after it; and the opt-in
``figures_not_rendered`` fixture.

The launch variables matter for Lightning: a DDP fit run in-process sets ``LOCAL_RANK``, ``NODE_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT`` in ``os.environ`` and leaves them there. A later ``beamvq fit
--trainer.strategy ddp`` subprocess that inherits ``LOCAL_RANK`` believes an external launcher
started its ranks, never starts rank 1, and waits for it forever (this hung CI). Only these
variables are restored: restoring the whole environment would also bring back a stale
``WANDB_SERVICE`` after a test stopped the W&B service, and the next W&B run would try to reach
the dead one.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
# with OMP_NUM_THREADS unset, an in-process DDP run (Lightning's DDPStrategy.setup_environment)
# sets torch's threads to the core count and OMP_NUM_THREADS with them, for the rest of the
# session: every later test then ran with 2 threads (a quickstart fit 5x slower under load)
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


LAUNCH_ENV = (
    "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE",
    "MASTER_ADDR", "MASTER_PORT", "GLOO_SOCKET_IFNAME",
)  # fmt: skip


@pytest.fixture(autouse=True)
def _restore_torch_threads() -> Iterator[None]:
    """A test that changes torch's thread count (a benchmark's ``--threads``, a library) does
    not change it for the tests after it."""
    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _restore_launch_environment() -> Iterator[None]:
    saved = {name: os.environ.get(name) for name in LAUNCH_ENV}
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def _skip_figure_rendering(mp: pytest.MonkeyPatch) -> list[Path]:
    """``Figure.savefig`` and ``Animation.save`` write a 2x2 stand-in image; returns the paths."""
    import matplotlib.animation
    import matplotlib.figure
    from PIL import Image

    written: list[Path] = []

    def stand_in(_: object, fname: object, *args: object, **kwargs: object) -> None:
        image = Image.new("L", (2, 2))
        if isinstance(fname, (str, os.PathLike)):
            path = Path(fname)
            written.append(path)
            image.save(path, format="GIF" if path.suffix.lower() == ".gif" else "PNG")
        elif isinstance(fname, io.IOBase):
            image.save(fname, format=str(kwargs.get("format") or "png").upper())

    def save(
        anim: matplotlib.animation.Animation, fname: object, *args: object, **kw: object
    ) -> None:
        anim._draw_was_started = True  # what save() sets: no "deleted without rendering" warning
        stand_in(anim, fname)

    mp.setattr(matplotlib.figure.Figure, "savefig", stand_in)
    mp.setattr(matplotlib.animation.Animation, "save", save)
    return written


@pytest.fixture
def figures_not_rendered(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """For a test whose subject is not the figures: matplotlib's rendering is skipped.

    ``Figure.savefig`` and ``Animation.save`` (the rollout GIF) write a 2x2 image of the file's
    format instead (W&B media accept it), and the paths they were handed are returned in call
    order. Everything before them runs as usual: the report callbacks, their model calls, the
    figures' artists. The rendering is most of a tiny fit's time with the quickstart's callbacks
    (about 15 s of a 20 s fit on one core: the GIF draws each frame through the constrained
    layout) and is the same whatever the model; ``test_reports.py`` renders for real and checks
    what the files show. ``figures_not_rendered_within`` is the same as a context manager, for a
    module-scoped fixture.
    """
    return _skip_figure_rendering(monkeypatch)


@contextlib.contextmanager
def _not_rendered() -> Iterator[list[Path]]:
    mp = pytest.MonkeyPatch()
    try:
        yield _skip_figure_rendering(mp)
    finally:
        mp.undo()


@pytest.fixture(scope="session")
def figures_not_rendered_within() -> Callable[[], AbstractContextManager[list[Path]]]:
    """``with figures_not_rendered_within() as paths:`` skips the rendering inside the block
    (see ``figures_not_rendered``)."""
    return _not_rendered
