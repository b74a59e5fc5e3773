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

Usage::

    # the scarcity curve: base test MSE against the number of labelled training trajectories
    python benchmarks/experiment.py run --experiment ns_scarce --arms base \\
        --train-samples 8,16,32,64,160 --seeds 0 --jobs 2
    # the arms at the scarce level, 3 paired seeds, 48 unlabelled trajectories
    python benchmarks/experiment.py run --experiment ns_scarce --arms base,vq,beamvq,ceiling \\
        --train-samples 16 --unlabelled-samples 48 --seeds 0,1,2 --jobs 2
    python benchmarks/experiment.py report                       # every table, from the results

Runs write under ``runs/experiments/<experiment>/<arm>/n<N>_u<M>/seed<S>/`` (fit.log, test.log,
checkpoints, test.json). One torch thread per run (``OMP_NUM_THREADS=1``); ``--jobs`` runs in
parallel. W&B is disabled in these runs.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs" / "experiments"
DEFAULT_RESULTS = REPO / "benchmarks" / "results" / "experiments.jsonl"
DEFAULT_RUNS = REPO / "runs" / "experiments"
BUILT_IN_ARMS = ("base", "ceiling")
SPLITS = "--data.init_args.splits"


@dataclass(frozen=True)
class Job:
    """One training of the campaign: experiment, arm, labelled / unlabelled trajectories, seed."""

    experiment: str
    arm: str
    train_samples: int
    unlabelled_samples: int
    seed: int
    overrides: tuple[str, ...] = field(default_factory=tuple)
    backbone: str = ""  # "": the experiment YAML's own; else configs/backbones/<name>.yaml

    @property
    def key(self) -> str:
        extra = hashlib.sha1(" ".join(self.overrides).encode()).hexdigest()[:8]
        tail = f"/{extra}" if self.overrides else ""
        net = f"{self.backbone}/" if self.backbone else ""
        return (
            f"{self.experiment}/{net}{self.arm}/n{self.train_samples}_u{self.unlabelled_samples}"
            f"/seed{self.seed}{tail}"
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


def config_digest(files: Iterable[Path]) -> str:
    """The configs' content hash: a result row names the exact YAML it ran."""
    h = hashlib.sha1()
    for f in files:
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


def plan(args: argparse.Namespace) -> list[Job]:
    overrides = tuple(args.override or ())
    jobs = [
        Job(args.experiment, arm, n, args.unlabelled_samples, seed, overrides, net)
        for net in args.backbones
        for n in args.train_samples
        for seed in args.seeds
        for arm in args.arms
    ]
    for job in jobs:
        for f in job.configs():
            if not f.is_file():
                raise SystemExit(f"experiment.py: {f} not found (arm {job.arm!r})")
        if job.arm == "ceiling" and job.unlabelled_samples == 0:
            raise SystemExit("experiment.py: the ceiling arm needs --unlabelled-samples > 0")
    return jobs


def load_rows(paths: Iterable[Path]) -> list[dict]:
    rows = []
    for path in paths:
        if path.is_file():
            for line in path.read_text().splitlines():
                if line.strip():
                    rows.append(json.loads(line))
    return rows


# state-dict entries that are buffers, not optimizer-trained parameters: the EMA code bank
# (vector-quantize-pytorch's _codebook), batch-norm statistics, the data's normalization and
# the module's metric constants
_BUFFER_KEYS = re.compile(
    r"(\._codebook\.|running_mean$|running_var$|num_batches_tracked$|^normalizer\.|"
    r"^lat_deg$|^climatology$)"
)


def trainable_numel(state_dict: dict) -> int:
    """Values of a checkpoint's ``state_dict`` that the optimizer trains (buffers excluded)."""
    return sum(v.numel() for k, v in state_dict.items() if not _BUFFER_KEYS.search(k))


def checkpoint_facts(ckpt_dir: Path) -> dict:
    """The best epoch, its validation loss and the model-state sizes (by top-level part) of
    ``best.ckpt``; the epochs trained come from ``metrics.csv`` (``logged_facts``), which also
    holds configs whose ``last.ckpt`` is Lightning's (rewritten only when the monitor improves)."""
    best = ckpt_dir / "best.ckpt"
    if not best.is_file():
        return {}
    state = torch.load(best, map_location="cpu", weights_only=True)
    counts: dict[str, int] = {}
    for key, value in state["state_dict"].items():
        part = key.split(".")[1] if key.count(".") >= 2 else key
        counts[part] = counts.get(part, 0) + value.numel()
    facts: dict = {
        "state_numel": counts,
        "trainable_numel": trainable_numel(state["state_dict"]),
        "best_epoch": int(state.get("epoch", -1)),
    }
    for name, cb in state.get("callbacks", {}).items():
        if name.startswith("ModelCheckpoint") and cb.get("best_model_score") is not None:
            facts["best_val_loss"] = float(cb["best_model_score"])
    return facts


def logged_facts(csv_path: Path) -> dict:
    """Epochs and steps trained, and the last value of every ``val/*``, ``augment/*`` and
    ``codebook/*`` column, from the fit's CSVLogger file."""
    if not csv_path.is_file():
        return {}
    last: dict[str, float] = {}
    epochs = steps = 0
    with csv_path.open() as fh:
        for rec in csv.DictReader(fh):
            epochs = max(epochs, int(rec["epoch"]) + 1)
            steps = max(steps, int(rec["step"]) + 1)
            for k, v in rec.items():
                if k and v not in (None, "") and k.startswith(("val/", "augment/", "codebook/")):
                    last[k] = float(v)
    return {"epochs": epochs, "steps": steps, "last_logged": last}


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


def run_job(job: Job, runs: Path) -> dict:
    """``beamvq fit`` then ``beamvq test`` (through ``beamvq.summary --json``) of one job."""
    run_dir = runs / job.key
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpts = run_dir / "checkpoints"
    common = job.cli_args(run_dir)
    fit = [sys.executable, "-m", "beamvq", "fit", *common]
    fit += ["--trainer.logger.init_args.save_dir", str(run_dir)]  # metrics.csv beside the run
    if (ckpts / "last.ckpt").is_file():
        fit += ["--ckpt_path", str(ckpts / "last.ckpt")]  # an interrupted fit continues
    fit_s = _run(fit, run_dir / "fit.log")
    test_json = run_dir / "test.json"
    test = [sys.executable, "-m", "beamvq.summary", *common, "--ckpt", str(ckpts / "best.ckpt")]
    test += ["--label", "best", "--no-logger", "--out", str(run_dir / "summary.md")]
    test += ["--json", str(test_json)]
    test_s = _run(test, run_dir / "test.log")
    metrics = json.loads(test_json.read_text())["best"]["metrics"]
    return dict(
        key=job.key,
        **asdict(job),
        labelled=job.labelled(),
        config_digest=config_digest(job.configs()),
        fit_seconds=round(fit_s, 1),
        test_seconds=round(test_s, 1),
        **checkpoint_facts(ckpts),
        **logged_facts(run_dir / "metrics.csv"),
        metrics=metrics,
        torch=torch.__version__,
        finished=time.strftime("%Y-%m-%dT%H:%M:%S"),
    )


def run_all(jobs: Sequence[Job], results: Path, runs: Path, n_jobs: int) -> int:
    done = {r["key"] for r in load_rows([results])}
    todo = [j for j in jobs if j.key not in done]
    print(f"{len(jobs)} runs planned, {len(jobs) - len(todo)} already in {results}", flush=True)
    lock, failures = threading.Lock(), []

    def one(job: Job) -> None:
        print(f"start {job.key}", flush=True)
        try:
            row = run_job(job, runs)
        except RuntimeError as exc:
            failures.append(job.key)
            print(f"FAILED {job.key}: {exc}", flush=True)
            return
        with lock:
            results.parent.mkdir(parents=True, exist_ok=True)
            with results.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
        mse = row["metrics"].get("test/mse", float("nan"))
        print(f"done  {job.key}: test/mse {mse:.5g} ({row['fit_seconds']:.0f} s fit)", flush=True)

    with ThreadPoolExecutor(max_workers=max(1, n_jobs)) as pool:
        list(pool.map(one, todo))
    return 1 if failures else 0


# ---------------------------------------------------------------------------------------------
# tables (from the result rows only)


def _mean_sd(values: Sequence[float]) -> str:
    if not values:
        return "–"
    m = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{m:.4g} ± {sd:.2g}" if len(values) > 1 else f"{m:.4g}"


def _metric(row: dict, name: str) -> float:
    return float(row["metrics"].get(f"test/{name}", math.nan))


def scarcity_table(rows: list[dict], title: str) -> str:
    """Base test MSE against the labelled trajectories (one experiment and backbone's rows)."""
    base = [r for r in rows if r["arm"] == "base" and r["unlabelled_samples"] == 0]
    levels = sorted({r["labelled"] for r in base})
    if not levels:
        return ""
    full = max(levels)
    full_mse = statistics.fmean(_metric(r, "mse") for r in base if r["labelled"] == full)
    lines = [
        f"### {title}: scarcity curve (base arm, test MSE at the best-validation checkpoint)",
        "",
        "| labelled trajectories | seeds | test MSE | vs full | epochs (best) | fit s |",
        "|---|---|---|---|---|---|",
    ]
    for n in levels:
        rs = [r for r in base if r["labelled"] == n]
        mse = [_metric(r, "mse") for r in rs]
        ratio = statistics.fmean(mse) / full_mse - 1
        epochs = "/".join(f"{r.get('epochs', '?')}({r.get('best_epoch', '?')})" for r in rs)
        secs = statistics.fmean(r["fit_seconds"] for r in rs)
        lines.append(
            f"| {n} | {len(rs)} | {_mean_sd(mse)} | {ratio:+.1%} | {epochs} | {secs:.0f} |"
        )
    return "\n".join(lines)


ARM_METRICS = ("mse", "mse_lead1", "mse_lead8", "mae", "crps", "spread_skill")
# the fit's last logged value (metrics.csv): code-bank health, the pool's share of the
# learning-rate-weighted training signal, the search's cost in training epochs
HEALTH = {
    "val perplexity": "codebook/val_perplexity",
    "dead codes": "codebook/val_dead_fraction",
    "val spread/skill": "val/spread_skill",
    "pool signal": "augment/pool_signal_share",
    "search/epoch": "augment/search_to_train",
}


def arms_table(rows: list[dict], title: str) -> str:
    """Per (train, unlabelled) level: every arm's metrics and its paired change against base."""
    out = []
    for n, m in sorted({(r["train_samples"], r["unlabelled_samples"]) for r in rows if m_ok(r)}):
        level = [r for r in rows if (r["train_samples"], r["unlabelled_samples"]) == (n, m)]
        # the base arm never reads the unlabelled trajectories (its u0 and u48 runs are the
        # same training: equal test MSE to every digit), so a u0 base run pairs too
        base = {
            r["seed"]: r
            for r in rows
            if r["arm"] == "base" and r["train_samples"] == n and r["unlabelled_samples"] == 0
        }
        base.update({r["seed"]: r for r in level if r["arm"] == "base"})  # fmt: skip
        arms = sorted({r["arm"] for r in level}, key=lambda a: (a != "base", a))
        if len(arms) < 2:
            continue
        head = " | ".join(f"test {k}" for k in ARM_METRICS)
        out += [
            f"### {title}: {n} labelled + {m} unlabelled trajectories",
            "",
            f"| arm | seeds | {head} | MSE vs base (paired) | {' | '.join(HEALTH)} | trainable |",
            "|---|---|" + "---|" * (len(ARM_METRICS) + len(HEALTH)) + "---|---|",
        ]
        for arm in arms:
            rs = [r for r in level if r["arm"] == arm]
            cells = [_mean_sd([_metric(r, k) for r in rs if not math.isnan(_metric(r, k))])
                     for k in ARM_METRICS]  # fmt: skip
            paired = [_metric(r, "mse") / _metric(base[r["seed"]], "mse") - 1
                      for r in rs if r["seed"] in base]  # fmt: skip
            change = "–" if arm == "base" or not paired else (
                f"{statistics.fmean(paired):+.1%} ({sum(p < 0 for p in paired)}/{len(paired)} better)"
            )  # fmt: skip
            health = [_mean_sd([r["last_logged"][k] for r in rs if k in r.get("last_logged", {})])
                      for k in HEALTH.values()]  # fmt: skip
            params = rs[0].get("trainable_numel")
            params = "–" if params is None else f"{params:,}"
            out.append(f"| {arm} | {len(rs)} | {' | '.join(cells)} | {change} | "
                       f"{' | '.join(health)} | {params} |")  # fmt: skip
        out.append("")
    return "\n".join(out)


def m_ok(row: dict) -> bool:
    return row["unlabelled_samples"] > 0 or row["arm"] != "base"


def report(paths: Sequence[Path]) -> str:
    rows = load_rows(paths)
    if not rows:
        return f"no results in {', '.join(map(str, paths))}"
    return report_rows(rows)


def report_rows(rows: list[dict]) -> str:
    """Every table: per experiment and backbone, the scarcity curve and the arms by level."""
    parts = []

    def key(r: dict) -> tuple[str, str, tuple[str, ...]]:
        return r["experiment"], r.get("backbone", ""), tuple(r.get("overrides") or ())

    # rows with other overrides (a longer budget, another setting) are never pooled together
    for exp, net, extra in sorted({key(r) for r in rows}):
        group = [r for r in rows if key(r) == (exp, net, extra)]
        title = f"{exp} ({net or 'its own backbone'}{', ' + ' '.join(extra) if extra else ''})"
        parts += [scarcity_table(group, title), arms_table(group, title)]
    return "\n\n".join(p for p in parts if p)


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
