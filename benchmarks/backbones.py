"""Size and cost of the ten backbones, built from the YAML configs users train with.

For every backbone ``<name>`` in ``beamvq.backbones.REGISTRY`` this script builds

- the quickstart size, ``configs/backbones/<name>.yaml`` (64x64, 1 channel, 5 -> 5 frames), and
- the paper preset, ``configs/backbones/<name>_paper.yaml`` (the published configuration),

through jsonargparse (``add_subclass_arguments(Backbone, ...)``, the mechanism LightningCLI uses
for ``model.backbone``), so the numbers belong to exactly those configs, and prints two Markdown
tables (``docs/backbones.md`` quotes them):

- **params**: trainable parameters of the backbone alone (the VQ bottleneck's EMA code bank is a
  buffer, not a parameter). Published counts are printed beside ours where one exists.
- **forward FLOPs** at batch 1, counted by ``torch.utils.flop_counter.FlopCounterMode`` on the
  meta device (shapes only: no memory, no arithmetic, so the paper presets cost little; a forward
  that reads a tensor value, Earthformer's, runs on the CPU instead, marked ``*``). One
  multiply-add is 2 FLOPs. Counted: matrix products and convolutions (the counter's own
  formulas), CPU fused attention (the counter's attention formula, which it does not attach to
  the CPU kernel), complex matrix products as 4 real ones (FNO's spectral weights), and FFTs by
  the usual convention 5 N log2 N per complex transform of N points (2.5 N log2 N real-to-complex
  or complex-to-real). Not counted: elementwise work, normalization, softmax, pooling,
  resampling by interpolation. OpenSTL's published FLOPs come from fvcore, which counts one
  multiply-add as one FLOP, so the paper table also shows ours as GMACs (= GFLOPs / 2).
- **training throughput** (quickstart size only): samples/s of one optimizer step (forward, MSE
  loss, backward, AdamW) on random data at ``--batch-size`` (8), from the median of ``--iters``
  timed steps after one warm-up step. Backbone alone: no VQ bottleneck, no Lightning.
- **peak training memory** (quickstart size only): each backbone is timed in a fresh Python
  subprocess; after building the model, the optimizer and the batch, the process's resident-set
  high-water mark is reset (``/proc/self/clear_refs``, Linux) and the peak extra resident memory
  over the warm-up and timed steps is reported (``VmHWM`` minus ``VmRSS`` at the reset): weights'
  gradients, AdamW state, activations, temporaries, plus what the allocator keeps after freeing
  and code pages first touched by the step: an upper bound on the peak of live tensors.
  (tracemalloc would not see torch's allocations at all; torch has no CPU peak counter.)

Usage: ``python benchmarks/backbones.py [--backbones simvp,fno] [--quick] [--iters 3]
[--batch-size 8] [--threads N]``. ``--quick`` skips the training measurements (params and FLOPs
only, about a minute: mostly Earthformer's paper preset, counted on the CPU). The default run
takes about two minutes on 2 CPU cores. Timings use one torch thread by default (``--threads``):
on cores shared with other processes, OpenMP threads wait for each other (a small matmul ran 65x
slower with 2 threads than with 1 under load; the table 2.5-40x slower), so single-thread
samples/s are the reproducible figure. They are still noisy on shared cores: the load average is
printed with the tables.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
import yaml
from jsonargparse import ArgumentError, ArgumentParser
from torch.utils.flop_counter import FlopCounterMode, flop_registry, sdpa_flop_count

from beamvq.backbones import REGISTRY, backbone_class
from beamvq.backbones.base import Backbone, count_parameters

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "configs" / "backbones"
# Grid of the benchmarks the presets come from (Moving MNIST, Navier-Stokes): 64x64, unless the
# YAML fixes one (Earthformer and FourCastNet are built for a grid: height, width).
DEFAULT_GRID = (64, 64)

aten = torch.ops.aten


class Published(NamedTuple):
    """Published figures for a paper preset; ``note`` says where they come from."""

    params: str
    gmacs: str
    note: str


# From the comments of configs/backbones/<name>_paper.yaml; FLOPs from OpenSTL's Moving-MNIST
# table (docs/en/model_zoos/video_benchmarks.md, fvcore: one multiply-add = one FLOP).
PUBLISHED: dict[str, Published] = {
    "simvp": Published("46.8M", "16.5", "OpenSTL, Moving MNIST"),
    "tau": Published("44.7M", "16.0", "OpenSTL, Moving MNIST"),
    "convlstm": Published(
        "15.0M", "56.8", "OpenSTL; its count includes 3,407,872 weights its cell never uses"
    ),
    "predrnn": Published("23.8M", "116.0", "OpenSTL, Moving MNIST"),
    "fno": Published("414,517", "-", "FNO paper, Navier-Stokes (modes 8)"),
    "resnet": Published("266,641", "-", "FNO paper's ResNet baseline (width not published)"),
    "unet": Published(
        "24,950,491", "-", "FNO paper's U-Net is TF-Net's variant, a different network"
    ),
    "earthformer": Published("-", "-", "no figure confirmed"),
    "fourcastnet": Published("-", "-", "none published (and ours runs a reduced 64x128 grid)"),
    "cno": Published("-", "-", "none published for this setting"),
}


# -- building from the YAML ------------------------------------------------------------------
def config_path(name: str, preset: str) -> Path:
    """``configs/backbones/<name>.yaml`` (quickstart) or ``<name>_paper.yaml`` (paper)."""
    suffix = {"quickstart": "", "paper": "_paper"}[preset]
    return CONFIG_DIR / f"{name}{suffix}.yaml"


def backbone_section(path: Path) -> dict[str, Any]:
    """The ``model.backbone`` section (``class_path`` + ``init_args``) of a config file."""
    if not path.is_file():
        raise FileNotFoundError(f"backbone config not found: {path}")
    config = yaml.safe_load(path.read_text())
    try:
        return config["model"]["backbone"]
    except (KeyError, TypeError) as err:
        raise ValueError(f"{path}: no model.backbone section") from err


def build_backbone(path: Path) -> Backbone:
    """Instantiate ``model.backbone`` of ``path`` as LightningCLI does (jsonargparse subclass)."""
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(Backbone, "backbone", required=True)
    try:
        config = parser.parse_object({"backbone": backbone_section(path)})
    except ArgumentError as err:
        raise ValueError(f"{path}: {err}") from err
    return parser.instantiate(config).backbone


def grid_of(path: Path) -> tuple[int, int]:
    """``(height, width)`` fixed by the YAML of a grid-bound backbone, else the benchmarks' 64x64."""
    section = backbone_section(path)
    grid_args = backbone_class(section["class_path"]).grid_args
    if grid_args:
        init_args = section.get("init_args") or {}
        height, width = (int(init_args[a]) for a in grid_args)
        return height, width
    return DEFAULT_GRID


def input_batch(model: Backbone, grid: tuple[int, int], batch: int, device: str) -> torch.Tensor:
    """A ``(batch, T_in, C_in, H, W)`` input for ``model``."""
    return torch.randn(batch, model.in_steps, model.in_channels, *grid, device=device)


# -- FLOPs -----------------------------------------------------------------------------------
def _fft_flops(signal_shape: Sequence[int], dims: Sequence[int], per_point: float) -> int:
    """``per_point * N log2 N`` per transform of ``N = prod(signal_shape[dims])`` points."""
    n = math.prod(int(signal_shape[d]) for d in dims)
    batch = math.prod(int(s) for s in signal_shape) // max(n, 1)
    return int(round(batch * per_point * n * math.log2(n))) if n > 1 else 0


def _fft_r2c_flops(
    x_shape: Sequence[int], dim: Sequence[int], *args: Any, out_shape: Any = None, **kwargs: Any
) -> int:
    return _fft_flops(x_shape, dim, 2.5)


def _fft_c2r_flops(
    x_shape: Sequence[int], dim: Sequence[int], *args: Any, out_shape: Any = None, **kwargs: Any
) -> int:
    return _fft_flops(out_shape, dim, 2.5)


def _fft_c2c_flops(
    x_shape: Sequence[int], dim: Sequence[int], *args: Any, out_shape: Any = None, **kwargs: Any
) -> int:
    return _fft_flops(x_shape, dim, 5.0)


def _cpu_attention_flops(
    q_shape: Sequence[int],
    k_shape: Sequence[int],
    v_shape: Sequence[int],
    *args: Any,
    out_shape: Any = None,
    **kwargs: Any,
) -> int:
    return sdpa_flop_count(q_shape, k_shape, v_shape)


def _complex_aware(op: Any) -> Any:
    """The counter's formula for ``op``, times 4 when an operand is complex (4 real products)."""
    real_formula = flop_registry[op]

    def formula(*args: Any, out_val: Any = None, **kwargs: Any) -> int:
        flops = real_formula(*args, out_val=out_val, **kwargs)
        is_complex = any(isinstance(a, torch.Tensor) and a.is_complex() for a in args)
        return 4 * flops if is_complex else flops

    formula._get_raw = True  # type: ignore[attr-defined]  # FlopCounterMode passes tensors
    return formula


FLOP_FORMULAS: dict[Any, Any] = {
    aten._fft_r2c: _fft_r2c_flops,
    aten._fft_c2r: _fft_c2r_flops,
    aten._fft_c2c: _fft_c2c_flops,
    aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops,
    **{op: _complex_aware(op) for op in (aten.mm, aten.addmm, aten.bmm, aten.baddbmm)},
}


class Shape(NamedTuple):
    """Forward cost at batch 1, the latent's per-sample shape, and where it was counted."""

    params: int
    flops: int
    z_shape: tuple[int, ...]
    device: str


def _count(path: Path, device: str) -> Shape:
    with torch.device(device):
        model = build_backbone(path)
    params = count_parameters(model)
    # Frozen parameters instead of no_grad: FlopCounterMode's module tracker fails under no_grad
    # when a module receives a parameter as input (Earthformer's global vectors); frozen, no
    # autograd graph is kept either.
    model.requires_grad_(False)
    x = input_batch(model, grid_of(path), 1, device)
    counter = FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS)
    with counter:
        y = model(x)
    expected = (1, model.out_steps, model.out_channels, *x.shape[-2:])
    if tuple(y.shape) != expected:
        raise RuntimeError(f"{path}: output shape {tuple(y.shape)}, expected {expected}")
    z = model.encode(x).z
    return Shape(params, counter.get_total_flops(), tuple(z.shape[1:]), device)


def measure_shape(path: Path) -> Shape:
    """Parameters, forward FLOPs and latent shape: on the meta device, else on the CPU.

    The meta device runs shapes only (seconds for every preset); a forward that reads a value
    (Earthformer's relative-position bias checks its offsets with ``bool(...)``) cannot run
    there and is counted on the CPU with real tensors instead.
    """
    try:
        return _count(path, "meta")
    except (RuntimeError, NotImplementedError) as err:
        if "meta" not in str(err):
            raise
        return _count(path, "cpu")


# -- training throughput and memory (one subprocess per backbone) ----------------------------
def _status_kib(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    if match is None:
        raise RuntimeError(f"/proc/self/status has no {field}")
    return int(match.group(1))


def train_worker(name: str, batch_size: int, iters: int) -> dict[str, float]:
    """Time ``iters`` AdamW steps (after one warm-up) and measure the peak extra RSS."""
    path = config_path(name, "quickstart")
    torch.manual_seed(0)
    model = build_backbone(path).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = input_batch(model, grid_of(path), batch_size, "cpu")
    y = torch.randn(batch_size, model.out_steps, model.out_channels, *x.shape[-2:])
    gc.collect()
    # Reset the high-water mark so the peak belongs to the training steps alone.
    Path("/proc/self/clear_refs").write_text("5")
    rss_before = _status_kib("VmRSS")
    times = []
    for step in range(iters + 1):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        if step > 0:  # step 0 warms up (allocates grads and AdamW state, primes kernels)
            times.append(time.perf_counter() - start)
    if not math.isfinite(float(loss)):
        raise FloatingPointError(f"{path}: non-finite training loss {float(loss)}")
    peak_mib = (_status_kib("VmHWM") - rss_before) / 1024
    median = statistics.median(times)
    return {"samples_per_s": batch_size / median, "step_s": median, "peak_mib": peak_mib}


class Training(NamedTuple):
    samples_per_s: float
    step_s: float
    peak_mib: float


def measure_training(name: str, batch_size: int, iters: int, threads: int) -> Training:
    """Run ``train_worker`` in a fresh interpreter (clean memory accounting) and read its JSON."""
    cmd = [
        sys.executable, str(Path(__file__).resolve()), "--worker", name,
        "--batch-size", str(batch_size), "--iters", str(iters), "--threads", str(threads),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=False)
    if proc.returncode != 0:
        raise RuntimeError(
            proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"
        )
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return Training(result["samples_per_s"], result["step_s"], result["peak_mib"])


# -- tables ----------------------------------------------------------------------------------
def fmt_int(n: int) -> str:
    return f"{n:,}"


def fmt_gflops(flops: int) -> str:
    return f"{flops / 1e9:.3f}" if flops < 1e10 else f"{flops / 1e9:.1f}"


def preset_label(path: Path) -> str:
    """e.g. ``10->10 x1 @64x64`` from the backbone's YAML."""
    init_args = backbone_section(path).get("init_args") or {}
    h, w = grid_of(path)
    return (
        f"{init_args.get('in_steps')}->{init_args.get('out_steps')} "
        f"x{init_args.get('in_channels')} @{h}x{w}"
    )


def flops_cell(shape: Shape) -> str:
    """GFLOPs, starred when counted on the CPU instead of the meta device."""
    return fmt_gflops(shape.flops) + ("*" if shape.device != "meta" else "")


def latent_cell(shape: Shape) -> str:
    """``D @ positions`` of the latent, e.g. ``16 @ 5x16x16``."""
    return f"{shape.z_shape[0]} @ " + "x".join(str(n) for n in shape.z_shape[1:])


def markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def error_cell(err: Exception) -> str:
    """The error on one line (Markdown-safe), long enough to name the offending option."""
    message = " ".join(str(err).split())[:400].replace("|", "\\|")
    return f"error: {type(err).__name__}: {message}"


def run(names: Sequence[str], quick: bool, batch_size: int, iters: int, threads: int) -> int:
    """Measure and print both tables; returns the number of failed measurements."""
    failures = 0
    quick_rows, paper_rows = [], []
    for name in names:
        path = config_path(name, "quickstart")
        row = [name]
        try:
            shape = measure_shape(path)
            row += [fmt_int(shape.params), flops_cell(shape), latent_cell(shape)]
        except Exception as err:  # a broken config is reported in the table, others still run
            failures += 1
            row += [error_cell(err), "", ""]
        if not quick:
            try:
                tr = measure_training(name, batch_size, iters, threads)
                row += [f"{tr.samples_per_s:.1f}", f"{tr.step_s:.2f}", f"{tr.peak_mib:.0f}"]
            except Exception as err:
                failures += 1
                row += [error_cell(err), "", ""]
        quick_rows.append(row)
        print(f"  {name} quickstart: {' | '.join(row[1:])}", file=sys.stderr, flush=True)

        path = config_path(name, "paper")
        pub = PUBLISHED.get(name, Published("-", "-", ""))
        try:
            shape = measure_shape(path)
            paper_rows.append(
                [
                    name,
                    preset_label(path),
                    fmt_int(shape.params),
                    pub.params,
                    flops_cell(shape),
                    fmt_gflops(shape.flops // 2),
                    pub.gmacs,
                    latent_cell(shape),
                    pub.note,
                ]
            )
        except Exception as err:
            failures += 1
            paper_rows.append(
                [name, "", error_cell(err), pub.params, "", "", pub.gmacs, "", pub.note]
            )
        print(f"  {name} paper: {' | '.join(paper_rows[-1][1:7])}", file=sys.stderr, flush=True)

    quick_header = ["backbone", "params", "fwd GFLOPs (b=1)", "z: D @ positions"]
    if not quick:
        quick_header += [f"train samples/s (b={batch_size})", "step s", "peak train MiB"]
    print("## Quickstart size: 64x64, 1 channel, 5 -> 5 frames (configs/backbones/<name>.yaml)\n")
    print(markdown(quick_header, quick_rows))
    print("\n## Paper presets (configs/backbones/<name>_paper.yaml): parameters and FLOPs only\n")
    print(
        markdown(
            [
                "backbone",
                "preset",
                "params",
                "published params",
                "fwd GFLOPs (b=1)",
                "GMACs",
                "published GMACs",
                "z: D @ positions",
                "source of the published figures",
            ],
            paper_rows,
        )
    )
    starred = [r[2] for r in quick_rows] + [r[4] for r in paper_rows]
    if any(cell.endswith("*") for cell in starred):
        print(
            "\n\\* counted on the CPU with real tensors: the forward reads a tensor value, "
            "which the meta device cannot."
        )
    load = " / ".join(f"{v:.1f}" for v in os.getloadavg())
    print(
        f"\nMachine: {platform.machine()}, {os.cpu_count()} CPU(s), torch {torch.__version__}, "
        f"{threads} torch thread(s); load average (1/5/15 min) at the end: "
        f"{load}."
    )
    if not quick:
        print(
            f"Training: median of {iters} AdamW steps after 1 warm-up, backbone only "
            "(no VQ bottleneck), random data; peak MiB = extra resident memory over the steps."
        )
    return failures


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--backbones",
        default=",".join(REGISTRY),
        help="comma-separated names from beamvq.backbones.REGISTRY (default: all)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="params and FLOPs only: skip the training throughput and memory",
    )
    parser.add_argument("--batch-size", type=int, default=8, help="training batch (default 8)")
    parser.add_argument("--iters", type=int, default=3, help="timed training steps (default 3)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: reproducible on shared cores, see the docstring)",
    )
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.iters < 1 or args.threads < 1:
        parser.error(
            "--batch-size, --iters and --threads must be >= 1, got "
            f"{args.batch_size}, {args.iters}, {args.threads}"
        )
    torch.set_num_threads(args.threads)
    # jsonargparse and LightningCLI-era deprecations are noise in a table
    warnings.filterwarnings("ignore")
    if args.worker is not None:
        print(json.dumps(train_worker(args.worker, args.batch_size, args.iters)))
        return 0
    names = [n.strip() for n in args.backbones.split(",") if n.strip()]
    unknown = [n for n in names if n not in REGISTRY]
    if unknown or not names:
        parser.error(f"--backbones: unknown {unknown}; choose from {', '.join(REGISTRY)}")
    return 1 if run(names, args.quick, args.batch_size, args.iters, args.threads) else 0


if __name__ == "__main__":
    sys.exit(main())
