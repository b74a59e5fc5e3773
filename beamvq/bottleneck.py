"""VQ bottleneck with top-K retrieval (BeamVQ, arXiv 2405.17051 / 2502.18925).

An EMA vector quantizer (van den Oord et al. 2017, "Neural Discrete Representation Learning",
arXiv 1711.00937; EMA updates as in its appendix) from the well-kept ``vector-quantize-pytorch``
library, wrapped so that it

* quantizes any channel-first latent ``z: (B, D, ...)`` (every position's D-vector is a token);
* returns ``Quantized(z_q, indices, aux_loss)`` where ``aux_loss`` is the weighted commitment loss;
* retrieves the ``k`` nearest codes per position for BeamVQ's K alternative futures:
  ``topk(z, k) -> (B, k, D, ...)``, candidate ``i`` using the i-th nearest code at **every**
  position (rank-aligned, as the authors' code does), candidate 0 being the nearest-code latent.

The paper's defaults are written here explicitly, not inherited from the library (whose defaults
change between releases): EMA decay 0.99, commitment weight 0.25, plain straight-through
estimator (no rotation trick), k-means initialisation and dead-code replacement on.

Eval mode never changes the code bank: retrieval then bypasses the library's forward (which
would run the k-means initialisation on first use) and only reads the codes.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from einops import rearrange
from torch import Tensor, nn
from vector_quantize_pytorch import VectorQuantize

from beamvq import arguments
from beamvq.arguments import BOTTLENECK

FORECAST_PATHS = ("quantized", "continuous")


class Quantized(NamedTuple):
    """Output of the bottleneck: quantized latent, code indices per position, auxiliary loss."""

    z_q: Tensor
    indices: Tensor
    aux_loss: Tensor


class CodebookStats(NamedTuple):
    """Code-bank health for one batch: perplexity of code usage and number of codes in use."""

    perplexity: Tensor
    codes_used: Tensor


def _check_arguments(
    dim: int, codebook_size: int, codebook_dim: int | None, decay: float,
    commitment_weight: float, kmeans_iters: int, threshold_ema_dead_code: float,
    forecast_path: str, offset_scale: float, learn_offset_scale: bool,
) -> None:  # fmt: skip
    """``VQBottleneck``'s arguments, named by their YAML keys (``model.bottleneck.init_args``)."""
    arguments.positive_int("VQBottleneck: dim (the backbone's latent_dim)", dim)
    arguments.at_least(f"{BOTTLENECK}.codebook_size", codebook_size, 2)
    arguments.positive_int(f"{BOTTLENECK}.codebook_dim", codebook_dim, optional=True)
    arguments.fraction(f"{BOTTLENECK}.decay", decay)
    arguments.non_negative(f"{BOTTLENECK}.commitment_weight", commitment_weight)
    arguments.positive_int(f"{BOTTLENECK}.kmeans_iters", kmeans_iters)
    arguments.non_negative(f"{BOTTLENECK}.threshold_ema_dead_code", threshold_ema_dead_code)
    arguments.one_of(f"{BOTTLENECK}.forecast_path", forecast_path, FORECAST_PATHS)
    arguments.positive(f"{BOTTLENECK}.offset_scale", offset_scale)
    if (offset_scale != 1.0 or learn_offset_scale) and forecast_path != "continuous":
        raise ValueError(
            f"{BOTTLENECK}.offset_scale / learn_offset_scale move the candidates "
            "around the continuous latent: they need forecast_path: continuous"
        )


class VQBottleneck(nn.Module):
    """EMA code bank over a channel-first latent, with top-K retrieval.

    Args:
        dim: channel width D of the latent (given by the forecast module from the backbone).
        codebook_size: number of codes (the authors' code: 512).
        codebook_dim: code width; ``None`` uses ``dim`` (no projection). Otherwise the latent is
            projected to this width and back with learned linear maps.
        decay: EMA decay of the code bank (paper: 0.99).
        commitment_weight: weight of ||z - sg(z_q)||² (paper: 0.25).
        kmeans_init: initialise codes by k-means on the first training batch.
        kmeans_iters: k-means iterations for that initialisation.
        threshold_ema_dead_code: a code whose EMA usage falls below this is replaced by a random
            latent of the batch (dead-code revival).
        forecast_path: ``"quantized"`` (the papers: the forecast decodes the nearest code) or
            ``"continuous"`` (ours, from the ablation in docs/results.md): the forecast decodes
            the continuous latent ``z`` itself and candidate i is ``z + (e_i − e_0)``, the latent
            moved by the offset between its i-th and its nearest code, so candidate 0 is the plain
            forecast and the code bank only shapes the alternatives. The code bank still trains
            (EMA, commitment); pair it with a small ``commitment_weight`` (about 0.02).
        offset_scale: with ``forecast_path="continuous"``, candidate i is
            ``z + offset_scale · (e_i − e_0)``: the spread of the K alternatives around the plain
            forecast (1: the code bank's own spacing). Ours, for calibration (docs/beamvq.md).
        learn_offset_scale: train ``offset_scale`` (as a log-scale parameter) with the loss, e.g.
            the ensemble CRPS of the candidates (``model.loss.candidate_loss: crps``), so the
            alternatives spread as far as the forecast errs.
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int = 512,
        codebook_dim: int | None = None,
        decay: float = 0.99,
        commitment_weight: float = 0.25,
        kmeans_init: bool = True,
        kmeans_iters: int = 10,
        threshold_ema_dead_code: float = 2.0,
        forecast_path: str = "quantized",
        offset_scale: float = 1.0,
        learn_offset_scale: bool = False,
    ) -> None:
        super().__init__()
        _check_arguments(
            dim, codebook_size, codebook_dim, decay, commitment_weight, kmeans_iters,
            threshold_ema_dead_code, forecast_path, offset_scale, learn_offset_scale,
        )  # fmt: skip
        self.forecast_path = forecast_path
        log_scale = torch.tensor(math.log(offset_scale))
        if learn_offset_scale:
            self.log_offset_scale = nn.Parameter(log_scale)
        else:
            # not persistent: checkpoints of a fixed scale look as they did before the option
            self.register_buffer("log_offset_scale", log_scale, persistent=False)
        self.dim = int(dim)
        self.codebook_size = int(codebook_size)
        self.vq = VectorQuantize(
            dim=dim,
            codebook_size=codebook_size,
            codebook_dim=codebook_dim,
            decay=decay,
            commitment_weight=commitment_weight,
            kmeans_init=kmeans_init,
            kmeans_iters=kmeans_iters,
            threshold_ema_dead_code=threshold_ema_dead_code,
            rotation_trick=False,  # plain straight-through, as in the paper
            straight_through=False,
            use_cosine_sim=False,
            learnable_codebook=False,  # EMA updates only
            ema_update=True,
            channel_last=True,
        )

    # -- helpers -------------------------------------------------------------------------------
    @property
    def codebook(self) -> Tensor:
        """The code bank, ``(codebook_size, codebook_dim)``."""
        return self.vq.codebook

    def _tokens(self, z: Tensor) -> Tensor:
        if z.ndim < 2 or z.shape[1] != self.dim:
            raise ValueError(
                f"VQBottleneck: latent must be channel-first (B, {self.dim}, ...); "
                f"got shape {tuple(z.shape)}"
            )
        return rearrange(z, "b d ... -> b (...) d")

    @staticmethod
    def _untokens(tokens: Tensor, like: Tensor) -> Tensor:
        """``(B, N, D)`` back to the channel-first shape of ``like``."""
        b, d, *spatial = like.shape
        return tokens.transpose(1, 2).reshape(b, tokens.shape[-1], *spatial)

    def _nearest(self, tokens: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Indices ``(B, N, k)`` of the k nearest codes and the projected-out codes ``(B, N, k, D)``."""
        projected = self.vq.project_in(tokens)
        codes = self.codebook.to(projected.dtype)
        # squared euclidean distance without materialising differences: |x|² - 2x·c + |c|²
        dist = (
            projected.pow(2).sum(-1, keepdim=True)
            - 2 * projected @ codes.t()
            + codes.pow(2).sum(-1)[None, None, :]
        )
        indices = dist.topk(k, dim=-1, largest=False).indices
        return indices, self.vq.project_out(codes[indices])

    # -- the contract --------------------------------------------------------------------------
    def forward(self, z: Tensor) -> Quantized:
        tokens = self._tokens(z)
        continuous = self.forecast_path == "continuous"
        if self.training:
            quantized, indices, loss = self.vq(tokens)
            z_q = z if continuous else self._untokens(quantized, z)
            return Quantized(z_q, indices.reshape(z.shape[0], *z.shape[2:]), loss)
        indices, codes = self._nearest(tokens, 1)
        nearest = self._untokens(codes[:, :, 0], z)
        # eval: report the commitment term for monitoring; it trains nothing here
        aux = self.vq.commitment_weight * torch.mean((z - nearest) ** 2)
        z_q = z if continuous else nearest
        return Quantized(z_q, indices[..., 0].reshape(z.shape[0], *z.shape[2:]), aux)

    @torch.no_grad()
    def topk_indices(self, z: Tensor, k: int) -> Tensor:
        """Indices of the k nearest codes per position, ``(B, k, ...)``, nearest first."""
        indices, _ = self._nearest(self._tokens(z), self._check_k(k))
        return rearrange(indices, "b n k -> b k n").reshape(z.shape[0], k, *z.shape[2:])

    def topk(self, z: Tensor, k: int) -> Tensor:
        """K candidate latents ``(B, k, D, ...)``: candidate i uses the i-th nearest code everywhere.

        Candidate 0 is what ``forward`` returns in eval: the nearest-code latent, or with
        ``forecast_path="continuous"`` ``z`` itself, candidate i then being ``z + (e_i − e_0)``.
        Reads the code bank only; gradients flow to the projections, never into the codes.
        """
        tokens = self._tokens(z)
        _, codes = self._nearest(tokens, self._check_k(k))  # (B, N, k, D)
        b, d, *spatial = z.shape
        cands = rearrange(codes, "b n k d -> b k d n").reshape(b, k, d, *spatial)
        if self.forecast_path == "continuous":
            # exp(log 1) is exactly 1: the default leaves the candidates as they were
            scale = self.log_offset_scale.exp().to(cands.dtype)
            return z.unsqueeze(1) + scale * (cands - cands[:, :1])
        if not (self.training and torch.is_grad_enabled()):
            return cands
        # training: straight-through, as the authors' code (the values are the codes up to
        # rounding; a loss on the candidates reaches the encoder through z)
        return z.unsqueeze(1) + (cands - z.unsqueeze(1)).detach()

    @property
    def offset_scale(self) -> float:
        """The current spread factor of the continuous-path candidates."""
        return float(self.log_offset_scale.detach().exp())

    def _check_k(self, k: int) -> int:
        if not 1 <= k <= self.codebook_size:
            raise ValueError(f"VQBottleneck: k must be in [1, {self.codebook_size}], got {k}")
        return int(k)

    @staticmethod
    def usage(indices: Tensor, codebook_size: int) -> CodebookStats:
        """Perplexity exp(H(p)) of the code histogram and the number of distinct codes used."""
        counts = torch.bincount(indices.reshape(-1), minlength=codebook_size).float()
        p = counts / counts.sum().clamp_min(1.0)
        entropy = -(p * torch.log(p.clamp_min(1e-12))).sum()
        return CodebookStats(torch.exp(entropy), (counts > 0).sum())
