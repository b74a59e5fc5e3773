"""Scaling law of arXiv 2501.02423: constants, optimal splits, critical data size, CLI."""

from __future__ import annotations

import math

import pytest

from beamvq.quant.scaling_law import (
    PAPER,
    ExpManSplit,
    best_split,
    critical_data_size,
    law_table,
    main,
    optimal_mantissa,
    predicted_loss,
)


def test_constants_are_the_papers() -> None:
    assert (PAPER.n, PAPER.alpha, PAPER.d, PAPER.beta, PAPER.eps) == (
        69.2343,
        0.2368,
        68973.0621,
        0.5162,
        1.9061,
    )
    assert (PAPER.gamma, PAPER.delta, PAPER.nu) == (11334.5197, 3.1926, 2.9543)


def test_best_splits_reproduce_the_paper() -> None:
    assert best_split(4) == ExpManSplit(2, 1)  # E2M1 at 4 bits
    assert best_split(8) == ExpManSplit(4, 3)  # E4M3 at 8 bits
    assert best_split(16) == ExpManSplit(8, 7)  # the bf16 layout
    assert best_split(4).name == "E2M1"
    # the continuous optimum M = nu P / (delta + nu) - 0.5 rounds to the same mantissa
    assert round(optimal_mantissa(4)) == 1 and round(optimal_mantissa(8)) == 3
    assert optimal_mantissa(8) == pytest.approx(2.9543 * 8 / (3.1926 + 2.9543) - 0.5)
    # and it is where the law's loss is lowest among all 8-bit splits
    losses = {m: predicted_loss(1e9, 1e11, 7 - m, m, 128) for m in range(7)}
    assert min(losses, key=losses.get) == 3


@pytest.mark.parametrize(
    "params,exp_bits,man_bits,block",
    [(1e8, 4, 3, 128), (1e9, 2, 1, 32), (7e9, 4, 3, 512), (3e8, 5, 2, 64)],
)
def test_critical_data_size(params: float, exp_bits: int, man_bits: int, block: int) -> None:
    d_crit = critical_data_size(params, exp_bits, man_bits, block)
    # the paper's closed form, written out independently
    n, a, d, b, g, dl, nu = 69.2343, 0.2368, 68973.0621, 0.5162, 11334.5197, 3.1926, 2.9543
    closed = (
        d * g * params**a * (exp_bits + 0.5) ** dl * (man_bits + 0.5) ** nu / math.log2(block)
    ) ** (1 / (2 * b))
    assert d_crit == pytest.approx(closed, rel=1e-12)
    # it is the minimum of the loss over data: more or less data gives a higher loss
    at = predicted_loss(params, d_crit, exp_bits, man_bits, block)
    assert predicted_loss(params, d_crit * 1.5, exp_bits, man_bits, block) > at
    assert predicted_loss(params, d_crit / 1.5, exp_bits, man_bits, block) > at
    del n


def test_loss_formula_and_monotonicity() -> None:
    loss = predicted_loss(1e9, 1e11, 4, 3, 128)
    expected = (
        69.2343 / 1e9**0.2368
        + 68973.0621 / 1e11**0.5162
        + 1.9061
        + (1e11**0.5162 / 1e9**0.2368) * 7 / (11334.5197 * 4.5**3.1926 * 3.5**2.9543)
    )
    assert loss == pytest.approx(expected, rel=1e-12)
    # more bits, smaller blocks: lower loss; B = 1 has no quantization term and no D_crit
    assert predicted_loss(1e9, 1e11, 2, 1, 128) > loss > predicted_loss(1e9, 1e11, 4, 3, 32)
    assert math.isinf(critical_data_size(1e9, 4, 3, 1))
    # the critical data size grows with precision
    rows = law_table(1e9, 1e11, 128, (4, 6, 8))
    assert [r.split.name for r in rows] == ["E2M1", "E3M2", "E4M3"]
    assert rows[0].critical_tokens < rows[1].critical_tokens < rows[2].critical_tokens


def test_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    text = main(["--params", "1e9", "--tokens", "1e11", "--block", "128", "--bits", "4", "8"])
    out = capsys.readouterr().out
    assert text in out
    assert "E2M1" in out and "E4M3" in out
    assert f"{critical_data_size(1e9, 4, 3, 128):15.4g}" in out
