"""ConvLSTM backbone (Shi et al. 2015, OpenSTL's ConvLSTM_Model) and the shared recurrent stack."""

from __future__ import annotations

import inspect
import math
from pathlib import Path

import pytest
import torch
import yaml

from beamvq.backbones.base import Encoded, count_parameters
from beamvq.backbones.convlstm import ConvLSTM
from beamvq.backbones.predrnn import PredRNN
from beamvq.nn.recurrent import FORGET_BIAS, ConvLSTMCell, patchify, unpatchify
from beamvq.nn.sampling import ScheduledSampling, true_frame_probabilities

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "backbones"


def _tiny(in_steps: int = 3, out_steps: int = 4, c_in: int = 1, c_out: int = 1) -> ConvLSTM:
    torch.manual_seed(0)
    return ConvLSTM(
        in_steps, out_steps, c_in, c_out, num_hidden=[6, 8], filter_size=3, patch_size=2
    )


def _init_args(name: str) -> dict:
    cfg = yaml.safe_load((CONFIGS / name).read_text())
    backbone = cfg["model"]["backbone"]
    assert backbone["class_path"] == "beamvq.backbones.ConvLSTM"
    return backbone["init_args"]


def _dead_openstl_weights(num_hidden: list[int], filter_size: int) -> int:
    """OpenSTL ConvLSTMCell's never-used conv_o (2h->h, kxk) and conv_last (2h->h, 1x1)."""
    return sum(2 * h * h * filter_size**2 + 2 * h * h for h in num_hidden)


@pytest.mark.parametrize(
    # OpenSTL README: Moving MNIST (10->10, 64x64x1, patch 4) 15.0M params / 56.8G FLOPs;
    # TaxiBJ (4->4, 32x32x2, patch 2) 14.98M / 20.74G. FLOPs are multiply-accumulates of the
    # (T_in + T_out - 1) steps OpenSTL runs on (H/p)x(W/p) maps; bias-free convs, so
    # FLOPs = params x positions x steps.
    ("steps", "channels", "grid", "patch", "ours", "published_params", "published_flops"),
    [
        (10, 1, 64, 4, 11_675_648, 15.0e6, 56.8e9),
        (4, 2, 32, 2, 11_572_224, 14.98e6, 20.74e9),
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
    hidden = [128, 128, 128, 128]
    with torch.device("meta"):
        model = ConvLSTM(steps, steps, channels, channels, hidden, filter_size=5, patch_size=patch)
    n = count_parameters(model)
    assert n == ours
    # Same computation as OpenSTL: its published FLOPs follow from exactly our weights ...
    positions = (grid // patch) ** 2
    flops = n * positions * (2 * steps - 1)
    assert abs(flops - published_flops) / published_flops < 1e-3
    # ... while its published parameter count also includes the cell weights it never uses.
    with_dead = n + _dead_openstl_weights(hidden, 5)
    assert abs(with_dead - published_params) / published_params < 0.01
    assert ours < 0.8 * published_params  # the dead weights are not a rounding matter


def test_paper_yaml_is_the_moving_mnist_preset() -> None:
    args = _init_args("convlstm_paper.yaml")
    assert args["num_hidden"] == [128, 128, 128, 128]
    assert (args["filter_size"], args["patch_size"], args["layer_norm"]) == (5, 4, False)
    with torch.device("meta"):
        assert count_parameters(ConvLSTM(**args)) == 11_675_648


def test_quickstart_yaml_size() -> None:
    model = ConvLSTM(**_init_args("convlstm.yaml"))
    assert count_parameters(model) == 129_536
    assert model.latent_dim == 32


def test_patchify_roundtrip_and_layout() -> None:
    x = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).reshape(1, 2, 3, 4, 6)
    p = patchify(x, 2)
    assert p.shape == (1, 2, 12, 2, 3)
    # channel (c, p1, p2) of patch (i, j) is pixel (2i + p1, 2j + p2) of channel c
    assert p[0, 1, 1 * 4 + 1 * 2 + 0, 1, 2] == x[0, 1, 1, 3, 4]
    assert torch.equal(unpatchify(p, 2), x)


def test_cell_equations_with_forget_bias() -> None:
    cell = ConvLSTMCell(in_channels=2, num_hidden=3, filter_size=3)
    for p in cell.parameters():
        torch.nn.init.zeros_(p)
    x, h = torch.randn(1, 2, 4, 4), torch.randn(1, 3, 4, 4)
    c = torch.randn(1, 3, 4, 4)
    out = cell(x, h, c)
    # zero pre-activations: i = o = 1/2, g = 0, f = sigmoid(forget bias)
    c_expected = torch.sigmoid(torch.tensor(FORGET_BIAS)) * c
    torch.testing.assert_close(out.c, c_expected)
    torch.testing.assert_close(out.h, 0.5 * torch.tanh(c_expected))


def test_encode_layout() -> None:
    model = _tiny()
    enc = model.encode(torch.randn(2, 3, 1, 8, 12))
    assert isinstance(enc, Encoded)
    assert enc.z.shape == (2, 8, 4, 6)
    assert model.latent_dim == 8
    assert set(enc.extras) == {"h0", "c0", "c1"}  # the top layer's h is z itself
    assert enc.extras["h0"].shape == enc.extras["c0"].shape == (2, 6, 4, 6)
    assert enc.extras["c1"].shape == (2, 8, 4, 6)


def _reference_rollout(model: ConvLSTM, x: torch.Tensor) -> torch.Tensor:
    """OpenSTL's ConvLSTM_Model.forward loop with the true-frame mask at 0 (test time)."""
    stack = model.stack
    frames = patchify(x, stack.patch_size)
    b, t_in, _, h, w = frames.shape
    hs = [frames.new_zeros(b, n, h, w) for n in stack.num_hidden]
    cs = [frames.new_zeros(b, n, h, w) for n in stack.num_hidden]
    preds: list[torch.Tensor] = []
    for t in range(t_in + model.out_steps - 1):
        net = frames[:, t] if t < t_in else preds[-1]
        for i, cell in enumerate(stack.cells):
            hs[i], cs[i] = cell(net if i == 0 else hs[i - 1], hs[i], cs[i])
        preds.append(stack.readout(hs[-1]))
    return unpatchify(torch.stack(preds[t_in - 1 :], dim=1), stack.patch_size)


def test_forward_equals_openstl_schedule() -> None:
    model = _tiny(in_steps=3, out_steps=4).eval()
    x = torch.randn(2, 3, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(x), _reference_rollout(model, x), rtol=0, atol=1e-6)


def test_no_future_frames() -> None:
    # No argument can carry a future frame ...
    assert list(inspect.signature(ConvLSTM.forward).parameters) == ["self", "x"]
    assert list(inspect.signature(ConvLSTM.decode).parameters) == ["self", "enc"]
    # ... and each output frame depends only on the past: a longer rollout with the same weights
    # reproduces the shorter one exactly (frame k never waits for anything after it).
    short = _tiny(out_steps=2).eval()
    long = ConvLSTM(3, 6, 1, 1, num_hidden=[6, 8], filter_size=3, patch_size=2).eval()
    long.load_state_dict(short.state_dict())
    x = torch.randn(2, 3, 1, 8, 8)
    with torch.no_grad():
        y_short, y_long = short(x), long(x)
        assert torch.equal(y_short, y_long[:, :2])
        assert torch.equal(long(x), y_long)  # deterministic in eval


def test_latent_shapes_every_output_frame() -> None:
    model = _tiny(out_steps=5).eval()
    with torch.no_grad():
        enc = model.encode(torch.randn(2, 3, 1, 8, 8))
        y = model.decode(enc)
        y_pert = model.decode(enc._replace(z=enc.z + 0.1 * torch.randn_like(enc.z)))
    per_frame = (y - y_pert).abs().amax(dim=(0, 2, 3, 4))
    assert per_frame.shape == (5,)
    assert bool((per_frame > 1e-5).all()), per_frame


@pytest.mark.parametrize(("t_in", "t_out", "grid"), [(2, 5, (8, 12)), (5, 1, (12, 8))])
def test_t_in_differs_from_t_out(t_in: int, t_out: int, grid: tuple[int, int]) -> None:
    model = _tiny(t_in, t_out)
    y = model(torch.randn(2, t_in, 1, *grid))
    assert y.shape == (2, t_out, 1, *grid)
    y.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_different_in_and_out_channels_feed_back_an_input_frame() -> None:
    model = _tiny(c_in=3, c_out=1)
    assert model.stack.feedback is not None
    assert model.stack.feedback.out_channels == 3 * 2 * 2
    y = model(torch.randn(2, 3, 3, 8, 8))
    assert y.shape == (2, 4, 1, 8, 8)
    y.sum().backward()
    assert model.stack.feedback.weight.grad.abs().sum() > 0
    # with a single output frame nothing is fed back: no feedback head to leave untrained
    assert _tiny(out_steps=1, c_in=3, c_out=1).stack.feedback is None
    assert _tiny(c_in=1, c_out=1).stack.feedback is None
    single = _tiny(out_steps=1, c_in=3, c_out=1)
    enc = single.encode(torch.randn(1, 3, 3, 8, 8))
    with pytest.raises(ValueError, match="cannot roll out 3 steps"):
        single.stack.decode(enc.z, enc.extras, steps=3)


def test_layer_norm_variant_is_grid_free() -> None:
    torch.manual_seed(0)
    model = ConvLSTM(2, 2, 1, 1, num_hidden=[4], filter_size=3, patch_size=2, layer_norm=True)
    for grid in ((8, 8), (12, 20)):
        assert model(torch.randn(1, 2, 1, *grid)).shape == (1, 2, 1, *grid)


def test_grid_and_argument_errors() -> None:
    model = _tiny()
    with pytest.raises(ValueError, match="multiples of 2"):
        model(torch.randn(1, 3, 1, 8, 9))
    with pytest.raises(ValueError, match="multiples of 4"):
        ConvLSTM(3, 3, 1, 1, patch_size=4).check_grid(64, 62)
    with pytest.raises(ValueError, match="odd"):
        ConvLSTM(3, 3, 1, 1, filter_size=4)
    with pytest.raises(ValueError, match="num_hidden"):
        ConvLSTM(3, 3, 1, 1, num_hidden=[])


# -- (reverse) scheduled sampling (beamvq/nn/sampling.py), shared by ConvLSTM and PredRNN ------
def _openstl_eta(itr: int, schedule: ScheduledSampling, total: int = 80_000) -> tuple[float, float]:
    """OpenSTL's schedules (predrnn_utils.py) at iteration ``itr`` of a ``total``-iteration run,
    with its Moving-MNIST settings expressed as our fractions: (encoder, decoder) probabilities."""
    if schedule.mode == "scheduled":
        stop, rate = 50_000, 0.00002
        eta = 1.0 - rate * itr if itr < stop else 0.0  # eta -= rate once per iteration
        return 1.0, max(0.0, eta)
    step1, step2, alpha = 25_000, 50_000, 5_000
    if itr < step1:
        return 0.5, 0.5
    if itr < step2:
        return (1.0 - 0.5 * math.exp(-(itr - step1) / alpha),
                0.5 - (0.5 / (step2 - step1)) * (itr - step1))  # fmt: skip
    return 1.0, 0.0


@pytest.mark.parametrize("mode", ["scheduled", "reverse"])
@pytest.mark.parametrize("itr", [0, 10_000, 25_000, 30_000, 49_999, 50_000, 80_000])
def test_schedule_matches_openstl(mode: str, itr: int) -> None:
    schedule = ScheduledSampling(mode=mode)
    ours = true_frame_probabilities(schedule, itr / 80_000)
    enc, dec = _openstl_eta(itr, schedule)
    assert ours.encoder == pytest.approx(enc, abs=1e-9)
    assert ours.decoder == pytest.approx(dec, abs=1e-9)


def _sampled_reference(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, enc_p: float, dec_p: float
) -> torch.Tensor:
    """OpenSTL's forward loop over ``T_in + T_out - 1`` steps with ``real_input_flag`` drawn as
    ours is (one uniform per sample and frame, encoder frames first), on our stack's step."""
    stack = model.stack
    frames = patchify(torch.cat([x, y], dim=1), stack.patch_size)
    t_in = x.shape[1]
    state = stack.zero_state(frames[:, 0])
    preds: list[torch.Tensor] = []
    for t in range(t_in + model.out_steps - 1):
        p = (enc_p if t < t_in else dec_p) if t > 0 else 1.0
        if t == 0 or p >= 1:
            net = frames[:, t]
        elif p <= 0:
            net = preds[-1]
        else:
            mask = (torch.rand(frames.shape[0], 1, 1, 1) < p).float()
            net = mask * frames[:, t] + (1 - mask) * preds[-1]
        state = stack.step(net, state)
        preds.append(stack.readout(state[stack.top_key]))
    return unpatchify(torch.stack(preds[t_in - 1 :], dim=1), stack.patch_size)


def _sampling_model(cls: type, mode: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return cls(3, 4, 1, 1, num_hidden=[6, 6], filter_size=3, patch_size=2,
               sampling=ScheduledSampling(mode=mode))  # fmt: skip


@pytest.mark.parametrize("cls", [ConvLSTM, PredRNN])
@pytest.mark.parametrize(("mode", "progress"), [
    ("scheduled", 0.0), ("scheduled", 0.3), ("scheduled", 0.9),
    ("reverse", 0.1), ("reverse", 0.5), ("reverse", 1.0),
])  # fmt: skip
def test_sampled_training_forward_equals_the_openstl_loop(
    cls: type, mode: str, progress: float
) -> None:
    model = _sampling_model(cls, mode).train()
    x, y = torch.randn(6, 3, 1, 8, 8), torch.randn(6, 4, 1, 8, 8)
    probs = true_frame_probabilities(model.sampling, progress)
    model.begin_training_step(y, progress)
    torch.manual_seed(7)
    ours = model(x)
    torch.manual_seed(7)
    with torch.no_grad():
        expected = _sampled_reference(model, x, y, probs.encoder, probs.decoder)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("cls", [ConvLSTM, PredRNN])
def test_teacher_is_used_once_and_only_in_training(cls: type) -> None:
    model = _sampling_model(cls, "scheduled")
    x, y = torch.randn(2, 3, 1, 8, 8), torch.randn(2, 4, 1, 8, 8)
    with torch.no_grad():
        free = model.eval()(x)
        model.begin_training_step(y, 0.0)  # eta = 1: every decoder input is the true frame
        assert torch.equal(model(x), free)  # eval ignores the teacher
        model.train()
        forced = model(x)
        assert torch.equal(forced[:, 0], free[:, 0])  # frame 1 comes from z alone
        assert not torch.allclose(forced[:, 1:], free[:, 1:])
        assert torch.equal(model(x), free)  # consumed: the next training forward runs free
        # a decode of another batch size (K candidates) is never teacher-forced
        model.begin_training_step(y, 0.0)
        enc = model.encode(x.repeat(2, 1, 1, 1, 1))
        assert torch.equal(model.decode(enc), free.repeat(2, 1, 1, 1, 1))
        # past the schedule's end: training equals the free rollout
        model.begin_training_step(y, 1.0)
        assert torch.equal(model(x), free)


def test_sampling_is_off_by_default_and_needs_equal_channels() -> None:
    model = _tiny()
    assert model.sampling is None
    x, y = torch.randn(2, 3, 1, 8, 8), torch.randn(2, 4, 1, 8, 8)
    with torch.no_grad():
        free = model.eval()(x)
        model.train().begin_training_step(y, 0.0)
        assert torch.equal(model(x), free)
    with pytest.raises(ValueError, match="sampling needs in_channels == out_channels"):
        ConvLSTM(3, 2, 2, 1, sampling=ScheduledSampling())
    with pytest.raises(ValueError, match="sampling.mode must be one of"):
        ScheduledSampling(mode="teacher")
    with pytest.raises(ValueError, match="sampling.reverse_start"):
        ScheduledSampling(reverse_start=0.7, reverse_stop=0.6)


def test_reverse_sampling_with_no_true_frames_ignores_later_inputs() -> None:
    # encoder probability 0: after the first frame the encoder reads only its own predictions
    model = _sampling_model(ConvLSTM, "reverse")
    x = torch.randn(2, 3, 1, 8, 8)
    x2 = x.clone()
    x2[:, 1:] += 1.0
    with torch.no_grad():
        a, b = model.stack.encode(x, 0.0), model.stack.encode(x2, 0.0)
        assert torch.equal(a.z, b.z)
        assert not torch.equal(model.stack.encode(x).z, model.stack.encode(x2).z)


def test_forget_bias_is_added_unlike_openstl() -> None:
    # OpenSTL's ConvLSTMCell defines _forget_bias = 1.0 and never adds it; ours adds it
    # (documented in docs/backbones.md): with zero weights and state c = 1, c' = sigmoid(1)
    cell = ConvLSTMCell(1, 2, 3)
    for p in cell.parameters():
        torch.nn.init.zeros_(p)
    x = torch.zeros(1, 1, 4, 4)
    with torch.no_grad():
        out = cell(x, torch.zeros(1, 2, 4, 4), torch.ones(1, 2, 4, 4))
    assert FORGET_BIAS == 1.0
    torch.testing.assert_close(out.c, torch.full_like(out.c, torch.sigmoid(torch.tensor(1.0))))
    openstl_c = torch.sigmoid(torch.tensor(0.0))  # what OpenSTL's cell would keep: 0.5
    assert float(out.c.mean()) > float(openstl_c)
