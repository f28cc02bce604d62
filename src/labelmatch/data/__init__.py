"""Documents and labels: loading and checking them, preparing splits, PII redaction, label hierarchies.

Public names import lazily (:mod:`labelmatch.core.lazy`): importing the package costs nothing.
"""

from labelmatch.core.lazy import lazy_exports

_EXPORTS = {
    "Document": "dataset",
    "Dataset": "dataset",
    "load_dataset": "dataset",
    "save_dataset": "dataset",
    "load_labels": "dataset",
    "load_documents": "dataset",
    "split_of": "dataset",
    "PrepConfig": "prepare",
    "prepare_dataset": "prepare",
    "PiiRedactor": "pii",
    "redact_text": "pii",
    "Hierarchy": "hierarchy",
    "load_hierarchy": "hierarchy",
    "level_metrics": "hierarchy",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
