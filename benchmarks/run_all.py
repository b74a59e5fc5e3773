"""Print every figure docs/results.md (and the README through it) quotes, with one command.

    python benchmarks/run_all.py                 # overhead (~6 min) + the experiment tables
                                                 #   from the saved results
    python benchmarks/run_all.py --resume        # + run whatever the campaign in
                                                 #   docs/results.md §0 has not finished yet
                                                 #   (hours on 2 cores; resumable)
    python benchmarks/run_all.py --skip-overhead # the tables only

Each part runs its own script (``benchmarks/overhead.py`` for costs, ``benchmarks/experiment.py``
for skill: ``beamvq fit`` + ``beamvq test`` through the CLI, results appended as JSON lines to
``benchmarks/results/``) in a subprocess, so one failure does not hide the other figures; the
exit status is the number of failed parts.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = ROOT / "benchmarks" / "results" / "experiments_ns_scarce.jsonl"
# the campaign of docs/results.md §0: (arms, labelled trajectories, unlabelled, seeds, overrides)
CAMPAIGN = (
    ("base", "8,16,32,64,160", "0", "0", ()),
    ("vq,beamvq,pushforward,base,ceiling", "8", "48", "0,1,2", ()),
    ("base", "8,64,160", "0", "0", ("--override=--trainer.max_epochs=80",)),
)


def part(title: str, args: Sequence[str]) -> int:
    print(f"\n# {title}\n\n$ python {' '.join(args)}\n", flush=True)
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, check=False)
    if proc.returncode:
        print(f"\n(failed with exit status {proc.returncode})", flush=True)
    return int(proc.returncode != 0)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--resume", action="store_true", help="run the unfinished campaign runs")
    parser.add_argument("--results", default=str(RESULTS))
    parser.add_argument("--jobs", default="2")
    parser.add_argument("--skip-overhead", action="store_true")
    args = parser.parse_args(argv)
    experiment = str(HERE / "experiment.py")
    failed = 0
    if not args.skip_overhead:
        failed += part("Overhead", [str(HERE / "overhead.py")])
    if args.resume:
        for arms, train, unlabelled, seeds, extra in CAMPAIGN:
            failed += part(
                f"Experiment: {arms} at {train} labelled + {unlabelled} unlabelled, seeds {seeds}",
                [experiment, "run", "--arms", arms, "--train-samples", train,
                 "--unlabelled-samples", unlabelled, "--seeds", seeds, "--jobs", args.jobs,
                 "--results", args.results, *extra],
            )  # fmt: skip
    failed += part("Experiment tables", [experiment, "report", args.results])
    return failed


if __name__ == "__main__":
    sys.exit(main())
