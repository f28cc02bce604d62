"""Hierarchical label sets: a child label implies its parent (CLINC150 domain → intent, Bitext
category → intent).

``hierarchy.json`` beside ``docs.jsonl`` (as in ``../shared/data``) maps each parent to its
children (``{parent: [child, ...]}``); ``{child: parent}`` is accepted too. A model trained on a
dataset with a hierarchy carries it (``hierarchy.json`` in the artifact) and, at prediction,
keeps its label sets consistent: a predicted child brings its parent (scores are never changed,
only the decision). Evaluation reports metrics per level and how often the raw decisions were
inconsistent before that rule.

This module imports neither torch nor transformers (the serving path uses it).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from labelmatch.core.errors import DataError
from labelmatch.core.settings import read_json_file

HIERARCHY_FILE = "hierarchy.json"


@dataclass(frozen=True)
class Hierarchy:
    """Child → parent links between labels.

    Attributes:
        parent_of: ``{child: parent}``.
    """

    parent_of: dict[str, str] = field(default_factory=dict)

    @property
    def parents(self) -> set[str]:
        """Labels that have children."""
        return set(self.parent_of.values())

    @property
    def children(self) -> set[str]:
        """Labels that have a parent."""
        return set(self.parent_of)

    def to_json(self) -> dict[str, list[str]]:
        """``{parent: [children]}`` (the shared data's format), in first-seen order."""
        out: dict[str, list[str]] = {}
        for child, parent in self.parent_of.items():
            out.setdefault(parent, []).append(child)
        return out

    def enforce(self, labels: Sequence[str], known: Iterable[str] | None = None) -> list[str]:
        """``labels`` with the parent of every child in it appended (when the parent is a known
        label), each once, order kept."""
        allowed = set(known) if known is not None else None
        out = list(dict.fromkeys(labels))
        for label in list(out):
            parent = self.parent_of.get(label)
            while parent is not None and parent not in out and (allowed is None or parent in allowed):
                out.append(parent)
                parent = self.parent_of.get(parent)
        return out

    def enforce_matrix(self, decisions: np.ndarray, names: Sequence[str]) -> np.ndarray:
        """A 0/1 ``(docs, labels)`` decision matrix with every predicted child's parent set."""
        index = {name: j for j, name in enumerate(names)}
        out = decisions.copy()
        for child, parent in self.parent_of.items():
            if child in index and parent in index:
                out[:, index[parent]] |= out[:, index[child]]
        return out

    def inconsistent_rate(self, decisions: np.ndarray, names: Sequence[str]) -> float:
        """Share of documents with a predicted child whose parent was not predicted."""
        if not len(decisions):
            return 0.0
        return float((self.enforce_matrix(decisions, names) != decisions).any(axis=1).mean())

    def compose(self, labels: dict[str, str]) -> dict[str, str]:
        """Descriptions with each child's parent description in front ("Banking: … Transfer: …"),
        for encoders that read a child better in its context."""
        return {
            name: f"{labels[self.parent_of[name]]} {text}" if self.parent_of.get(name) in labels else text
            for name, text in labels.items()
        }


def load_hierarchy(path: str | Path, labels: dict[str, str] | None = None) -> Hierarchy:
    """Read ``hierarchy.json`` and check it against ``labels``.

    Raises:
        DataError: not JSON, neither format, a label that is not in ``labels``, a child with two
            parents, or a cycle — naming the file and the label.
    """
    path = Path(path)
    raw = read_json_file(path)
    if not isinstance(raw, dict):
        raise DataError(path, "expected an object {parent: [children]} or {child: parent}")
    parent_of: dict[str, str] = {}
    for key, value in raw.items():
        pairs = [(child, key) for child in value] if isinstance(value, list) else [(key, value)]
        for child, parent in pairs:
            if not isinstance(child, str) or not isinstance(parent, str):
                raise DataError(path, "labels must be strings", field=str(key))
            if child in parent_of and parent_of[child] != parent:
                raise DataError(path, f"label {child!r} has two parents ({parent_of[child]!r}, {parent!r})",
                                field=child)
            parent_of[child] = parent
    if labels is not None:
        unknown = sorted({*parent_of, *parent_of.values()} - set(labels))
        if unknown:
            raise DataError(path, f"not a label of the dataset: {', '.join(unknown[:5])}", field=unknown[0])
    for child in parent_of:
        seen, node = {child}, parent_of.get(child)
        while node is not None:
            if node in seen:
                raise DataError(path, f"cycle through label {child!r}", field=child)
            seen.add(node)
            node = parent_of.get(node)
    return Hierarchy(parent_of)


def level_metrics(
    y_true: np.ndarray, y_pred: np.ndarray, names: Sequence[str], hierarchy: Hierarchy
) -> dict[str, Any]:
    """Micro/macro-F1 of the parent level and of the child level (labels with a parent), and the
    share of documents whose decisions were inconsistent (``y_pred`` as decided, before the rule)."""
    from sklearn.metrics import f1_score

    out: dict[str, Any] = {"inconsistent_rate": hierarchy.inconsistent_rate(y_pred, names)}
    enforced = hierarchy.enforce_matrix(y_pred, names)
    for level, members in (("parent", hierarchy.parents), ("child", hierarchy.children)):
        columns = [j for j, name in enumerate(names) if name in members]
        if not columns:
            continue
        truth, pred = y_true[:, columns], enforced[:, columns]
        out[level] = {
            "labels": len(columns),
            "micro_f1": float(f1_score(truth, pred, average="micro", zero_division=0)),
            "macro_f1": float(f1_score(truth, pred, average="macro", zero_division=0)),
        }
    return out
