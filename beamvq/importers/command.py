"""``beamvq import-weights``: an OpenSTL or neuraloperator weights file -> a beamvq checkpoint.

::

    beamvq import-weights --from openstl --config configs/quickstart.yaml \\
        --config configs/backbones/simvp.yaml --weights simvp.pth --out simvp.ckpt \\
        --stats-from-data
    beamvq predict --config configs/quickstart.yaml --config configs/backbones/simvp.yaml \\
        --ckpt_path simvp.ckpt

The configs are those the checkpoint will run with (their ``model`` section builds the module;
its backbone's init_args must give the trained network's sizes). The normalization statistics
are given per channel (``--mean``, ``--std``, in the units of the data), or computed from the
training split of the configs' ``data`` section (``--stats-from-data``, optionally on another
file with ``--data-path``), as ``beamvq fit`` would. See docs/importing.md.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from torch import Tensor, nn

from beamvq.importers.checkpoint import (
    build_module,
    data_statistics,
    file_sha256,
    load_weights_file,
    write_checkpoint,
)
from beamvq.importers.mapping import WeightMismatch
from beamvq.importers.neuraloperator import FNO_DIFFERENCES, import_neuraloperator_fno
from beamvq.importers.openstl import import_openstl
from beamvq.packaged_configs import resolve_config_arguments

log = logging.getLogger(__name__)

Importer = Callable[[Mapping[str, object], nn.Module], dict[str, Tensor]]

# --from NAME -> (converter, the known differences of the converted forward to report)
IMPORTERS: dict[str, tuple[Importer, tuple[str, ...]]] = {
    "openstl": (import_openstl, ()),
    "neuraloperator": (import_neuraloperator_fno, FNO_DIFFERENCES),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="beamvq import-weights",
        description="Convert an OpenSTL (SimVP-v2/gSTA, TAU, PredRNN) or neuraloperator (FNO) "
        "weights file into a beamvq checkpoint for `beamvq predict|test|validate --ckpt_path`.",
    )
    parser.add_argument("--from", dest="source", required=True, choices=sorted(IMPORTERS))
    parser.add_argument(
        "--config", action="append", type=Path, required=True,
        help="beamvq YAML config(s) the checkpoint will run with, composed in order; their "
        "model.backbone must have the trained network's sizes",
    )  # fmt: skip
    parser.add_argument("--weights", type=Path, required=True, help="the foreign weights file")
    parser.add_argument("--out", type=Path, required=True, help="the beamvq checkpoint to write")
    parser.add_argument("--mean", type=float, nargs="+", help="per-channel mean (data units)")
    parser.add_argument("--std", type=float, nargs="+", help="per-channel std (data units)")
    parser.add_argument(
        "--stats-from-data", action="store_true",
        help="compute mean/std from the training split of the configs' data section",
    )  # fmt: skip
    parser.add_argument(
        "--data-path", type=Path, help="with --stats-from-data: the file to read instead of "
        "data.init_args.path",
    )  # fmt: skip
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    return parser


def _statistics(args: argparse.Namespace) -> tuple[Sequence[float], Sequence[float]]:
    given = args.mean is not None or args.std is not None
    if given == args.stats_from_data:
        raise ValueError("give the normalization as --mean and --std, or --stats-from-data")
    if args.data_path is not None and not args.stats_from_data:
        raise ValueError("--data-path goes with --stats-from-data")
    if args.stats_from_data:
        return data_statistics(args.config, args.data_path)
    if args.mean is None or args.std is None:
        raise ValueError("--mean and --std go together (one value per channel each)")
    return args.mean, args.std


def importing_command(argv: Sequence[str]) -> int:
    """``beamvq import-weights ...`` (see the module docstring); returns the exit status."""
    # --config NAME of a packaged config (beamvq configs list) is that file, as for beamvq fit
    args = _parser().parse_args(resolve_config_arguments(argv))
    if args.out.exists() and not args.overwrite:
        sys.stderr.write(f"beamvq import-weights: --out {args.out} exists (--overwrite)\n")
        return 2
    convert, differences = IMPORTERS[args.source]
    try:
        built = build_module(args.config)
        backbone = built.module.model.backbone
        state = convert(load_weights_file(args.weights), backbone)
        mean, std = _statistics(args)
        source = {
            "from": args.source,
            "weights": str(args.weights),
            "sha256": file_sha256(args.weights),
            "differences": list(differences),
        }
        write_checkpoint(args.out, built, state, mean, std, source)
    except (WeightMismatch, ValueError, FileNotFoundError) as err:
        sys.stderr.write(f"beamvq import-weights: {err}\n")
        return 2
    lines = [
        f"wrote {args.out}: {len(state)} {args.source} tensors as model.backbone of "
        f"{type(backbone).__name__}, normalization mean {list(map(float, mean))} std "
        f"{list(map(float, std))}",
    ]
    lines += [f"known difference to {args.source}'s forward: {d}" for d in differences]
    if built.module.model.bottleneck is not None:
        lines.append(
            "the bottleneck's code bank is new (untrained): the K code-bank alternatives need a "
            "fit; the deterministic forecast with forecast_path: continuous is the imported one"
        )
    configs = " ".join(f"--config {c}" for c in args.config)
    lines.append(f"run it: beamvq predict {configs} --ckpt_path {args.out}")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


__all__ = ["IMPORTERS", "importing_command"]
