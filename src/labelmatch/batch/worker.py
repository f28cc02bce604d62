"""What each Ray Data actor runs: parse a batch of input rows, classify the good ones with one ONNX
Runtime session (loaded once per actor), and return one output row per input row."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np

from labelmatch.core.errors import DataError
from labelmatch.core.inputs import parse_record
from labelmatch.data.dataset import check_string

MISSING_TEXT = "field 'text': missing or not a non-empty string"


def label_set_digest(labels: dict[str, str], thresholds: dict[str, Any]) -> str:
    """SHA-256 of the served label set and thresholds (canonical JSON): rows scored with the same
    labels carry the same digest."""
    canonical = json.dumps({"labels": labels, "thresholds": thresholds}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def parse_jsonl_row(path: str, line: int, raw: bytes) -> tuple[str | None, str | None, str | None]:
    """``(id, text, error)`` of one JSON Lines record (bytes without its ``\\n``).

    The record is read by the rules of every reader (:func:`labelmatch.core.inputs.parse_record`)
    and its fields checked as the data loaders check them (:func:`labelmatch.data.dataset.check_string`):
    ``text`` a non-empty string, ``id`` (optional) a string or number. ``error`` is the reason
    (``field 'text': is empty``), without file and line.
    """
    try:
        obj = parse_record(path, line, raw)
        text = check_string(path, line, obj, "text")
        doc_id = None if obj.get("id") is None else check_string(path, line, obj, "id")
    except DataError as exc:
        return None, None, exc.reason
    return doc_id, text, None


def parse_parquet_row(raw_id: Any, raw_text: Any) -> tuple[str | None, str | None, str | None]:
    """``(id, text, error)`` of one Parquet row (``text`` must be a non-empty string)."""
    if isinstance(raw_text, bytes):
        try:
            raw_text = raw_text.decode("utf-8")
        except UnicodeDecodeError as exc:
            return None, None, f"field 'text': not valid UTF-8 (byte {exc.start})"
    if not isinstance(raw_text, str) or not raw_text.strip():
        return None, None, MISSING_TEXT
    return (None if raw_id is None else str(raw_id)), raw_text, None


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
        jsonl = self.kind == "jsonl"
        n = len(batch["raw" if jsonl else "text"])
        ids: list[str] = [""] * n
        errors: list[str] = [""] * n
        texts: list[str] = []
        rows: list[int] = []
        for i in range(n):
            try:
                if jsonl:
                    doc_id, text, error = parse_jsonl_row(str(batch["path"][i]), int(batch["line"][i]),
                                                          bytes(batch["raw"][i]))
                else:
                    doc_id, text, error = parse_parquet_row(batch["id"][i] if "id" in batch else None,
                                                            batch["text"][i])
            except Exception as exc:  # a row must never fail the run: it is rejected with the reason
                doc_id, text, error = None, None, f"cannot be read: {type(exc).__name__}: {exc}"
            if error is not None:
                errors[i] = error
                continue
            ids[i] = doc_id or ""
            texts.append(text)
            rows.append(i)
        labels: list[list[str]] = [[] for _ in range(n)]
        scores = np.zeros((n, len(self.names)), dtype=np.float32)
        cosines = np.zeros((n, len(self.names)), dtype=np.float32)
        for part in self._classify(texts, rows, errors):
            kept, chosen, probs, cos = part
            for row, row_labels in zip(kept, chosen, strict=True):
                labels[row] = row_labels
            scores[kept], cosines[kept] = probs, cos
        lines = batch["line"] if jsonl else None
        return _table(batch["path"], lines, ids, errors, labels, scores,
                      cosines if self.similarities else None)

    def _classify(self, texts: list[str], rows: list[int], errors: list[str]) -> Any:
        """``(rows, labels, probabilities, cosines)`` of the rows classified; when the batch fails
        as a whole, each row is tried alone and the one that fails is rejected with the reason."""
        if not texts:
            return
        try:
            yield self._scores(texts, rows)
            return
        except Exception:  # one row (or the batch as a whole) cannot be classified: find which
            pass
        for text, row in zip(texts, rows, strict=True):
            try:
                yield self._scores([text], [row])
            except Exception as exc:
                errors[row] = f"cannot be classified: {type(exc).__name__}: {exc}"

    def _scores(self, texts: list[str], rows: list[int]) -> tuple[list[int], Any, np.ndarray, np.ndarray]:
        names, cos = self.classifier.similarities(texts, self.labels, self.replace)
        probs = self.classifier.probabilities(cos).astype(np.float32)
        return rows, self.classifier.decide(names, probs), probs, cos


def _table(paths: Any, lines: Any, ids: list[str], errors: list[str], labels: list[list[str]],
           scores: np.ndarray, cosines: np.ndarray | None) -> Any:
    import pyarrow as pa

    width = scores.shape[1]
    columns = {
        "path": pa.array([str(p) for p in paths], pa.string()),
        **({} if lines is None else {"line": pa.array([int(x) for x in lines], pa.int64())}),
        "id": pa.array(ids, pa.string()),
        "error": pa.array(errors, pa.string()),
        "labels": pa.array(labels, pa.list_(pa.string())),
        "scores": pa.FixedSizeListArray.from_arrays(pa.array(scores.ravel(), pa.float32()), width),
    }
    if cosines is not None:
        columns["similarities"] = pa.FixedSizeListArray.from_arrays(pa.array(cosines.ravel(), pa.float32()),
                                                                    width)
    return pa.table(columns)
