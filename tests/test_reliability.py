"""Reliability, fast part: determinism, NaN/Inf stop and skip (loss, gradient, quantized operand),
checkpoint mismatches, W&B fallback, dead-code revival, atomic checkpoint files, pooled metrics.
The kill-and-resume and DDP runs are in test_reliability_slow.py."""

from __future__ import annotations

import copy
import functools
import logging
import math
import os
import random
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import xarray as xr
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.plugins.io import TorchCheckpointIO

from beamvq import metrics
from beamvq.backbones import ResNet, SimVPv2
from beamvq.bottleneck import VQBottleneck
from beamvq.callbacks.beam_search import BeamSearchAugmentation
from beamvq.callbacks.search_inputs import SearchInputs
from beamvq.checkpoint_io import AtomicCheckpointIO, stale_temp_files
from beamvq.checkpointing import collect_rng_state, restore_rng_state
from beamvq.cli import BeamVQCLI, main
from beamvq.command import console_main
from beamvq.datamodules.config import LoaderConfig, SplitConfig, WindowConfig
from beamvq.datamodules.netcdf import NetCDFDataModule
from beamvq.datamodules.synthetic import write_navier_stokes
from beamvq.evaluation import ForecastMetrics
from beamvq.faults import FaultConfig
from beamvq.metrics import NegMSEScorer
from beamvq.module import ForecastModule
from beamvq.optim import LRSchedule
from beamvq.quant import QuantRecipe, convert_to_quantized
from beamvq.selftrain import SearchConfig
from beamvq.wandb_start import start_wandb

ROOT = Path(__file__).resolve().parents[1]
T_IN, T_OUT = 2, 2


@pytest.fixture(scope="module")
def ns_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ns") / "ns.nc"
    write_navier_stokes(path, n_trajectories=6, resolution=16, n_frames=9, seed=1)
    return path


def make_dm(path: Path | str, variables: tuple[str, ...] = ("vorticity",)) -> NetCDFDataModule:
    return NetCDFDataModule(
        path=str(path), variables=list(variables), windows=WindowConfig(T_IN, T_OUT),
        loader=LoaderConfig(batch_size=4), splits=SplitConfig(fractions=(0.5, 0.25, 0.25)),
    )  # fmt: skip


def make_module(width: int = 8, **kwargs: Any) -> ForecastModule:
    torch.manual_seed(0)
    bottleneck = functools.partial(VQBottleneck, codebook_size=16, kmeans_init=False)
    args: dict = dict(candidate_k=3, lr_schedule=LRSchedule(scheduler="none"))
    args.update(kwargs)
    return ForecastModule(ResNet(T_IN, T_OUT, 1, 1, width=width, n_blocks=1), bottleneck, **args)


def make_trainer(max_epochs: int = 1, callbacks: list | None = None, **kwargs: Any) -> pl.Trainer:
    args: dict = dict(
        accelerator="cpu", max_epochs=max_epochs, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_train_batches=4,
        limit_val_batches=2, reload_dataloaders_every_n_epochs=1, callbacks=callbacks or [],
        num_sanity_val_steps=0,
    )  # fmt: skip
    args.update(kwargs)
    return pl.Trainer(**args)


def params_of(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# -- determinism ---------------------------------------------------------------------------------


def _fit_metrics(ns_file: Path, seed: int) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    pl.seed_everything(seed, verbose=False)
    module = make_module()
    torch.manual_seed(seed)  # make_module seeds its own init; the run's randomness follows
    augment = BeamSearchAugmentation(
        NegMSEScorer(),
        SearchConfig(beam_width=2, top_k=2, only_improving=False),
        start_epoch=0,
        inputs=SearchInputs(windows=4),
    )
    dm = make_dm(ns_file)
    trainer = make_trainer(2, [augment])
    trainer.fit(module, dm)
    values = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    assert dm.pool.size > 0  # BeamVQ was on
    return values, params_of(module)


def test_same_seed_and_config_give_the_same_metrics(ns_file: Path) -> None:
    first, w1 = _fit_metrics(ns_file, seed=3)
    second, w2 = _fit_metrics(ns_file, seed=3)
    other, _ = _fit_metrics(ns_file, seed=4)
    assert first and first == second  # exact, every val metric
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=0, atol=0)
    # the test can see a difference: another seed shuffles differently
    assert other["val/mse"] != first["val/mse"]


def test_rng_state_round_trip_and_loads_weights_only(tmp_path: Path) -> None:
    np.random.normal()  # a cached Gaussian is part of NumPy's state
    torch.save(collect_rng_state(), tmp_path / "rng.pt")
    a = (torch.rand(3), np.random.rand(), np.random.normal(), random.random())
    restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    b = (torch.rand(3), np.random.rand(), np.random.normal(), random.random())
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]


# -- NaN/Inf: stop and skip ------------------------------------------------------------------------


class Poison:
    """Forward hook that turns a layer's output into NaN at chosen global steps (training only)."""

    def __init__(self, module: ForecastModule, steps: set[int], value: float = math.nan) -> None:
        self.module, self.steps, self.value = module, steps, value

    def __call__(self, layer: torch.nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        if self.module.training and self.module.global_step in self.steps:
            return output * self.value
        return output


def poisoned_layer(module: ForecastModule) -> tuple[str, torch.nn.Module]:
    # a layer inside the encoder: the report must name it, not the model or the loss
    name, layer = next(
        (n, m)
        for n, m in module.model.named_modules(prefix="model")
        if isinstance(m, torch.nn.Conv2d)
    )
    return name, layer


def test_nan_loss_stops_with_step_and_layer(ns_file: Path) -> None:
    module = make_module()
    name, layer = poisoned_layer(module)
    layer.register_forward_hook(Poison(module, {2}))
    with pytest.raises(FloatingPointError) as err:
        make_trainer().fit(module, make_dm(ns_file))
    msg = str(err.value)
    assert "global step 2" in msg and f"layer {name} (Conv2d)" in msg, msg
    assert "nan_policy" in msg


class StepRecorder(pl.Callback):
    """Parameters before and after each training batch."""

    def __init__(self) -> None:
        self.before: dict[int, dict] = {}
        self.after: dict[int, dict] = {}

    def on_train_batch_start(self, trainer: pl.Trainer, module: Any, batch: Any, idx: int) -> None:
        self.before[idx] = params_of(module.model)

    def on_train_batch_end(
        self, trainer: pl.Trainer, module: Any, out: Any, batch: Any, idx: int
    ) -> None:
        self.after[idx] = params_of(module.model)


def test_nan_loss_skip_leaves_model_and_code_bank_untouched(
    ns_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    module = make_module(faults=FaultConfig(nan_policy="skip"))
    name, layer = poisoned_layer(module)
    layer.register_forward_hook(Poison(module, {1}))
    rec = StepRecorder()
    with caplog.at_level(logging.WARNING, logger="beamvq.faults"):
        make_trainer(callbacks=[rec]).fit(module, make_dm(ns_file))
    assert module.skipped_batches == 1
    assert any(
        f"layer {name}" in r.message and "batch skipped" in r.message for r in caplog.records
    )
    # batch 1 was skipped: weights and buffers (code bank EMA) exactly as before it
    for k, v in rec.before[1].items():
        torch.testing.assert_close(rec.after[1][k], v, rtol=0, atol=0, msg=k)
    # the other batches trained
    assert any(not torch.equal(rec.before[2][k], rec.after[2][k]) for k in rec.before[2])
    assert all(torch.isfinite(v).all() for v in params_of(module.model).values())


def test_too_many_skips_in_a_row_stop(ns_file: Path) -> None:
    module = make_module(faults=FaultConfig(nan_policy="skip", max_consecutive_skips=2))
    layer = poisoned_layer(module)[1]
    layer.register_forward_hook(Poison(module, set(range(100))))
    with pytest.raises(FloatingPointError, match="2 batches in a row were skipped"):
        make_trainer().fit(module, make_dm(ns_file))


def _poison_grad(module: ForecastModule, steps: set[int]) -> str:
    name, p = next((n, p) for n, p in module.named_parameters() if n.endswith("weight"))
    p.register_hook(lambda g: g * math.nan if module.global_step in steps else g)
    return name


def test_nan_gradient_stops_naming_the_parameter(ns_file: Path) -> None:
    module = make_module()
    name = _poison_grad(module, {1})
    with pytest.raises(FloatingPointError, match=rf"NaN/Inf gradient at global step 1 .*{name}"):
        make_trainer().fit(module, make_dm(ns_file))


def test_nan_gradient_skip_keeps_the_weights(ns_file: Path) -> None:
    module = make_module(faults=FaultConfig(nan_policy="skip"))
    _poison_grad(module, {1})
    rec = StepRecorder()
    make_trainer(callbacks=[rec]).fit(module, make_dm(ns_file))
    assert module.skipped_batches == 1
    weights = [k for k in rec.before[1] if "backbone" in k and k.endswith("weight")]
    for k in weights:
        torch.testing.assert_close(rec.after[1][k], rec.before[1][k], rtol=0, atol=0)


def test_nan_in_the_code_bank_is_named(ns_file: Path) -> None:
    module = make_module()
    with torch.no_grad():
        module.model.bottleneck.vq._codebook.embed[0, 3] = math.nan
    with pytest.raises(
        FloatingPointError,
        match=r"global step 0 .*buffer model\.bottleneck\.vq\."
        r"_codebook\.embed is NaN/Inf",
    ):
        make_trainer().fit(module, make_dm(ns_file))


def test_bad_data_is_named_as_such() -> None:
    module = make_module()
    module.train()
    x = torch.randn(2, T_IN, 1, 16, 16)
    x[0, 0, 0, 3, 3] = math.inf
    batch = SimpleNamespace(x=x, y=torch.randn(2, T_OUT, 1, 16, 16), weight=torch.ones(2))
    site = module.locate_non_finite(batch)
    assert site.kind == "data" and "batch's x" in site.description


def test_inf_into_a_quantized_layer_is_caught_although_the_loss_stays_finite(
    ns_file: Path,
) -> None:
    module = make_module()
    convert_to_quantized(module.model.backbone, QuantRecipe.build("e4m3", targets=["x", "w"]))
    name, layer = poisoned_layer(module)  # now a QuantConv2d

    def inf_input(layer: torch.nn.Module, args: tuple) -> tuple:
        x = args[0].clone()
        x.view(-1)[0] = math.inf
        return (x,)

    handle = layer.register_forward_pre_hook(inf_input)
    # what the quantization hides: the Inf is saturated and the loss is finite
    module.train()
    x, y = torch.randn(2, T_IN, 1, 16, 16), torch.randn(2, T_OUT, 1, 16, 16)
    loss, _, _ = module.compute_loss(x, y, torch.ones(2), True)
    assert torch.isfinite(loss)
    with pytest.raises(FloatingPointError) as err:
        make_trainer().fit(module, make_dm(ns_file))
    msg = str(err.value)
    assert f"operand x of quantized layer {name}" in msg and "global step 0" in msg, msg
    handle.remove()


def test_inf_gradient_into_a_quantized_layer_is_caught(ns_file: Path) -> None:
    module = make_module()
    convert_to_quantized(module.model.backbone, QuantRecipe.build("e4m3", grad_fmt="e5m2"))
    name, layer = poisoned_layer(module)

    def inf_grad(layer: torch.nn.Module, args: tuple, out: torch.Tensor) -> None:
        if module.training:
            out.register_hook(lambda g: torch.full_like(g, math.inf))

    layer.register_forward_hook(inf_grad)
    # saturated by the dY quantization, the weight gradients stay finite: only the flag sees it
    with pytest.raises(
        FloatingPointError,
        match=rf"NaN/Inf gradient at global step 0 .*operand dy of quantized layer {name}",
    ):
        make_trainer().fit(module, make_dm(ns_file))


def test_nan_policy_is_checked() -> None:
    with pytest.raises(ValueError, match="model.faults.nan_policy"):
        make_module(faults=FaultConfig(nan_policy="ignore"))


# -- checkpoint mismatches ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_ckpt(ns_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("ckpt")
    ckpt = ModelCheckpoint(dirpath=str(tmp), save_last=True)
    trainer = make_trainer(enable_checkpointing=True, callbacks=[ckpt], limit_train_batches=1)
    trainer.fit(make_module(), make_dm(ns_file))
    return tmp / "last.ckpt"


def _predict(module: ForecastModule, dm: NetCDFDataModule, ckpt: Path) -> None:
    # in Python the hyper-parameters hold the backbone object (the CLI stores its config)
    make_trainer(limit_predict_batches=1).predict(
        module, dm, ckpt_path=str(ckpt), weights_only=False
    )


def test_the_matching_checkpoint_predicts(trained_ckpt: Path, ns_file: Path) -> None:
    _predict(make_module(), make_dm(ns_file), trained_ckpt)
    saved = torch.load(trained_ckpt, weights_only=False)["beamvq"]
    assert saved["data"]["variables"] == ["vorticity"] and saved["data"]["grid"] == [16, 16]
    assert saved["model"]["backbone"] == "beamvq.backbones.resnet.ResNet"


def test_checkpoint_of_another_backbone(trained_ckpt: Path, ns_file: Path) -> None:
    other = ForecastModule(
        SimVPv2(T_IN, T_OUT, 1, 1, hid_s=8, hid_t=16, n_s=2, n_t=1),
        functools.partial(VQBottleneck, codebook_size=16, kmeans_init=False),
    )
    with pytest.raises(
        ValueError,
        match=r"backbone: checkpoint beamvq\.backbones\.resnet\.ResNet, "
        r"this model beamvq\.backbones\.simvp\.SimVPv2",
    ):
        _predict(other, make_dm(ns_file), trained_ckpt)


def test_checkpoint_of_another_width_names_the_weights(trained_ckpt: Path, ns_file: Path) -> None:
    with pytest.raises(ValueError, match=r"weight model\.backbone\..* checkpoint \(8,"):
        _predict(make_module(width=16), make_dm(ns_file), trained_ckpt)


def test_checkpoint_of_other_variables(trained_ckpt: Path, ns_file: Path, tmp_path: Path) -> None:
    with xr.open_dataset(ns_file) as ds:
        ds.rename({"vorticity": "omega"}).to_netcdf(tmp_path / "omega.nc")
    with pytest.raises(
        ValueError,
        match=r"data variables: checkpoint \['vorticity'\], this data "
        r"\['omega'\]",
    ):
        _predict(make_module(), make_dm(tmp_path / "omega.nc", ("omega",)), trained_ckpt)


def test_checkpoint_of_another_grid(trained_ckpt: Path, tmp_path: Path) -> None:
    write_navier_stokes(tmp_path / "ns24.nc", n_trajectories=6, resolution=24, n_frames=9)
    with pytest.raises(
        ValueError,
        match=r"data grid \(y, x\): checkpoint \[16, 16\], this data "
        r"\[24, 24\]",
    ):
        _predict(make_module(), make_dm(tmp_path / "ns24.nc"), trained_ckpt)


@pytest.fixture(scope="module")
def cli_run(
    tmp_path_factory: pytest.TempPathFactory, figures_not_rendered_within: Any
) -> tuple[Path, list[str]]:
    """A tiny quickstart fit through the CLI: its last.ckpt and the arguments it ran with (the
    report callbacks' matplotlib rendering skipped: conftest.py)."""
    tmp = tmp_path_factory.mktemp("cli")
    text = (ROOT / "configs" / "quickstart.yaml").read_text()
    text = text.replace("runs/quickstart", str(tmp / "run"))
    (tmp / "qs.yaml").write_text(text.replace("data/navier_stokes_64.nc", str(tmp / "ns.nc")))
    gen = "--data.init_args.generator.init_args."
    args = [
        "--config", str(tmp / "qs.yaml"), f"{gen}n_trajectories", "6", f"{gen}resolution", "32",
        f"{gen}n_frames", "12", "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1",
        "--trainer.limit_val_batches", "1", "--trainer.limit_predict_batches", "1",
        "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
        "--model.bottleneck.init_args.codebook_size", "16",
    ]  # fmt: skip
    with figures_not_rendered_within():
        main(["fit", *args])
    return tmp / "run" / "checkpoints" / "last.ckpt", args


def test_cli_refuses_a_config_of_another_backbone(cli_run: tuple[Path, list[str]]) -> None:
    ckpt, args = cli_run
    fno = str(ROOT / "configs" / "backbones" / "fno.yaml")
    # LightningCLI alone would silently predict with the checkpoint's SimVP
    with pytest.raises(
        ValueError,
        match=r"model\.backbone: checkpoint beamvq\.backbones\.SimVPv2, "
        r"configuration beamvq\.backbones\.FNO",
    ):
        main(["predict", *args, "--config", fno, "--ckpt_path", str(ckpt)])


def test_cli_names_the_constructor_argument_behind_other_shapes(
    cli_run: tuple[Path, list[str]],
) -> None:
    ckpt, args = cli_run
    with pytest.raises(
        ValueError,
        match=r"model\.backbone\.init_args\.hid_s: checkpoint 16, this "
        r"model 32",
    ):
        main(["predict", *args, "--model.backbone.init_args.hid_s", "32", "--ckpt_path", str(ckpt)])


def test_cli_keeps_predict_time_options(cli_run: tuple[Path, list[str]]) -> None:
    ckpt, args = cli_run
    # the checkpoint was trained with ensemble.members 4; LightningCLI alone would restore that
    cli = main(["predict", *args, "--model.ensemble.members", "2", "--ckpt_path", str(ckpt)])
    assert cli.model.ensemble_config.members == 2
    with xr.open_dataset(ckpt.parents[1] / "predictions.nc") as ds:
        assert ds.sizes["member"] == 2


def test_a_cli_checkpoint_rebuilds_its_module(cli_run: tuple[Path, list[str]]) -> None:
    ckpt, _ = cli_run
    module = ForecastModule.load_from_checkpoint(ckpt)
    # the quickstart's grouped arguments, as configured
    assert module.ensemble_config.members == 4 and module.loss_config.candidate_weight == 0.1
    assert module.model.bottleneck.codebook_size == 16 and module.candidate_k == 4
    opt = module.optimizer_factory(module.parameters())
    assert type(opt) is torch.optim.AdamW
    assert opt.defaults["lr"] == 1e-3 and opt.defaults["weight_decay"] == 0.0
    saved = torch.load(ckpt, weights_only=True)["state_dict"]
    for k, v in module.state_dict().items():
        assert torch.equal(v, saved[k]), k


# -- W&B fallback ---------------------------------------------------------------------------------


def _online_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, key: bool) -> None:
    import wandb

    # a W&B service left by earlier tests in this process keeps their settings: start afresh
    wandb.teardown()
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc with a key
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    # a local port nothing listens on: "unreachable" without touching the network
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    if key:
        monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
    else:
        monkeypatch.delenv("WANDB_API_KEY", raising=False)


@pytest.mark.parametrize("key", [False, True], ids=["no-api-key", "unreachable-server"])
def test_wandb_that_cannot_start_falls_back_to_offline(
    key: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import wandb

    _online_env(monkeypatch, tmp_path, key)
    logger = WandbLogger(project="beamvq-test", entity="no-such-entity", save_dir=str(tmp_path))
    trainer = SimpleNamespace(loggers=[logger])
    start = time.perf_counter()
    try:
        with caplog.at_level(logging.WARNING, logger="beamvq"):
            start_wandb(trainer, init_timeout=3.0)  # type: ignore[arg-type]
        elapsed = time.perf_counter() - start
        run = logger.experiment
        assert run.settings.mode == "offline"
        run.log({"x": 1.0})
        assert elapsed < 30
        assert any("W&B could not start an online run" in r.message for r in caplog.records)
    finally:
        wandb.finish()
    assert list((tmp_path / "wandb").glob("offline-run-*"))


def test_cli_fit_goes_on_offline_when_wandb_is_unreachable(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    figures_not_rendered: list[Path],  # the W&B start-up is the subject, not the figures
) -> None:
    import wandb

    _online_env(monkeypatch, tmp_path, key=True)
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "3")
    monkeypatch.chdir(tmp_path)
    text = (ROOT / "configs" / "quickstart.yaml").read_text()
    text = text.replace("runs/quickstart", str(tmp_path / "run"))
    (tmp_path / "qs.yaml").write_text(
        text.replace("data/navier_stokes_64.nc", str(tmp_path / "ns.nc"))
    )
    gen = "--data.init_args.generator.init_args."
    start = time.perf_counter()
    try:
        with caplog.at_level(logging.WARNING, logger="beamvq"):
            cli = main([
                "fit", "--config", str(tmp_path / "qs.yaml"), f"{gen}n_trajectories", "6",
                f"{gen}resolution", "16", f"{gen}n_frames", "12", "--trainer.max_epochs", "1",
                "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "1",
                "--model.bottleneck.init_args.codebook_size", "16",
            ])  # fmt: skip
    finally:
        wandb.finish()
    assert cli.trainer.global_step == 1  # trained
    assert time.perf_counter() - start < 60  # wandb.init alone would wait 90 s
    assert any("W&B could not start an online run" in r.message for r in caplog.records)
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*"))


def test_offline_wandb_is_left_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    logger = WandbLogger(project="beamvq-test", save_dir=str(tmp_path))
    start_wandb(SimpleNamespace(loggers=[logger]))  # type: ignore[arg-type]
    assert logger._experiment is None  # starts lazily as usual


# -- code-bank revival ------------------------------------------------------------------------------


@pytest.mark.parametrize("tokens", [64, 8], ids=["more-tokens-than-codes", "fewer-tokens"])
def test_a_code_bank_whose_codes_all_died_is_revived(tokens: int) -> None:
    torch.manual_seed(0)
    vq = VQBottleneck(dim=4, codebook_size=16, kmeans_init=False, threshold_ema_dead_code=2.0)
    cb = vq.vq._codebook
    with torch.no_grad():
        # every code far from the data and with an EMA usage below the threshold: all dead
        # (the EMA sums stay consistent: embed_avg = cluster_size * code)
        cb.embed.fill_(100.0)
        cb.cluster_size.fill_(0.5)
        cb.embed_avg.copy_(cb.embed * 0.5)
    vq.train()
    steps = 0
    while vq.codebook.abs().max() > 10 and steps < 10:
        vq(torch.randn(1, 4, tokens))
        steps += 1
    # with fewer latents than dead codes the library revives a random subset of the dead per
    # step (a revived code unused in the next step counts as dead again), so it takes a few
    assert steps <= 3 * math.ceil(16 / tokens), f"revived after {steps} steps"
    assert vq.codebook.abs().max() < 10, "every dead code is replaced by a latent of the data"
    used = VQBottleneck.usage(vq(torch.randn(2, 4, 32)).indices, 16).codes_used
    assert int(used) > 4


# -- atomic checkpoint files -------------------------------------------------------------------------


class _BrokenWrite(AtomicCheckpointIO):
    def write(self, checkpoint: dict, f: Any) -> None:
        f.write(b"partial bytes of a checkpoint")
        raise KeyboardInterrupt  # e.g. Ctrl-C during the write


def test_atomic_save_replaces_whole_files_only(tmp_path: Path) -> None:
    target = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1, "w": torch.ones(3)}, target)
    assert io.load_checkpoint(target)["step"] == 1
    with pytest.raises(KeyboardInterrupt):
        _BrokenWrite().save_checkpoint({"step": 2}, target)
    assert io.load_checkpoint(target)["step"] == 1  # the previous complete checkpoint
    assert not stale_temp_files(target)
    # what a SIGKILL leaves behind: never taken for a checkpoint, removed by the next save
    leftover = tmp_path / ".last.ckpt.999.abcdef12.tmp"
    leftover.write_bytes(b"partial")
    assert ModelCheckpoint(dirpath=str(tmp_path))._find_last_checkpoints(
        SimpleNamespace(is_global_zero=True)  # type: ignore[arg-type]
    ) == {str(target)}
    io.save_checkpoint({"step": 3}, target)
    assert not leftover.exists() and io.load_checkpoint(target)["step"] == 3


def _cli_trainer(ns_file: Path, *extra: str) -> pl.Trainer:
    cli = BeamVQCLI(
        ForecastModule, pl.LightningDataModule, subclass_mode_model=False,
        subclass_mode_data=True, run=False,
        args=[
            "--model.backbone", "beamvq.backbones.ResNet", "--model.backbone.in_steps", "2",
            "--model.backbone.out_steps", "2", "--model.backbone.in_channels", "1",
            "--model.backbone.out_channels", "1", "--data", "beamvq.datamodules.netcdf.NetCDFDataModule",
            "--data.path", str(ns_file), "--data.variables", "[vorticity]",
            "--trainer.logger", "false", *extra,
        ],
    )  # fmt: skip
    return cli.trainer


def test_cli_writes_atomic_checkpoints_and_keeps_a_chosen_checkpoint_io(ns_file: Path) -> None:
    assert isinstance(_cli_trainer(ns_file).strategy.checkpoint_io, AtomicCheckpointIO)
    chosen = _cli_trainer(
        ns_file, "--trainer.plugins", "lightning_fabric.plugins.io.torch_io.TorchCheckpointIO"
    )
    assert type(chosen.strategy.checkpoint_io) is TorchCheckpointIO


def test_console_script_entry_returns_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    # sys.exit(<cli object>) would print it and exit with status 1
    monkeypatch.setattr("beamvq.command.main", lambda args=None: object())
    assert console_main() is None


# -- metrics pooled over ranks -------------------------------------------------------------------------


def test_csi_pools_counts_over_ranks_instead_of_averaging_ratios() -> None:
    torch.manual_seed(0)
    thresholds = [0.5]
    # rank 0: many events, well forecast; rank 1: few events, badly forecast
    t0 = (torch.rand(8, 2, 1, 8, 8) > 0.3).float()
    p0 = t0.clone()
    t1 = torch.zeros(8, 2, 1, 8, 8)
    t1[0, 0, 0, 0, :4] = 1.0
    p1 = torch.zeros_like(t1)
    p1[0, 0, 0, 1, :4] = 1.0
    ranks = [ForecastMetrics(2, thresholds), ForecastMetrics(2, thresholds)]
    ranks[0].update(p0, t0)
    ranks[1].update(p1, t1)
    averaged = sum(copy.deepcopy(r).compute()["csi_0.5"] for r in ranks) / 2
    ranks[0].merge_state(ranks[1])  # the sum reduction DDP applies to every state
    pooled = ranks[0].compute()["csi_0.5"]
    c = metrics.contingency_counts(torch.cat([p0, p1]), torch.cat([t0, t1]), thresholds)
    expected = c.hits / (c.hits + c.misses + c.false_alarms)
    torch.testing.assert_close(pooled, expected.float().reshape(()), rtol=1e-6, atol=0)
    assert abs(float(averaged) - float(pooled)) > 0.1


@pytest.fixture(autouse=True)
def _fresh_wandb_after_online_tests(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    """The online W&B tests point the W&B service at a dead port: stop it so later tests in
    this process start their own service with their own settings."""
    yield
    if "wandb" in request.node.name:
        import wandb

        wandb.teardown()


# -- multi-process on one host -----------------------------------------------------------------
def _cpu_trainer(**kwargs: Any) -> pl.Trainer:
    kw = dict(accelerator="cpu", logger=False, enable_checkpointing=False)
    return pl.Trainer(**{**kw, **kwargs})


def test_one_node_cpu_ddp_connects_gloo_over_the_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    from beamvq.cli import gloo_over_loopback, loopback_interface

    lo = loopback_interface()
    assert lo is not None and lo.startswith("lo")
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "unset")  # so that teardown restores the original
    monkeypatch.delenv("GLOO_SOCKET_IFNAME")
    gloo_over_loopback(_cpu_trainer(devices=1))
    assert "GLOO_SOCKET_IFNAME" not in os.environ  # one process: nothing to connect
    gloo_over_loopback(_cpu_trainer(devices=2, strategy="ddp", num_nodes=2))
    assert "GLOO_SOCKET_IFNAME" not in os.environ  # several hosts: the loopback would be wrong
    gloo_over_loopback(_cpu_trainer(devices=2, strategy="ddp"))
    assert os.environ["GLOO_SOCKET_IFNAME"] == lo
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "eth7")
    gloo_over_loopback(_cpu_trainer(devices=2, strategy="ddp"))
    assert os.environ["GLOO_SOCKET_IFNAME"] == "eth7"  # the user's choice is kept


def test_a_leftover_local_rank_is_named_instead_of_hanging(monkeypatch: pytest.MonkeyPatch) -> None:
    from beamvq.cli import check_launch_environment

    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "x")
    monkeypatch.delenv("WORLD_SIZE")
    with pytest.raises(ValueError, match="LOCAL_RANK=0 is set .* but WORLD_SIZE is not"):
        check_launch_environment(_cpu_trainer(devices=2, strategy="ddp"))
    check_launch_environment(_cpu_trainer(devices=1))  # one process: nothing to wait for
    monkeypatch.setenv("WORLD_SIZE", "2")  # torchrun's environment
    check_launch_environment(_cpu_trainer(devices=2, strategy="ddp"))


def test_the_cli_leaves_no_launch_variables_behind(tmp_path: Path) -> None:
    """An in-process DDP run (one device) sets Lightning's rank-0 variables; main() removes them,
    so a second run in the same process is not mistaken for an externally launched rank."""
    import yaml

    from beamvq.cli import LAUNCH_ENV

    assert not any(name in os.environ for name in LAUNCH_ENV)
    cfg = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())
    cfg["trainer"].update(logger=False, callbacks=[], default_root_dir=str(tmp_path))
    cfg["data"]["init_args"].update(path=str(tmp_path / "ns.nc"))
    cfg["data"]["init_args"]["generator"]["init_args"].update(
        n_trajectories=4, resolution=16, n_frames=11
    )
    cfg["model"]["backbone"]["init_args"].update(hid_s=4, hid_t=8, n_s=2, n_t=1)
    cfg["model"]["bottleneck"]["init_args"]["codebook_size"] = 8
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    main(["fit", "--config", str(path), "--trainer.max_epochs", "1",
          "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "1",
          "--trainer.strategy", "ddp", "--trainer.devices", "1",
          "--trainer.enable_progress_bar", "false", "--trainer.enable_checkpointing", "false"])  # fmt: skip
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    assert not any(name in os.environ for name in LAUNCH_ENV), {
        n: os.environ[n] for n in LAUNCH_ENV if n in os.environ
    }
