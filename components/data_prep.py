"""The ``data_prep`` component: raw documents in, a split Dataset artifact and a report out."""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Markdown, Output

from components._image import IMAGE_STEP


@dsl.component(base_image=IMAGE_STEP, packages_to_install=[], install_kfp_package=False)
def data_prep(
    data_uri: str,
    dataset: Output[Dataset],
    report: Output[Artifact],
    report_page: Output[Markdown],
    labels_uri: str = "",
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    seed: int = 0,
    redact_pii: bool = True,
    deduplicate: bool = True,
) -> int:
    """Validate, normalise, PII-redact, de-duplicate and split labelled documents.

    Calls :func:`labelmatch.data.prepare.prepare_dataset`.

    Args:
        data_uri: Path of the input: a directory with ``docs.jsonl`` (+ ``labels.json``) or a
            ``.jsonl`` file, in the normalised or the pair format (a mounted volume or a path
            the step can read).
        dataset: Output Dataset artifact: ``docs.jsonl`` with a ``split`` per document,
            ``labels.json`` and ``manifest.json`` (counts per split and label).
        report: Output Report artifact: ``report.md``, ``label_counts.png``, ``summary.json``,
            ``manifest.json``.
        report_page: Output Markdown page (the report with its plot inlined) for the KFP UI.
        labels_uri: ``labels.json``; empty: the one beside the data (optional for pairs).
        val_fraction: Validation share of documents without a split.
        test_fraction: Test share of documents without a split.
        seed: Seed of the stratified split.
        redact_pii: Replace PII with ``<ENTITY>`` placeholders (:mod:`labelmatch.data.pii`).
        deduplicate: Merge documents with the same normalised, case-folded text.

    Returns:
        The number of documents written.
    """
    from labelmatch.data.prepare import PrepConfig, prepare_dataset
    from labelmatch.evaluation.report import write_report_page

    config = PrepConfig(
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        seed=seed,
        redact_pii=redact_pii,
        deduplicate=deduplicate,
    )
    summary = prepare_dataset(data_uri, dataset.path, report.path, labels_uri or None, config)
    dataset.metadata.update(
        {"kind": "Dataset", "documents": summary["documents"], "splits": summary["splits"]}
    )
    write_report_page(report.path, report_page.path)
    return summary["documents"]
