"""Serving survives its database: a private PostgreSQL on 127.0.0.1 is stopped for 30 s while 16
clients predict. Every prediction is answered, the replica stays ready, label updates and
feedback answer 503, and every served prediction's record is either written once the database
is back or counted as dropped."""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import pytest
import requests
from model_server import ADMIN_TOKEN, ModelServer

CLIENTS = 16
OUTAGE_S = 30.0


def _metric(base: str, name: str) -> float:
    for line in requests.get(f"{base}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


@pytest.mark.slow
def test_a_database_outage_costs_no_prediction_and_no_readiness(onnx_model, tmp_path):
    import postgres_server as pg
    from sqlalchemy import bindparam, create_engine, text

    if not pg._bindir():
        pytest.skip("PostgreSQL is not installed (.ci/run installs it)")
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="labelmatch-pg-"))  # the postgres user must reach it (not tmp_path)
    url = pg.fresh_database(pg.start(root))
    shutil.copytree(onnx_model[0], tmp_path / "model")
    server = ModelServer(
        tmp_path / "model", tmp_path / "server.log", "--state_url", url, "--label_sync_s", "0.5"
    )
    try:
        server.start()
        base = server.base
        answers: list[tuple[int, str | None]] = []
        readiness: list[int] = []
        stop = threading.Event()

        def client(n: int) -> None:
            while not stop.is_set():
                try:
                    response = requests.post(
                        f"{base}/v1/models/labelmatch:predict",
                        json={"instances": [f"VAT refund {n} {time.time()}"]},
                        timeout=60,
                    )
                    ok = response.status_code == 200
                    answers.append(
                        (response.status_code, response.json()["predictions"][0]["id"] if ok else None)
                    )
                except requests.RequestException as exc:
                    answers.append((0, type(exc).__name__))

        def ready() -> None:
            while not stop.is_set():
                readiness.append(requests.get(f"{base}/v2/models/labelmatch/ready", timeout=10).status_code)
                time.sleep(0.2)

        threads = [threading.Thread(target=client, args=(n,)) for n in range(CLIENTS)]
        threads.append(threading.Thread(target=ready))
        for thread in threads:
            thread.start()
        try:
            time.sleep(3)
            pg.stop(root)
            down_at = len(answers)
            time.sleep(OUTAGE_S / 2)
            put = requests.put(
                f"{base}/v2/models/labelmatch/labels",
                json={"labels": {"vat": "VAT"}},
                headers={"authorization": f"Bearer {ADMIN_TOKEN}"},
                timeout=60,
            )
            assert put.status_code == 503 and "nothing changed" in put.json()["error"]
            served = next(i for s, i in reversed(answers) if s == 200)
            feedback = requests.post(
                f"{base}/v2/models/labelmatch/feedback",
                json={"prediction_id": served, "score": 4},
                timeout=60,
            )
            assert feedback.status_code == 503, feedback.text
            assert _metric(base, "labelmatch_state_waiting_records") > 0
            time.sleep(OUTAGE_S / 2)
            during = len(answers) - down_at
            pg.resume(root)
            time.sleep(3)
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=60)
        failed = [a for a in answers if a[0] != 200]
        assert not failed, f"{len(failed)} of {len(answers)} predictions failed: {failed[:5]}"
        assert during > CLIENTS, f"only {during} predictions answered during the outage"
        assert readiness and set(readiness) == {200}, f"readiness answers: {sorted(set(readiness))}"

        deadline = time.monotonic() + 60
        while _metric(base, "labelmatch_state_waiting_records") > 0 and time.monotonic() < deadline:
            time.sleep(0.5)
        time.sleep(1.0)  # the writer's last batch
        ids = [i for _, i in answers]
        engine = create_engine(url)
        query = text("SELECT count(*) FROM predictions WHERE id IN :ids").bindparams(
            bindparam("ids", expanding=True)
        )
        with engine.connect() as conn:
            written = sum(
                conn.execute(query, {"ids": ids[i : i + 1000]}).scalar_one() for i in range(0, len(ids), 1000)
            )
        engine.dispose()
        dropped = _metric(base, "labelmatch_state_errors_total")
        assert written + dropped == len(ids), (written, dropped, len(ids))
        assert requests.get(f"{base}/v2/models/labelmatch/state", timeout=10).status_code == 200
    finally:
        server.stop()
        pg.stop(root)
        shutil.rmtree(root, ignore_errors=True)


def test_the_store_going_away_during_an_upload_is_ridden_out_or_named(sample_dir, tmp_path):
    """A step's upload (``labelmatch store push``, as every step's output goes to the store) while
    the S3 server is stopped: back within seconds, the upload finishes and verifies; gone for
    good, it fails with one line naming the URI and leaves nothing a reader accepts."""
    import subprocess
    import sys

    from model_server import free_port
    from moto.server import ThreadedMotoServer
    from s3_server import s3_env

    from labelmatch.core.artifacts import write_manifest
    from labelmatch.platform.artifact_store import RETRIES_VAR, ArtifactStore, S3Config

    artifact = tmp_path / "dataset"
    shutil.copytree(sample_dir, artifact)
    write_manifest(artifact, "Dataset")
    port = free_port()
    env = {**os.environ, **s3_env(f"http://127.0.0.1:{port}")}
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    store = ArtifactStore(S3Config.from_env(env))
    store.put_bytes("s3://chaos/ready", b"1")  # the bucket exists before the outage
    server.stop()

    def push(uri: str) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "labelmatch", "store", "push", str(artifact), uri, "--kind", "Dataset"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    upload = push("s3://chaos/data/v1")
    time.sleep(4)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        _, stderr = upload.communicate(timeout=120)
        assert upload.returncode == 0, stderr[-2000:]
        store.download_artifact("s3://chaos/data/v1", tmp_path / "back", kind="Dataset")
    finally:
        server.stop()

    started = time.monotonic()
    env[RETRIES_VAR] = "2"  # the whole retry budget is not waited out here (about 45 s by default)
    upload = push("s3://chaos/data/v2")
    _, stderr = upload.communicate(timeout=180)
    lines = [line for line in stderr.splitlines() if line.strip() and "upload s3://" not in line]
    assert upload.returncode == 2 and len(lines) == 1, stderr[-2000:]
    assert "s3://chaos/data/v2" in lines[0] and "failed" in lines[0], lines
    assert time.monotonic() - started < 120
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        assert store.remote_manifest("s3://chaos/data/v2") is None  # no commit point: nothing to accept
    finally:
        server.stop()
