"""The ``data_prep`` stage: validate, normalise, redact, de-duplicate and split a dataset.

Input is either format :func:`labelmatch.data.dataset.load_dataset` accepts (normalised ``docs.jsonl`` +
``labels.json``, or the pair format); every problem is a one-line
:class:`~labelmatch.core.errors.DataError` naming file, line and field. Steps, in order:

1. **normalise**: Unicode NFC, whitespace runs collapsed to one space, ends stripped; label
   names de-duplicated per document.
2. **de-duplicate**: documents whose text is equal after normalisation, ignoring case, are one
   document; the first is kept and takes the union of the labels (multi-label data: two
   annotators each naming one label of the same text are both right). De-duplication runs
   before redaction, so two different people's letters that differ only in PII stay two
   documents.
3. **redact** (optional, on by default): :func:`labelmatch.data.pii.redact_text` replaces PII
   with ``<ENTITY>`` placeholders; the entity types found are kept in ``meta.pii_redacted``.
4. **split**: documents without a split get one by iterative stratification
   (:func:`labelmatch.data.dataset.assign_splits`).

Output: a ``Dataset`` artifact (``docs.jsonl`` with ``split``, ``labels.json``, ``manifest.json``
whose summary has counts per split and label) and a ``Report`` artifact (``report.md`` with a
plot of label counts per split).
"""

from __future__ import annotations

import dataclasses
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from labelmatch.core.artifacts import atomic_artifact_dir, write_json, write_manifest
from labelmatch.core.errors import ConfigError, DataError
from labelmatch.data.dataset import (
    MAX_TEXT_CHARS,
    SPLITS,
    Dataset,
    Document,
    assign_splits,
    load_dataset,
    save_dataset,
)
from labelmatch.data.pii import PiiRedactor
from labelmatch.platform.artifact_store import local_input

_WHITESPACE = re.compile(r"\s+")


@dataclass
class PrepConfig:
    """Settings of the ``data_prep`` stage.

    Attributes:
        val_fraction: Share of unsplit documents for validation.
        test_fraction: Share of unsplit documents for test (ignored when a test split exists).
        seed: Seed of the split.
        redact_pii: Replace PII with ``<ENTITY>`` placeholders before anything is written.
        pii_entities: Entity types to redact (``None``: all of :mod:`labelmatch.data.pii`).
        deduplicate: Merge documents with the same normalised, case-folded text.
        max_chars: Longest accepted document (longer is an error, not a silent cut).
    """

    val_fraction: float = 0.15
    test_fraction: float = 0.15
    seed: int = 0
    redact_pii: bool = True
    pii_entities: list[str] | None = None
    deduplicate: bool = True
    max_chars: int = MAX_TEXT_CHARS

    def __post_init__(self) -> None:
        for name in ("val_fraction", "test_fraction"):
            if not 0.0 <= getattr(self, name) < 0.5:
                raise ConfigError(f"PrepConfig.{name} must be in [0, 0.5), got {getattr(self, name)}")
        if self.max_chars <= 0:
            raise ConfigError(f"PrepConfig.max_chars must be > 0, got {self.max_chars}")


def normalise_text(text: str) -> str:
    """Unicode NFC with whitespace runs collapsed to single spaces and the ends stripped."""
    return _WHITESPACE.sub(" ", unicodedata.normalize("NFC", text)).strip()


def text_key(text: str) -> str:
    """What makes two texts the same document: normalised (:func:`normalise_text`), case-folded.

    De-duplication uses it, and so does GRPO to keep feedback on test documents out of training.
    """
    return normalise_text(text).casefold()


def deduplicate(documents: list[Document]) -> tuple[list[Document], dict[str, int]]:
    """Merge documents with equal case-folded text; returns ``(kept, stats)``.

    ``stats`` counts ``exact`` duplicates (same text), ``near`` ones (same text up to case or
    whitespace) and ``label_conflicts`` (duplicates whose labels differed and were merged).
    """
    kept: dict[str, Document] = {}
    stats = {"exact": 0, "near": 0, "label_conflicts": 0}
    for doc in documents:
        key = text_key(doc.text)
        first = kept.get(key)
        if first is None:
            kept[key] = doc
            continue
        stats["exact" if first.text == doc.text else "near"] += 1
        if set(doc.labels) != set(first.labels):
            stats["label_conflicts"] += 1
            first.labels = list(dict.fromkeys([*first.labels, *doc.labels]))
    return list(kept.values()), stats


def _split_label_counts(dataset: Dataset) -> dict[str, dict[str, int]]:
    counts = {split: dict.fromkeys(dataset.labels, 0) for split in SPLITS}
    for doc in dataset.documents:
        for label in doc.labels:
            counts[doc.split or "train"][label] += 1
    return counts


def _plot_label_counts(counts: dict[str, dict[str, int]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    labels = list(next(iter(counts.values())))
    fig, ax = plt.subplots(figsize=(7, max(3.0, 0.3 * len(labels) + 1)))
    left = np.zeros(len(labels))
    for split, colour in zip(SPLITS, ("#4477aa", "#ccbb44", "#ee6677"), strict=True):
        values = np.array([counts[split][name] for name in labels])
        ax.barh(labels, values, left=left, color=colour, label=split)
        left += values
    ax.set_xlabel("documents with the label")
    ax.set_title("Label counts per split")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _report_markdown(summary: dict[str, Any], plot_name: str) -> str:
    lines = [
        "# Data preparation report",
        "",
        f"Source: `{summary['source']}`",
        "",
        "| step | value |",
        "|---|---|",
        f"| documents read | {summary['documents_read']} |",
        f"| exact duplicates removed | {summary['duplicates']['exact']} |",
        f"| case/whitespace duplicates removed | {summary['duplicates']['near']} |",
        f"| duplicates with conflicting labels (merged) | {summary['duplicates']['label_conflicts']} |",
        f"| documents with PII redacted | {summary['pii']['documents']} |",
        f"| documents written | {summary['documents']} |",
        "",
    ]
    if summary["pii"]["entities"]:
        lines += ["## Redacted PII", "", "| entity | documents |", "|---|---|"]
        lines += [f"| {name} | {count} |" for name, count in summary["pii"]["entities"].items()] + [""]
    lines += ["## Documents per split", "", "| split | documents |", "|---|---|"]
    lines += [f"| {split} | {summary['splits'].get(split, 0)} |" for split in SPLITS] + [""]
    lines += ["## Label counts per split", "", "| label | " + " | ".join(SPLITS) + " |", "|---|---|---|---|"]
    for label, row in summary["label_counts"].items():
        lines.append(f"| {label} | " + " | ".join(str(row[s]) for s in SPLITS) + " |")
    if summary["warnings"]:
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in summary["warnings"]]
    lines += ["", f"![Label counts per split]({plot_name})", ""]
    return "\n".join(lines)


def prepare_dataset(
    data: str | Path,
    out_dir: str | Path,
    report_dir: str | Path,
    labels: str | Path | None = None,
    config: PrepConfig | None = None,
    lineage: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run the data_prep stage and write the Dataset and Report artifacts.

    Args:
        data: A directory with ``docs.jsonl`` (+ ``labels.json``) or a ``.jsonl`` file, in the
            normalised or the pair format; a local path or ``s3://bucket/prefix`` (or the
            ``s3://`` key of one file), read through :func:`labelmatch.platform.artifact_store.local_input`.
        out_dir: The Dataset artifact directory (written atomically).
        report_dir: The Report artifact directory (``report.md``, ``label_counts.png``,
            ``summary.json``).
        labels: ``labels.json`` (local or ``s3://``); default: the one beside the data
            (optional for pairs).
        config: Stage settings.
        lineage: Recorded in both manifests (pipeline version, run id, ...).

    Returns:
        The summary (also the Dataset manifest's ``summary``).

    Raises:
        DataError: invalid input, naming file, line and field; or no documents left.
    """
    config = config or PrepConfig()
    with local_input(data) as local_data, local_input(labels) as local_labels:
        dataset = load_dataset(local_data, local_labels, config.max_chars)
    read = len(dataset.documents)
    for doc in dataset.documents:
        doc.text = normalise_text(doc.text)
        doc.labels = list(dict.fromkeys(doc.labels))
    documents, dup_stats = (
        deduplicate(dataset.documents)
        if config.deduplicate
        else (dataset.documents, {"exact": 0, "near": 0, "label_conflicts": 0})
    )
    pii_docs, pii_entities = 0, {}
    if config.redact_pii:
        redactor = PiiRedactor(entities=config.pii_entities)
        for doc in documents:
            doc.text, found = redactor.redact(doc.text)
            if found:
                pii_docs += 1
                doc.meta["pii_redacted"] = found
                for entity in found:
                    pii_entities[entity] = pii_entities.get(entity, 0) + 1
    if not documents:
        raise DataError(data, "no documents left after validation and de-duplication")
    dataset = assign_splits(
        Dataset(documents, dataset.labels, dataset.hierarchy),
        config.val_fraction,
        config.test_fraction,
        config.seed,
    )
    label_counts = {
        name: {s: c[name] for s, c in _split_label_counts(dataset).items()} for name in dataset.labels
    }
    warnings = [
        f"label {name!r} has no positive document in split {split!r}"
        for name, row in label_counts.items()
        for split in SPLITS
        if row[split] == 0
    ]
    summary = {
        "source": str(data),
        "documents_read": read,
        "documents": len(documents),
        "duplicates": dup_stats,
        "pii": {"documents": pii_docs, "entities": dict(sorted(pii_entities.items()))},
        "splits": dataset.counts()["splits"],
        "label_counts": label_counts,
        "warnings": warnings,
        "config": dataclasses.asdict(config),
    }
    with atomic_artifact_dir(out_dir) as tmp:
        save_dataset(dataset, tmp)
        write_manifest(tmp, "Dataset", lineage=lineage, extra=summary)
    with atomic_artifact_dir(report_dir) as tmp:
        plot = _plot_label_counts(_split_label_counts(dataset), tmp / "label_counts.png")
        (tmp / "report.md").write_text(_report_markdown(summary, plot.name))
        write_json(tmp / "summary.json", summary)
        write_manifest(tmp, "Report", lineage=lineage, extra={"stage": "data_prep"})
    return summary
