"""Run import-linter's contracts (``[tool.importlinter]`` in pyproject.toml) on the package layout.

import-linter (through grimp) finds a package's modules by walking the folder of its top-level
package, so the folders that setuptools maps into it (``[tool.setuptools.package-dir]``:
``datamodules/`` -> ``beamvq.datamodules``, ``callbacks/`` -> ``beamvq.callbacks``) are
invisible to it in an editable install. This copies the sources into a temporary tree laid out
as they install (no build, no install) and runs ``lint-imports`` on that tree.

    python .ci/lint_imports.py [--root REPO]

Exit status: that of ``lint-imports`` (non-zero when a contract is broken).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: import-linter brings tomli
    import tomli as tomllib


def stage(root: Path, dest: Path) -> None:
    """Lay out ``root``'s packages under ``dest`` as they install."""
    config = tomllib.loads((root / "pyproject.toml").read_text())
    setuptools = config["tool"]["setuptools"]
    mapped = setuptools.get("package-dir", {})
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    # top-level packages from their own folders (their unmapped subpackages come with them),
    # then every mapped package from the folder it is mapped to
    tops = {p: p for p in setuptools["packages"] if "." not in p}
    for package, folder in {**tops, **mapped}.items():
        source = root / folder
        # package-data folders (configs/ -> beamvq.configs) hold no module to check
        if not source.is_dir() or not any(source.rglob("*.py")):
            continue
        target = dest / package.replace(".", "/")
        shutil.copytree(source, target, ignore=ignore, dirs_exist_ok=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1])
    args = parser.parse_args()
    root = args.root.resolve()
    with tempfile.TemporaryDirectory(prefix="beamvq-lint-imports-") as tmp:
        stage(root, Path(tmp))
        env = dict(os.environ)
        # the staged tree comes before the editable install's finder on the import path
        env["PYTHONPATH"] = os.pathsep.join([tmp, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or "lint-imports"
        command = [lint, "--no-cache", "--no-logo", str(root / "pyproject.toml")]
        return subprocess.run(command, cwd=tmp, env=env, check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
