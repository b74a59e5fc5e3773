"""The floating-point quantization training scaling law of Sun et al. (arXiv 2501.02423).

    L(N, D, E, M, B) = n / N^alpha + d / D^beta + eps
                       + (D^beta / N^alpha) * log2(B) / (gamma * (E + 0.5)^delta * (M + 0.5)^nu)

N parameters, D training tokens, E exponent bits, M mantissa bits, B elements per scale
(the block size, or the row/tensor length for channel/tensor scaling). Fitted constants
(paper, Eq. 8): n = 69.2343, alpha = 0.2368, d = 68973.0621, beta = 0.5162, eps = 1.9061,
gamma = 11334.5197, delta = 3.1926, nu = 2.9543.

Consequences implemented here:

* best exponent/mantissa split for ``P`` total bits (sign included, ``E + M = P - 1``): the
  precision term is smallest where ``(E + 0.5)^delta (M + 0.5)^nu`` is largest, i.e.
  ``M = nu P / (delta + nu) - 0.5`` (E2M1 at 4 bits, E4M3 at 8 bits);
* the critical data size ``D_crit = [d gamma N^alpha (E+0.5)^delta (M+0.5)^nu / log2 B]^(1/(2 beta))``
  where dL/dD = 0: beyond it more data raises the loss of low-precision training.

The law was fitted on LLM pre-training (tokens of text); for a space-time forecaster a "token"
is one latent position of one sample, so the numbers are a guide to orders of magnitude.

Command line: ``python -m beamvq.quant.scaling_law --params 1e8 --tokens 1e10 --block 128``.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple


@dataclass(frozen=True)
class LawConstants:
    """Fitted constants of the law (defaults: the paper's)."""

    n: float = 69.2343
    alpha: float = 0.2368
    d: float = 68973.0621
    beta: float = 0.5162
    eps: float = 1.9061
    gamma: float = 11334.5197
    delta: float = 3.1926
    nu: float = 2.9543


PAPER = LawConstants()


class ExpManSplit(NamedTuple):
    """An exponent/mantissa split of a bit budget (sign bit not counted in E or M)."""

    exp_bits: int
    man_bits: int

    @property
    def name(self) -> str:
        return f"E{self.exp_bits}M{self.man_bits}"


def _precision_capacity(exp_bits: float, man_bits: float, c: LawConstants) -> float:
    return (exp_bits + 0.5) ** c.delta * (man_bits + 0.5) ** c.nu


def predicted_loss(
    params: float,
    tokens: float,
    exp_bits: float,
    man_bits: float,
    block: float,
    c: LawConstants = PAPER,
) -> float:
    """L(N, D, E, M, B) of the paper."""
    quant = (
        tokens**c.beta
        / params**c.alpha
        * math.log2(block)
        / (c.gamma * _precision_capacity(exp_bits, man_bits, c))
    )
    return c.n / params**c.alpha + c.d / tokens**c.beta + c.eps + quant


def optimal_mantissa(total_bits: float, c: LawConstants = PAPER) -> float:
    """Continuous optimum ``M = nu P / (delta + nu) - 0.5`` for ``P`` total bits."""
    return c.nu * total_bits / (c.delta + c.nu) - 0.5


def best_split(total_bits: int, c: LawConstants = PAPER) -> ExpManSplit:
    """The integer split (E >= 1, M >= 0, E + M = P - 1) with the lowest predicted loss."""
    if total_bits < 2:
        raise ValueError(
            f"a float format needs at least 2 bits (sign + exponent), got {total_bits}"
        )
    candidates = [ExpManSplit(total_bits - 1 - m, m) for m in range(total_bits - 1)]
    return max(candidates, key=lambda s: _precision_capacity(s.exp_bits, s.man_bits, c))


def critical_data_size(
    params: float, exp_bits: float, man_bits: float, block: float, c: LawConstants = PAPER
) -> float:
    """Tokens beyond which more data raises the loss (``inf`` when ``block <= 1``)."""
    log_block = math.log2(block)
    if log_block <= 0:
        return math.inf
    inner = c.d * c.gamma * params**c.alpha * _precision_capacity(exp_bits, man_bits, c)
    return (inner / log_block) ** (1.0 / (2.0 * c.beta))


class SplitRow(NamedTuple):
    """One line of :func:`law_table`."""

    total_bits: int
    split: ExpManSplit
    loss: float
    critical_tokens: float


def law_table(
    params: float,
    tokens: float,
    block: float,
    bit_budgets: Sequence[int] = (4, 5, 6, 7, 8, 16),
    c: LawConstants = PAPER,
) -> list[SplitRow]:
    """Best split, predicted loss and critical data size for each bit budget."""
    rows = []
    for bits in bit_budgets:
        split = best_split(bits, c)
        rows.append(
            SplitRow(
                bits,
                split,
                predicted_loss(params, tokens, split.exp_bits, split.man_bits, block, c),
                critical_data_size(params, split.exp_bits, split.man_bits, block, c),
            )
        )
    return rows


def format_table(params: float, tokens: float, block: float, rows: Sequence[SplitRow]) -> str:
    lines = [
        f"Scaling law of arXiv 2501.02423 for N = {params:.3g} parameters, D = {tokens:.3g} "
        f"tokens, block B = {block:g}",
        f"{'bits':>4}  {'split':>6}  {'loss':>7}  {'D_crit (tokens)':>15}  D vs D_crit",
    ]
    for row in rows:
        side = "beyond (more data hurts)" if tokens > row.critical_tokens else "below"
        lines.append(
            f"{row.total_bits:>4}  {row.split.name:>6}  {row.loss:7.4f}  "
            f"{row.critical_tokens:15.4g}  {side}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(
        prog="python -m beamvq.quant.scaling_law",
        description="Best ExMy split, predicted loss and critical data size (arXiv 2501.02423).",
    )
    parser.add_argument("--params", type=float, required=True, help="model size N (parameters)")
    parser.add_argument("--tokens", type=float, required=True, help="training tokens D")
    parser.add_argument("--block", type=float, default=128.0, help="elements per scale B")
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 5, 6, 7, 8, 16])
    parser.add_argument("--exp", type=int, default=None, help="evaluate also this E ...")
    parser.add_argument("--man", type=int, default=None, help="... with this M")
    args = parser.parse_args(argv)
    text = format_table(
        args.params,
        args.tokens,
        args.block,
        law_table(args.params, args.tokens, args.block, args.bits),
    )
    if args.exp is not None and args.man is not None:
        loss = predicted_loss(args.params, args.tokens, args.exp, args.man, args.block)
        dcrit = critical_data_size(args.params, args.exp, args.man, args.block)
        text += f"\nE{args.exp}M{args.man}: loss {loss:.4f}, D_crit {dcrit:.4g} tokens"
    # the command-line entry's output is its product
    sys.stdout.write(text + "\n")
    return text


if __name__ == "__main__":
    main()
