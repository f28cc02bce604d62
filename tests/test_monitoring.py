"""Monitoring: the reference profile in the export, the prediction log of the real model server,
`labelmatch monitor` over it, the servers' drift gauges, and the retraining trigger."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import yaml
from conftest import make_tiny_dataset
from conftest import run_cli as _cli
from kfp_stub import kfp_stub_server, shipped_ir
from model_server import ModelServer
from s3_server import moto_s3_server, s3_env

from labelmatch import __version__
from labelmatch.core.artifacts import verify_artifact
from labelmatch.core.errors import ConfigError, DataError
from labelmatch.monitoring.monitor import MonitorConfig, evaluate_window
from labelmatch.monitoring.profile import PROFILE_FILE, ReferenceProfile
from labelmatch.monitoring.statistics import mmd_permutation_test, psi
from labelmatch.monitoring.trigger import plan_retrain, submit_retrain
from labelmatch.platform.artifact_store import ArtifactStore, S3Config
from labelmatch.platform.kfp import PipelineRegistry, RunInfo
from labelmatch.platform.releases import ReleaseLog, ReleaseRecord
from labelmatch.state.serving_state import PredictionRecord, ServingState

#: Documents about nothing the tax model knows: the shifted stream.
OFF_TOPIC = [
    f"{verb} {thing} in {place} {when}"
    for verb, thing, place, when in zip(
        ["book a table for two", "what is the weather", "play some jazz", "set an alarm", "how long to boil",
         "find a cheap flight", "recommend a sci-fi novel", "turn off the lights", "translate good morning",
         "what time does the gym open"] * 6,
        ["at an italian restaurant", "for the weekend", "by miles davis", "for six thirty", "an egg",
         "to lisbon", "like dune", "upstairs", "into japanese", "on sundays"] * 6,
        ["downtown", "near the beach", "in the kitchen", "at home", "on the stove", "from berlin",
         "for my holiday", "in the bedroom", "for my trip", "around the corner"] * 6,
        ["tonight", "tomorrow", "please", "right now", "for breakfast", "next month", "this summer",
         "at midnight", "before noon", "later today"] * 6,
        strict=True,
    )
]
RULES = {"min_documents": 20, "permutations": 200}


def test_mmd_holds_its_false_alarm_rate_and_detects_a_shift():
    rng = np.random.default_rng(0)
    p_values = [mmd_permutation_test(rng.normal(size=(60, 8)), rng.normal(size=(80, 8)), 200, seed)[1]
                for seed in range(40)]
    assert sum(p < 0.05 for p in p_values) <= 6  # 5% expected: 2 of 40; 6 is far in the tail
    shifted = rng.normal(size=(80, 8)) + np.array([1.0] + [0] * 7)
    _, p = mmd_permutation_test(rng.normal(size=(60, 8)), shifted, 200, 0)
    assert p < 0.01
    same = rng.normal(size=1000)
    assert psi(same, rng.normal(size=1000)) < 0.05 < 0.25 < psi(same, rng.normal(1.0, 1.0, size=1000))


def test_export_ships_a_reference_profile_of_the_served_model(onnx_model):
    model_dir, _ = onnx_model
    verify_artifact(model_dir, "OnnxModel")  # the profile files are in the manifest
    manifest = json.loads((model_dir / "manifest.json").read_text())
    assert {PROFILE_FILE, "reference_features.npy"} <= set(manifest["files"])
    profile = ReferenceProfile.load(model_dir)
    val = make_tiny_dataset().split("val").documents
    assert profile.documents == len(val) == len(profile.max_scores) == len(profile.features)
    assert profile.features.shape[1] == len(profile.feature_labels) == len(profile.labels)
    assert sum(profile.label_counts.values()) >= len(val) // 2
    assert len(profile.embedding["mean"]) == 384
    assert 0 < profile.embedding["mean_cosine_to_centroid"] <= 1
    card = (model_dir / "README.md").read_text()
    assert "## Monitoring reference" in card and f"| documents | {profile.documents} |" in card


def test_feedback_signal_fires_on_a_drop_and_skips_thin_windows(onnx_model):
    profile = ReferenceProfile.load(onnx_model[0])
    config = MonitorConfig(min_feedback=20)
    drop = evaluate_window(profile, [], config, "m", feedback=[2, 3] * 15, previous_feedback=[4, 5] * 15)
    assert drop.drift and drop.fired == ["feedback"] and drop.signals["feedback"]["statistic"] == -2.0
    steady = evaluate_window(profile, [], config, "m", feedback=[4, 5] * 15, previous_feedback=[5, 4] * 15)
    assert not steady.drift and steady.signals["feedback"]["p_value"] > 0.4
    thin = evaluate_window(profile, [], config, "m", feedback=[1] * 5, previous_feedback=[5] * 30)
    assert not thin.drift and "skipped" in thin.signals["feedback"]["detail"]
    assert "embedding" not in thin.signals  # no logged predictions: the prediction tests did not run


def test_rules_file_errors_name_file_line_and_field(tmp_path):
    path = tmp_path / "monitor.json"
    path.write_text('{\n  "alpha": 0.01,\n  "permutatons": 100\n}\n')
    with pytest.raises(DataError) as info:
        MonitorConfig.from_file(path)
    assert str(path) in str(info.value) and ":3" in str(info.value) and "permutatons" in str(info.value)
    path.write_text('{"rules": ["embedding", "vibes"]}')
    with pytest.raises(DataError, match="vibes"):
        MonitorConfig.from_file(path)


BAD_RULES = [
    ("monitor.json", '{\n  "rules": ["embedding"],\n  "alpha": "0.01"\n}\n', 3, "alpha",
     "expected a number, got a string '0.01'"),
    ("monitor.json", '{\n  "min_documents": true\n}', 2, "min_documents", "expected an integer, got a bool"),
    ("monitor.json", '{"permutations": null}', 1, "permutations", "expected an integer, got null"),
    ("monitor.json", '{\n  "rules": "embedding"\n}', 2, "rules", "expected a list of strings, got a string"),
    ("monitor.json", '{\n  "label_score_psi": "high"\n}', 2, "label_score_psi", "expected a number or null"),
    ("monitor.json", '{"alpha": 0.01, "alpha": 0.05}', None, "alpha", "given twice"),
    ("monitor.json", '{"alpha": NaN}', None, None, "NaN is not a JSON value"),
    ("monitor.json", '{\n  "seed": 1.5\n}', 2, "seed", "expected an integer, got a number 1.5"),
    ("monitor.json", '{\n  "alpha": 2\n}', 2, "alpha", "alpha must be within (0, 1)"),
    ("monitor.yaml", "alpha: 0.01\nrules:\n  - embedding\n  - 7\n", 4, "rules[1]", "expected a string"),
    ("monitor.yaml", "alpha: 0.01\nalpha: 0.02\n", 2, "alpha", "given twice"),
    ("monitor.yaml", "min_feedback: [1\n", 2, None, "invalid YAML"),
    ("monitor.json", "[0.01]", None, None, "expected a mapping of settings, got an array"),
    ("monitor.json", "", None, None, "file is empty"),
]


@pytest.mark.parametrize(("name", "text", "line", "field", "message"), BAD_RULES,
                         ids=[f"{i}-{r[4][:24]}" for i, r in enumerate(BAD_RULES)])
def test_every_rules_field_is_type_checked_and_named_with_its_line(tmp_path, name, text, line, field,
                                                                   message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(DataError) as info:
        MonitorConfig.from_file(path)
    err = info.value
    assert (err.path, err.line, err.field) == (str(path), line, field), str(err)
    assert message in str(err) and "\n" not in str(err)


def test_monitor_cli_refuses_a_string_alpha_in_one_line_with_exit_2(tmp_path):
    """The issue's case end to end: one line naming file, line and field; status 2; no report."""
    import subprocess
    import sys

    rules = tmp_path / "monitor.json"
    rules.write_text('{\n  "alpha": "0.01"\n}\n')
    done = subprocess.run([sys.executable, "-m", "labelmatch", "monitor", "--model", str(tmp_path / "model"),
                           "--config", str(rules), "--out", str(tmp_path / "report")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"error: {rules}:2: field 'alpha': expected a number, got a string '0.01'"]
    assert not (tmp_path / "report").exists()


def test_yaml_rules_read_exponent_floats_as_numbers(tmp_path):
    path = tmp_path / "monitor.yaml"
    path.write_text("alpha: 1e-3\nrules: [embedding, max_score]\nlabel_score_psi: 2.5e-1\n")
    config = MonitorConfig.from_file(path)
    assert (config.alpha, config.rules, config.label_score_psi) == (0.001, ["embedding", "max_score"], 0.25)


def test_window_times_parse_durations_iso_times_and_unix_times():
    from datetime import UTC, datetime

    from labelmatch.monitoring.run import parse_time

    now = 1_800_000_000.0
    assert parse_time("90m", now) == now - 5400 and parse_time("7d", now) == now - 7 * 86400
    six_utc = datetime(2027, 1, 15, 6, tzinfo=UTC).timestamp()
    assert parse_time("2027-01-15T06:00:00Z") == parse_time("2027-01-15T06:00:00") == six_utc
    assert parse_time("2027-01-15T07:00:00+01:00") == parse_time("2027-01-15T06:00:00")
    assert parse_time("1700000000.5") == 1_700_000_000.5
    with pytest.raises(ConfigError, match="yesterday"):
        parse_time("yesterday")


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_prediction_log_is_bounded(tmp_path, request, database):
    sqlite = f"sqlite:///{tmp_path / 's.db'}"
    url = request.getfixturevalue("postgres_url") if database == "postgresql" else sqlite
    state = ServingState(url)
    now = time.time()
    records = [PredictionRecord(f"p{i}", "m1", 0, [], {"a": 0.1}, "h", None, now - 1000 + i)
               for i in range(30)]
    records.append(PredictionRecord("old", "m1", 0, [], {"a": 0.1}, "h", None, now - 10 * 86400))
    state.log_predictions(records)
    assert state.trim_log(max_rows=20, retention_s=86400) == 11
    kept = state.logged_predictions("m1")
    assert [r.id for r in kept] == [f"p{i}" for i in range(10, 30)]  # the newest 20, oldest first
    assert [r.id for r in state.logged_predictions("m1", limit=3)] == ["p27", "p28", "p29"]
    assert state.logged_predictions("m2") == []


def test_server_log_monitor_gauges_and_retraining_trigger(onnx_model, tmp_path):
    """The real model server logs its predictions; `labelmatch monitor` finds no drift in
    in-distribution traffic and drift in off-topic traffic; every replica's /metrics shows the
    newest report; --trigger submits the training pipeline version that made the model."""
    model_dir, _ = onnx_model
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps(RULES))
    state_dir = tmp_path / "state"
    server = ModelServer(model_dir, tmp_path / "server.log", "--state_dir", str(state_dir),
                         "--log_sample_rate", "1", "--label_sync_s", "0.5").launch().wait_ready()
    url = f"sqlite:///{state_dir / 'serving.db'}"
    try:
        tiny = make_tiny_dataset()
        same = [d.text for d in tiny.split("test").documents + tiny.split("val").documents]
        random.Random(0).shuffle(same)
        for start in range(0, len(same), 8):
            response = requests.post(f"{server.base}/v1/models/labelmatch:predict",
                                     json={"instances": same[start:start + 8]}, timeout=60)
            assert response.status_code == 200
        time.sleep(1.5)  # records are written behind the response
        boundary = time.time()
        for start in range(0, len(OFF_TOPIC), 8):
            requests.post(f"{server.base}/v1/models/labelmatch:predict",
                          json={"instances": OFF_TOPIC[start:start + 8]}, timeout=60).raise_for_status()
        time.sleep(1.5)

        result = _cli("monitor", "--model", str(model_dir), "--state-url", url, "--since", "1h",
                      "--until", str(boundary), "--config", str(rules), "--out", str(tmp_path / "calm"))
        assert result.exit_code == 0, result.output
        calm = json.loads((tmp_path / "calm" / "report.json").read_text())
        assert calm["window"]["documents"] == len(same) and not calm["drift"], result.output

        result = _cli("monitor", "--model", str(model_dir), "--state-url", url, "--since", str(boundary),
                      "--config", str(rules), "--out", str(tmp_path / "shift"))
        assert result.exit_code == 0, result.output
        shift = json.loads((tmp_path / "shift" / "report.json").read_text())
        assert shift["window"]["documents"] == len(OFF_TOPIC) and shift["drift"]
        assert "embedding" in shift["fired"] and "DRIFT" in result.output
        assert (tmp_path / "shift" / "report.png").stat().st_size > 0

        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            metrics = requests.get(f"{server.base}/metrics", timeout=10).text
            if "labelmatch_drift_detected 1.0" in metrics:
                break
            time.sleep(0.3)
        assert "labelmatch_drift_detected 1.0" in metrics
        assert 'labelmatch_drift_signal_fired{signal="embedding"} 1.0' in metrics
        assert f"labelmatch_monitor_window_documents {float(len(OFF_TOPIC))}" in metrics
        assert f"labelmatch_logged_predictions_total {float(len(same) + len(OFF_TOPIC))}" in metrics
    finally:
        server.stop()

    with kfp_stub_server() as (host, kfp):
        PipelineRegistry(host).upload(shipped_ir(tmp_path, "labelmatch-training", __version__), __version__)
        common = ["monitor", "--model", str(model_dir), "--state-url", url, "--since", str(boundary),
                  "--config", str(rules), "--out", str(tmp_path / "t"), "--no-publish", "--trigger",
                  "--host", host, "--data-uri", "s3://data/tax-2026-12", "--feedback-uri", "s3://fb/export-7"]
        dry = _cli(*common, "--dry-run")
        assert dry.exit_code == 0, dry.output
        assert f"pipeline labelmatch-training version {__version__}" in dry.output and not kfp.runs
        submitted = _cli(*common)
        assert submitted.exit_code == 0, submitted.output
        [run] = kfp.runs.values()
        assert run["runtime_config"]["parameters"] == {"data_uri": "s3://data/tax-2026-12",
                                                       "feedback_uri": "s3://fb/export-7"}
        version = PipelineRegistry(host).find_version("labelmatch-training", __version__)
        assert run["pipeline_version_reference"]["pipeline_version_id"] == version.version_id
        refused = _cli(*common, "--pipeline-version", "0.0.9")
        assert refused.exit_code != 0 and "0.0.9" in str(refused.exception)


def test_trigger_refuses_parameters_the_version_does_not_take(tmp_path, onnx_model):
    model_dir, _ = onnx_model
    info = json.loads((model_dir / "labelmatch.json").read_text())
    profile = ReferenceProfile.load(model_dir)
    report = evaluate_window(profile, [], MonitorConfig(min_documents=2), "m1")
    with kfp_stub_server() as (host, kfp):
        registry = PipelineRegistry(host)
        registry.upload(shipped_ir(tmp_path, "labelmatch-training", __version__), __version__)
        with pytest.raises(ConfigError, match="not an input"):
            plan_retrain(report, info, registry, "s3://d", extra={"learning_rate": "0.1"})
        with pytest.raises(ConfigError, match="--data-uri"):
            plan_retrain(report, info, registry, "")
        plan = plan_retrain(report, info, registry, "s3://d", extra={"trials": "2"})
        run = submit_retrain(plan, registry)
        assert kfp.runs[run.run_id]["runtime_config"]["parameters"] == {"data_uri": "s3://d", "trials": 2}


def test_monitor_ir_reports_drift_and_submits_the_retraining_run(tmp_path, onnx_model, monkeypatch,
                                                                  production):
    """The committed monitor IR under kfp.local: the served model imported by path, the prediction
    log read from the state URL its Secret would hold, the Report artifact, and the training run
    created on the (multi-user) KFP API when drift fires, with the settings of the run that produced
    ``service``'s model, in the step's namespace. The local registry remembers the monitor run."""
    from labelmatch.runtime.onnx_classifier import OnnxClassifier, served_model_version
    from pipelines.local import LocalPipelineRegistry, run_artifacts
    from pipelines.registry import COMPILED_DIR

    host, kfp, _ = production
    model_dir, _ = onnx_model
    url = f"sqlite:///{tmp_path / 'state.db'}"
    state = ServingState(url)
    version = served_model_version(model_dir)
    served = OnnxClassifier.load(model_dir).predict(OFF_TOPIC)  # what the server logs for them
    state.log_predictions([PredictionRecord(f"p{i}", version, 0, p.labels, p.scores, "h", None, time.time())
                           for i, p in enumerate(served)])
    monkeypatch.setenv("LABELMATCH_STATE_URL", url)
    monkeypatch.setenv("LABELMATCH_KFP_NAMESPACE", "ml-prod")  # in a pod: the pod's own namespace
    before = set(kfp.runs)
    runner = LocalPipelineRegistry(COMPILED_DIR, tmp_path / "runs")
    params = {"model_uri": str(model_dir), "since": "1h", "rules": json.dumps(RULES), "trigger": "true",
              "data_uri": "s3://data/new", "kfp_host": host, "service": "tax", "release_root": ROOT}
    run = runner.create_run("labelmatch-monitor", __version__, params)
    [new] = set(kfp.runs) - before
    created = kfp.runs[new]
    [report] = [a for a in run_artifacts(run.run_id) if a.kind == "Report"]
    body = json.loads((report.path / "report.json").read_text())
    assert body["drift"] and body["window"]["documents"] == len(OFF_TOPIC)
    assert created["runtime_config"]["parameters"] == {
        "base_model": "s3://labelmatch/encoders/bge-m3", "tune_backend": "rayjob", "namespace": "labelmatch",
        "service": "tax", "rayjob_workers": 2, "trials": 8, "data_uri": "s3://data/new",
        "serving_model_uri": str(model_dir)}
    assert created["service_account"] == "labelmatch-pipeline-runner"
    assert kfp.run_namespace(created) == "ml-prod"
    assert ServingState(url).latest_monitor_report(version)[1]["drift"]

    # The local registry answers for its runs like a KFP server: by run directory or by the job id
    # its steps recorded (what a deploy writes into a release record).
    job_id = json.loads((report.path / "manifest.json").read_text())["lineage"]["run_id"]
    assert runner.find_run(job_id) == runner.find_run(run.run_id) == run
    assert runner.run_parameters(job_id)["service"] == "tax"
    with pytest.raises(ConfigError, match=r"is not a run under"):
        runner.find_run("no-such-job")


ROOT = "s3://labelmatch"
#: What production trained with: none of it is a pipeline default.
PRODUCTION = {"base_model": "s3://labelmatch/encoders/bge-m3", "tune_backend": "rayjob",
              "namespace": "labelmatch", "service": "tax", "trials": "8", "rayjob_workers": "2", "data_uri": "s3://data/tax-2026-06",
              "feedback_uri": "s3://fb/export-3", "tune_storage_uri": "s3://labelmatch/tune/june"}


@pytest.fixture
def production(tmp_path, monkeypatch):
    """A multi-user KFP stub and an S3 server holding the release log of service ``tax``: the model
    it serves (digest d1) came from a training run of an older version (0.0.9, which had a
    ``legacy_option``) with :data:`PRODUCTION`'s settings; a newer model (d0, a bundled-encoder run)
    was deployed after it, then a rollback's deploy run put d1 back. Yields ``(host, kfp state,
    the producing run)``; the CLI reaches both servers through the environment."""
    monkeypatch.setenv("HOME", str(tmp_path))
    with moto_s3_server() as s3, kfp_stub_server() as (host, kfp):
        for key, value in s3_env(s3).items():
            monkeypatch.setenv(key, value)
        monkeypatch.setenv("LABELMATCH_KFP_TOKEN", "ops-token")
        kfp.multi_user, kfp.tokens = True, {"ops-token": {"ml-prod"}}
        registry = PipelineRegistry(host, token="ops-token", namespace="ml-prod")
        older = Path(shipped_ir(tmp_path, "labelmatch-training", "0.0.9"))
        docs = list(yaml.safe_load_all(older.read_text()))
        docs[0]["root"]["inputDefinitions"]["parameters"]["legacy_option"] = {
            "parameterType": "STRING", "defaultValue": "", "isOptional": True}
        older.write_text(yaml.safe_dump_all(docs))
        registry.upload(older, "0.0.9")
        registry.upload(shipped_ir(tmp_path, "labelmatch-training", __version__), __version__)
        registry.upload(shipped_ir(tmp_path, "labelmatch-deploy", __version__), __version__)
        produced = registry.create_run("labelmatch-training", "0.0.9", {**PRODUCTION, "legacy_option": "x"},
                                       service_account="labelmatch-pipeline-runner")
        newer = registry.create_run("labelmatch-training", __version__, {"data_uri": "s3://data/other"})
        rolled = registry.create_run("labelmatch-deploy", __version__, {"model_uri": f"{ROOT}/models/d1"})
        releases = ReleaseLog(ArtifactStore(S3Config.from_env(s3_env(s3))), ROOT)
        for digest, version, run in (("d1", "0.0.9", produced), ("d0", __version__, newer),
                                     ("d1", __version__, rolled)):
            releases.append(ReleaseRecord.new(service="tax", namespace="labelmatch",
                                              model_uri=f"{ROOT}/models/{digest}", model_digest=digest,
                                              pipeline_version=version, run_id=run.run_id))
        kfp.requests.clear()
        yield host, kfp, produced


def test_retrain_starts_from_the_run_that_produced_the_served_model(production):
    """`labelmatch retrain` (what the monitor's trigger runs): the retraining run carries the
    producing run's base_model, tune_backend, namespace, other settings and service account, in
    the profile namespace; the new data replaces that run's inputs; --param overrides; a parameter
    the target version no longer declares is dropped with a note."""
    host, kfp, produced = production
    args = ["retrain", "--host", host, "--namespace", "ml-prod", "--service", "tax", "--root", ROOT,
            "--data-uri", "s3://data/tax-2026-12", "--pipeline-version", __version__, "--param", "trials=2"]
    created_before = set(kfp.runs)
    dry = _cli(*args, "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert set(kfp.runs) == created_before
    assert "base_model=s3://labelmatch/encoders/bge-m3" in dry.stdout
    assert f"# run {produced.run_id}" in dry.stdout
    assert "trials=2" in dry.stdout and "# --param" in dry.stdout
    assert "service account: labelmatch-pipeline-runner" in dry.stdout
    assert "legacy_option" in dry.stderr and "dropped" in dry.stderr
    assert "feedback_uri of run" in dry.stderr and "not carried over" in dry.stderr
    assert "ran labelmatch-deploy" in dry.stderr  # the rollback's run is passed over

    submitted = _cli(*args)
    assert submitted.exit_code == 0, submitted.output
    [new] = set(kfp.runs) - created_before
    run = kfp.runs[new]
    assert run["runtime_config"]["parameters"] == {
        "base_model": "s3://labelmatch/encoders/bge-m3", "tune_backend": "rayjob", "namespace": "labelmatch",
        "service": "tax", "rayjob_workers": 2, "trials": 2, "data_uri": "s3://data/tax-2026-12"}
    assert run["service_account"] == "labelmatch-pipeline-runner"
    assert kfp.run_namespace(run) == "ml-prod"
    version = PipelineRegistry(host, token="ops-token", namespace="ml-prod").find_version(
        "labelmatch-training", __version__)
    assert run["pipeline_version_reference"]["pipeline_version_id"] == version.version_id
    assert all(r.header("Authorization") == "Bearer ops-token" for r in kfp.requests
               if not r.path.endswith("/healthz"))


def test_retrain_says_when_it_falls_back_to_the_given_parameters(production):
    host, _, _ = production
    common = ["retrain", "--host", host, "--namespace", "ml-prod", "--root", ROOT, "--data-uri", "s3://d",
              "--pipeline-version", __version__, "--dry-run"]
    unknown = _cli(*common, "--service", "unknown-svc")
    assert unknown.exit_code == 0, unknown.output
    assert "'unknown-svc' has no release record" in unknown.stderr and "pipeline's defaults" in unknown.stderr
    assert "--param data_uri=s3://d" in unknown.stdout and "base_model" not in unknown.stdout
    bare = _cli(*common)
    assert "no --service" in bare.stderr and "base_model" not in bare.stdout
    offline = _cli("retrain", "--service", "tax", "--data-uri", "s3://d", "--pipeline-version", __version__,
                   "--dry-run")
    assert offline.exit_code == 0 and "no --host" in offline.stderr


def test_retrain_plan_converts_the_servers_typed_values_back():
    """The server returns typed values (JSON numbers, booleans); the plan writes them back as the
    command-line strings the version's types convert (3.0 -> "3" for an integer)."""
    served = {"base_model": "s3://enc", "trials": 3.0, "redact_pii": False, "gpu_tolerations": [{"k": 1}]}
    base = RunInfo("r1", "n", "labelmatch-training", __version__, served)
    plan = plan_retrain(None, None, None, "s3://d", base=base, extra={"redact_pii": "true"})
    assert plan.parameters == {"base_model": "s3://enc", "trials": "3", "redact_pii": "true", "data_uri": "s3://d",
                               "gpu_tolerations": '[{"k": 1}]'}
    assert plan.sources["trials"] == "run r1" and plan.sources["redact_pii"] == "--param"
    assert plan.run_name == "retrain the served model: drift (manual)" and plan.version == __version__
