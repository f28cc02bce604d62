"""``labelmatch random-encoder``: a production-shaped encoder with random weights, offline."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from labelmatch.cli import app


@app.command("random-encoder")
def random_encoder(
    out: Annotated[Path, typer.Option("--out", help="Directory to write (Hugging Face format).")],
    shape: Annotated[str, typer.Option(help="Architecture to imitate: bge-m3.")] = "bge-m3",
    tokenizer: Annotated[str, typer.Option(help="Base model lending its tokenizer.")] = "bundled:minilm",
    seed: Annotated[int, typer.Option(help="Seed of the random initialisation.")] = 0,
) -> None:
    """Build an encoder with a production model's exact architecture and pooling and random weights:
    for shapes, file formats, memory and speed (make bench-production-shape), never for quality."""
    from labelmatch.model.random_encoder import build_random_encoder

    summary = build_random_encoder(out, shape, tokenizer, seed)
    typer.echo(json.dumps({k: summary[k] for k in ("shape", "parameters", "weights_bytes", "seconds")}))
    typer.echo(f"random weights (never for quality): base model written to {out}", err=True)
