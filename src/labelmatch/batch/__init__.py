"""Batch classification of large archives on Ray Data (``labelmatch classify``): streaming,
resumable, one ONNX Runtime session per actor, one output shard per input shard.

Public names import lazily (:mod:`labelmatch.core.lazy`): importing the package costs nothing.
"""

from labelmatch.core.lazy import lazy_exports

_EXPORTS = {
    "BatchConfig": "run",
    "run_batch": "run",
    "BatchClassifier": "worker",
    "label_set_digest": "worker",
    "list_shards": "shards",
    "OutputLayout": "shards",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
