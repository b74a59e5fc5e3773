"""Mixture-of-experts vs dense MLP blocks at equal active parameters, through the ``beamvq`` CLI.

For each backbone (FourCastNet, Earthformer) and seed, two arms train on the same generated
Navier-Stokes file with the same protocol:

- **dense**: ``configs/quickstart.yaml`` + ``configs/backbones/<name>.yaml``;
- **moe**: ``configs/quickstart.yaml`` + ``configs/moe/<name>.yaml`` (the same backbone with
  Hunyuan-Large's shared + top-1 specialized experts, ``beamvq/nn/moe.py``): equal active
  parameters (the dense block's, plus ``dim·(N+1)`` for the router and one bias).

Each arm runs ``beamvq fit`` (overrides: the data file, grid, epochs, batches, seed, no logger,
one ``ModelCheckpoint`` and no other callback, so BeamVQ's search does not enter the timing)
and then ``beamvq test --ckpt_path <best>``; the quality figure is the product's own
``test/mse`` (and ``test/rel_l2``) from ``trainer.callback_metrics``. Speed is the median
time of one training batch (forward, backward, optimizer step: Lightning's ``SimpleProfiler``,
``run_training_batch``, first batch left out), after an untimed warm-up fit of both arms,
measured side by side, so the table prints MoE/dense **ratios** only. Parameters: total and active (per token).

Note: until the forecast module calls the backbone hooks (``extra_loss``, ``training_log_values``
and ``beamvq.nn.moe.param_groups``; see docs/systems.md), the MoE arm trains without its
load-balancing loss and with one learning rate; the table says which was the case (``module
wired``: the module read the routing statistics every step). Unread, the statistics of the
whole fit (recycled and dropped token shares) are printed from the backbone.

Usage: ``python benchmarks/moe.py [--quick] [--seeds 0,1,2] [--backbones fourcastnet,earthformer]
[--epochs 6] [--batches 16] [--threads 1]``. ``--quick`` (FourCastNet, one seed, 8 generated
trajectories at 32x32: 3 epochs of 4 batches of 8, about 30 s on one CPU thread) is the check CI can afford; raw rows are
appended to ``benchmarks/results/moe.jsonl`` (``moe_quick.jsonl`` for ``--quick``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
RESULTS = ROOT / "benchmarks" / "results"


@dataclass(frozen=True)
class Protocol:
    """What both arms share."""

    grid: int = 32
    trajectories: int = 16
    frames: int = 16
    epochs: int = 6
    batches: int = 16
    batch_size: int = 8


QUICK = Protocol(grid=32, trajectories=8, frames=14, epochs=3, batches=10, batch_size=8)


def arm_config(backbone: str, arm: str) -> Path:
    """The shipped YAML of an arm."""
    if arm == "dense":
        return ROOT / "configs" / "backbones" / f"{backbone}.yaml"
    return ROOT / "configs" / "moe" / f"{backbone}.yaml"


def common_args(p: Protocol, data: Path, backbone_cfg: Path, seed: int) -> list[str]:
    gen = "--data.init_args.generator.init_args"
    return [
        "--config", str(QUICKSTART),
        "--config", str(backbone_cfg),
        "--seed_everything", str(seed),
        "--trainer.logger", "false",
        "--trainer.enable_progress_bar", "false",
        "--data.init_args.path", str(data),
        "--data.init_args.loader.batch_size", str(p.batch_size),
        f"{gen}.n_trajectories", str(p.trajectories),
        f"{gen}.resolution", str(p.grid),
        f"{gen}.n_frames", str(p.frames),
        "--model.backbone.init_args.height", str(p.grid),
        "--model.backbone.init_args.width", str(p.grid),
    ]  # fmt: skip


def active_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(total, active per token) trainable parameters: only one specialized expert is active."""
    from beamvq.nn.moe import moe_layers

    total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    inactive = 0
    for layer in moe_layers(model):
        per_expert = sum(p.numel() for p in layer.experts[0].parameters())
        inactive += per_expert * (layer.num_experts - 1)
    return total, total - inactive


def run_arm(p: Protocol, data: Path, backbone: str, arm: str, seed: int, work: Path) -> dict:
    from beamvq.cli import main
    from beamvq.nn.moe import pop_stats

    run_dir = work / f"{backbone}_{arm}_{seed}"
    ckpt_dir = run_dir / "checkpoints"
    callbacks = json.dumps([
        {
            "class_path": "pytorch_lightning.callbacks.ModelCheckpoint",
            "init_args": {"dirpath": str(ckpt_dir), "monitor": "val/loss", "save_top_k": 1},
        },
    ])  # fmt: skip
    profiler = json.dumps({
        "class_path": "pytorch_lightning.profilers.SimpleProfiler",
        "init_args": {"dirpath": str(run_dir), "filename": "profile"},
    })  # fmt: skip
    args = common_args(p, data, arm_config(backbone, arm), seed)
    fit = main([
        "fit", *args,
        "--trainer.default_root_dir", str(run_dir),
        "--trainer.max_epochs", str(p.epochs),
        "--trainer.limit_train_batches", str(p.batches),
        "--trainer.limit_val_batches", "1",
        "--trainer.num_sanity_val_steps", "0",
        f"--trainer.callbacks={callbacks}",
        f"--trainer.profiler={profiler}",
    ])  # fmt: skip
    # forward + backward + optimizer step of each batch, as Lightning's profiler records it;
    # the median over the fit's batches after the first
    durations = fit.trainer.profiler.recorded_durations["run_training_batch"]
    step_seconds = statistics.median(durations[1:] or durations)
    steps = int(fit.trainer.global_step)
    backbone_module = fit.model.model.backbone
    total, active = active_parameters(backbone_module)
    # Routing statistics the module did not read: all of them when it does not call the
    # backbone's training hooks (before the merge), none when it logs them every step.
    stats = pop_stats(backbone_module)
    best = fit.trainer.checkpoint_callback.best_model_path
    test = main([
        "test", *args, "--trainer.default_root_dir", str(run_dir), "--ckpt_path", best,
        "--trainer.callbacks=[]",
    ])  # fmt: skip
    metrics = {
        k: float(v) for k, v in test.trainer.callback_metrics.items() if k.startswith("test/")
    }
    return {
        "backbone": backbone,
        "arm": arm,
        "seed": seed,
        "protocol": p.__dict__,
        "params": total,
        "active_params": active,
        "steps": steps,
        "seconds_per_step": step_seconds,
        "test_mse": metrics["test/mse"],
        "test_rel_l2": metrics.get("test/rel_l2"),
        "module_wired": arm == "dense" or stats is None,
        "expert_share": None if stats is None else [float(v) for v in stats.expert_share],
        "recycled": None if stats is None else float(stats.recycled),
        "dropped": None if stats is None else float(stats.dropped),
    }


def _share(value: float | None) -> str:
    return "logged" if value is None else f"{100 * value:.1f}%"


def table(rows: list[dict]) -> str:
    """MoE/dense ratios per backbone (means over seeds), Markdown."""
    lines = [
        "| backbone | params dense / moe (active) | test MSE dense | test MSE moe | MSE ratio "
        "| s/step ratio | recycled | dropped | module wired |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for backbone in sorted({r["backbone"] for r in rows}):
        arms = {a: [r for r in rows if r["backbone"] == backbone and r["arm"] == a] for a in
                ("dense", "moe")}  # fmt: skip
        if not arms["dense"] or not arms["moe"]:
            continue
        mse = {a: statistics.mean(r["test_mse"] for r in v) for a, v in arms.items()}
        speed = {a: statistics.mean(r["seconds_per_step"] for r in v) for a, v in arms.items()}
        d, m = arms["dense"][0], arms["moe"][0]
        lines.append(
            f"| {backbone} | {d['params']:,} / {m['params']:,} ({m['active_params']:,}) "
            f"| {mse['dense']:.4g} | {mse['moe']:.4g} | {mse['moe'] / mse['dense']:.3f} "
            f"| {speed['moe'] / speed['dense']:.3f} | {_share(m['recycled'])} "
            f"| {_share(m['dropped'])} | {m['module_wired']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="FourCastNet, 1 seed, tiny run")
    parser.add_argument("--backbones", default="fourcastnet,earthformer")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=Protocol.epochs)
    parser.add_argument("--batches", type=int, default=Protocol.batches)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("WANDB_MODE", "disabled")
    if args.quick:
        protocol, backbones, seeds = QUICK, ["fourcastnet"], [0]
    else:
        protocol = Protocol(epochs=args.epochs, batches=args.batches)
        backbones = args.backbones.split(",")
        seeds = [int(s) for s in args.seeds.split(",")]
    from beamvq.datamodules.synthetic import write_navier_stokes

    rows: list[dict[str, Any]] = []
    out = RESULTS / ("moe_quick.jsonl" if args.quick else "moe.jsonl")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = write_navier_stokes(
            work / "ns.nc",
            n_trajectories=protocol.trajectories,
            resolution=protocol.grid,
            n_frames=protocol.frames,
        )
        cwd = Path.cwd()
        os.chdir(work)  # whatever the configs write to relative paths stays in the temp dir
        try:
            for backbone in backbones:
                warm = replace(protocol, epochs=1, batches=2)
                for arm in ("dense", "moe"):  # untimed: first-call costs of both code paths
                    run_arm(warm, data, backbone, arm, seeds[0], work / "warmup")
                for seed in seeds:
                    # paired arms, alternated so a change of load hits both
                    for arm in ("dense", "moe"):
                        rows.append(run_arm(protocol, data, backbone, arm, seed, work))
        finally:
            os.chdir(cwd)
    RESULTS.mkdir(parents=True, exist_ok=True)
    with out.open("a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    sys.stdout.write(table(rows) + "\n")
    return rows


if __name__ == "__main__":
    main()
