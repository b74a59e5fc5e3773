"""beamvq: BeamVQ (beam search over a vector-quantized latent) for physical space-time forecasting.

The method: arXiv 2405.17051 and arXiv 2502.18925 (see the README). The command line is
``beamvq`` (``beamvq.cli``); ``beamvq.packaged_configs`` finds the YAML configs shipped with the
package; ``beamvq.importers`` converts OpenSTL and neuraloperator weights.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version


def _version() -> str:
    # a source tree on sys.path that was never installed has no distribution metadata
    try:
        return version("beamvq")
    except PackageNotFoundError:
        return "0+unknown"


__version__: str = _version()

__all__ = ["__version__"]
