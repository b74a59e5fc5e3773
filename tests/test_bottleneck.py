"""The VQ adapter on a hand-made code bank: exact indices, top-K order, eval leaves codes alone."""

from __future__ import annotations

import pytest
import torch

from beamvq.bottleneck import VQBottleneck

CODES = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [3.0, 3.0]])


def hand_made() -> VQBottleneck:
    b = VQBottleneck(dim=2, codebook_size=4, kmeans_init=False, threshold_ema_dead_code=0)
    b.vq.codebook = CODES.clone()
    return b


def latent() -> torch.Tensor:
    # (B=1, D=2, 3 positions): near code 1, near code 2, near code 3
    return torch.tensor([[[0.9, 0.1, 2.5], [0.2, 1.2, 2.4]]])


def test_paper_defaults_are_explicit() -> None:
    b = VQBottleneck(dim=8)
    assert b.codebook_size == 512
    assert b.vq.commitment_weight == 0.25
    assert b.vq._codebook.decay == 0.99
    assert not b.vq.rotation_trick


def test_nearest_indices_exact() -> None:
    b = hand_made().eval()
    q = b(latent())
    assert q.indices.tolist() == [[1, 2, 3]]
    torch.testing.assert_close(q.z_q, CODES[[1, 2, 3]].t()[None])


def test_topk_order_and_candidate0() -> None:
    b = hand_made().eval()
    idx = b.topk_indices(latent(), 3)
    # position 0 (0.9, 0.2): distances to codes 0..3 = 0.85, 0.05, 1.45, 13.45
    assert idx[0, :, 0].tolist() == [1, 0, 2]
    # position 1 (0.1, 1.2): 1.45, 2.25, 0.05, 11.45
    assert idx[0, :, 1].tolist() == [2, 0, 1]
    # position 2 (2.5, 2.4): code 3 first, then 1 (4.25+5.76=... ) vs 2
    d = ((latent()[0, :, 2][None] - CODES) ** 2).sum(1)
    assert idx[0, :, 2].tolist() == d.argsort()[:3].tolist()
    cands = b.topk(latent(), 3)
    assert cands.shape == (1, 3, 2, 3)
    torch.testing.assert_close(cands[:, 0], b(latent()).z_q)
    # rank-aligned: candidate i uses the i-th nearest code at every position
    torch.testing.assert_close(cands[0, 1, :, 0], CODES[0])
    torch.testing.assert_close(cands[0, 1, :, 1], CODES[0])
    # K distinct candidates
    assert len({tuple(cands[0, i].flatten().tolist()) for i in range(3)}) == 3


def test_eval_never_changes_the_code_bank() -> None:
    b = hand_made().eval()
    before = {k: v.clone() for k, v in b.state_dict().items()}
    with torch.no_grad():
        b(latent() + 5)
        b.topk(latent() * 3, 4)
    after = b.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_training_step_is_the_exact_ema_update() -> None:
    """One training step against vector-quantize-pytorch 1.32.0's EMA, computed by hand.

    The library keeps an EMA of each code's cluster size ``N`` and of the sum ``m`` of the
    latents assigned to it (``lerp`` by ``1 - decay``), then sets each code to
    ``m / N~`` with the Laplace-smoothed size ``N~ = (N + eps) / (sum N + K eps) * sum N``
    (``eps = 1e-5``). The step quantizes with the codes before the update.
    """
    b = hand_made().train()
    # a consistent EMA state for the hand-made codes: N = 1 each, m = the codes themselves
    b.vq._codebook.cluster_size.fill_(1.0)
    b.vq._codebook.embed_avg.copy_(CODES[None])
    z = latent().requires_grad_(True)
    q = b(z)
    tokens = latent()[0].t().double()  # (3, 2): assigned to codes 1, 2, 3
    assert q.indices.tolist() == [[1, 2, 3]]
    # the output and the commitment use the codes before the update
    torch.testing.assert_close(q.z_q.detach(), CODES[[1, 2, 3]].t()[None])
    commitment = 0.25 * ((tokens - CODES[[1, 2, 3]].double()) ** 2).mean()
    torch.testing.assert_close(q.aux_loss.double(), commitment)  # 0.25 * 0.71 / 6

    decay, eps, n_codes = 0.99, 1e-5, 4
    counts = torch.tensor([0.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    sums = torch.zeros(4, 2, dtype=torch.float64)
    sums[1:] = tokens
    size = decay * 1.0 + (1 - decay) * counts  # [0.99, 1, 1, 1]
    avg = decay * CODES.double() + (1 - decay) * sums
    smoothed = (size + eps) / (size.sum() + n_codes * eps) * size.sum()
    expected = avg / smoothed[:, None]
    # e.g. code 1 moved from (1, 0) toward (0.9, 0.2) by 1 % of the gap: (0.999, 0.002)
    torch.testing.assert_close(expected[1], torch.tensor([0.999, 0.002], dtype=torch.float64))
    torch.testing.assert_close(b.codebook.double(), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(b.vq._codebook.cluster_size[0].double(), size)
    torch.testing.assert_close(b.vq._codebook.embed_avg[0].double(), avg)
    # code 0, assigned nothing, decays in size only: m stays 0, so it stays at the origin
    assert b.codebook[0].tolist() == [0.0, 0.0]

    # straight-through plus the commitment gradient: 1 + 0.25 * 2 (z - q) / 6
    (q.z_q.sum() + q.aux_loss).backward()
    q_codes = CODES[[1, 2, 3]].t()[None]
    torch.testing.assert_close(z.grad, 1 + 0.25 * 2 * (latent() - q_codes) / 6)


def projected(codebook_dim: int = 2) -> VQBottleneck:
    """dim 3 -> codebook_dim 2 with hand-set projections and codes (no k-means, no expiry)."""
    b = VQBottleneck(
        dim=3, codebook_size=4, codebook_dim=codebook_dim, kmeans_init=False,
        threshold_ema_dead_code=0,
    )  # fmt: skip
    with torch.no_grad():
        proj_in, proj_out = b.vq.project_in, b.vq.project_out
        proj_in.weight.copy_(torch.tensor([[1.0, 0.0, 1.0], [0.0, 2.0, -1.0]]))
        proj_in.bias.copy_(torch.tensor([0.5, 0.0]))
        proj_out.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, -1.0]]))
        proj_out.bias.copy_(torch.tensor([0.0, 0.25, -0.5]))
    b.vq.codebook = CODES.clone()
    return b


def test_codebook_dim_projects_in_and_out() -> None:
    b = projected().eval()
    assert b.codebook.shape == (4, 2) and b.dim == 3
    z = torch.tensor([[[0.2, -1.0, 2.0, 0.0], [0.1, 0.5, 1.0, 0.3], [0.3, 0.4, 0.5, -0.2]]])
    z = z.reshape(1, 3, 2, 2)  # (B, D=3, H=2, W=2): four positions
    # by hand, in float64: project in, distances to the codes, nearest codes, project out
    tokens = z.double().flatten(2)[0].t()  # (4, 3)
    w_in = torch.tensor([[1.0, 0.0, 1.0], [0.0, 2.0, -1.0]], dtype=torch.float64)
    w_out = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    inner = tokens @ w_in.t() + torch.tensor([0.5, 0.0], dtype=torch.float64)
    dist = ((inner[:, None, :] - CODES.double()[None]) ** 2).sum(-1)  # (4 positions, 4 codes)
    order = dist.argsort(dim=-1)
    codes_out = CODES.double() @ w_out.t() + torch.tensor([0.0, 0.25, -0.5], dtype=torch.float64)
    q = b(z)
    assert q.indices.shape == (1, 2, 2)
    assert q.indices.flatten().tolist() == order[:, 0].tolist()
    assert q.z_q.shape == z.shape
    torch.testing.assert_close(q.z_q.double().flatten(2)[0].t(), codes_out[order[:, 0]])
    cands = b.topk(z, 3)
    assert cands.shape == (1, 3, 3, 2, 2)
    for i in range(3):
        got = cands[0, i].double().flatten(1).t()  # (positions, D)
        torch.testing.assert_close(got, codes_out[order[:, i]])
    assert b.topk_indices(z, 3).flatten(2)[0].t().tolist() == order[:, :3].tolist()
    # the candidates differ from each other, and candidate 0 is the forecast
    assert all(not torch.allclose(cands[:, i], cands[:, j]) for i, j in ((0, 1), (0, 2), (1, 2)))
    torch.testing.assert_close(cands[:, 0], q.z_q)


def test_codebook_dim_trains_the_projections_not_the_codes() -> None:
    b = projected().train()
    z = torch.randn(2, 3, 4, 4, requires_grad=True)
    q = b(z)
    assert q.z_q.shape == z.shape and q.indices.shape == (2, 4, 4)
    (q.z_q.square().mean() + q.aux_loss).backward()
    proj_in, proj_out = b.vq.project_in, b.vq.project_out
    assert proj_in.weight.grad.abs().sum() > 0 and proj_out.weight.grad.abs().sum() > 0
    assert z.grad.abs().sum() > 0
    # the only learned parameters are the projections; the codes are EMA buffers
    assert {n for n, _ in b.named_parameters()} == {
        "vq.project_in.weight", "vq.project_in.bias", "vq.project_out.weight", "vq.project_out.bias"
    }  # fmt: skip


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="channel-first"):
        hand_made()(torch.randn(1, 3, 4))
    with pytest.raises(ValueError, match="k must be in"):
        hand_made().topk(latent(), 5)


def test_usage_statistics() -> None:
    stats = VQBottleneck.usage(torch.tensor([0, 0, 1, 1]), 4)
    assert stats.codes_used.item() == 2
    torch.testing.assert_close(stats.perplexity, torch.tensor(2.0))


def test_continuous_forecast_path_keeps_the_latent() -> None:
    torch.manual_seed(0)
    bn = VQBottleneck(dim=4, codebook_size=8, kmeans_init=False, forecast_path="continuous").eval()
    z = torch.randn(2, 4, 3, 3)
    q = bn(z)
    assert torch.equal(q.z_q, z)  # the forecast decodes the continuous latent
    assert q.aux_loss.item() > 0  # the code bank is still measured against it
    cands = bn.topk(z, 3)
    torch.testing.assert_close(cands[:, 0], z)
    plain = VQBottleneck(dim=4, codebook_size=8, kmeans_init=False).eval()
    plain.load_state_dict(bn.state_dict())
    codes = plain.topk(z, 3)
    # candidate i = z + (e_i - e_0): the same offsets between candidates as the quantized path
    torch.testing.assert_close(cands[:, 2] - cands[:, 1], codes[:, 2] - codes[:, 1])
    torch.testing.assert_close(cands[:, 1] - z, codes[:, 1] - codes[:, 0])
    bn.train()
    zt = torch.randn(2, 4, 3, 3, requires_grad=True)
    out = bn(zt)
    assert out.z_q is zt and out.aux_loss.item() > 0
    with pytest.raises(ValueError, match="forecast_path"):
        VQBottleneck(dim=4, forecast_path="soft")
