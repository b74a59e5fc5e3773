"""Lightning integration: strategy names, YAML class paths, logging, torchao path, quickstart."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.cli import LightningCLI
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import beamvq.quant  # noqa: F401  (registers the strategy names)
from beamvq.quant.exmy import FloatFormat
from beamvq.quant.layers import QuantConv2d, QuantLinear
from beamvq.quant.plugin import (
    FP8OffloadDDPStrategy,
    FP8OffloadStrategy,
    QuantPrecision,
    QuantStatsLogger,
)

ROOT = Path(__file__).resolve().parents[1]
PRECISION = ROOT / "configs" / "precision"


class ToyBackbone(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.GELU())
        self.mixer = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
        self.decoder = nn.Conv2d(16, 1, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.encoder(x)
        h = h + self.mixer(h.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.decoder(h)


class ToyModule(pl.LightningModule):
    def __init__(self, lr: float = 1e-2) -> None:
        super().__init__()
        self.backbone = ToyBackbone()
        self.bottleneck = nn.Sequential(nn.Linear(16, 16))
        self.lr = lr

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        pred = self.backbone(x)
        code = self.bottleneck(pred.mean(dim=(2, 3)).expand(-1, 16))
        loss = (pred - y).square().mean() + 1e-3 * code.square().mean()
        self.log("train/loss", loss, batch_size=x.shape[0])
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(8, 1, 8, 8, generator=g)
        return DataLoader(TensorDataset(x, x.roll(1, dims=-1)), batch_size=4)


def _trainer(strategy: object, **extra: object) -> pl.Trainer:
    return pl.Trainer(
        strategy=strategy,
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        limit_train_batches=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **extra,
    )


def test_registered_name_trains_converts_and_logs(caplog: pytest.LogCaptureFixture) -> None:
    model = ToyModule()
    trainer = _trainer("fp8_offload")
    assert isinstance(trainer.strategy, FP8OffloadStrategy)
    with caplog.at_level(logging.WARNING, logger="beamvq.quant"):
        trainer.fit(model)
    # the default backend is real FP8; on a CPU it says why and simulates torchao's recipe
    assert any("Real FP8 training is not available" in r.message for r in caplog.records)
    assert trainer.strategy.root_device == torch.device("cpu")
    plugin = trainer.strategy.precision_plugin
    assert isinstance(plugin, QuantPrecision)
    assert plugin.report.backend == "simulated-tensorwise+simulated-conv"
    # Linear layers (torchao's, here simulated) and convolutions (always simulated)
    assert plugin.report.converted == [
        "backbone.mixer.0",
        "backbone.mixer.2",
        "backbone.encoder.0",
        "backbone.decoder",
    ]
    assert plugin.report.skipped_bottleneck == ["bottleneck.0"]
    assert isinstance(model.backbone.mixer[0], QuantLinear)
    assert isinstance(model.backbone.encoder[0], QuantConv2d)
    assert model.backbone.mixer[0].recipe.dy_dx.fmt == FloatFormat(5, 2, "ieee")
    assert model.backbone.mixer[0].recipe.x.fmt == FloatFormat(4, 3, "fn")
    assert type(model.bottleneck[0]) is nn.Linear
    # offload counters logged every step: alpha = 1 moves the frames' intermediates
    metrics = trainer.callback_metrics
    assert metrics["quant/offloaded_bytes"] > 0
    assert metrics["quant/fetched_bytes"] == metrics["quant/offloaded_bytes"]
    assert metrics["quant/recompute_bytes"] == 0
    assert metrics["quant/kept_bytes"] > 0


def test_plugin_alone_with_a_stock_strategy() -> None:
    model = ToyModule()
    plugin = QuantPrecision(backend="simulate", fmt="e3m2", special="none", offload_alpha=0.0)
    trainer = _trainer("auto", plugins=[plugin], callbacks=[QuantStatsLogger()])
    trainer.fit(model)
    assert trainer.strategy.precision_plugin is plugin
    assert model.backbone.decoder.recipe.x.fmt == FloatFormat(3, 2)
    # alpha = 0: pure recomputation, nothing moved
    assert trainer.callback_metrics["quant/recompute_bytes"] > 0
    assert trainer.callback_metrics["quant/offloaded_bytes"] == 0


def test_strategy_refuses_mixed_precision() -> None:
    with pytest.raises(ValueError, match="32-true"):
        _trainer("fp8_offload", precision="bf16-mixed")


def _cli(args: list[str]) -> LightningCLI:
    common = [
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=2",
        "--trainer.logger=false",
        "--trainer.enable_checkpointing=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
    ]
    return LightningCLI(ToyModule, args=["fit", *args, *common], save_config_callback=None)


def test_cli_strategy_name() -> None:
    cli = _cli(["--trainer.strategy=fp8_offload"])
    assert isinstance(cli.trainer.strategy, FP8OffloadStrategy)
    assert cli.trainer.state.finished


def test_cli_yaml_class_path_e2m1_blocks() -> None:
    cli = _cli(["--config", str(PRECISION / "e2m1_block32_sim.yaml")])
    strategy = cli.trainer.strategy
    assert isinstance(strategy, FP8OffloadStrategy)
    conv = cli.model.backbone.encoder[0]
    assert isinstance(conv, QuantConv2d)
    assert conv.recipe.w.fmt == FloatFormat(2, 1) and conv.recipe.w.block_size == 32
    assert conv.recipe.x is None and conv.recipe.dy_dx is None
    assert strategy.precision_plugin.report.skipped_bottleneck == ["bottleneck.0"]


def test_cli_yaml_torchao_config_falls_back_with_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="beamvq.quant"):
        cli = _cli(["--config", str(PRECISION / "fp8_torchao.yaml")])
    assert any("Real FP8 training is not available" in r.message for r in caplog.records)
    report = cli.trainer.strategy.precision_plugin.report
    assert report.backend == "simulated-tensorwise"
    assert report.converted == ["backbone.mixer.0", "backbone.mixer.2"]
    assert type(cli.model.backbone.encoder[0]) is nn.Conv2d


def test_cli_yaml_offload_only() -> None:
    cli = _cli(["--config", str(PRECISION / "offload_half.yaml")])
    assert type(cli.model.backbone.mixer[0]) is nn.Linear
    metrics = cli.trainer.callback_metrics
    assert metrics["quant/offloaded_bytes"] > 0 and metrics["quant/recompute_bytes"] > 0


def test_ddp_variant_converts_before_wrapping() -> None:
    strategy = FP8OffloadDDPStrategy(
        backend="simulate", offload_alpha=0.5, process_group_backend="gloo"
    )
    model = ToyModule()
    trainer = _trainer(strategy)
    try:
        trainer.fit(model)
    finally:
        # Lightning leaves the process group up; later tests must not see a distributed run
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    assert isinstance(model.backbone.encoder[0], QuantConv2d)
    assert type(model.bottleneck[0]) is nn.Linear
    assert trainer.callback_metrics["quant/recompute_bytes"] > 0


def test_torchao_float8_path_with_emulation() -> None:
    pytest.importorskip("torchao.float8")
    from beamvq.quant.fp8 import convert_torchao_float8

    model = ToyModule()
    report = convert_torchao_float8(model, "tensorwise", emulate=True)
    assert report.converted == ["backbone.mixer.0", "backbone.mixer.2"]
    assert report.skipped_bottleneck == ["bottleneck.0"]
    assert type(model.backbone.mixer[0]).__name__ == "Float8Linear"
    assert type(model.bottleneck[0]) is nn.Linear
    x = torch.randn(2, 1, 8, 8)
    model.training_step([x, x], 0).backward()
    assert model.backbone.mixer[0].weight.grad is not None


QUICKSTART = ROOT / "configs" / "quickstart.yaml"
CPU_CONFIGS = ["fp8_e4m3_sim.yaml", "e2m1_block32_sim.yaml", "offload_half.yaml"]


@pytest.fixture(scope="module")
def quickstart_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("quickstart") / "navier_stokes.nc"


@pytest.mark.skipif(not QUICKSTART.exists(), reason="configs/quickstart.yaml not present")
@pytest.mark.parametrize("config", CPU_CONFIGS)
def test_quickstart_trains_one_epoch(config: str, quickstart_data: Path) -> None:
    cli_module = pytest.importorskip("beamvq.cli")
    cli = cli_module.main(
        [
            "fit",
            "--config", str(QUICKSTART),
            "--config", str(PRECISION / config),
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=2",
            "--trainer.limit_val_batches=1",
            "--trainer.logger=false",
            "--trainer.callbacks=[]",
            "--trainer.enable_checkpointing=false",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            f"--trainer.default_root_dir={quickstart_data.parent}",
            f"--data.init_args.path={quickstart_data}",
            "--data.init_args.generator.init_args.n_trajectories=6",
            "--data.init_args.generator.init_args.resolution=32",
            "--data.init_args.generator.init_args.n_frames=12",
        ]
    )  # fmt: skip
    trainer = cli.trainer
    assert trainer.state.finished and trainer.current_epoch == 1
    assert isinstance(trainer.strategy, FP8OffloadStrategy)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    report = trainer.strategy.precision_plugin.report
    bottleneck = cli.model.model.bottleneck
    assert all(not n.startswith("model.bottleneck") for n in report.converted)
    assert all(type(m).__name__[:5] != "Quant" for m in bottleneck.modules())
    if config != "offload_half.yaml":
        assert len(report.converted) > 0
    assert trainer.callback_metrics["quant/kept_bytes"] > 0


def test_strategies_repeat_every_precision_argument_with_its_default() -> None:
    import inspect

    from beamvq.quant.plugin import FP8OffloadDDPStrategy, FP8OffloadStrategy, QuantPrecision

    want = dict(inspect.signature(QuantPrecision.__init__).parameters)
    want.pop("self")
    for strategy in (FP8OffloadStrategy, FP8OffloadDDPStrategy):
        got = inspect.signature(strategy.__init__).parameters
        for name, param in want.items():
            assert name in got, f"{strategy.__name__} lacks {name}"
            assert got[name].default == param.default, (strategy.__name__, name)
            assert got[name].annotation == param.annotation, (strategy.__name__, name)
    s = FP8OffloadDDPStrategy(backend="simulate", fmt="e2m1", offload_alpha=0.25, exclude=["head"])
    assert s._quant.recipe.x.fmt.exp_bits == 2 and s._quant.recipe.x.fmt.man_bits == 1
    assert s._quant.offload.alpha == 0.25 and s._quant.exclude == ["head"]
