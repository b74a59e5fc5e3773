"""Project rules that code review would otherwise have to catch (DESIGN.md, 'Import direction')."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("beamvq", "datamodules", "callbacks")


def imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module in (
                "beamvq",
                "beamvq.datamodules",
                "beamvq.callbacks",
            ):  # `from beamvq import search` imports beamvq.search
                names += [f"{node.module}.{a.name}" for a in node.names]
            else:
                names.append(node.module)
    return names


def files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("path", files("beamvq"), ids=lambda p: str(p.relative_to(ROOT)))
def test_model_side_never_imports_data_or_callbacks(path: Path) -> None:
    if path.name == "cli.py":
        return
    bad = [n for n in imports(path) if n.startswith(("beamvq.datamodules", "beamvq.callbacks"))]
    assert not bad, f"{path}: imports {bad}"


@pytest.mark.parametrize("path", files("datamodules"), ids=lambda p: str(p.relative_to(ROOT)))
def test_datamodules_never_import_the_module(path: Path) -> None:
    bad = [n for n in imports(path) if n.startswith(("beamvq.module", "beamvq.callbacks"))]
    assert not bad, f"{path}: imports {bad}"


@pytest.mark.parametrize("path", files("callbacks"), ids=lambda p: str(p.relative_to(ROOT)))
def test_callbacks_use_only_search_and_metrics_from_the_model_side(path: Path) -> None:
    bad = [
        n
        for n in imports(path)
        if n.split(".")[0] == "beamvq"
        and n
        not in (
            "beamvq.search",
            "beamvq.metrics",
            "beamvq.protocols",
            "beamvq.selftrain",
            "beamvq.distributed",
        )
        and not n.startswith(("beamvq.callbacks", "beamvq.datamodules.io"))
    ]
    assert not bad, f"{path}: imports {bad}"


@pytest.mark.parametrize(
    "path",
    [p for pkg in (*PACKAGES, "tests", "benchmarks") for p in sorted((ROOT / pkg).rglob("*.py"))],
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_lightning_only_as_pytorch_lightning(path: Path) -> None:
    bad = [n for n in imports(path) if n.split(".")[0] == "lightning"]
    assert not bad, f"{path}: imports {bad}; use pytorch_lightning"


@pytest.mark.parametrize(
    "path", [p for pkg in PACKAGES for p in files(pkg)], ids=lambda p: str(p.relative_to(ROOT))
)
def test_no_print_in_library_code(path: Path) -> None:
    tree = ast.parse(path.read_text())
    calls = [
        n.lineno
        for n in ast.walk(tree)
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "print"
    ]
    assert not calls, f"{path}: print() at lines {calls}; use logging"
