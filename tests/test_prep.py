"""data_prep: both input formats, normalisation, de-duplication, redaction, split, artifacts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from labelmatch.core.artifacts import read_manifest, verify_artifact
from labelmatch.core.errors import ConfigError, DataError
from labelmatch.data.dataset import load_dataset
from labelmatch.data.prepare import PrepConfig, deduplicate, normalise_text, prepare_dataset

LABELS = {"vat": "Value added tax on goods and services.", "pii_bearing": "Contains personal data."}


def _write(tmp_path: Path, rows: list[dict], name: str = "docs.jsonl") -> Path:
    (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path / name


def _docs(n: int) -> list[dict]:
    return [
        {"id": f"d{i}", "text": f"VAT invoice number {i} was late.", "labels": ["vat"] if i % 2 else []}
        for i in range(n)
    ]


def test_sample_data_becomes_a_verified_split_dataset(sample_dir: Path, tmp_path: Path) -> None:
    summary = prepare_dataset(sample_dir, tmp_path / "ds", tmp_path / "report")
    manifest = verify_artifact(tmp_path / "ds", "Dataset")
    assert manifest["summary"]["documents"] == summary["documents"] == 320
    assert set(summary["splits"]) == {"train", "val", "test"} and summary["splits"]["test"] > 30
    dataset = load_dataset(tmp_path / "ds")
    assert all(d.split in ("train", "val", "test") for d in dataset.documents)
    text = "\n".join(d.text for d in dataset.documents)
    assert "@example." not in text and "<EMAIL>" in text
    assert summary["pii"]["documents"] >= 55 and summary["pii"]["entities"]["EMAIL"] >= 30
    assert verify_artifact(tmp_path / "report", "Report")
    report = (tmp_path / "report" / "report.md").read_text()
    assert "label_counts.png" in report and (tmp_path / "report" / "label_counts.png").stat().st_size > 1000


def test_duplicates_are_merged_with_the_union_of_labels(tmp_path: Path) -> None:
    rows = [
        *_docs(20),
        {"id": "dup-exact", "text": "VAT invoice number 1 was late.", "labels": ["vat"]},
        {"id": "dup-near", "text": "  vat INVOICE number 3\n was   late. ", "labels": ["pii_bearing"]},
    ]
    (tmp_path / "labels.json").write_text(json.dumps(LABELS))
    summary = prepare_dataset(
        _write(tmp_path, rows), tmp_path / "ds", tmp_path / "rep", config=PrepConfig(redact_pii=False)
    )
    assert summary["duplicates"] == {"exact": 1, "near": 1, "label_conflicts": 1}
    docs = {d.id: d for d in load_dataset(tmp_path / "ds").documents}
    assert "dup-exact" not in docs and "dup-near" not in docs
    assert docs["d3"].labels == ["vat", "pii_bearing"]


def test_pair_format_is_accepted(tmp_path: Path) -> None:
    rows = []
    for i in range(20):
        text = f"Call me on +44 7700 900{i:03d} about the VAT refund {i}."
        rows.append(
            {
                "doc_id": f"p{i}",
                "doc_text": text,
                "label_name": "vat",
                "label_text": LABELS["vat"],
                "target": 1,
                "soft_score": 0.9,
            }
        )
        rows.append(
            {
                "doc_id": f"p{i}",
                "doc_text": text,
                "label_name": "pii_bearing",
                "label_text": LABELS["pii_bearing"],
                "target": i % 2,
                "soft_score": None,
            }
        )
    summary = prepare_dataset(_write(tmp_path, rows, "pairs.jsonl"), tmp_path / "ds", tmp_path / "rep")
    dataset = load_dataset(tmp_path / "ds")
    assert summary["documents"] == 20 and list(dataset.labels) == ["vat", "pii_bearing"]
    assert all("<PHONE>" in d.text for d in dataset.documents)
    assert dataset.documents[0].soft == {"vat": 0.9}
    assert summary["pii"]["entities"] == {"PHONE": 20}


def test_bad_input_names_file_line_and_field(tmp_path: Path) -> None:
    (tmp_path / "labels.json").write_text(json.dumps(LABELS))
    rows = _docs(3)
    rows[1]["labels"] = ["customs"]
    path = _write(tmp_path, rows)
    with pytest.raises(DataError, match=r"docs\.jsonl:2: field 'labels': unknown label 'customs'"):
        prepare_dataset(path, tmp_path / "ds", tmp_path / "rep")
    assert not (tmp_path / "ds").exists()
    with pytest.raises(ConfigError, match="val_fraction"):
        PrepConfig(val_fraction=0.7)


def test_normalise_and_deduplicate_helpers() -> None:
    assert normalise_text(" a\u00a0b \n\tc ") == "a b c"
    assert normalise_text("e\u0301") == "\u00e9"
    from labelmatch.data.dataset import Document

    kept, stats = deduplicate(
        [Document("1", "A b", ["x"]), Document("2", "a B", ["x"]), Document("3", "c", [])]
    )
    assert [d.id for d in kept] == ["1", "3"] and stats == {"exact": 0, "near": 1, "label_conflicts": 0}


def test_manifest_records_lineage(sample_dir: Path, tmp_path: Path) -> None:
    prepare_dataset(sample_dir, tmp_path / "ds", tmp_path / "rep", lineage={"run_id": "r1"})
    assert read_manifest(tmp_path / "ds")["lineage"] == {"run_id": "r1"}
