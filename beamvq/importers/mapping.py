"""Renaming a foreign state dict onto a beamvq backbone, with every tensor checked.

A conversion is a list of :class:`Rule`: a regular expression over the foreign parameter name,
the beamvq name it becomes, and an optional reshaping of the tensor (a Conv1d kernel to a
Linear weight, complex to real pairs, a channel permutation). :func:`convert` applies them in the
foreign file's order and stops at the first parameter that does not fit, naming it: a foreign
name no rule knows, a refused feature (:class:`Refusal`, e.g. a layer kind beamvq does not have),
a beamvq name the backbone lacks, a shape that differs, or a beamvq parameter nothing filled.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

from torch import Tensor

Transform = Callable[[Tensor], Tensor]


class WeightMismatch(ValueError):
    """Foreign weights that do not fit the beamvq backbone (the message names the parameter)."""


class Rule(NamedTuple):
    """``pattern`` (full match on the foreign name) -> ``target`` (the beamvq name; ``\\1``-style
    groups allowed, or a function of the match), then ``transform`` on the tensor."""

    pattern: str
    target: str | Callable[[re.Match[str]], str]
    transform: Transform | None = None


class Refusal(NamedTuple):
    """A foreign parameter pattern that means a feature beamvq's backbone does not have."""

    pattern: str
    reason: str


def strip_prefix(state: Mapping[str, object], roots: Sequence[str]) -> dict[str, object]:
    """``state`` without the prefix that a wrapper put before every name (``model.`` of a
    Lightning module, ``module.`` of DataParallel), found as the text before one of ``roots``."""
    keys = [k for k in state if isinstance(state[k], Tensor)]
    candidates = {""}
    for key in keys[:1]:
        for root in roots:
            at = key.find(root)
            if at > 0 and key[at - 1] == ".":
                candidates.add(key[:at])
    for prefix in sorted(candidates, key=len, reverse=True):
        if keys and all(
            k.startswith(prefix) and k[len(prefix) :].startswith(tuple(roots)) for k in keys
        ):
            return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    return dict(state)


def _target_name(rule: Rule, match: re.Match[str]) -> str:
    return rule.target(match) if callable(rule.target) else match.expand(rule.target)


class _Sides(NamedTuple):
    """The two sides of one conversion, for the messages."""

    source: str
    backbone: str


def _target_of(name: str, value: Tensor, rules: Sequence[tuple[re.Pattern[str], Rule]],
               refusals: Sequence[tuple[re.Pattern[str], str]], sides: _Sides) -> tuple[str, Rule]:  # fmt: skip
    """The beamvq name and the rule for the foreign parameter ``name``, or the reason it has none."""
    for pattern, reason in refusals:
        if pattern.fullmatch(name):
            raise WeightMismatch(f"{sides.source} parameter {name}: {reason}")
    for pattern, rule in rules:
        match = pattern.fullmatch(name)
        if match is not None:
            return _target_name(rule, match), rule
    raise WeightMismatch(
        f"{sides.source} parameter {name} {tuple(value.shape)} has no place in {sides.backbone}: "
        "it is not a weight of the network this importer maps (see docs/importing.md)"
    )


def _fitted(name: str, value: Tensor, ours: str, rule: Rule, target: Mapping[str, Tensor],
            sides: _Sides) -> Tensor:  # fmt: skip
    """``value`` in beamvq's layout and dtype, once its shape is checked against ``ours``."""
    if ours not in target:
        raise WeightMismatch(
            f"{sides.source} parameter {name} {tuple(value.shape)} maps to {ours}, which "
            f"{sides.backbone} does not have: the backbone config builds a different network "
            "(layer counts)"
        )
    tensor = rule.transform(value) if rule.transform is not None else value
    expected = target[ours]
    if tuple(tensor.shape) != tuple(expected.shape):
        raise WeightMismatch(
            f"{sides.source} parameter {name} has shape {tuple(value.shape)}"
            + (f" (as beamvq's layout {tuple(tensor.shape)})" if tensor is not value else "")
            + f", but {sides.backbone}'s {ours} has shape {tuple(expected.shape)}: the backbone "
            "config's init_args (widths, kernel sizes, steps, channels) differ from the "
            "trained network's"
        )
    return tensor.detach().to(dtype=expected.dtype).clone()


def convert(
    foreign: Mapping[str, object],
    rules: Sequence[Rule],
    target: Mapping[str, Tensor],
    source: str,
    backbone: str,
    refusals: Sequence[Refusal] = (),
) -> dict[str, Tensor]:
    """Map every tensor of ``foreign`` onto the names of ``target`` (a backbone's state dict).

    ``source`` and ``backbone`` name the two sides in messages. Entries that are not tensors
    (neuraloperator's ``_metadata``) are skipped. Raises :class:`WeightMismatch` naming the first
    parameter that does not fit; returns tensors with ``target``'s names, dtypes and shapes.
    """
    sides = _Sides(source, backbone)
    compiled = [(re.compile(r.pattern), r) for r in rules]
    refused = [(re.compile(r.pattern), r.reason) for r in refusals]
    out: dict[str, Tensor] = {}
    for name, value in foreign.items():
        if not isinstance(value, Tensor):
            continue
        ours, rule = _target_of(name, value, compiled, refused, sides)
        if ours in out:
            raise WeightMismatch(f"{source} parameters map twice onto {ours} (the second: {name})")
        out[ours] = _fitted(name, value, ours, rule, target, sides)
    missing = [k for k in target if k not in out]
    if missing:
        raise WeightMismatch(
            f"{backbone}'s {missing[0]} {tuple(target[missing[0]].shape)} gets no {source} "
            f"parameter ({len(missing)} of its parameters get none): the trained network has no "
            "counterpart; compare the backbone config's init_args with the trained network's"
        )
    return out


__all__ = ["Refusal", "Rule", "Transform", "WeightMismatch", "convert", "strip_prefix"]
