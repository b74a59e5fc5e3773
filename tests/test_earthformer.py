"""Earthformer-specific tests: cuboid decomposition, locality of cuboid attention, global
vectors, T_in != T_out, the grid check, the paper preset's parameter count, and the shared
attention blocks of ``beamvq.nn.attention``."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
import yaml

from beamvq.backbones.base import count_parameters
from beamvq.backbones.earthformer import (
    CuboidPattern,
    CuboidSelfAttention,
    CuboidSelfAttentionBlock,
    Earthformer,
    cuboid_merge,
    cuboid_partition,
    resolve_pattern,
)
from beamvq.nn.attention import (
    AxialPositionEmbedding,
    DropPath,
    ExtraKeys,
    Mlp,
    MultiHeadAttention,
    RelativePositionBias,
    attention,
    grid_coords,
)
from beamvq.nn.moe import MoEConfig, MoEFeedForward

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "backbones"
PAPER_COUNT = 8_200_661
QUICKSTART_COUNT = 560_301


@pytest.fixture(autouse=True, scope="module")
def one_thread():  # noqa: ANN201
    """Tiny tensors: intra-op threads only add overhead (and spin on a shared CPU)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny(**overrides: object) -> Earthformer:
    """A small Earthformer on a 16x16 grid (8x8 and 4x4 levels) for fast tests."""
    args: dict = dict(
        in_steps=3,
        out_steps=3,
        in_channels=2,
        out_channels=1,
        height=16,
        width=16,
        base_units=8,
        num_heads=2,
        num_global_vectors=4,
        stem_dims=[8],
        stem_downscales=[2],
        stem_convs=1,
    )
    args.update(overrides)
    return Earthformer(**args)


# -- cuboid decomposition ------------------------------------------------------------------
@pytest.mark.parametrize("strategy", ["lll", "ddd", "ldl", "dll"])
@pytest.mark.parametrize("cuboid", [(1, 1, 1), (2, 3, 2), (4, 6, 4), (1, 6, 1)])
def test_cuboid_partition_merge_round_trip_is_exact(strategy: str, cuboid: tuple) -> None:
    x = torch.randn(2, 4, 6, 8, 3)
    parts = cuboid_partition(x, cuboid, strategy)
    volume = cuboid[0] * cuboid[1] * cuboid[2]
    assert parts.shape == (2, 4 * 6 * 8 // volume, volume, 3)
    assert torch.equal(cuboid_merge(parts, cuboid, strategy, (4, 6, 8)), x)


def test_local_and_dilated_cuboids_hold_the_right_positions() -> None:
    # Encode each position's (t, h, w) in the channels and read back cuboid 0.
    t, h, w = 4, 6, 6
    coords = grid_coords((t, h, w)).reshape(1, t, h, w, 3).float()
    local = cuboid_partition(coords, (2, 3, 3), "lll")[0, 0].long()
    assert {tuple(c) for c in local.tolist()} == set(
        itertools.product(range(2), range(3), range(3))
    )
    dilated = cuboid_partition(coords, (2, 3, 3), "ddd")[0, 0].long()
    # n = L / b per axis: t -> 2, h -> 2, w -> 2; cuboid 0 takes every 2nd position from 0.
    assert {tuple(c) for c in dilated.tolist()} == set(
        itertools.product(range(0, 4, 2), range(0, 6, 2), range(0, 6, 2))
    )
    # Cuboid 1 is the next one along w: local shifts by a block, dilated by one position.
    assert cuboid_partition(coords, (2, 3, 3), "lll")[0, 1, 0].tolist() == [0, 0, 3]
    assert cuboid_partition(coords, (2, 3, 3), "ddd")[0, 1, 0].tolist() == [0, 0, 1]


def test_partition_rejects_a_non_multiple_grid_and_patterns_are_clipped() -> None:
    with pytest.raises(ValueError, match="not a multiple"):
        cuboid_partition(torch.zeros(1, 4, 5, 6, 1), (2, 2, 2))
    pattern = resolve_pattern((3, 4, 4), (8, 2, 4), (1, 1, 1), "ldl")
    # t clipped to the axis (no shift), h dilated (no shift), w whole axis (no shift).
    assert pattern == CuboidPattern((3, 2, 4), (0, 0, 0), "ldl")
    assert resolve_pattern((4, 6, 6), (2, 3, 3), (1, 1, 1), "lll").shift == (1, 1, 1)
    with pytest.raises(ValueError, match="strategy"):
        resolve_pattern((4, 4, 4), (2, 2, 2), (0, 0, 0), "lxl")


# -- locality and global vectors -----------------------------------------------------------
def cuboid_key(pos: tuple, extents: tuple, pattern: CuboidPattern) -> tuple:
    """Which cuboid (and shifted-window region) a position belongs to, computed directly."""
    key = []
    for p, e, c, s, st in zip(pos, extents, pattern.size, pattern.shift, pattern.strategy):
        length = e + (-e) % c  # padded
        r = (p - s) % length  # index after torch.roll(-s)
        block = r // c if st == "l" else r % (length // c)
        region = 0 if s == 0 or r < length - c else (1 if r < length - s else 2)
        key.append((block, region))
    return tuple(key)


def changed_positions(before: torch.Tensor, after: torch.Tensor) -> set:
    diff = (after - before).abs().amax(-1)[0]  # (T, H, W)
    return {tuple(p) for p in (diff > 1e-9).nonzero().tolist()}


@pytest.mark.parametrize(
    "extents, size, shift, strategy",
    [
        ((4, 6, 6), (2, 3, 3), (0, 0, 0), "lll"),
        ((4, 6, 6), (2, 3, 3), (0, 0, 0), "ddd"),
        ((4, 6, 6), (2, 2, 3), (0, 0, 0), "ldl"),
        ((5, 7, 7), (2, 3, 3), (0, 0, 0), "lll"),  # padded
        ((5, 7, 7), (2, 3, 3), (0, 0, 0), "ddd"),  # padded, dilated
        ((4, 6, 6), (2, 3, 3), (1, 1, 2), "lll"),  # cyclic shift with region masks
        ((5, 7, 7), (2, 3, 3), (1, 2, 1), "lll"),  # shift and padding
    ],
)
def test_cuboid_attention_does_not_mix_other_cuboids(
    extents: tuple, size: tuple, shift: tuple, strategy: str
) -> None:
    torch.manual_seed(0)
    pattern = resolve_pattern(extents, size, shift, strategy)
    layer = CuboidSelfAttention(8, 2, extents, pattern, use_global=False, update_global=False)
    layer = layer.double().eval()
    x = torch.randn(1, *extents, 8, dtype=torch.float64)
    before = layer(x).tokens
    for pos in [(0, 0, 0), (1, 4, 2), tuple(e - 1 for e in extents)]:
        x2 = x.clone()
        x2[(0, *pos)] += torch.randn(8, dtype=torch.float64)  # not constant: LayerNorm
        expected = {
            q
            for q in itertools.product(*(range(e) for e in extents))
            if cuboid_key(q, extents, pattern) == cuboid_key(pos, extents, pattern)
        }
        assert changed_positions(before, layer(x2).tokens) == expected


def test_global_vectors_mix_information_across_cuboids() -> None:
    torch.manual_seed(0)
    extents = (2, 4, 4)
    pattern = resolve_pattern(extents, (2, 2, 2), (0, 0, 0), "lll")
    x = torch.randn(1, *extents, 8, dtype=torch.float64)
    g = torch.randn(1, 3, 8, dtype=torch.float64)
    x2 = x.clone()
    x2[0, 0, 0, 0] += torch.randn(8, dtype=torch.float64)
    own = {q for q in itertools.product(range(2), range(4), range(4)) if q[1] < 2 and q[2] < 2}

    # One layer: tokens read the *incoming* global vectors, so only the own cuboid changes,
    # but the global vectors' update already depends on the perturbed token.
    layer = CuboidSelfAttention(8, 2, extents, pattern, use_global=True, update_global=True)
    layer = layer.double().eval()
    out, out2 = layer(x, g), layer(x2, g)
    assert changed_positions(out.tokens, out2.tokens) == own
    assert (out.global_vectors - out2.global_vectors).abs().min() > 0

    # Two layers: the updated global vectors carry it to every cuboid.
    for use_global, expect_all in [(True, True), (False, False)]:
        block = CuboidSelfAttentionBlock(8, 2, extents, [pattern, pattern], use_global)
        block = block.double().eval()
        gv = g if use_global else None
        changed = changed_positions(block(x, gv).tokens, block(x2, gv).tokens)
        all_positions = set(itertools.product(range(2), range(4), range(4)))
        assert changed == (all_positions if expect_all else own)


# -- the backbone --------------------------------------------------------------------------
def test_t_in_differs_from_t_out_and_the_latent_split() -> None:
    torch.manual_seed(0)
    model = tiny(in_steps=3, out_steps=5, height=16, width=24).eval()
    x = torch.randn(2, 3, 2, 16, 24)
    y = model(x)
    assert y.shape == (2, 5, 1, 16, 24)
    enc = model.encode(x)
    # z: the top level, channel-first (B, D, T_in, h, w); 16x24 -> stem 8x12 -> top 4x6.
    assert model.latent_dim == 16
    assert enc.z.shape == (2, 16, 3, 4, 6)
    assert {k: tuple(v.shape) for k, v in enc.extras.items()} == {
        "memory_0": (2, 3, 8, 12, 8),
        "global_0": (2, 4, 8),
        "global_1": (2, 4, 16),
    }
    assert torch.allclose(model.decode(model.translate(enc)), y)
    # The decoder reads z: a perturbed latent changes the forecast.
    moved = model.decode(enc._replace(z=enc.z + 0.5 * torch.randn_like(enc.z)))
    assert (moved - y).abs().max() > 1e-4
    # K candidates: extras repeated along batch (dim 0) decode to per-candidate forecasts.
    k = 3
    rep = enc._replace(
        z=enc.z.repeat_interleave(k, 0),
        extras={n: t.repeat_interleave(k, 0) for n, t in enc.extras.items()},
    )
    cands = model.decode(rep).view(2, k, 5, 1, 16, 24)
    assert torch.allclose(cands, y[:, None].expand_as(cands), atol=1e-5)


def test_grid_error_names_the_allowed_size() -> None:
    model = tiny()
    with pytest.raises(ValueError, match=r"grid 16x24 is not allowed.*built for 16x16"):
        model(torch.randn(1, 3, 2, 16, 24))
    with pytest.raises(ValueError, match="T_in=3"):
        model(torch.randn(1, 4, 2, 16, 16))


def test_bad_hyper_parameters_are_rejected() -> None:
    with pytest.raises(ValueError, match="divisible by num_heads"):
        tiny(base_units=6, num_heads=4, stem_dims=[6])
    with pytest.raises(ValueError, match="last stem_dims entry"):
        tiny(stem_dims=[4])
    with pytest.raises(ValueError, match="equal length"):
        tiny(enc_depth=[1, 1], dec_depth=[1])
    with pytest.raises(ValueError, match="one \\(t, h, w\\) entry"):
        tiny(cuboid_sizes=[[2, 2, 2]], cuboid_strategies=["lll", "ddd"])


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"dec_global_vectors": False},
        {"num_global_vectors": 0, "in_steps": 1, "out_steps": 1},  # one-token cuboids, single key
        {"in_steps": 2, "out_steps": 4, "height": 18, "width": 14},  # padding everywhere
        {
            "cuboid_sizes": [[2, 3, 3], [2, 3, 3]],
            "cuboid_strategies": ["lll", "ddd"],
            "shift_sizes": [[1, 1, 1], [0, 0, 0]],
            "cross_cuboid_hw": [2, 2],
            "height": 20,
            "width": 20,
        },
        {
            "enc_depth": [1, 1, 1],
            "dec_depth": [2, 1, 2],
            "stem_downscales": [1],
            "height": 8,
            "width": 8,
        },
    ],
)
def test_every_parameter_gets_a_gradient(overrides: dict) -> None:
    torch.manual_seed(0)
    model = tiny(**overrides)
    x = torch.randn(2, model.in_steps, 2, model.height, model.width)
    y = model.decode(model.translate(model.encode(x)))
    assert y.shape == (2, model.out_steps, 1, model.height, model.width)
    y.square().mean().backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert dead == []


def test_paper_preset_parameter_count() -> None:
    cfg = yaml.safe_load((CONFIGS / "earthformer_paper.yaml").read_text())["model"]["backbone"]
    assert cfg["class_path"] == "beamvq.backbones.Earthformer"
    args = cfg["init_args"]
    assert (args["in_steps"], args["out_steps"], args["height"], args["width"]) == (
        13,
        12,
        384,
        384,
    )
    model = Earthformer(**args)  # instantiate only: no forward at 384x384
    assert count_parameters(model) == PAPER_COUNT
    assert model.latent_dim == 256 and model.level_hw == [(32, 32), (16, 16)]
    # The reference also builds the top level's last global update (unused there): 459,008 more.
    pattern = resolve_pattern((13, 16, 16), (1, 1, 16), (0, 0, 0), "lll")
    with_update = CuboidSelfAttention(256, 4, (13, 16, 16), pattern, True, True)
    without = CuboidSelfAttention(256, 4, (13, 16, 16), pattern, True, False)
    assert count_parameters(with_update) - count_parameters(without) == 459_008
    # Built, the reference package counts 8,659,677: its decoder self-attention sizes the temporal
    # bias table of the top level from the encoder's T_in = 13 (25 rows) while only T_out = 12
    # steps attend (23 rows, ours): 2 unused rows x 4 heads.
    reference_table = RelativePositionBias((13, 1, 1), 4)
    ours_table = model.dec_self[0][0].attns[0].rel_bias
    assert ours_table.table.shape == (23, 4)
    assert count_parameters(reference_table) - count_parameters(ours_table) == 8
    assert PAPER_COUNT + 459_008 + 8 == 8_659_677

    quick = yaml.safe_load((CONFIGS / "earthformer.yaml").read_text())["model"]["backbone"]
    assert quick["class_path"] == "beamvq.backbones.Earthformer"
    quick_model = Earthformer(**quick["init_args"])
    assert count_parameters(quick_model) == QUICKSTART_COUNT
    assert 200_000 <= QUICKSTART_COUNT <= 1_000_000


# -- shared attention blocks ---------------------------------------------------------------
def manual_attention(q, k, v, bias=None, mask=None, extra=None):  # noqa: ANN001, ANN201
    scores = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5
    if bias is not None:
        scores = scores + bias
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    if extra is None:
        return torch.softmax(scores, -1) @ v
    qe = q if extra.q is None else extra.q
    es = qe @ extra.k.transpose(-2, -1) / q.shape[-1] ** 0.5
    p = torch.softmax(torch.cat((scores, es.expand(*scores.shape[:-1], -1)), -1), -1)
    n = scores.shape[-1]
    return p[..., :n] @ v + p[..., n:] @ extra.v


def test_attention_matches_the_definition_with_bias_mask_and_extra_keys() -> None:
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 2, 5, 4, dtype=torch.float64) for _ in range(3))
    bias = torch.randn(2, 5, 5, dtype=torch.float64)
    mask = torch.rand(3, 1, 5, 5) > 0.4
    mask |= torch.eye(5, dtype=torch.bool)
    assert torch.allclose(attention(q, k, v), manual_attention(q, k, v))
    assert torch.allclose(
        attention(q, k, v, bias=bias, mask=mask), manual_attention(q, k, v, bias, mask)
    )
    gk, gv = (torch.randn(2, 1, 2, 3, 4, dtype=torch.float64) for _ in range(2))
    for extra in [ExtraKeys(gk, gv), ExtraKeys(gk, gv, torch.randn_like(q))]:
        got = attention(q, k, v, bias=bias, mask=mask, extra=extra)
        assert torch.allclose(got, manual_attention(q, k, v, bias, mask, extra))


def test_multi_head_cross_attention_respects_the_key_mask() -> None:
    torch.manual_seed(0)
    mha = MultiHeadAttention(8, 2, context_dim=6).eval()
    x, ctx = torch.randn(3, 4, 5, 8), torch.randn(3, 4, 7, 6)
    mask = torch.ones(7, dtype=torch.bool)
    mask[2] = False
    out = mha(x, ctx, mask=mask)
    assert out.shape == (3, 4, 5, 8)
    ctx2 = ctx.clone()
    ctx2[..., 2, :] += 10.0  # a masked key cannot change anything
    assert torch.allclose(mha(x, ctx2, mask=mask), out)
    ctx2[..., 3, :] += 10.0  # an unmasked one does
    assert not torch.allclose(mha(x, ctx2, mask=mask), out)


def test_relative_position_bias_depends_only_on_the_offset() -> None:
    rpb = RelativePositionBias((3, 4), num_heads=2)
    coords = grid_coords((3, 4))
    bias = rpb(coords, coords)
    assert bias.shape == (2, 12, 12)
    assert rpb.table.shape == (5 * 7, 2)
    # (0,0)->(1,1) and (1,2)->(2,3) share the offset (-1,-1); zero offset is the table centre.
    assert torch.equal(bias[:, 0, 5], bias[:, 6, 11])
    assert torch.equal(bias[:, 0, 0], rpb.table[2 * 7 + 3])
    with pytest.raises(ValueError, match="exceeds"):
        rpb(torch.tensor([[3, 0]]), torch.tensor([[0, 0]]))
    with pytest.raises(ValueError, match="exceeds"):
        rpb.check(torch.tensor([[0, 0]]), torch.tensor([[0, 4]]))
    rpb.check(torch.tensor([[2, 3]]), torch.tensor([[0, 0]]))  # the largest offsets pass


def test_axial_position_embedding_mlp_and_drop_path() -> None:
    emb = AxialPositionEmbedding(4, (2, 3, 5))
    out = emb(torch.zeros(1, 2, 3, 5, 4))
    expected = emb.tables[0].weight[1] + emb.tables[1].weight[2] + emb.tables[2].weight[4]
    assert torch.allclose(out[0, 1, 2, 4], expected)
    with pytest.raises(ValueError, match="built for grid"):
        emb(torch.zeros(1, 2, 3, 4, 4))
    assert Mlp(4, 16, out_dim=3)(torch.randn(2, 7, 4)).shape == (2, 7, 3)
    drop = DropPath(0.5)
    x = torch.ones(64, 3)
    assert torch.equal(drop.eval()(x), x)
    torch.manual_seed(0)
    y = drop.train()(x)
    kept = y[:, 0] > 0
    assert 0 < int(kept.sum()) < 64 and torch.all(y[kept] == 2.0) and torch.all(y[~kept] == 0)


# -- MoE off: the published block, bit for bit ---------------------------------------------------
# Pinned from the code before the MoE option existed (commit a43737c): seed 0 weights, seed 1
# input, eval forward. With ``moe=None`` the backbone must build the same parameters in the same
# order (same state_dict, same initial values) and give the same outputs.
EARTHFORMER_DENSE_PARAMS = 141285
EARTHFORMER_DENSE_KEYS = 267
EARTHFORMER_DENSE_SUM = -157.37894660420716
EARTHFORMER_DENSE_VALUES = [
    -0.0926213,
    -0.3648413,
    -0.4583787,
    -0.2541842,
    -0.6586756,
    -0.3983286,
    -0.1602345,
    0.4418562,
    -0.7144616,
    0.0986509,
    0.6862152,
    -0.3094469,
    -0.6511657,
    0.6320385,
    1.3249927,
    -1.0637680,
    -0.1971100,
]  # y.flatten()[::61]


def test_moe_off_is_the_dense_model_of_before() -> None:
    torch.manual_seed(0)
    model = Earthformer(
        3,
        2,
        1,
        1,
        height=16,
        width=16,
        base_units=16,
        num_heads=4,
        stem_dims=[8, 16],
        stem_downscales=[2, 1],
    )
    assert not any(isinstance(m, MoEFeedForward) for m in model.modules())
    assert count_parameters(model) == EARTHFORMER_DENSE_PARAMS
    assert len(model.state_dict()) == EARTHFORMER_DENSE_KEYS
    torch.manual_seed(1)
    x = torch.randn(2, 3, 1, 16, 16)
    with torch.no_grad():
        y = model.eval()(x)
    assert float(y.double().sum()) == pytest.approx(EARTHFORMER_DENSE_SUM, abs=1e-3)
    torch.testing.assert_close(
        y.flatten()[::61], torch.tensor(EARTHFORMER_DENSE_VALUES), rtol=0, atol=1e-5
    )
    # a state_dict of the dense model loads into a freshly built dense model: same output
    again = Earthformer(
        3,
        2,
        1,
        1,
        height=16,
        width=16,
        base_units=16,
        num_heads=4,
        stem_dims=[8, 16],
        stem_downscales=[2, 1],
    )
    again.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(again.eval()(x), y)


def test_moe_replaces_only_the_mlps() -> None:
    torch.manual_seed(0)
    dense = Earthformer(
        3,
        2,
        1,
        1,
        height=16,
        width=16,
        base_units=16,
        num_heads=4,
        stem_dims=[8, 16],
        stem_downscales=[2, 1],
    )
    moe = Earthformer(
        3,
        2,
        1,
        1,
        height=16,
        width=16,
        base_units=16,
        num_heads=4,
        stem_dims=[8, 16],
        stem_downscales=[2, 1],
        moe=MoEConfig(),
    )
    dense_keys = {k for k in dense.state_dict() if ".mlp." not in k}
    moe_keys = {k for k in moe.state_dict() if ".mlp." not in k}
    assert dense_keys == moe_keys
    layers = [m for m in moe.modules() if isinstance(m, MoEFeedForward)]
    assert layers
    mlps = [k for k in dense.state_dict() if ".mlp." in k]
    assert len(mlps) == 4 * len(layers)  # two Linear layers (weight, bias) per dense MLP
