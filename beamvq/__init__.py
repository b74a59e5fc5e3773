"""beamvq: BeamVQ (beam search over a vector-quantized latent) for physical space-time forecasting.

The method: arXiv 2405.17051 and arXiv 2502.18925 (see the README). The command line is
``beamvq`` (``beamvq.cli``); ``beamvq.packaged_configs`` finds the YAML configs shipped with the
package; ``beamvq.importers`` converts OpenSTL and neuraloperator weights. From Python,
``beamvq.load_forecaster(ckpt).forecast(ds)`` forecasts an ``xarray.Dataset``
(``beamvq.forecast``; imported on first use, so ``import beamvq`` stays cheap).
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from beamvq.forecast import Forecaster, load_forecaster


def _version() -> str:
    # a source tree on sys.path that was never installed has no distribution metadata
    try:
        return version("beamvq")
    except PackageNotFoundError:
        return "0+unknown"


__version__: str = _version()

__all__ = ["Forecaster", "__version__", "load_forecaster"]

# names of beamvq.forecast exported here, imported on first use (torch, Lightning, xarray)
_LAZY = ("Forecaster", "load_forecaster")


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from beamvq import forecast

        return getattr(forecast, name)
    raise AttributeError(f"module 'beamvq' has no attribute {name!r}")
