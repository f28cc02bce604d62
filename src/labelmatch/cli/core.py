"""``labelmatch train | evaluate | predict | calibrate``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from labelmatch.cli import app
from labelmatch.core.errors import ConfigError

DataOpt = Annotated[
    Path,
    typer.Option(
        "--data",
        help="Directory with docs.jsonl (+ labels.json), or a .jsonl file (normalised or pair format).",
    ),
]
LabelsOpt = Annotated[
    Path | None,
    typer.Option("--labels", help="labels.json ({label: description}); default: the one beside the data."),
]


def _load_split_dataset(
    data: Path, labels: Path | None, val_fraction: float, test_fraction: float, seed: int
):
    from labelmatch.data.dataset import assign_splits, load_dataset

    return assign_splits(load_dataset(data, labels), val_fraction, test_fraction, seed)


@app.command()
def train(
    data: DataOpt,
    out: Annotated[
        Path, typer.Option("--out", help="Output Model artifact directory (replaced atomically).")
    ],
    labels: LabelsOpt = None,
    base_model: Annotated[
        str, typer.Option(help="bundled:minilm, a local HF directory, or a hub id (e.g. BAAI/bge-m3).")
    ] = "bundled:minilm",
    config: Annotated[
        Path | None, typer.Option(help="JSON (or .yaml) file of TrainConfig fields; flags below override it.")
    ] = None,
    epochs: Annotated[int | None, typer.Option(help="Maximum epochs.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Documents per step.")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate of the LoRA parameters.")] = None,
    max_length: Annotated[int | None, typer.Option(help="Tokens per text.")] = None,
    inference_max_length: Annotated[
        int | None,
        typer.Option(help="Tokens per text at validation and prediction (default: --max-length); "
                          "train on short windows, predict on longer ones."),
    ] = None,
    lora_rank: Annotated[int | None, typer.Option(help="LoRA rank.")] = None,
    lora_targets: Annotated[
        str | None,
        typer.Option(help="Comma-separated module names to adapt (default per architecture: query,value; "
                          "query,key,value,dense adapts every linear layer of a BERT-like encoder)."),
    ] = None,
    base_adapter: Annotated[
        str | None,
        typer.Option(help="LoRA adapter training starts from: auto (the general zero-shot adapter that "
                          "ships, for the bundled encoder), general, none, or a directory."),
    ] = None,
    seed: Annotated[int, typer.Option(help="Random seed (training and split).")] = 0,
    val_fraction: Annotated[
        float, typer.Option(help="Validation share when the data has no val split.")
    ] = 0.15,
    test_fraction: Annotated[float, typer.Option(help="Test share when the data has no test split.")] = 0.15,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="Hide progress bars.")] = False,
) -> None:
    """Fine-tune the dual encoder with LoRA (SFT) and write a Model artifact."""
    from labelmatch.core.settings import load_settings
    from labelmatch.data.dataset import check_training_splits
    from labelmatch.training.config import TrainConfig
    from labelmatch.training.sft import train_sft

    # The file alone first: a bad field is named with its file and line.
    values = load_settings(TrainConfig, config)[1] if config else {}
    values["base_model"] = (
        base_model if base_model != "bundled:minilm" or "base_model" not in values else values["base_model"]
    )
    flags = {
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "max_length": max_length,
        "inference_max_length": inference_max_length,
        "lora_rank": lora_rank,
        "base_adapter": base_adapter,
    }
    values.update({k: v for k, v in flags.items() if v is not None})
    if lora_targets is not None:
        values["lora_target_modules"] = [m.strip() for m in lora_targets.split(",") if m.strip()]
        if not values["lora_target_modules"]:
            raise ConfigError(f"--lora-targets {lora_targets!r}: no module names")
    values["seed"], values["progress"] = seed, not no_progress
    cfg = TrainConfig.from_dict(values)
    dataset = _load_split_dataset(data, labels, val_fraction, test_fraction, seed)
    check_training_splits(dataset, data, val_fraction)
    trainer = train_sft(dataset, cfg, out, source=data)
    best = max((h["val_macro_f1"] for h in trainer.history), default=0.0)
    typer.echo(f"model written to {out} (best validation macro-F1 {best:.4f} after {trainer.step} steps)")


@app.command()
def evaluate(
    model: Annotated[Path, typer.Option("--model", help="Model artifact directory.")],
    data: DataOpt,
    out: Annotated[Path, typer.Option("--out", help="Report directory: metrics.json, report.md, PNG plots.")],
    labels: LabelsOpt = None,
    split: Annotated[str, typer.Option(help="Split to evaluate: train, val, test or all.")] = "test",
    seed: Annotated[
        int, typer.Option(help="Seed of the split when the data has none (use the training seed).")
    ] = 0,
) -> None:
    """Evaluate a model: micro/macro F1, per-label P/R/F1, calibration, confusions; writes a report."""
    from labelmatch.evaluation.evaluate import evaluate_model

    dataset = _load_split_dataset(data, labels, 0.15, 0.15, seed)
    metrics = evaluate_model(model, dataset, out, split)
    typer.echo(
        f"{split}: micro-F1 {metrics['micro_f1']:.4f}  macro-F1 {metrics['macro_f1']:.4f}  "
        f"ECE {metrics['ece']:.4f}"
    )
    typer.echo(f"report written to {out / 'report.md'}")


@app.command()
def predict(
    texts: Annotated[list[str] | None, typer.Argument(help="Documents to classify.")] = None,
    model: Annotated[
        Path | None,
        typer.Option(
            "--model", help="Model artifact; omit for zero-shot with the base encoder (needs --labels)."
        ),
    ] = None,
    file: Annotated[
        Path | None, typer.Option("--file", help="docs.jsonl to classify (uses each line's 'text').")
    ] = None,
    labels: Annotated[
        Path | None,
        typer.Option(
            "--labels", help="labels.json to add to (or, with --replace-labels, replace) the model's labels."
        ),
    ] = None,
    replace_labels: Annotated[
        bool, typer.Option("--replace-labels", help="Use only the labels of --labels.")
    ] = False,
    base_model: Annotated[
        str, typer.Option(help="Base encoder for zero-shot prediction (no --model).")
    ] = "bundled:minilm",
    base_adapter: Annotated[
        str,
        typer.Option(help="Zero-shot (no --model): auto (the general zero-shot adapter that ships, for the "
                          "bundled encoder), general, none (the plain encoder), or an adapter directory."),
    ] = "auto",
    similarities: Annotated[
        bool, typer.Option("--similarities", help="Also print cosine similarities.")
    ] = False,
) -> None:
    """Classify documents; prints one JSON object per document."""
    from labelmatch.data.dataset import load_documents, load_labels
    from labelmatch.model.classifier import Classifier

    extra = load_labels(labels) if labels else None
    docs: list[tuple[str, str]] = [(f"arg-{i}", t) for i, t in enumerate(texts or [])]
    if file:
        docs += [(d.id, d.text) for d in load_documents(file, None)]
    if not docs:
        raise ConfigError("nothing to classify: give texts or --file")
    if model is None:
        if extra is None:
            raise ConfigError("zero-shot prediction needs --labels (there is no model to take labels from)")
        clf = Classifier.zero_shot(extra, base_model, base_adapter=base_adapter)
        extra, replace_labels = None, False
    else:
        clf = Classifier.load(model)
    predictions = clf.predict([t for _, t in docs], labels=extra, replace=replace_labels)
    for (doc_id, _), prediction in zip(docs, predictions, strict=True):
        sys.stdout.write(json.dumps({"id": doc_id, **prediction.to_json(similarities)}) + "\n")


@app.command()
def calibrate(
    model: Annotated[Path, typer.Option("--model", help="Model or OnnxModel artifact directory.")],
    data: DataOpt,
    out: Annotated[Path, typer.Option("--out", help="thresholds.json to write (for serve --thresholds).")],
    labels: LabelsOpt = None,
    replace_default: Annotated[
        bool,
        typer.Option(
            "--replace-default",
            help="Also make the new labels' global threshold the default of labels added later.",
        ),
    ] = False,
) -> None:
    """Tune thresholds for labels the model was not trained on, from a few labelled documents.

    Every document of --data (all splits) is scored against the labels of --labels alone; each
    label gets a threshold (shrunk towards their global one), merged into the model's own. A label
    no document is positive for is named in a warning on stderr and keeps the global (or the
    model's) threshold, raised above its highest score on the documents.
    """
    from labelmatch.core.artifacts import write_json
    from labelmatch.data.dataset import load_dataset
    from labelmatch.evaluation.calibration import calibrate_thresholds
    from labelmatch.evaluation.evaluate import load_as_served

    result = calibrate_thresholds(load_as_served(model), load_dataset(data, labels), replace_default)
    warning = result.warning()
    if warning:
        typer.echo(f"warning: {warning}", err=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, result.thresholds.to_json())
    typer.echo(json.dumps(result.summary()))
    typer.echo(f"thresholds written to {out}")
