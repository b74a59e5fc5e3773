"""neuraloperator's ``FNO`` weights -> beamvq's FNO, with the two ways its forward differs.

neuraloperator (Kossaifi et al.; github.com/neuraloperator/neuraloperator, release 2.0.0, commit
b307030d9b7ee530823d6a05bddb8238ba22a743): ``neuralop/models/fno.py`` (``FNO``),
``neuralop/layers/fno_block.py`` (``FNOBlocks``), ``neuralop/layers/spectral_convolution.py``
(``SpectralConv``), ``neuralop/layers/channel_mlp.py``, ``neuralop/layers/skip_connections.py``,
``neuralop/layers/embeddings.py``.

The network that maps is a 2-D ``FNO(n_modes=(2m, 2m - 1) or (2m, 2m - 2), in_channels=T_in*C_in,
out_channels=T_out*C_out, hidden_channels=width, n_layers=L, lifting_channel_ratio=0,
projection_channel_ratio=projection_width/width, use_channel_mlp=False, fno_skip='linear',
positional_embedding='grid')`` with dense weights and no normalization, onto beamvq's
``FNO(modes=m, width=width, num_layers=L, projection_width=...)``:

- ``lifting.fcs.0`` (a 1x1 Conv1d) is ``lift`` (a Linear over the same channels: the input's
  ``(t c)`` channels, then the two grid channels); ``projection.fcs.0/1`` are
  ``project_hidden`` / ``project_out``.
- ``fno_blocks.convs.i.weight`` is one complex ``(width, width, 2m, m)`` tensor over the
  fft-shifted first axis (frequencies ``-m .. m-1``) and the real FFT's ``0 .. m-1``: its upper
  half is ``weights1`` (frequencies ``0 .. m-1``), its lower half ``weights2`` (``-m .. -1``),
  stored as (real, imaginary) pairs.
- ``fno_blocks.convs.i.bias`` plus the bias-free ``fno_blocks.fno_skips.i.conv`` make the 1x1
  ``pointwise`` convolution: both add to the spectral output, so the sum is the same.

Known differences, reported and not changed (:data:`FNO_DIFFERENCES`): with
``use_channel_mlp=False`` neuraloperator applies its non-linearity twice per block
(``forward_with_postactivation`` calls it after the skip sum and again after the absent channel
MLP), beamvq once; and its grid embedding runs over ``linspace(0, 1, n + 1)[:-1]`` (no endpoint),
beamvq's over ``linspace(0, 1, n)``. The converted model therefore does not reproduce the
neuraloperator model's outputs; it starts from its weights.

Refused, with the reason: a two-layer lifting (``lifting_channel_ratio > 0``; the neuraloperator
releases after 2.0.0 always build one), channel MLPs in the blocks (``use_channel_mlp=True``, the
neuraloperator default), normalization layers, factorized (Tucker/CP/TT) spectral weights, and
spectral weights whose mode counts have no beamvq counterpart (beamvq keeps ``m`` modes on both
axes, ``modes1 = modes2``).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from beamvq.backbones.fno import FNO
from beamvq.importers.mapping import Refusal, Rule, WeightMismatch, convert, strip_prefix

SOURCE = "neuraloperator"

FNO_DIFFERENCES: tuple[str, ...] = (
    "neuraloperator's FNOBlocks (use_channel_mlp=False) applies GELU twice after every Fourier "
    "layer but the last (GELU(GELU(K u + W u))); beamvq's FNO applies it once",
    "neuraloperator's grid embedding is linspace(0, 1, n + 1)[:-1] per axis (no endpoint); "
    "beamvq's FNO appends linspace(0, 1, n) (endpoint included)",
)

_REFUSALS = (
    Refusal(
        r"lifting\.fcs\.[1-9]\d*\.(weight|bias)",
        "a lifting MLP of two or more layers (lifting_channel_ratio > 0); beamvq's FNO lifts "
        "with one linear layer (neuraloperator <= 2.0.0 with lifting_channel_ratio=0)",
    ),
    Refusal(
        r"fno_blocks\.channel_mlp(_skips)?\..*",
        "channel MLPs inside the Fourier blocks (use_channel_mlp=True); beamvq's FNO layer is "
        "GELU(K u + W u) (neuraloperator use_channel_mlp=False)",
    ),
    Refusal(
        r"fno_blocks\.norm\..*", "normalization layers in the blocks (norm=...); none in beamvq"
    ),
    Refusal(
        r"fno_blocks\.convs\.\d+\.weight\.(core|factors|weights)(\.\d+)?",
        "factorized spectral weights (factorization='tucker'/'cp'/'tt'); beamvq's are dense",
    ),
)


def _conv1d_to_linear(w: Tensor) -> Tensor:
    return w.squeeze(-1) if w.ndim == 3 else w


def _spectral(name: str, modes: int, half: str) -> Rule:
    """``weights1`` (``half='upper'``) or ``weights2`` of one layer from the complex weight."""

    def transform(w: Tensor) -> Tensor:
        if not torch.is_complex(w) or w.ndim != 4:
            raise WeightMismatch(
                f"{SOURCE} parameter {name} must be a complex (in, out, modes_x, modes_y) tensor, "
                f"got {w.dtype} {tuple(w.shape)}"
            )
        rows, cols = w.shape[2], w.shape[3]
        if rows != 2 * modes or cols != modes:
            raise WeightMismatch(
                f"{SOURCE} parameter {name} keeps {rows} x {cols} modes; beamvq's FNO with "
                f"modes={modes} needs {2 * modes} x {modes} (neuraloperator n_modes="
                f"({2 * modes}, {2 * modes - 1}) or ({2 * modes}, {2 * modes - 2})); set the "
                f"backbone's modes to {rows // 2} if {rows} is even and {cols} == {rows // 2}, "
                "otherwise the trained modes have no beamvq counterpart"
            )
        part = w[:, :, modes:] if half == "upper" else w[:, :, :modes]
        return torch.view_as_real(part.resolve_conj()).contiguous()

    layer = name.split(".")[2]
    target = f"layers.{layer}.spectral.weights{1 if half == 'upper' else 2}"
    return Rule(rf"{name.replace('.', chr(92) + '.')}", target, transform)


def _rules(foreign: Mapping[str, object], backbone: FNO) -> list[Rule]:
    rules = [
        Rule(r"lifting\.fcs\.0\.weight", "lift.weight", _conv1d_to_linear),
        Rule(r"lifting\.fcs\.0\.bias", "lift.bias"),
        Rule(r"projection\.fcs\.0\.weight", "project_hidden.weight", _conv1d_to_linear),
        Rule(r"projection\.fcs\.0\.bias", "project_hidden.bias"),
        Rule(r"projection\.fcs\.1\.weight", "project_out.weight", _conv1d_to_linear),
        Rule(r"projection\.fcs\.1\.bias", "project_out.bias"),
        Rule(
            r"fno_blocks\.convs\.(\d+)\.bias", r"layers.\1.pointwise.bias", lambda b: b.reshape(-1)
        ),
        Rule(
            r"fno_blocks\.fno_skips\.(\d+)\.conv\.weight",
            r"layers.\1.pointwise.weight",
            lambda w: w.unsqueeze(-1) if w.ndim == 3 else w,
        ),
    ]
    # one complex tensor feeds two beamvq tensors: the upper half under its own name, the lower
    # half under an alias added to the foreign state below
    for name in foreign:
        if name.startswith("fno_blocks.convs.") and name.endswith(".weight.tensor"):
            rules.append(_spectral(name, backbone.modes, "upper"))
            rules.append(_spectral(name + "#lower", backbone.modes, "lower"))
    return rules


def import_neuraloperator_fno(
    state_dict: Mapping[str, object], backbone: nn.Module
) -> dict[str, Tensor]:
    """The state dict of ``backbone`` (a beamvq FNO) holding a neuraloperator FNO's weights.

    ``state_dict``: ``FNO.state_dict()`` of neuraloperator (its ``_metadata`` entry is skipped),
    or such a dict under a wrapper's prefix. The backbone must be built with the trained
    network's sizes: ``width = hidden_channels``, ``num_layers = n_layers``, ``modes = m`` for
    ``n_modes=(2m, 2m - 1)``, ``projection_width = projection_channel_ratio * hidden_channels``,
    ``in_steps * in_channels = in_channels`` and ``out_steps * out_channels = out_channels`` of
    neuraloperator (channels stacked time-major, ``(t c)``), ``batch_norm=False``. The converted
    model's forward differs in the two ways of :data:`FNO_DIFFERENCES`. Raises
    :class:`~beamvq.importers.mapping.WeightMismatch` naming the first parameter that does not fit.
    """
    if not isinstance(backbone, FNO):
        raise WeightMismatch(
            f"{SOURCE} FNO weights map onto beamvq's FNO; got {type(backbone).__name__}"
        )
    foreign = strip_prefix(state_dict, ("lifting.", "fno_blocks.", "projection."))
    expanded: dict[str, object] = {}
    for name, value in foreign.items():
        expanded[name] = value
        if name.startswith("fno_blocks.convs.") and name.endswith(".weight.tensor"):
            expanded[name + "#lower"] = value
    return convert(
        expanded,
        _rules(expanded, backbone),
        backbone.state_dict(),
        SOURCE,
        type(backbone).__name__,
        _REFUSALS,
    )


__all__ = ["FNO_DIFFERENCES", "import_neuraloperator_fno"]
