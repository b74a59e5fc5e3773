"""Tests for beamvq.metrics: values checked against hand computations and analytic fields."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from numpy.lib.stride_tricks import sliding_window_view

from beamvq import metrics as M


def _grid(height: int, width: int, lx: float = 1.0, ly: float = 1.0, dtype=torch.float64):
    y = torch.arange(height, dtype=dtype) * ly / height
    x = torch.arange(width, dtype=dtype) * lx / width
    return torch.meshgrid(y, x, indexing="ij")  # (H, W) each


# ---------------------------------------------------------------- deterministic errors


def test_per_lead_errors_hand_values():
    target = torch.zeros(2, 3, 1, 2, 2)
    pred = torch.zeros(2, 3, 1, 2, 2)
    pred[:, 0] = 1.0  # lead 0: every error 1
    pred[0, 1, 0, 0, 0] = 4.0  # lead 1: one error of 4 among 8 elements
    pred[:, 2] = -2.0  # lead 2: every error -2
    torch.testing.assert_close(M.mse_per_lead(pred, target), torch.tensor([1.0, 2.0, 4.0]))
    torch.testing.assert_close(M.mae_per_lead(pred, target), torch.tensor([1.0, 0.5, 2.0]))
    torch.testing.assert_close(
        M.rmse_per_lead(pred, target), torch.tensor([1.0, math.sqrt(2.0), 2.0])
    )


def test_error_sums_pool_to_the_concatenated_mse():
    g = torch.Generator().manual_seed(0)
    a_pred, a_true = (
        torch.randn(3, 4, 2, 5, 5, generator=g),
        torch.randn(3, 4, 2, 5, 5, generator=g),
    )
    b_pred, b_true = (
        torch.randn(1, 4, 2, 5, 5, generator=g),
        torch.randn(1, 4, 2, 5, 5, generator=g),
    )
    sa, sb = M.error_sums(a_pred, a_true), M.error_sums(b_pred, b_true)
    assert sa.sq_err.dtype == torch.float64 and sa.count.tolist() == [150.0] * 4
    pooled_mse = (sa.sq_err + sb.sq_err) / (sa.count + sb.count)
    pooled_mae = (sa.abs_err + sb.abs_err) / (sa.count + sb.count)
    all_pred, all_true = torch.cat([a_pred, b_pred]), torch.cat([a_true, b_true])
    torch.testing.assert_close(pooled_mse.float(), M.mse_per_lead(all_pred, all_true))
    torch.testing.assert_close(pooled_mae.float(), M.mae_per_lead(all_pred, all_true))


def test_rel_l2():
    target = torch.ones(2, 1, 1, 2, 2)
    pred = target.clone()
    pred[0] *= 3.0  # sample 0: ||2 * 1|| / ||1|| = 2
    pred[1, 0, 0, 0, 0] = 0.0  # sample 1: ||e_1|| / ||1|| = 1/2
    torch.testing.assert_close(M.rel_l2_per_sample(pred, target), torch.tensor([2.0, 0.5]))
    torch.testing.assert_close(M.rel_l2(pred, target), torch.tensor(1.25))


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="differ"):
        M.mse_per_lead(torch.zeros(1, 2, 1, 4, 4), torch.zeros(1, 3, 1, 4, 4))


# ---------------------------------------------------------------- contingency


def _two_batches():
    # batch 1 at tau = 16: pred>= [T, T, F, F], truth>= [T, F, T, F] -> H=1, F=1, M=1, CN=1
    p1 = torch.tensor([[20.0, 80.0], [10.0, 5.0]]).view(1, 1, 1, 2, 2)
    o1 = torch.tensor([[30.0, 10.0], [20.0, 0.0]]).view(1, 1, 1, 2, 2)
    # batch 2: everything is a hit at tau = 16, nothing reaches 74
    p2 = torch.full((1, 1, 1, 2, 2), 20.0)
    o2 = torch.full((1, 1, 1, 2, 2), 20.0)
    return (p1, o1), (p2, o2)


def test_contingency_pooled_counts_and_scores():
    (p1, o1), (p2, o2) = _two_batches()
    thr = [16.0, 74.0, 100.0]
    c1 = M.contingency_counts(p1, o1, thr)
    c2 = M.contingency_counts(p2, o2, thr)
    assert c1.hits.dtype == torch.int64
    assert c1.hits.tolist() == [1, 0, 0] and c1.misses.tolist() == [1, 0, 0]
    assert c1.false_alarms.tolist() == [1, 1, 0] and c1.correct_negatives.tolist() == [1, 3, 4]
    c = M.pool_contingency([c1, c2])
    assert c.hits.tolist() == [5, 0, 0] and c.misses.tolist() == [1, 0, 0]
    assert c.false_alarms.tolist() == [1, 1, 0] and c.correct_negatives.tolist() == [1, 7, 8]

    csi = M.csi(c)
    assert csi[0].item() == pytest.approx(5 / 7) and csi[1].item() == 0.0
    assert math.isnan(csi[2].item())  # no event anywhere: undefined, not 0 or 1
    pod, sucr, bias = M.pod(c), M.sucr(c), M.bias(c)
    assert pod[0].item() == pytest.approx(5 / 6) and math.isnan(pod[1].item())
    assert sucr[0].item() == pytest.approx(5 / 6) and sucr[1].item() == 0.0
    assert bias[0].item() == pytest.approx(1.0) and math.isnan(bias[1].item())
    # CSI-M skips the undefined threshold
    assert M.csi_m(c).item() == pytest.approx((5 / 7 + 0.0) / 2)

    # pooling counts is not the mean of per-batch ratios: (1/3 + 1) / 2 = 2/3 != 5/7
    per_batch_mean = (M.csi(c1)[0] + M.csi(c2)[0]) / 2
    assert per_batch_mean.item() == pytest.approx(2 / 3)
    assert abs(per_batch_mean.item() - csi[0].item()) > 0.04


def test_contingency_per_lead_and_sevir_thresholds():
    assert M.SEVIR_THRESHOLDS == (16.0, 74.0, 133.0, 160.0, 181.0, 219.0)
    g = torch.Generator().manual_seed(1)
    pred = torch.rand(3, 4, 1, 8, 8, generator=g) * 255
    true = torch.rand(3, 4, 1, 8, 8, generator=g) * 255
    per_lead = M.contingency_counts(pred, true, M.SEVIR_THRESHOLDS, per_lead=True)
    total = M.contingency_counts(pred, true, M.SEVIR_THRESHOLDS)
    assert per_lead.hits.shape == (4, 6) and total.hits.shape == (6,)
    for a, b in zip(per_lead, total):
        assert torch.equal(a.sum(0), b)
    all_counts = (
        per_lead.hits + per_lead.misses + per_lead.false_alarms + per_lead.correct_negatives
    )
    assert (all_counts == 3 * 8 * 8).all()
    # a perfect forecast: CSI 1 wherever events exist
    assert torch.allclose(
        M.csi(M.contingency_counts(true, true, [16.0, 74.0])), torch.ones(2).double()
    )


# ---------------------------------------------------------------- SSIM


def _ssim_numpy(
    x: np.ndarray, y: np.ndarray, data_range: float, window: int, sigma: float
) -> float:
    coords = np.arange(window) - (window - 1) / 2
    g = np.exp(-(coords**2) / (2 * sigma**2))
    g /= g.sum()
    kernel = np.outer(g, g)

    def blur(f):
        return (sliding_window_view(f, (window, window)) * kernel).sum(axis=(-2, -1))

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    smap = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return float(smap.mean())


def test_ssim_identity_constants_and_reference():
    g = torch.Generator().manual_seed(2)
    x = torch.rand(2, 3, 2, 16, 16, generator=g, dtype=torch.float64)
    torch.testing.assert_close(M.ssim(x, x, data_range=1.0), torch.ones(2, dtype=torch.float64))

    # constant images: sigma = 0, so SSIM = (2ab + C1) / (a^2 + b^2 + C1) exactly
    a, b, L = 0.2, 0.6, 1.0
    c1 = (0.01 * L) ** 2
    expected = (2 * a * b + c1) / (a * a + b * b + c1)
    val = M.ssim(torch.full((1, 1, 1, 16, 16), a), torch.full((1, 1, 1, 16, 16), b), L)
    assert val.item() == pytest.approx(expected, rel=1e-5)

    # an independent sliding-window implementation, averaged over T and C, window 7 and 11
    y = (x + 0.3 * torch.rand(x.shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    for window in (7, 11):
        got = M.ssim(x, y, data_range=1.0, window=window)
        for i in range(2):
            ref = np.mean(
                [
                    _ssim_numpy(x[i, t, c].numpy(), y[i, t, c].numpy(), 1.0, window, 1.5)
                    for t in range(3)
                    for c in range(2)
                ]
            )
            assert got[i].item() == pytest.approx(ref, rel=1e-9)
        assert (got < 1).all()


def test_ssim_window_too_large_raises():
    with pytest.raises(ValueError, match="window 11"):
        M.ssim(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8), data_range=1.0)


# ---------------------------------------------------------------- ensembles


def test_crps_hand_values_and_mae():
    members = torch.tensor([0.0, 2.0]).view(1, 2, 1, 1, 1, 1)
    target = torch.ones(1, 1, 1, 1, 1)
    # mean|X - y| = 1, mean over the 4 ordered pairs |X - X'| = 1 -> 1 - 1/2
    assert M.crps_ensemble(members, target).item() == pytest.approx(0.5)
    # fair: pair sum 4 / (M (M - 1)) = 2 -> 1 - 1
    assert M.crps_ensemble(members, target, fair=True).item() == pytest.approx(0.0)

    g = torch.Generator().manual_seed(3)
    one = torch.randn(2, 1, 3, 1, 4, 4, generator=g)
    tgt = torch.randn(2, 3, 1, 4, 4, generator=g)
    torch.testing.assert_close(M.crps_ensemble(one, tgt), M.mae_per_lead(one[:, 0], tgt))
    with pytest.raises(ValueError, match="two members"):
        M.crps_ensemble(one, tgt, fair=True)


def test_crps_matches_pairwise_definition():
    g = torch.Generator().manual_seed(4)
    mem = torch.randn(2, 5, 3, 1, 4, 4, generator=g, dtype=torch.float64)
    tgt = torch.randn(2, 3, 1, 4, 4, generator=g, dtype=torch.float64)
    skill = (mem - tgt.unsqueeze(1)).abs().mean(1)
    pairs = (mem.unsqueeze(1) - mem.unsqueeze(2)).abs()  # (B, M, M, T, ...)
    expected = (skill - 0.5 * pairs.mean((1, 2))).mean((0, 2, 3, 4))
    torch.testing.assert_close(M.crps_ensemble(mem, tgt), expected)
    fair = (skill - 0.5 * pairs.sum((1, 2)) / (5 * 4)).mean((0, 2, 3, 4))
    torch.testing.assert_close(M.crps_ensemble(mem, tgt, fair=True), fair)


def test_spread_skill_hand_and_calibrated():
    members = torch.tensor([0.0, 2.0]).view(1, 2, 1, 1, 1, 1)
    target = torch.full((1, 1, 1, 1, 1), 2.0)
    ss = M.spread_skill(members, target)
    # unbiased variance of {0, 2} = 2; ensemble mean 1 vs 2 -> skill 1; ratio sqrt(3/2) sqrt(2)
    assert ss.spread.item() == pytest.approx(math.sqrt(2.0))
    assert ss.skill.item() == pytest.approx(1.0)
    assert ss.ratio.item() == pytest.approx(math.sqrt(3.0))

    # members and truth exchangeable: the corrected ratio is 1 even with M = 2
    g = torch.Generator().manual_seed(5)
    mem = torch.randn(8, 2, 2, 1, 64, 64, generator=g, dtype=torch.float64)
    tgt = torch.randn(8, 2, 1, 64, 64, generator=g, dtype=torch.float64)
    ratio = M.spread_skill(mem, tgt).ratio
    assert torch.allclose(ratio, torch.ones_like(ratio), atol=0.03)
    with pytest.raises(ValueError, match="two members"):
        M.spread_skill(mem[:, :1], tgt)


# ---------------------------------------------------------------- physics


def test_velocity_from_vorticity_single_mode_non_square():
    height, width, lx, ly = 16, 24, 2.0, 0.5
    yy, xx = _grid(height, width, lx, ly)
    kx, ky = 2 * math.pi * 2 / lx, 2 * math.pi * 3 / ly
    theta = kx * xx + ky * yy
    psi = torch.sin(theta)
    w = (kx**2 + ky**2) * psi  # lap(psi) = -w
    vel = M.velocity_from_vorticity(w.expand(2, 3, height, width), lx, ly)
    torch.testing.assert_close(vel.u[1, 2], ky * torch.cos(theta))  # u = dpsi/dy
    torch.testing.assert_close(vel.v[0, 1], -kx * torch.cos(theta))  # v = -dpsi/dx
    assert vel.u.dtype == torch.float64
    # a constant added to w (the non-periodic mean mode) is ignored
    vel_shift = M.velocity_from_vorticity(w + 5.0, lx, ly)
    torch.testing.assert_close(vel_shift.u, ky * torch.cos(theta))
    # spectrally divergence-free
    assert M.divergence(vel.u, vel.v, lx, ly).abs().max().item() < 1e-9


def test_divergence_analytic_spectral_and_fd():
    height, width, lx, ly = 16, 24, 1.0, 2.0
    yy, xx = _grid(height, width, lx, ly)
    u = torch.sin(2 * math.pi * xx / lx)
    v = torch.cos(2 * math.pi * 2 * yy / ly)
    expected = 2 * math.pi / lx * torch.cos(2 * math.pi * xx / lx) - 4 * math.pi / ly * torch.sin(
        4 * math.pi * yy / ly
    )
    torch.testing.assert_close(M.divergence(u, v, lx, ly), expected)
    # centred differences: d/dx sin(kx) -> sin(k dx)/dx cos(kx)
    dx, dy = lx / width, ly / height
    k1, k2 = 2 * math.pi / lx, 4 * math.pi / ly
    expected_fd = math.sin(k1 * dx) / dx * torch.cos(k1 * xx) - math.sin(k2 * dy) / dy * torch.sin(
        k2 * yy
    )
    torch.testing.assert_close(M.divergence_fd(u, v, lx, ly), expected_fd)


def test_energy_spectrum_single_modes_and_parseval():
    yy, xx = _grid(16, 16)
    u = torch.cos(2 * math.pi * 3 * xx)  # |k| = 3, 1/2 <u^2> = 1/4
    v = torch.sin(2 * math.pi * 4 * yy)  # |k| = 4, 1/4
    spec = M.energy_spectrum(u, v)
    assert spec.shape == (M.n_shells(16, 16),) == (12,)
    expected = torch.zeros(12, dtype=torch.float64)
    expected[3] = expected[4] = 0.25
    torch.testing.assert_close(spec, expected)
    # an oblique mode (3, 4) lands in shell 5
    spec_oblique = M.energy_spectrum(
        torch.cos(2 * math.pi * (3 * xx + 4 * yy)), torch.zeros_like(xx)
    )
    assert spec_oblique.argmax().item() == 5 and spec_oblique[5].item() == pytest.approx(0.25)

    # Parseval on random non-square fields: the shells sum to the mean KE, shells 1.. to the TKE
    g = torch.Generator().manual_seed(6)
    u = torch.randn(2, 3, 16, 24, generator=g, dtype=torch.float64) + 0.7
    v = torch.randn(2, 3, 16, 24, generator=g, dtype=torch.float64)
    spec = M.energy_spectrum(u, v)
    assert spec.shape == (2, 3, M.n_shells(16, 24))
    torch.testing.assert_close(spec.sum(-1), 0.5 * (u**2 + v**2).mean((-2, -1)))
    torch.testing.assert_close(spec[..., 1:].sum(-1), M.tke(u, v))


def test_tke_hand_value():
    u = torch.tensor([[1.0, 3.0], [1.0, 3.0]])  # u' = +-1
    v = torch.full((2, 2), 5.0)  # no fluctuation
    assert M.tke(u, v).item() == pytest.approx(0.5)


def test_latitude_weights_and_rmse():
    lat = torch.tensor([-60.0, 0.0, 60.0])
    torch.testing.assert_close(M.latitude_weights(lat), torch.tensor([0.75, 1.5, 0.75]))
    pred = torch.zeros(2, 2, 1, 3, 4)
    pred[:, 0, :, 1] = 2.0  # lead 0: error 2 on the equator row only -> sqrt(1.5 * 4 / 3)
    pred[:, 1, :, 0] = 2.0  # lead 1: error 2 on the -60 row only -> sqrt(0.75 * 4 / 3)
    got = M.lat_weighted_rmse(pred, torch.zeros_like(pred), lat)
    torch.testing.assert_close(got, torch.tensor([math.sqrt(2.0), 1.0]))
    with pytest.raises(ValueError, match="lat"):
        M.lat_weighted_rmse(pred, pred, torch.zeros(4))


# ---------------------------------------------------------------- scorers


def test_csi_scorer_hand_values_and_batched_consistency():
    ref = torch.tensor([[30.0, 10.0], [20.0, 0.0]]).view(1, 1, 1, 2, 2)
    good = ref.clone()
    bad = torch.tensor([[20.0, 80.0], [10.0, 5.0]]).view(1, 1, 1, 2, 2)
    cands = torch.stack([good, bad], dim=1)  # (1, 2, 1, 1, 2, 2)
    scorer = M.CSIScorer(thresholds=[16.0, 74.0])
    assert scorer.requires_reference
    # good: CSI 1 at 16; no event on either side at 74 -> 1. bad: 1/3 at 16; a false alarm at 74 -> 0
    torch.testing.assert_close(scorer(cands, ref), torch.tensor([[1.0, 1 / 6]]))

    g = torch.Generator().manual_seed(7)
    cands = torch.rand(3, 4, 2, 1, 8, 8, generator=g) * 255
    ref = torch.rand(3, 2, 1, 8, 8, generator=g) * 255
    scores = M.CSIScorer()(cands, ref)
    assert scores.shape == (3, 4)
    for b in range(3):
        for k in range(4):
            c = M.contingency_counts(cands[b, k][None], ref[b][None], M.SEVIR_THRESHOLDS)
            expected = torch.nan_to_num(M.csi(c), nan=1.0).mean()
            assert scores[b, k].item() == pytest.approx(expected.item(), abs=1e-6)


def test_reference_scorers_prefer_the_truth():
    g = torch.Generator().manual_seed(8)
    ref = torch.rand(2, 2, 1, 12, 12, generator=g) * 255
    noise = torch.randn(2, 3, 2, 1, 12, 12, generator=g)
    cands = ref.unsqueeze(1) + noise * torch.tensor([0.0, 10.0, 40.0]).view(1, 3, 1, 1, 1, 1)
    neg_mse = M.NegMSEScorer()(cands, ref)
    torch.testing.assert_close(neg_mse[:, 0], torch.zeros(2))
    expected = -((cands - ref.unsqueeze(1)) ** 2).mean((2, 3, 4, 5))
    torch.testing.assert_close(neg_mse, expected)
    ssim_s = M.SSIMScorer(data_range=255.0, window=7)(cands, ref)
    torch.testing.assert_close(ssim_s[:, 0], torch.ones(2))
    torch.testing.assert_close(ssim_s[1, 2], M.ssim(cands[1:2, 2], ref[1:2], 255.0, window=7)[0])
    for s in (neg_mse, ssim_s):
        assert (s[:, 0] > s[:, 1]).all() and (s[:, 1] > s[:, 2]).all()
    with pytest.raises(ValueError, match="needs a reference"):
        M.NegMSEScorer()(cands)


def test_divergence_scorer_uv_and_vorticity():
    height, width = 16, 16
    yy, xx = _grid(height, width, dtype=torch.float32)
    u = torch.sin(2 * math.pi * xx)
    dx = 1.0 / width
    # u/v channels: FD divergence sin(2 pi dx)/dx cos(2 pi x)
    fields = torch.stack([u, torch.zeros_like(u)])  # (C=2, H, W)
    cands = fields.expand(1, 2, 3, 2, height, width).clone()
    cands[:, 1, :, 0] = 0.0  # candidate 1: no flow, no divergence
    scorer = M.DivergenceScorer(from_vorticity=False, u_channel=0, v_channel=1)
    expected = -(math.sin(2 * math.pi * dx) / dx * torch.cos(2 * math.pi * xx)).abs().mean()
    got = scorer(cands)
    assert got[0, 0].item() == pytest.approx(expected.item(), rel=1e-5)
    assert got[0, 1].item() == 0.0 and got[0, 1] > got[0, 0]

    # vorticity: a smooth low mode beats the same field with grid-scale noise added
    g = torch.Generator().manual_seed(9)
    w = torch.sin(2 * math.pi * (xx + yy)) + torch.cos(2 * math.pi * 2 * yy)
    noisy = w + 0.5 * torch.randn(height, width, generator=g)
    cands = torch.stack([w, noisy]).view(1, 2, 1, 1, height, width)
    s = M.DivergenceScorer()(cands)
    assert s[0, 0] > s[0, 1]
    # a single-axis mode has kx*ky = 0, so even the FD divergence vanishes
    axis_mode = torch.cos(2 * math.pi * 3 * xx).view(1, 1, 1, 1, height, width)
    assert M.DivergenceScorer()(axis_mode).abs().item() < 1e-4
    with pytest.raises(ValueError, match="not both"):
        M.DivergenceScorer(u_channel=0, v_channel=1)
    with pytest.raises(ValueError, match="needs from_vorticity"):
        M.DivergenceScorer(from_vorticity=False)


def _vorticity_fields(n: int, seed: int) -> torch.Tensor:
    """Smooth random vorticity: a few low Fourier modes, (n, 2, 1, 16, 16)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = _grid(16, 16, dtype=torch.float32)
    out = torch.zeros(n, 2, 1, 16, 16)
    for kx, ky in [(1, 0), (0, 1), (1, 1), (2, 1), (1, 3)]:
        amp = torch.randn(n, 2, 1, 1, 1, generator=g) / (kx * kx + ky * ky)
        phase = torch.rand(n, 2, 1, 1, 1, generator=g) * 2 * math.pi
        out += amp * torch.cos(2 * math.pi * (kx * xx + ky * yy) + phase)
    return out


def test_spectrum_scorer():
    train = _vorticity_fields(6, seed=10)
    scorer = M.SpectrumScorer()
    with pytest.raises(RuntimeError, match="fit"):
        scorer(train[:1].unsqueeze(1))
    assert scorer.fit(train) is scorer
    assert scorer.clim_spectrum is not None and scorer.clim_spectrum.shape == (12,)
    # the fitted mean spectrum is the mean of the per-frame spectra
    vel = M.velocity_from_vorticity(train[:, :, 0])
    torch.testing.assert_close(
        scorer.clim_spectrum, M.energy_spectrum(vel.u, vel.v).mean((0, 1)), rtol=1e-5, atol=1e-9
    )
    # fitted on a single frame, that frame scores exactly 0 and a rescaled copy |log 4|
    one = train[:1, :1]
    single = M.SpectrumScorer(kmax=4).fit(one)
    cands = torch.stack([one[0], 2 * one[0]]).unsqueeze(0)  # (1, 2, 1, 1, 16, 16)
    got = single(cands)
    assert got[0, 0].item() == pytest.approx(0.0, abs=1e-5)
    # shells 1..4 that hold energy move by log 4; empty shells sit at the floor for both
    filled = (single.clim_spectrum[1:5] > 1e-6 * single.clim_spectrum.sum()).float().mean()
    assert got[0, 1].item() == pytest.approx(-math.log(4.0) * filled.item(), rel=1e-4)
    # grid-scale noise is penalized
    g = torch.Generator().manual_seed(11)
    noisy = train[:1] + 0.3 * torch.randn(1, 2, 1, 16, 16, generator=g)
    s = scorer(torch.stack([train[0], noisy[0]]).unsqueeze(0))
    assert s[0, 0] > s[0, 1]


def test_tke_scorer_relative_gap():
    train = _vorticity_fields(4, seed=12)
    scorer = M.TKEScorer().fit(train)
    vel = M.velocity_from_vorticity(train[:, :, 0].double())
    assert scorer.clim_tke == pytest.approx(M.tke(vel.u, vel.v).mean().item(), rel=1e-5)
    # a field with exactly the climatological TKE scores 0; doubling vorticity quadruples TKE
    frame = train[0, :1]
    frame_tke = M.tke(*M.velocity_from_vorticity(frame[:, 0].double())).item()
    frame = frame * math.sqrt(scorer.clim_tke / frame_tke)
    cands = torch.stack([frame, 2 * frame]).unsqueeze(0)  # (1, 2, 1, 1, 16, 16)
    got = scorer(cands)
    torch.testing.assert_close(got, torch.tensor([[0.0, -3.0]]), atol=1e-4, rtol=1e-4)
    # scalar mode: half the spatial variance of the channel
    scalar = M.TKEScorer(from_vorticity=False).fit(torch.tensor([1.0, 3.0]).repeat(1, 1, 1, 2, 1))
    assert scalar.clim_tke == pytest.approx(0.5)


def test_conservation_and_nonnegativity_scorers():
    inputs = torch.zeros(1, 2, 2, 4, 4)
    inputs[:, -1, 1] = 3.0  # last input frame, channel 1: mean 3
    inputs[:, 0, 1] = 100.0  # earlier frames are ignored
    cands = torch.zeros(1, 2, 2, 2, 4, 4)
    cands[0, 0, :, 1] = 3.0  # conserved
    cands[0, 1, 0, 1] = 4.0  # +1
    cands[0, 1, 1, 1] = 1.0  # -2
    cons = M.ConservationScorer(channel=1)
    torch.testing.assert_close(cons(cands, inputs=inputs), torch.tensor([[0.0, -1.5]]))
    with pytest.raises(ValueError, match="inputs"):
        cons(cands)

    x = torch.tensor([-1.0, 0.0, 1.0, 2.0]).view(1, 1, 1, 1, 2, 2)
    assert M.NonNegativityScorer()(x).item() == pytest.approx(-0.25)
    assert M.NonNegativityScorer(lower=1.0)(x).item() == pytest.approx(-0.75)
    with pytest.raises(ValueError, match="channel 3"):
        M.NonNegativityScorer(channel=3)(x)


def test_weighted_scorer_sums_and_forwards_fit():
    train = _vorticity_fields(3, seed=13)
    tke_s = M.TKEScorer()
    ws = M.WeightedScorer([tke_s, M.NonNegativityScorer()], weights=[2.0, 0.5])
    assert not ws.requires_reference
    ws.fit(train)
    assert tke_s.clim_tke is not None
    cands = _vorticity_fields(2, seed=14).unsqueeze(1).expand(2, 3, 2, 1, 16, 16).clone()
    cands[:, 1] *= 3.0
    expected = 2.0 * tke_s(cands) + 0.5 * M.NonNegativityScorer()(cands)
    torch.testing.assert_close(ws(cands), expected)
    with_ref = M.WeightedScorer([M.NegMSEScorer(), M.NonNegativityScorer()], [1.0, 1.0])
    assert with_ref.requires_reference
    with pytest.raises(ValueError, match="weights"):
        M.WeightedScorer([M.NegMSEScorer()], [1.0, 2.0])


def test_scorers_build_from_yaml_class_paths():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_argument("--scorer", type=M.Scorer)
    cfg = parser.parse_object(
        {
            "scorer": {
                "class_path": "beamvq.metrics.WeightedScorer",
                "init_args": {
                    "scorers": [
                        {"class_path": "beamvq.metrics.CSIScorer"},
                        {"class_path": "beamvq.metrics.TKEScorer", "init_args": {"channel": 0}},
                    ],
                    "weights": [1.0, 0.5],
                },
            }
        }
    )
    # ``instantiate`` replaced ``instantiate_classes`` in jsonargparse 4.49
    build = getattr(parser, "instantiate", None) or parser.instantiate_classes
    scorer = build(cfg).scorer
    assert isinstance(scorer, M.WeightedScorer) and scorer.requires_reference
    assert isinstance(scorer.scorers[0], M.CSIScorer)
    assert scorer.scorers[0].thresholds == list(M.SEVIR_THRESHOLDS)
    assert scorer.weights == [1.0, 0.5]


def test_lat_weighted_acc_hand_values() -> None:
    from beamvq.metrics import lat_weighted_acc

    lat = torch.tensor([0.0, 60.0])  # weights ∝ cos: 1, 0.5 -> normalized 4/3, 2/3
    clim = torch.zeros(1, 2, 1)
    target = torch.tensor([1.0, -1.0]).view(1, 1, 1, 2, 1)
    assert lat_weighted_acc(target, target, clim, lat).item() == pytest.approx(1.0)
    assert lat_weighted_acc(-target, target, clim, lat).item() == pytest.approx(-1.0)
    pred = torch.tensor([1.0, 1.0]).view(1, 1, 1, 2, 1)
    # Σw f o = 4/3 - 2/3 = 2/3; Σw f² = 2; Σw o² = 2 -> 1/3
    assert lat_weighted_acc(pred, target, clim, lat).item() == pytest.approx(1 / 3)
