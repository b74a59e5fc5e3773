"""The model-state offload configs (configs/strategy/*.yaml): DeepSpeed ZeRO-3 with CPU and NVMe
offload, FSDP with CPU offload. On a CPU machine: every config parses as LightningCLI parses
``trainer.strategy``, the strategy objects are built with the offload settings the YAML names, and
the CLI hands them to the Trainer, which is where the engines' CUDA requirement stops a CPU run.
Parts that need the deepspeed package or a GPU say so in their skip reason."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
import yaml
from jsonargparse import ArgumentParser
from pytorch_lightning.strategies import DeepSpeedStrategy, FSDPStrategy, Strategy

ROOT = Path(__file__).resolve().parents[1]
STRATEGIES = ROOT / "configs" / "strategy"
CONFIGS = sorted(STRATEGIES.glob("*.yaml"))
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
NO_DEEPSPEED = "DeepSpeedStrategy needs the deepspeed package (pip install 'beamvq[deepspeed]')"
NO_CUDA = "DeepSpeed ZeRO-3 and FSDP need a CUDA GPU (Lightning refuses accelerator='cpu')"


def strategy_config(name: str) -> dict:
    return yaml.safe_load((STRATEGIES / name).read_text())["trainer"]["strategy"]


def parse(name: str):  # noqa: ANN201 - a jsonargparse Namespace
    parser = ArgumentParser()
    parser.add_subclass_arguments(Strategy, "strategy")  # as LightningCLI types trainer.strategy
    return parser, parser.parse_object({"strategy": strategy_config(name)})


def test_the_three_configs_exist_and_ask_for_a_gpu() -> None:
    assert [p.name for p in CONFIGS] == [
        "deepspeed_zero3_offload_cpu.yaml",
        "deepspeed_zero3_offload_nvme.yaml",
        "fsdp_cpu_offload.yaml",
    ]
    for path in CONFIGS:
        trainer = yaml.safe_load(path.read_text())["trainer"]
        assert trainer["accelerator"] == "gpu"


@pytest.mark.parametrize(
    ("name", "device"),
    [("deepspeed_zero3_offload_cpu.yaml", "cpu"), ("deepspeed_zero3_offload_nvme.yaml", "nvme")],
)
def test_deepspeed_configs_parse_as_zero3_with_offload(name: str, device: str) -> None:
    _, cfg = parse(name)  # type-checked against DeepSpeedStrategy's signature, no package needed
    assert cfg.strategy.class_path == "pytorch_lightning.strategies.DeepSpeedStrategy"
    args = cfg.strategy.init_args
    assert args.stage == 3
    assert args.offload_optimizer and args.offload_parameters
    assert args.offload_optimizer_device == args.offload_params_device == device


@pytest.mark.skipif(not HAS_DEEPSPEED, reason=NO_DEEPSPEED)
@pytest.mark.parametrize(
    "name", ["deepspeed_zero3_offload_cpu.yaml", "deepspeed_zero3_offload_nvme.yaml"]
)
def test_deepspeed_strategy_is_built_with_the_offload_settings(name: str) -> None:
    parser, cfg = parse(name)
    strategy = parser.instantiate(cfg).strategy
    assert isinstance(strategy, DeepSpeedStrategy)
    zero = strategy.config["zero_optimization"]
    device = strategy_config(name)["init_args"]["offload_params_device"]
    assert zero["stage"] == 3
    assert zero["offload_param"]["device"] == zero["offload_optimizer"]["device"] == device


def test_deepspeed_without_the_package_names_it() -> None:
    if HAS_DEEPSPEED:
        pytest.skip("deepspeed is installed: nothing to refuse")
    with pytest.raises(Exception, match="DeepSpeed"):
        DeepSpeedStrategy(stage=3, offload_optimizer=True, offload_parameters=True)


def test_fsdp_config_builds_a_cpu_offloading_full_shard_strategy() -> None:
    from torch.distributed.fsdp import CPUOffload, ShardingStrategy

    parser, cfg = parse("fsdp_cpu_offload.yaml")
    strategy = parser.instantiate(cfg).strategy
    assert isinstance(strategy, FSDPStrategy)
    assert strategy.cpu_offload == CPUOffload(offload_params=True)
    assert strategy.sharding_strategy == ShardingStrategy.FULL_SHARD
    # one FSDP unit per repeated block of the backbones (FourCastNet's AFNO blocks among them)
    from beamvq.backbones.fourcastnet import AFNOBlock

    wrapped = cfg.strategy.init_args.auto_wrap_policy  # the classes, as jsonargparse read them
    assert AFNOBlock in wrapped and len(wrapped) == 8
    assert all(issubclass(c, torch.nn.Module) for c in wrapped)


def _cli_args(config: Path, tmp_path: Path) -> list[str]:
    return [
        "fit",
        "--config", str(ROOT / "configs" / "quickstart.yaml"),
        "--config", str(config),
        "--trainer.logger", "false",
        "--trainer.fast_dev_run", "true",
        "--trainer.default_root_dir", str(tmp_path / "run"),
        "--data.init_args.path", str(tmp_path / "ns.nc"),
        "--data.init_args.generator.init_args.n_trajectories", "6",
        "--data.init_args.generator.init_args.resolution", "32",
        "--data.init_args.generator.init_args.n_frames", "12",
    ]  # fmt: skip


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the fit test below runs instead")
def test_the_cli_hands_fsdp_to_the_trainer_which_needs_cuda(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from beamvq.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["beamvq"])
    args = [
        *_cli_args(STRATEGIES / "fsdp_cpu_offload.yaml", tmp_path),
        "--trainer.accelerator",
        "cpu",
    ]
    with pytest.raises(ValueError, match="strategy `fsdp` requires a GPU accelerator"):
        main(args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_offload_fit_on_a_gpu(
    config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if "deepspeed" in config.name and not HAS_DEEPSPEED:
        pytest.skip(NO_DEEPSPEED)
    if "nvme" in config.name:
        pytest.skip("ZeRO-Infinity needs a local NVMe path (set nvme_path) and DeepSpeed's aio op")
    from beamvq.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["beamvq"])
    cli = main(_cli_args(config, tmp_path))
    assert cli.trainer.state.finished and cli.trainer.global_step == 1
