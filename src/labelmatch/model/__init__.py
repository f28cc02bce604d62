"""The dual encoder: encoder and pooling, losses, the Model artifact, long documents, and the
label-matching prediction core the torch and ONNX classifiers share.

Public names import lazily (:mod:`labelmatch.core.lazy`): importing the package costs nothing.
"""

from labelmatch.core.lazy import lazy_exports

_EXPORTS = {
    "Classifier": "classifier",
    "LabelMatcher": "matching",
    "Prediction": "matching",
    "Thresholds": "matching",
    "Chunking": "chunking",
    "DualEncoder": "dual_encoder",
    "TextEncoder": "encoder",
    "Pooling": "encoder",
    "load_base": "encoder",
    "save_model": "io",
    "load_encoder_model": "io",
    "LossWeights": "losses",
    "label_match_loss": "losses",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
