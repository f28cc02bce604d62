"""``labelmatch export``: Model artifact → int8 ONNX OnnxModel artifact with parity gates."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from labelmatch.cli import app


@app.command()
def export(
    model: Annotated[Path, typer.Option("--model", help="Model artifact directory.")],
    out: Annotated[Path, typer.Option("--out", help="OnnxModel artifact directory (replaced atomically).")],
    data: Annotated[Path | None, typer.Option("--data", help="Parity + re-tuning data (val split).")] = None,
    labels: Annotated[Path | None, typer.Option("--labels", help="labels.json of --data.")] = None,
    seed: Annotated[int, typer.Option(help="Split seed when the data has none (the training seed).")] = 0,
    agreement_gate: Annotated[
        float, typer.Option(help="Minimum label-set agreement with torch of what is served.")
    ] = 0.98,
    optimize: Annotated[bool, typer.Option("--optimize/--no-optimize", help="Fuse ops first.")] = True,
    keep_fp32: Annotated[bool, typer.Option("--keep-fp32/--no-fp32", help="Ship model_fp32.onnx.")] = True,
    max_parity_docs: Annotated[int, typer.Option(help="Validation documents compared at most.")] = 512,
    fp32_fallback: Annotated[
        str,
        typer.Option(help="auto: when int8 alone misses the gate, re-embed documents near a decision "
                          "boundary with the fp32 graph (margin calibrated on the parity documents); "
                          "always; off."),
    ] = "auto",
    fallback_target: Annotated[
        float | None,
        typer.Option(help="Label-set agreement the fallback margin is calibrated to on half the parity "
                          "documents (default: halfway between the gate and 1; 1.0 re-embeds every document "
                          "as close as the farthest wrong int8 decision)."),
    ] = None,
    engine: Annotated[
        str,
        typer.Option(help="Serving engine: auto (the fastest candidate that passes the gate, by a short "
                          "probe on this CPU), ort-int8-dynamic, ort-int8-static, openvino-int8-static, "
                          "openvino-bf16 or ort-fp32 (docs/serving.md)."),
    ] = "auto",
    probe_threads: Annotated[
        int, typer.Option(help="Threads per engine in the probe: the serving pods' --intra_op_threads "
                               "(0: one per core).")
    ] = 0,
    waive_agreement_gate: Annotated[
        str, typer.Option(help="Export even below the agreement gate, and record this reason (e.g. 'random "
                               "weights' for a production-shaped encoder built by labelmatch encoder "
                               "random: its label sets mean nothing). Every figure is still measured.")
    ] = "",
) -> None:
    """Export to ONNX (pooling + L2 norm in the graph), quantise int8 per channel, check parity."""
    from labelmatch.data.dataset import assign_splits, load_dataset
    from labelmatch.export.onnx import ExportConfig, export_onnx

    dataset = assign_splits(load_dataset(data, labels), 0.15, 0.15, seed) if data else None
    config = ExportConfig(agreement_gate=agreement_gate, optimize=optimize, keep_fp32=keep_fp32,
                          max_parity_docs=max_parity_docs, fp32_fallback=fp32_fallback,
                          fallback_target=fallback_target, engine=engine, probe_threads=probe_threads,
                          agreement_gate_waived=waive_agreement_gate)
    parity = export_onnx(model, out, config, dataset)
    int8, fallback = parity["int8"], parity["fallback"]
    typer.echo(f"int8: cosine min {int8['cosine_min']:.4f} mean {int8['cosine_mean']:.4f}, "
               f"label-set agreement {int8['label_set_agreement']:.4f} on {parity['documents']} documents")
    if fallback:
        typer.echo(f"int8 + fp32 fallback (margin {fallback['margin']:.4f}, calibrated to agreement "
                   f"{fallback['target']:.3f}): label-set agreement "
                   f"{fallback['label_set_agreement']:.4f}, {fallback['fallback_fraction']:.0%} of documents "
                   f"re-embedded, on {fallback['holdout_documents']} holdout documents")
    choice = parity["thresholds"]
    f1 = {k: v.get("served_macro_f1") for k, v in choice["candidates"].items()}
    if f1.get("retuned") is not None:
        typer.echo(f"thresholds: {choice['shipped']} shipped (served macro-F1 on the parity split: "
                   f"model {f1['model']:.4f}, re-tuned {f1['retuned']:.4f})")
    probe = parity["engine_probe"]
    for name, entry in parity["engines"].items():
        cost = probe["costs_ms"].get(name)
        typer.echo(f"engine {name}: label-set agreement as served {entry['served_agreement']:.4f}, "
                   + (f"{cost:.2f} ms per document" if cost is not None else "not timed (below the gate)"))
    typer.echo(f"serving engine: {probe['picked']} (on {probe['machine']['cpu']})")
    if parity.get("gate_waived"):
        typer.echo(f"agreement gate waived: {parity['gate_waived']}", err=True)
    typer.echo(f"OnnxModel written to {out}")
