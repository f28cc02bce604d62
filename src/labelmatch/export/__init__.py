"""ONNX export: fp32 and int8 graphs, parity with torch, the fp32 fallback plan.

Public names import lazily (:mod:`labelmatch.core.lazy`): importing the package costs nothing.
"""

from labelmatch.core.lazy import lazy_exports

_EXPORTS = {
    "ExportConfig": "onnx",
    "export_onnx": "onnx",
    "ParityError": "onnx",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
