"""The tables of ``benchmarks/experiment.py report``, computed from the result rows only.

One JSON row per finished run (``benchmarks/experiment.py run``): per experiment, backbone and
override set, the scarcity curve (the base arm's test MSE against the labelled trajectories) and,
per (labelled, unlabelled) level, every arm's test metrics with its change against the base arm
of the same seed (paired). Rows of a stage-3 fine-tune (the papers' two stages, issue 17 item 4:
``init_from`` names the stage-1 run's key) get their own tables per stage-1 setting, where each
arm is paired with its own stage-1 run (what fine-tuning changed) and with the ``ft_base`` arm of
the same seed (the same fine-tuning without VQ or search: the fair control for "more training").
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path

# the stage-3 arm that fine-tunes without VQ or search (configs/experiments/arms/ft_base.yaml)
FT_CONTROL = "ft_base"


def shown(overrides: Sequence[str]) -> str:
    """Overrides as a table title shows them: the runner's early-stopping override
    (``--trainer.callbacks+=<EarlyStopping JSON>``) as ``EarlyStopping(patience=P)``."""
    out = []
    for o in overrides:
        head, _, spec = o.partition("+=")
        if head == "--trainer.callbacks" and spec.startswith("{"):
            cb = json.loads(spec)
            if str(cb.get("class_path", "")).endswith("EarlyStopping"):
                o = f"EarlyStopping(patience={cb.get('init_args', {}).get('patience', '?')})"
        out.append(o)
    return " ".join(out)


def load_rows(paths: Iterable[Path]) -> list[dict]:
    rows = []
    for path in paths:
        if path.is_file():
            for line in path.read_text().splitlines():
                if line.strip():
                    rows.append(json.loads(line))
    return rows


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
            out.append(f"| {arm_label(arm, rs)} | {len(rs)} | {' | '.join(cells)} | {change} | "
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


def arm_label(arm: str, rows: Sequence[dict]) -> str:
    """The arm's name in a table, marked when its runs trained on validation inputs (the
    authors' protocol, ``inputs.allow_validation_leak``): their scores are not evidence."""
    return f"{arm} (LEAKS VALIDATION)" if any(r.get("leaks_validation") for r in rows) else arm


def latest_rows(rows: list[dict]) -> list[dict]:
    """One row per key, the newest: a run redone on another machine (``machine`` differs; see
    ``experiment_facts.machine_id``) supersedes its old row, in the old row's place."""
    last = {r["key"]: r for r in rows}
    seen: set[str] = set()
    out = []
    for r in rows:
        if r["key"] not in seen:
            seen.add(r["key"])
            out.append(last[r["key"]])
    return out


def report_rows(rows: list[dict]) -> str:
    """Every table: per experiment and backbone, the scarcity curve and the arms by level; then
    the stage-3 tables of the rows with ``init_from`` (``staged_tables``)."""
    parts = []
    rows = latest_rows(rows)
    plain = [r for r in rows if not r.get("init_from")]

    def key(r: dict) -> tuple[str, str, tuple[str, ...]]:
        return r["experiment"], r.get("backbone", ""), tuple(r.get("overrides") or ())

    # rows with other overrides (a longer budget, another setting) are never pooled together
    for exp, net, extra in sorted({key(r) for r in plain}):
        group = [r for r in plain if key(r) == (exp, net, extra)]
        title = f"{exp} ({net or 'its own backbone'}{', ' + shown(extra) if extra else ''})"
        parts += [scarcity_table(group, title), arms_table(group, title)]
    parts.append(staged_tables(rows))
    return "\n\n".join(p for p in parts if p)


# ---------------------------------------------------------------------------------------------
# stage 3: fine-tunes of a stage-1 checkpoint


def _paired(ratios: Sequence[float]) -> str:
    """Mean paired change and how many pairs it improved, or "–" without pairs."""
    if not ratios:
        return "–"
    better = sum(p < 0 for p in ratios)
    return f"{statistics.fmean(ratios):+.1%} ({better}/{len(ratios)} better)"


def _mse_change(row: dict, other: dict | None) -> list[float]:
    """``row``'s test MSE relative to ``other``'s, minus 1 (empty without ``other``)."""
    if other is None:
        return []
    return [_metric(row, "mse") / _metric(other, "mse") - 1]


def _staged_line(arm: str, rs: list[dict], stage1: list[float], control: list[float]) -> str:
    cells = [_mean_sd([_metric(r, k) for r in rs if not math.isnan(_metric(r, k))])
             for k in ARM_METRICS]  # fmt: skip
    epochs = "/".join(f"{r.get('epochs', '?')}({r.get('best_epoch', '?')})" for r in rs)
    health = [_mean_sd([r["last_logged"][k] for r in rs if k in r.get("last_logged", {})])
              for k in HEALTH.values()]  # fmt: skip
    params = rs[0].get("trainable_numel")
    params = "–" if params is None else f"{params:,}"
    return (f"| {arm_label(arm, rs)} | {len(rs)} | {' | '.join(cells)} | {_paired(stage1)} | "
            f"{_paired(control)} | {epochs} | {' | '.join(health)} | {params} |")  # fmt: skip


def staged_tables(rows: list[dict]) -> str:
    """Per experiment, backbone, stage-3 overrides and stage-1 setting (arm and overrides), per
    (labelled, unlabelled) level: the stage-1 runs the fine-tunes started from, then every
    stage-3 arm with its paired test-MSE change against (a) its own stage-1 run and (b) the
    ``ft_base`` run of the same seed."""
    by_key = {r["key"]: r for r in rows}
    staged = [r for r in rows if r.get("init_from")]

    def group(r: dict) -> tuple:
        stage1 = by_key.get(r["init_from"], {})
        return (r["experiment"], r.get("backbone", ""), tuple(r.get("overrides") or ()),
                r.get("init_from_arm", stage1.get("arm", "?")),
                tuple(r.get("init_from_overrides", stage1.get("overrides") or ())))  # fmt: skip

    out = []
    for g in sorted({group(r) for r in staged}):
        exp, net, extra, arm1, extra1 = g
        rows_g = [r for r in staged if group(r) == g]
        for n, m in sorted({(r["train_samples"], r["unlabelled_samples"]) for r in rows_g}):
            level = [r for r in rows_g if (r["train_samples"], r["unlabelled_samples"]) == (n, m)]
            starts = {
                r["init_from"]: by_key[r["init_from"]] for r in level if r["init_from"] in by_key
            }
            control = {r["seed"]: r for r in level if r["arm"] == FT_CONTROL}
            head = " | ".join(f"test {k}" for k in ARM_METRICS)
            stage3 = f", stage 3 {shown(extra)}" if extra else ""
            out += [
                f"### {exp} ({net or 'its own backbone'}): stage 3 from stage 1 = {arm1}"
                f"{' ' + shown(extra1) if extra1 else ''}{stage3}: {n} labelled + {m} "
                "unlabelled trajectories",
                "",
                f"| arm | seeds | {head} | MSE vs stage 1 (paired) | MSE vs {FT_CONTROL} "
                f"(paired) | epochs (best) | {' | '.join(HEALTH)} | trainable |",
                "|---|---|" + "---|" * (len(ARM_METRICS) + len(HEALTH)) + "---|---|---|---|",
            ]
            if starts:
                out.append(_staged_line(f"stage 1: {arm1}", list(starts.values()), [], []))
            for arm in sorted({r["arm"] for r in level}, key=lambda a: (a != FT_CONTROL, a)):
                rs = [r for r in level if r["arm"] == arm]
                vs1 = [p for r in rs for p in _mse_change(r, by_key.get(r["init_from"]))]
                vs_ft = [] if arm == FT_CONTROL else [
                    p for r in rs for p in _mse_change(r, control.get(r["seed"]))
                ]  # fmt: skip
                out.append(_staged_line(arm, rs, vs1, vs_ft))
            out.append("")
    return "\n".join(out)
