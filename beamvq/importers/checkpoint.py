"""Reading a foreign weights file and writing the beamvq checkpoint that holds its weights.

What the written file relies on (the parts of a beamvq checkpoint that ``beamvq predict
--ckpt_path`` reads, see ``beamvq/module.py``):

- ``state_dict``: every tensor of the ``ForecastModule`` that the configuration builds, with the
  converted backbone under ``model.backbone.*`` and the normalization buffers
  ``normalizer.mean``, ``normalizer.std`` (per output channel) and ``normalizer.ready``; the rest (a bottleneck's fresh code bank,
  the empty lat-lon buffers) as the freshly built module holds it.
- ``hyper_parameters``: the configuration's ``model`` section as LightningCLI records it
  (``backbone``/``bottleneck`` as ``class_path`` + ``init_args``, defaults filled in, and
  ``_instantiator``), so ``ForecastModule.load_from_checkpoint`` rebuilds the module and the CLI's
  class check compares the configured backbone with the checkpoint's.
- ``beamvq``: the model identity (``beamvq.checkpointing.model_identity``) checked on load,
  and where the weights came from.
- ``pytorch-lightning_version``, ``epoch`` and ``global_step`` as Lightning writes them.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytorch_lightning as pl
import torch
import yaml
from jsonargparse import ArgumentParser, Namespace
from torch import Tensor

from beamvq.checkpointing import CKPT_KEY, model_identity
from beamvq.module import ForecastModule

log = logging.getLogger(__name__)

INSTANTIATOR = "pytorch_lightning.cli.instantiate_module"


class _ForeignObject:
    """Stands in for a Python object of another library inside a weights file (neuraloperator's
    ``_metadata`` holds its constructor's functions and classes), so the tensors load with
    ``weights_only=True`` and nothing of that library runs or has to be installed."""

    qualified_name = ""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<{self.qualified_name} from the weights file, not loaded>"


def _placeholder(name: str) -> type:
    return type(name.rsplit(".", 1)[-1], (_ForeignObject,), {"qualified_name": name})


def load_weights_file(path: Path) -> dict[str, Any]:
    """The state dict inside ``path``: a plain state dict, or the ``state_dict`` of a checkpoint
    (Lightning, OpenSTL). Loaded with ``weights_only=True``; Python objects of other libraries
    in the file become inert placeholders."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--weights: file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        log.info("%s: %d Python object(s) of other libraries kept as placeholders: %s", path,
                 len(names), ", ".join(names))  # fmt: skip
        with torch.serialization.safe_globals([(_placeholder(n), n) for n in names]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(obj, Mapping):
        raise ValueError(f"--weights {path}: expected a state dict, got a {type(obj).__name__}")
    if any(isinstance(v, Tensor) for v in obj.values()):
        return dict(obj)
    for key in ("state_dict", "model_state_dict", "model"):
        inner = obj.get(key)
        if isinstance(inner, Mapping) and any(isinstance(v, Tensor) for v in inner.values()):
            return dict(inner)
    raise ValueError(
        f"--weights {path}: holds no tensors at its top level nor under state_dict / "
        f"model_state_dict / model; its keys: {sorted(map(str, obj))[:10]}"
    )


def _sections(configs: Sequence[Path], key: str) -> list[dict[str, Any]]:
    out = []
    for path in configs:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"--config: file not found: {path}")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, Mapping):
            raise ValueError(f"--config {path}: not a YAML mapping")
        if data.get(key) is not None:
            out.append(dict(data[key]))
    if not out:
        raise ValueError(
            f"--config: none of {[str(p) for p in configs]} has a `{key}:` section "
            "(e.g. configs/backbones/simvp.yaml holds model.backbone)"
        )
    return out


def _compose(parser: ArgumentParser, key: str, sections: list[dict[str, Any]]) -> Namespace:
    # later configs override earlier ones, with jsonargparse's rules (a new class_path resets
    # its init_args), as LightningCLI composes repeated --config
    cfg = None
    for section in sections:
        cfg = parser.parse_object({key: section}, cfg_base=cfg, defaults=cfg is None)
    assert cfg is not None
    return cfg


class BuiltModule(NamedTuple):
    """A ``ForecastModule`` built from configuration, and that configuration as hparams."""

    module: ForecastModule
    hparams: dict[str, Any]


def build_module(configs: Sequence[Path]) -> BuiltModule:
    """The ``ForecastModule`` of the ``model`` sections of ``configs`` (composed in order)."""
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(ForecastModule, "model", fail_untyped=False)
    cfg = _compose(parser, "model", _sections(configs, "model"))
    hparams = yaml.safe_load(parser.dump(cfg, skip_none=False))["model"]
    with warnings.catch_warnings():
        # save_hyperparameters() sees the backbone object here (LightningCLI hands it the
        # configuration instead); the checkpoint records the configuration below
        warnings.filterwarnings("ignore", message=r"Attribute '\w+' is an instance of `nn.Module`")
        module = parser.instantiate_classes(cfg).model
    return BuiltModule(module, {**hparams, "_instantiator": INSTANTIATOR})


def data_statistics(
    configs: Sequence[Path], data_path: Path | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std of the training split of the configs' ``data`` section (the
    statistics ``beamvq fit`` with these configs would use); ``data_path`` replaces
    ``data.init_args.path``."""
    sections = _sections(configs, "data")
    if data_path is not None:
        sections.append({"init_args": {"path": str(data_path)}})
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(pl.LightningDataModule, "data", fail_untyped=False)
    dm = parser.instantiate_classes(_compose(parser, "data", sections)).data
    dm.prepare_data()
    dm.setup("fit")
    norm = getattr(dm, "normalization", None)
    if norm is None:
        raise ValueError(f"{type(dm).__name__} has no normalization statistics after setup")
    return np.asarray(norm.mean, np.float32), np.asarray(norm.std, np.float32)


def _checked_statistics(mean: Sequence[float] | np.ndarray, std: Sequence[float] | np.ndarray,
                        channels: int) -> tuple[Tensor, Tensor]:  # fmt: skip
    mean_t = torch.as_tensor(np.asarray(mean, np.float32)).reshape(-1)
    std_t = torch.as_tensor(np.asarray(std, np.float32)).reshape(-1)
    for flag, values in (("--mean", mean_t), ("--std", std_t)):
        if values.numel() != channels:
            raise ValueError(
                f"{flag}: {values.numel()} value(s), but the backbone outputs {channels} "
                "channel(s): give one per channel (variable and level), in the data's order"
            )
    if not bool(torch.isfinite(mean_t).all()) or not bool((std_t > 0).all()):
        raise ValueError(
            f"--mean must be finite and --std > 0; got {mean_t.tolist()}, {std_t.tolist()}"
        )
    return mean_t, std_t


def write_checkpoint(
    out: Path,
    built: BuiltModule,
    backbone_state: Mapping[str, Tensor],
    mean: Sequence[float] | np.ndarray,
    std: Sequence[float] | np.ndarray,
    source: Mapping[str, Any],
) -> Path:
    """Write ``out``: ``built``'s module with ``backbone_state`` as its backbone and the given
    normalization; ``source`` (where the weights came from) is recorded under ``beamvq``."""
    module = built.module
    module.model.backbone.load_state_dict(dict(backbone_state), strict=True)
    mean_t, std_t = _checked_statistics(mean, std, int(module.normalizer.mean.numel()))
    module.set_normalization(mean_t, std_t)
    state = module.state_dict()
    checkpoint = {
        "epoch": 0,
        "global_step": 0,
        "pytorch-lightning_version": pl.__version__,
        "state_dict": {k: v.detach().cpu().clone() for k, v in state.items()},
        "hparams_name": "kwargs",
        "hyper_parameters": built.hparams,
        CKPT_KEY: {"model": model_identity(module.model), "data": None, "imported": dict(source)},
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    torch.save(checkpoint, tmp)
    os.replace(tmp, out)
    return out


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


__all__ = [
    "BuiltModule",
    "build_module",
    "data_statistics",
    "file_sha256",
    "load_weights_file",
    "write_checkpoint",
]
