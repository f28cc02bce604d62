"""Torch-free serving: the KServe model server (its ONNX classifier is :mod:`labelmatch.runtime`'s).

Public names import lazily (:mod:`labelmatch.core.lazy`): importing the package costs nothing.
"""

from labelmatch.core.lazy import lazy_exports

_EXPORTS = {
    "ServeConfig": "server",
    "LabelmatchModel": "server",
    "serve": "server",
    "ServeMetrics": "metrics",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
