"""``s3://`` storage through pyarrow's S3FileSystem with an endpoint override (a local S3 server)."""

from __future__ import annotations

import socket

import pytest

from labelmatch.tuning.storage import ray_storage


@pytest.fixture
def s3_endpoint(monkeypatch):
    from moto.server import ThreadedMotoServer

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    for key, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    yield f"http://127.0.0.1:{port}"
    server.stop()


def test_s3_storage_uses_the_artifact_store_settings(tmp_path, s3_endpoint, monkeypatch):
    from pyarrow import fs

    path, filesystem = ray_storage("s3://tuning/runs", s3_endpoint)
    assert path == "tuning/runs" and isinstance(filesystem, fs.S3FileSystem)
    import boto3

    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="tuning")
    with filesystem.open_output_stream("tuning/runs/state.json") as handle:
        handle.write(b'{"iteration": 3}')
    # The endpoint from the store's own variable, no override: the same object.
    monkeypatch.setenv("LABELMATCH_S3_ENDPOINT", s3_endpoint)
    _, from_env = ray_storage("s3://tuning/runs")
    with from_env.open_input_stream("tuning/runs/state.json") as handle:
        assert handle.read() == b'{"iteration": 3}'


def test_local_storage_is_an_absolute_path_without_filesystem(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path, filesystem = ray_storage("runs/ray")
    assert path == str(tmp_path / "runs" / "ray") and filesystem is None
