"""``labelmatch feedback add | import | export | stats | register``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from labelmatch.cli import app
from labelmatch.core.errors import ConfigError

feedback_app = typer.Typer(
    help="The feedback store: record, import, export and count user feedback.", no_args_is_help=True
)
app.add_typer(feedback_app, name="feedback")

DbOpt = Annotated[
    str,
    typer.Option(
        "--db",
        envvar="LABELMATCH_FEEDBACK_URL",
        help="SQLAlchemy URL of the store (SQLite file by default, PostgreSQL in production).",
    ),
]
RedactOpt = Annotated[
    bool, typer.Option("--redact/--no-redact", help="Redact PII (labelmatch.data.pii) before storing texts.")
]
DEFAULT_DB = "sqlite:///feedback.db"


def _store(db: str, redact: bool = False):
    from labelmatch.feedback.feedback_store import FeedbackStore

    return FeedbackStore(db, redact=redact)


def _names(value: str | None) -> list[str] | None:
    return None if value is None else [v.strip() for v in value.split(",") if v.strip()]


@feedback_app.command("register")
def register(
    version: Annotated[str, typer.Option("--version", help="Model version name (what the server reports).")],
    labels: Annotated[Path | None, typer.Option("--labels", help="labels.json of that version.")] = None,
    model: Annotated[
        Path | None, typer.Option("--model", help="Model artifact to take labels.json from.")
    ] = None,
    db: DbOpt = DEFAULT_DB,
) -> None:
    """Declare a model version and its labels; from then on feedback must name a registered version."""
    from labelmatch.data.dataset import load_labels

    if (labels is None) == (model is None):
        raise ConfigError("give exactly one of --labels or --model")
    names = load_labels(labels if labels is not None else Path(model) / "labels.json")
    _store(db).register_model(version, names)
    typer.echo(f"registered model version {version!r} with {len(names)} labels")


@feedback_app.command("add")
def add(
    text: Annotated[str, typer.Option("--text", help="The document text.")],
    model_version: Annotated[
        str, typer.Option("--model-version", help="Version of the model that served it.")
    ],
    score: Annotated[
        int, typer.Option("--score", help="Rating of the served labels, 1 (wrong) to 5 (right).")
    ],
    predicted: Annotated[str, typer.Option("--predicted", help="Served labels, comma-separated.")] = "",
    corrected: Annotated[
        str | None, typer.Option("--corrected", help="Correct labels, comma-separated.")
    ] = None,
    source: Annotated[str, typer.Option("--source", help="Where the feedback comes from.")] = "cli",
    record_id: Annotated[str | None, typer.Option("--id", help="Record id (generated when omitted).")] = None,
    db: DbOpt = DEFAULT_DB,
    redact: RedactOpt = False,
) -> None:
    """Store one feedback record; prints its id."""
    from labelmatch.feedback.feedback_store import FeedbackRecord

    record = FeedbackRecord(
        text, model_version, _names(predicted) or [], score, {}, _names(corrected), source, record_id
    )
    typer.echo(_store(db, redact).add(record))


@feedback_app.command("import")
def import_(
    file: Annotated[Path, typer.Argument(help="JSON-lines file, one feedback record per line.")],
    db: DbOpt = DEFAULT_DB,
    redact: RedactOpt = False,
) -> None:
    """Import feedback: good lines are stored, bad lines are listed (exit status 1 when any failed)."""
    report = _store(db, redact).import_file(file)
    for failure in report.failed:
        typer.echo(f"{file}:{failure}", err=True)
    typer.echo(report.summary())
    if not report.ok:
        raise typer.Exit(1)


@feedback_app.command("export")
def export(
    out: Annotated[
        Path, typer.Option("--out", help="FeedbackExport artifact directory (replaced atomically).")
    ],
    current_version: Annotated[
        str | None,
        typer.Option(
            "--current-version", help="The model version GRPO starts from; other versions are 'previous'."
        ),
    ] = None,
    previous: Annotated[
        str, typer.Option("--previous", help="Feedback on previous versions: keep, reweight or filter.")
    ] = "keep",
    previous_weight: Annotated[
        float, typer.Option(help="Weight of previous-version feedback with reweight.")
    ] = 0.5,
    db: DbOpt = DEFAULT_DB,
) -> None:
    """Export the store as a FeedbackExport artifact (feedback.jsonl + labels.json + manifest)."""
    _store(db).export(out, current_version, previous, previous_weight)  # type: ignore[arg-type]
    manifest = json.loads((out / "manifest.json").read_text())
    typer.echo(f"exported {manifest['summary']['records']} record(s) to {out}")


@feedback_app.command("stats")
def stats(db: DbOpt = DEFAULT_DB) -> None:
    """Print counts of the store as JSON."""
    typer.echo(json.dumps(_store(db).stats(), indent=2))
