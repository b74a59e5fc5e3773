"""What one finished run of ``benchmarks/experiment.py`` left on disk, read back for its result row.

The best-validation checkpoint (the ``ModelCheckpoint`` of ``configs/experiments/ns_scarce.yaml``
with ``filename: best`` writes ``<run>/checkpoints/best.ckpt``; Lightning's version counter names
a second one in the same folder ``best-v1.ckpt``, so the newest of those is the fit's), its best
epoch, validation loss and model-state sizes, and the fit's per-epoch CSVLogger file. Nothing here
trains or evaluates.
"""

from __future__ import annotations

import csv
import hashlib
import platform
import re
from collections.abc import Iterable
from pathlib import Path

import torch
import yaml

# Lightning's names for the file of ``filename: best``: best.ckpt, then best-v1.ckpt, ...
_BEST_FILE = re.compile(r"best(-v\d+)?\.ckpt")


def best_checkpoint(ckpt_dir: Path) -> Path | None:
    """The best-validation checkpoint a fit wrote into ``ckpt_dir`` (the newest ``best*.ckpt``
    of Lightning's names), or ``None`` when there is none."""
    if not ckpt_dir.is_dir():
        return None
    files = [p for p in ckpt_dir.iterdir() if _BEST_FILE.fullmatch(p.name) and p.is_file()]
    return max(files, key=lambda p: p.stat().st_mtime_ns) if files else None


# state-dict entries that are buffers, not optimizer-trained parameters: the EMA code bank
# (vector-quantize-pytorch's _codebook), batch-norm statistics, the data's normalization and
# the module's metric constants
_BUFFER_KEYS = re.compile(
    r"(\._codebook\.|running_mean$|running_var$|num_batches_tracked$|^normalizer\.|"
    r"^lat_deg$|^climatology$)"
)


def trainable_numel(state_dict: dict) -> int:
    """Values of a checkpoint's ``state_dict`` that the optimizer trains (buffers excluded)."""
    return sum(v.numel() for k, v in state_dict.items() if not _BUFFER_KEYS.search(k))


def checkpoint_facts(ckpt_dir: Path) -> dict:
    """The best epoch, its validation loss and the model-state sizes (by top-level part) of the
    best checkpoint (``best_checkpoint``); the epochs trained come from ``metrics.csv``
    (``logged_facts``), which also holds configs whose ``last.ckpt`` is Lightning's (rewritten
    only when the monitor improves)."""
    best = best_checkpoint(ckpt_dir)
    if best is None:
        return {}
    state = torch.load(best, map_location="cpu", weights_only=True)
    counts: dict[str, int] = {}
    for key, value in state["state_dict"].items():
        part = key.split(".")[1] if key.count(".") >= 2 else key
        counts[part] = counts.get(part, 0) + value.numel()
    facts: dict = {
        "state_numel": counts,
        "trainable_numel": trainable_numel(state["state_dict"]),
        "best_epoch": int(state.get("epoch", -1)),
    }
    for name, cb in state.get("callbacks", {}).items():
        if name.startswith("ModelCheckpoint") and cb.get("best_model_score") is not None:
            facts["best_val_loss"] = float(cb["best_model_score"])
    return facts


def logged_facts(csv_path: Path) -> dict:
    """Epochs and steps trained, and the last value of every ``val/*``, ``augment/*`` and
    ``codebook/*`` column, from the fit's CSVLogger file."""
    if not csv_path.is_file():
        return {}
    last: dict[str, float] = {}
    epochs = steps = 0
    with csv_path.open() as fh:
        for rec in csv.DictReader(fh):
            epochs = max(epochs, int(rec["epoch"]) + 1)
            steps = max(steps, int(rec["step"]) + 1)
            for k, v in rec.items():
                if k and v not in (None, "") and k.startswith(("val/", "augment/", "codebook/")):
                    last[k] = float(v)
    return {"epochs": epochs, "steps": steps, "last_logged": last}


def machine_id() -> str:
    """The machine a run trained on: CPU model, a digest of its instruction-set flags, torch.
    Chaotic data and CPU kernels make results differ across machines (the 80-epoch base of seed
    0 gave test MSE 0.4378 on one machine and 0.4226 on another, with identical code), so rows
    record it and a redone run on another machine gets a row of its own."""
    model, flags = platform.machine(), ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model == platform.machine():
                model = line.split(":", 1)[1].strip()
            elif line.startswith(("flags", "Features")) and not flags:
                flags = line.split(":", 1)[1].strip()
    except OSError:
        pass
    digest = hashlib.sha1(" ".join(sorted(flags.split())).encode()).hexdigest()[:6]
    return f"{model} [{digest}] torch {torch.__version__}"


def leaks_validation(configs: Iterable[Path]) -> bool:
    """Whether the composed configs train on validation inputs: a ``BeamSearchAugmentation``
    with ``inputs.allow_validation_leak: true`` and ``inputs.validation > 0`` (the authors'
    protocol; configs/experiments/arms/authors_leak.yaml)."""
    for path in configs:
        cfg = yaml.safe_load(Path(path).read_text()) or {}
        for cb in (cfg.get("trainer") or {}).get("callbacks") or []:
            inputs = ((cb or {}).get("init_args") or {}).get("inputs") or {}
            if inputs.get("allow_validation_leak") and int(inputs.get("validation", 0)) > 0:
                return True
    return False
