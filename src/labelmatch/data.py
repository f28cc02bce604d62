"""Loading, validating and splitting labelled documents.

Two input formats are accepted:

* **normalised** (as in ``../shared/data``): ``docs.jsonl`` with one
  ``{"id", "text", "labels": [...], "split"?, "soft"?: {label: score}}`` per line, plus
  ``labels.json`` (``{label: description}``). A directory holding both may be given.
* **pairs** (the format existing users have): one JSON line per (document, label) with
  ``doc_id, doc_text, label_name, label_text, target, soft_score`` and optional
  ``pii_flag, pii_score, pii_types``. Pairs are grouped into documents; ``target == 1`` makes a
  hard label, ``soft_score`` becomes the document's soft score for that label, and
  ``label_text`` supplies the label description when no ``labels.json`` is given.

Every problem is reported as a :class:`~labelmatch.errors.DataError` naming file, line and field.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from labelmatch.errors import DataError

DOCS_FILE = "docs.jsonl"
LABELS_FILE = "labels.json"
SPLITS = ("train", "val", "test")
#: Default cap on one document's characters: a larger one is refused, not silently truncated
#: (texts are still truncated to the encoder's max length in tokens when embedded).
MAX_TEXT_CHARS = 100_000
PAIR_FIELDS = ("doc_id", "doc_text", "label_name", "target")


@dataclass
class Document:
    """One labelled document.

    Attributes:
        id: Unique id within the dataset.
        text: The document text.
        labels: Names of the labels that apply (hard targets).
        soft: Optional ``{label: score in [0, 1]}`` soft targets.
        split: ``train``, ``val``, ``test`` or ``None`` when not yet split.
        meta: Extra fields kept through (e.g. ``pii_*`` of the pair format).
    """

    id: str
    text: str
    labels: list[str]
    soft: dict[str, float] | None = None
    split: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The document as one line of the normalised ``docs.jsonl``."""
        out: dict[str, Any] = {"id": self.id, "text": self.text, "labels": list(self.labels)}
        if self.soft:
            out["soft"] = dict(self.soft)
        if self.split:
            out["split"] = self.split
        if self.meta:
            out["meta"] = dict(self.meta)
        return out


@dataclass
class Dataset:
    """Documents plus the ordered label descriptions they refer to.

    Attributes:
        documents: The documents.
        labels: ``{label name: description}``; its order is the label order everywhere.
    """

    documents: list[Document]
    labels: dict[str, str]

    @property
    def label_names(self) -> list[str]:
        """Label names in order."""
        return list(self.labels)

    def split(self, name: str) -> Dataset:
        """The documents of one split (``train``, ``val`` or ``test``), same labels."""
        return Dataset([d for d in self.documents if d.split == name], self.labels)

    def label_matrix(self) -> Any:
        """Binary ``(n_docs, n_labels)`` float32 numpy matrix of hard targets."""
        import numpy as np

        index = {name: i for i, name in enumerate(self.labels)}
        matrix = np.zeros((len(self.documents), len(index)), dtype=np.float32)
        for row, doc in enumerate(self.documents):
            for label in doc.labels:
                matrix[row, index[label]] = 1.0
        return matrix

    def soft_matrix(self) -> tuple[Any, Any]:
        """Soft targets and their mask, both ``(n_docs, n_labels)`` float32 numpy matrices."""
        import numpy as np

        index = {name: i for i, name in enumerate(self.labels)}
        values = np.zeros((len(self.documents), len(index)), dtype=np.float32)
        mask = np.zeros_like(values)
        for row, doc in enumerate(self.documents):
            for label, score in (doc.soft or {}).items():
                values[row, index[label]] = score
                mask[row, index[label]] = 1.0
        return values, mask

    def counts(self) -> dict[str, Any]:
        """Documents per split and positives per label (for manifests and reports)."""
        per_label = Counter(label for doc in self.documents for label in doc.labels)
        return {
            "documents": len(self.documents),
            "splits": dict(Counter(doc.split or "unsplit" for doc in self.documents)),
            "labels": {name: per_label.get(name, 0) for name in self.labels},
        }


def _iter_json_lines(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, object)`` for each non-blank line, with precise errors."""
    if not path.is_file():
        raise DataError(path, "file not found")
    raw = path.read_bytes()
    if not raw.strip():
        raise DataError(path, "file is empty")
    for number, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(path, f"not valid UTF-8 (byte {exc.start})", line=number) from exc
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(path, f"invalid JSON: {exc.msg} at column {exc.colno}", line=number) from exc
        if not isinstance(obj, dict):
            raise DataError(path, f"expected a JSON object, got {type(obj).__name__}", line=number)
        yield number, obj


def load_labels(path: str | Path) -> dict[str, str]:
    """Load ``labels.json``: a JSON object mapping each label name to its description.

    Raises:
        DataError: not found, not JSON, not an object, or a name/description that is not a
            non-empty string.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "label file not found")
    try:
        labels = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise DataError(path, f"not valid UTF-8 (byte {exc.start})") from exc
    except json.JSONDecodeError as exc:
        raise DataError(path, f"invalid JSON: {exc.msg}", line=exc.lineno) from exc
    if not isinstance(labels, dict) or not labels:
        raise DataError(path, "expected a non-empty JSON object {label: description}")
    for name, description in labels.items():
        if not name.strip():
            raise DataError(path, "empty label name", field=name)
        if not isinstance(description, str) or not description.strip():
            raise DataError(path, "label has no description (expected a non-empty string)", field=name)
    return labels


def _check_str(path: Path, line: int, obj: dict[str, Any], key: str, max_chars: int | None = None) -> str:
    if key not in obj:
        raise DataError(path, "missing", line=line, field=key)
    value = obj[key]
    if isinstance(value, int | float) and key in ("id", "doc_id") and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise DataError(path, f"expected a string, got {type(value).__name__}", line=line, field=key)
    if not value.strip():
        raise DataError(path, "is empty", line=line, field=key)
    if max_chars is not None and len(value) > max_chars:
        raise DataError(
            path, f"is {len(value):,} characters, over the limit of {max_chars:,}", line=line, field=key
        )
    return value


def _check_score(path: Path, line: int, value: Any, field_name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise DataError(path, f"expected a number, got {type(value).__name__}", line=line, field=field_name)
    if not 0.0 <= float(value) <= 1.0:
        raise DataError(path, f"score {value} is outside [0, 1]", line=line, field=field_name)
    return float(value)


def load_documents(
    path: str | Path, labels: dict[str, str] | None, max_chars: int = MAX_TEXT_CHARS
) -> list[Document]:
    """Load a normalised ``docs.jsonl``.

    Args:
        path: The JSON-lines file.
        labels: Known labels; every label a document names must be one of them. ``None`` skips
            that check (the caller validates later).
        max_chars: Longest accepted text.
    """
    path = Path(path)
    documents: list[Document] = []
    seen: dict[str, int] = {}
    for line, obj in _iter_json_lines(path):
        doc_id = _check_str(path, line, obj, "id")
        if doc_id in seen:
            raise DataError(
                path, f"duplicate id {doc_id!r} (first on line {seen[doc_id]})", line=line, field="id"
            )
        seen[doc_id] = line
        text = _check_str(path, line, obj, "text", max_chars)
        raw_labels = obj.get("labels", [])
        if not isinstance(raw_labels, list) or not all(isinstance(x, str) for x in raw_labels):
            raise DataError(path, "expected a list of label names", line=line, field="labels")
        if labels is not None:
            for label in raw_labels:
                if label not in labels:
                    raise DataError(
                        path, f"unknown label {label!r} (not in labels.json)", line=line, field="labels"
                    )
        soft = obj.get("soft")
        if soft is not None:
            if not isinstance(soft, dict):
                raise DataError(path, "expected an object {label: score}", line=line, field="soft")
            for label, score in soft.items():
                if labels is not None and label not in labels:
                    raise DataError(path, f"unknown label {label!r}", line=line, field="soft")
                soft[label] = _check_score(path, line, score, f"soft.{label}")
        split = obj.get("split")
        if split is not None:
            split = {"validation": "val", "dev": "val"}.get(split, split)
            if split not in SPLITS:
                raise DataError(
                    path, f"unknown split {split!r}; expected one of {SPLITS}", line=line, field="split"
                )
        meta = obj.get("meta") if isinstance(obj.get("meta"), dict) else {}
        documents.append(Document(doc_id, text, list(dict.fromkeys(raw_labels)), soft or None, split, meta))
    return documents


def is_pair_file(path: str | Path) -> bool:
    """True when the first non-blank line of ``path`` looks like the pair format."""
    with open(path, "rb") as handle:
        for raw in handle:
            if raw.strip():
                try:
                    obj = json.loads(raw)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    return False
                return isinstance(obj, dict) and all(k in obj for k in ("doc_id", "label_name"))
    return False


def load_pairs(
    path: str | Path, labels: dict[str, str] | None = None, max_chars: int = MAX_TEXT_CHARS
) -> Dataset:
    """Load the pair format and group it into documents.

    Args:
        path: JSON-lines file, one (document, label) pair per line.
        labels: Optional label descriptions; when ``None`` they come from ``label_text``.
        max_chars: Longest accepted text.
    """
    path = Path(path)
    docs: dict[str, Document] = {}
    descriptions: dict[str, str] = dict(labels or {})
    for line, obj in _iter_json_lines(path):
        for key in PAIR_FIELDS:
            if key not in obj:
                raise DataError(path, "missing", line=line, field=key)
        doc_id = _check_str(path, line, obj, "doc_id")
        text = _check_str(path, line, obj, "doc_text", max_chars)
        label = _check_str(path, line, obj, "label_name")
        if labels is not None and label not in labels:
            raise DataError(
                path, f"unknown label {label!r} (not in labels.json)", line=line, field="label_name"
            )
        if labels is None:
            description = obj.get("label_text")
            if not isinstance(description, str) or not description.strip():
                raise DataError(path, "label has no description", line=line, field="label_text")
            descriptions.setdefault(label, description)
        target = obj["target"]
        if isinstance(target, bool) or target not in (0, 1):
            raise DataError(path, f"expected 0 or 1, got {target!r}", line=line, field="target")
        doc = docs.get(doc_id)
        if doc is None:
            doc = docs[doc_id] = Document(doc_id, text, [], None, None, {})
        elif doc.text != text:
            raise DataError(
                path,
                f"document {doc_id!r} has a different text than on an earlier line",
                line=line,
                field="doc_text",
            )
        if target == 1 and label not in doc.labels:
            doc.labels.append(label)
        if obj.get("soft_score") is not None:
            doc.soft = doc.soft or {}
            doc.soft[label] = _check_score(path, line, obj["soft_score"], "soft_score")
        for key in ("pii_flag", "pii_score", "pii_types"):
            if key in obj:
                doc.meta[key] = obj[key]
        if obj.get("split") in SPLITS:
            doc.split = obj["split"]
    return Dataset(list(docs.values()), descriptions)


def load_dataset(
    path: str | Path, labels_path: str | Path | None = None, max_chars: int = MAX_TEXT_CHARS
) -> Dataset:
    """Load a dataset from a directory or a JSON-lines file, in either format.

    Args:
        path: A directory holding ``docs.jsonl`` (+ ``labels.json``), or a ``.jsonl`` file.
        labels_path: ``labels.json``; defaults to the one beside the documents. Required for the
            normalised format, optional for pairs (descriptions then come from ``label_text``).
        max_chars: Longest accepted text.
    """
    path = Path(path)
    docs_path = path / DOCS_FILE if path.is_dir() else path
    if labels_path is None and (docs_path.parent / LABELS_FILE).is_file():
        labels_path = docs_path.parent / LABELS_FILE
    labels = load_labels(labels_path) if labels_path is not None else None
    if not docs_path.is_file():
        raise DataError(docs_path, "file not found")
    if is_pair_file(docs_path):
        return load_pairs(docs_path, labels, max_chars)
    if labels is None:
        raise DataError(docs_path.parent / LABELS_FILE, "label file not found (pass --labels)")
    return Dataset(load_documents(docs_path, labels, max_chars), labels)


def save_dataset(dataset: Dataset, out_dir: str | Path) -> None:
    """Write ``docs.jsonl`` and ``labels.json`` into ``out_dir`` (no manifest)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / DOCS_FILE, "w", encoding="utf-8") as handle:
        for doc in dataset.documents:
            handle.write(json.dumps(doc.to_json(), ensure_ascii=False) + "\n")
    (out_dir / LABELS_FILE).write_text(json.dumps(dataset.labels, indent=2, ensure_ascii=False) + "\n")


def assign_splits(
    dataset: Dataset, val_fraction: float = 0.15, test_fraction: float = 0.15, seed: int = 0
) -> Dataset:
    """Give every unsplit document a split, stratified for multi-label data.

    Uses iterative stratification (Sechidis et al., 2011; ``iterstrat``), which keeps each
    label's share close to equal across splits even for rare labels. Documents that already
    have a split keep it; when there is no ``val`` split, it is carved out of ``train``.

    Args:
        dataset: The dataset (modified in place and returned).
        val_fraction: Share of the (unsplit or train) documents for validation.
        test_fraction: Share of unsplit documents for test (ignored when a test split exists).
        seed: Random seed.
    """
    has_test = any(d.split == "test" for d in dataset.documents)
    unsplit = [d for d in dataset.documents if d.split is None]
    if unsplit:
        fractions = {"test": 0.0 if has_test else test_fraction}
        _stratified_assign(unsplit, dataset.labels, fractions, "train", seed)
    if not any(d.split == "val" for d in dataset.documents):
        train = [d for d in dataset.documents if d.split == "train"]
        _stratified_assign(train, dataset.labels, {"val": val_fraction}, "train", seed + 1)
    return dataset


def _stratified_assign(
    docs: Sequence[Document], labels: dict[str, str], fractions: dict[str, float], rest: str, seed: int
) -> None:
    remaining = list(docs)
    total = len(docs)
    for split, fraction in fractions.items():
        count = round(total * fraction)
        if count <= 0 or count >= len(remaining):
            continue
        chosen = _stratified_pick(remaining, labels, count, seed)
        for i in chosen:
            remaining[i].split = split
        chosen_set = set(chosen)
        remaining = [d for i, d in enumerate(remaining) if i not in chosen_set]
        seed += 1
    for doc in remaining:
        doc.split = rest


def _stratified_pick(docs: Sequence[Document], labels: dict[str, str], count: int, seed: int) -> list[int]:
    import numpy as np
    from iterstrat.ml_stratifiers import MultilabelStratifiedShuffleSplit

    matrix = Dataset(list(docs), labels).label_matrix()
    if matrix.shape[1] == 0 or matrix.sum() == 0:
        rng = random.Random(seed)
        return rng.sample(range(len(docs)), count)
    splitter = MultilabelStratifiedShuffleSplit(n_splits=1, test_size=count / len(docs), random_state=seed)
    _, picked = next(splitter.split(np.zeros(len(docs)), matrix))
    return sorted(int(i) for i in picked)
