"""``labelmatch serve``: the KServe model server over an OnnxModel artifact (no torch)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from labelmatch.cli import app


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def serve(
    ctx: typer.Context,
    model: Annotated[Path, typer.Option("--model", help="OnnxModel artifact directory.")],
    host: Annotated[str, typer.Option(help="Bind address (0.0.0.0 inside a pod).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="HTTP port.")] = 8080,
    model_name: Annotated[str, typer.Option("--model-name", help="Endpoint model name.")] = "labelmatch",
    labels: Annotated[Path | None, typer.Option(help="labels.json served instead of the model's.")] = None,
    thresholds: Annotated[Path | None, typer.Option(help="thresholds.json to serve.")] = None,
    state_dir: Annotated[Path | None, typer.Option("--state-dir", help="Default SQLite state dir.")] = None,
    state_url: Annotated[str | None, typer.Option(
        "--state-url", envvar="LABELMATCH_STATE_URL",
        help="SQLAlchemy URL of the shared state (PostgreSQL for several replicas).")] = None,
) -> None:
    """Serve a model: v1/v2 inference, health, metadata, /metrics, labels admin, feedback.

    Further KServe and labelmatch flags pass through, e.g. ``--model_name tax --max_docs 32
    --intra_op_threads 2 --label_sync_s 1`` (see ``python -m
    labelmatch.serving.server --help``).
    """
    from labelmatch.data.dataset import load_labels
    from labelmatch.model.matching import Thresholds
    from labelmatch.serving.server import serve as run_server

    # The files a ConfigMap mounts are checked here first: a bad one is one line (file, line, field).
    if labels is not None:
        load_labels(labels)
    if thresholds is not None:
        Thresholds.from_file(thresholds)
    argv = ["--model_dir", str(model), "--host", host, "--http_port", str(port), "--model_name", model_name]
    for flag, value in (("--labels", labels), ("--thresholds", thresholds), ("--state_dir", state_dir),
                        ("--state_url", state_url)):
        if value is not None:
            argv += [flag, str(value)]
    run_server([*argv, *ctx.args])
