"""Project rules that code review would otherwise have to catch (DESIGN.md, 'Import direction').

The import direction is import-linter's job (contracts in pyproject.toml, run by
``.ci/run`` through ``.ci/lint_imports.py``); the test here proves that those contracts pass
and that each of them fails on a violation. What import-linter cannot express is one scan over
every file: no ``print`` in library code, and no ``lightning`` import in the tests and
benchmarks (which are not packages import-linter analyses).
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ("beamvq", "datamodules", "callbacks")
SCRIPTS = ("tests", "benchmarks")
LINT = ROOT / ".ci" / "lint_imports.py"


def _lint(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(LINT), "--root", str(root)],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )


def _imported(tree: ast.AST) -> list[tuple[int, str]]:
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return found


def _offences(path: Path, library: bool) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    where = path.relative_to(ROOT)
    found = [
        f"{where}:{line}: imports {name}; use pytorch_lightning"
        for line, name in _imported(tree)
        if name.split(".")[0] == "lightning"
    ]
    if library:
        found += [
            f"{where}:{n.lineno}: print(); use logging or rank_zero_info"
            for n in ast.walk(tree)
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "print"
        ]
    return found


def test_source_scan_no_print_in_library_no_lightning_anywhere() -> None:
    offences: list[str] = []
    for folder in (*LIBRARY, *SCRIPTS):
        for path in sorted((ROOT / folder).rglob("*.py")):
            offences += _offences(path, library=folder in LIBRARY)
    assert not offences, "\n".join(offences)


def test_import_contracts_hold_and_each_fails_on_a_violation(tmp_path: Path) -> None:
    ok = _lint(ROOT)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "0 broken" in ok.stdout

    # a copy of the sources with one violation of every contract
    for folder in LIBRARY:
        shutil.copytree(ROOT / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__py*"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    violations = {
        # model side -> callbacks; model side -> datamodules; model side -> CLI
        "beamvq/model.py": "import beamvq.callbacks.lead_time\nimport beamvq.datamodules.pool\n",
        "beamvq/search.py": "from beamvq import cli\n",
        # datamodules -> module
        "datamodules/pool.py": "import beamvq.module\n",
        # callbacks -> a model-side module that did not exist when the contract was written
        "callbacks/lead_time.py": "from beamvq import brand_new\n",
        "beamvq/metrics/scorers.py": "import lightning.pytorch\n",
    }
    (tmp_path / "beamvq" / "brand_new.py").write_text('"""A new model-side module."""\n')
    for name, line in violations.items():
        path = tmp_path / name
        path.write_text(path.read_text() + line)
    bad = _lint(tmp_path)
    assert bad.returncode != 0
    assert "0 kept, 6 broken" in bad.stdout, bad.stdout
    for chain in (
        "beamvq.model -> beamvq.callbacks.lead_time",
        "beamvq.model -> beamvq.datamodules.pool",
        "beamvq.search -> beamvq.cli",
        "beamvq.datamodules.pool -> beamvq.module",
        "beamvq.callbacks.lead_time -> beamvq.brand_new",
        "beamvq.metrics.scorers -> lightning",
    ):
        assert chain in bad.stdout, (chain, bad.stdout)
