"""The calibration options of issue 17: fair CRPS, the offset scale, straight-through candidates,
the search inputs' guard against validation leaks, and the successor-window lookup."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from beamvq.bottleneck import VQBottleneck
from beamvq.losses import LossConfig, fair_crps
from callbacks.search_inputs import SearchInputs
from datamodules.splits import successor_index


def test_fair_crps_matches_a_hand_computation() -> None:
    # two members 0 and 2 against truth 1: mean |X-y| = 1, pair term 2*2/(2*2*1) = 1 -> 0
    members = torch.tensor([[[0.0], [2.0]]])
    assert fair_crps(members, torch.tensor([[1.0]])).item() == pytest.approx(0.0)
    # members 0, 0, 3 against 0: skill (0+0+3)/3 = 1; pairs sum over k!=l |.| = 12 -> 12/12 = 1
    members = torch.tensor([[[0.0], [0.0], [3.0]]])
    assert fair_crps(members, torch.tensor([[0.0]])).item() == pytest.approx(0.0)
    # identical members: CRPS is their MAE
    members = torch.full((1, 4, 5), 2.0)
    assert fair_crps(members, torch.zeros(1, 5)).item() == pytest.approx(2.0)
    with pytest.raises(ValueError, match="at least 2"):
        fair_crps(torch.zeros(1, 1, 3), torch.zeros(1, 3))


def test_fair_crps_is_proper_on_average() -> None:
    # members drawn from the truth's distribution score better than under-dispersed ones
    g = torch.Generator().manual_seed(0)
    y = torch.randn(4000, 1, generator=g)
    right = torch.randn(4000, 8, 1, generator=g)
    narrow = 0.3 * torch.randn(4000, 8, 1, generator=g)
    assert fair_crps(right, y).mean() < fair_crps(narrow, y).mean()


def test_loss_config_names_the_key() -> None:
    with pytest.raises(ValueError, match="model.loss.candidate_loss"):
        LossConfig(candidate_loss="mae")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="model.loss.candidate_steps"):
        LossConfig(candidate_steps="some")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="model.loss.candidate_weight"):
        LossConfig(candidate_weight=-1.0)


def test_offset_scale_spreads_the_candidates_and_learns() -> None:
    torch.manual_seed(0)
    kw = dict(dim=4, codebook_size=8, kmeans_init=False, forecast_path="continuous")
    one = VQBottleneck(**kw).eval()
    two = VQBottleneck(**kw, offset_scale=2.0).eval()
    two.load_state_dict(one.state_dict())
    z = torch.randn(2, 4, 3, 3)
    c1, c2 = one.topk(z, 3), two.topk(z, 3)
    torch.testing.assert_close(c2[:, 0], z)
    torch.testing.assert_close(c2 - z.unsqueeze(1), 2.0 * (c1 - z.unsqueeze(1)))
    assert two.offset_scale == pytest.approx(2.0)
    learned = VQBottleneck(**kw, learn_offset_scale=True).eval()
    assert isinstance(learned.log_offset_scale, torch.nn.Parameter)
    learned.topk(z, 3)[:, 1:].pow(2).sum().backward()
    assert learned.log_offset_scale.grad is not None and learned.log_offset_scale.grad != 0
    with pytest.raises(ValueError, match="offset_scale"):
        VQBottleneck(dim=4, offset_scale=2.0)  # quantized path
    with pytest.raises(ValueError, match="offset_scale"):
        VQBottleneck(**kw, offset_scale=0.0)


def test_quantized_candidates_are_straight_through_in_training() -> None:
    torch.manual_seed(0)
    bn = VQBottleneck(dim=4, codebook_size=8, kmeans_init=False, threshold_ema_dead_code=0)
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    bn.train()
    cands = bn.topk(z, 3)
    with torch.no_grad():
        bn.eval()
        codes = bn.topk(z, 3)
    torch.testing.assert_close(cands, codes)  # the values are the codes
    cands.sum().backward()
    # d(sum)/dz = k per element through the identity path
    torch.testing.assert_close(z.grad, torch.full_like(z, 3.0))


def test_search_inputs_refuse_a_silent_validation_leak() -> None:
    with pytest.raises(ValueError, match="allow_validation_leak"):
        SearchInputs(validation=4)
    assert SearchInputs(validation=4, allow_validation_leak=True).validation == 4
    with pytest.raises(ValueError, match="inputs.windows"):
        SearchInputs(windows=-1)
    with pytest.raises(ValueError, match="searches nothing"):
        SearchInputs(windows=0)
    with pytest.raises(ValueError, match="inputs.unlabelled"):
        SearchInputs(unlabelled=-1)


def test_successor_index_follows_the_same_sample() -> None:
    starts = np.array([[0, 0], [0, 1], [0, 2], [1, 0], [1, 1]])
    np.testing.assert_array_equal(
        successor_index(starts, np.array([0, 1, 2, 3, 4]), 1), [1, 2, -1, 4, -1]
    )
    np.testing.assert_array_equal(successor_index(starts, np.array([0, 3]), 2), [2, -1])
