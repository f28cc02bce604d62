"""The real KServe model server (subprocess, 127.0.0.1 only) over a real int8 export."""

from __future__ import annotations

import json
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from model_server import ADMIN_TOKEN, ModelServer, free_port

TOKEN = ADMIN_TOKEN
LIMITS = {"max_docs": 4, "max_chars": 3000, "max_body_bytes": 16384}


def _read_only(root: Path) -> None:
    for path in [root, *root.rglob("*")]:
        path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


@pytest.fixture(scope="module")
def server(onnx_model, tmp_path_factory):
    """``(base URL, model dir, state dir, feedback URL)`` of a running server."""
    root = tmp_path_factory.mktemp("serve")
    model_dir = root / "model"
    shutil.copytree(onnx_model[0], model_dir)
    _read_only(model_dir)  # the server must never write next to a mounted model
    state_dir, feedback_url = root / "state", f"sqlite:///{root / 'feedback.db'}"
    limits = [f"--{k}={v}" for k, v in LIMITS.items()]
    server = ModelServer(model_dir, root / "server.log", "--state_dir", str(state_dir), "--feedback_url",
                         feedback_url, *limits)
    try:
        server.start()
    except RuntimeError as exc:
        pytest.fail(str(exc))
    yield server.base, model_dir, state_dir, feedback_url, server.port
    server.stop()


def _v1(base: str, body, **kwargs) -> requests.Response:
    data = body if isinstance(body, str | bytes) else json.dumps(body)
    return requests.post(f"{base}/v1/models/labelmatch:predict", data=data,
                         headers={"content-type": "application/json"}, timeout=60, **kwargs)


def _v2(base: str, texts: list[str], **parameters) -> requests.Response:
    body = {"inputs": [{"name": "text", "shape": [len(texts)], "datatype": "BYTES", "data": texts}]}
    if parameters:
        body["parameters"] = parameters
    return requests.post(f"{base}/v2/models/labelmatch/infer", json=body, timeout=60)


def test_binds_loopback_only(server):
    port = server[4]
    listening = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            if state == "0A" and int(local.split(":")[1], 16) == port:
                listening.append(local.split(":")[0])
    assert listening == ["0100007F"], listening


def _inference_ms(response: requests.Response) -> float:
    """Model time of one request from its W3C ``Server-Timing`` header (which also names the time
    spent recording the predictions in the shared state)."""
    timing = r"inference;dur=(\d+\.\d{3}), state;dur=(\d+\.\d{3})"
    match = re.fullmatch(timing, response.headers["server-timing"])
    assert match, response.headers["server-timing"]
    return float(match.group(1))


def test_health_and_metadata(server):
    base = server[0]
    assert requests.get(f"{base}/v2/health/live", timeout=10).status_code == 200
    assert requests.get(f"{base}/v2/health/ready", timeout=10).json()["ready"] is True
    assert requests.get(f"{base}/v1/models/labelmatch", timeout=10).json()["ready"] is True
    meta = requests.get(f"{base}/v2/models/labelmatch", timeout=10)
    assert meta.status_code == 200
    body = meta.json()
    assert body["versions"] == [meta.headers["x-model-version"]]
    assert body["inputs"][0] == {"name": "text", "datatype": "BYTES", "shape": [-1]}


def test_v1_predict(server, onnx_model):
    base = server[0]
    labels = json.loads((onnx_model[0] / "labels.json").read_text())
    response = _v1(base, {"instances": [{"text": "VAT refund claim rejected by the tax office", "id": "d1"},
                                        "Transfer pricing documentation for intra-group loans " * 50]})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_version"] == response.headers["x-model-version"]
    assert _inference_ms(response) > 0
    assert body["label_set_version"] == 0
    first, second = body["predictions"]
    assert first["doc_id"] == "d1" and len(first["id"]) == 32
    assert set(first["scores"]) == set(labels)
    assert set(first["labels"]) <= set(labels)
    assert all(0.0 <= p <= 1.0 for p in second["scores"].values())  # long text truncated, not refused


def test_v2_infer_matches_v1(server):
    base = server[0]
    texts = ["Withholding tax on dividends paid to a foreign parent company",
             "Late filing penalty for the corporate income tax return"]
    response = _v2(base, texts)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_version"] == response.headers["x-model-version"]
    assert _inference_ms(response) > 0
    outputs = {o["name"]: o for o in body["outputs"]}
    names = json.loads(body["parameters"]["label_names"])
    assert outputs["scores"]["shape"] == [2, len(names)]
    assert outputs["labels"]["datatype"] == "BYTES" and len(outputs["prediction_ids"]["data"]) == 2
    # The same batch: dynamic int8 scales activations per batch, so scores depend on it.
    v1_scores = _v1(base, {"instances": texts}).json()["predictions"][0]["scores"]
    assert outputs["scores"]["data"][: len(names)] == pytest.approx([v1_scores[n] for n in names], abs=1e-5)


def test_request_label_override(server):
    base = server[0]
    extra = {"customs": "Import duties, tariffs and customs declarations for goods crossing borders."}
    text = "Customs declaration and import duty on goods shipped from China"
    added = _v1(base, {"instances": [text], "labels": extra}).json()["predictions"][0]
    assert "customs" in added["scores"] and len(added["scores"]) > 1
    replaced = _v1(base, {"instances": [text], "labels": extra, "replace_labels": True})
    replaced = replaced.json()["predictions"][0]
    assert list(replaced["scores"]) == ["customs"]
    v2 = _v2(base, [text], labels=json.dumps(extra), replace_labels=True).json()
    assert json.loads(v2["parameters"]["label_names"]) == ["customs"]
    assert v2["outputs"][1]["data"][0] == pytest.approx(replaced["scores"]["customs"], abs=1e-5)


@pytest.mark.parametrize(("body", "status", "message"), [
    ({"instances": ["doc"] * (LIMITS["max_docs"] + 1)}, 413, "the limit is 4 per request"),
    ({"instances": ["x" * (LIMITS["max_chars"] + 1)]}, 413, "document 0 has 3001 characters"),
    ({"instances": ["y" * 2000] * 3 + [{"text": "z" * 14000}]}, 413, "limit is 16384 bytes"),
    ('{"instances": ["unterminated', 400, "not valid JSON"),
    ({"texts": ["doc"]}, 400, '"instances" list'),
    ({"instances": [{"body": "doc"}]}, 400, "instances[0]"),
    ({"instances": []}, 400, "no documents"),
    ({"instances": ["doc"], "labels": {"a": 3}}, 400, "labels must be an object"),
])
def test_v1_limits_and_bad_requests(server, body, status, message):
    response = _v1(server[0], body)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]


def test_v2_bad_requests(server):
    base = server[0]
    bad_json = requests.post(f"{base}/v2/models/labelmatch/infer", data=b"{not json",
                             headers={"content-type": "application/json"}, timeout=30)
    assert bad_json.status_code == 400 and "not valid JSON" in bad_json.json()["error"]
    wrong_type = {"inputs": [{"name": "text", "shape": [1], "datatype": "FP32", "data": [1.0]}]}
    response = requests.post(f"{base}/v2/models/labelmatch/infer", json=wrong_type, timeout=30)
    assert response.status_code == 400 and "expected BYTES" in response.json()["error"]
    too_many = _v2(base, ["doc"] * (LIMITS["max_docs"] + 1))
    assert too_many.status_code == 413


def test_admin_label_update_is_versioned_and_persisted(server):
    base, model_dir, state_dir = server[0], server[1], server[2]
    url = f"{base}/v2/models/labelmatch/labels"
    labels = {"vat": "Value added tax on goods and services.", "payroll": "Payroll and wage taxes."}
    new = {"labels": labels, "thresholds": {"labels": {"payroll": 0.4}}}
    assert requests.put(url, json=new, timeout=30).status_code == 401
    wrong = requests.put(url, json=new, headers={"authorization": "Bearer wrong"}, timeout=30)
    assert wrong.status_code == 401
    response = requests.put(url, json=new, headers={"authorization": f"Bearer {TOKEN}"}, timeout=60)
    assert response.status_code == 200, response.text
    assert response.json()["label_set_version"] == 1
    assert response.json()["thresholds"]["labels"]["payroll"] == 0.4
    assert requests.get(url, timeout=10).json()["labels"] == new["labels"]
    prediction = _v1(base, {"instances": ["Monthly payroll tax withheld from wages"]}).json()
    assert prediction["label_set_version"] == 1
    assert set(prediction["predictions"][0]["scores"]) == {"vat", "payroll"}
    from labelmatch.state.serving_state import ServingState

    model_version = prediction["model_version"]
    stored = ServingState(f"sqlite:///{state_dir / 'serving.db'}").latest_label_set(model_version)
    assert stored is not None and stored.version == 1 and stored.labels == labels
    assert not any(p.name == "serving.db" for p in model_dir.rglob("*"))


def test_feedback_by_prediction_id(server):
    from labelmatch.feedback.feedback_store import FeedbackStore

    base, feedback_url = server[0], server[3]
    prediction = _v1(base, {"instances": ["VAT return corrected after audit"]}).json()["predictions"][0]
    url = f"{base}/v2/models/labelmatch/feedback"
    stored = requests.post(url, json={"prediction_id": prediction["id"], "score": 2,
                                      "corrected_labels": ["vat"]}, timeout=30)
    assert stored.status_code == 200, stored.text
    records = {r.id: r for r in FeedbackStore(feedback_url).records()}
    record = records[stored.json()["id"]]
    assert record.score == 2 and record.corrected_labels == ["vat"] and record.source == "serve"
    assert record.predicted_labels == prediction["labels"]
    bad_score = requests.post(url, json={"prediction_id": prediction["id"], "score": 9}, timeout=30)
    assert bad_score.status_code == 400 and "score" in bad_score.json()["error"]
    unknown = requests.post(url, json={"prediction_id": "nope", "score": 3}, timeout=30)
    assert unknown.status_code == 404 and "unknown or expired prediction_id" in unknown.json()["error"]


def test_metrics(server):
    base = server[0]
    _v1(base, {"instances": ["VAT invoice", "Corporate tax"]})
    _v1(base, "{bad json")
    text = requests.get(f"{base}/metrics", timeout=10).text
    assert 'labelmatch_request_seconds_bucket{endpoint="v1_predict",le="0.005"}' in text
    assert "labelmatch_inference_seconds_count" in text
    assert 'labelmatch_batch_documents_bucket{le="2.0"}' in text
    assert "labelmatch_label_predictions_total{label=" in text
    assert 'labelmatch_errors_total{endpoint="v1_predict",status="400"}' in text
    assert 'request_predict_seconds_count{model_name="labelmatch"}' in text  # KServe's own


def test_corrupted_model_refuses_to_start(onnx_model, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(onnx_model[0], bad)
    with (bad / "model.onnx").open("r+b") as handle:
        handle.seek(1000)
        handle.write(b"\x00corrupt\x00")
    result = subprocess.run([sys.executable, "-m", "labelmatch", "serve", "--model", str(bad),
                             "--port", str(free_port())], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "model.onnx is corrupted" in result.stderr
