"""The ``export_onnx`` component: a Model artifact to an int8 ONNX model with a parity check."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components._image import IMAGE


@dsl.component(base_image=IMAGE, packages_to_install=[], install_kfp_package=False)
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
) -> float:
    """Merge the LoRA, export to ONNX, quantise to int8 and check parity with torch.

    Calls :func:`labelmatch.export.export_onnx`; thresholds are re-tuned for the int8 model on
    the dataset's validation split, and the export fails when int8 and torch agree on fewer
    than ``agreement_gate`` of the validation documents' label sets.

    Args:
        model: Input Model artifact (the candidate that passed the gate); verified.
        dataset: Input Dataset artifact (from ``data_prep``): its ``val`` split drives parity.
        onnx_model: Output OnnxModel artifact (typed ``Model`` for KFP; ``metadata.kind`` and
            ``manifest.json`` say ``OnnxModel``): ``model.onnx`` (int8), ``model_fp32.onnx``
            when kept, tokenizer, labels, label embeddings, thresholds, ``parity.json``.
        metrics: Output KFP metrics: int8/fp32 label-set agreement and cosine minimum.
        agreement_gate: Minimum int8-vs-torch label-set agreement.
        per_channel: Per-channel int8 weight scales.
        optimize: ONNX Runtime transformer fusions before quantising.
        keep_fp32: Also ship the fp32 graph.
        max_parity_docs: At most this many validation documents are compared.

    Returns:
        The int8 label-set agreement with torch.
    """
    from labelmatch.artifacts import verify_artifact
    from labelmatch.data import load_dataset
    from labelmatch.export import ExportConfig, export_onnx

    verify_artifact(dataset.path, "Dataset")
    config = ExportConfig(
        agreement_gate=agreement_gate,
        per_channel=per_channel,
        optimize=optimize,
        keep_fp32=keep_fp32,
        max_parity_docs=max_parity_docs,
    )
    parity = export_onnx(model.path, onnx_model.path, config, dataset=load_dataset(dataset.path))
    for precision in ("int8", "fp32"):
        for key in ("label_set_agreement", "cosine_min"):
            if key in parity.get(precision, {}):
                metrics.log_metric(f"{precision}_{key}", parity[precision][key])
    onnx_model.metadata.update({"kind": "OnnxModel"})
    return float(parity["int8"]["label_set_agreement"])
