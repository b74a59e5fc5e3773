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


def test_training_moves_codes_by_ema_and_gives_commitment() -> None:
    b = hand_made().train()
    z = latent().requires_grad_(True)
    q = b(z)
    assert q.aux_loss.item() > 0
    # the EMA moved code 1 toward (0.9, 0.2) by (1 - 0.99) of the gap (up to the Laplace smoothing)
    assert not torch.equal(b.codebook, CODES)
    (q.z_q.sum() + q.aux_loss).backward()
    assert z.grad is not None and torch.all(torch.isfinite(z.grad))


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
