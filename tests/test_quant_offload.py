"""Activation offload: exact gradients, byte accounting, module selection."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from beamvq.quant.offload import ActivationOffload


class Block(nn.Module):
    """Conv + BatchNorm + Dropout: recomputation must replay the mask and keep the stats."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 8, 3, padding=1)
        self.norm = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.3)
        self.conv2 = nn.Conv2d(8, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, gain: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.conv2(self.drop(torch.relu(self.norm(self.conv1(x)))))
        return x + gain * h, h.mean()


class Backbone(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block(3), Block(3)])
        self.cell = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        aux = x.new_zeros(())
        for block in self.blocks:
            x, a = block(x, gain=0.5)
            aux = aux + a
        z = x.permute(0, 2, 3, 1)
        for _ in range(2):  # a recurrent cell: two frames per step
            z = z + self.cell(z)
        return z.square().mean() + aux


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = Backbone()
        self.bottleneck = nn.Linear(3, 3)


def _step(net: nn.Module, x: torch.Tensor, offload: ActivationOffload | None) -> list[torch.Tensor]:
    torch.manual_seed(123)  # dropout masks
    if offload is None:
        loss = net.backbone(x)
    else:
        with offload.step(net):
            loss = net.backbone(x)
    loss.backward()
    return [p.grad.clone() for p in net.parameters() if p.grad is not None] + [
        b.clone() for b in net.buffers()
    ]


def _frames(offload: ActivationOffload, net: nn.Module, x: torch.Tensor) -> list[str]:
    with offload.step(net):
        net.backbone(x).backward()
    return offload.frame_names


def test_frames_are_the_outermost_called_modules() -> None:
    net, x = Net(), torch.randn(1, 3, 4, 4)
    # default: every backbone module is a candidate; calls inside a frame are not frames
    frames = _frames(ActivationOffload(0.5), net, x)
    assert frames == ["backbone.blocks.0", "backbone.blocks.1", "backbone.cell", "backbone.cell"]
    candidates = [n for n, _ in ActivationOffload(0.5).select_modules(net)]
    assert "backbone.blocks" not in candidates and "backbone.cell.0" in candidates
    assert not any("bottleneck" in n for n in candidates)
    chosen = ActivationOffload(0.5, modules=[r"cell\.0", "conv1", "bottleneck"])
    assert (
        _frames(chosen, net, x)
        == ["backbone.blocks.0.conv1", "backbone.blocks.1.conv1"] + ["backbone.cell.0"] * 2
    )


def test_method_driven_children_get_frames_at_called_modules() -> None:
    class Stack(nn.Module):  # driven through a method, never called itself
        def __init__(self) -> None:
            super().__init__()
            self.cells = nn.ModuleList(
                [nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 4)) for _ in range(2)]
            )

        def rollout(self, x: torch.Tensor) -> torch.Tensor:
            for cell in self.cells:
                x = x + cell(x).sum(-1, keepdim=True)
            return x

    net = nn.Module()
    net.backbone = nn.Module()
    net.backbone.stack = Stack()
    offload = ActivationOffload(1.0)
    with offload.step(net):
        net.backbone.stack.rollout(torch.randn(3, 4)).sum().backward()
    assert offload.frame_names == ["backbone.stack.cells.0", "backbone.stack.cells.1"]
    assert offload.stats.offloaded_bytes > 0


@pytest.mark.parametrize("alpha", [0.0, 0.25, 0.5, 1.0])
def test_gradients_with_offload_equal_without(alpha: float) -> None:
    torch.manual_seed(0)
    net = Net().double()
    x = torch.randn(2, 3, 6, 5, dtype=torch.float64)
    expected = _step(copy.deepcopy(net), x, None)
    offload = ActivationOffload(alpha)
    got = _step(copy.deepcopy(net), x, offload)
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert torch.equal(a, b)  # gradients and BatchNorm running statistics, bit for bit
    stats = offload.stats
    assert stats.frames == 4
    if alpha > 0:
        assert stats.offloaded_bytes > 0 and stats.fetched_bytes == stats.offloaded_bytes
    if alpha < 1:
        assert stats.recompute_bytes > 0
    # the counted total does not depend on where the bytes went
    plain = ActivationOffload(None)
    _step(copy.deepcopy(net), x, plain)
    assert plain.stats.saved_bytes == stats.saved_bytes
    assert plain.stats.offloaded_bytes == plain.stats.recompute_bytes == 0


@pytest.mark.parametrize("alpha", [0.0, 0.25, 0.5, 0.6, 1.0])
def test_byte_accounting_equals_formula(alpha: float) -> None:
    batch, tokens, d_in, d_hid, d_out = 2, 8, 8, 16, 4
    net = nn.Module()
    net.backbone = nn.Module()
    net.backbone.mlp = nn.Sequential(nn.Linear(d_in, d_hid), nn.Tanh(), nn.Linear(d_hid, d_out))
    x = torch.randn(batch, tokens, d_in)
    offload = ActivationOffload(alpha, token_dim=-2)
    with offload.step(net):
        y = net.backbone.mlp(x)
        loss = y.square().sum()  # pow saves y, outside any frame
    loss.backward()
    stats = offload.stats
    fp32 = 4
    # inside the frame: Linear saves x (the frame input: kept) and the weights (parameters: not
    # activations); Tanh saves h, Linear saves a 2-D view of h (moved once)
    offloaded_tokens = math.floor(alpha * tokens + 0.5)
    h_row = batch * d_hid * fp32
    assert stats.offloaded_bytes == offloaded_tokens * h_row
    assert stats.recompute_bytes == (tokens - offloaded_tokens) * h_row
    assert stats.fetched_bytes == stats.offloaded_bytes
    assert stats.kept_bytes == batch * tokens * (d_in + d_out) * fp32  # x and y
    assert stats.frames == 1


def test_parameters_are_never_offloaded() -> None:
    net = nn.Module()
    net.backbone = nn.Module()
    net.backbone.lin = nn.Sequential(nn.Linear(4, 4, bias=False))
    x = torch.randn(3, 4)
    offload = ActivationOffload(1.0)
    with offload.step(net):
        net.backbone.lin(x).sum().backward()
    # Linear saves its input (kept, a frame input) and W^T (a parameter view): nothing moves
    assert offload.stats.offloaded_bytes == 0 and offload.stats.recompute_bytes == 0
    assert offload.stats.kept_bytes == 3 * 4 * 4


def test_in_place_input_change_is_refused_for_recompute() -> None:
    net = nn.Module()
    net.backbone = nn.Module()
    # the frame input itself is saved by nothing inside the frame, only used for recompute
    net.backbone.mlp = nn.Sequential(nn.Tanh(), nn.Linear(4, 8), nn.Tanh())
    inp = torch.randn(3, 4, requires_grad=True) * 1.0
    offload = ActivationOffload(0.5)
    with offload.step(net):
        out = net.backbone.mlp(inp).sum()
    with torch.no_grad():
        inp.add_(1.0)
    with pytest.raises(RuntimeError, match="modified in place"):
        out.backward()


def test_counting_hooks_keep_autograd_in_place_check() -> None:
    lin = nn.Linear(4, 4)
    inp = torch.randn(3, 4, requires_grad=True) * 1.0
    offload = ActivationOffload(None)
    with offload.step(lin):
        out = lin(inp).sum()
    with torch.no_grad():
        inp.mul_(2.0)
    with pytest.raises(RuntimeError, match="inplace operation"):
        out.backward()


def test_alpha_validation() -> None:
    with pytest.raises(ValueError, match="alpha"):
        ActivationOffload(1.5)
