"""Print every figure docs/results.md (and the README through it) quotes, with one command.

    python benchmarks/run_all.py                 # overhead + BeamVQ gain --quick (~6 min)
    python benchmarks/run_all.py --full          # + the full gain table (10 backbones x 2 data
                                                 #   sets x 2 arms x 3 seeds, improved bottleneck),
                                                 #   the papers' bottleneck (seed 0), the vq arm
                                                 #   (seed 0) and the ablation on convlstm: about
                                                 #   3 hours on 2 quiet cores
    python benchmarks/run_all.py --from runs/bench/*.jsonl   # tables from saved results only

Each part runs its own script (``benchmarks/overhead.py``, ``benchmarks/beamvq_gain.py``) in a
subprocess, so one failure does not hide the other figures; the exit status is the number of
failed parts. Results of the gain runs append to ``--results-dir`` as JSON lines.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def part(title: str, args: Sequence[str]) -> int:
    print(f"\n# {title}\n\n$ python {' '.join(args)}\n", flush=True)
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, check=False)
    if proc.returncode:
        print(f"\n(failed with exit status {proc.returncode})", flush=True)
    return int(proc.returncode != 0)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="the full gain table and ablation")
    parser.add_argument("--from", dest="saved", nargs="+", default=None,
                        help="print the gain tables from saved JSON-lines results, train nothing")  # fmt: skip
    parser.add_argument("--results-dir", default=str(ROOT / "runs" / "bench"))
    parser.add_argument("--skip-overhead", action="store_true")
    args = parser.parse_args(argv)
    gain = str(HERE / "beamvq_gain.py")
    if args.saved:
        return part("BeamVQ gain (saved results)", [gain, "--report", *args.saved])
    out = Path(args.results_dir)
    failed = 0
    if not args.skip_overhead:
        failed += part("Overhead", [str(HERE / "overhead.py")])
    if args.full:
        results = str(out / "gain_full.jsonl")
        failed += part("BeamVQ gain, full protocol", [gain, "--results", results])
        failed += part("Bottleneck without search (vq arm), seed 0",
                       [gain, "--arms", "vq", "--seeds", "0", "--results", results])  # fmt: skip
        failed += part(
            "The papers' bottleneck (quantized forecast path, commitment 0.25), seed 0",
            [gain, "--seeds", "0", "--vq-path", "quantized", "--commitment", "0.25",
             "--results", results],
        )  # fmt: skip
        failed += part(
            "BeamVQ ablation (convlstm, Navier-Stokes)",
            [gain, "--ablation", "--backbones", "convlstm", "--datasets", "ns", "--seeds", "0",
             "--arms", "base,vq,beamvq", "--results", str(out / "ablation_full.jsonl")],
        )  # fmt: skip
        failed += part("All gain tables", [gain, "--report", results])
    else:
        failed += part("BeamVQ gain, --quick",
                       [gain, "--quick", "--results", str(out / "gain_quick.jsonl")])  # fmt: skip
    return failed


if __name__ == "__main__":
    sys.exit(main())
