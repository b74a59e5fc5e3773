"""One prepared GPU check: every GPU figure the product claims, in one run of at most 8 minutes.

Parts, in the order they run (each stops early when the time budget, ``--budget`` seconds, runs
out; a row it could not measure says why):

1. ``fp8``: real FP8 (torchao, ``beamvq.quant.fp8.convert_float8``) training-step time over the
   bf16-autocast step, on a Linear-heavy FourCastNet (embed 1024, MLP hidden 4096: a size where
   FP8 pays). Where real FP8 is not available the product's simulated recipe runs and the row
   says so.
2. ``offload``: activation offload at alpha = 0.5 (``QuantPrecision(QuantConfig(offload_alpha=0.5))``, MEMO)
   against none on the quickstart SimVP-v2: saved activations left on the device, peak device
   memory of a step (CUDA) and step time.
3. ``mfu``: bf16 model-FLOPs utilization of the attention backbones (Earthformer, FourCastNet) at
   their paper presets: 3 x forward FLOPs (``torch.utils.flop_counter``, the counting of
   ``benchmarks/backbones.py``) per step time, over the GPU's dense bf16 peak.
4. ``search``: the batched beam search (``beamvq.search.beam_search``) against a per-beam Python
   loop (``benchmarks/overhead.py``) on the quickstart model with its VQ bottleneck; the results
   are checked equal.
5. ``capacity``: the largest trainable model with the offload configs (``configs/strategy/``)
   against none: peak device memory of two training steps of the product's ``ForecastModule``
   under Lightning with each strategy, extrapolated to the device's memory (model depth scales
   parameters and activations alike), and bounded by host memory for the offloaded states.
6. ``throughput``: training samples/s of all ten backbones (quickstart configs) in bf16, eager
   and with ``torch.compile``.
7. ``protocol``: the base and BeamVQ arms of ``configs/experiments/ns_scarce.yaml`` (U-Net).

``--dry-run`` runs every part at toy size on the CPU (``torch.compile`` with the ``eager``
backend, on one backbone) in well under a minute: CI checks that the script and every part work.
Outputs: ``gpu_check.json`` and ``gpu_check.md`` in ``--out``; a row is ``measured`` only when it
ran on a CUDA device outside a dry run, otherwise it says "not measured on a GPU yet".

    python benchmarks/gpu_check.py --out benchmarks/results/gpu_check    # on the GPU machine
    python benchmarks/gpu_check.py --dry-run --out /tmp/gpu_check         # anywhere
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import importlib.util
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import backbones as bench  # noqa: E402  (benchmarks/backbones.py: building and FLOP counting)

from beamvq.backbones import REGISTRY, FourCastNet  # noqa: E402

NOT_MEASURED = "not measured on a GPU yet"
# dense bf16 tensor-core peaks (FLOP/s) by device-name fragment, from the vendors' data sheets
PEAK_BF16 = {"H200": 989.4e12, "H100": 989.4e12, "A100": 312e12, "L40S": 362.05e12}


@dataclass
class Row:
    part: str
    figure: str
    value: float | None
    unit: str
    device: str
    note: str = ""
    status: str = NOT_MEASURED


@dataclass
class Check:
    """What every part shares: device, size mode, the deadline and the rows so far."""

    device: torch.device
    dry: bool
    deadline: float
    rows: list[Row] = field(default_factory=list)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def add(self, part: str, figure: str, value: float | None, unit: str, note: str = "",
            real: bool = True) -> None:  # fmt: skip
        """A row; ``measured`` only on a GPU, outside a dry run, with the real engine (``real``)."""
        on_gpu = self.device.type == "cuda" and not self.dry and value is not None and real
        where = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        where += " (dry run, toy size)" if self.dry else ""
        status = "measured" if on_gpu else NOT_MEASURED
        self.rows.append(Row(part, figure, value, unit, where, note, status))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], Any], device: torch.device, steps: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, bf16: bool,
               context: Callable[[], Any] | None = None) -> Callable[[], None]:  # fmt: skip
    """One AdamW step of ``model`` on MSE, optionally under bf16 autocast and a step context."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        with context() if context is not None else contextlib.nullcontext():
            with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = (model(x).float() - y).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def batch_for(model: nn.Module, grid: tuple[int, int], n: int, device: torch.device) -> tuple:
    x = torch.randn(n, model.in_steps, model.in_channels, *grid, device=device)
    y = torch.randn(n, model.out_steps, model.out_channels, *grid, device=device)
    return x, y


def build(
    name: str, preset: str, grid: tuple[int, int] | None, device: torch.device
) -> tuple[nn.Module, tuple[int, int]]:
    """``configs/backbones/<name>[_paper].yaml`` built as the CLI does (jsonargparse); a
    grid-bound backbone is built for ``grid``."""
    from jsonargparse import ArgumentParser

    from beamvq.backbones.base import Backbone

    path = bench.config_path(name, preset)
    section = copy.deepcopy(bench.backbone_section(path))
    grid = grid or bench.grid_of(path)
    if "height" in section["init_args"]:
        section["init_args"]["height"], section["init_args"]["width"] = grid
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(Backbone, "backbone", required=True)
    model = parser.instantiate(parser.parse_object({"backbone": section})).backbone
    return model.to(device), grid


def sizes(c: Check, dry: Any, gpu: Any) -> Any:
    return dry if c.dry else gpu


# -- the parts -----------------------------------------------------------------------------------
def part_fp8(c: Check) -> None:
    from beamvq.quant.fp8 import convert_float8

    grid = sizes(c, (16, 16), (64, 128))
    width = sizes(c, {"embed_dim": 64, "depth": 1, "encoder_depth": 1, "patch_size": 4},
                  {"embed_dim": 1024, "depth": 4, "encoder_depth": 2, "patch_size": 8})  # fmt: skip
    torch.manual_seed(0)
    base = FourCastNet(2, 1, 4, 4, height=grid[0], width=grid[1], **width).to(c.device)
    fp8 = copy.deepcopy(base)
    report = convert_float8(fp8, c.device, "tensorwise")
    x, y = batch_for(base, grid, sizes(c, 2, 16), c.device)
    steps, warm = sizes(c, (2, 1), (10, 3))
    t_bf16 = median_seconds(train_step(base, x, y, True), c.device, steps, warm)
    t_fp8 = median_seconds(train_step(fp8, x, y, True), c.device, steps, warm)
    real = report.backend.startswith("torchao")
    note = (
        f"FourCastNet embed {width['embed_dim']}, {report.backend}: {len(report.converted)} Linear"
    )
    note += "" if real else " (no real FP8 here: the product's simulated recipe ran)"
    c.add("fp8", "FP8 / bf16 training-step time", t_fp8 / t_bf16, "x", note, real=real)
    c.add("fp8", "bf16 training-step time", 1e3 * t_bf16, "ms", note)


def part_offload(c: Check) -> None:
    from beamvq.quant import QuantConfig, QuantPrecision

    grid, n = sizes(c, ((32, 32), 2), ((64, 64), 32))
    out: dict[str, tuple[float, int, int | None]] = {}
    for label, alpha in (("none", None), ("alpha=0.5", 0.5)):
        torch.manual_seed(0)
        model, _ = build("simvp", "quickstart", grid, c.device)
        plugin = QuantPrecision(QuantConfig(backend="none", offload_alpha=alpha))
        plugin.device = c.device
        plugin.convert_module(model)
        x, y = batch_for(model, grid, n, c.device)
        step = train_step(model, x, y, True, plugin.train_step_context)
        seconds = median_seconds(step, c.device, *sizes(c, (2, 1), (10, 3)))
        peak = None
        if c.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(c.device)
            resident = torch.cuda.memory_allocated(c.device)
            step()
            peak = torch.cuda.max_memory_allocated(c.device) - resident
        out[label] = (seconds, plugin.stats.kept_bytes, peak)
    (t0, kept0, peak0), (t1, kept1, peak1) = out["none"], out["alpha=0.5"]
    note = f"SimVP-v2 quickstart, batch {n}, bf16"
    c.add("offload", "device activations, alpha 0.5 / none", kept1 / kept0, "x", note)
    c.add("offload", "device activations, alpha 0.5", kept1 / 2**20, "MiB", note)
    peak_ratio = None if peak0 is None or peak1 is None else peak1 / peak0
    c.add("offload", "peak device memory of a step, alpha 0.5 / none", peak_ratio, "x",
          note if peak_ratio is not None else "needs CUDA memory statistics")  # fmt: skip
    c.add("offload", "step time, alpha 0.5 / none", t1 / t0, "x", note)


def forward_flops(model: nn.Module, x: torch.Tensor) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False, custom_mapping=bench.FLOP_FORMULAS)
    with counter, torch.autocast(x.device.type, dtype=torch.bfloat16):
        model(x)
    return int(counter.get_total_flops())


def part_mfu(c: Check) -> None:
    name = torch.cuda.get_device_name(c.device) if c.device.type == "cuda" else "cpu"
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    for backbone in ("earthformer", "fourcastnet"):
        if not c.dry and c.left() < 60:
            c.add("mfu", f"{backbone} bf16 MFU", None, "", "time budget spent")
            continue
        model, grid = build(backbone, sizes(c, "quickstart", "paper"), sizes(c, (16, 16), None),
                            c.device)  # fmt: skip
        x, y = batch_for(model, grid, sizes(c, 1, 4), c.device)
        flops = 3 * forward_flops(model, x)  # forward + backward (2x) per step
        seconds = median_seconds(train_step(model, x, y, True), c.device, *sizes(c, (2, 1), (5, 2)))
        note = f"{sizes(c, 'quickstart', 'paper')} preset, batch {x.shape[0]}, {grid[0]}x{grid[1]}"
        c.add("mfu", f"{backbone} bf16 achieved", flops / seconds / 1e12, "TFLOP/s", note)
        c.add("mfu", f"{backbone} bf16 MFU", None if peak is None else flops / seconds / peak,
              "of peak", note if peak else f"no bf16 peak known for {name}")  # fmt: skip


def part_search(c: Check) -> None:
    from overhead import looped_beam_search  # benchmarks/overhead.py: one forward per beam

    from beamvq import metrics, search
    from beamvq.bottleneck import VQBottleneck
    from beamvq.module import ForecastModule

    grid, n = sizes(c, ((16, 16), 4), ((64, 64), 64))
    torch.manual_seed(0)
    backbone, _ = build("simvp", "quickstart", grid, torch.device("cpu"))
    bottleneck = functools.partial(VQBottleneck, codebook_size=sizes(c, 32, 512))
    module = ForecastModule(backbone, bottleneck, candidate_k=4).to(c.device)
    x = torch.randn(n, backbone.in_steps, 1, *grid, device=c.device)
    ref = torch.randn(n, 2 * backbone.out_steps, 1, *grid, device=c.device)
    module.model.train()(x)  # k-means initialization of the code bank: distinct candidates
    module.eval()
    step_fn, scorer = module.search_step_fn(), metrics.NegMSEScorer()
    args = (step_fn, x, scorer, 2, 4, 2)
    with torch.no_grad(), torch.device(c.device):  # the loop allocates with factory defaults

        def batched() -> Any:
            return search.beam_search(*args, reference=ref, to_physical=module.denormalize)

        def looped() -> Any:
            return looped_beam_search(*args, ref, module.denormalize)

        t_b = median_seconds(batched, c.device, *sizes(c, (1, 1), (5, 2)))
        t_l = median_seconds(looped, c.device, *sizes(c, (1, 1), (5, 2)))
        a, b = batched(), looped()
    same = torch.allclose(a.trajectories, b.trajectories, atol=1e-4)
    note = f"{n} inputs, 2 steps, beam 4, K 4, top 2; same trajectories: {same}"
    c.add("search", "per-beam loop / batched search time", t_l / t_b, "x", note)


def fit_two_steps(c: Check, strategy: Any) -> tuple[int | None, int, float]:
    """Peak device bytes, parameters and seconds of 2 training steps of ForecastModule."""
    import pytorch_lightning as pl

    from beamvq.module import ForecastModule
    from beamvq.optim import LRSchedule
    from beamvq.protocols import Batch

    grid = sizes(c, (16, 16), (64, 128))
    width = sizes(c, {"embed_dim": 32, "depth": 2, "patch_size": 4},
                  {"embed_dim": 1024, "depth": 12, "patch_size": 8})  # fmt: skip
    torch.manual_seed(0)
    backbone = FourCastNet(2, 1, 4, 4, height=grid[0], width=grid[1], encoder_depth=1, **width)
    module = ForecastModule(
        backbone,
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-4, weight_decay=0.0),
        lr_schedule=LRSchedule(scheduler="none"),
    )
    items = [Batch(torch.randn(2, 4, *grid), torch.randn(1, 4, *grid), torch.tensor(1.0),
                   torch.tensor(i)) for i in range(8)]  # fmt: skip
    loader = torch.utils.data.DataLoader(items, batch_size=sizes(c, 2, 8))
    if c.device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(c.device)
    trainer = pl.Trainer(
        accelerator="gpu" if c.device.type == "cuda" else "cpu", devices=1,
        strategy=strategy or "auto", max_steps=2, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        precision="bf16-mixed" if c.device.type == "cuda" else "32-true",
    )  # fmt: skip
    start = time.perf_counter()
    trainer.fit(module, train_dataloaders=loader)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(c.device) if c.device.type == "cuda" else None
    return peak, sum(p.numel() for p in backbone.parameters()), seconds


def strategy_from(config: str) -> Any:
    from jsonargparse import ArgumentParser
    from pytorch_lightning.strategies import Strategy

    section = yaml.safe_load((ROOT / "configs" / "strategy" / config).read_text())
    parser = ArgumentParser()
    parser.add_subclass_arguments(Strategy, "strategy")
    cfg = parser.parse_object({"strategy": section["trainer"]["strategy"]})
    return parser.instantiate(cfg).strategy


def part_capacity(c: Check) -> None:
    arms = [("none", None), ("fsdp_cpu_offload", "fsdp_cpu_offload.yaml"),
            ("deepspeed_zero3_offload_cpu", "deepspeed_zero3_offload_cpu.yaml")]  # fmt: skip
    total = (
        torch.cuda.get_device_properties(c.device).total_memory if c.device.type == "cuda" else 0
    )
    for label, config in arms:
        why = None
        if config and c.device.type != "cuda":
            why = "the engine needs CUDA"
        elif config and "deepspeed" in config and importlib.util.find_spec("deepspeed") is None:
            why = "deepspeed is not installed (pip install 'beamvq[deepspeed]')"
        elif not c.dry and c.left() < 90:
            why = "time budget spent"
        if why:
            c.add("capacity", f"{label}: largest trainable model", None, "B params", why)
            continue
        peak, params, seconds = fit_two_steps(c, strategy_from(config) if config else None)
        precision = "bf16-mixed" if c.device.type == "cuda" else "fp32"
        note = f"FourCastNet, {params:,} parameters, 2 steps in {seconds:.1f} s, {precision}"
        if peak is None:
            c.add("capacity", f"{label}: peak device memory of a step", None, "GiB",
                  "no device memory statistics on the CPU; " + note)  # fmt: skip
            continue
        c.add("capacity", f"{label}: peak device memory of a step", peak / 2**30, "GiB", note)
        largest = params * 0.9 * total / peak  # depth scales parameters and activations alike
        c.add(
            "capacity",
            f"{label}: largest trainable model (extrapolated from the step)",
            largest / 1e9,
            "B params",
            "device-bound; offloaded states also need host memory",
        )


def part_throughput(c: Check) -> None:
    grid, n = sizes(c, ((32, 32), 2), ((64, 64), 32))
    steps = sizes(c, (1, 1), (5, 2))
    for name in REGISTRY:
        model, g = build(name, "quickstart", grid, c.device)
        x, y = batch_for(model, g, n, c.device)
        seconds = median_seconds(train_step(model, x, y, True), c.device, *steps)
        c.add("throughput", f"{name} bf16 eager", n / seconds, "samples/s", f"batch {n}, {g}")
    backend = sizes(c, "eager", "inductor")
    for name in REGISTRY:
        if c.dry and name != "fourcastnet":
            continue  # the dry run compiles one backbone: dynamo tracing alone costs seconds
        if not c.dry and c.left() < 75:
            c.add(
                "throughput", f"{name} bf16 torch.compile", None, "samples/s", "time budget spent"
            )
            continue
        model, g = build(name, "quickstart", grid, c.device)
        x, y = batch_for(model, g, n, c.device)
        compiled = torch.compile(model, backend=backend)
        seconds = median_seconds(train_step(compiled, x, y, True), c.device, steps[0], steps[1] + 1)
        c.add("throughput", f"{name} bf16 torch.compile", n / seconds, "samples/s",
              f"backend {backend}, batch {n}")  # fmt: skip


PROTOCOL_ARGS = ["run", "--experiment", "ns_scarce", "--arms", "base,beamvq", "--train-samples",
                 "16", "--unlabelled-samples", "48", "--seeds", "0"]  # fmt: skip


def part_protocol(c: Check) -> None:
    """Base and BeamVQ of ``configs/experiments/ns_scarce.yaml`` on the GPU through
    ``benchmarks/experiment.py`` (``beamvq fit`` + ``beamvq test``), two runs side by side; the
    dry run only plans them (the configs and arms exist and compose into jobs)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import experiment

    on_gpu = ["--override=--trainer.accelerator=gpu"] if c.device.type == "cuda" else []
    jobs = experiment.plan(experiment.parse_args(PROTOCOL_ARGS + on_gpu))
    if c.dry or c.device.type != "cuda" or c.left() < 240:
        why = "dry run" if c.dry else ("no GPU" if c.device.type != "cuda" else "under 4 min left")
        c.add("protocol", "fair BeamVQ protocol, base and beamvq", None, "",
              f"{len(jobs)} runs planned, not run ({why})")  # fmt: skip
        return
    results = ROOT / "runs" / "gpu_check_protocol" / "results.jsonl"
    experiment.run_all(jobs, results, results.parent, 2)
    for row in experiment.load_rows([results]):
        c.add("protocol", f"{row['arm']}: test MSE", row["metrics"]["test/mse"], "",
              f"{row['key']}, fit {row['fit_seconds']:.0f} s")  # fmt: skip


PARTS: dict[str, Callable[[Check], None]] = {
    "fp8": part_fp8, "offload": part_offload, "mfu": part_mfu, "search": part_search,
    "capacity": part_capacity, "throughput": part_throughput, "protocol": part_protocol,
}  # fmt: skip


# -- running and reporting -----------------------------------------------------------------------
def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"GPU check: {report['device']}, torch {report['torch']}, "
        f"{'dry run (toy sizes)' if report['dry_run'] else 'full sizes'}, {report['date']}",
        "",
        "| part | figure | value | unit | measured on | status | note |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        value = "-" if r["value"] is None else f"{r['value']:.4g}"
        lines.append(f"| {r['part']} | {r['figure']} | {value} | {r['unit']} | {r['device']} "
                     f"| {r['status']} | {r['note']} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def run(dry: bool, budget: float, out: Path, parts: list[str]) -> dict[str, Any]:
    device = torch.device("cuda" if torch.cuda.is_available() and not dry else "cpu")
    c = Check(device, dry, time.monotonic() + budget)
    errors: dict[str, str] = {}
    seconds: dict[str, float] = {}
    for name in parts:
        start = time.monotonic()
        try:
            PARTS[name](c)
        except Exception as err:  # noqa: BLE001 - one part's failure must not lose the others
            errors[name] = f"{type(err).__name__}: {err}"
            c.add(name, "part failed", None, "", errors[name])
        seconds[name] = round(time.monotonic() - start, 2)
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "python": platform.python_version(), "dry_run": dry,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "budget_s": budget, "seconds": seconds,
        "errors": errors, "rows": [asdict(r) for r in c.rows],
    }  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "gpu_check.md").write_text(markdown(report))
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="toy sizes on the CPU")
    parser.add_argument("--budget", type=float, default=420.0, help="seconds for all parts")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu_check")
    parser.add_argument("--parts", default=",".join(PARTS), help="comma-separated subset")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    parts = args.parts.split(",")
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"--parts: unknown {unknown}; choose from {list(PARTS)}")
    report = run(args.dry_run, args.budget, args.out, parts)
    sys.stdout.write(markdown(report))
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
