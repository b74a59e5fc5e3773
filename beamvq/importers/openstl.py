"""OpenSTL weights -> beamvq's SimVP-v2, TAU and PredRNN.

OpenSTL (Tan et al., NeurIPS 2023 Datasets and Benchmarks; github.com/chengtan9907/OpenSTL,
read at commit c74deb5d4c3da585291f9f18281f3fefdbba3a54): ``openstl/models/simvp_model.py``
(``SimVP_Model`` with ``model_type='gSTA'`` or ``'tau'``: ``enc``, ``hid``, ``dec``),
``openstl/modules/simvp_modules.py`` (``ConvSC``, ``GASubBlock``, ``TAUSubBlock``),
``openstl/modules/layers/van.py`` (``MixMlp``), ``openstl/models/predrnn_model.py`` and
``openstl/modules/predrnn_modules.py`` (``PredRNN_Model``, ``SpatioTemporalLSTMCell``).

beamvq's backbones compute what these modules compute (see beamvq/nn/simvp.py and
beamvq/nn/recurrent.py), so the conversion is a renaming: by name for the encoder, decoder,
cells and read-out, and by position for the translator, whose ``i``-th OpenSTL ``MetaBlock``
(a block and, where the width changes, its 1x1 ``reduction``) is the ``i``-th block of
``MetaTranslator.layers`` (and the 1x1 convolution after it). One tensor changes layout: PredRNN's
patches stack channels as ``(p1 p2 c)`` in OpenSTL's ``reshape_patch`` and as ``(c p1 p2)`` in
beamvq's ``patchify``, so the first cell's input kernel and the read-out are permuted (the
identity for one channel).

Not mapped, with the reason in the error: OpenSTL's PredRNN with ``layer_norm`` (its
``LayerNorm([C, H, W])`` has a per-pixel affine; beamvq's grid-free ``GroupNorm(1, C)`` a
per-channel one); SimVP with ``T_out != T_in`` (OpenSTL has none) or another channel count out
than in; ConvLSTM (OpenSTL's cell never adds its forget bias, beamvq's does: same weights, other
outputs); other SimVP translators (IncepU, ConvNeXt, ...), which beamvq does not implement.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from beamvq.backbones.predrnn import PredRNN
from beamvq.backbones.simvp import SimVPv2
from beamvq.importers.mapping import Refusal, Rule, WeightMismatch, convert, strip_prefix
from beamvq.nn.simvp import MetaSubBlock

SOURCE = "OpenSTL"

# inside one GASubBlock / TAUSubBlock: OpenSTL's name -> beamvq's (MetaSubBlock)
_BLOCK_PARTS = (
    (r"layer_scale_(1|2)", r"layer_scale_\1"),
    (r"norm(1|2)\.(weight|bias|running_mean|running_var|num_batches_tracked)", r"norm\1.\2"),
    (r"attn\.proj_1\.(weight|bias)", r"attn.proj_in.\1"),
    (r"attn\.proj_2\.(weight|bias)", r"attn.proj_out.\1"),
    (r"attn\.spatial_gating_unit\.conv0\.(weight|bias)", r"attn.gating.large_kernel.local.\1"),
    (
        r"attn\.spatial_gating_unit\.conv_spatial\.(weight|bias)",
        r"attn.gating.large_kernel.dilated.\1",
    ),
    (r"attn\.spatial_gating_unit\.conv1\.(weight|bias)", r"attn.gating.proj.\1"),
    (r"attn\.spatial_gating_unit\.fc\.(0|2)\.weight", r"attn.gating.excite.\1.weight"),
    (r"mlp\.fc(1|2)\.(weight|bias)", r"mlp.fc\1.\2"),
    (r"mlp\.dwconv\.dwconv\.(weight|bias)", r"mlp.dwconv.\1"),
)


def _translator_positions(backbone: SimVPv2) -> list[int]:
    """Index in ``translator.layers`` of each MetaFormer block, in order."""
    return [i for i, m in enumerate(backbone.translator.layers) if isinstance(m, MetaSubBlock)]


def _simvp_rules(backbone: SimVPv2) -> list[Rule]:
    name = type(backbone).__name__
    if backbone.in_steps != backbone.out_steps:
        raise WeightMismatch(
            f"{SOURCE}'s SimVP forecasts as many frames as it reads; the {name} config has "
            f"in_steps={backbone.in_steps}, out_steps={backbone.out_steps}"
        )
    if backbone.in_channels != backbone.out_channels:
        raise WeightMismatch(
            f"{SOURCE}'s SimVP outputs the channels it reads; the {name} config has "
            f"in_channels={backbone.in_channels}, out_channels={backbone.out_channels}"
        )
    blocks = _translator_positions(backbone)
    parts = [(re.compile(pattern), target) for pattern, target in _BLOCK_PARTS]

    def position(i: int, offset: int = 0) -> str:
        # OpenSTL's i-th MetaBlock is the i-th block of beamvq's MetaTranslator.layers
        return str(blocks[i] + offset) if i < len(blocks) else f"<block {i} of {len(blocks)}>"

    def block(m: re.Match[str]) -> str:
        tail = m.group(2)
        part = next((t.fullmatch(tail).expand(r) for t, r in parts if t.fullmatch(tail)), None)
        return f"translator.layers.{position(int(m.group(1)))}.{part or '<unknown ' + tail + '>'}"

    def reduction(m: re.Match[str]) -> str:
        return f"translator.layers.{position(int(m.group(1)), 1)}.{m.group(2)}"

    return [
        Rule(r"enc\.enc\.(\d+)\.conv\.conv\.(weight|bias)", r"encoder.layers.\1.conv.\2"),
        Rule(r"enc\.enc\.(\d+)\.conv\.norm\.(weight|bias)", r"encoder.layers.\1.norm.\2"),
        # the decoder's sub-pixel layers are Sequential(conv, PixelShuffle) in both: conv.conv.0
        Rule(
            r"dec\.dec\.(\d+)\.conv\.conv\.((?:0\.)?(?:weight|bias))", r"decoder.layers.\1.conv.\2"
        ),
        Rule(r"dec\.dec\.(\d+)\.conv\.norm\.(weight|bias)", r"decoder.layers.\1.norm.\2"),
        Rule(r"dec\.readout\.(weight|bias)", r"decoder.readout.\1"),
        Rule(r"hid\.enc\.(\d+)\.block\.(.+)", block),
        Rule(r"hid\.enc\.(\d+)\.reduction\.(weight|bias)", reduction),
    ]


_SIMVP_REFUSALS = (
    Refusal(
        r"hid\.enc\.\d+\.(conv1|layers)\..*",
        "an IncepU translator (SimVP v1, model_type='incepu'); beamvq maps gSTA (SimVPv2) and "
        "TAU translators",
    ),
    Refusal(
        r"hid\.enc\.\d+\.block\.(?!norm|attn|mlp|layer_scale).*",
        "a MetaFormer block other than gSTA or TAU (model_type); beamvq maps gSTA and TAU",
    ),
)


def _patch_permutation(patch: int, channels: int) -> Tensor:
    """Index into OpenSTL's ``(p1 p2 c)`` patch channels for each of beamvq's ``(c p1 p2)``."""
    return (
        torch.arange(patch * patch * channels)
        .reshape(patch, patch, channels)
        .permute(2, 0, 1)
        .reshape(-1)
    )


def _predrnn_rules(backbone: PredRNN) -> list[Rule]:
    if backbone.in_channels != backbone.out_channels:
        raise WeightMismatch(
            f"{SOURCE}'s PredRNN outputs the channels it reads; the PredRNN config has "
            f"in_channels={backbone.in_channels}, out_channels={backbone.out_channels}"
        )
    p, c = backbone.patch_size, backbone.in_channels
    order = _patch_permutation(p, c)

    def input_kernel(w: Tensor) -> Tensor:
        return w[:, order] if w.shape[1] == order.numel() else w

    def readout(w: Tensor) -> Tensor:
        return w[order] if w.shape[0] == order.numel() else w

    return [
        Rule(r"cell_list\.0\.conv_x\.0\.weight", "stack.cells.0.conv_x.weight", input_kernel),
        Rule(r"cell_list\.(\d+)\.conv_(x|h|m|o)\.0\.weight", r"stack.cells.\1.conv_\2.weight"),
        Rule(r"cell_list\.(\d+)\.conv_last\.weight", r"stack.cells.\1.conv_last.weight"),
        Rule(r"conv_last\.weight", "stack.readout.weight", readout),
    ]


_PREDRNN_REFUSALS = (
    Refusal(
        r"cell_list\.\d+\.conv_[xhmo]\.1\.(weight|bias)",
        "a PredRNN trained with layer_norm: OpenSTL's LayerNorm([C, H, W]) has a per-pixel "
        "affine that beamvq's grid-free layer norm (GroupNorm(1, C), per channel) cannot hold",
    ),
)

# beamvq backbone class -> (rules for it, refusals, the names OpenSTL's state dict starts with);
# subclasses (TAU of SimVPv2) use their parent's entry
_MAPPERS: dict[type[nn.Module], tuple[Callable, Sequence[Refusal], tuple[str, ...]]] = {
    SimVPv2: (_simvp_rules, _SIMVP_REFUSALS, ("enc.", "hid.", "dec.")),
    PredRNN: (_predrnn_rules, _PREDRNN_REFUSALS, ("cell_list.", "conv_last.")),
}


def import_openstl(state_dict: Mapping[str, object], backbone: nn.Module) -> dict[str, Tensor]:
    """The state dict of ``backbone`` (beamvq SimVPv2, TAU or PredRNN) holding OpenSTL's weights.

    ``state_dict``: an OpenSTL model's ``state_dict()`` (``SimVP_Model``, ``PredRNN_Model``), or a
    Lightning checkpoint's ``state_dict`` of OpenSTL's method (names prefixed ``model.``). The
    backbone must be built with the trained network's sizes (``hid_S -> hid_s``, ``hid_T ->
    hid_t``, ``N_S -> n_s``, ``N_T -> n_t``, ``num_hidden``, ``filter_size``, ``patch_size``).
    Raises :class:`~beamvq.importers.mapping.WeightMismatch` naming the first parameter that
    does not fit.
    """
    entry = next((_MAPPERS[c] for c in type(backbone).__mro__ if c in _MAPPERS), None)
    if entry is None:
        raise WeightMismatch(
            f"{SOURCE} weights map onto SimVPv2, TAU and PredRNN; got {type(backbone).__name__} "
            "(see docs/importing.md for why ConvLSTM and the others are not mapped)"
        )
    make_rules, refusals, roots = entry
    foreign = strip_prefix(state_dict, roots)
    return convert(
        foreign,
        make_rules(backbone),
        backbone.state_dict(),
        SOURCE,
        type(backbone).__name__,
        refusals,
    )


__all__ = ["import_openstl"]
