"""What ``BeamSearchAugmentation`` draws each search epoch, and the checks of its arguments.

The authors' protocol (BeamVQ's public code) labels held-out inputs with the plain forecast;
drawn from the validation split this leaks validation data into training and into the choice
of checkpoint, so it runs only when asked for by name (``allow_validation_leak``) and the pool
marks those samples (``beamvq.protocols.SOURCE_KINDS``).
"""

from __future__ import annotations

from dataclasses import dataclass

from beamvq.metrics import Scorer

WHO = "BeamSearchAugmentation"
TARGETS = ("pseudo", "pushforward")


@dataclass(frozen=True)
class SearchInputs:
    """What each search epoch draws (YAML: the ``inputs`` block of ``BeamSearchAugmentation``).

    Attributes:
        windows: training windows searched per epoch (``None``: all of them; 0: none, as in the
            authors' protocol, which labels only held-out inputs).
        unlabelled: unlabelled inputs searched per epoch (``ForecastData.unlabelled_inputs``).
        validation: validation inputs labelled by the plain forecast per epoch (the authors'
            protocol; it leaks validation data into training and into the checkpoint selection).
        allow_validation_leak: must be true for ``validation > 0``: the arm says its name.
    """

    windows: int | None = 64
    unlabelled: int = 0
    validation: int = 0
    allow_validation_leak: bool = False

    def __post_init__(self) -> None:
        if self.windows is not None and int(self.windows) < 0:
            raise ValueError(
                f"{WHO}: init_args.inputs.windows must be >= 0 or null, got {self.windows}"
            )
        for name in ("unlabelled", "validation"):
            if int(getattr(self, name)) < 0:
                raise ValueError(
                    f"{WHO}: init_args.inputs.{name} must be >= 0, got {getattr(self, name)}"
                )
        if self.windows == 0 and not self.unlabelled and not self.validation:
            raise ValueError(
                f"{WHO}: init_args.inputs searches nothing (windows, unlabelled and validation "
                "are all 0): give at least one of them"
            )
        if self.validation and not self.allow_validation_leak:
            raise ValueError(
                f"{WHO}: init_args.inputs.validation={self.validation} pseudo-labels validation inputs, "
                "which leaks the validation data into training (the authors' protocol): set "
                "inputs.allow_validation_leak: true to run it, and report it as leaking"
            )


def check_scorers(scorer: Scorer, unlabelled_scorer: Scorer, channels: int | None) -> None:
    """The channels the scorers read exist in the data (``Scorer.check_channels``)."""
    if channels is None:
        return
    for name, s in (("scorer", scorer), ("unlabelled_scorer", unlabelled_scorer)):
        check = getattr(s, "check_channels", None)
        if callable(check):
            check(channels, f"{WHO}: init_args.{name}")


def check_arguments(values: dict[str, int | None], scorer: Scorer, windows: int) -> None:
    """Bad arguments, named by their YAML keys, before any work."""
    low = {"every_n_epochs": 1, "start_epoch": 0}
    for name, value in values.items():
        if name in low and int(value or 0) < low[name]:
            raise ValueError(f"{WHO}: init_args.{name} must be >= {low[name]}, got {value}")
        if name not in low and value is not None and int(value) < 1:
            raise ValueError(f"{WHO}: init_args.{name} must be >= 1 or None, got {value}")
    if windows > 0 and scorer.requires_reference:
        raise ValueError(
            f"{WHO}: init_args.inputs.unlabelled > 0 needs a reference-free scorer (the inputs have no "
            f"recorded future), but {type(scorer).__name__} needs one: set unlabelled_scorer "
            "(e.g. SpectrumScorer, TKEScorer)"
        )
