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

Every problem is reported as a :class:`~labelmatch.core.errors.DataError` naming file, line and field.
Label files are strict: a label given twice in ``labels.json``, or two different ``label_text``
for one label in a pair file, is an error; a ``labels.json`` beside a pair file wins over its
``label_text``, with a warning per label that differs. A document's ``split`` is ``train``,
``val`` or ``test``; ``validation`` and ``dev`` mean ``val``; anything else is an error.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from labelmatch.core.errors import DataError
from labelmatch.core.inputs import iter_jsonl, iter_records, json_type, parse_record, summarise_names
from labelmatch.core.settings import read_json_file
from labelmatch.data.hierarchy import HIERARCHY_FILE, Hierarchy, load_hierarchy

log = logging.getLogger(__name__)

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
        hierarchy: Child → parent links between the labels (``hierarchy.json``), or ``None``.
    """

    documents: list[Document]
    labels: dict[str, str]
    hierarchy: Hierarchy | None = None

    @property
    def label_names(self) -> list[str]:
        """Label names in order."""
        return list(self.labels)

    def split(self, name: str) -> Dataset:
        """The documents of one split (``train``, ``val`` or ``test``), same labels."""
        return Dataset([d for d in self.documents if d.split == name], self.labels, self.hierarchy)

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
    """Yield ``(line_number, object)`` for each non-blank line, with precise errors
    (:func:`labelmatch.core.inputs.iter_jsonl`: only ``\\n`` ends a record)."""
    return iter_jsonl(path)


def load_labels(path: str | Path) -> dict[str, str]:
    """Load ``labels.json``: a JSON object mapping each label name to its description.

    Raises:
        DataError: not found, not JSON, not an object, or a name/description that is not a
            non-empty string.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "label file not found")
    labels = read_json_file(path, object_pairs_hook=_unique_keys(path))
    if not isinstance(labels, dict) or not labels:
        raise DataError(path, "expected a non-empty JSON object {label: description}")
    for name, description in labels.items():
        if not name.strip():
            raise DataError(path, "empty label name", field=name)
        if not isinstance(description, str) or not description.strip():
            raise DataError(path, "label has no description (expected a non-empty string)", field=name)
    return labels


def _unique_keys(path: Path):
    """A ``json`` ``object_pairs_hook`` refusing a key given twice (``json`` keeps the last silently)."""

    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: dict[str, Any] = {}
        for key, value in pairs:
            if key in seen:
                raise DataError(path, "label given twice (the same key appears twice)", field=key)
            seen[key] = value
        return seen

    return hook


def check_string(
    path: str | Path, line: int, obj: dict[str, Any], key: str, max_chars: int | None = None
) -> str:
    """The non-empty string ``obj[key]`` of a record (an ``id``/``doc_id`` may also be a number).

    Args:
        path: The file (for messages).
        line: The record's line.
        obj: The record.
        key: The field.
        max_chars: Longest accepted value (``None``: no limit).

    Raises:
        DataError: Missing, not a string, empty, or longer than ``max_chars``.
    """
    if key not in obj:
        raise DataError(path, "missing", line=line, field=key)
    value = obj[key]
    if isinstance(value, int | float) and key in ("id", "doc_id") and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise DataError(path, f"expected a string, got {json_type(value)}", line=line, field=key)
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
        doc_id = check_string(path, line, obj, "id")
        if doc_id in seen:
            raise DataError(
                path, f"duplicate id {doc_id!r} (first on line {seen[doc_id]})", line=line, field="id"
            )
        seen[doc_id] = line
        text = check_string(path, line, obj, "text", max_chars)
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
            split = _split_name(path, line, split)
        meta = obj.get("meta") if isinstance(obj.get("meta"), dict) else {}
        documents.append(Document(doc_id, text, list(dict.fromkeys(raw_labels)), soft or None, split, meta))
    return documents


#: Split names accepted in the data and what they mean (``dev`` and ``validation`` are ``val``).
SPLIT_ALIASES = {"train": "train", "val": "val", "validation": "val", "dev": "val", "test": "test"}


def _split_name(path: Path, line: int, split: Any) -> str:
    """The canonical split of a document's ``split`` field; an unknown name is a DataError."""
    if split not in SPLIT_ALIASES:
        expected = ", ".join(SPLIT_ALIASES)
        raise DataError(path, f"unknown split {split!r}; expected {expected}", line=line, field="split")
    return SPLIT_ALIASES[split]


def is_pair_file(path: str | Path) -> bool:
    """True when the first non-blank line of ``path`` looks like the pair format."""
    with open(path, "rb") as handle:
        for number, raw in iter_records(handle):
            try:
                obj = parse_record(path, number, raw)
            except DataError:
                return False  # the loader that reads it reports the line
            return all(k in obj for k in ("doc_id", "label_name"))
    return False


def load_pairs(
    path: str | Path, labels: dict[str, str] | None = None, max_chars: int = MAX_TEXT_CHARS
) -> Dataset:
    """Load the pair format and group it into documents.

    Args:
        path: JSON-lines file, one (document, label) pair per line.
        labels: Optional label descriptions (``labels.json``); they take precedence over the
            pairs' ``label_text``, and a ``label_text`` that differs is reported with a warning.
            When ``None`` the descriptions come from ``label_text``, which must be the same on
            every line of a label.
        max_chars: Longest accepted text.

    Raises:
        DataError: a missing or malformed field, an unknown label, a document with two texts, or
            (without ``labels``) a label given two different descriptions.
    """
    path = Path(path)
    docs: dict[str, Document] = {}
    descriptions: dict[str, str] = dict(labels or {})
    overridden: dict[str, int] = {}
    for line, obj in _iter_json_lines(path):
        for key in PAIR_FIELDS:
            if key not in obj:
                raise DataError(path, "missing", line=line, field=key)
        doc_id = check_string(path, line, obj, "doc_id")
        text = check_string(path, line, obj, "doc_text", max_chars)
        label = check_string(path, line, obj, "label_name")
        if labels is not None and label not in labels:
            raise DataError(
                path, f"unknown label {label!r} (not in labels.json)", line=line, field="label_name"
            )
        description = obj.get("label_text")
        if labels is None:
            if not isinstance(description, str) or not description.strip():
                raise DataError(path, "label has no description", line=line, field="label_text")
            first = descriptions.setdefault(label, description)
            if first != description:
                raise DataError(
                    path,
                    f"label {label!r} has a different description than on an earlier line "
                    f"({first[:60]!r}); give each label one description (or a labels.json)",
                    line=line,
                    field="label_text",
                )
        elif isinstance(description, str) and description.strip() and description != labels[label]:
            overridden.setdefault(label, line)
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
        split = obj.get("split")
        if split is not None:
            doc.split = _split_name(path, line, split)
    if len(overridden) == 1:
        [(label, line)] = overridden.items()
        log.warning("%s:%d: label %r: the labels.json description replaces the pairs' label_text",
                    path, line, label)
    elif overridden:
        named = [f"{label} (line {line})" for label, line in overridden.items()]
        log.warning("%s: %d labels: the labels.json descriptions replace the pairs' label_text: %s", path,
                    len(overridden), summarise_names(named))
    return Dataset(list(docs.values()), descriptions)


def load_dataset(
    path: str | Path, labels_path: str | Path | None = None, max_chars: int = MAX_TEXT_CHARS
) -> Dataset:
    """Load a dataset from a directory or a JSON-lines file, in either format.

    Args:
        path: A directory holding ``docs.jsonl`` (+ ``labels.json``, + an optional
            ``hierarchy.json``, see :mod:`labelmatch.data.hierarchy`), or a ``.jsonl`` file.
        labels_path: ``labels.json``; defaults to the one beside the documents. Required for the
            normalised format, optional for pairs (descriptions then come from ``label_text``).
        max_chars: Longest accepted text.
    """
    path = Path(path)
    docs_path = documents_file(path)
    if labels_path is None and (docs_path.parent / LABELS_FILE).is_file():
        labels_path = docs_path.parent / LABELS_FILE
    labels = load_labels(labels_path) if labels_path is not None else None
    if not docs_path.is_file():
        raise DataError(docs_path, "file not found")
    if is_pair_file(docs_path):
        dataset = load_pairs(docs_path, labels, max_chars)
    elif labels is None:
        raise DataError(docs_path.parent / LABELS_FILE, "label file not found (pass --labels)")
    else:
        dataset = Dataset(load_documents(docs_path, labels, max_chars), labels)
    hierarchy_path = docs_path.parent / HIERARCHY_FILE
    if hierarchy_path.is_file():
        dataset.hierarchy = load_hierarchy(hierarchy_path, dataset.labels)
    return dataset


def save_dataset(dataset: Dataset, out_dir: str | Path) -> None:
    """Write ``docs.jsonl``, ``labels.json`` (and ``hierarchy.json``) into ``out_dir`` (no manifest)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / DOCS_FILE, "w", encoding="utf-8") as handle:
        for doc in dataset.documents:
            handle.write(json.dumps(doc.to_json(), ensure_ascii=False) + "\n")
    (out_dir / LABELS_FILE).write_text(json.dumps(dataset.labels, indent=2, ensure_ascii=False) + "\n")
    if dataset.hierarchy is not None:
        (out_dir / HIERARCHY_FILE).write_text(json.dumps(dataset.hierarchy.to_json(), indent=2) + "\n")


def assign_splits(
    dataset: Dataset, val_fraction: float = 0.15, test_fraction: float = 0.15, seed: int = 0
) -> Dataset:
    """Give every unsplit document a split that depends on its id alone, so it never moves.

    A document's split is read off a hash of ``seed`` and its id (:func:`split_of`): adding,
    removing or editing other documents never moves it, so a document a serving model trained
    on cannot land in a later candidate's test split, and a test document stays a test document
    across data versions. The split is stratified in expectation (every label's documents are
    divided in the same proportions); a label with very few documents can miss a split by chance,
    which ``data_prep`` reports. Documents that already have a split keep it; when the data
    brings its own ``test`` split, only ``val`` is carved (from ``train``, by the same hash).

    Args:
        dataset: The dataset (modified in place and returned).
        val_fraction: Share of the (unsplit or train) documents for validation.
        test_fraction: Share of unsplit documents for test (ignored when a test split exists).
        seed: Salt of the hash; the same seed always gives the same split per id.
    """
    has_test = any(d.split == "test" for d in dataset.documents)
    has_val = any(d.split == "val" for d in dataset.documents)
    val = 0.0 if has_val else val_fraction
    test = 0.0 if has_test else test_fraction
    for doc in dataset.documents:
        if doc.split is None:
            doc.split = split_of(doc.id, seed, val, test)
        elif doc.split == "train" and split_of(doc.id, seed + 1, val, 0.0) == "val":
            doc.split = "val"  # the data's own train split, with no val beside it
    return dataset


def labels_without_positives(dataset: Dataset, split: str = "train") -> list[str]:
    """The labels no document of ``split`` is positive for (they can only be learnt from their
    description)."""
    positive = {label for doc in dataset.split(split).documents for label in doc.labels}
    return [name for name in dataset.labels if name not in positive]


def without_positives_warning(dataset: Dataset) -> str | None:
    """One line on the labels without a positive training document (``None`` when there are none).

    One label is named with where it has positives; many are counted and the first few named
    (:func:`labelmatch.core.inputs.summarise_names`), so 100,000 such labels are one line, not
    100,000.
    """
    missing = labels_without_positives(dataset, "train")
    if not missing:
        return None
    in_val = {label for doc in dataset.split("val").documents for label in doc.labels}
    if len(missing) == 1:
        where = "it has some only in validation" if missing[0] in in_val else "none in validation either"
        return (f"label {missing[0]!r} has no positive training document ({where}): it is learnt from its "
                "description alone")
    only_val = sum(name in in_val for name in missing)
    return (f"{len(missing):,} of {len(dataset.labels):,} labels have no positive training document "
            f"({only_val:,} of them have some in validation): {summarise_names(missing)}; they are learnt "
            "from their descriptions alone")


def documents_file(path: str | Path) -> Path:
    """The documents file of a ``--data`` path: ``docs.jsonl`` in a directory, else the file."""
    path = Path(path)
    return path / DOCS_FILE if path.is_dir() else path


def check_training_splits(dataset: Dataset, source: str | Path, val_fraction: float,
                          flag: str = "--val-fraction") -> None:
    """Refuse a split dataset without ``train`` or ``val`` documents, naming the file and the fix.

    Args:
        dataset: The dataset after :func:`assign_splits`.
        source: Where its documents came from (a file, or a ``--data`` directory).
        val_fraction: The validation share it was split with.
        flag: How the user sets that share (``--val-fraction``, or ``val_fraction`` in a config).

    Raises:
        DataError: ``docs.jsonl: no document is in the 'val' split ...: add ..., or raise
            --val-fraction``.
    """
    counts = Counter(doc.split for doc in dataset.documents)
    where = documents_file(source)
    shown = ", ".join(f"{counts[name]} {name}" for name in SPLITS)
    if not counts["train"]:
        raise DataError(where, f"no document is in the 'train' split ({shown}): training needs some; give "
                               'documents "split": "train" or leave their split out')
    if not counts["val"]:
        raise DataError(
            where,
            f"no document is in the 'val' split ({shown}; {flag} {val_fraction:g}): validation picks the "
            f"epoch and tunes the thresholds; give some documents \"split\": \"val\" (or \"dev\"), or raise "
            f"{flag} (each unsplit document's split is drawn from a hash of its id, so with few documents "
            "none may land in val)",
        )


def split_of(doc_id: str, seed: int, val_fraction: float, test_fraction: float) -> str:
    """``test``, ``val`` or ``train`` for ``doc_id``: a uniform number from sha256(seed, id)
    below ``test_fraction`` is test, below ``test_fraction + val_fraction`` val, else train."""
    digest = hashlib.sha256(f"{seed}:{doc_id}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < test_fraction:
        return "test"
    return "val" if u < test_fraction + val_fraction else "train"
