"""Reliability, slow part (real processes): a fit killed with SIGKILL at three moments (inside the
beam search, while writing last.ckpt, mid-epoch) and resumed with ``--ckpt_path last`` ends
bit-identical to an uninterrupted fit; a 2-process DDP fit over gloo keeps the augmented pool and
the code bank identical on both ranks, pools its metrics like a single-process evaluation, and
skips a NaN batch of one rank on both ranks together.

The ``Probe`` callback below is loaded by the ``beamvq`` subprocesses (``tests`` is put on their
``PYTHONPATH``): it injects the fault named by ``$BEAMVQ_TEST_FAULT`` and writes what each rank
holds at the end of the fit.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import xarray as xr
import yaml

ROOT = Path(__file__).resolve().parents[1]
FAULT_ENV = "BEAMVQ_TEST_FAULT"
DISTRIBUTED_ENV = (
    "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE",
    "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID", "SLURM_NTASKS", "SLURM_JOB_NAME",
)  # fmt: skip
GENERATOR = "--data.init_args.generator.init_args."


def _kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class Probe(pl.Callback):
    """Test-only: inject ``$BEAMVQ_TEST_FAULT`` and dump each rank's state at the end of the fit.

    Faults: ``search:E`` (SIGKILL inside the beam search at the end of epoch E), ``save:E``
    (SIGKILL halfway through writing last.ckpt at the end of epoch E), ``batch:E:B`` (SIGKILL
    after training batch B of epoch E), ``nan:R:S`` (rank R's batch at global step S gets a NaN).
    """

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        kind, *args = (os.environ.get(FAULT_ENV) or "none").split(":")
        self.kind, self.args = kind, [int(a) for a in args]

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.kind == "search":
            from beamvq.callbacks.beam_search import BeamSearchAugmentation

            cb = next(c for c in trainer.callbacks if isinstance(c, BeamSearchAugmentation))
            search = cb.search

            def search_then_die(*a: Any, **k: Any) -> Any:
                out = search(*a, **k)
                if trainer.current_epoch == self.args[0]:
                    _kill()  # one search batch done, the pool not yet grown
                return out

            cb.search = search_then_die  # type: ignore[method-assign]
        if self.kind == "save":
            io = trainer.strategy.checkpoint_io
            write = io.write

            def write_half_then_die(checkpoint: dict, f: Any) -> None:
                if checkpoint["epoch"] == self.args[0] and ".last.ckpt." in Path(f.name).name:
                    import io as stdio

                    buf = stdio.BytesIO()
                    torch.save(checkpoint, buf)
                    f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
                    f.flush()
                    os.fsync(f.fileno())
                    _kill()
                write(checkpoint, f)

            io.write = write_half_then_die  # type: ignore[method-assign]

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.kind == "nan" and trainer.global_rank == self.args[0]:
            if trainer.global_step == self.args[1]:
                batch.x[0, 0, 0, 0, 0] = float("nan")

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, out: Any, batch: Any, idx: int
    ) -> None:
        if self.kind == "batch" and [trainer.current_epoch, idx] == self.args:
            _kill()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        dm = trainer.datamodule
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        torch.save(
            {
                "metrics": metrics,
                "pool_x": dm.pool.samples().x,
                "pool_y": dm.pool.samples().y,
                "codebook": pl_module.model.bottleneck.codebook.detach().clone(),
                "state_dict": {k: v.detach().clone() for k, v in pl_module.state_dict().items()},
                "skipped": pl_module.skipped_batches,
                "epochs": trainer.current_epoch,
            },
            self.out_dir / f"rank{trainer.global_rank}.pt",
        )
        if trainer.is_global_zero:
            (self.out_dir / "metrics.json").write_text(json.dumps(metrics, sort_keys=True))


def quickstart_for_test(tmp: Path, name: str) -> Path:
    """The quickstart with outputs in ``tmp``, no W&B and no plots, and the ``Probe`` callback."""
    text = (ROOT / "configs" / "quickstart.yaml").read_text()
    text = text.replace("runs/quickstart", str(tmp / name))
    text = text.replace("data/navier_stokes_64.nc", str(tmp / "ns.nc"))
    cfg = yaml.safe_load(text)
    data = cfg["data"]
    if data["class_path"].endswith("NavierStokesDataModule"):
        # the built-in generator form of the same data (the quickstart is moving to it)
        args = data["init_args"]
        gen = {k: args.pop(k) for k in ("n_trajectories", "resolution", "n_frames") if k in args}
        data["class_path"] = "beamvq.datamodules.netcdf.NetCDFDataModule"
        args["variables"] = ["vorticity"]
        args["generator"] = {
            "class_path": "beamvq.datamodules.synthetic.NavierStokesGenerator",
            "init_args": gen,
        }
    trainer = cfg["trainer"]
    trainer["logger"] = False
    keep = ("ModelCheckpoint", "LastCheckpoint", "BeamSearchAugmentation", "NetCDFPredictionWriter")
    trainer["callbacks"] = [c for c in trainer["callbacks"] if c["class_path"].endswith(keep)]
    trainer["callbacks"].append(
        {
            "class_path": "test_reliability_slow.Probe",
            "init_args": {"out_dir": str(tmp / name / "probe")},
        }
    )
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


# 16x16 fields and a small SimVP: what the runs check (kill points, resume, ranks) does not
# depend on the size; each process's run is then a few seconds past its imports
TINY = [
    f"{GENERATOR}n_trajectories", "6", f"{GENERATOR}resolution", "16", f"{GENERATOR}n_frames", "12",
    "--data.init_args.loader.batch_size", "4", "--trainer.max_epochs", "3",
    "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "2",
    "--model.backbone.init_args.hid_s", "8", "--model.backbone.init_args.hid_t", "16",
    "--model.backbone.init_args.n_s", "2", "--model.backbone.init_args.n_t", "1",
    "--model.bottleneck.init_args.codebook_size", "16", "--trainer.enable_progress_bar", "false",
]  # fmt: skip


def beamvq(cwd: Path, args: list[str], fault: str | None = None, timeout: float = 300) -> int:
    """``python -m beamvq <args>`` in a fresh process; returns its exit status (-9: SIGKILL)."""
    env = dict(os.environ)
    env.update(
        PYTHONPATH=os.pathsep.join([str(ROOT / "tests"), str(ROOT), env.get("PYTHONPATH", "")]),
        OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", WANDB_MODE="disabled", PYTHONUNBUFFERED="1",
    )  # fmt: skip
    env.pop(FAULT_ENV, None)
    # a distributed launch's variables (LOCAL_RANK above all) would make rank 0 believe an
    # external launcher started the ranks: it would wait for a rank 1 that nobody starts
    for name in DISTRIBUTED_ENV:
        env.pop(name, None)
    if fault:
        env[FAULT_ENV] = fault
    # its own process group, so that a hang kills every rank (DDP launches rank 1 as a child)
    proc = subprocess.Popen(
        [sys.executable, "-m", "beamvq", *args], cwd=cwd, env=env, start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(
            f"beamvq {' '.join(args)} hung for {timeout} s; its output:\n{out[-4000:]}"
        ) from None
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # what a SIGKILLed rank 0 left behind
        except ProcessLookupError:
            pass
    (cwd / "logs").mkdir(exist_ok=True)
    n = len(list((cwd / "logs").iterdir()))
    (cwd / "logs" / f"{n:02d}-{fault or 'run'}.log").write_text(out)
    if proc.returncode not in (0, -signal.SIGKILL):
        raise AssertionError(f"beamvq {' '.join(args)} failed ({proc.returncode}):\n{out[-4000:]}")
    return proc.returncode


def load_rank(run: Path, rank: int = 0) -> dict:
    return torch.load(run / "probe" / f"rank{rank}.pt", weights_only=False)


def assert_same_state(a: dict, b: dict) -> None:
    assert a["metrics"] and a["metrics"] == b["metrics"]
    for key in ("pool_x", "pool_y", "codebook"):
        assert torch.equal(a[key], b[key]), key
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k


@pytest.mark.slow
def test_killed_fit_resumes_to_the_uninterrupted_result(tmp_path: Path) -> None:
    ref_cfg = quickstart_for_test(tmp_path, "reference")
    assert beamvq(tmp_path, ["fit", "--config", str(ref_cfg), *TINY]) == 0
    reference = load_rank(tmp_path / "reference")
    assert reference["pool_x"].shape[0] > 0, "BeamVQ added nothing: the resume test is void"

    cfg = quickstart_for_test(tmp_path, "killed")
    run = tmp_path / "killed"
    last = run / "checkpoints" / "last.ckpt"
    resume = ["fit", "--config", str(cfg), *TINY, "--ckpt_path", "last"]
    # 1. SIGKILL inside the beam search after epoch 1: last.ckpt is epoch 0's
    assert beamvq(tmp_path, ["fit", "--config", str(cfg), *TINY], fault="search:1") == -9
    assert torch.load(last, weights_only=True)["epoch"] == 0
    # 2. resumed, SIGKILL halfway through writing last.ckpt after epoch 1: still epoch 0's,
    #    whole, next to the partial temporary file
    assert beamvq(tmp_path, resume, fault="save:1") == -9
    assert torch.load(last, weights_only=True)["epoch"] == 0
    assert list(last.parent.glob(".last.ckpt.*.tmp"))
    # 3. resumed, SIGKILL mid-epoch 2: last.ckpt is epoch 1's, with the augmented pool
    assert beamvq(tmp_path, resume, fault="batch:2:1") == -9
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["NetCDFDataModule"]["pool_x"].shape[0] > 0
    assert not list(last.parent.glob(".last.ckpt.*.tmp")), "the partial file was not cleaned up"
    # 4. resumed to the end
    assert beamvq(tmp_path, resume) == 0
    assert_same_state(load_rank(run), reference)


@pytest.mark.slow
def test_ddp_over_gloo_keeps_ranks_identical_and_pools_metrics(tmp_path: Path) -> None:
    from beamvq.cli import main

    cfg = quickstart_for_test(tmp_path, "ddp")
    run = tmp_path / "ddp"
    # 13 frames: 4 windows per trajectory, so the validation windows split evenly over the 2
    # ranks (DistributedSampler would repeat a window to even out an odd count)
    data = [*TINY, f"{GENERATOR}n_frames", "13", "--trainer.limit_val_batches", "1.0",
            "--model.csi_thresholds", "[0.3, 0.9]", "--model.faults.nan_policy", "skip"]  # fmt: skip
    ddp = ["--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu"]
    assert beamvq(tmp_path, ["fit", "--config", str(cfg), *data, *ddp], fault="nan:1:4") == 0
    ranks = [load_rank(run, r) for r in (0, 1)]
    assert ranks[0]["epochs"] == 3 and ranks[0]["pool_x"].shape[0] > 0
    # the pool and the code bank (and every weight) are identical on both ranks
    for key in ("pool_x", "pool_y", "codebook"):
        assert torch.equal(ranks[0][key], ranks[1][key]), key
    for k, v in ranks[0]["state_dict"].items():
        assert torch.equal(v, ranks[1]["state_dict"][k]), k
    # the NaN batch of rank 1 was skipped on both ranks together
    assert ranks[0]["skipped"] == ranks[1]["skipped"] == 1
    # metrics pooled over ranks = one process evaluating the same checkpoint on every window
    cli = main(["validate", "--config", str(cfg), *data, "--data.init_args.loader.batch_size", "2",
                "--ckpt_path", str(run / "checkpoints" / "last.ckpt")])  # fmt: skip
    single = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
    pooled = ranks[0]["metrics"]
    for name in ("val/mse", "val/mae", "val/csi_0.3", "val/csi_0.9", "val/pod_0.9", "val/csi_m"):
        assert pooled[name] == pytest.approx(single[name], rel=1e-5, abs=1e-7), name
    # DDP predict writes one file, in sample order, equal to one process predicting the same
    predict = ["predict", "--config", str(cfg), *data, "--ckpt_path", "last"]
    assert beamvq(tmp_path, [*predict, *ddp]) == 0
    out = run / "predictions.nc"
    assert sorted(p.name for p in run.iterdir() if "predictions" in p.name) == ["predictions.nc"]
    gathered = xr.load_dataset(out)
    out.unlink()
    assert beamvq(tmp_path, predict) == 0
    alone = xr.load_dataset(out)
    assert gathered.sizes == alone.sizes and gathered.sizes["sample"] > 2
    for name, var in alone.data_vars.items():
        np.testing.assert_allclose(gathered[name].values, var.values, rtol=1e-5, atol=1e-6)
