"""Importing OpenSTL (SimVP-v2/gSTA, TAU, PredRNN) and neuraloperator (FNO) weights.

No download: each foreign state dict is made here from a beamvq backbone with random weights,
its tensors renamed to the foreign names, in the foreign order and layout, that
tests/fixtures/foreign_weights.txt records (printed by running OpenSTL's and neuraloperator's own
code; the file names the commits). Converting back must put every tensor in its place and give
the same forward; weights that do not fit must stop with a message naming the parameter.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from beamvq.backbones import FNO, TAU, ConvLSTM, PredRNN, SimVPv2
from beamvq.importers import (
    FNO_DIFFERENCES,
    WeightMismatch,
    import_neuraloperator_fno,
    import_openstl,
)
from beamvq.importers.checkpoint import load_weights_file

FIXTURES = Path(__file__).parent / "fixtures" / "foreign_weights.txt"


def _foreign_layouts() -> dict[str, list[tuple[str, tuple[int, ...], bool]]]:
    out: dict[str, list[tuple[str, tuple[int, ...], bool]]] = {}
    section = ""
    for line in FIXTURES.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            out[section] = []
            continue
        name, _, rest = line.partition(" ")
        shape, _, kind = rest.partition(" ")
        dims = tuple(int(d) for d in shape.split(",") if d)
        out[section].append((name, dims, kind == "complex"))
    return out


FOREIGN = _foreign_layouts()


def _randomized(module: nn.Module, seed: int) -> nn.Module:
    """Every floating tensor random (BatchNorm variances positive), so nothing matches by luck."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if t.dtype.is_floating_point:
                t.copy_(torch.rand(t.shape, generator=g) + 0.5 if "running_var" in name else
                        torch.randn(t.shape, generator=g) * 0.3)  # fmt: skip
            elif "num_batches_tracked" in name:
                t.fill_(7)
    return module.eval()


def _by_position(ours: dict[str, Tensor], groups: list[str], layout: str) -> dict[str, Tensor]:
    """Our tensors, module group by module group, under the foreign names in the foreign order
    (within a group both frameworks register the same layers in the same order)."""
    tensors = [v for g in groups for k, v in ours.items() if k.startswith(g)]
    names = FOREIGN[layout]
    assert len(tensors) == len(names) == len(ours)
    for tensor, (name, shape, _) in zip(tensors, names):
        assert tuple(tensor.shape) == shape, name
    return {name: tensor.clone() for tensor, (name, _, _) in zip(tensors, names)}


def _assert_lands_in_place(converted: dict[str, Tensor], original: nn.Module) -> None:
    mine = original.state_dict()
    assert list(converted) == list(mine) or set(converted) == set(mine)
    for key, value in mine.items():
        assert torch.equal(converted[key], value), key


def _same_forward(original: nn.Module, converted: dict[str, Tensor], fresh: nn.Module,
                  x: Tensor) -> None:  # fmt: skip
    fresh.load_state_dict(converted)
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), original(x))


SIMVP_ARGS = {"hid_s": 4, "hid_t": 8, "n_s": 2, "n_t": 2, "mlp_ratio": 2.0}
SIMVP_GROUPS = ["encoder.", "decoder.", "translator."]


@pytest.mark.parametrize(("cls", "layout"), [(SimVPv2, "gSTA"), (TAU, "tau")])
def test_openstl_simvp_and_tau_weights_land_in_place(cls: type, layout: str) -> None:
    original = _randomized(cls(4, 4, 1, 1, **SIMVP_ARGS), seed=1)
    foreign = _by_position(original.state_dict(), SIMVP_GROUPS, layout)
    # as in a Lightning checkpoint of OpenSTL's method: every name under "model."
    converted = import_openstl(
        {f"model.{k}": v for k, v in foreign.items()}, cls(4, 4, 1, 1, **SIMVP_ARGS)
    )
    _assert_lands_in_place(converted, original)
    _same_forward(original, converted, cls(4, 4, 1, 1, **SIMVP_ARGS), torch.randn(2, 4, 1, 8, 8))


def _openstl_patch_index(c: int, p1: int, p2: int, patch: int, channels: int) -> int:
    """OpenSTL's reshape_patch stacks patch channels as (p1, p2, c), c fastest."""
    return (p1 * patch + p2) * channels + c


def test_openstl_predrnn_weights_land_in_place_with_patch_channels_reordered() -> None:
    patch, channels = 2, 2
    original = _randomized(PredRNN(3, 2, channels, channels, num_hidden=[4, 4], filter_size=3,
                                   patch_size=patch), seed=2)  # fmt: skip
    foreign = _by_position(original.state_dict(), ["stack.cells.", "stack.readout."], "predrnn")
    # beamvq's patchify stacks (c, p1, p2): move every patch channel to OpenSTL's position
    ours_to_theirs = [
        _openstl_patch_index(c, a, b, patch, channels)
        for c in range(channels) for a in range(patch) for b in range(patch)
    ]  # fmt: skip
    for name, dim in (("cell_list.0.conv_x.0.weight", 1), ("conv_last.weight", 0)):
        ours = foreign[name]
        theirs = torch.empty_like(ours)
        for i, j in enumerate(ours_to_theirs):
            theirs.select(dim, j).copy_(ours.select(dim, i))
        foreign[name] = theirs
    assert ours_to_theirs != sorted(ours_to_theirs)  # the layouts do differ for 2 channels
    fresh = PredRNN(3, 2, channels, channels, num_hidden=[4, 4], filter_size=3, patch_size=patch)
    converted = import_openstl(foreign, fresh)
    _assert_lands_in_place(converted, original)
    fresh.load_state_dict(converted)
    x = torch.randn(2, 3, channels, 8, 8)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), original(x))


FNO_ARGS = {"modes": 4, "width": 6, "num_layers": 3, "projection_width": 24}


def _neuraloperator_state(original: FNO) -> dict[str, object]:
    """neuraloperator's FNO state dict (fixture order and layout) from our FNO's tensors."""
    ours = original.state_dict()
    m = original.modes
    state: dict[str, object] = {}
    for i in range(len(original.layers)):
        w1 = torch.view_as_complex(ours[f"layers.{i}.spectral.weights1"].contiguous())
        w2 = torch.view_as_complex(ours[f"layers.{i}.spectral.weights2"].contiguous())
        # fft-shifted first axis: rows 0..m-1 are frequencies -m..-1, rows m..2m-1 are 0..m-1
        state[f"fno_blocks.convs.{i}.bias"] = ours[f"layers.{i}.pointwise.bias"].reshape(-1, 1, 1)
        state[f"fno_blocks.convs.{i}.weight.tensor"] = torch.cat([w2, w1], dim=2)
        assert state[f"fno_blocks.convs.{i}.weight.tensor"].shape[2:] == (2 * m, m)
    for i in range(len(original.layers)):
        state[f"fno_blocks.fno_skips.{i}.conv.weight"] = ours[f"layers.{i}.pointwise.weight"][
            ..., 0
        ]
    for ours_name, theirs in (("lift", "lifting.fcs.0"), ("project_hidden", "projection.fcs.0"),
                              ("project_out", "projection.fcs.1")):  # fmt: skip
        state[f"{theirs}.weight"] = ours[f"{ours_name}.weight"].unsqueeze(-1)
        state[f"{theirs}.bias"] = ours[f"{ours_name}.bias"]
    layout = [(k, tuple(v.shape), torch.is_complex(v)) for k, v in state.items()]
    assert layout == FOREIGN["fno"]
    # what neuraloperator's BaseModel.state_dict adds: its constructor's arguments
    state["_metadata"] = {"n_modes": (2 * m, 2 * m - 1), "use_channel_mlp": False}
    return state


def test_neuraloperator_fno_weights_land_in_place() -> None:
    original = _randomized(FNO(3, 2, 2, 2, **FNO_ARGS), seed=3)
    converted = import_neuraloperator_fno(
        _neuraloperator_state(original), FNO(3, 2, 2, 2, **FNO_ARGS)
    )
    _assert_lands_in_place(converted, original)
    _same_forward(original, converted, FNO(3, 2, 2, 2, **FNO_ARGS), torch.randn(2, 3, 2, 16, 16))
    # the two known differences are reported, named
    assert any("GELU twice" in d for d in FNO_DIFFERENCES)
    assert any("linspace(0, 1, n + 1)[:-1]" in d for d in FNO_DIFFERENCES)


# -- refusals: the message names the first parameter that does not fit ----------------------------


def _simvp_foreign() -> dict[str, Tensor]:
    return _by_position(SimVPv2(4, 4, 1, 1, **SIMVP_ARGS).state_dict(), SIMVP_GROUPS, "gSTA")


def test_wrong_shape_is_refused_naming_the_parameter() -> None:
    foreign = _simvp_foreign()
    foreign["hid.enc.0.block.mlp.fc1.weight"] = torch.zeros(33, 16, 1, 1)
    with pytest.raises(WeightMismatch, match=re.escape(
        "OpenSTL parameter hid.enc.0.block.mlp.fc1.weight has shape (33, 16, 1, 1), but "
        "SimVPv2's translator.layers.0.mlp.fc1.weight has shape (32, 16, 1, 1)"
    )):  # fmt: skip
        import_openstl(foreign, SimVPv2(4, 4, 1, 1, **SIMVP_ARGS))


def test_backbone_config_of_other_sizes_is_refused_at_the_first_parameter() -> None:
    # hid_s 6 instead of the trained 4: the very first encoder kernel differs
    with pytest.raises(
        WeightMismatch, match=r"enc\.enc\.0\.conv\.conv\.weight has shape \(4, 1, 3, 3\)"
    ):
        import_openstl(_simvp_foreign(), SimVPv2(4, 4, 1, 1, **{**SIMVP_ARGS, "hid_s": 6}))
    # three translator blocks instead of two: OpenSTL's last reduction lands on a block
    with pytest.raises(WeightMismatch, match=re.escape(
        "hid.enc.1.reduction.weight (16, 8, 1, 1) maps to translator.layers.3.weight, which "
        "SimVPv2 does not have"
    )):  # fmt: skip
        import_openstl(_simvp_foreign(), SimVPv2(4, 4, 1, 1, **{**SIMVP_ARGS, "n_t": 3}))


def test_unknown_missing_and_unsupported_parameters_are_named() -> None:
    foreign = _simvp_foreign()
    foreign["dec.extra.weight"] = torch.zeros(3)
    with pytest.raises(WeightMismatch, match=r"dec\.extra\.weight \(3,\) has no place in SimVPv2"):
        import_openstl(foreign, SimVPv2(4, 4, 1, 1, **SIMVP_ARGS))
    foreign = _simvp_foreign()
    del foreign["dec.readout.bias"]
    with pytest.raises(WeightMismatch, match=r"SimVPv2's decoder\.readout\.bias \(1,\) gets no"):
        import_openstl(foreign, SimVPv2(4, 4, 1, 1, **SIMVP_ARGS))
    with pytest.raises(WeightMismatch, match="in_steps=4, out_steps=6"):
        import_openstl(_simvp_foreign(), SimVPv2(4, 6, 1, 1, **SIMVP_ARGS))
    with pytest.raises(WeightMismatch, match="ConvLSTM"):
        import_openstl(_simvp_foreign(), ConvLSTM(4, 4, 1, 1))


def test_predrnn_layer_norm_and_fno_channel_mlp_are_refused_with_the_reason() -> None:
    predrnn = PredRNN(3, 2, 2, 2, num_hidden=[4, 4], filter_size=3, patch_size=2)
    foreign = _by_position(predrnn.state_dict(), ["stack.cells.", "stack.readout."], "predrnn")
    foreign = {"cell_list.0.conv_x.1.weight": torch.ones(28, 4, 4), **foreign}
    with pytest.raises(
        WeightMismatch, match=r"conv_x\.1\.weight: a PredRNN trained with layer_norm"
    ):
        import_openstl(foreign, predrnn)
    fno = FNO(3, 2, 2, 2, **FNO_ARGS)
    state = _neuraloperator_state(fno)
    state["fno_blocks.channel_mlp.0.fcs.0.weight"] = torch.zeros(3, 6, 1)
    with pytest.raises(WeightMismatch, match=r"channel_mlp\.0\.fcs\.0\.weight: channel MLPs"):
        import_neuraloperator_fno(state, fno)


def test_fno_modes_without_a_beamvq_counterpart_are_refused_with_the_n_modes_that_fit() -> None:
    fno = FNO(3, 2, 2, 2, **FNO_ARGS)
    state = _neuraloperator_state(fno)
    # n_modes=(8, 8) keeps 8 // 2 + 1 = 5 columns: one more than modes=4 has
    state["fno_blocks.convs.0.weight.tensor"] = torch.zeros(6, 6, 8, 5, dtype=torch.complex64)
    with pytest.raises(WeightMismatch, match=re.escape(
        "fno_blocks.convs.0.weight.tensor keeps 8 x 5 modes; beamvq's FNO with modes=4 needs "
        "8 x 4 (neuraloperator n_modes=(8, 7) or (8, 6))"
    )):  # fmt: skip
        import_neuraloperator_fno(state, fno)


# -- files -----------------------------------------------------------------------------------------


def foreign_function() -> None:
    """Stands for a function of another library that a weights file refers to."""


def test_weights_file_with_foreign_python_objects_loads_tensors_only(tmp_path: Path) -> None:
    original = _randomized(SimVPv2(4, 4, 1, 1, **SIMVP_ARGS), seed=4)
    foreign = _by_position(original.state_dict(), SIMVP_GROUPS, "gSTA")
    path = tmp_path / "openstl.ckpt"
    torch.save(
        {"state_dict": {f"model.{k}": v for k, v in foreign.items()}, "epoch": 3,
         "hyper_parameters": {"act": foreign_function}},
        path,
    )  # fmt: skip
    with pytest.raises(pickle.UnpicklingError):  # what weights_only alone does with it
        torch.load(path, weights_only=True)
    state = load_weights_file(path)
    assert set(state) == {f"model.{k}" for k in foreign}
    _assert_lands_in_place(import_openstl(state, SimVPv2(4, 4, 1, 1, **SIMVP_ARGS)), original)
    with pytest.raises(FileNotFoundError, match="--weights"):
        load_weights_file(tmp_path / "missing.pth")
    torch.save({"epoch": 1}, tmp_path / "empty.pth")
    with pytest.raises(ValueError, match="holds no tensors"):
        load_weights_file(tmp_path / "empty.pth")


# -- the command: a checkpoint that `beamvq predict --ckpt_path` runs -----------------------------

SMALL = """
model:
  backbone:
    class_path: beamvq.backbones.SimVPv2
    init_args: {in_steps: 4, out_steps: 4, in_channels: 1, out_channels: 1, hid_s: 4, hid_t: 8,
                n_s: 2, n_t: 2, mlp_ratio: 2.0}
  bottleneck:
    init_args: {codebook_size: 32}
data:
  init_args:
    windows: {in_steps: 4, out_steps: 4}
    loader: {batch_size: 4}
    generator:
      init_args: {n_trajectories: 6, resolution: 16, n_frames: 10}
"""


def _configs(tmp_path: Path) -> list[str]:
    root = Path(__file__).resolve().parents[1]
    text = (root / "configs" / "quickstart.yaml").read_text()
    text = text.replace("runs/quickstart", str(tmp_path / "run"))
    text = text.replace("data/navier_stokes_64.nc", str(tmp_path / "ns.nc"))
    (tmp_path / "quickstart.yaml").write_text(text)
    (tmp_path / "small.yaml").write_text(SMALL)
    return ["--config", str(tmp_path / "quickstart.yaml"), "--config", str(tmp_path / "small.yaml")]


def test_import_weights_command_writes_a_checkpoint_that_predict_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    import numpy as np
    import xarray as xr

    from beamvq.cli import main
    from beamvq.importers import importing_command
    from beamvq.module import ForecastModule

    monkeypatch.chdir(tmp_path)
    configs = _configs(tmp_path)
    original = _randomized(SimVPv2(4, 4, 1, 1, **SIMVP_ARGS), seed=5)
    torch.save(_by_position(original.state_dict(), SIMVP_GROUPS, "gSTA"), tmp_path / "w.pth")
    out = tmp_path / "imported.ckpt"
    args = ["--from", "openstl", *configs, "--weights", str(tmp_path / "w.pth"), "--out", str(out)]
    # refusals first: the statistics' channel count, then an existing --out
    assert importing_command([*args, "--mean", "0", "1", "--std", "1", "1"]) == 2
    assert "--mean: 2 value(s), but the backbone outputs 1 channel(s)" in capsys.readouterr().err
    assert importing_command([*args, "--stats-from-data"]) == 0
    assert "78 openstl tensors as model.backbone of SimVPv2" in capsys.readouterr().out
    assert importing_command([*args, "--stats-from-data"]) == 2  # no --overwrite

    ckpt = torch.load(out, weights_only=True)
    assert ckpt["hyper_parameters"]["backbone"]["init_args"]["hid_t"] == 8
    assert ckpt["beamvq"]["imported"]["from"] == "openstl"
    # the statistics are the training split's of the configured data (as `beamvq fit` has them)
    with xr.open_dataset(tmp_path / "ns.nc") as ds:
        data = ds["vorticity"].values
    mean, std = ckpt["state_dict"]["normalizer.mean"], ckpt["state_dict"]["normalizer.std"]
    assert bool(ckpt["state_dict"]["normalizer.ready"]) and 0 < float(std) < float(data.std()) * 2
    module = ForecastModule.load_from_checkpoint(out).eval()
    for key, value in original.state_dict().items():
        assert torch.equal(module.model.backbone.state_dict()[key], value), key

    main(["predict", *configs, "--ckpt_path", str(out), "--trainer.limit_predict_batches", "1"])
    with (
        xr.open_dataset(tmp_path / "run" / "predictions.nc") as pred,
        xr.open_dataset(tmp_path / "ns.nc") as ds,
    ):
        for i in range(pred.sizes["sample"]):
            window = ds["vorticity"].sel(trajectory=int(pred["trajectory"][i]))
            end = int(np.flatnonzero(window["time"].values == float(pred["init_time"][i]))[0])
            x = torch.as_tensor(window.values[end - 3 : end + 1])[None, :, None]
            with torch.no_grad():
                expected = original((x - mean) / std) * std + mean
            got = torch.as_tensor(pred["vorticity"].values[i])
            torch.testing.assert_close(got, expected[0, :, 0], rtol=1e-5, atol=1e-5)
