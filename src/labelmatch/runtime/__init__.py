"""The ONNX runtime every stage serves with: an OnnxModel's graphs under ONNX Runtime or OpenVINO
(the engines), its tokenizer and the label-matching core on top (:class:`OnnxClassifier`).

Evaluation (a model as served), the export (parity, the engine probe), batch classification,
monitoring and the model server all run an OnnxModel through this package; it sits below all of
them and imports only the model's prediction core, the data layer and ``core``. Torch-free.

Public names import lazily (:mod:`labelmatch.core.lazy`): importing the package costs nothing.
"""

from labelmatch.core.lazy import lazy_exports

_EXPORTS = {
    "OnnxClassifier": "onnx_classifier",
    "OnnxEncoder": "onnx_classifier",
    "OrtConfig": "onnx_classifier",
    "Engine": "engines",
    "engine": "engines",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
