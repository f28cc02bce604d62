"""``s3://`` storage through pyarrow's S3FileSystem with an endpoint override (a local S3 server)."""

from __future__ import annotations

import socket

import pytest

from labelmatch.tuning.storage import copy_dir, ray_storage


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


def test_directories_round_trip_through_s3_with_an_endpoint_override(tmp_path, s3_endpoint):
    from pyarrow import fs

    path, filesystem = ray_storage("s3://tuning/runs", s3_endpoint)
    assert path == "tuning/runs" and isinstance(filesystem, fs.S3FileSystem)
    import boto3

    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="tuning")
    source = tmp_path / "model"
    (source / "adapter").mkdir(parents=True)
    (source / "labels.json").write_text('{"a": "b"}')
    (source / "adapter" / "weights.bin").write_bytes(bytes(range(256)))
    copy_dir(source, "s3://tuning/runs/outputs/model", s3_endpoint)
    back = tmp_path / "back"
    copy_dir("s3://tuning/runs/outputs/model", back, s3_endpoint)
    assert (back / "labels.json").read_text() == '{"a": "b"}'
    assert (back / "adapter" / "weights.bin").read_bytes() == bytes(range(256))


def test_local_storage_is_an_absolute_path_without_filesystem(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path, filesystem = ray_storage("runs/ray")
    assert path == str(tmp_path / "runs" / "ray") and filesystem is None
