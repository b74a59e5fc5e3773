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

import beamvq.cli
import beamvq.quant  # noqa: F401  (registers the strategy names)
from beamvq.quant.config import QuantConfig
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
    plugin = QuantPrecision(
        QuantConfig(backend="simulate", fmt="e3m2", special="none", offload_alpha=0.0)
    )
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
        QuantConfig(backend="simulate", offload_alpha=0.5), process_group_backend="gloo"
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
    # torchao is an optional third-party extra; everything of beamvq is imported for real
    pytest.importorskip("torchao.float8", reason="torchao is optional: pip install 'beamvq[fp8]'")
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


@pytest.mark.parametrize("config", CPU_CONFIGS)
def test_quickstart_trains_one_epoch(config: str, quickstart_data: Path) -> None:
    assert QUICKSTART.exists()
    cli = beamvq.cli.main(
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


def test_cli_overrides_a_field_of_the_quant_config() -> None:
    cli = _cli(
        [
            "--config",
            str(PRECISION / "e2m1_block32_sim.yaml"),
            "--trainer.strategy.init_args.quant.fmt=e3m2",
            "--trainer.strategy.init_args.quant.block_size=8",
        ]
    )
    quant = cli.trainer.strategy.precision_plugin.quant
    # the override replaced two fields; the file's other fields stay
    assert (quant.fmt, quant.block_size, quant.granularity) == ("e3m2", 8, "block")
    assert quant.targets == ["w", "w_dx", "x_dw"] and quant.offload_alpha is None
    conv = cli.model.backbone.encoder[0]
    assert conv.recipe.w.fmt == FloatFormat(3, 2) and conv.recipe.w.block_size == 8


def test_registered_ddp_names_keep_their_start_method() -> None:
    for name, start_method in (("fp8_offload_ddp", "popen"), ("fp8_offload_ddp_spawn", "spawn")):
        strategy = pl.strategies.StrategyRegistry.get(name)
        assert isinstance(strategy, FP8OffloadDDPStrategy)
        assert strategy._start_method == start_method
        assert strategy.precision_plugin.quant == QuantConfig()


def test_strategies_take_one_quant_config() -> None:
    quant = QuantConfig(backend="simulate", fmt="e2m1", offload_alpha=0.25, exclude=["head"])
    for strategy in (FP8OffloadStrategy(quant=quant), FP8OffloadDDPStrategy(quant=quant)):
        plugin = strategy.precision_plugin
        assert isinstance(plugin, QuantPrecision) and plugin.quant is quant
        assert plugin.recipe.x.fmt == FloatFormat(2, 1, "fn")
        assert plugin.recipe.dy_dx.fmt == FloatFormat(5, 2, "ieee")
        assert plugin.offload.alpha == 0.25
    default = FP8OffloadStrategy().precision_plugin
    assert default.quant == QuantConfig() and default.quant.backend == "torchao"
    assert default.offload.alpha == 1.0


@pytest.mark.parametrize(
    "fields,key",
    [
        ({"backend": "fp8"}, "quant.backend must be one of"),
        ({"fmt": "int8"}, "quant.fmt (with special='fn')"),
        ({"special": "ocp"}, "quant.special must be one of"),
        ({"grad_fmt": "e9m60"}, "quant.grad_fmt (with grad_special='ieee')"),
        ({"grad_fmt": "e1m2", "grad_special": "ieee"}, "quant.grad_fmt"),
        ({"targets": ["x", "dx"]}, "quant.targets must list roles"),
        ({"granularity": "row"}, "quant.granularity must be one of"),
        ({"block_size": 0}, "quant.block_size must be >= 1"),
        ({"torchao_recipe": "blockwise"}, "quant.torchao_recipe must be one of"),
        ({"offload_alpha": 1.5}, "quant.offload_alpha must be in [0, 1]"),
        ({"offload_alpha": float("nan")}, "quant.offload_alpha must be in [0, 1]"),
        ({"exclude": ["head("]}, "quant.exclude: 'head(' is no regular expression"),
        ({"offload_modules": "cell"}, "quant.offload_modules must be a list"),
    ],
)
def test_quant_config_names_the_yaml_key(fields: dict, key: str) -> None:
    with pytest.raises(ValueError) as err:
        QuantConfig(**fields)
    assert str(err.value).startswith("trainer.strategy.init_args." + key.split(" ")[0])
    assert key in str(err.value)


def test_bad_yaml_field_stops_before_training(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        (PRECISION / "fp8_e4m3_sim.yaml")
        .read_text()
        .replace("granularity: tensor", "granularity: row")
    )
    # jsonargparse builds the strategy before the Trainer exists; the message names the key
    with pytest.raises(ValueError, match=r"init_args\.quant\.granularity must be one of"):
        _cli(["--config", str(bad)])
