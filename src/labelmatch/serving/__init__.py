"""Torch-free serving: the ONNX classifier and the KServe model server.

Public names import lazily (:mod:`labelmatch.core.lazy`): importing the package costs nothing.
"""

from labelmatch.core.lazy import lazy_exports

_EXPORTS = {
    "OnnxClassifier": "onnx_classifier",
    "OnnxEncoder": "onnx_classifier",
    "OrtConfig": "onnx_classifier",
    "ServeConfig": "server",
    "LabelmatchModel": "server",
    "serve": "server",
    "ServeMetrics": "metrics",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
