"""Can a larger offset scale calibrate the code-bank ensemble? (issue 17 item 1, a diagnostic)

The ``vq`` arm's K members are ``z + s·(e_i − e_0)`` with ``s`` learned by the fair CRPS
(``configs/experiments/arms/vq.yaml``); they come out under-dispersed (spread/skill ≈ 0.46).
This script multiplies the learned ``s`` of a finished run's best checkpoint by each factor and
tests every copy with ``beamvq test`` (through ``python -m beamvq.summary --json``), printing
CRPS, spread/skill, MAE and MSE side by side. The deterministic forecast decodes ``z`` and does
not move; if widening the members brought spread/skill to 1 while CRPS fell, the members would
point along the errors and only their size would be wrong. It is a characterization of the
members, not a selection (nothing is chosen on test).

    python benchmarks/spread_scale.py runs/experiments/ns_scarce/vq/n8_u48/seed0 --factors 1,2,3,4.5
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
KEY = "model.bottleneck.log_offset_scale"
SHOWN = ("test/crps", "test/spread_skill", "test/mae", "test/mse")


def scaled_checkpoint(src: Path, factor: float, dst: Path) -> None:
    ckpt = torch.load(src, map_location="cpu", weights_only=True)
    if KEY not in ckpt["state_dict"]:
        raise SystemExit(f"{src}: no {KEY} (not a run of a bottleneck with learn_offset_scale)")
    ckpt["state_dict"][KEY] = ckpt["state_dict"][KEY] + math.log(factor)
    torch.save(ckpt, dst)


def test_command(run_dir: Path, ckpt: Path, out: Path) -> list[str]:
    """The run's own ``beamvq.summary`` command (from its test.log), on another checkpoint."""
    first = (run_dir / "test.log").read_text().splitlines()[0]
    args = first.removeprefix("$ ").split()
    args = args[args.index("beamvq.summary") + 1 :]
    drop = {"--ckpt", "--out", "--json", "--trainer.default_root_dir", "--label"}
    kept, i = [], 0
    while i < len(args):
        if args[i] in drop:
            i += 2
            continue
        kept.append(args[i])
        i += 1
    return [sys.executable, "-m", "beamvq.summary", *kept, "--ckpt", str(ckpt),
            "--trainer.default_root_dir", str(out), "--out", str(out / "summary.md"),
            "--json", str(out / "test.json")]  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a finished benchmarks/experiment.py run")
    parser.add_argument(
        "--factors", default="1,2,3,4.5", type=lambda s: [float(v) for v in s.split(",")]
    )
    args = parser.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    print(f"{args.run_dir}: offset scale × factor, tested on the test split\n")
    print("| factor | " + " | ".join(k.removeprefix("test/") for k in SHOWN) + " |")
    print("|---|" + "---|" * len(SHOWN))
    with tempfile.TemporaryDirectory() as tmp:
        for factor in args.factors:
            work = Path(tmp) / f"x{factor}"
            work.mkdir()
            ckpt = work / "scaled.ckpt"
            scaled_checkpoint(args.run_dir / "checkpoints" / "best.ckpt", factor, ckpt)
            cmd = test_command(args.run_dir, ckpt, work)
            proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
            if proc.returncode:
                sys.stderr.write(proc.stdout[-2000:] + proc.stderr[-2000:])
                return proc.returncode
            metrics = json.loads((work / "test.json").read_text())["best"]["metrics"]
            print(f"| {factor:g} | " + " | ".join(f"{metrics[k]:.4f}" for k in SHOWN) + " |",
                  flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
