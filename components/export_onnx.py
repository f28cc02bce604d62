"""The ``export_onnx`` component: a Model artifact to an int8 ONNX model with a parity check."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components._image import IMAGE_TRAIN


@dsl.component(base_image=IMAGE_TRAIN, packages_to_install=[], install_kfp_package=False)
def export_onnx(
    model: Input[Model],
    dataset: Input[Dataset],
    onnx_model: Output[Model],
    metrics: Output[Metrics],
    agreement_gate: float = 0.98,
    per_channel: bool = True,
    optimize: bool = True,
    keep_fp32: bool = True,
    max_parity_docs: int = 512,
    fp32_fallback: str = "auto",
) -> float:
    """Merge the LoRA, export to ONNX, quantise to int8 and check parity with torch.

    Calls :func:`labelmatch.export.onnx.export_onnx`; thresholds re-tuned on the served scores of the
    dataset's validation split ship only when they score at least as well there as the model's
    (both recorded in ``parity.json``), and the export fails when what is served (int8, or int8
    with its fp32 fallback) and torch agree on fewer than ``agreement_gate`` of the validation
    documents' label sets.

    Args:
        model: Input Model artifact (the candidate that passed the gate); verified.
        dataset: Input Dataset artifact (from ``data_prep``): its ``val`` split drives parity.
        onnx_model: Output OnnxModel artifact (typed ``Model`` for KFP; ``metadata.kind`` and
            ``manifest.json`` say ``OnnxModel``): ``model.onnx`` (int8), ``model_fp32.onnx``
            when kept, tokenizer, labels, label embeddings, thresholds, ``parity.json``.
        metrics: Output KFP metrics: int8/fp32 label-set agreement and cosine minimum; with a
            fallback, its agreement, re-embedded share and margin.
        agreement_gate: Minimum label-set agreement with torch of what is served.
        per_channel: Per-channel int8 weight scales.
        optimize: ONNX Runtime transformer fusions before quantising.
        keep_fp32: Also ship the fp32 graph.
        max_parity_docs: At most this many validation documents are compared.
        fp32_fallback: ``auto``: when int8 alone misses the gate, re-embed documents near a
            decision boundary with the fp32 graph (needs ``keep_fp32``); ``always``; ``off``.

    Returns:
        The served label-set agreement with torch.
    """
    from labelmatch.core.artifacts import verify_artifact
    from labelmatch.data.dataset import load_dataset
    from labelmatch.export.onnx import ExportConfig, export_onnx, served_agreement

    verify_artifact(dataset.path, "Dataset")
    config = ExportConfig(
        agreement_gate=agreement_gate,
        per_channel=per_channel,
        optimize=optimize,
        keep_fp32=keep_fp32,
        max_parity_docs=max_parity_docs,
        fp32_fallback=fp32_fallback,
    )
    parity = export_onnx(model.path, onnx_model.path, config, dataset=load_dataset(dataset.path))
    for precision in ("int8", "fp32"):
        for key in ("label_set_agreement", "cosine_min"):
            if key in parity.get(precision, {}):
                metrics.log_metric(f"{precision}_{key}", parity[precision][key])
    fallback = parity.get("fallback")
    if fallback:
        for key in ("label_set_agreement", "fallback_fraction", "margin"):
            metrics.log_metric(f"fallback_{key}", fallback[key])
    onnx_model.metadata.update({"kind": "OnnxModel", "fp32_fallback": fallback is not None})
    return float(served_agreement(parity))
