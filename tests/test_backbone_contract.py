"""The backbone contract, checked for every discovered backbone (with and without VQ).

The backbones are those ``beamvq.backbones`` discovers; the checks are plain functions
(``CONTRACT``), run for each registered backbone and, in the last tests, for a tiny backbone
written into a temporary package, so the contract a new backbone has to meet is exactly this.
"""

from __future__ import annotations

import importlib
import inspect
import sys
import textwrap
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import pytest
import torch
import yaml

import beamvq.backbones as backbones_pkg
from beamvq.backbones import REGISTRY, Backbone, backbone_class, discover
from beamvq.bottleneck import VQBottleneck
from beamvq.model import VQForecaster

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "backbones"
CONTRACT_ARGS = ("in_steps", "out_steps", "in_channels", "out_channels")

# smaller sizes, only so that the file runs in well under two minutes on 2 cores; a backbone
# not named here is checked at the size of its configs/backbones/<name>.yaml
FASTER: dict[str, dict] = {
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
Case = tuple[int, int, int, int, int, int]


def yaml_kwargs(name: str) -> dict:
    """The size arguments of ``configs/backbones/<name>.yaml`` (no steps, channels, grid)."""
    section = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())["model"]["backbone"]
    skip = set(CONTRACT_ARGS) | set(REGISTRY[name].grid_args)
    return {k: v for k, v in (section.get("init_args") or {}).items() if k not in skip}


def contract_kwargs(name: str) -> dict:
    return dict(FASTER[name]) if name in FASTER else yaml_kwargs(name)


def build(cls: type[Backbone], kwargs: dict, case: Case) -> Backbone:
    t_in, t_out, c_in, c_out, h, w = case
    return cls(t_in, t_out, c_in, c_out, **kwargs, **cls.grid_kwargs(h, w))


# -- the contract ---------------------------------------------------------------------------
def check_shapes_with_and_without_vq(cls: type[Backbone], kwargs: dict, case: Case) -> None:
    t_in, t_out, c_in, c_out, h, w = case
    torch.manual_seed(0)
    bb = build(cls, kwargs, case)
    x = torch.randn(2, t_in, c_in, h, w)
    assert bb(x).shape == (2, t_out, c_out, h, w)
    enc = bb.encode(x)
    assert enc.z.shape[0] == 2 and enc.z.shape[1] == bb.latent_dim
    model = VQForecaster(bb, partial(VQBottleneck, codebook_size=16))
    out = model(x)
    assert out.y.shape == (2, t_out, c_out, h, w)
    assert out.indices is not None and out.indices.shape == (2, *enc.z.shape[2:])


def check_every_parameter_gets_a_gradient(cls: type[Backbone], kwargs: dict) -> None:
    torch.manual_seed(0)
    model = VQForecaster(
        build(cls, kwargs, (3, 2, 2, 2, 16, 32)), partial(VQBottleneck, codebook_size=16)
    )
    model.train()
    out = model(torch.randn(2, 3, 2, 16, 32))
    (out.y.square().mean() + out.aux_loss).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"{cls.__name__}: parameters without gradient: {missing}"
    nonzero = sum(int(p.grad.abs().sum() > 0) for p in model.parameters() if p.requires_grad)
    assert nonzero >= 0.9 * sum(1 for p in model.parameters() if p.requires_grad)


def check_eval_is_deterministic_and_candidate0_is_the_forecast(
    cls: type[Backbone], kwargs: dict
) -> None:
    torch.manual_seed(0)
    model = VQForecaster(
        build(cls, kwargs, (4, 4, 1, 1, 32, 48)), partial(VQBottleneck, codebook_size=16)
    )
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


def check_wrong_shape_gives_a_clear_error(cls: type[Backbone], kwargs: dict) -> None:
    bb = build(cls, kwargs, (4, 4, 1, 1, 32, 48))
    with pytest.raises(ValueError, match="T_in=4"):
        bb(torch.randn(2, 3, 1, 32, 48))
    with pytest.raises(ValueError, match="C=1"):
        bb(torch.randn(2, 4, 2, 32, 48))
    with pytest.raises(ValueError, match="4-d tensor"):
        bb(torch.randn(4, 1, 32, 48))


def contract(cls: type[Backbone], kwargs: dict) -> Iterator[Callable[[], None]]:
    """Every check of the contract for one backbone class, ready to call."""
    for case in CASES:
        yield partial(check_shapes_with_and_without_vq, cls, kwargs, case)
    yield partial(check_every_parameter_gets_a_gradient, cls, kwargs)
    yield partial(check_eval_is_deterministic_and_candidate0_is_the_forecast, cls, kwargs)
    yield partial(check_wrong_shape_gives_a_clear_error, cls, kwargs)


# -- every discovered backbone --------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(REGISTRY))
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
def test_shapes_with_and_without_vq(name: str, case: Case) -> None:
    check_shapes_with_and_without_vq(REGISTRY[name], contract_kwargs(name), case)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_parameter_gets_a_gradient(name: str) -> None:
    check_every_parameter_gets_a_gradient(REGISTRY[name], contract_kwargs(name))


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_eval_is_deterministic_and_candidate0_is_the_forecast(name: str) -> None:
    check_eval_is_deterministic_and_candidate0_is_the_forecast(
        REGISTRY[name], contract_kwargs(name)
    )


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_wrong_shape_gives_a_clear_error(name: str) -> None:
    check_wrong_shape_gives_a_clear_error(REGISTRY[name], contract_kwargs(name))


def _all_subclasses(cls: type) -> set[type]:
    out = set()
    for sub in cls.__subclasses__():
        out |= {sub} | _all_subclasses(sub)
    return out


def test_registry_is_every_backbone_file() -> None:
    files = {p.stem for p in (ROOT / "beamvq" / "backbones").glob("*.py")} - {"__init__", "base"}
    assert set(REGISTRY) == files, "every module of beamvq/backbones (but base) is one backbone"
    # each class the registry leaves out is a shared base of a registered one
    ours = {c for c in _all_subclasses(Backbone) if c.__module__.startswith("beamvq.backbones.")}
    for cls in ours - set(REGISTRY.values()):
        assert any(issubclass(r, cls) for r in REGISTRY.values()), cls
    assert FASTER.keys() <= REGISTRY.keys()


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_registered_backbone_has_its_yaml_and_class_path(name: str) -> None:
    cls = REGISTRY[name]
    section = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())["model"]["backbone"]
    # YAML names it as beamvq.backbones.<Class>: an attribute of the package
    assert section["class_path"] == f"beamvq.backbones.{cls.__name__}"
    assert getattr(backbones_pkg, cls.__name__) is cls is backbone_class(section["class_path"])
    assert backbone_class(name) is cls
    assert cls.__doc__ and inspect.getmodule(cls).__doc__
    # grid-bound backbones declare which constructor arguments take the grid
    params = inspect.signature(cls.__init__).parameters
    assert set(cls.grid_args) <= set(params), (name, cls.grid_args)
    assert set(cls.grid_args) <= set(section["init_args"]), "the YAML fixes the grid"


def test_grid_declaration() -> None:
    grid_bound = {n for n, c in REGISTRY.items() if c.grid_args}
    assert grid_bound == {"earthformer", "fourcastnet"}
    assert REGISTRY["earthformer"].grid_kwargs(32, 48) == {"height": 32, "width": 48}
    assert REGISTRY["simvp"].grid_kwargs(32, 48) == {}
    # built for 32x48, a grid-bound backbone refuses another grid with a clear message
    bb = build(REGISTRY["fourcastnet"], FASTER["fourcastnet"], (4, 4, 1, 1, 32, 48))
    with pytest.raises(ValueError, match="grid 16x16"):
        bb(torch.randn(1, 4, 1, 16, 16))
    with pytest.raises(ValueError, match="neither a registered backbone"):
        backbone_class("beamvq.model.VQForecaster")


# -- a new backbone from a file: discovery and the whole contract ---------------------------
TINY = '''
    """A tiny grid-bound backbone written by tests/test_backbone_contract.py."""

    import torch
    from einops import rearrange
    from torch import Tensor, nn

    from beamvq.backbones.base import Backbone, Encoded


    class TinyBase(Backbone):
        """A shared base (subclassed below): not a backbone of its own."""

        def decode(self, enc: Encoded) -> Tensor:
            y = self.head(enc.z)
            return rearrange(y, "b (t c) h w -> b t c h w", t=self.out_steps)


    class Tiny(TinyBase):
        """1x1 convolutions around a learned per-pixel offset (so it is built for one grid)."""

        grid_args = ("height", "width")

        def __init__(
            self, in_steps: int, out_steps: int, in_channels: int, out_channels: int,
            height: int, width: int, hidden: int = 8,
        ) -> None:
            super().__init__(in_steps, out_steps, in_channels, out_channels)
            self.latent_dim = hidden
            self.grid = (height, width)
            self.stem = nn.Conv2d(in_steps * in_channels, hidden, 1)
            self.offset = nn.Parameter(0.1 * torch.randn(hidden, height, width))
            self.head = nn.Conv2d(hidden, out_steps * out_channels, 1)

        def check_grid(self, height: int, width: int) -> None:
            if (height, width) != self.grid:
                raise ValueError(f"Tiny: grid {height}x{width} is not allowed: built for {self.grid}")

        def encode(self, x: Tensor) -> Encoded:
            return Encoded(self.stem(rearrange(x, "b t c h w -> b (t c) h w")) + self.offset)
'''


def _package(tmp_path: Path, name: str, modules: dict[str, str]) -> str:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "__init__.py").write_text('"""Backbones of a test."""\n')
    for module, source in modules.items():
        (folder / f"{module}.py").write_text(textwrap.dedent(source))
    importlib.invalidate_caches()
    return name


@pytest.fixture
def tmp_packages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.syspath_prepend(str(tmp_path))
    before = set(sys.modules)
    yield tmp_path
    for name in set(sys.modules) - before:
        del sys.modules[name]


def test_a_new_backbone_file_is_discovered_and_meets_the_contract(tmp_packages: Path) -> None:
    helper = '"""Not a backbone module: no Backbone subclass."""\nSIZE = 3\n'
    package = _package(tmp_packages, "tiny_backbones", {"tiny": TINY, "helpers": helper})
    found = discover(package)
    assert list(found) == ["tiny"]
    tiny = found["tiny"]
    assert tiny.__name__ == "Tiny" and tiny.grid_kwargs(16, 32) == {"height": 16, "width": 32}
    checks = list(contract(tiny, {"hidden": 8}))
    assert len(checks) == len(CASES) + 3
    for check in checks:
        check()


def test_discovery_refuses_two_backbones_in_one_file(tmp_packages: Path) -> None:
    other = (
        'class Other(TinyBase):\n    """A second leaf backbone."""\n\n    encode = Tiny.encode\n'
    )
    two = textwrap.dedent(TINY) + "\n\n" + other
    package = _package(tmp_packages, "two_backbones", {"pair": two})
    with pytest.raises(ValueError, match=r"pair\.py: defines 2 backbones \['Other', 'Tiny'\]"):
        discover(package)


def test_discovery_lets_an_import_error_through(tmp_packages: Path) -> None:
    package = _package(tmp_packages, "broken_backbones", {"broken": "import not_a_module_here\n"})
    with pytest.raises(ModuleNotFoundError, match="not_a_module_here"):
        discover(package)
