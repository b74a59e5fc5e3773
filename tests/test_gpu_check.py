"""``benchmarks/gpu_check.py --dry-run``: every part runs at toy size on the CPU and the JSON and
Markdown report name every part, with each row marked as not measured on a GPU."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_check  # noqa: E402


def test_dry_run_writes_every_part(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # Lightning writes nothing into the repository
    start = time.monotonic()
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path)]) == 0
    assert time.monotonic() - start < 90  # the CI budget for the dry run (about 30 s here)
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    markdown = (tmp_path / "gpu_check.md").read_text()
    assert report["dry_run"] is True and report["errors"] == {}
    rows = report["rows"]
    parts = {r["part"] for r in rows}
    assert parts == set(gpu_check.PARTS)  # every part ran and reported
    assert set(report["seconds"]) == set(gpu_check.PARTS)
    # nothing from a CPU dry run counts as a GPU figure
    assert all(r["status"] == gpu_check.NOT_MEASURED for r in rows)
    assert markdown.count("| " + gpu_check.NOT_MEASURED + " |") == len(rows)
    for part in gpu_check.PARTS:
        assert f"| {part} |" in markdown
    by_figure = {r["figure"]: r for r in rows}
    # values the toy run can check: offload keeps fewer activations on the device, the search
    # loop returns the batched search's trajectories, all ten backbones have an eager throughput
    assert 0 < by_figure["device activations, alpha 0.5 / none"]["value"] < 1
    assert "same trajectories: True" in by_figure["per-beam loop / batched search time"]["note"]
    assert by_figure["FP8 / bf16 training-step time"]["value"] > 0
    eager = [r for r in rows if r["part"] == "throughput" and r["figure"].endswith("eager")]
    assert len(eager) == 10 and all(r["value"] > 0 for r in eager)
    assert by_figure["fsdp_cpu_offload: largest trainable model"]["note"] == "the engine needs CUDA"


def test_unknown_part_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        gpu_check.main(["--dry-run", "--parts", "fp8,warp"])
    assert "unknown ['warp']" in capsys.readouterr().err
