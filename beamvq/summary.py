"""Compare checkpoints on the test split: a Markdown table of metrics by lead time.

``python -m beamvq.summary --config cfg.yaml --ckpt base.ckpt [--ckpt beamvq.ckpt]
[--out runs/x/summary.md] [--json runs/x/test.json] [--predict] [--no-logger]
[any beamvq CLI override ...]``

Runs ``beamvq test`` (and with ``--predict`` also ``beamvq predict``) once per checkpoint through
``beamvq.cli.main``, reads the pooled test metrics the module logs (``test/mse_lead{t}``,
``test/csi_m_lead{t}``, ``test/crps_lead{t}``, ``test/csi_{thr}``, ...; SEVIR protocol for the
contingency scores, Veillette et al. 2020), and writes ``summary.md`` with the overall metrics,
the metrics per lead time and per threshold, side by side, plus ``summary_leads.png``. With two
checkpoints the second is compared with the first (labels ``base`` and ``beamvq`` by default),
with the relative change in percent: BeamVQ (arXiv 2405.17051) claims its gains grow with lead
time, which the per-lead rows show directly. With several variables a table "By variable" shows
the per-variable metrics (``test/rmse/z500``..., pooled over lead times) and a last row pooled
over the variables in normalized units (``test/rmse_norm``...), since the overall physical-unit
metrics mix units.

Each checkpoint's run writes under ``<out dir>/<label>/`` (``--trainer.default_root_dir``), so the
callbacks' test plots of the two checkpoints do not overwrite each other; with ``--predict`` the
prediction file is moved to ``<out dir>/predictions_<label>.nc``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from beamvq import cli  # noqa: E402

log = logging.getLogger("beamvq.summary")

OVERALL = ("mse", "rmse", "mae", "rel_l2", "csi_m", "crps", "spread", "spread_skill")
BY_LEAD = ("mse", "mae", "csi_m", "crps", "spread_skill")
BY_THRESHOLD = ("csi", "pod", "sucr", "bias")
BY_VARIABLE = ("rmse", "mse", "mae", "lat_rmse", "acc", "crps")
NORMALIZED_ROW = "all (normalized)"
LABELS = {
    "mse": "MSE",
    "rmse": "RMSE",
    "mae": "MAE",
    "rel_l2": "rel. L2",
    "csi_m": "CSI-M",
    "crps": "CRPS",
    "spread": "spread",
    "spread_skill": "spread/skill",
    "csi": "CSI",
    "pod": "POD",
    "sucr": "SUCR",
    "bias": "BIAS",
    "lat_rmse": "lat. RMSE",
    "acc": "ACC",
}


class Evaluation(NamedTuple):
    """The test metrics of one checkpoint: overall, by lead time (1, 2, ...), by threshold and
    by variable (``{metric: {variable: value}}``, empty with one channel)."""

    label: str
    ckpt: str
    overall: dict[str, float]
    by_lead: dict[str, dict[int, float]]
    by_threshold: dict[str, dict[str, float]]
    by_variable: dict[str, dict[str, float]] = {}


def collect(metrics: Mapping[str, float], label: str, ckpt: str) -> Evaluation:
    """Sort ``test/*`` metric keys into overall, per-lead, per-threshold and per-variable
    (``test/{metric}/{variable}``; the ``test/{metric}_norm`` pools as the last row) values."""
    overall: dict[str, float] = {}
    by_lead: dict[str, dict[int, float]] = {}
    by_thr: dict[str, dict[str, float]] = {}
    by_var: dict[str, dict[str, float]] = {}
    lead_re = re.compile(r"^test/(.+)_lead(\d+)$")
    thr_re = re.compile(rf"^test/({'|'.join(BY_THRESHOLD)})_([-+0-9.eE]+)$")
    var_re = re.compile(rf"^test/({'|'.join(BY_VARIABLE)})/(.+)$")
    for key, value in metrics.items():
        if m := lead_re.match(key):
            by_lead.setdefault(m.group(1), {})[int(m.group(2))] = float(value)
        elif m := thr_re.match(key):
            by_thr.setdefault(m.group(1), {})[m.group(2)] = float(value)
        elif m := var_re.match(key):
            by_var.setdefault(m.group(1), {})[m.group(2)] = float(value)
        elif key.startswith("test/"):
            overall[key[len("test/") :]] = float(value)
    if by_var:
        for n in BY_VARIABLE:
            if f"{n}_norm" in overall:
                by_var.setdefault(n, {})[NORMALIZED_ROW] = overall[f"{n}_norm"]
    return Evaluation(label, ckpt, overall, by_lead, by_thr, by_var)


def _fmt(v: float | None) -> str:
    return "–" if v is None or math.isnan(v) else f"{v:.4g}"


def _change(base: float | None, new: float | None) -> str:
    if base is None or new is None or math.isnan(base) or math.isnan(new) or base == 0:
        return "–"
    return f"{100 * (new - base) / abs(base):+.1f}%"


def _columns(evals: Sequence[Evaluation], name: str) -> list[str]:
    head = [f"{LABELS.get(name, name)} {e.label}" for e in evals]
    return head + (["Δ"] if len(evals) == 2 else [])


def _cells(evals: Sequence[Evaluation], values: list[float | None]) -> list[str]:
    out = [_fmt(v) for v in values]
    return out + ([_change(values[0], values[1])] if len(evals) == 2 else [])


def markdown(evals: Sequence[Evaluation], plot: str | None = None) -> str:
    """The Markdown report of one or two evaluations (Δ: change of the second vs the first)."""
    if not 1 <= len(evals) <= 2:
        raise ValueError(f"markdown: one or two evaluations, got {len(evals)}")
    lines = _header(evals) + _overall(evals) + _by_lead(evals) + _by_threshold(evals)
    lines += _by_variable(evals)
    if plot:
        lines += ["", f"![metrics by lead time]({plot})"]
    return "\n".join(lines) + "\n"


def _header(evals: Sequence[Evaluation]) -> list[str]:
    pair = len(evals) == 2
    return [
        "# beamvq test summary",
        "",
        *(f"- **{e.label}**: `{e.ckpt}`" for e in evals),
        "",
        "Metrics pooled over the whole test split, in physical units. Lower is better for "
        "MSE/RMSE/MAE/rel. L2/CRPS, higher for CSI/POD/SUCR; 1 is ideal for BIAS and spread/skill."
        + (" Δ: relative change of the second checkpoint vs the first." if pair else ""),
    ]


def _overall(evals: Sequence[Evaluation]) -> list[str]:
    pair = len(evals) == 2
    lines = [
        "",
        "## Overall",
        "",
        "| metric | " + " | ".join(e.label for e in evals) + (" | Δ |" if pair else " |"),
        "|---|" + "---:|" * (len(evals) + pair),
    ]
    for n in (n for n in OVERALL if any(n in e.overall for e in evals)):
        cells = _cells(evals, [e.overall.get(n) for e in evals])
        lines.append(f"| {LABELS.get(n, n)} | " + " | ".join(cells) + " |")
    return lines


def _table(
    evals: Sequence[Evaluation], names: list[str], rows: list[tuple[str, Callable]], first: str
) -> list[str]:
    """Rows of ``name × evaluation`` cells; ``rows``: (label, value of (evaluation, name))."""
    head = [c for n in names for c in _columns(evals, n)]
    lines = [f"| {first} | " + " | ".join(head) + " |", "|---:|" + "---:|" * len(head)]
    for label, value in rows:
        cells = [c for n in names for c in _cells(evals, [value(e, n) for e in evals])]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def _by_lead(evals: Sequence[Evaluation]) -> list[str]:
    names = [n for n in BY_LEAD if any(n in e.by_lead for e in evals)]
    names += sorted({n for e in evals for n in e.by_lead} - set(BY_LEAD))
    leads = sorted({t for e in evals for s in e.by_lead.values() for t in s})
    if not leads:
        return []
    rows = [(f"+{t}", lambda e, n, t=t: e.by_lead.get(n, {}).get(t)) for t in leads]
    return ["", "## By lead time", "", *_table(evals, names, rows, "lead")]


def _by_threshold(evals: Sequence[Evaluation]) -> list[str]:
    names = [n for n in BY_THRESHOLD if any(n in e.by_threshold for e in evals)]
    thresholds = sorted({t for e in evals for s in e.by_threshold.values() for t in s}, key=float)
    if not thresholds:
        return []
    rows = [(thr, lambda e, n, thr=thr: e.by_threshold.get(n, {}).get(thr)) for thr in thresholds]
    title = "## By threshold (pooled over lead times)"
    return ["", title, "", *_table(evals, names, rows, "threshold")]


def _by_variable(evals: Sequence[Evaluation]) -> list[str]:
    names = [n for n in BY_VARIABLE if any(n in e.by_variable for e in evals)]
    seen = [v for e in evals for s in e.by_variable.values() for v in s]
    variables = [v for v in dict.fromkeys(seen) if v != NORMALIZED_ROW]
    if not variables:
        return []
    if NORMALIZED_ROW in seen:
        variables.append(NORMALIZED_ROW)
    rows = [(v, lambda e, n, v=v: e.by_variable.get(n, {}).get(v)) for v in variables]
    title = "## By variable (pooled over lead times)"
    note = (
        "Physical units per variable; the overall MSE/RMSE/MAE/CRPS above pool the variables in "
        f"their own units. **{NORMALIZED_ROW}**: pooled over the variables with each one's "
        "errors divided by its training std (`test/mse_norm`...)."
    )
    return ["", title, "", note, "", *_table(evals, names, rows, "variable")]


def lead_plot(evals: Sequence[Evaluation], path: Path) -> Path | None:
    """Per-lead metrics of every evaluation, one panel per metric; ``None`` when there are none."""
    names = [n for n in BY_LEAD if any(n in e.by_lead for e in evals)]
    if not names:
        return None
    fig, axes = plt.subplots(
        1, len(names), figsize=(4.0 * len(names), 3.3), squeeze=False, layout="constrained"
    )
    for ax, n in zip(axes[0], names):
        for e in evals:
            series = e.by_lead.get(n, {})
            leads = sorted(series)
            ax.plot(leads, [series[t] for t in leads], "o-", ms=3, label=e.label)
        ax.set_title(f"{LABELS.get(n, n)} by lead time")
        ax.set_xlabel("lead time (steps)")
        ax.grid(alpha=0.3)
        if n == "spread_skill":
            ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle("test metrics by lead time")
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return path


def _labels(ckpts: Sequence[str], labels: Sequence[str] | None) -> list[str]:
    if labels:
        if len(labels) != len(ckpts):
            raise ValueError(f"--label given {len(labels)} times for {len(ckpts)} --ckpt")
        out = list(labels)
    elif len(ckpts) == 2:
        out = ["base", "beamvq"]
    else:
        out = [Path(ckpts[0]).stem or "model"]
    if len(set(out)) != len(out):
        raise ValueError(f"--label values must differ, got {out}")
    return [re.sub(r"[^A-Za-z0-9_.-]+", "_", s) for s in out]


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="python -m beamvq.summary",
        description="Test one or two checkpoints and write a Markdown table of metrics by lead "
        "time. Arguments it does not know are passed to every beamvq command.",
    )
    parser.add_argument("--config", action="append", required=True, help="beamvq YAML (repeatable)")
    parser.add_argument("--ckpt", action="append", required=True, help="checkpoint (once or twice)")
    parser.add_argument("--label", action="append", help="name of each checkpoint in the table")
    parser.add_argument("--out", help="Markdown file (default: <default_root_dir>/summary.md)")
    parser.add_argument("--predict", action="store_true", help="also run predict per checkpoint")
    parser.add_argument(
        "--json", help="also write every test/* metric of each checkpoint to this JSON file"
    )
    parser.add_argument(
        "--no-logger", action="store_true", help="no experiment logger for these runs"
    )
    args, extra = parser.parse_known_args(list(argv))
    if not 1 <= len(args.ckpt) <= 2:
        parser.error(f"--ckpt: give one or two checkpoints, got {len(args.ckpt)}")
    for path in [*args.config, *args.ckpt]:
        if not Path(path).is_file():
            parser.error(f"file not found: {path}")
    return args, extra


def main(argv: Sequence[str] | None = None) -> Path:
    """Run the comparison; returns the path of the Markdown file."""
    args, extra = parse_args(sys.argv[1:] if argv is None else argv)
    labels = _labels(args.ckpt, args.label)
    configs = [a for c in args.config for a in ("--config", c)]
    common = configs + (["--trainer.logger", "false"] if args.no_logger else [])
    out = Path(args.out) if args.out else None
    evals, raw = [], []
    for ckpt, label in zip(args.ckpt, labels):
        root = ["--trainer.default_root_dir", str(out.parent / label)] if out else []
        run = _run_cli(["test", *common, *root, *extra, "--ckpt_path", ckpt])
        out = out or Path(run.trainer.default_root_dir) / "summary.md"
        metrics = {k: float(v) for k, v in run.trainer.callback_metrics.items()}
        if not any(k.startswith("test/") for k in metrics):
            raise RuntimeError(f"beamvq test logged no test/* metrics for {ckpt}")
        evals.append(collect(metrics, label, ckpt))
        raw.append(metrics)
        if args.predict:
            pred = _run_cli(["predict", *common, *root, *extra, "--ckpt_path", ckpt])
            _move_predictions(pred.trainer, out.parent / f"predictions_{label}.nc")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plot = lead_plot(evals, out.with_name(f"{out.stem}_leads.png"))
    out.write_text(markdown(evals, plot.name if plot else None))
    log.info("wrote %s", out)
    if args.json:
        write_json(evals, raw, Path(args.json))
    return out


def write_json(evals: Sequence[Evaluation], raw: Sequence[Mapping[str, float]], path: Path) -> None:
    """``{label: {"ckpt": path, "metrics": {"test/...": value}}}``, written atomically."""
    data = {
        ev.label: {
            "ckpt": ev.ckpt,
            "metrics": {k: m[k] for k in sorted(m) if k.startswith("test/")},
        }
        for ev, m in zip(evals, raw)
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, allow_nan=True))
    tmp.replace(path)
    log.info("wrote %s", path)


def _run_cli(args: list[str]) -> cli.BeamVQCLI:
    """``beamvq <args>`` through ``beamvq.cli.main``, with ``sys.argv`` set to that command (so
    the prediction file's ``history`` names the command that produced it)."""
    argv = sys.argv
    sys.argv = [argv[0], *args]
    try:
        with warnings.catch_warnings():
            # cli.main passes sys.argv[1:] on as args, which LightningCLI warns about
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
            return cli.main()
    finally:
        sys.argv = argv


def _move_predictions(trainer: object, dest: Path) -> None:
    """Move the file the prediction writer wrote (``output`` of a callback that has one)."""
    for cb in getattr(trainer, "callbacks", []):
        output = getattr(cb, "output", None)
        if isinstance(output, str) and Path(output).is_file():
            dest.parent.mkdir(parents=True, exist_ok=True)
            Path(output).replace(dest)
            log.info("predictions of this checkpoint: %s", dest)
            return
    log.warning("--predict: no prediction file found (is a NetCDFPredictionWriter configured?)")


if __name__ == "__main__":
    main()
