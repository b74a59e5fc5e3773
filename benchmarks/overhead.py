"""What the application costs: three ratios measured side by side in one run.

1. **Lightning vs bare PyTorch**: training throughput (samples/s) of ``ForecastModule`` under
   ``pl.Trainer`` against a bare loop (``zero_grad``, ``compute_loss``, ``backward``, AdamW
   ``step``) over the same backbone, the same DataLoader of the same datamodule, the same batch
   size and the same loss. Both fit one epoch of ``--batches`` batches after ``--warmup``
   untimed batches; the two are interleaved ``--rounds`` times and the median of each is kept, so
   a change of load on shared cores hits both. Goal: Lightning within 5 %.
2. **Search vs training epoch**: one BeamVQ augmentation (``BeamSearchAugmentation`` at its
   default settings: 64 training windows, beam 4, top-2, K = 4, -MSE scorer) against one training
   epoch of the same model over every training window, both as the callback itself records them
   (``augment/search_seconds`` and ``augment/train_seconds``).
3. **Batched vs per-beam search**: ``beamvq.search.beam_search`` (beams x candidates folded into
   the step calls, which on CPU are bounded to ``search.CPU_CALL_ELEMENTS`` window values each)
   against the same search unbounded (one call per step over every beam of every input: the
   search before the bound) and with a Python loop over beams (one call per beam, batched over
   the call's inputs), at 4, 16 and 64 inputs per call (``--search-per-call``) over the same
   ``--search-inputs`` inputs, interleaved per round; the results are checked equal.

Setting (benchmarks/cost_protocol.py): generated Navier-Stokes 32x32, 10 -> 2 x 5
frames, 64 training trajectories, ``--backbone`` (SimVP-v2, the quickstart's) with the VQ
bottleneck and candidate loss, batch 16, one torch thread (``--threads``).

Usage: ``python benchmarks/overhead.py [--backbone simvp] [--batches 12] [--rounds 3]
[--parts lightning,epoch,search]`` (about ten minutes on 2 quiet CPU cores; ``--parts search``
runs the third part alone).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import pytorch_lightning as pl
import torch
from einops import rearrange, repeat
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cost_protocol import ROOT, Protocol, build_backbone, datamodule, make_module  # noqa: E402

from beamvq import metrics, search  # noqa: E402
from beamvq.callbacks.beam_search import BeamSearchAugmentation  # noqa: E402


class _Timer(pl.Callback):
    """Wall time from the start of batch ``warmup`` to the end of the last batch."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.start = 0.0
        self.end = 0.0
        self.samples = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        if batch_idx == self.warmup:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        if batch_idx >= self.warmup:
            self.samples += int(batch.x.shape[0])
            self.end = time.perf_counter()


def lightning_throughput(
    name: str, p: Protocol, data_dir: Path, batches: int, warmup: int
) -> float:
    dm = datamodule(data_dir, "ns", p)
    pl.seed_everything(0, verbose=False)
    module = make_module(build_backbone(name, p), "vq", p)
    timer = _Timer(warmup)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=1, limit_train_batches=warmup + batches,
        limit_val_batches=0, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[timer],
        precision="32-true",
    )  # fmt: skip
    trainer.fit(module, datamodule=dm)
    return timer.samples / (timer.end - timer.start)


def prepared(name: str, p: Protocol, data_dir: Path) -> tuple:
    """The Navier–Stokes datamodule (set up) and a seeded VQ module normalized by its statistics."""
    dm = datamodule(data_dir, "ns", p)
    dm.prepare_data()
    dm.setup("fit")
    pl.seed_everything(0, verbose=False)
    module = make_module(build_backbone(name, p), "vq", p)
    module.set_normalization(dm.normalization.mean, dm.normalization.std)
    return dm, module


def bare_throughput(name: str, p: Protocol, data_dir: Path, batches: int, warmup: int) -> float:
    """The same module, loss and loader without the Trainer."""
    dm, module = prepared(name, p, data_dir)
    module.train()
    opt = torch.optim.AdamW(module.parameters(), lr=p.lr, weight_decay=0.0)
    samples, start = 0, 0.0
    for i, batch in enumerate(dm.train_dataloader()):
        if i == warmup:
            start = time.perf_counter()
        if i == warmup + batches:
            break
        opt.zero_grad(set_to_none=True)
        loss, _, _ = module.compute_loss(
            module.normalize(batch.x), module.normalize(batch.y), batch.weight, True
        )
        loss.backward()
        opt.step()
        if i >= warmup:
            samples += int(batch.x.shape[0])
    return samples / (time.perf_counter() - start)


def search_vs_epoch(name: str, p: Protocol, data_dir: Path) -> tuple[float, float, int]:
    """(search seconds, training-epoch seconds, windows per epoch) at the callback's defaults."""
    dm = datamodule(data_dir, "ns", p)
    pl.seed_everything(0, verbose=False)
    module = make_module(build_backbone(name, p), "vq", p)
    cb = BeamSearchAugmentation(scorer=metrics.NegMSEScorer(), start_epoch=0)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=2, limit_val_batches=0, num_sanity_val_steps=0,
        reload_dataloaders_every_n_epochs=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[cb],
        precision="32-true",
    )  # fmt: skip
    trainer.fit(module, datamodule=dm)
    rec = cb.history[0]
    return rec.search_seconds, rec.train_seconds, len(dm.dataset("train"))


def _take(t: Tensor, idx: Tensor) -> Tensor:
    rows = torch.arange(t.shape[0]).unsqueeze(1)
    return t[rows, idx]


def looped_beam_search(
    step_fn: Callable[[Tensor], Tensor],
    x: Tensor,
    scorer: metrics.Scorer,
    rollout_steps: int,
    beam_width: int,
    top_k: int,
    reference: Tensor,
    to_physical: Callable[[Tensor], Tensor],
) -> search.BeamResult:
    """``search.beam_search`` (mean accumulation) with one ``step_fn`` call per beam."""
    batch, t_in = x.shape[:2]
    windows = x.unsqueeze(1)
    traj: Tensor | None = None
    sums = torch.zeros(batch, 1)
    for step in range(rollout_steps):
        cands_n, score_n = [], []
        for n in range(windows.shape[1]):  # the per-beam Python loop
            cands = step_fn(windows[:, n])
            t_out = cands.shape[2]
            ref = reference[:, step * t_out : (step + 1) * t_out]
            score_n.append(scorer(to_physical(cands), ref, inputs=to_physical(windows[:, n])))
            cands_n.append(cands)
        k = cands_n[0].shape[1]
        cands = torch.stack(cands_n, 1)  # (B, n, K, ...)
        score = torch.stack(score_n, 1).flatten(1)
        totals = repeat(sums, "b n -> b (n k)", k=k) + score
        n_keep = top_k if step == rollout_steps - 1 else min(beam_width, totals.shape[1])
        order = torch.sort(totals, dim=1, descending=True, stable=True).indices[:, :n_keep]
        parent = torch.div(order, k, rounding_mode="floor")
        piece = _take(rearrange(cands, "b n k t c h w -> b (n k) t c h w"), order)
        windows = torch.cat([_take(windows, parent), piece], dim=2)[:, :, -t_in:]
        traj = piece if traj is None else torch.cat([_take(traj, parent), piece], 2)
        sums = _take(totals, order)
    assert traj is not None
    empty = torch.zeros(0)
    return search.BeamResult(traj, sums / rollout_steps, empty, empty)


KINDS = ("batched", "unbounded", "looped")


class SearchTimes(NamedTuple):
    """Seconds of one search of all inputs at ``per_call`` inputs per call, per round and kind:
    ``batched`` (``beam_search`` as shipped: beams x candidates folded, step calls bounded on
    CPU), ``unbounded`` (``max_call_elements=None``: one step call over every beam of every
    input, the search before the bound) and ``looped`` (one call per beam). ``wall``: wall time;
    ``cpu``: the process's CPU time (user + system, page faults included), which on shared cores
    leaves out the time spent waiting for one."""

    per_call: int
    wall: dict[str, list[float]]
    cpu: dict[str, list[float]]


def batched_vs_looped(
    name: str, p: Protocol, data_dir: Path, n: int, repeats: int, per_call: Sequence[int]
) -> tuple[list[SearchTimes], bool]:
    """One search of ``n`` inputs per round at each number of inputs per call; the three kinds
    are interleaved call by call in a rotating order (so a change of load hits all three), and
    whether all results agree (trajectories to 1e-4)."""
    dm, module = prepared(name, p, data_dir)
    # one training step initializes the code bank (k-means) so the K candidates differ
    _, x, y = dm.training_windows(max_windows=n, seed=0)
    module.train()
    module.compute_loss(module.normalize(x), module.normalize(y), torch.ones(n), True)
    module.eval()
    xn = module.normalize(x)
    step_fn, scorer = module.search_step_fn(), metrics.NegMSEScorer()
    steps, phys = p.rollout_steps, module.denormalize

    def batched(xc: Tensor, yc: Tensor, bound: str | None) -> search.BeamResult:
        return search.beam_search(
            step_fn, xc, scorer, steps, 4, 2, reference=yc, to_physical=phys,
            max_call_elements=bound,
        )  # fmt: skip

    runs: dict[str, Callable[[Tensor, Tensor], search.BeamResult]] = {
        "batched": lambda xc, yc: batched(xc, yc, "auto"),
        "unbounded": lambda xc, yc: batched(xc, yc, None),
        "looped": lambda xc, yc: looped_beam_search(step_fn, xc, scorer, steps, 4, 2, yc, phys),
    }
    out = [SearchTimes(c, {k: [] for k in KINDS}, {k: [] for k in KINDS}) for c in per_call]
    trajectories: list[Tensor] = []
    turn = 0
    with torch.no_grad():
        for r in range(repeats):
            for rec in out:
                wall, cpu = dict.fromkeys(KINDS, 0.0), dict.fromkeys(KINDS, 0.0)
                kept: dict[str, list[Tensor]] = {k: [] for k in KINDS}
                for xc, yc in zip(xn.split(rec.per_call), y.split(rec.per_call)):
                    turn += 1
                    for kind in KINDS[turn % 3 :] + KINDS[: turn % 3]:
                        t0, c0 = time.perf_counter(), time.process_time()
                        res = runs[kind](xc, yc)
                        wall[kind] += time.perf_counter() - t0
                        cpu[kind] += time.process_time() - c0
                        kept[kind].append(res.trajectories)
                for kind in KINDS:
                    rec.wall[kind].append(wall[kind])
                    rec.cpu[kind].append(cpu[kind])
                    if r == 0:
                        trajectories.append(torch.cat(kept[kind]))
    same = all(torch.allclose(trajectories[0], t, atol=1e-4) for t in trajectories[1:])
    return out, same


def _ratio(times: dict[str, list[float]], over: str) -> str:
    """Median (min, max) over rounds of the paired ratio looped / ``over``."""
    r = [a / b for a, b in zip(times["looped"], times[over])]
    return f"{statistics.median(r):.2f}x ({min(r):.2f}-{max(r):.2f})"


def search_table(args: argparse.Namespace, p: Protocol, data_dir: Path) -> bool:
    """Part 3, printed as a table; whether every search gave the same results."""
    per_call = [int(c) for c in args.search_per_call.split(",")]
    searches, same = batched_vs_looped(
        args.backbone, p, data_dir, args.search_inputs, args.rounds, per_call
    )
    print(
        f"\n### Beam search of {args.search_inputs} inputs (beam 4, K 4, top-2, "
        f"{p.rollout_steps} steps), {args.rounds} rounds\n\n"
        "Seconds: median over rounds of CPU time (wall time). Speed of the batched search over "
        "the per-beam loop: loop / batched time, median (range) of the per-round ratios.\n"
    )
    print(
        "| inputs per call | batched, s | unbounded, s | per-beam loop, s "
        "| loop / batched (CPU) | loop / batched (wall) | loop / unbounded (CPU) |\n"
        "|---|---|---|---|---|---|---|"
    )
    for rec in searches:
        cells = [
            f"{statistics.median(rec.cpu[k]):.2f} ({statistics.median(rec.wall[k]):.2f})"
            for k in KINDS
        ]
        print(
            f"| {rec.per_call} | {' | '.join(cells)} | {_ratio(rec.cpu, 'batched')} "
            f"| {_ratio(rec.wall, 'batched')} | {_ratio(rec.cpu, 'unbounded')} |"
        )
    print(
        f"\nResults of all searches equal (trajectories to 1e-4): {same}. 'batched': "
        "beamvq.search.beam_search as shipped (step calls of at most "
        f"{search.CPU_CALL_ELEMENTS} window values on CPU); 'unbounded': the same with "
        "max_call_elements=None (one call per step, the search before the bound)."
    )
    return same


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="simvp")
    parser.add_argument("--batches", type=int, default=12, help="timed batches per round")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--search-inputs", type=int, default=64, help="inputs searched")
    parser.add_argument(
        "--search-per-call", default="4,16,64", help="inputs per search call, comma-separated"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--parts", default="lightning,epoch,search", help="which measurements, comma-separated"
    )
    parser.add_argument("--data-dir", default=str(ROOT / "data" / "bench"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    p = replace(Protocol(), train_batches=args.batches + args.warmup)
    data_dir = Path(args.data_dir)
    parts = set(args.parts.split(","))
    if not parts <= {"lightning", "epoch", "search"}:
        parser.error(f"--parts: lightning, epoch, search; got {args.parts}")
    print(
        f"## Overhead ({args.backbone} + VQ, Navier-Stokes 32x32, 10 -> 2x5, batch {p.batch_size})\n"
    )
    same = True
    if "lightning" in parts:
        light, bare = [], []
        for _ in range(args.rounds):
            light.append(
                lightning_throughput(args.backbone, p, data_dir, args.batches, args.warmup)
            )
            bare.append(bare_throughput(args.backbone, p, data_dir, args.batches, args.warmup))
        lm, bm = statistics.median(light), statistics.median(bare)
    if parts & {"lightning", "epoch"}:
        print("| measurement | value |\n|---|---|")
    if "lightning" in parts:
        print(f"| bare PyTorch loop, samples/s (median of {args.rounds}) | {bm:.2f} "
              f"({', '.join(f'{v:.2f}' for v in bare)}) |")  # fmt: skip
        print(f"| Lightning Trainer, samples/s (median of {args.rounds}) | {lm:.2f} "
              f"({', '.join(f'{v:.2f}' for v in light)}) |")  # fmt: skip
        print(f"| Lightning / bare throughput | {lm / bm:.3f} ({100 * (lm / bm - 1):+.1f}%) |")
    if "epoch" in parts:
        s_sec, e_sec, n_win = search_vs_epoch(args.backbone, p, data_dir)
        print(f"| one augmentation (defaults: 64 windows, beam 4, K 4, top-2), s | {s_sec:.1f} |")
        print(f"| one training epoch ({n_win} windows), s | {e_sec:.1f} |")
        print(f"| augmentation / epoch | {s_sec / e_sec:.3f} |")
    if "search" in parts:
        same = search_table(args, p, data_dir)
    print(
        f"\n{args.threads} torch thread(s), load average at the end {os.getloadavg()[0]:.1f} "
        f"on {os.cpu_count()} CPU(s), torch {torch.__version__}."
    )
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
