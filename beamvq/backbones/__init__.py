"""The ten backbones behind one contract (see ``base.py``).

``REGISTRY`` maps a short name to each concrete class; YAML configs name the class by
``class_path: beamvq.backbones.<Class>``.
"""

from __future__ import annotations

from beamvq.backbones.base import Backbone, Encoded
from beamvq.backbones.cno import CNO
from beamvq.backbones.convlstm import ConvLSTM
from beamvq.backbones.earthformer import Earthformer
from beamvq.backbones.fno import FNO
from beamvq.backbones.fourcastnet import FourCastNet
from beamvq.backbones.predrnn import PredRNN
from beamvq.backbones.resnet import ResNet
from beamvq.backbones.simvp import SimVPv2
from beamvq.backbones.tau import TAU
from beamvq.backbones.unet import UNet

REGISTRY: dict[str, type[Backbone]] = {
    "resnet": ResNet,
    "unet": UNet,
    "convlstm": ConvLSTM,
    "predrnn": PredRNN,
    "simvp": SimVPv2,
    "tau": TAU,
    "fno": FNO,
    "cno": CNO,
    "fourcastnet": FourCastNet,
    "earthformer": Earthformer,
}

__all__ = [
    "CNO",
    "FNO",
    "REGISTRY",
    "TAU",
    "Backbone",
    "ConvLSTM",
    "Earthformer",
    "Encoded",
    "FourCastNet",
    "PredRNN",
    "ResNet",
    "SimVPv2",
    "UNet",
]
