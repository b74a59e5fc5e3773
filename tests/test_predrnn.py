"""PredRNN backbone (Wang et al. 2017 / TPAMI 2022, OpenSTL's PredRNN_Model): ST-LSTM, zigzag M."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from beamvq.backbones.base import count_parameters
from beamvq.backbones.predrnn import PredRNN
from beamvq.nn.recurrent import FORGET_BIAS, SpatioTemporalLSTMCell, patchify, unpatchify

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "backbones"


def _tiny(in_steps: int = 3, out_steps: int = 4, layers: int = 3) -> PredRNN:
    torch.manual_seed(0)
    return PredRNN(in_steps, out_steps, 1, 1, num_hidden=[6] * layers, filter_size=3, patch_size=2)


def _init_args(name: str) -> dict:
    cfg = yaml.safe_load((CONFIGS / name).read_text())
    backbone = cfg["model"]["backbone"]
    assert backbone["class_path"] == "beamvq.backbones.PredRNN"
    return backbone["init_args"]


@pytest.mark.parametrize(
    # OpenSTL README: Moving MNIST (10->10, 64x64x1, patch 4) 23.8M params / 116.0G FLOPs;
    # TaxiBJ (4->4, 32x32x2, patch 2) 23.66M / 42.40G. FLOPs = params x (H/p)(W/p) positions x
    # (T_in + T_out - 1) steps (bias-free convs; every weight is used once per position per step).
    ("steps", "channels", "grid", "patch", "ours", "published_params", "published_flops"),
    [
        (10, 1, 64, 4, 23_838_720, 23.8e6, 116.0e9),
        (4, 2, 32, 2, 23_658_496, 23.66e6, 42.40e9),
    ],
)
def test_openstl_preset_counts(
    steps: int,
    channels: int,
    grid: int,
    patch: int,
    ours: int,
    published_params: float,
    published_flops: float,
) -> None:
    with torch.device("meta"):
        model = PredRNN(
            steps, steps, channels, channels, [128] * 4, filter_size=5, patch_size=patch
        )
    n = count_parameters(model)
    assert n == ours
    assert abs(n - published_params) / published_params < 0.01
    flops = n * (grid // patch) ** 2 * (2 * steps - 1)
    assert abs(flops - published_flops) / published_flops < 1e-3


def test_yaml_presets() -> None:
    args = _init_args("predrnn_paper.yaml")
    assert args["num_hidden"] == [128, 128, 128, 128]
    assert (args["filter_size"], args["patch_size"], args["layer_norm"]) == (5, 4, False)
    with torch.device("meta"):
        assert count_parameters(PredRNN(**args)) == 23_838_720
    quick = PredRNN(**_init_args("predrnn.yaml"))
    assert count_parameters(quick) == 267_264
    assert quick.latent_dim == 32


def test_st_lstm_cell_equations() -> None:
    cell = SpatioTemporalLSTMCell(in_channels=2, num_hidden=3, filter_size=3)
    for p in cell.parameters():
        nn.init.zeros_(p)
    with torch.no_grad():  # conv_last reads C' only: h' = o * tanh(C')
        cell.conv_last.weight[:, :3, 0, 0] = torch.eye(3)
    x, h = torch.randn(1, 2, 4, 4), torch.randn(1, 3, 4, 4)
    c, m = torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4)
    out = cell(x, h, c, m)
    keep = torch.sigmoid(torch.tensor(FORGET_BIAS))
    torch.testing.assert_close(out.c, keep * c)
    torch.testing.assert_close(out.m, keep * m)
    torch.testing.assert_close(out.h, 0.5 * torch.tanh(keep * c))


def _record_cell_calls(model: PredRNN) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """(layer, M read, M written) for every cell call, in call order."""
    calls: list[tuple[int, torch.Tensor, torch.Tensor]] = []
    for layer, cell in enumerate(model.stack.cells):

        def hook(_mod: nn.Module, args: tuple, out: tuple, layer: int = layer) -> None:
            calls.append((layer, args[3], out.m))

        cell.register_forward_hook(hook)
    return calls


def test_zigzag_memory_flow() -> None:
    t_in, t_out, layers = 3, 3, 3
    model = _tiny(t_in, t_out, layers).eval()
    calls = _record_cell_calls(model)
    with torch.no_grad():
        model(torch.randn(2, t_in, 1, 8, 8))
    # T_in encoding steps + (T_out - 1) decoding steps, each running every layer bottom to top
    steps = t_in + t_out - 1
    assert [layer for layer, _, _ in calls] == list(range(layers)) * steps
    for k, (layer, m_in, _) in enumerate(calls):
        if k == 0:
            assert torch.equal(m_in, torch.zeros_like(m_in))  # zero memory before the first frame
        else:
            # layer i > 0 reads layer i - 1's new M of the same step; the bottom layer reads the
            # top layer's M of the previous step (this includes the encode -> decode hand-over)
            prev_layer, _, m_prev_out = calls[k - 1]
            assert prev_layer == (layer - 1) % layers
            assert m_in is m_prev_out
        assert not torch.equal(calls[k][2], m_in)  # every cell updates M


def test_top_memory_enters_bottom_layer_at_next_step() -> None:
    model = _tiny(out_steps=3).eval()
    with torch.no_grad():
        enc = model.encode(torch.randn(2, 3, 1, 8, 8))
        assert enc.extras["m"].shape == (2, 6, 4, 4)
        y = model.decode(enc)
        extras = {**enc.extras, "m": enc.extras["m"] + 0.5}
        y_pert = model.decode(enc._replace(extras=extras))
    # frame 1 is the readout of z alone; M reaches the output only from the next step on
    assert torch.equal(y[:, 0], y_pert[:, 0])
    assert (y[:, 1:] - y_pert[:, 1:]).abs().amax(dim=(0, 2, 3, 4)).min() > 1e-5


def _reference_rollout(model: PredRNN, x: torch.Tensor) -> torch.Tensor:
    """OpenSTL's PredRNN_Model.forward loop with the true-frame mask at 0 (test time)."""
    stack = model.stack
    frames = patchify(x, stack.patch_size)
    b, t_in, _, h, w = frames.shape
    hs = [frames.new_zeros(b, n, h, w) for n in stack.num_hidden]
    cs = [frames.new_zeros(b, n, h, w) for n in stack.num_hidden]
    memory = frames.new_zeros(b, stack.num_hidden[0], h, w)
    preds: list[torch.Tensor] = []
    for t in range(t_in + model.out_steps - 1):
        net = frames[:, t] if t < t_in else preds[-1]
        for i, cell in enumerate(stack.cells):
            hs[i], cs[i], memory = cell(net if i == 0 else hs[i - 1], hs[i], cs[i], memory)
        preds.append(stack.readout(hs[-1]))
    return unpatchify(torch.stack(preds[t_in - 1 :], dim=1), stack.patch_size)


def test_forward_equals_openstl_schedule() -> None:
    model = _tiny(3, 4).eval()
    x = torch.randn(2, 3, 1, 8, 12)
    with torch.no_grad():
        torch.testing.assert_close(model(x), _reference_rollout(model, x), rtol=0, atol=1e-6)


def test_no_future_frames() -> None:
    assert list(inspect.signature(PredRNN.forward).parameters) == ["self", "x"]
    assert list(inspect.signature(PredRNN.decode).parameters) == ["self", "enc"]
    short = _tiny(out_steps=2).eval()
    long = PredRNN(3, 5, 1, 1, num_hidden=[6] * 3, filter_size=3, patch_size=2).eval()
    long.load_state_dict(short.state_dict())
    x = torch.randn(2, 3, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(short(x), long(x)[:, :2])


def test_latent_shapes_every_output_frame() -> None:
    model = _tiny(out_steps=5).eval()
    with torch.no_grad():
        enc = model.encode(torch.randn(2, 3, 1, 8, 8))
        assert enc.z.shape == (2, 6, 4, 4)
        assert set(enc.extras) == {"h0", "h1", "c0", "c1", "c2", "m"}
        y = model.decode(enc)
        y_pert = model.decode(enc._replace(z=enc.z + 0.1 * torch.randn_like(enc.z)))
    per_frame = (y - y_pert).abs().amax(dim=(0, 2, 3, 4))
    assert bool((per_frame > 1e-5).all()), per_frame


@pytest.mark.parametrize(("t_in", "t_out", "grid"), [(2, 4, (8, 12)), (4, 1, (12, 8))])
def test_t_in_differs_from_t_out(t_in: int, t_out: int, grid: tuple[int, int]) -> None:
    model = _tiny(t_in, t_out, layers=2)
    y = model(torch.randn(2, t_in, 1, *grid))
    assert y.shape == (2, t_out, 1, *grid)
    y.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_errors() -> None:
    with pytest.raises(ValueError, match="multiples of 2"):
        _tiny()(torch.randn(1, 3, 1, 10, 7))
    with pytest.raises(ValueError, match="same num_hidden"):
        PredRNN(3, 3, 1, 1, num_hidden=[8, 16])


def test_sampling_option_from_yaml_as_the_cli_builds_it() -> None:
    # LightningCLI builds model.backbone with jsonargparse's subclass arguments: the sampling
    # dataclass reads as a nested mapping, and None (the default) keeps the free rollout
    from jsonargparse import ArgumentParser

    from beamvq.backbones.base import Backbone
    from beamvq.nn.sampling import ScheduledSampling

    parser = ArgumentParser()
    parser.add_subclass_arguments(Backbone, "backbone")
    args = {"in_steps": 3, "out_steps": 2, "in_channels": 1, "out_channels": 1,
            "num_hidden": [4, 4], "filter_size": 3, "patch_size": 2}  # fmt: skip
    for sampling, expected in [(None, None), ({"mode": "reverse"}, "reverse")]:
        cfg = parser.parse_object(
            {
                "backbone": {
                    "class_path": "beamvq.backbones.PredRNN",
                    "init_args": {**args, "sampling": sampling},
                }
            }  # fmt: skip
        )
        model = parser.instantiate_classes(cfg).backbone
        assert isinstance(model, PredRNN)
        if expected is None:
            assert model.sampling is None
        else:
            assert model.sampling == ScheduledSampling(mode=expected)
