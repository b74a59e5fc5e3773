"""The YAML configs shipped with beamvq, usable by name from any working directory.

The repository folder ``configs/`` installs as the package data ``beamvq.configs`` (see
``[tool.setuptools]`` in pyproject.toml), so a non-editable install runs the README's commands:

- ``beamvq fit --config quickstart`` (or ``--config configs/quickstart.yaml``, the README's
  spelling): :func:`resolve_config_arguments` turns a ``--config`` value that is not an existing
  file but names a packaged config into that file's path; an existing file always wins.
- ``beamvq configs list`` and ``beamvq configs copy DEST [NAMES...]`` (:func:`configs_command`)
  list the packaged configs and copy them out to edit them.
- ``beamvq --version`` prints :func:`version_string`.

Names are paths below ``configs/`` without ``.yaml``: ``quickstart``, ``backbones/fno``,
``beamvq/ns``. The configs hold no path into the repository: data files (``data/...``) and run
directories (``runs/...``) are relative to the working directory, and the built-in generators
write the data files on first use.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

log = logging.getLogger(__name__)

SUFFIX = ".yaml"
# the README writes ``--config configs/quickstart.yaml``: outside a checkout that prefix names the
# packaged folder
_PREFIX = "configs/"


def config_root() -> Traversable:
    """The folder of the packaged configs: ``beamvq/configs`` in an installed wheel, the
    checkout's ``configs/`` beside ``beamvq/`` in an editable install or a source tree."""
    # not resources.files("beamvq.configs"): a data folder without __init__.py is a namespace
    # package, which editable installs do not resolve and Python 3.10 cannot hand to files()
    package = resources.files("beamvq")
    installed = package.joinpath("configs")
    return installed if installed.is_dir() else package.joinpath("..", "configs")


def _walk(folder: Traversable, prefix: str = "") -> list[str]:
    names: list[str] = []
    for entry in folder.iterdir():
        if entry.is_dir() and not entry.name.startswith((".", "__")):
            names += _walk(entry, f"{prefix}{entry.name}/")
        elif entry.is_file() and entry.name.endswith(SUFFIX):
            names.append(prefix + entry.name[: -len(SUFFIX)])
    return names


def list_configs() -> list[str]:
    """Every packaged config's name, sorted: ``["backbones/cno", ..., "quickstart", "report"]``."""
    return sorted(_walk(config_root()))


def _normalize(name: str) -> str:
    name = name.replace("\\", "/").strip()
    if name.startswith(_PREFIX):
        name = name[len(_PREFIX) :]
    return name[: -len(SUFFIX)] if name.endswith(SUFFIX) else name


def packaged_config(name: str) -> Path | None:
    """The file of the packaged config ``name`` (``quickstart``, ``backbones/fno.yaml``,
    ``configs/quickstart.yaml``), or None when no packaged config has that name."""
    key = _normalize(name)
    if key not in list_configs():
        return None
    entry = config_root().joinpath(*f"{key}{SUFFIX}".split("/"))
    # an installed package is a folder on disk (wheels are unpacked): a real path to hand to
    # LightningCLI, which reads --config from the file system
    return Path(str(entry)).resolve()


def resolve_config_arguments(argv: Sequence[str]) -> list[str]:
    """``argv`` with every ``--config NAME`` / ``--config=NAME`` / ``-c NAME`` that names a
    packaged config (and is not an existing file) replaced by the packaged file's path; all else
    untouched."""
    out: list[str] = []
    expect_value = False
    for arg in argv:
        if expect_value:
            out.append(_resolve_one(arg))
            expect_value = False
        elif arg in ("--config", "-c"):  # LightningCLI's two spellings
            out.append(arg)
            expect_value = True
        elif arg.startswith("--config="):
            out.append("--config=" + _resolve_one(arg[len("--config=") :]))
        else:
            out.append(arg)
    return out


def _resolve_one(value: str) -> str:
    if not value or Path(value).exists():
        return value
    found = packaged_config(value)
    return value if found is None else str(found)


def copy_configs(
    dest: Path, names: Sequence[str] | None = None, overwrite: bool = False
) -> list[Path]:
    """Copy the packaged configs ``names`` (all when None) below ``dest``, keeping their folders
    (``backbones/fno`` -> ``dest/backbones/fno.yaml``); return the files written.

    Stops before writing anything when a name is unknown, or when a target file exists and
    ``overwrite`` is False (the message names the files).
    """
    known = list_configs()
    wanted = known if names is None else [_normalize(n) for n in names]
    unknown = [n for n in wanted if n not in known]
    if unknown:
        raise ValueError(
            f"no packaged config named {', '.join(unknown)}; `beamvq configs list` shows the "
            f"{len(known)} there are"
        )
    dest = Path(dest)
    targets = [(n, dest.joinpath(*f"{n}{SUFFIX}".split("/"))) for n in wanted]
    existing = [str(t) for _, t in targets if t.exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"not overwriting {len(existing)} existing file(s): {', '.join(existing[:5])}"
            + (" ..." if len(existing) > 5 else "")
            + " (pass --overwrite to replace them)"
        )
    written = []
    for name, target in targets:
        source = packaged_config(name)
        assert source is not None  # every wanted name is known
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        written.append(target)
    return written


def version_string() -> str:
    """``beamvq <version>`` with the Python and torch versions, for ``beamvq --version``."""
    import torch

    from beamvq import __version__

    python = ".".join(str(v) for v in sys.version_info[:3])
    return f"beamvq {__version__} (Python {python}, torch {torch.__version__})"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="beamvq configs",
        description="List the YAML configs shipped with beamvq, or copy them out to edit them. "
        "Any of them runs by name: beamvq fit --config quickstart",
    )
    sub = parser.add_subparsers(dest="action")
    sub.add_parser("list", help="print the packaged configs' names (the default)")
    copy = sub.add_parser("copy", help="copy packaged configs into a folder")
    copy.add_argument("dest", type=Path, help="folder to copy into (created if missing)")
    copy.add_argument("names", nargs="*", help="configs to copy (default: all), e.g. quickstart")
    copy.add_argument("--overwrite", action="store_true", help="replace existing files")
    return parser


def configs_command(argv: Sequence[str]) -> int:
    """``beamvq configs [list | copy DEST [NAMES...] [--overwrite]]``; returns the exit status."""
    args = _parser().parse_args(list(argv))
    if args.action in (None, "list"):
        root = Path(str(config_root())).resolve()
        sys.stdout.write("\n".join(list_configs()) + f"\n({root})\n")
        return 0
    try:
        written = copy_configs(args.dest, args.names or None, overwrite=args.overwrite)
    except (ValueError, FileExistsError) as err:
        sys.stderr.write(f"beamvq configs copy: {err}\n")
        return 2
    sys.stdout.write("".join(f"{path}\n" for path in written))
    return 0


__all__ = [
    "config_root",
    "configs_command",
    "copy_configs",
    "list_configs",
    "packaged_config",
    "resolve_config_arguments",
    "version_string",
]
