"""What each Ray Data actor runs: parse a batch of input rows, classify the good ones with one ONNX
Runtime session (loaded once per actor), and return one output row per input row."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np

#: Reason of a row that is empty (skipped silently, still counted as a line).
EMPTY = "empty"
MISSING_TEXT = "field 'text': missing or not a non-empty string"


def label_set_digest(labels: dict[str, str], thresholds: dict[str, Any]) -> str:
    """SHA-256 of the served label set and thresholds (canonical JSON): rows scored with the same
    labels carry the same digest."""
    canonical = json.dumps({"labels": labels, "thresholds": thresholds}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def parse_jsonl_row(line: str) -> tuple[str | None, str | None, str | None]:
    """``(id, text, error)`` of one JSONL line; an empty line gives ``error == EMPTY``."""
    if not line.strip():
        return None, None, EMPTY
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        return None, None, f"invalid JSON: {exc.msg} (column {exc.colno})"
    if not isinstance(obj, dict):
        return None, None, f"expected a JSON object, got {type(obj).__name__}"
    text = obj.get("text")
    if not isinstance(text, str) or not text.strip():
        return None, None, MISSING_TEXT
    doc_id = obj.get("id")
    return (None if doc_id is None else str(doc_id)), text, None


class BatchClassifier:
    """A Ray Data callable class: one :class:`~labelmatch.runtime.onnx_classifier.OnnxClassifier`
    per actor.

    Args:
        model_uri: The OnnxModel (local path or ``s3://``; downloaded and verified once per actor).
        kind: ``jsonl`` (rows are raw lines in ``text``) or ``parquet`` (``id`` and ``text`` columns).
        labels: Extra ``{label: description}`` (or, with ``replace``, the whole label set).
        replace: Use ``labels`` instead of the model's.
        ort_threads: ONNX Runtime intra-op threads per actor.
        similarities: Also return cosines.
    """

    def __init__(self, model_uri: str, kind: str, labels: dict[str, str] | None = None, replace: bool = False,
                 ort_threads: int = 1, similarities: bool = False):
        import contextlib

        from labelmatch.platform.artifact_store import local_artifact
        from labelmatch.runtime.onnx_classifier import OnnxClassifier, OrtConfig

        self._stack = contextlib.ExitStack()
        path = self._stack.enter_context(local_artifact(model_uri, "OnnxModel"))
        self.classifier = OnnxClassifier.load(path, OrtConfig(intra_op_threads=ort_threads), verify=False)
        self.kind, self.labels, self.replace, self.similarities = kind, labels, replace, similarities
        self.names = list(self.classifier.resolve_labels(labels, replace))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        """One output row per input row (``error`` set on the rows that could not be read)."""
        n = len(batch["text"])
        ids: list[str] = [""] * n
        errors: list[str] = [""] * n
        texts: list[str] = []
        rows: list[int] = []
        for i in range(n):
            if self.kind == "jsonl":
                doc_id, text, error = parse_jsonl_row(str(batch["text"][i]))
            else:
                raw_id, raw_text = batch["id"][i] if "id" in batch else None, batch["text"][i]
                ok = isinstance(raw_text, str) and raw_text.strip()
                doc_id = None if raw_id is None else str(raw_id)
                text, error = (raw_text, None) if ok else (None, MISSING_TEXT)
            if error is not None:
                errors[i] = error
                continue
            ids[i] = doc_id or ""
            texts.append(text)
            rows.append(i)
        labels: list[list[str]] = [[] for _ in range(n)]
        scores = np.zeros((n, len(self.names)), dtype=np.float32)
        cosines = np.zeros((n, len(self.names)), dtype=np.float32)
        if texts:
            names, cos = self.classifier.similarities(texts, self.labels, self.replace)
            probs = self.classifier.probabilities(cos).astype(np.float32)
            for row, chosen in zip(rows, self.classifier.decide(names, probs), strict=True):
                labels[row] = chosen
            scores[rows], cosines[rows] = probs, cos
        return _table(batch["path"], ids, errors, labels, scores, cosines if self.similarities else None)


def _table(paths: Any, ids: list[str], errors: list[str], labels: list[list[str]], scores: np.ndarray,
           cosines: np.ndarray | None) -> Any:
    import pyarrow as pa

    width = scores.shape[1]
    columns = {
        "path": pa.array([str(p) for p in paths], pa.string()),
        "id": pa.array(ids, pa.string()),
        "error": pa.array(errors, pa.string()),
        "labels": pa.array(labels, pa.list_(pa.string())),
        "scores": pa.FixedSizeListArray.from_arrays(pa.array(scores.ravel(), pa.float32()), width),
    }
    if cosines is not None:
        columns["similarities"] = pa.FixedSizeListArray.from_arrays(pa.array(cosines.ravel(), pa.float32()),
                                                                    width)
    return pa.table(columns)
