"""TAU: Temporal Attention Unit.

Tan, Li, Gao, Li. "Temporal Attention Unit: Towards Efficient Spatiotemporal Predictive
Learning", CVPR 2023, arXiv 2206.12126, as implemented by OpenSTL (``method='TAU'``, i.e.
``SimVP_Model(model_type='tau')``).

TAU is SimVP's encoder / translator / decoder with a different translator block: the attention
is the product of a *static* (intra-frame) large-kernel attention (depthwise 5x5, depthwise 7x7
dilated by 3, 1x1) and a *dynamic* (inter-frame) squeeze-excitation over the time-stacked
channels (:func:`beamvq.nn.simvp.tau_block`). Everything else, including the contract mapping
(``z = (B, hid_s, T_in, h, w)``, the skip in ``extras``), the ``T_out != T_in`` handling and the
grid rule, is inherited from :class:`~beamvq.backbones.simvp.SimVPv2`.

The paper's differential divergence regularization is :func:`tau_differential_divergence`. TAU
trains with it by default, at OpenSTL's weight ``alpha = 0.1`` (``openstl/methods/tau.py``:
``loss = MSE + alpha * diff_div_reg``): :meth:`TAU.extra_loss`, the backbone hook the training
module adds to its loss, returns ``diff_div_weight`` times it (``diff_div_weight=0`` switches it
off, which is SimVP's objective with TAU's translator).
"""

from __future__ import annotations

import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from beamvq.arguments import backbone_key, non_negative
from beamvq.backbones.simvp import SimVPv2
from beamvq.nn.simvp import BlockFactory, tau_block

#: OpenSTL's weight of the differential divergence term (``alpha`` in ``openstl/methods/tau.py``).
DIFF_DIV_WEIGHT: float = 0.1


class TAU(SimVPv2):
    """SimVP with Temporal Attention Unit blocks in the translator.

    Args: those of :class:`~beamvq.backbones.simvp.SimVPv2`, plus
        diff_div_weight: weight of the differential divergence regularization in the training
            loss (:meth:`extra_loss`); 0.1 as OpenSTL, 0 turns it off.
    """

    block: BlockFactory = staticmethod(tau_block)

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
        diff_div_weight: float = DIFF_DIV_WEIGHT,
    ) -> None:
        super().__init__(
            in_steps,
            out_steps,
            in_channels,
            out_channels,
            hid_s,
            hid_t,
            n_s,
            n_t,
            spatio_kernel_enc,
            spatio_kernel_dec,
            mlp_ratio,
            drop_path,
        )
        non_negative(backbone_key("TAU", "diff_div_weight"), diff_div_weight)
        self.diff_div_weight = float(diff_div_weight)

    def extra_loss(self, pred: Tensor, target: Tensor) -> Tensor:
        """The base hook's term plus ``diff_div_weight ×`` the differential divergence of the
        prediction against the target over all their frames (none for ``T <= 2``, as OpenSTL)."""
        loss = super().extra_loss(pred, target)
        # OpenSTL's diff_div_reg returns 0 for T <= 2 (a single frame difference); so do we here
        if self.diff_div_weight == 0 or pred.shape[1] <= 2:
            return loss
        return loss + self.diff_div_weight * tau_differential_divergence(pred, target)


def tau_differential_divergence(pred: Tensor, target: Tensor, tau: float = 0.1) -> Tensor:
    """TAU's differential divergence regularization (paper Sec. 3.3; OpenSTL ``diff_div_reg``).

    For every sample and frame-to-frame difference ``Δŷ_t = ŷ_{t+1} - ŷ_t`` (and ``Δy_t``), the
    ``C * H * W`` values are turned into a distribution by a softmax with temperature ``tau``, and
    the loss is ``KL(σ(Δŷ_t / τ) || σ(Δy_t / τ))``. As in OpenSTL the pointwise KL terms are
    averaged over batch, time and the distribution axis (the published ``alpha = 0.1`` weight is
    tuned to that scale), and log-softmax replaces OpenSTL's ``log(p / (q + 1e-12) + 1e-12)``.

    Zero when prediction and target change identically (up to a constant shift per frame pair),
    positive otherwise; a zero scalar when ``T < 2`` (no frame differences).
    ``pred``, ``target``: ``(B, T, C, H, W)``.
    """
    if pred.shape != target.shape:
        raise ValueError(
            f"tau_differential_divergence: pred {tuple(pred.shape)} and target "
            f"{tuple(target.shape)} must have the same shape"
        )
    if pred.ndim != 5:
        raise ValueError(
            f"tau_differential_divergence: expects (B, T, C, H, W), got {tuple(pred.shape)}"
        )
    if tau <= 0:
        raise ValueError(f"tau_differential_divergence: tau must be > 0, got {tau}")
    if pred.shape[1] < 2:
        return pred.new_zeros(())
    d_pred = rearrange(pred[:, 1:] - pred[:, :-1], "b t c h w -> b t (c h w)") / tau
    d_true = rearrange(target[:, 1:] - target[:, :-1], "b t c h w -> b t (c h w)") / tau
    log_p = F.log_softmax(d_pred, dim=-1)
    log_q = F.log_softmax(d_true, dim=-1)
    return (log_p.exp() * (log_p - log_q)).mean()


__all__ = ["DIFF_DIV_WEIGHT", "TAU", "tau_differential_divergence"]
