"""The backbone contract, checked for every registered backbone (with and without VQ)."""

from __future__ import annotations

import inspect
from functools import partial

import pytest
import torch

import beamvq.backbones as backbones_pkg
from beamvq.backbones import REGISTRY, Backbone
from beamvq.bottleneck import VQBottleneck
from beamvq.model import VQForecaster

# small hyper-parameters so the whole file runs in well under two minutes on 2 cores
SMALL: dict[str, dict] = {
    "resnet": dict(width=8, n_blocks=2, norm_groups=4),
    "unet": dict(base_width=8, depth=2, norm_groups=4),
    "convlstm": dict(num_hidden=(8, 8), filter_size=3, patch_size=4),
    "predrnn": dict(num_hidden=(8, 8), filter_size=3, patch_size=4),
    "simvp": dict(hid_s=8, hid_t=16, n_s=2, n_t=1),
    "tau": dict(hid_s=8, hid_t=16, n_s=2, n_t=1),
    "fno": dict(modes=4, width=8, num_layers=2, encoder_layers=1, projection_width=16),
    "cno": dict(num_levels=2, channel_multiplier=8, lift_project_width=8, num_res_neck=1),
    "fourcastnet": dict(patch_size=4, embed_dim=16, depth=2, encoder_depth=1, num_blocks=4),
    "earthformer": dict(base_units=16, num_heads=2, num_global_vectors=2),
}
# (T_in, T_out, C_in, C_out, H, W): equal and unequal steps/channels, a non-square grid
CASES = [(4, 4, 1, 1, 32, 48), (3, 2, 2, 2, 16, 16), (2, 3, 2, 1, 16, 32)]


def build(name: str, t_in: int, t_out: int, c_in: int, c_out: int, h: int, w: int) -> Backbone:
    cls = REGISTRY[name]
    kwargs = dict(SMALL[name])
    params = inspect.signature(cls.__init__).parameters
    if "height" in params:
        kwargs.update(height=h, width=w)
    return cls(t_in, t_out, c_in, c_out, **kwargs)


def all_subclasses(cls: type) -> set[type]:
    out = set()
    for sub in cls.__subclasses__():
        out |= {sub} | all_subclasses(sub)
    return out


def test_registry_holds_exactly_the_ten() -> None:
    assert sorted(REGISTRY) == sorted(
        [
            "resnet",
            "unet",
            "convlstm",
            "predrnn",
            "simvp",
            "tau",
            "fno",
            "cno",
            "fourcastnet",
            "earthformer",
        ]
    )
    concrete = {
        c
        for c in all_subclasses(Backbone)
        if not inspect.isabstract(c)
        and c.__module__.startswith("beamvq.backbones.")
        and c.__name__ != "PatchRecurrentBackbone"
    }
    assert concrete == set(REGISTRY.values())
    for cls in REGISTRY.values():  # YAML names them as beamvq.backbones.<Class>
        assert getattr(backbones_pkg, cls.__name__) is cls
        assert cls.__doc__ or inspect.getmodule(cls).__doc__


@pytest.mark.parametrize("name", sorted(SMALL))
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
def test_shapes_with_and_without_vq(name: str, case: tuple) -> None:
    t_in, t_out, c_in, c_out, h, w = case
    torch.manual_seed(0)
    bb = build(name, *case)
    x = torch.randn(2, t_in, c_in, h, w)
    assert bb(x).shape == (2, t_out, c_out, h, w)
    enc = bb.encode(x)
    assert enc.z.shape[0] == 2 and enc.z.shape[1] == bb.latent_dim
    model = VQForecaster(bb, partial(VQBottleneck, codebook_size=16))
    out = model(x)
    assert out.y.shape == (2, t_out, c_out, h, w)
    assert out.indices is not None and out.indices.shape == (2, *enc.z.shape[2:])


@pytest.mark.parametrize("name", sorted(SMALL))
def test_every_parameter_gets_a_gradient(name: str) -> None:
    torch.manual_seed(0)
    bb = build(name, 3, 2, 2, 2, 16, 32)
    model = VQForecaster(bb, partial(VQBottleneck, codebook_size=16))
    model.train()
    x = torch.randn(2, 3, 2, 16, 32)
    out = model(x)
    (out.y.square().mean() + out.aux_loss).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"{name}: parameters without gradient: {missing}"
    nonzero = sum(int(p.grad.abs().sum() > 0) for p in model.parameters() if p.requires_grad)
    assert nonzero >= 0.9 * sum(1 for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_eval_is_deterministic_and_candidate0_is_the_forecast(name: str) -> None:
    torch.manual_seed(0)
    model = VQForecaster(build(name, 4, 4, 1, 1, 32, 48), partial(VQBottleneck, codebook_size=16))
    x = torch.randn(2, 4, 1, 32, 48)
    model.train()
    model(x)  # initialise the code bank (k-means on the first training batch)
    model.eval()
    with torch.no_grad():
        a, b = model(x).y, model(x).y
        cands = model.candidates(x, 3)
    assert torch.equal(a, b)
    assert cands.shape == (2, 3, 4, 1, 32, 48)
    torch.testing.assert_close(cands[:, 0], a, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(cands[:, 1], cands[:, 0])  # the alternatives differ


@pytest.mark.parametrize("name", sorted(SMALL))
def test_wrong_shape_gives_a_clear_error(name: str) -> None:
    bb = build(name, 4, 4, 1, 1, 32, 48)
    with pytest.raises(ValueError, match="T_in=4"):
        bb(torch.randn(2, 3, 1, 32, 48))
    with pytest.raises(ValueError, match="C=1"):
        bb(torch.randn(2, 4, 2, 32, 48))
    with pytest.raises(ValueError, match="4-d tensor"):
        bb(torch.randn(4, 1, 32, 48))
