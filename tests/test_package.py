"""The distribution as a user gets it: wheel contents, declared dependencies, the packaged configs
(by name, listed, copied), ``beamvq.__version__``, and a ``fast_dev_run`` fit from the packaged
quickstart with the wheel installed outside the repository (no network: ``--no-index``)."""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import zipfile
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
import tomllib

import beamvq
from beamvq.packaged_configs import (
    config_root,
    configs_command,
    copy_configs,
    list_configs,
    packaged_config,
    resolve_config_arguments,
    version_string,
)

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SOURCE_CONFIGS = sorted(
    p.relative_to(ROOT / "configs").with_suffix("").as_posix()
    for p in (ROOT / "configs").rglob("*.yaml")
)
# the data and model overrides of the packaged-quickstart fit, kept in one place (the names are
# the CLI's argument groups)
TINY_FIT = [
    "--trainer.fast_dev_run", "true",
    "--data.init_args.generator.init_args.n_trajectories", "6",
    "--data.init_args.generator.init_args.resolution", "32",
    "--data.init_args.generator.init_args.n_frames", "12",
    "--data.init_args.loader.batch_size", "4",
    "--model.bottleneck.init_args.codebook_size", "32",
]  # fmt: skip


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_names(requirements: list[str]) -> set[str]:
    return {_normalize(re.split(r"[\s\[<>=!~;]", r, maxsplit=1)[0]) for r in requirements}


def _third_party_imports(folders: list[Path]) -> dict[str, str]:
    """Top-level module -> first file importing it, over every import statement (also those
    inside functions) of the given folders, stdlib and beamvq excluded."""
    found: dict[str, str] = {}
    for folder in folders:
        for path in sorted(folder.rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top not in sys.stdlib_module_names and top not in ("beamvq", "__future__"):
                        found.setdefault(top, str(path.relative_to(ROOT)))
    return found


# -- metadata -------------------------------------------------------------------------------------


def test_every_imported_third_party_package_is_declared() -> None:
    project = PYPROJECT["project"]
    declared = _requirement_names(project["dependencies"])
    optional = set().union(
        *(_requirement_names(v) for v in project["optional-dependencies"].values())
    )
    providers = packages_distributions()
    imports = _third_party_imports([ROOT / "beamvq", ROOT / "datamodules", ROOT / "callbacks"])
    # the transitive-only ones of before must be among them, so the scan does see them
    assert {"torchmetrics", "pandas", "fsspec", "tqdm"} <= set(imports)
    undeclared = {}
    for module, where in imports.items():
        dists = {_normalize(d) for d in providers.get(module, [module])}
        if not dists & (declared | optional):
            undeclared[module] = where
    assert not undeclared, f"imported but not in [project] dependencies: {undeclared}"
    # optional ones only where the import is guarded: torchao is the fp8 extra
    assert {
        m for m in imports if not {_normalize(d) for d in providers.get(m, [m])} & declared
    } <= {"torchao"}


def test_license_matches_pyproject_and_metadata_is_complete() -> None:
    project = PYPROJECT["project"]
    assert project["license"] == "Apache-2.0"
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text and len(text.splitlines()) > 150
    assert project["license-files"] == ["LICENSE"]
    assert "Typing :: Typed" in project["classifiers"]
    assert (ROOT / "beamvq" / "py.typed").is_file()
    # every configs folder is a package of the distribution (else its YAML files are left out)
    packages = set(PYPROJECT["tool"]["setuptools"]["packages"])
    folders = {p.parent for p in (ROOT / "configs").rglob("*.yaml")}
    for folder in folders:
        rel = folder.relative_to(ROOT / "configs").parts
        assert ".".join(("beamvq", "configs", *rel)) in packages, folder


def test_version_comes_from_the_distribution() -> None:
    from importlib.metadata import version

    assert beamvq.__version__ == version("beamvq") == PYPROJECT["project"]["version"]
    assert version_string().startswith(f"beamvq {beamvq.__version__} (Python ")


# -- packaged configs -----------------------------------------------------------------------------


def test_list_configs_names_every_yaml_of_the_configs_folder() -> None:
    names = list_configs()
    assert names == SOURCE_CONFIGS
    assert {"quickstart", "backbones/fno", "beamvq/ns", "report"} <= set(names)
    assert Path(str(config_root())).resolve() == (ROOT / "configs").resolve()


def test_resolve_config_arguments_replaces_packaged_names_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    quick = str((ROOT / "configs" / "quickstart.yaml").resolve())
    fno = str((ROOT / "configs" / "backbones" / "fno.yaml").resolve())
    (tmp_path / "mine.yaml").write_text("seed_everything: 1\n")
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "report.yaml").write_text("seed_everything: 2\n")
    argv = [
        "fit",
        "--config", "quickstart",
        "--config=backbones/fno.yaml",
        "--config", "mine.yaml",  # an existing file wins
        "--config", "configs/report.yaml",  # existing here too
        "--config", "configs/beamvq/ns.yaml",  # the README's spelling, not a file here
        "--config", "nonexistent",  # left for LightningCLI to report
        "-c", "backbones/fno",  # LightningCLI's short spelling
        "--model.lr", "quickstart",  # only values of --config are looked at
    ]  # fmt: skip
    out = resolve_config_arguments(argv)
    ns = str((ROOT / "configs" / "beamvq" / "ns.yaml").resolve())
    assert out == [
        "fit",
        "--config", quick,
        f"--config={fno}",
        "--config", "mine.yaml",
        "--config", "configs/report.yaml",
        "--config", ns,
        "--config", "nonexistent",
        "-c", fno,
        "--model.lr", "quickstart",
    ]  # fmt: skip
    assert packaged_config("nonexistent") is None
    assert resolve_config_arguments(["fit", "--config"]) == ["fit", "--config"]


def test_copy_configs_keeps_folders_and_never_overwrites_unless_told(tmp_path: Path) -> None:
    written = copy_configs(tmp_path, ["quickstart", "backbones/fno.yaml"])
    assert written == [tmp_path / "quickstart.yaml", tmp_path / "backbones" / "fno.yaml"]
    src = (ROOT / "configs" / "backbones" / "fno.yaml").read_text()
    assert written[1].read_text() == src
    written[0].write_text("# my edits\n")
    with pytest.raises(FileExistsError, match="quickstart.yaml"):
        copy_configs(tmp_path, ["quickstart", "report"])
    # nothing written when it refuses
    assert written[0].read_text() == "# my edits\n" and not (tmp_path / "report.yaml").exists()
    copy_configs(tmp_path, ["quickstart"], overwrite=True)
    assert written[0].read_text() == (ROOT / "configs" / "quickstart.yaml").read_text()
    with pytest.raises(ValueError, match="no packaged config named nope"):
        copy_configs(tmp_path, ["nope"])
    everything = copy_configs(tmp_path / "all")
    assert sorted(
        p.relative_to(tmp_path / "all").with_suffix("").as_posix() for p in everything
    ) == (SOURCE_CONFIGS)


def test_configs_command_lists_and_copies(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert configs_command([]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert listed[:-1] == SOURCE_CONFIGS
    assert configs_command(["copy", str(tmp_path), "beamvq/ns"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "beamvq" / "ns.yaml")
    assert configs_command(["copy", str(tmp_path), "beamvq/ns"]) == 2
    assert "not overwriting" in capsys.readouterr().err
    assert configs_command(["copy", str(tmp_path), "beamvq/ns", "--overwrite"]) == 0


# -- the wheel, installed outside the repository --------------------------------------------------


def _build_wheel(tmp: Path) -> Path:
    """Build from a copy of the sources, so the repository gets no build/ or egg-info."""
    src = tmp / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc")
    for name in ("beamvq", "datamodules", "callbacks", "configs"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    dist = tmp / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
         "-q", "-w", str(dist), str(src)],
        check=True,
    )  # fmt: skip
    (wheel,) = dist.glob("beamvq-*.whl")
    return wheel


def _assert_wheel_contents(wheel: Path) -> None:
    """One top-level package, py.typed, every config, the LICENSE and the declared dependencies."""
    names = set(zipfile.ZipFile(wheel).namelist())
    tops = {n.split("/")[0] for n in names}
    assert {t for t in tops if not t.endswith((".dist-info", ".data"))} == {"beamvq"}
    assert "beamvq/py.typed" in names
    assert {f"beamvq/configs/{c}.yaml" for c in SOURCE_CONFIGS} <= names
    dist_info = next(t for t in tops if t.endswith(".dist-info"))
    assert f"{dist_info}/licenses/LICENSE" in names
    metadata = zipfile.ZipFile(wheel).read(f"{dist_info}/METADATA").decode()
    assert "License-Expression: Apache-2.0" in metadata
    for dep in ("torchmetrics", "pandas", "fsspec", "tqdm"):
        assert re.search(rf"^Requires-Dist: {dep}\b", metadata, re.M), dep


_PROBE = """
import beamvq, beamvq.datamodules, beamvq.callbacks
from beamvq.packaged_configs import resolve_config_arguments, version_string
print(beamvq.__file__); print(beamvq.datamodules.__file__); print(beamvq.callbacks.__file__)
print(version_string()); print(resolve_config_arguments(["--config", "quickstart"])[1])
"""


@pytest.mark.slow
def test_wheel_installed_outside_the_repo_fits_from_the_packaged_quickstart(
    tmp_path: Path,
) -> None:
    wheel = _build_wheel(tmp_path)
    _assert_wheel_contents(wheel)
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q",
         "--target", str(site), str(wheel)],
        check=True,
    )  # fmt: skip
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    # the installed copy, not the repository's (nor the editable install's) is what runs
    probe = subprocess.run([sys.executable, "-c", _PROBE], cwd=work, env=env,
                           capture_output=True, text=True, check=True)  # fmt: skip
    package, datamodules, callbacks, version, quickstart = probe.stdout.splitlines()
    for path in (package, datamodules, callbacks, quickstart):
        assert Path(path).resolve().is_relative_to(site.resolve()), path
    assert version.startswith(f"beamvq {PYPROJECT['project']['version']} ")
    assert Path(quickstart) == (site / "beamvq" / "configs" / "quickstart.yaml").resolve()

    fit = subprocess.run(
        [sys.executable, "-m", "beamvq", "fit", "--config", quickstart, *TINY_FIT],
        cwd=work, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert fit.returncode == 0, fit.stdout[-3000:] + fit.stderr[-3000:]
    # the config's relative data path landed in the working directory, written by the
    # built-in generator with the overrides
    import xarray as xr

    with xr.open_dataset(work / "data" / "navier_stokes_64.nc") as ds:
        assert dict(ds["vorticity"].sizes) == {"trajectory": 6, "time": 12, "y": 32, "x": 32}
    assert not (site / "beamvq" / "data").exists()
