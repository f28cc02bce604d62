"""The ``evaluate`` component: metrics, report and the deploy decision for a candidate Model."""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Markdown, Metrics, Model, Output

from components._image import IMAGE_STEP


@dsl.component(base_image=IMAGE_STEP, packages_to_install=[], install_kfp_package=False)
def evaluate(
    model: Input[Model],
    dataset: Input[Dataset],
    metrics: Output[Metrics],
    report: Output[Artifact],
    report_page: Output[Markdown],
    serving_model_uri: str = "",
    min_improvement: float = 0.02,
    max_label_regression: float = 0.05,
    max_micro_regression: float = 0.01,
    split: str = "test",
    service: str = "",
    release_root: str = "",
) -> bool:
    """Evaluate the candidate as it would be served and decide whether it may replace the serving model.

    Calls :func:`labelmatch.evaluation.gate.evaluate_candidate`: both models are scored, as the server runs
    them, on the same split with their own thresholds; deploy when macro-F1 gains at least
    ``min_improvement``, no label's F1 drops by more than ``max_label_regression`` and micro-F1
    does not fall by more than ``max_micro_regression`` (always, when nothing serves).

    Args:
        model: Input candidate: the OnnxModel artifact from ``export_onnx`` (int8 with its fp32
            fallback and shipped thresholds, exactly what would be deployed), or a Model; verified.
        dataset: Input Dataset artifact (from ``data_prep``); verified.
        metrics: Output KFP metrics of the candidate: ``macro_f1``, ``micro_f1``, ``ece``, ...
            and ``serving_macro_f1`` when a model serves.
        report: Output Report artifact: ``metrics.json``, ``serving_metrics.json``,
            ``decision.json``, ``report.md`` and PNG plots.
        report_page: Output Markdown page (report with plots inlined) for the KFP UI.
        serving_model_uri: The artifact serving now (path, ``s3://``); empty: the latest release
            of ``service`` from the release log, and nothing serves when there is none.
        min_improvement: Macro-F1 the candidate must gain (0.02 = two points).
        max_label_regression: Largest allowed per-label F1 drop.
        max_micro_regression: Largest allowed micro-F1 drop (0.01 = one point).
        split: Dataset split to evaluate on.
        service: The service whose latest release is the baseline (with ``release_root``).
        release_root: ``s3://`` root of the release records; empty: ``$LABELMATCH_STORE_ROOT``.

    Returns:
        The gate's decision: ``True`` to export and deploy the candidate. (A single return
        value on purpose: ``kfp.local`` 2.17.0 cannot resolve a named NamedTuple output in a
        ``dsl.If`` condition; the reasons are in ``report/decision.json``.)
    """
    from labelmatch.evaluation.gate import GateConfig, evaluate_candidate
    from labelmatch.evaluation.report import write_report_page

    config = GateConfig(
        min_improvement=min_improvement, max_label_regression=max_label_regression,
        max_micro_regression=max_micro_regression, split=split,
    )
    result = evaluate_candidate(model.path, dataset.path, report.path, serving_model_uri or None, config,
                                service=service, release_root=release_root)
    for name in (
        "macro_f1",
        "micro_f1",
        "samples_f1",
        "macro_precision",
        "macro_recall",
        "exact_match",
        "ece",
    ):
        metrics.log_metric(name, result["metrics"][name])
    if result["serving_metrics"] is not None:
        metrics.log_metric("serving_macro_f1", result["serving_metrics"]["macro_f1"])
    write_report_page(report.path, report_page.path)
    print(
        "gate:",
        "deploy" if result["decision"]["deploy"] else "do not deploy",
        "—",
        "; ".join(result["decision"]["reasons"]),
        *(["— refused by:", ", ".join(refused)] if (refused := result["decision"]["decided_by"]) else []),
    )
    return bool(result["decision"]["deploy"])
