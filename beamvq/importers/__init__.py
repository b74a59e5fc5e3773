"""Bring your trained models: OpenSTL and neuraloperator weights as beamvq checkpoints.

- :func:`import_openstl`: OpenSTL's SimVP (gSTA), TAU and PredRNN (Tan et al., NeurIPS 2023
  Datasets and Benchmarks) onto beamvq's ``SimVPv2``, ``TAU``, ``PredRNN``, which compute what
  OpenSTL's modules compute.
- :func:`import_neuraloperator_fno`: neuraloperator's ``FNO`` (Li et al., ICLR 2021;
  Kossaifi et al.) onto beamvq's ``FNO``, with its two known differences
  (:data:`FNO_DIFFERENCES`) reported.
- :func:`importing_command`: ``beamvq import-weights``, which writes a checkpoint that
  ``beamvq predict --ckpt_path`` loads.

The table of what maps and how is docs/importing.md.
"""

from beamvq.importers.command import importing_command
from beamvq.importers.mapping import WeightMismatch
from beamvq.importers.neuraloperator import FNO_DIFFERENCES, import_neuraloperator_fno
from beamvq.importers.openstl import import_openstl

__all__ = [
    "FNO_DIFFERENCES",
    "WeightMismatch",
    "import_neuraloperator_fno",
    "import_openstl",
    "importing_command",
]
