"""beamvq/console.py: log lines reach the stream that is current (Rich's live display prints
them above the bar) and known third-party noise is filtered, beamvq's own lines never."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from pytorch_lightning.utilities import rank_zero_info
from rich.console import Console
from rich.live import Live
from rich.text import Text

from beamvq.console import (
    CurrentStreamHandler,
    quiet_known_noise,
    route_logs_through_current_streams,
)

SUMMARY = "BeamSearchAugmentation epoch 1: searched 32, accepted 9"


def _logger(name: str, handler: logging.Handler) -> logging.Logger:
    logger = logging.getLogger(name)
    logger.handlers = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    return logger


def test_a_plain_handler_misses_a_later_redirect_and_the_current_one_follows_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    plain = _logger("beamvq.test.plain", logging.StreamHandler(sys.stderr))
    current = _logger("beamvq.test.current", CurrentStreamHandler())
    redirected = io.StringIO()
    monkeypatch.setattr(sys, "stderr", redirected)
    plain.info("plain line")
    current.info(SUMMARY)
    assert SUMMARY in redirected.getvalue()
    assert "plain line" not in redirected.getvalue()


def test_the_line_prints_above_a_rich_live_display() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=120)
    logger = _logger("beamvq.test.live", logging.StreamHandler(sys.stderr))
    original = logger.handlers[0]
    route = logging.getLogger("")
    saved = list(route.handlers)
    route.handlers = []
    try:
        # the routing replaces a plain stream handler of the routed loggers (here: put on root)
        route.addHandler(original)
        route_logs_through_current_streams()
        (handler,) = route.handlers
        assert isinstance(handler, CurrentStreamHandler)
        logger.handlers = [handler]
        with Live(Text("epoch 1 ━━━━━━━━━━ 24/24"), console=console, redirect_stderr=True):
            logger.info(SUMMARY)
    finally:
        route.handlers = saved
    assert SUMMARY in out.getvalue()


def test_known_noise_is_filtered_and_our_lines_are_not(caplog: pytest.LogCaptureFixture) -> None:
    quiet_known_noise()
    quiet_known_noise()  # idempotent: one filter
    noisy = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    assert len(noisy.filters) == len({id(f) for f in noisy.filters})
    with caplog.at_level(logging.INFO):
        rank_zero_info("💡 Tip: For seamless cloud logging, try installing [litlogger](x)")
        rank_zero_info(SUMMARY)
        logging.getLogger("beamvq").warning("beamvq's own warning mentions litlogger")
    text = caplog.text
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")
        quiet_known_noise()
        warnings.warn(
            "`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning, stacklevel=1
        )
        warnings.warn("beamvq's own deprecation", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in seen] == ["beamvq's own deprecation"]
    assert "seamless cloud logging" not in text
    assert SUMMARY in text and "beamvq's own warning" in text


def _beamvq(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """``python -m beamvq <args>`` in ``cwd``; ``BEAMVQ_TRACEBACK`` only when ``env`` sets it."""
    full = {k: v for k, v in os.environ.items() if k != "BEAMVQ_TRACEBACK"}
    full.update(WANDB_MODE="disabled", OMP_NUM_THREADS="1", **env)
    return subprocess.run(
        [sys.executable, "-m", "beamvq", *args], cwd=cwd, env=full, capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip


def test_a_data_error_prints_one_message_and_the_traceback_on_request(tmp_path: Path) -> None:
    cfg = str(Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml")
    args = ["fit", "--config", cfg, "--data.init_args.path", "missing.nc",
            "--data.init_args.generator", "null", "--trainer.logger", "false"]  # fmt: skip
    plain = _beamvq(args, tmp_path)
    assert plain.returncode == 1
    assert "Traceback" not in plain.stderr
    errors = [line for line in plain.stderr.splitlines() if line.startswith("beamvq: error:")]
    assert len(errors) == 1 and "missing.nc" in errors[0], plain.stderr[-2000:]
    assert "--traceback" in plain.stderr
    for extra, env in ((["--traceback"], {}), ([], {"BEAMVQ_TRACEBACK": "1"})):
        loud = _beamvq([*args, *extra], tmp_path, **env)
        assert loud.returncode == 1 and "Traceback (most recent call last)" in loud.stderr


def test_beamvq_summary_is_a_subcommand(tmp_path: Path) -> None:
    out = _beamvq(["summary", "--help"], tmp_path)
    assert out.returncode == 0 and "--ckpt" in out.stdout
