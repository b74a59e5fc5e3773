"""The fair protocol of BeamVQ's evidence (issue 17), run through the product's CLI only.

Every training is ``beamvq fit`` with a shipped experiment YAML (``configs/experiments/<name>.yaml``,
the base arm) plus one arm file (``configs/experiments/arms/<arm>.yaml``) and command-line
overrides; every figure is a ``test/*`` metric that ``beamvq test`` logs, read through
``python -m beamvq.summary --json`` on the best-validation checkpoint. This script evaluates
nothing itself: it plans runs, launches those two commands as a user would, and appends one JSON
line per finished run to ``--results`` (so an interrupted campaign resumes where it stopped: a
finished run is skipped, an interrupted fit continues from its ``last.ckpt``).

Arms (``--arms``):

- ``base``: the experiment YAML alone (the backbone, MSE loss);
- ``ceiling``: the base with the unlabelled trajectories' true futures, i.e. ``train_samples``
  N + M labelled: what BeamVQ could at best recover from those M inputs;
- any other name: ``configs/experiments/arms/<name>.yaml`` composed after the experiment YAML
  (``vq``: the bottleneck and candidate loss only; ``beamvq``: + the search; ...).

Two stages, as the papers run them (issue 17 item 4; ``--init-from-arm``): stage 1 trains the
``--init-from-arm`` arm (with the ``--init-from-override`` arguments, e.g. a longer budget, and
optionally ``--init-from-early-stopping P``: ``EarlyStopping(monitor=val/loss, patience=P)``
added to its callbacks) to its best-validation checkpoint; every planned run is then a stage-3
fine-tune that starts from the stage-1 run of the same experiment, backbone, labelled
trajectories and seed (0 unlabelled for a base stage 1) through ``--model.init_from`` (the
``ft_*`` arms: ``ft_base`` fine-tunes without VQ or search, the control). A stage-1 run whose row
or checkpoint is missing runs first (into its own folder; no second row when its row exists).
A stage-3 key ends in ``/from-<hash of the stage-1 key>``; its row records ``init_from`` (the
stage-1 key), ``init_from_arm`` and ``init_from_overrides``. ``--override`` applies to stage 3.

Usage::

    # the scarcity curve: base test MSE against the number of labelled training trajectories
    python benchmarks/experiment.py run --experiment ns_scarce --arms base \\
        --train-samples 8,16,32,64,160 --seeds 0 --jobs 2
    # the arms at the scarce level, 3 paired seeds, 48 unlabelled trajectories
    python benchmarks/experiment.py run --experiment ns_scarce --arms base,vq,beamvq,ceiling \\
        --train-samples 16 --unlabelled-samples 48 --seeds 0,1,2 --jobs 2
    # stage 3 from an 80-epoch base: the fine-tuning arms, paired with ft_base
    python benchmarks/experiment.py run --arms ft_base,ft_vq,ft_beamvq --train-samples 8 \\
        --unlabelled-samples 48 --init-from-arm base --init-from-override=--trainer.max_epochs=80
    python benchmarks/experiment.py report                       # every table, from the results

Runs write under ``runs/experiments/<experiment>/<arm>/n<N>_u<M>/seed<S>/`` (fit.log, test.log,
checkpoints, test.json). One torch thread per run (``OMP_NUM_THREADS=1``); ``--jobs`` runs in
parallel. W&B is disabled in these runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from experiment_facts import (
    best_checkpoint,
    checkpoint_facts,
    leaks_validation,
    logged_facts,
    machine_id,
    trainable_numel,
)
from experiment_report import load_rows, report, report_rows

__all__ = ["Job", "load_rows", "plan", "report", "report_rows", "run_all", "trainable_numel"]

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs" / "experiments"
DEFAULT_RESULTS = REPO / "benchmarks" / "results" / "experiments.jsonl"
DEFAULT_RUNS = REPO / "runs" / "experiments"
BUILT_IN_ARMS = ("base", "ceiling")
SPLITS = "--data.init_args.splits"
CHECKPOINTS = "checkpoints"  # the ModelCheckpoint's folder in a run directory


def _digest(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:8]


@dataclass(frozen=True)
class Job:
    """One training of the campaign: experiment, arm, labelled / unlabelled trajectories, seed;
    ``init_from``: the stage-1 job whose best checkpoint this (stage-3) fit starts from."""

    experiment: str
    arm: str
    train_samples: int
    unlabelled_samples: int
    seed: int
    overrides: tuple[str, ...] = field(default_factory=tuple)
    backbone: str = ""  # "": the experiment YAML's own; else configs/backbones/<name>.yaml
    init_from: Job | None = None

    @property
    def key(self) -> str:
        tail = f"/{_digest(' '.join(self.overrides))}" if self.overrides else ""
        stage = f"/from-{_digest(self.init_from.key)}" if self.init_from is not None else ""
        net = f"{self.backbone}/" if self.backbone else ""
        return (
            f"{self.experiment}/{net}{self.arm}/n{self.train_samples}_u{self.unlabelled_samples}"
            f"/seed{self.seed}{tail}{stage}"
        )

    def configs(self) -> list[Path]:
        files = [CONFIGS / f"{self.experiment}.yaml"]
        if self.backbone:
            files.append(REPO / "configs" / "backbones" / f"{self.backbone}.yaml")
        if self.arm not in BUILT_IN_ARMS:
            files.append(CONFIGS / "arms" / f"{self.arm}.yaml")
        return files

    def labelled(self) -> int:
        """Labelled trajectories: the ceiling arm labels the unlabelled ones too."""
        return self.train_samples + (self.unlabelled_samples if self.arm == "ceiling" else 0)

    def cli_args(self, run_dir: Path) -> list[str]:
        """The configs and overrides shared by this run's ``fit`` and ``test``."""
        args = [a for f in self.configs() for a in ("--config", str(f))]
        args += ["--seed_everything", str(self.seed), "--trainer.default_root_dir", str(run_dir)]
        args += [f"{SPLITS}.train_samples", str(self.labelled())]
        unlabelled = 0 if self.arm == "ceiling" else self.unlabelled_samples
        args += [f"{SPLITS}.unlabelled_samples", str(unlabelled)]
        if self.backbone:  # the backbone YAML's frames are the quickstart's: the experiment's
            windows = yaml.safe_load(self.configs()[0].read_text())["data"]["init_args"]["windows"]
            for name in ("in_steps", "out_steps"):
                args += [f"--model.backbone.init_args.{name}", str(windows[name])]
        return args + list(self.overrides)

    def record(self) -> dict:
        """The job as its result row records it (a stage-1 job by its key and overrides)."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        fields["overrides"] = list(self.overrides)
        stage1 = fields.pop("init_from")
        if stage1 is not None:
            fields.update(init_from=stage1.key, init_from_arm=stage1.arm,
                          init_from_overrides=list(stage1.overrides))  # fmt: skip
        return fields


def config_digest(files: Iterable[Path]) -> str:
    """The configs' content hash: a result row names the exact YAML it ran."""
    h = hashlib.sha1()
    for f in files:
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


def early_stopping_override(patience: int) -> str:
    """The beamvq CLI argument that adds ``EarlyStopping(monitor=val/loss, patience)`` to the
    experiment's callbacks (jsonargparse's ``+=`` appends to the YAML's list)."""
    spec = {"class_path": "pytorch_lightning.callbacks.EarlyStopping",
            "init_args": {"monitor": "val/loss", "mode": "min", "patience": patience}}  # fmt: skip
    return f"--trainer.callbacks+={json.dumps(spec)}"


def stage1_overrides(args: argparse.Namespace) -> tuple[str, ...]:
    """The stage-1 run's overrides: ``--init-from-override`` and the early-stopping one."""
    extra = list(getattr(args, "init_from_override", None) or ())
    patience = getattr(args, "init_from_early_stopping", None)
    if patience is not None:
        if patience < 1:
            raise SystemExit(
                f"experiment.py: --init-from-early-stopping must be >= 1, got {patience}"
            )
        extra.append(early_stopping_override(patience))
    if extra and not getattr(args, "init_from_arm", None):
        raise SystemExit(
            "experiment.py: --init-from-override and --init-from-early-stopping set the stage-1 "
            "run of --init-from-arm; give --init-from-arm too"
        )
    return tuple(extra)


def _check(job: Job) -> None:
    for f in job.configs():
        if not f.is_file():
            raise SystemExit(f"experiment.py: {f} not found (arm {job.arm!r})")
    if job.arm == "ceiling" and job.unlabelled_samples == 0:
        raise SystemExit("experiment.py: the ceiling arm needs --unlabelled-samples > 0")


def plan(args: argparse.Namespace) -> list[Job]:
    overrides, first = tuple(args.override or ()), stage1_overrides(args)
    arm1 = getattr(args, "init_from_arm", None)

    def stage1(n: int, seed: int, net: str) -> Job | None:
        if not arm1:
            return None
        m = 0 if arm1 == "base" else args.unlabelled_samples  # the base never reads them
        return Job(args.experiment, arm1, n, m, seed, first, net)

    jobs = [
        Job(
            args.experiment,
            arm,
            n,
            args.unlabelled_samples,
            seed,
            overrides,
            net,
            stage1(n, seed, net),
        )  # fmt: skip
        for net in args.backbones
        for n in args.train_samples
        for seed in args.seeds
        for arm in args.arms
    ]
    for job in jobs:
        _check(job)
        if job.init_from is not None:
            _check(job.init_from)
    return jobs


def _run(cmd: list[str], log: Path) -> float:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", WANDB_MODE="disabled")
    start = time.perf_counter()
    with log.open("a") as fh:
        fh.write(f"$ {' '.join(cmd)}\n")
        fh.flush()
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"exit {proc.returncode}: {' '.join(cmd[:3])} ... (see {log})")
    return time.perf_counter() - start


def stage1_checkpoint(job: Job, runs: Path) -> Path | None:
    """The best-validation checkpoint of ``job``'s stage-1 run under ``runs`` (None: absent)."""
    assert job.init_from is not None
    return best_checkpoint(runs / job.init_from.key / CHECKPOINTS)


def run_job(job: Job, runs: Path) -> dict:
    """``beamvq fit`` then ``beamvq test`` (through ``beamvq.summary --json``) of one job."""
    run_dir = runs / job.key
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpts = run_dir / CHECKPOINTS
    common = job.cli_args(run_dir)
    fit = [sys.executable, "-m", "beamvq", "fit", *common]
    fit += ["--trainer.logger.init_args.save_dir", str(run_dir)]  # metrics.csv beside the run
    if job.init_from is not None:  # stage 3: the stage-1 run's weights (run_all ran it first)
        start = stage1_checkpoint(job, runs)
        if start is None:
            raise RuntimeError(f"no best checkpoint in {runs / job.init_from.key / CHECKPOINTS}")
        fit += ["--model.init_from", str(start)]
    if (ckpts / "last.ckpt").is_file():
        fit += ["--ckpt_path", str(ckpts / "last.ckpt")]  # an interrupted fit continues
    fit_s = _run(fit, run_dir / "fit.log")
    best = best_checkpoint(ckpts)
    if best is None:
        raise RuntimeError(f"the fit wrote no best checkpoint into {ckpts} (see {run_dir}/fit.log)")
    test_json = run_dir / "test.json"
    test = [sys.executable, "-m", "beamvq.summary", *common, "--ckpt", str(best)]
    test += ["--label", "best", "--no-logger", "--out", str(run_dir / "summary.md")]
    test += ["--json", str(test_json)]
    test_s = _run(test, run_dir / "test.log")
    metrics = json.loads(test_json.read_text())["best"]["metrics"]
    return dict(
        key=job.key,
        **job.record(),
        labelled=job.labelled(),
        config_digest=config_digest(job.configs()),
        fit_seconds=round(fit_s, 1),
        test_seconds=round(test_s, 1),
        **checkpoint_facts(ckpts),
        **logged_facts(run_dir / "metrics.csv"),
        metrics=metrics,
        torch=torch.__version__,
        machine=machine_id(),
        leaks_validation=leaks_validation(job.configs()),
        finished=time.strftime("%Y-%m-%dT%H:%M:%S"),
    )


def stage1_needed(todo: Sequence[Job], done: dict[str, dict], runs: Path) -> list[Job]:
    """The stage-1 jobs of ``todo``'s fine-tunes that must run first: no row, or no best
    checkpoint in their run folder (a row whose folder is gone: rerun, no second row)."""
    needed: dict[str, Job] = {}
    for job in todo:
        s1 = job.init_from
        if s1 is not None and s1.key not in needed:
            if s1.key not in done or stage1_checkpoint(job, runs) is None:
                needed[s1.key] = s1
    return list(needed.values())


def run_all(jobs: Sequence[Job], results: Path, runs: Path, n_jobs: int) -> int:
    done = {r["key"]: r for r in load_rows([results])}
    todo = [j for j in jobs if j.key not in done]
    print(f"{len(jobs)} runs planned, {len(jobs) - len(todo)} already in {results}", flush=True)
    first = stage1_needed(todo, done, runs)
    lock, failures = threading.Lock(), []

    def one(job: Job) -> None:
        print(f"start {job.key}", flush=True)
        try:
            row = run_job(job, runs)
        except RuntimeError as exc:
            failures.append(job.key)
            print(f"FAILED {job.key}: {exc}", flush=True)
            return
        mse = row["metrics"].get("test/mse", float("nan"))
        if job.key in done and done[job.key].get("machine") == row.get("machine"):
            # a stage-1 run redone for its checkpoint on the same machine: its row stays
            old = done[job.key]["metrics"].get("test/mse", float("nan"))
            print(f"redone {job.key}: test/mse {mse:.5g} (its row kept: {old:.5g})", flush=True)
            return
        if job.key in done:  # redone on another machine: its own row, the newest counts
            old = done[job.key]["metrics"].get("test/mse", float("nan"))
            row["redone"] = True
            print(f"redone {job.key} on another machine: test/mse {mse:.5g} (was {old:.5g}); "
                  "its row is appended and supersedes the old one in the report", flush=True)  # fmt: skip
        with lock:
            results.parent.mkdir(parents=True, exist_ok=True)
            with results.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
        print(f"done  {job.key}: test/mse {mse:.5g} ({row['fit_seconds']:.0f} s fit)", flush=True)

    def phase(batch: Sequence[Job]) -> None:
        with ThreadPoolExecutor(max_workers=max(1, n_jobs)) as pool:
            list(pool.map(one, batch))

    if first:
        print(f"stage 1 first: {len(first)} runs ({', '.join(j.key for j in first)})", flush=True)
        phase(first)
    failed_first, rest = set(failures), []
    for job in todo:
        if job.init_from is not None and job.init_from.key in failed_first:
            failures.append(job.key)
            print(f"SKIPPED {job.key}: its stage-1 run {job.init_from.key} failed", flush=True)
        elif job not in first:
            rest.append(job)
    phase(rest)
    return 1 if failures else 0


def _ints(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t.strip()]


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python benchmarks/experiment.py", description=__doc__.split("\n")[0]
    )
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run the planned trainings (skips finished ones)")
    r.add_argument("--experiment", default="ns_scarce", help="configs/experiments/<name>.yaml")
    r.add_argument("--arms", default="base", type=lambda s: s.split(","))
    r.add_argument(
        "--backbones",
        default=[""],
        type=lambda s: s.split(","),
        help="configs/backbones/<name>.yaml to compose (default: the experiment's)",
    )
    r.add_argument("--train-samples", default=[16], type=_ints, help="labelled trajectories")
    r.add_argument("--unlabelled-samples", default=0, type=int, help="input-only trajectories")
    r.add_argument("--seeds", default=[0], type=_ints)
    r.add_argument("--override", action="append", help="one more beamvq CLI argument (repeat)")
    r.add_argument(
        "--init-from-arm",
        help="stage 3: fine-tune every run from this arm's best-validation checkpoint (its run "
        "of the same experiment, backbone, labelled trajectories and seed; 0 unlabelled for "
        "base), which runs first when its row or checkpoint is missing",
    )
    r.add_argument(
        "--init-from-override",
        action="append",
        help="one more beamvq CLI argument of the stage-1 run (repeat; part of its key)",
    )
    r.add_argument(
        "--init-from-early-stopping",
        type=int,
        metavar="P",
        help="stage 1 stops when val/loss has not improved for P epochs (EarlyStopping)",
    )
    r.add_argument("--jobs", default=1, type=int, help="runs in parallel (one thread each)")
    r.add_argument("--results", default=DEFAULT_RESULTS, type=Path)
    r.add_argument("--runs", default=DEFAULT_RUNS, type=Path)
    t = sub.add_parser("report", help="print every table from the results")
    t.add_argument("results", nargs="*", type=Path, default=[DEFAULT_RESULTS])
    return p.parse_args(list(argv))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.command == "report":
        print(report(args.results))
        return 0
    return run_all(plan(args), args.results, args.runs, args.jobs)


if __name__ == "__main__":
    sys.exit(main())
