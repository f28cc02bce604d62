"""Several real model servers on 127.0.0.1 sharing one real PostgreSQL: a label set stored on one
is served by all, feedback by id works wherever it lands, a killed replica costs the others
nothing, everything survives a restart of every server, and a store that stops accepting writes
shows in the state endpoint while predictions keep being served, the replica stays ready, and the
records it could not write are written when the store is back."""

from __future__ import annotations

import shutil
import threading
import time

import pytest
import requests
from model_server import ADMIN_TOKEN, ModelServer

SYNC_S = 0.5
LABELS = {"vat": "Value added tax on goods and services.", "payroll": "Payroll and wage taxes.",
          "customs": "Import duties and customs procedures."}


def _predict(base: str, text: str) -> requests.Response:
    return requests.post(f"{base}/v1/models/labelmatch:predict", json={"instances": [text]}, timeout=60)


def _wait(condition, timeout_s: float, what: str) -> float:
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout_s:
            pytest.fail(f"{what}: not within {timeout_s} s")
        time.sleep(0.05)
    return time.monotonic() - start


def _sql(postgres_url: str, statement: str) -> None:
    import psycopg
    from sqlalchemy.engine import make_url

    url = make_url(postgres_url)
    with psycopg.connect(host=url.host, port=url.port, user=url.username, dbname="postgres",
                         autocommit=True) as conn:
        conn.execute(statement.format(db=url.database))


def _metric(base: str, name: str) -> float:
    for line in requests.get(f"{base}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


@pytest.fixture
def replicas(onnx_model, postgres_url, tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(onnx_model[0], model_dir)
    flags = ("--state_url", postgres_url, "--label_sync_s", str(SYNC_S))
    servers = [ModelServer(model_dir, tmp_path / f"server{i}.log", *flags) for i in range(3)]
    for server in servers:
        server.launch()  # start together: they migrate one empty database at once
    try:
        for server in servers:
            server.wait_ready()
        yield servers
    finally:
        for server in servers:
            server.stop()


@pytest.mark.slow
def test_three_replicas_share_labels_predictions_and_feedback_and_survive_kill_and_restart(
        replicas, postgres_url):
    from labelmatch.feedback.feedback_store import FeedbackStore

    a, b, c = replicas
    # 1. A label set stored on one replica is served by the others within the sync interval.
    put = requests.put(f"{a.base}/v2/models/labelmatch/labels", json={"labels": LABELS},
                       headers={"authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=60)
    assert put.status_code == 200, put.text
    version = put.json()["label_set_version"]
    for other in (b, c):
        waited = _wait(lambda o=other: requests.get(f"{o.base}/v2/models/labelmatch/labels", timeout=10)
                       .json()["label_set_version"] == version, 10, "label set on another replica")
        assert waited < SYNC_S + 3, f"{waited:.2f} s"
        body = _predict(other.base, "Import duties on goods from abroad").json()
        assert body["label_set_version"] == version and set(body["predictions"][0]["scores"]) == set(LABELS)

    # 2. Feedback by the id of a prediction made on A lands on B.
    made = _predict(a.base, "VAT return filed late; penalty assessed").json()["predictions"][0]
    feedback = requests.post(f"{b.base}/v2/models/labelmatch/feedback",
                             json={"prediction_id": made["id"], "score": 4, "corrected_labels": ["vat"]},
                             timeout=30)
    assert feedback.status_code == 200, feedback.text
    stored = {r.id: r for r in FeedbackStore(postgres_url).records()}[feedback.json()["id"]]
    assert stored.predicted_labels == made["labels"] and stored.text.startswith("VAT return")
    unknown = requests.post(f"{c.base}/v2/models/labelmatch/feedback", json={"prediction_id": "0" * 32,
                                                                           "score": 3}, timeout=30)
    assert unknown.status_code == 404 and "unknown or expired" in unknown.json()["error"]

    # 3. Under load, one replica is killed: the others answer every request they get.
    outcomes: dict[str, list[int]] = {s.base: [] for s in replicas}
    stop = threading.Event()

    def client(k: int) -> None:
        i = k
        while not stop.is_set():
            server = replicas[i % 3]
            i += 1
            try:
                status = _predict(server.base, f"Payroll tax withheld, run {i}").status_code
            except requests.ConnectionError:
                status = -1
            outcomes[server.base].append(status)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for thread in threads:
        thread.start()
    time.sleep(3)
    served_by_c_before = sum(s == 200 for s in outcomes[c.base])
    c.kill()
    time.sleep(4)
    stop.set()
    for thread in threads:
        thread.join(timeout=60)
    assert served_by_c_before > 0
    for survivor in (a, b):
        assert outcomes[survivor.base] and set(outcomes[survivor.base]) == {200}, outcomes[survivor.base][:20]

    # 4. Every server restarts: the label set and the earlier prediction ids are still there.
    a.stop()
    b.stop()
    a.start()
    b.start()
    for server in (a, b):
        labels = requests.get(f"{server.base}/v2/models/labelmatch/labels", timeout=10).json()
        assert labels["label_set_version"] == version and labels["labels"] == LABELS
    again = requests.post(f"{a.base}/v2/models/labelmatch/feedback",
                          json={"prediction_id": made["id"], "score": 5}, timeout=30)
    assert again.status_code == 200, again.text

    # 5. The store stops accepting writes: the state endpoint says so, predictions keep being served
    # and the replica stays ready, label updates answer 503; when writes return, the held-back
    # prediction records are written.
    state = f"{a.base}/v2/models/labelmatch/state"
    assert requests.get(state, timeout=10).status_code == 200
    _sql(postgres_url, 'ALTER DATABASE "{db}" SET default_transaction_read_only = on')
    _sql(postgres_url, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                       "WHERE datname = '{db}' AND pid <> pg_backend_pid()")
    try:
        _wait(lambda: requests.get(state, timeout=10).status_code == 503, 15, "state readiness failing")
        assert "read-only" in requests.get(state, timeout=10).json()["error"]
        assert _predict(a.base, "VAT refund").status_code == 200
        held = _wait(lambda: _metric(a.base, "labelmatch_state_waiting_records") >= 1, 5,
                     "the unrecorded prediction held back")
        assert held < 5
        assert requests.get(f"{a.base}/v2/models/labelmatch/ready", timeout=10).status_code == 200
        refused = requests.put(f"{a.base}/v2/models/labelmatch/labels", json={"labels": LABELS},
                               headers={"authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=60)
        assert refused.status_code == 503 and "nothing changed" in refused.json()["error"]
    finally:
        _sql(postgres_url, 'ALTER DATABASE "{db}" SET default_transaction_read_only = off')
        _sql(postgres_url, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                           "WHERE datname = '{db}' AND pid <> pg_backend_pid()")
    _wait(lambda: requests.get(state, timeout=10).status_code == 200, 15, "state readiness back")
    _wait(lambda: _metric(a.base, "labelmatch_state_waiting_records") == 0, 15,
          "the held-back records written")
