"""SimVP-v2 with the gated spatiotemporal attention (gSTA) translator.

Tan, Gao, Li, Li. "SimVP: Towards Simple yet Effective Spatiotemporal Predictive Learning",
arXiv 2211.12509, as implemented by OpenSTL's ``SimVP_Model(model_type='gSTA')``
(``openstl/models/simvp_model.py``). Blocks live in :mod:`beamvq.nn.simvp`.

Layout, and how it maps onto the beamvq contract:

``encode``
    Every input frame goes through the spatial encoder (``n_s`` ConvNormAct layers, GroupNorm +
    SiLU, every second layer strided by 2, so the grid shrinks by ``2 ** (n_s // 2)``).
    ``z`` is ``(B, hid_s, T_in, h, w)``: one ``hid_s``-vector per frame and position, which the
    VQ bottleneck quantizes. ``extras`` is the first encoder layer's output, ``(B, T_in, hid_s,
    H, W)`` (the full-resolution skip).
``translate``
    The gSTA translator over time-stacked channels ``T_in * hid_s``: ``n_t`` MetaFormer blocks,
    the first widening to ``hid_t`` channels and the last narrowing to ``T_out * hid_s``. The
    output ``z`` is ``(B, hid_s, T_out, h, w)``.
``decode``
    Per output frame: the spatial decoder (sub-pixel upsampling, the skip added before the last
    layer, 1x1 readout to ``out_channels``).

``T_out != T_in`` (OpenSTL assumes equality and rolls out autoregressively otherwise, which
would re-encode inside ``decode``): the translator's last 1x1 reduction maps to
``T_out * hid_s`` channels instead of ``T_in * hid_s`` (same parameter count when the two are
equal), and the skip, which exists per input frame, is mapped to ``T_out`` frames by a learned
``(T_out, T_in)`` mix initialised to copy the last input frame (:class:`~beamvq.nn.simvp.TimeMix`;
absent when ``T_out == T_in``, where frame ``t``'s skip goes to output frame ``t`` as in OpenSTL).

Other choices: stochastic depth rises linearly from 0 to ``drop_path`` (OpenSTL's schedule starts
at 1e-2 even when ``drop_path=0``; here ``drop_path=0`` means none). Grid: ``H`` and ``W`` must be
multiples of ``2 ** (n_s // 2)``.
"""

from __future__ import annotations

from functools import partial

from einops import rearrange
from torch import Tensor, nn

from beamvq.arguments import at_least, backbone_key, fraction, odd_int, positive, positive_int
from beamvq.backbones.base import Backbone, Encoded, divisible_grid_error
from beamvq.nn.simvp import (
    BlockFactory,
    MetaTranslator,
    SimVPDecoder,
    SimVPEncoder,
    TimeMix,
    gsta_block,
)


class SimVPv2(Backbone):
    """SimVP-v2 (gSTA): conv encoder, MetaFormer translator over time-stacked channels, conv
    decoder with a full-resolution skip. See the module docstring for the contract mapping."""

    #: The translator block; TAU swaps it for its temporal attention unit.
    block: BlockFactory = staticmethod(gsta_block)

    def __init__(
        self,
        in_steps: int,
        out_steps: int,
        in_channels: int,
        out_channels: int,
        hid_s: int = 16,
        hid_t: int = 64,
        n_s: int = 4,
        n_t: int = 2,
        spatio_kernel_enc: int = 3,
        spatio_kernel_dec: int = 3,
        mlp_ratio: float = 8.0,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__(in_steps, out_steps, in_channels, out_channels)
        key = partial(backbone_key, type(self).__name__)
        at_least(key("hid_s"), hid_s, 2)
        if hid_s % 2 != 0:
            raise ValueError(
                f"{key('hid_s')} must be an even number >= 2 (GroupNorm(2)), got {hid_s}"
            )
        for arg, value in (("hid_t", hid_t), ("n_s", n_s), ("n_t", n_t)):
            positive_int(key(arg), value)
        odd_int(key("spatio_kernel_enc"), spatio_kernel_enc)
        odd_int(key("spatio_kernel_dec"), spatio_kernel_dec)
        positive(key("mlp_ratio"), mlp_ratio)
        fraction(key("drop_path"), drop_path, below_one=True)
        self.latent_dim = hid_s
        self.hid_s = hid_s
        self.downsample = 2 ** (n_s // 2)
        self.encoder = SimVPEncoder(in_channels, hid_s, n_s, spatio_kernel_enc)
        self.translator = MetaTranslator(
            in_steps * hid_s,
            hid_t,
            out_steps * hid_s,
            n_t,
            type(self).block,
            mlp_ratio=mlp_ratio,
            drop_path=drop_path,
        )
        self.skip_mix: nn.Module = (
            nn.Identity() if in_steps == out_steps else TimeMix(in_steps, out_steps)
        )
        self.decoder = SimVPDecoder(hid_s, out_channels, n_s, spatio_kernel_dec)

    def check_grid(self, height: int, width: int) -> None:
        if height % self.downsample or width % self.downsample:
            raise divisible_grid_error(
                type(self).__name__,
                height,
                width,
                self.downsample,
                f"the encoder halves the grid {self.downsample.bit_length() - 1} time(s)",
            )

    def encode(self, x: Tensor) -> Encoded:
        b = x.shape[0]
        frames = rearrange(x, "b t c h w -> (b t) c h w")
        enc = self.encoder(frames)
        z = rearrange(enc.latent, "(b t) c h w -> b c t h w", b=b)
        skip = rearrange(enc.skip, "(b t) c h w -> b t c h w", b=b)
        return Encoded(z=z, extras=skip)

    def translate(self, enc: Encoded) -> Encoded:
        stacked = rearrange(enc.z, "b c t h w -> b (t c) h w")
        out = self.translator(stacked)
        z = rearrange(out, "b (t c) h w -> b c t h w", t=self.out_steps)
        return enc._replace(z=z)

    def decode(self, enc: Encoded) -> Tensor:
        b = enc.z.shape[0]
        latent = rearrange(enc.z, "b c t h w -> (b t) c h w")
        skip = rearrange(self.skip_mix(enc.extras), "b t c h w -> (b t) c h w")
        y = self.decoder(latent, skip)
        return rearrange(y, "(b t) c h w -> b t c h w", b=b)


__all__ = ["SimVPv2"]
