"""The papers' two-stage "+BeamVQ" model as a backbone wrapper, and its capacity-matched control.

BeamVQ (arXiv 2502.18925; arXiv 2405.17051; ``../shared/PAPERS.md`` §1) reports its gains for a
**two-stage** model: the backbone's forecast goes through a separately built Top-K VQ-VAE (EMA code
bank) and a SimVP-style temporal refiner, about 16.4 M parameters on top of 0.1–1 M-parameter
backbones. What the authors' public code does (``Beam_model.py``: ``BeamVQ``, ``DST``,
``DynamicPropagation``), read as facts, not copied:

* the backbone maps ``T`` frames to ``T`` frames; every forecast **frame** goes through the VQ-VAE
  encoder on its own (frames folded into the batch): two stride-2 4x4 convolutions to 128
  channels, a 3x3 convolution, a residual stack (2 blocks of 64 hidden units), a 1x1 "pre-VQ"
  convolution to a 64-wide latent at 1/4 resolution;
* an EMA vector quantizer (512 codes x 64, decay 0.99, commitment 0.25, straight-through) gives
  the nearest code and the top-k codes (k = 10) at every position, rank-aligned;
* the refiner ``DynamicPropagation`` (SimVP-v1's Inception U-Net translator, hid_T 256, N_T 8)
  runs over the quantized latents with the frames folded into channels (``T * 64``), **between**
  the quantizer and the VQ-VAE decoder; each of the k quantized latents goes through the same
  refiner and decoder (a residual stack and two transposed convolutions back to frames);
* everything trains jointly, end to end, from scratch: the forecast MSE plus the sum of the k
  candidates' MSE against the target (weight 1), plus the commitment loss. No residual path: the
  output is the VQ-VAE decoder's reconstruction.

Counted on that code for 10 frames of one channel: VQ-VAE encoder 452,736, decoder 370,625,
refiner 15,481,344, code bank 65,536 (embedding and EMA sum, both ``nn.Parameter`` there):
16,370,241, the 16.4 M of PAPERS.md.

How :class:`TwoStage` maps this onto the backbone contract (``beamvq.backbones.base``), so that
``VQForecaster`` and ``model.bottleneck`` do the rest unchanged:

``encode(x)``     the base backbone's full forecast ``y0 = base.decode(base.translate(base.encode
                  (x)))`` ``(B, T_out, C, H, W)``, then the per-frame VQ-VAE encoder:
                  ``z: (B, latent_dim, T_out, H / 2**downsample, W / 2**downsample)``; ``extras``
                  is ``y0`` (for the residual path) or ``None``.
``translate``     the refiner: SimVP-v2's gSTA ``MetaTranslator`` (``beamvq.nn.simvp``) over the
                  time-stacked latent ``T_out * latent_dim`` channels, as the authors place theirs.
``decode``        the per-frame VQ-VAE decoder back to frames; with ``residual=True`` the output
                  is ``y0 +`` the decoded correction.

With ``model.bottleneck`` configured, the bottleneck quantizes ``z`` between ``encode`` and
``translate`` and ``candidates(x, k)`` sends the k rank-aligned code latents through the refiner
and decoder: the papers' "+BeamVQ" model (compose ``configs/beamvq/paper_bottleneck.yaml``-style
settings, as ``configs/beamvq/two_stage.yaml`` does). With ``model.bottleneck: null`` the same
class is the **capacity-matched control**: exactly the same trainable parameters (the code bank
is an EMA buffer, no parameter, in ``VQBottleneck``), no VQ, no candidates, no search.

Our choices where the authors are silent or where we differ, and why:

* **Refiner placement**: in the latent, between quantizer and decoder, as in their code (not on
  the decoded frames): the K candidates then differ through the refiner as theirs do, and the
  contract's ``translate`` slot is exactly that place.
* **Refiner blocks**: SimVP-v2's gSTA MetaFormer blocks (already in ``beamvq.nn.simvp``) instead
  of SimVP-v1's Inception U-Net; same role (a translator over time-stacked channels).
* **Residual path** (``residual=True``, the default; ours): ``y = y0 + correction`` with the
  decoder's 1x1 readout initialised to zero, so at initialisation the model returns the base
  forecast exactly and the extra stage can only start from it. Reasons: the base forecast stays
  reachable whatever the VQ-VAE learns (the papers' quantized forecast path cost up to 4x the
  MSE in our measurements, docs/results.md); a stage-2 fine-tune of a converged base then starts
  at the base's error instead of a random reconstruction; and the control and the VQ arm start
  from the same function. ``residual=False`` is the authors' form (the output is the
  reconstruction). A zero readout passes gradients to itself only at the very first step; from
  the second step on every part of the extra stage trains.
* **VQ-VAE layers**: ``downsample`` stride-2 ConvNormAct layers (GroupNorm, SiLU, as the other
  beamvq conv stacks) instead of 4x4 convolutions, ``res_blocks`` full-width residual blocks,
  sub-pixel upsampling instead of transposed convolutions (no checkerboard). GroupNorm, not
  BatchNorm, in the VQ-VAE: candidates stacked along the batch must not interact.
* The base trains jointly with the extra stage (as theirs); nothing is frozen.

Parameter counts (``parameter_counts``; SimVP-v2 at the quickstart size, 5 -> 5 frames, one
channel, 64x64): base 276,097; extra stage at ``configs/beamvq/two_stage.yaml``'s CPU sizes (the
defaults here: hidden 16, latent_dim 16, downsample 2, res_blocks 1, refiner 64 wide x 2 blocks,
mlp_ratio 4) 188,321 (VQ-VAE encoder, refiner, decoder); bottleneck 0 trainable (its code bank,
512 x 16 = 8,192 values, is EMA-updated); total 464,418 for the VQ arm and the control alike. At
the authors' sizes (hidden 128, latent_dim 64, res_blocks 2, refiner 256 wide x 11 blocks,
mlp_ratio 4; 10 frames) the extra stage has 16,121,793 parameters, about their 16.4 M.
"""

from __future__ import annotations

from functools import partial

from einops import rearrange
from torch import Tensor, nn

from beamvq.arguments import at_least, backbone_key, positive
from beamvq.backbones.base import Backbone, Encoded, count_parameters, divisible_grid_error
from beamvq.model import VQForecaster
from beamvq.nn.conv import ConvNormAct, ResidualBlock
from beamvq.nn.simvp import MetaTranslator, gsta_block

__all__ = ["TwoStage", "VQVAEDecoder", "VQVAEEncoder", "parameter_counts"]


class VQVAEEncoder(nn.Module):
    """Per-frame encoder: ``downsample`` stride-2 ConvNormAct, ``res_blocks`` residual blocks,
    a 1x1 "pre-VQ" convolution to ``latent_dim``. ``(N, C, H, W) -> (N, D, H/2^d, W/2^d)``."""

    def __init__(
        self, channels: int, hidden: int, latent_dim: int, downsample: int, res_blocks: int
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            ConvNormAct(channels if i == 0 else hidden, hidden, 3, stride=2)
            for i in range(downsample)
        ]
        layers += [ResidualBlock(hidden, 3, norm_groups=2) for _ in range(res_blocks)]
        layers.append(nn.Conv2d(hidden, latent_dim, 1))
        self.layers = nn.Sequential(*layers)

    def forward(self, frames: Tensor) -> Tensor:
        return self.layers(frames)


class VQVAEDecoder(nn.Module):
    """Mirror of :class:`VQVAEEncoder`: 3x3 convolution from ``latent_dim``, residual blocks,
    ``downsample`` sub-pixel upsampling ConvNormAct, 1x1 readout to ``channels``
    (zero-initialised when ``zero_readout``)."""

    def __init__(
        self,
        channels: int,
        hidden: int,
        latent_dim: int,
        downsample: int,
        res_blocks: int,
        zero_readout: bool,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(latent_dim, hidden, 3, padding=1)]
        layers += [ResidualBlock(hidden, 3, norm_groups=2) for _ in range(res_blocks)]
        layers += [ConvNormAct(hidden, hidden, 3, upsample=True) for _ in range(downsample)]
        self.layers = nn.Sequential(*layers)
        self.readout = nn.Conv2d(hidden, channels, 1)
        if zero_readout:
            nn.init.zeros_(self.readout.weight)
            nn.init.zeros_(self.readout.bias)

    def forward(self, latent: Tensor) -> Tensor:
        return self.readout(self.layers(latent))


class TwoStage(Backbone):
    """A base backbone's forecast, re-encoded by a VQ-VAE and refined: the papers' two-stage
    model (with ``model.bottleneck``) or its capacity-matched control (without). See the module
    docstring for the authors' model, the mapping onto the contract and our choices.

    Args:
        base: any configured backbone (its steps and channels are this model's).
        hidden: channel width of the VQ-VAE encoder and decoder (authors: 128).
        latent_dim: width of the latent the bottleneck quantizes (authors: 64).
        downsample: stride-2 layers of the VQ-VAE; the latent grid is ``H / 2**downsample``
            (authors: 2).
        res_blocks: residual blocks in the VQ-VAE encoder and in its decoder (authors: 2).
        refiner_hidden: width of the refiner's inner blocks (authors' hid_T: 256).
        refiner_depth: gSTA blocks of the refiner (authors: 2 x N_T = 16 Inception layers; 11
            blocks at width 256 match their parameter count).
        mlp_ratio: the refiner blocks' MLP expansion (SimVP-v2: 8).
        residual: ``True`` (ours): output = base forecast + decoded correction, zero at init;
            ``False`` (the authors'): output = the decoded reconstruction.
    """

    def __init__(
        self,
        base: Backbone,
        hidden: int = 16,
        latent_dim: int = 16,
        downsample: int = 2,
        res_blocks: int = 1,
        refiner_hidden: int = 64,
        refiner_depth: int = 2,
        mlp_ratio: float = 4.0,
        residual: bool = True,
    ) -> None:
        if not isinstance(base, Backbone):
            raise TypeError(f"TwoStage: base must be a Backbone, got {type(base).__name__}")
        super().__init__(base.in_steps, base.out_steps, base.in_channels, base.out_channels)
        key = partial(backbone_key, "TwoStage")
        at_least(key("hidden"), hidden, 2)
        if hidden % 2:
            raise ValueError(f"{key('hidden')} must be an even number >= 2, got {hidden}")
        for name, value, low in (
            ("latent_dim", latent_dim, 1),
            ("downsample", downsample, 1),
            ("res_blocks", res_blocks, 0),
            ("refiner_hidden", refiner_hidden, 1),
            ("refiner_depth", refiner_depth, 1),
        ):
            at_least(key(name), value, low)
        positive(key("mlp_ratio"), mlp_ratio)
        self.base = base
        self.latent_dim = int(latent_dim)
        self.downsample = int(downsample)
        self.residual = bool(residual)
        c = base.out_channels
        self.vq_encoder = VQVAEEncoder(c, hidden, latent_dim, downsample, res_blocks)
        width = base.out_steps * latent_dim
        self.refiner = MetaTranslator(
            width, refiner_hidden, width, refiner_depth, gsta_block, mlp_ratio=mlp_ratio
        )
        self.vq_decoder = VQVAEDecoder(
            c, hidden, latent_dim, downsample, res_blocks, zero_readout=self.residual
        )

    @property
    def extra_stage(self) -> tuple[nn.Module, ...]:
        """The modules added on top of the base: VQ-VAE encoder, refiner, VQ-VAE decoder."""
        return (self.vq_encoder, self.refiner, self.vq_decoder)

    def check_grid(self, height: int, width: int) -> None:
        self.base.check_grid(height, width)
        self._check_vqvae_grid(height, width)

    def check_input(self, x: Tensor) -> None:
        self.base.check_input(x)  # the base's own checks (shapes, its grid), then the VQ-VAE's
        self._check_vqvae_grid(int(x.shape[-2]), int(x.shape[-1]))

    def _check_vqvae_grid(self, height: int, width: int) -> None:
        factor = 2**self.downsample
        if height % factor or width % factor:
            raise divisible_grid_error(
                type(self).__name__,
                height,
                width,
                factor,
                f"the VQ-VAE halves the grid {self.downsample} time(s)",
            )

    # -- the contract ----------------------------------------------------------------------------
    def base_forecast(self, x: Tensor) -> Tensor:
        """The base backbone's forecast ``(B, T_out, C, H, W)`` (what the extra stage refines)."""
        return self.base.decode(self.base.translate(self.base.encode(x)))

    def encode(self, x: Tensor) -> Encoded:
        y0 = self.base_forecast(x)
        z = self.vq_encoder(rearrange(y0, "b t c h w -> (b t) c h w"))
        z = rearrange(z, "(b t) d h w -> b d t h w", b=y0.shape[0])
        return Encoded(z=z, extras=y0 if self.residual else None)

    def translate(self, enc: Encoded) -> Encoded:
        stacked = rearrange(enc.z, "b d t h w -> b (t d) h w")
        out = self.refiner(stacked)
        return enc._replace(z=rearrange(out, "b (t d) h w -> b d t h w", t=self.out_steps))

    def decode(self, enc: Encoded) -> Tensor:
        b = enc.z.shape[0]
        frames = self.vq_decoder(rearrange(enc.z, "b d t h w -> (b t) d h w"))
        out = rearrange(frames, "(b t) c h w -> b t c h w", b=b)
        return enc.extras + out if self.residual else out

    # -- training hooks: the base's (scheduled sampling, MoE losses, TAU's divergence term) --------
    def begin_training_step(self, target: Tensor, progress: float) -> None:
        self.base.begin_training_step(target, progress)

    def extra_loss(self, pred: Tensor, target: Tensor) -> Tensor:
        return self.base.extra_loss(pred, target)

    def training_log_values(self) -> dict[str, Tensor]:
        return self.base.training_log_values()


def parameter_counts(module: nn.Module) -> dict[str, int]:
    """Trainable parameters of a forecaster, by part, for tables beside each arm.

    ``module``: a ``ForecastModule`` (its ``.model``), a ``VQForecaster`` or a ``Backbone``.
    Keys: ``base`` (the backbone, or ``TwoStage.base``), ``extra_stage`` (the VQ-VAE and refiner of
    a ``TwoStage``; 0 otherwise), ``bottleneck`` (its trainable parameters: projections, a learned
    offset scale; 0 for the EMA bottleneck at ``codebook_dim`` = latent width), ``codebook``
    (values in the code bank, ``codebook_size x code width``: EMA-updated buffers, not counted in
    ``total``; 0 without a bottleneck) and ``total`` (every trainable parameter of the forecaster).
    """
    model = getattr(module, "model", module)
    if isinstance(model, VQForecaster):
        backbone, bottleneck = model.backbone, model.bottleneck
    elif isinstance(model, Backbone):
        backbone, bottleneck = model, None
    else:
        raise TypeError(
            "parameter_counts: expected a ForecastModule, VQForecaster or Backbone, got "
            f"{type(module).__name__}"
        )
    if isinstance(backbone, TwoStage):
        base = count_parameters(backbone.base)
        extra = sum(count_parameters(m) for m in backbone.extra_stage)
    else:
        base, extra = count_parameters(backbone), 0
    n_bottleneck = 0 if bottleneck is None else count_parameters(bottleneck)
    codebook = 0 if bottleneck is None else int(bottleneck.codebook.numel())
    total = count_parameters(model)
    if total != base + extra + n_bottleneck:  # a part we do not know of: say so, do not hide it
        raise ValueError(
            f"parameter_counts: total {total} != base {base} + extra stage {extra} + bottleneck "
            f"{n_bottleneck}"
        )
    return {
        "base": base,
        "extra_stage": extra,
        "bottleneck": n_bottleneck,
        "codebook": codebook,
        "total": total,
    }
