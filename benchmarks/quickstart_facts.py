"""The quickstart facts the README states, measured by running the README's first job.

``python benchmarks/quickstart_facts.py [--root runs/quickstart_facts] [--skip-fit]`` runs
``beamvq fit --config configs/quickstart.yaml`` (W&B offline, one torch thread unless
``OMP_NUM_THREADS`` says otherwise) in its own run directory, then prints, from the run's own
output only:

- the wall time of the fit (data generation included when the data file is missing);
- per search epoch, the callback's summary line (``BeamSearchAugmentation epoch N: searched S,
  accepted A, added D, pool P, ... search Xs = R x the training epoch``): windows searched, pool
  growth and the search's cost against the training epoch;
- the windows per search the config asks for (``inputs.windows``) beside what was searched.

Nothing is computed outside the product: the numbers are the callback's log lines. With
``--skip-fit`` the facts are read from ``<root>/fit.log`` of an earlier run.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "configs" / "quickstart.yaml"
SUMMARY = re.compile(
    r"BeamSearchAugmentation epoch (?P<epoch>\d+): searched (?P<searched>\d+), accepted "
    r"(?P<accepted>\d+), added (?P<added>\d+), pool (?P<pool>\d+), gain (?P<gain>\S+), search "
    r"(?P<seconds>[\d.]+)s = (?P<ratio>[\d.]+) x the training epoch"
)


def configured_windows(config: Path = QUICKSTART) -> int | None:
    """``inputs.windows`` of the config's ``BeamSearchAugmentation`` (None without one)."""
    cfg = yaml.safe_load(config.read_text())
    for cb in cfg.get("trainer", {}).get("callbacks", []) or []:
        if str(cb.get("class_path", "")).endswith("BeamSearchAugmentation"):
            return int(((cb.get("init_args") or {}).get("inputs") or {}).get("windows", 0))
    return None


def parse_searches(text: str) -> list[dict[str, float]]:
    """Every search summary line of a fit's output, as numbers."""
    return [{k: float(v) for k, v in m.groupdict().items()} for m in SUMMARY.finditer(text)]


def run_fit(root: Path) -> tuple[str, float]:
    env = dict(os.environ)
    env.setdefault("WANDB_MODE", "offline")
    env.setdefault("OMP_NUM_THREADS", "1")
    cmd = [sys.executable, "-m", "beamvq", "fit", "--config", str(QUICKSTART),
           "--trainer.default_root_dir", str(root)]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    out = proc.stdout + proc.stderr
    root.mkdir(parents=True, exist_ok=True)
    (root / "fit.log").write_text(out)
    if proc.returncode != 0:
        raise SystemExit(f"beamvq fit failed ({proc.returncode}); its output:\n{out[-3000:]}")
    return out, seconds


def facts(text: str, seconds: float | None, windows: int | None) -> str:
    searches = parse_searches(text)
    lines = []
    if seconds is not None:
        lines.append(f"fit wall time: {seconds:.0f} s ({seconds / 60:.1f} min)")
    lines.append(f"windows per search (config inputs.windows): {windows}")
    if not searches:
        lines.append("no search summary line in the output")
        return "\n".join(lines)
    pool = " -> ".join(["0"] + [str(int(s["pool"])) for s in searches])
    lines.append(f"pool size: {pool}")
    for s in searches:
        lines.append(
            f"epoch {int(s['epoch'])}: searched {int(s['searched'])}, accepted "
            f"{int(s['accepted'])}, search {s['seconds']:.2f} s = {s['ratio']:.3f} x the "
            "training epoch"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/quickstart_facts.py")
    p.add_argument("--root", type=Path, default=REPO / "runs" / "quickstart_facts")
    p.add_argument("--skip-fit", action="store_true", help="read <root>/fit.log instead")
    args = p.parse_args(argv)
    if args.skip_fit:
        text, seconds = (args.root / "fit.log").read_text(), None
    else:
        text, seconds = run_fit(args.root)
    print(facts(text, seconds, configured_windows()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
