"""``submit_ray_job`` against a real local Ray head and its Jobs API (dashboard on 127.0.0.1)."""

from __future__ import annotations

import socket

import pytest

ray = pytest.importorskip("ray")

from conftest import ray_sandbox  # noqa: E402

from labelmatch.tune import init_local_ray  # noqa: E402
from labelmatch.tuning.rayjob import submit_ray_job  # noqa: E402


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def jobs_address():
    with ray_sandbox("lmjob-") as root:
        port = _free_port()
        init_local_ray(num_cpus=1, dashboard=True, temp_dir=str(root / "ray"), dashboard_port=port)
        yield f"http://127.0.0.1:{port}"


def test_a_job_runs_to_success_and_its_logs_stream_back(jobs_address):
    chunks: list[str] = []
    job_id, status = submit_ray_job(jobs_address, "python -c \"print('labelmatch job ran')\"",
                                    on_log=chunks.append, poll_seconds=0.5)
    assert status == "SUCCEEDED"
    assert "labelmatch job ran" in "".join(chunks)
    assert job_id


def test_a_failing_job_is_reported_as_failed(jobs_address):
    _, status = submit_ray_job(jobs_address, "python -c 'import sys; sys.exit(3)'", poll_seconds=0.5)
    assert status == "FAILED"
