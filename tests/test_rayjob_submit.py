"""``submit_ray_job`` against a real Ray head and its Jobs API (dashboard on 127.0.0.1)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from conftest import ray_sandbox  # noqa: E402
from model_server import free_port, wait_until_ready  # noqa: E402
from ray._private.ray_constants import DEFAULT_DASHBOARD_AGENT_LISTEN_PORT  # noqa: E402

from labelmatch.tuning.rayjob import submit_ray_job  # noqa: E402


@pytest.fixture(scope="module")
def jobs_address():
    """A Ray head started as a KubeRay head pod starts it (``ray start --head --block``), on 127.0.0.1.

    Every port a head would take by default is its own here: a second Ray on the machine (another
    test file on ``make test``'s other worker) keeps the defaults, and Ray 2.60 gives the dashboard
    agent the fixed HTTP port 52365, through which the Jobs API submits (``ray/dashboard/modules/
    job/job_head.py``); ``ray.init`` cannot change it, ``ray start`` can.
    """
    flags = ("--port", "--dashboard-port", "--dashboard-agent-listen-port", "--ray-client-server-port")
    with ray_sandbox("lmjob-") as root, contextlib.ExitStack() as stack:
        # The default agent port is taken while this head runs (here, or by another Ray already).
        with contextlib.suppress(OSError):
            taken = stack.enter_context(socket.socket())
            taken.bind(("127.0.0.1", DEFAULT_DASHBOARD_AGENT_LISTEN_PORT))
            taken.listen()
        ports = {flag: free_port() for flag in flags}
        # Two declared GPUs (none are used: torch runs on CPU): the tune step's RayJob trials ask
        # for one each, as on the cluster's 1-GPU workers.
        command = [str(Path(sys.executable).with_name("ray")), "start", "--head", "--block",
                   "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", "--include-dashboard=true",
                   "--num-cpus=2", "--num-gpus=2", f"--temp-dir={root / 'ray'}",
                   *(f"{flag}={port}" for flag, port in ports.items())]
        env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}  # keep 127.0.0.1 (ray_local.py)
        with (root / "head.log").open("wb") as log:
            head = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        address = f"http://127.0.0.1:{ports['--dashboard-port']}"
        try:
            wait_until_ready(head, f"{address}/api/version", root / "head.log", "the Ray head", timeout_s=120)
            yield address
        finally:
            os.killpg(head.pid, signal.SIGTERM)  # the head and every Ray process it started
            try:
                head.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(head.pid, signal.SIGKILL)
                head.wait()


def test_a_local_ray_started_earlier_in_this_process_leaves_no_token_mode_behind(jobs_address):
    """A ``ray.init`` (here, or in another test file on the same xdist worker) turns token mode on
    in this process and caches it; once its sandbox is left, the Jobs client must not ask for a
    token that no HOME holds (CI failed on exactly this when test_batch ran first on the worker)."""
    with ray_sandbox("lmjob-"):
        ray.init(num_cpus=1, include_dashboard=False, _node_ip_address="127.0.0.1")
    _, status = submit_ray_job(jobs_address, "python -c 'pass'", poll_seconds=0.5)
    assert status == "SUCCEEDED"


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


def test_the_tune_step_runs_pbt_on_a_rayjob_and_brings_the_best_model_back(
    jobs_address, tmp_path, monkeypatch
):
    """The pipeline's tune step with the ``rayjob`` backend, end to end: the RayJob it creates is run
    by a KubeRay double that submits the RayJob's own entrypoint to this real Ray cluster with the
    pods' environment (ConfigMap + Secret); Tune's storage and the outputs are in a real S3 server."""
    from conftest import make_tiny_dataset, tiny_config
    from kuberay_double import KubeRayState, kuberay_double
    from s3_server import FAKE_ACCESS_KEY, FAKE_SECRET_KEY, moto_s3_server, s3_env

    from labelmatch.core.artifacts import verify_artifact, write_manifest
    from labelmatch.data.dataset import save_dataset
    from labelmatch.platform.artifact_store import ArtifactStore
    from labelmatch.stages.tune import TuneStepConfig, run_tune_step
    from labelmatch.tuning.pbt import TuneConfig

    save_dataset(make_tiny_dataset(n_docs=90), tmp_path / "ds")
    write_manifest(tmp_path / "ds", "Dataset")
    with moto_s3_server() as url:
        store_env = {"LABELMATCH_S3_ENDPOINT": url, "LABELMATCH_S3_REGION": "us-east-1",
                     "LABELMATCH_STORE_ROOT": "s3://labelmatch"}
        for key, value in {**s3_env(url), **store_env}.items():
            monkeypatch.setenv(key, value)
        ArtifactStore.from_env().put_bytes("s3://labelmatch/.keep", b"")
        state = KubeRayState(
            ray_jobs_address=jobs_address,
            config_maps={"labelmatch-pipeline-config": store_env},
            secrets={"labelmatch-s3-credentials": {"AWS_ACCESS_KEY_ID": FAKE_ACCESS_KEY,
                                                   "AWS_SECRET_ACCESS_KEY": FAKE_SECRET_KEY}},
        )
        step = TuneStepConfig.from_parameters(
            backend="rayjob", run_id="run-7", rayjob_image="ghcr.io/labelmatch/labelmatch-train:test",
            rayjob_namespace="ml", rayjob_s3_secret="labelmatch-s3-credentials",
            rayjob_config_map="labelmatch-pipeline-config",
        )
        step.poll_s = 0.5
        tune = TuneConfig(trials=2, iterations=1, verbose=0,
                          train_config=tiny_config(steps_per_iteration=2, max_length=32, batch_size=8))
        with kuberay_double(state) as (api, state):
            summary = run_tune_step(tmp_path / "ds", tmp_path / "model", tmp_path / "report", tune, step, api)
        name = step.rayjob_spec().name
        assert state.deleted == [("ml", name)] and not state.jobs, "the RayJob is cleaned up"
        verify_artifact(tmp_path / "model", "Model")
        verify_artifact(tmp_path / "report", "Report")
        info = json.loads((tmp_path / "model" / "labelmatch.json").read_text())
        assert info["pbt"]["config"]["resources_per_trial"] == {"CPU": 1, "GPU": 1}, "one worker's GPU each"
        assert summary["trials"] == 2 and 0.0 <= summary["best_val_macro_f1"] <= 1.0
        assert summary["experiment"] == "s3://labelmatch/tune/run-7/ray/labelmatch-tune"
        keys = list(ArtifactStore.from_env().list_keys("s3://labelmatch/tune/run-7"))
    assert any(k.startswith("tune/run-7/dataset/") for k in keys), "the dataset went to the store"
    assert any("/ray/labelmatch-tune/" in k and "/checkpoint_" in k for k in keys), "checkpoints in S3"
    assert any(k.startswith("tune/run-7/outputs/model/") for k in keys)
