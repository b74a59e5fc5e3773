"""Issue 15 item 9: resume details. The thread count is recorded and a mismatch warned about; a
resumed fit continues the W&B run that wrote the checkpoint; DDP ranks' copies are compared."""

from __future__ import annotations

import logging
import re
from types import SimpleNamespace

import pytest
import torch

from beamvq.checkpointing import CKPT_KEY, checkpoint_wandb_run_id, collect_rng_state, restore_state
from beamvq.distributed import RanksDisagree, check_ranks_agree, checksum
from beamvq.wandb_start import continue_wandb_run


def _fit_trainer(loggers=()):
    return SimpleNamespace(
        state=SimpleNamespace(fn="fit"), world_size=1, global_rank=0, loggers=list(loggers)
    )


def test_thread_mismatch_warned(caplog):
    threads = torch.get_num_threads()
    ckpt = {CKPT_KEY: {"rng": [collect_rng_state()], "torch_threads": threads + 1}}
    with caplog.at_level(logging.WARNING, logger="beamvq.checkpointing"):
        restore_state(ckpt, _fit_trainer())
    text = caplog.text
    assert f"written with {threads + 1} torch thread(s), this run has {threads}" in text
    assert f"OMP_NUM_THREADS={threads + 1}" in text


def test_same_threads_no_warning(caplog):
    ckpt = {CKPT_KEY: {"rng": [collect_rng_state()], "torch_threads": torch.get_num_threads()}}
    with caplog.at_level(logging.WARNING, logger="beamvq.checkpointing"):
        restore_state(ckpt, _fit_trainer())
    assert "torch thread" not in caplog.text


def test_checkpoint_wandb_run_id():
    assert checkpoint_wandb_run_id({CKPT_KEY: {"wandb_run_id": "abc123"}}) == "abc123"
    assert checkpoint_wandb_run_id({CKPT_KEY: {}}) is None
    assert checkpoint_wandb_run_id({}) is None


def test_continue_wandb_run_points_the_logger(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    from pytorch_lightning.loggers import WandbLogger

    logger = WandbLogger(save_dir=str(tmp_path), offline=True)
    assert continue_wandb_run(_fit_trainer([logger]), "run0042")
    assert logger.version == "run0042"
    # a logger given its own id keeps it
    own = WandbLogger(save_dir=str(tmp_path), offline=True, id="mine")
    assert not continue_wandb_run(_fit_trainer([own]), "run0042")
    assert own.version == "mine"
    assert not continue_wandb_run(_fit_trainer([logger]), None)


def _two_ranks(other):
    def all_gather(t):
        return torch.stack([t, other(t)])

    return all_gather


def test_ranks_agree_and_disagree():
    pool = torch.arange(12.0).reshape(3, 4)
    codes = torch.randn(8, 2, generator=torch.Generator().manual_seed(0))
    named = {"pool": [pool], "code bank": [codes]}
    sums = check_ranks_agree(_two_ranks(lambda t: t.clone()), 2, named)
    assert sums["pool"] == pytest.approx(66.0)

    # rank 1 holds a different pool: the run stops naming it and both checksums
    def perturb(t):
        t = t.clone()
        t[0] += 1.0
        return t

    with pytest.raises(RanksDisagree, match=r"disagree on the pool .*rank 0: .*rank 1: "):
        check_ranks_agree(_two_ranks(perturb), 2, named)
    # the checksum sees a moved value, not only a changed sum
    assert not torch.equal(checksum(torch.tensor([1.0, 2.0])), checksum(torch.tensor([2.0, 1.0])))
    # one process: nothing gathered
    assert check_ranks_agree(None, 1, named)["pool"] == pytest.approx(66.0)


def test_resumed_fit_continues_the_wandb_run(tmp_path, monkeypatch):
    """Through the CLI: a fit records its W&B run id in last.ckpt, and a fit resumed from it
    (``--ckpt_path last``) continues that run instead of starting a second one."""
    import test_checkpoint_safety as cs

    from beamvq.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = cs.config(tmp_path, "wb")
    tiny = cs.TINY[: cs.TINY.index("--trainer.logger")]  # keep the quickstart's WandbLogger
    last = tmp_path / "wb" / "checkpoints" / "last.ckpt"

    def run_id() -> str:
        return torch.load(last, map_location="cpu", weights_only=True)[CKPT_KEY]["wandb_run_id"]

    main(["fit", "--config", str(cfg), *tiny, "--trainer.max_epochs", "1"])
    first = run_id()
    main(["fit", "--config", str(cfg), *tiny, "--trainer.max_epochs", "2", "--ckpt_path", "last"])
    assert torch.load(last, map_location="cpu", weights_only=True)["epoch"] == 1
    assert run_id() == first
    runs = sorted(p.name for p in (tmp_path / "wb" / "wandb").glob("offline-run-*"))
    # both folders are the same run id (W&B appends "-1" to a folder name taken in the same second)
    assert len(runs) == 2 and all(
        re.fullmatch(rf"offline-run-\d{{8}}_\d{{6}}-{first}(-\d+)?", r) for r in runs
    ), runs
