"""Thresholds for labels a model was not trained on (``labelmatch calibrate``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from labelmatch.data.dataset import Dataset, Document, load_dataset
from labelmatch.evaluation.calibration import calibrate_thresholds
from labelmatch.model.classifier import Classifier
from labelmatch.model.matching import Thresholds
from labelmatch.sample_data import sample_path


def _renamed(names: list[str]) -> tuple[dict[str, str], list[Document]]:
    """Labels the model never saw by name (``new_<label>``, same descriptions) and their documents."""
    full = load_dataset(sample_path("tax"))
    labels = {f"new_{name}": full.labels[name] for name in names}
    docs = [
        Document(d.id, d.text, [f"new_{label}" for label in d.labels if label in names], split="all")
        for d in full.documents[:80]
    ]
    return labels, docs


def test_calibration_merges_new_label_thresholds_into_the_models(trained_model):
    clf = Classifier.load(trained_model)
    labels, docs = _renamed(["tax_problem", "tax_solution", "vat"])
    before = Thresholds.from_json(clf.thresholds.to_json())
    assert not set(labels) & set(before.labels)

    result = calibrate_thresholds(clf, Dataset(docs, labels))

    assert set(labels) <= set(result.thresholds.labels)
    assert {k: result.thresholds.labels[k] for k in before.labels} == before.labels
    assert result.thresholds.default == before.default
    assert result.documents == 80
    assert result.positives == {name: sum(name in d.labels for d in docs) for name in labels}
    replaced = calibrate_thresholds(clf, Dataset(docs, labels), replace_default=True)
    assert replaced.thresholds.default == pytest.approx(replaced.global_threshold)


def test_calibration_repairs_a_default_that_does_not_fit_new_labels(trained_model):
    """A default far above every score predicts nothing; calibrated thresholds recover the labels."""
    clf = Classifier.load(trained_model)
    labels, docs = _renamed(["tax_problem", "tax_solution", "vat", "corporate_income_tax"])
    _, probs = clf.scores([d.text for d in docs], labels, replace=True)
    clf.thresholds = Thresholds(float(probs.max()) + 0.01, dict(clf.thresholds.labels))

    result = calibrate_thresholds(clf, Dataset(docs, labels))

    assert result.macro_f1_before == 0.0
    assert result.macro_f1_after > 0.5
    assert all(result.thresholds.labels[name] < clf.thresholds.default for name in labels)
    predicted = np.array([[p.labels.count(n) for n in labels] for p in _predict(clf, result, docs, labels)])
    assert predicted.sum() > 0


def _predict(clf: Classifier, result, docs: list[Document], labels: dict[str, str]):
    clf.thresholds = result.thresholds
    return clf.predict([d.text for d in docs], labels, replace=True)


def test_cli_writes_a_thresholds_file_the_server_reads(trained_model, tmp_path: Path):
    from labelmatch.cli import app, register_commands

    register_commands()
    labels, docs = _renamed(["tax_problem", "vat"])
    (tmp_path / "labels.json").write_text(json.dumps(labels))
    with open(tmp_path / "docs.jsonl", "w") as f:
        for d in docs:
            f.write(json.dumps({"id": d.id, "text": d.text, "labels": d.labels}) + "\n")
    out = tmp_path / "cm" / "thresholds.json"

    result = CliRunner().invoke(
        app, ["calibrate", "--model", str(trained_model), "--data", str(tmp_path), "--out", str(out)]
    )

    assert result.exit_code == 0, result.output
    printed = result.output[result.output.index('{"global_threshold"') :]  # after any progress bar
    summary = json.loads(printed.splitlines()[0])
    assert summary["documents"] == 80 and summary["labels"] == 2
    written = Thresholds.from_json(json.loads(out.read_text()))
    assert set(labels) <= set(written.labels)


def test_cli_names_the_file_and_line_of_an_unknown_label(trained_model, tmp_path: Path):
    from labelmatch.cli import app, register_commands
    from labelmatch.core.errors import LabelmatchError

    register_commands()
    (tmp_path / "labels.json").write_text(json.dumps({"vat_new": "Value added tax."}))
    (tmp_path / "docs.jsonl").write_text(
        json.dumps({"id": "a", "text": "VAT return", "labels": ["vat_new"]})
        + "\n"
        + json.dumps({"id": "b", "text": "VAT refund", "labels": ["nope"]})
        + "\n"
    )
    out = tmp_path / "thresholds.json"

    result = CliRunner().invoke(
        app, ["calibrate", "--model", str(trained_model), "--data", str(tmp_path), "--out", str(out)]
    )

    assert isinstance(result.exception, LabelmatchError)
    message = str(result.exception)
    assert "docs.jsonl" in message and ":2" in message and "nope" in message
    assert not out.exists()


def test_calibration_of_the_exported_model_as_served(onnx_model):
    """The OnnxModel as served (its shipped engine and thresholds) is calibrated the same way."""
    from labelmatch.evaluation.evaluate import load_as_served

    served = load_as_served(onnx_model[0])
    labels, docs = _renamed(["tax_problem", "vat"])
    kept = dict(served.thresholds.labels)

    result = calibrate_thresholds(served, Dataset(docs, labels))

    assert set(labels) <= set(result.thresholds.labels)
    assert all(0.0 < result.thresholds.labels[name] < 1.0 for name in labels)
    assert {k: result.thresholds.labels[k] for k in kept} == kept


def _write_data(root: Path, labels: dict[str, str], docs: list[Document]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "labels.json").write_text(json.dumps(labels))
    with open(root / "docs.jsonl", "w") as f:
        for d in docs:
            f.write(json.dumps({"id": d.id, "text": d.text, "labels": d.labels}) + "\n")
    return root


def test_labels_without_positives_are_warned_and_do_not_fire_on_every_document(trained_model, tmp_path):
    """No document positive for any label: the search would answer its lowest candidate (0.05) and
    every label would fire on nearly every document. They keep the model's threshold, raised above
    their highest score on these documents (all negatives); stderr names them in one line."""
    from labelmatch.cli import app, register_commands

    register_commands()
    clf = Classifier.load(trained_model)
    labels, docs = _renamed(["tax_problem", "vat"])
    extra = {f"unused_{i:02d}": f"Rules about {topic}." for i, topic in enumerate(
        ["shipping containers", "import duties", "fishing quotas", "airport slots", "radio spectrum",
         "grain subsidies", "mining royalties", "film rebates", "tobacco excise", "water rights"])}
    none = [Document(d.id, d.text, [], split="all") for d in docs]

    result = calibrate_thresholds(clf, Dataset(none, {**labels, **extra}))

    names = list(labels) + list(extra)
    _, probs = clf.scores([d.text for d in none], {**labels, **extra}, replace=True)
    thresholds = result.thresholds.for_labels(names)
    assert np.all(thresholds > probs.max(0)) and np.all(thresholds >= clf.thresholds.default)
    assert result.global_threshold == clf.thresholds.default
    assert sorted(result.without_positives) == sorted(names)

    out = tmp_path / "thresholds.json"
    data = _write_data(tmp_path / "data", {**labels, **extra}, none)
    cli = CliRunner().invoke(app, ["calibrate", "--model", str(trained_model), "--data", str(data), "--out",
                                   str(out)])
    assert cli.exit_code == 0, cli.output
    warnings = [line for line in cli.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and warnings[0].startswith(
        "warning: 12 of 12 labels have no positive document, so their thresholds are not tuned: "
        "'new_tax_problem', 'new_vat', 'unused_00', 'unused_01', 'unused_02' and 7 more")
    assert "warning" not in cli.stdout
    written = Thresholds.from_json(json.loads(out.read_text()))
    assert all(written.labels[name] > 0.05 for name in names)


def test_a_label_without_positives_beside_tuned_ones_fires_on_none_of_its_negatives(trained_model):
    clf = Classifier.load(trained_model)
    labels, docs = _renamed(["tax_problem", "tax_solution", "vat"])
    labels["new_customs"] = "Customs duties and tariffs on imported goods."

    result = calibrate_thresholds(clf, Dataset(docs, labels))

    assert result.without_positives == ["new_customs"]
    assert "1 of 4 labels have no positive document" in result.warning()
    assert "the label set's global threshold" in result.warning()
    _, probs = clf.scores([d.text for d in docs], labels, replace=True)
    assert result.thresholds.labels["new_customs"] >= result.global_threshold
    assert result.thresholds.labels["new_customs"] > probs[:, list(labels).index("new_customs")].max()


@pytest.mark.parametrize(("text", "line", "field", "message"), [
    ('{\n  "default": 0.5,\n  "labels": {\n    "vat": "0.7"\n  }\n}\n', 4, "labels.vat",
     "expected a number, got a string '0.7'"),
    ('{\n  "default": true\n}\n', 2, "default", "expected a number, got a boolean true"),
    ('{\n  "default": 0.5,\n  "labels": {"vat": 1.5}\n}\n', 3, "labels.vat", "a threshold in [0, 1]"),
    ('{\n  "defualt": 0.5\n}\n', 2, "defualt", "unknown setting"),
    ('{"default": null}', 1, "default", "expected a number, got null"),
    ('{"labels": ["vat"]}', 1, "labels", "expected a mapping of numbers, got an array"),
])
def test_thresholds_file_fields_are_type_checked(tmp_path, text, line, field, message):
    """thresholds.json (calibrate's output, serve --thresholds): every value a number in [0, 1];
    a bad one is named with its line, and serve refuses the file before the server starts."""
    import subprocess
    import sys

    from labelmatch.core.errors import DataError

    path = tmp_path / "thresholds.json"
    path.write_text(text)
    with pytest.raises(DataError) as info:
        Thresholds.from_file(path)
    err = info.value
    assert (err.path, err.line, err.field) == (str(path), line, field) and message in str(err)
    if field == "labels.vat" and line == 4:  # the CLI's answer, once: exit 2, one line
        done = subprocess.run([sys.executable, "-m", "labelmatch", "serve", "--model", str(tmp_path / "m"),
                               "--thresholds", str(path)], capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and done.stderr.strip().splitlines() == [f"error: {err}"]
