"""The feedback store: validation, import policy, previous versions, export, migrations, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from typer.testing import CliRunner

from labelmatch.core.artifacts import verify_artifact
from labelmatch.core.errors import ConfigError, DataError
from labelmatch.feedback.feedback_store import SCHEMA_VERSION, FeedbackRecord, FeedbackStore, read_export

LABELS = {
    "vat": "Value added tax.",
    "transfer_pricing": "Intercompany pricing.",
    "tax_problem": "A tax problem.",
}


@pytest.fixture
def store(tmp_path) -> FeedbackStore:
    store = FeedbackStore(f"sqlite:///{tmp_path / 'feedback.db'}")
    store.register_model("v1", LABELS)
    return store


def record(**changes) -> FeedbackRecord:
    values = dict(
        text="VAT refund is late",
        model_version="v1",
        predicted_labels=["vat"],
        score=4,
        scores={"vat": 0.9, "tax_problem": 0.4},
    )
    values.update(changes)
    return FeedbackRecord(**values)


def test_add_round_trips_and_fills_id_and_time(store):
    record_id = store.add(record(corrected_labels=["vat", "tax_problem"], source="serve"))
    (stored,) = store.records()
    assert stored.id == record_id and len(record_id) == 32
    assert stored.time.endswith("Z")
    assert stored.corrected_labels == ["vat", "tax_problem"]
    assert stored.scores == {"vat": 0.9, "tax_problem": 0.4}
    assert stored.source == "serve"


@pytest.mark.parametrize(
    ("changes", "field", "message"),
    [
        ({"score": 0}, "score", "outside 1-5"),
        ({"score": 6}, "score", "outside 1-5"),
        ({"text": "   "}, "text", "empty"),
        ({"model_version": "v0"}, "model_version", "unknown model version 'v0'"),
        ({"predicted_labels": ["customs"]}, "predicted_labels", "unknown label 'customs'"),
        ({"corrected_labels": ["customs"]}, "corrected_labels", "unknown label 'customs'"),
        ({"scores": {"customs": 0.2}}, "scores", "unknown label 'customs'"),
    ],
)
def test_add_rejects_bad_feedback_naming_the_field(store, changes, field, message):
    with pytest.raises(DataError) as info:
        store.add(record(**changes))
    assert info.value.field == field and message in str(info.value)
    assert store.records() == []


def test_duplicate_id_is_rejected(store):
    store.add(record(id="fb-1"))
    with pytest.raises(DataError, match="duplicate id 'fb-1'"):
        store.add(record(id="fb-1", score=2))
    assert [r.score for r in store.records()] == [4]


def test_open_store_accepts_any_version_until_one_is_registered(tmp_path):
    store = FeedbackStore(f"sqlite:///{tmp_path / 'open.db'}")
    store.add(record(model_version="anything", predicted_labels=["whatever"]))
    store.register_model("v1", LABELS)
    with pytest.raises(DataError, match="unknown model version"):
        store.add(record(model_version="anything"))


def test_import_stores_good_lines_and_reports_bad_ones(store, tmp_path):
    good = record(id="a").to_json()
    lines = [
        json.dumps(good),
        json.dumps({**good, "id": "b", "score": 7}),
        "{not json",
        json.dumps({**good, "id": "c", "predicted_labels": ["customs"]}),
        "",
        json.dumps({**good, "id": "d", "model_version": "v9"}),
        json.dumps({**good, "id": "e", "text": ""}),
        json.dumps({**good, "id": "a"}),  # duplicate within the file
        json.dumps({**good, "id": "f", "corrected_labels": ["vat"]}),
        json.dumps({k: v for k, v in good.items() if k != "score"} | {"id": "g"}),
        json.dumps({**good, "id": "h", "score": 3.5}),
    ]
    path = tmp_path / "feedback.jsonl"
    path.write_text("\n".join(lines) + "\n")
    report = store.import_file(path)
    assert report.stored == ["a", "f"]
    assert [(e.line, e.field) for e in report.failed] == [
        (2, "score"),
        (3, None),
        (4, "predicted_labels"),
        (6, "model_version"),
        (7, "text"),
        (8, "id"),
        (10, "score"),
        (11, "score"),
    ]
    assert "missing" in str(report.failed[6]) and "line 10" in str(report.failed[6])
    assert sorted(r.id for r in store.records()) == ["a", "f"]
    assert not report.ok and "stored 2" in report.summary()


def test_import_of_the_bundled_sample_feedback(tmp_path, sample_dir):
    store = FeedbackStore(f"sqlite:///{tmp_path / 'f.db'}")
    store.register_model("sample", json.loads((sample_dir / "labels.json").read_text()))
    report = store.import_file(sample_dir / "feedback.jsonl")
    assert report.ok and len(report.stored) == 60
    stats = store.stats()
    assert stats["records"] == 60 and sum(stats["scores"].values()) == 60
    assert stats["with_corrections"] == sum(r.corrected_labels is not None for r in store.records())


def test_import_refuses_missing_or_empty_file(store, tmp_path):
    with pytest.raises(DataError, match="file not found"):
        store.import_file(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="empty"):
        store.import_file(tmp_path / "empty.jsonl")


def test_redaction_with_labelmatch_pii_and_with_an_injected_redactor(tmp_path):
    store = FeedbackStore(f"sqlite:///{tmp_path / 'r.db'}", redact=True)
    store.add(record(text="Please mail jane.doe@example.com about the VAT refund"))
    (stored,) = store.records()
    assert "jane.doe@example.com" not in stored.text and stored.pii_types == ["EMAIL"]
    upper = FeedbackStore(f"sqlite:///{tmp_path / 'u.db'}", redact=lambda t: (t.upper(), ["X"]))
    upper.add(record(text="abc"))
    assert upper.records()[0].text == "ABC"
    assert upper.stats()["with_pii"] == 1


@pytest.mark.parametrize(
    ("previous", "expected"),
    [("keep", {"old": 1.0, "new": 1.0}), ("reweight", {"old": 0.25, "new": 1.0}), ("filter", {"new": 1.0})],
)
def test_export_handles_previous_model_versions(store, tmp_path, previous, expected):
    store.register_model("v2", LABELS)
    store.add(record(id="old", model_version="v1"))
    store.add(record(id="new", model_version="v2"))
    out = store.export(tmp_path / "export", current_version="v2", previous=previous, previous_weight=0.25)
    manifest = verify_artifact(out, "FeedbackExport")
    exported = read_export(out)
    assert {r.id: w for r, w in zip(exported.records, exported.weights, strict=True)} == expected
    assert exported.labels == LABELS
    assert manifest["summary"]["previous"] == previous
    assert manifest["summary"]["records"] == len(expected)


def test_export_validates_its_options(store, tmp_path):
    with pytest.raises(ConfigError, match="keep, reweight or filter"):
        store.export(tmp_path / "x", previous="drop")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="previous_weight"):
        store.export(tmp_path / "x", previous="reweight", previous_weight=0.0)


def test_migrations_are_applied_once_and_a_newer_schema_is_refused(tmp_path):
    url = f"sqlite:///{tmp_path / 'm.db'}"
    store = FeedbackStore(url)
    assert store.schema_version() == SCHEMA_VERSION
    store.add(record(model_version="x"))
    assert FeedbackStore(url).stats()["records"] == 1  # reopening keeps the data
    with create_engine(url).begin() as conn:
        conn.execute(text("UPDATE schema_version SET version = 99"))
    with pytest.raises(ConfigError, match="schema version 99 is newer"):
        FeedbackStore(url)


def test_cli_import_export_stats(tmp_path, sample_dir):
    from labelmatch.cli import app, register_commands

    register_commands()
    runner = CliRunner()
    db = f"sqlite:///{tmp_path / 'cli.db'}"
    result = runner.invoke(
        app,
        [
            "feedback",
            "register",
            "--version",
            "sample",
            "--labels",
            str(sample_dir / "labels.json"),
            "--db",
            db,
        ],
    )
    assert result.exit_code == 0, result.output
    bad = tmp_path / "bad.jsonl"
    lines = (sample_dir / "feedback.jsonl").read_text().splitlines()[:3]
    bad.write_text("\n".join([*lines, json.dumps({**json.loads(lines[0]), "id": "x", "score": 9})]) + "\n")
    result = runner.invoke(app, ["feedback", "import", str(bad), "--db", db])
    assert result.exit_code == 1
    assert "line 4: field 'score': score 9 is outside 1-5" in result.output
    assert "stored 3 record(s), refused 1 line(s)" in result.output
    result = runner.invoke(
        app,
        [
            "feedback",
            "add",
            "--text",
            "VAT question",
            "--model-version",
            "sample",
            "--score",
            "5",
            "--predicted",
            "vat",
            "--db",
            db,
        ],
    )
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["feedback", "stats", "--db", db])
    assert json.loads(result.output)["records"] == 4
    out = tmp_path / "export"
    result = runner.invoke(
        app, ["feedback", "export", "--out", str(out), "--current-version", "sample", "--db", db]
    )
    assert result.exit_code == 0 and len(read_export(Path(out)).records) == 4


def test_feedback_on_a_prediction_is_kept_once_per_principal(tmp_path):
    """A repeat by the same principal updates its record; another principal adds one; the
    principal and the prediction id are stored and exported."""
    from labelmatch.feedback.feedback_store import FeedbackRecord, FeedbackStore, read_export

    store = FeedbackStore(f"sqlite:///{tmp_path / 'f.db'}")
    first = FeedbackRecord("VAT refund late", "v1", ["vat"], 2, principal="alice", prediction_id="p1")
    id1, created = store.upsert(first)
    assert created
    again, created = store.upsert(FeedbackRecord("VAT refund late", "v1", ["vat"], 5, principal="alice",
                                                 prediction_id="p1", corrected_labels=["vat"]))
    assert (again, created) == (id1, False)
    _, created = store.upsert(FeedbackRecord("VAT refund late", "v1", ["vat"], 1, principal="bob",
                                             prediction_id="p1"))
    assert created
    records = {r.principal: r for r in store.records()}
    assert len(records) == 2 and records["alice"].score == 5 and records["alice"].corrected_labels == ["vat"]
    assert records["bob"].prediction_id == "p1"
    exported = read_export(store.export(tmp_path / "export"))
    assert sorted(r.principal for r in exported.records) == ["alice", "bob"]


def test_feedback_files_follow_json_lines_not_python_line_splitting(tmp_path):
    """U+2028/U+2029/U+0085 in a text are text (an export read back keeps the record whole), a BOM
    is skipped, and a compressed file is named as such."""
    import gzip
    import json

    from labelmatch.core.errors import DataError
    from labelmatch.feedback.feedback_store import FeedbackRecord, FeedbackStore, read_export

    store = FeedbackStore(f"sqlite:///{tmp_path / 'f.db'}")
    text = "line one\u2028line two\u2029three\u0085four"
    store.add(FeedbackRecord(text, "v1", ["vat"], 4))
    [record] = read_export(store.export(tmp_path / "export")).records
    assert record.text == text
    row = {"text": text, "model_version": "v1", "predicted_labels": ["vat"], "score": 5}
    lines = "\ufeff" + json.dumps(row)
    (tmp_path / "in.jsonl").write_text(lines + "\n", encoding="utf-8")
    report = FeedbackStore(f"sqlite:///{tmp_path / 'g.db'}").import_file(tmp_path / "in.jsonl")
    assert report.ok and len(report.stored) == 1
    (tmp_path / "in.jsonl.gz").write_bytes(gzip.compress(lines.encode()))
    with pytest.raises(DataError, match="gzip"):
        FeedbackStore(f"sqlite:///{tmp_path / 'h.db'}").import_file(tmp_path / "in.jsonl.gz")
