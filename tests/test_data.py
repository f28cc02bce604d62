"""Loading, validation and splitting of both input formats, and the broken-input corpus."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from labelmatch.core.errors import DataError
from labelmatch.data.dataset import Dataset, Document, assign_splits, load_dataset, load_labels, load_pairs

LABELS = {
    "vat": "Value added tax on goods and services.",
    "transfer_pricing": "Prices between related companies.",
}


def write_docs(tmp_path: Path, lines: list, labels: dict | None = None) -> Path:
    """Write docs.jsonl (+ labels.json) under tmp_path; lines may be dicts, str or bytes."""
    raw = b"".join(
        (line if isinstance(line, bytes) else (line if isinstance(line, str) else json.dumps(line)).encode())
        + b"\n"
        for line in lines
    )
    (tmp_path / "docs.jsonl").write_bytes(raw)
    (tmp_path / "labels.json").write_text(json.dumps(LABELS if labels is None else labels))
    return tmp_path


def test_load_normalised_format(tmp_path):
    write_docs(
        tmp_path,
        [
            {"id": "a", "text": "VAT on imports", "labels": ["vat"], "split": "train"},
            {"id": 7, "text": "Intercompany pricing", "labels": ["transfer_pricing"], "soft": {"vat": 0.2}},
        ],
    )
    ds = load_dataset(tmp_path)
    assert [d.id for d in ds.documents] == ["a", "7"]
    assert ds.documents[1].soft == {"vat": 0.2}
    assert ds.label_matrix().tolist() == [[1.0, 0.0], [0.0, 1.0]]
    values, mask = ds.soft_matrix()
    assert mask.tolist() == [[0, 0], [1, 0]] and values[1, 0] == pytest.approx(0.2)


def test_load_pair_format_groups_documents_and_soft_scores(tmp_path):
    pairs = [
        {
            "doc_id": "d1",
            "doc_text": "VAT refund",
            "label_name": "vat",
            "label_text": "VAT.",
            "target": 1,
            "soft_score": 0.9,
            "pii_flag": False,
        },
        {
            "doc_id": "d1",
            "doc_text": "VAT refund",
            "label_name": "tp",
            "label_text": "Transfer pricing.",
            "target": 0,
            "soft_score": 0.1,
        },
        {
            "doc_id": "d2",
            "doc_text": "Arm's length",
            "label_name": "tp",
            "label_text": "Transfer pricing.",
            "target": 1,
            "soft_score": 0.8,
        },
    ]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(p) for p in pairs) + "\n")
    ds = load_dataset(path)
    assert ds.labels == {"vat": "VAT.", "tp": "Transfer pricing."}
    d1, d2 = ds.documents
    assert d1.labels == ["vat"] and d1.soft == {"vat": 0.9, "tp": 0.1} and d1.meta == {"pii_flag": False}
    assert d2.labels == ["tp"]


def test_assign_splits_is_seeded_and_proportional(sample_dir):
    a = assign_splits(load_dataset(sample_dir), 0.15, 0.15, seed=3)
    b = assign_splits(load_dataset(sample_dir), 0.15, 0.15, seed=3)
    assert [d.split for d in a.documents] == [d.split for d in b.documents]
    n = len(a.documents)
    counts = {s: len(a.split(s).documents) for s in ("train", "val", "test")}
    for split in ("val", "test"):  # a binomial share: within 4 standard deviations
        assert abs(counts[split] - 0.15 * n) < 4 * (n * 0.15 * 0.85) ** 0.5, counts
    c = assign_splits(load_dataset(sample_dir), 0.15, 0.15, seed=4)
    assert [d.split for d in a.documents] != [d.split for d in c.documents], "the seed salts the hash"


def test_adding_documents_never_moves_an_existing_one(sample_dir):
    """A document keeps its split as the data grows (and shrinks): it depends on its id alone."""
    full = load_dataset(sample_dir)
    before = assign_splits(Dataset([d for d in full.documents[:150]], full.labels), 0.15, 0.15, seed=0)
    grown = load_dataset(sample_dir)
    extra = [Document(f"new-{i}", f"new text {i}", ["vat"]) for i in range(200)]
    after = assign_splits(Dataset(grown.documents + extra, grown.labels), 0.15, 0.15, seed=0)
    split_after = {d.id: d.split for d in after.documents}
    assert all(split_after[d.id] == d.split for d in before.documents)
    assert {d.split for d in after.documents[-200:]} == {"train", "val", "test"}


def test_existing_test_split_kept_and_val_carved_from_train(tmp_path):
    docs = [
        {"id": str(i), "text": f"doc {i}", "labels": ["vat"], "split": "test" if i < 5 else "train"}
        for i in range(25)
    ]
    docs += [{"id": f"u{i}", "text": f"unsplit {i}", "labels": ["vat"]} for i in range(100)]
    ds = assign_splits(load_dataset(write_docs(tmp_path, docs)), 0.2, 0.5, seed=0)
    assert {d.id for d in ds.split("test").documents} == {str(i) for i in range(5)}  # the data's own
    val = ds.split("val").documents
    assert 0 < len(val) < 0.2 * 120 + 4 * (120 * 0.2 * 0.8) ** 0.5
    assert all(d.id.startswith("u") or int(d.id) >= 5 for d in val)


BROKEN = [
    (
        "invalid_json",
        ['{"id": "a", "text": "x", "labels": []}', '{"id": "b", "text": '],
        2,
        None,
        "invalid JSON",
    ),
    ("missing_text", [{"id": "a", "labels": []}], 1, "text", "missing"),
    ("empty_text", [{"id": "a", "text": "   ", "labels": []}], 1, "text", "is empty"),
    (
        "unknown_label",
        [{"id": "a", "text": "x", "labels": ["customs"]}],
        1,
        "labels",
        "unknown label 'customs'",
    ),
    ("duplicate_id", [{"id": "a", "text": "x"}, {"id": "a", "text": "y"}], 2, "id", "duplicate id 'a'"),
    ("wrong_type_labels", [{"id": "a", "text": "x", "labels": "vat"}], 1, "labels", "expected a list"),
    ("wrong_type_text", [{"id": "a", "text": 42}], 1, "text", "expected a string"),
    ("huge_document", [{"id": "a", "text": "x" * 10_000_000}], 1, "text", "over the limit"),
    ("non_utf8", [{"id": "a", "text": "ok"}, b'{"id": "b", "text": "caf\xe9"}'], 2, None, "not valid UTF-8"),
    ("not_an_object", ['["a", "b"]'], 1, None, "expected a JSON object"),
    ("too_deep", [{"id": "a", "text": "x"}, "[" * 100_000 + "]" * 100_000], 2, None, "nested too deeply"),
    ("nan", ['{"id": "a", "text": "x", "soft": {"vat": NaN}}'], 1, None, "NaN is not a JSON value"),
    ("key_twice", ['{"id": "a", "text": "x", "text": "y"}'], 1, "text", "given twice"),
    ("lone_surrogate", ['{"id": "a", "text": "\\ud800 half a character"}'], 1, None, "unpaired surrogate"),
    ("id_object", [{"id": {"n": 1}, "text": "x"}], 1, "id", "expected a string, got an object"),
]


@pytest.mark.parametrize(("name", "lines", "line", "field", "message"), BROKEN, ids=[b[0] for b in BROKEN])
def test_broken_inputs_name_file_line_and_field(tmp_path, name, lines, line, field, message):
    write_docs(tmp_path, lines)
    with pytest.raises(DataError) as info:
        load_dataset(tmp_path)
    err = info.value
    assert err.path.endswith("docs.jsonl") and err.line == line and err.field == field
    assert message in str(err) and "\n" not in str(err)


def test_empty_file(tmp_path):
    (tmp_path / "docs.jsonl").write_bytes(b"")
    (tmp_path / "labels.json").write_text(json.dumps(LABELS))
    with pytest.raises(DataError, match=r"docs.jsonl: file is empty"):
        load_dataset(tmp_path)


def test_label_without_description(tmp_path):
    write_docs(tmp_path, [{"id": "a", "text": "x"}], labels={"vat": "VAT.", "customs": ""})
    with pytest.raises(DataError, match=r"labels.json: field 'customs': label has no description"):
        load_dataset(tmp_path)


def test_pair_soft_score_out_of_range(tmp_path):
    path = tmp_path / "pairs.jsonl"
    good = {
        "doc_id": "d1",
        "doc_text": "t",
        "label_name": "vat",
        "label_text": "VAT.",
        "target": 1,
        "soft_score": 0.5,
    }
    path.write_text(
        json.dumps(good) + "\n" + json.dumps({**good, "label_name": "tp", "soft_score": 1.7}) + "\n"
    )
    with pytest.raises(DataError) as info:
        load_dataset(path)
    assert info.value.line == 2 and info.value.field == "soft_score" and "outside [0, 1]" in str(info.value)


def test_cli_bad_input_one_line_error_and_nothing_written(tmp_path):
    (tmp_path / "data").mkdir()
    data = write_docs(tmp_path / "data", [{"id": "a", "text": "x", "labels": ["nope"]}])
    out = tmp_path / "model"
    result = subprocess.run(
        [sys.executable, "-m", "labelmatch.cli", "train", "--data", str(data), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert error_lines == [
        f"error: {data / 'docs.jsonl'}:1: field 'labels': unknown label 'nope' (not in labels.json)"
    ]
    assert not out.exists() and list(tmp_path.iterdir()) == [tmp_path / "data"]


def test_dataset_counts(tiny_dataset: Dataset):
    counts = tiny_dataset.counts()
    assert counts["documents"] == 120 and sum(counts["splits"].values()) == 120


def test_a_label_given_twice_in_labels_json_is_refused(tmp_path):
    path = tmp_path / "labels.json"
    path.write_text('{"vat": "Value added tax.", "tp": "Transfer pricing.", "vat": "VAT again."}')
    with pytest.raises(DataError, match=r"labels.json: field 'vat': label given twice"):
        load_labels(path)


def _pairs(tmp_path, rows):
    path = tmp_path / "pairs.jsonl"
    base = {"doc_text": "text", "target": 1, "soft_score": None}
    path.write_text("\n".join(json.dumps({**base, **row}) for row in rows) + "\n")
    return path


def test_pair_file_with_two_descriptions_for_one_label_is_refused(tmp_path):
    path = _pairs(tmp_path, [
        {"doc_id": "1", "label_name": "vat", "label_text": "Value added tax."},
        {"doc_id": "2", "label_name": "vat", "label_text": "Sales tax on goods."},
    ])
    expected = r"pairs.jsonl:2: field 'label_text': label 'vat' has a different description"
    with pytest.raises(DataError, match=expected):
        load_pairs(path)


def test_labels_json_beside_a_pair_file_wins_with_a_warning(tmp_path, caplog):
    path = _pairs(tmp_path, [
        {"doc_id": "1", "label_name": "vat", "label_text": "Old wording.", "split": "dev"},
        {"doc_id": "2", "label_name": "vat", "label_text": "Value added tax."},
    ])
    with caplog.at_level("WARNING", logger="labelmatch.data.dataset"):
        dataset = load_pairs(path, {"vat": "Value added tax."})
    assert dataset.labels == {"vat": "Value added tax."}
    assert dataset.documents[0].split == "val", "'dev' means val"
    assert [r.getMessage() for r in caplog.records] == [
        f"{path}:1: label 'vat': the labels.json description replaces the pairs' label_text"]
    bad = _pairs(tmp_path, [{"doc_id": "1", "label_name": "vat", "label_text": "x", "split": "holdout"}])
    with pytest.raises(DataError, match=r"pairs.jsonl:1: field 'split': unknown split 'holdout'"):
        load_pairs(bad)


def test_training_warns_about_a_label_without_training_positives(caplog):
    from conftest import make_tiny_dataset, tiny_config

    from labelmatch.training.sft import SFTTrainer

    dataset = make_tiny_dataset()
    dataset.labels["customs"] = "Import duties and customs procedures."
    with caplog.at_level("WARNING", logger="labelmatch.training.sft"):
        SFTTrainer(dataset, tiny_config())
    assert "label 'customs' has no positive training document (none in validation either)" in caplog.text
    assert len(caplog.records) == 1


def test_records_end_at_newline_only_and_a_bom_is_skipped(tmp_path):
    """JSON Lines: U+2028, U+2029, U+0085 and a lone \\r inside a text are text, not line ends;
    a UTF-8 byte-order mark and Windows line ends are accepted; line numbers stay the file's."""
    texts = ["one\u2028two", "three\u2029four", "five\x85six", "seven\rcarriage"]
    lines = [json.dumps({"id": str(i), "text": t}, ensure_ascii=False) for i, t in enumerate(texts)]
    raw = "\ufeff" + "\r\n".join(lines) + "\r\n"
    (tmp_path / "docs.jsonl").write_bytes(raw.encode())
    (tmp_path / "labels.json").write_text(json.dumps(LABELS))
    assert [d.text for d in load_dataset(tmp_path).documents] == texts
    (tmp_path / "docs.jsonl").write_bytes(("\n".join(lines) + "\n{\"id\": \"x\"}\n").encode())
    with pytest.raises(DataError) as info:
        load_dataset(tmp_path)
    assert info.value.line == 5 and info.value.field == "text"


@pytest.mark.parametrize("name", ["docs.jsonl", "labels.json", "hierarchy.json", "pairs.jsonl"])
def test_a_compressed_input_is_named_compressed_not_bad_utf8(tmp_path, name):
    import gzip

    write_docs(tmp_path, [{"id": "a", "text": "VAT return", "labels": ["vat"]}])
    (tmp_path / "hierarchy.json").write_text(json.dumps({"vat": ["transfer_pricing"]}))
    target = tmp_path / name
    if name == "pairs.jsonl":
        pair = {"doc_id": "a", "doc_text": "x", "label_name": "vat", "label_text": "VAT.", "target": 1}
        target.write_text(json.dumps(pair) + "\n")
    target.write_bytes(gzip.compress(target.read_bytes()))
    with pytest.raises(DataError) as info:
        load_dataset(target if name == "pairs.jsonl" else tmp_path)
    assert info.value.path == str(target) and "gzip-compressed" in str(info.value)
    assert "decompress it first" in str(info.value) and "UTF-8 (byte" not in str(info.value)


def test_a_hierarchy_that_is_not_utf8_is_named_with_its_line(tmp_path):
    write_docs(tmp_path, [{"id": "a", "text": "VAT return", "labels": ["vat"]}])
    (tmp_path / "hierarchy.json").write_bytes(b'{\n  "vat": ["transfer_pric\xe9ng"]\n}\n')
    with pytest.raises(DataError, match=r"hierarchy.json:2: not valid UTF-8 \(byte 24: 0xe9\)"):
        load_dataset(tmp_path)


def test_no_validation_split_names_the_file_and_the_flag(tmp_path):
    """Two documents rarely hash into val: the error names docs.jsonl and --val-fraction (the CLI
    prints it in one line with exit 2)."""
    from typer.testing import CliRunner

    from labelmatch.cli import app, register_commands

    register_commands()
    data = write_docs(tmp_path, [{"id": "a", "text": "VAT return", "labels": ["vat"]},
                                 {"id": "b", "text": "Transfer prices", "labels": ["transfer_pricing"]}])
    result = CliRunner().invoke(app, ["train", "--data", str(data), "--out", str(tmp_path / "model"),
                                      "--val-fraction", "0.0"])
    assert isinstance(result.exception, DataError), result.output
    message = str(result.exception)
    assert message.startswith(f"{data / 'docs.jsonl'}: no document is in the 'val' split")
    assert "--val-fraction" in message and '"split": "val"' in message and "\n" not in message
    assert not (tmp_path / "model").exists()
