"""The ``beamvq`` console command (``pyproject.toml`` ``[project.scripts]``, ``python -m beamvq``):
the subcommands that are not Lightning's (``--version``, ``configs``, ``import-weights``,
``summary``), then ``beamvq.cli.main``; errors of the data or the configuration print one
message (docs/reliability.md)."""

from __future__ import annotations

import os
import sys

from beamvq.checkpoint_files import Refusal
from beamvq.cli import main
from beamvq.packaged_configs import configs_command, resolve_config_arguments, version_string

#: errors of the data or the configuration (messages name the file, variable or YAML key): the
#: console prints the message alone; any other exception keeps its traceback
USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    FileNotFoundError,
    PermissionError,
    ImportError,
    FloatingPointError,
)
TRACEBACK_ENV = "BEAMVQ_TRACEBACK"


def console_main() -> None:
    """Entry point of the ``beamvq`` console script: returns nothing, so the exit status is 0 on
    success (``sys.exit`` of the CLI object would print it and exit with status 1).

    Before LightningCLI parses: ``beamvq --version``, ``beamvq configs ...`` (list or copy the
    packaged configs), ``beamvq import-weights ...`` (OpenSTL / neuraloperator checkpoints),
    ``beamvq summary ...`` (``beamvq.summary``: test metrics of checkpoints side by side), and
    ``--config NAME`` of a packaged config becomes its file. Errors of the data or the
    configuration (``USER_ERRORS``) print one message; ``--traceback`` or ``BEAMVQ_TRACEBACK=1``
    shows the traceback."""
    argv = sys.argv[1:]
    if argv[:1] == ["--version"]:
        sys.stdout.write(version_string() + "\n")
        return
    if argv[:1] == ["configs"]:
        sys.exit(configs_command(argv[1:]))
    if argv[:1] == ["import-weights"]:
        from beamvq.importers import importing_command

        sys.exit(importing_command(argv[1:]))
    if argv[:1] == ["summary"]:
        from beamvq.summary import main as summary_main

        summary_main(argv[1:])
        return
    traceback = "--traceback" in argv or os.environ.get(TRACEBACK_ENV, "") not in ("", "0")
    argv = [a for a in argv if a != "--traceback"]
    # LightningCLI reads sys.argv itself: rewrite it in place rather than passing args=
    sys.argv[1:] = resolve_config_arguments(argv)
    try:
        main()
    except Refusal as err:  # an argument refused before any work: its message, no traceback
        sys.stderr.write(f"beamvq: error: {err}\n")
        sys.exit(2)
    except USER_ERRORS as err:  # bad data or configuration: one message naming what is wrong
        if traceback:
            raise
        sys.stderr.write(
            f"beamvq: error: {err}\n(the traceback: rerun with --traceback or {TRACEBACK_ENV}=1)\n"
        )
        sys.exit(1)
