"""Pipelines: compiled IR (components, inputs, types, conditions, Kubernetes settings), committed IR
current, and the committed training IR run locally with kfp.local on tiny settings — data read
from an S3 server, artifacts flowing between stages, the gate working both ways.
"""

import json
import re
import tempfile
from pathlib import Path

import pytest
import yaml
from conftest import environ
from s3_server import moto_s3_server, s3_env

from labelmatch import __version__
from labelmatch.core.artifacts import artifact_digest, read_manifest
from pipelines.registry import COMPILED_DIR, compile_all, registered_pipelines, stale_files

#: The IR that ships (what a cluster runs, and what the runs below execute).
TRAINING_IR = COMPILED_DIR / f"labelmatch-training-{__version__}.yaml"

TINY = dict(
    trials=2,
    iterations=1,
    steps_per_iteration=3,
    batch_size=16,
    ray_num_cpus=2,
    grpo_steps=2,
    deploy_target="local",
    # A model trained for a few steps scores many labels near their thresholds, where int8
    # rounding flips decisions; the parity gate itself is tested with the export.
    export_agreement_gate=0.5,
)


def load_ir(path: Path) -> tuple[dict, dict]:
    """``(pipeline spec, Kubernetes platform spec)`` of a compiled IR file."""
    docs = list(yaml.safe_load_all(path.read_text()))
    platform = docs[1]["platforms"]["kubernetes"] if len(docs) > 1 else {}
    return docs[0], platform


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("ir")
    return {path.name: load_ir(path)[0] for path in compile_all(out)}


def _params(ir: dict) -> dict[str, str]:
    return {k: v["parameterType"] for k, v in ir["root"]["inputDefinitions"]["parameters"].items()}


def test_registry_versions_follow_the_package() -> None:
    names = {p.name: p for p in registered_pipelines()}
    assert set(names) == {"labelmatch-training", "labelmatch-deploy", "labelmatch-batch",
                          "labelmatch-monitor"}
    assert {p.version for p in names.values()} == {__version__}
    assert names["labelmatch-training"].filename == f"labelmatch-training-{__version__}.yaml"


def test_training_ir_has_every_stage_typed(compiled: dict) -> None:
    ir = compiled[f"labelmatch-training-{__version__}.yaml"]
    assert ir["pipelineInfo"]["name"] == "labelmatch-training"
    comps = ir["components"]
    for stage in ("data-prep", "tune-sft", "grpo", "evaluate", "export-onnx", "deploy", "labelmatch-release"):
        assert f"comp-{stage}" in comps, stage
    params = _params(ir)
    assert params["data_uri"] == "STRING" and params["trials"] == "NUMBER_INTEGER"
    assert params["gpus_per_trial"] == "NUMBER_DOUBLE" and params["min_improvement"] == "NUMBER_DOUBLE"
    assert params["redact_pii"] == "BOOLEAN"
    defaults = ir["root"]["inputDefinitions"]["parameters"]
    assert defaults["min_improvement"]["defaultValue"] == 0.02
    assert "defaultValue" not in defaults["data_uri"]

    def artifacts(comp: str, side: str) -> dict[str, str]:
        defs = comps[comp].get(side, {}).get("artifacts", {})
        return {k: v["artifactType"]["schemaTitle"] for k, v in defs.items()}

    assert artifacts("comp-data-prep", "outputDefinitions") == {
        "dataset": "system.Dataset",
        "report": "system.Artifact",
        "report_page": "system.Markdown",
    }
    assert artifacts("comp-tune-sft", "inputDefinitions") == {"dataset": "system.Dataset"}
    assert artifacts("comp-tune-sft", "outputDefinitions")["model"] == "system.Model"
    assert artifacts("comp-grpo", "inputDefinitions") == {
        "sft_model": "system.Model",
        "feedback": "system.Artifact",
        "dataset": "system.Dataset",
    }
    assert artifacts("comp-evaluate", "outputDefinitions")["metrics"] == "system.Metrics"
    assert comps["comp-evaluate"]["outputDefinitions"]["parameters"]["Output"]["parameterType"] == "BOOLEAN"
    assert artifacts("comp-export-onnx", "outputDefinitions")["onnx_model"] == "system.Model"
    assert artifacts("comp-deploy", "inputDefinitions") == {"onnx_model": "system.Model"}
    text = json.dumps(ir)
    assert "pipelinechannel--feedback_uri'] != ''" in text
    assert "pipelinechannel--evaluate-Output'] == true" in text
    executors = ir["deploymentSpec"]["executors"]
    images = {n: e["container"]["image"] for n, e in executors.items() if "container" in e}
    step, train = (f"ghcr.io/labelmatch/labelmatch-{role}:{__version__}" for role in ("step", "train"))
    # torch (the CUDA train image) only where a step trains or exports; the rest run the slim step image
    by_stage = {"data-prep": step, "evaluate": step, "deploy": step, "tune-sft": train, "grpo": train,
                "export-onnx": train}
    stages = {name: re.sub(r"^exec-|-\d+$", "", name) for name in images}
    assert set(stages.values()) == set(by_stage), stages
    assert images == {name: by_stage[stage] for name, stage in stages.items()}


def test_deploy_ir_takes_the_rollback_parameters(compiled: dict) -> None:
    from labelmatch.platform.kserve import DEPLOY_PARAMETERS

    ir = compiled[f"labelmatch-deploy-{__version__}.yaml"]
    assert set(DEPLOY_PARAMETERS) <= set(_params(ir))
    assert "comp-importer" in ir["components"] and "comp-deploy" in ir["components"]
    importer = ir["deploymentSpec"]["executors"]["exec-importer"]["importer"]
    assert importer["typeSchema"]["schemaTitle"] == "system.Model"


SHIPPED_IR = sorted(COMPILED_DIR.glob(f"*-{__version__}.yaml"))


def _channel(binding: dict) -> str:
    """The parameter a platform setting reads (a pipeline input, maybe through a sub-pipeline)."""
    return binding["componentInputParameter"].removeprefix("pipelinechannel--")


@pytest.mark.parametrize("path", SHIPPED_IR, ids=lambda p: p.name)
def test_every_step_of_the_shipped_ir_carries_its_kubernetes_settings(path: Path) -> None:
    from pipelines.platform import (
        DEFAULT_PIPELINE_CONFIG,
        DEFAULT_S3_SECRET,
        S3_SECRET_KEYS,
        STORE_CONFIG_KEYS,
    )

    ir, platform = load_ir(path)
    params = ir["root"]["inputDefinitions"]["parameters"]
    assert params["s3_secret"]["defaultValue"] == DEFAULT_S3_SECRET
    assert params["pipeline_config"]["defaultValue"] == DEFAULT_PIPELINE_CONFIG
    containers = {n: e["container"] for n, e in ir["deploymentSpec"]["executors"].items() if "container" in e}
    settings = platform["deploymentSpec"]["executors"]
    assert containers and set(containers) <= set(settings), set(containers) - set(settings)
    for name, container in containers.items():
        resources = container["resources"]
        for key in ("resourceCpuRequest", "resourceCpuLimit", "resourceMemoryRequest", "resourceMemoryLimit"):
            assert resources.get(key, "").startswith("{{$.inputs.parameters["), (name, key)
        pod = settings[name]
        secrets = {_channel(s["secretNameParameter"]): s for s in pod["secretAsEnv"]}
        assert {m["envVar"] for m in secrets.pop("s3_secret")["keyToEnv"]} == set(S3_SECRET_KEYS)
        if path.name.startswith("labelmatch-monitor"):  # and the serving state's URL
            assert {m["envVar"] for m in secrets.pop("state_secret")["keyToEnv"]} == {"LABELMATCH_STATE_URL"}
        elif "deploy" in name:  # canary and shadow read the serving state; a replace deploy needs none
            state = secrets.pop("state_secret")
            assert {m["envVar"] for m in state["keyToEnv"]} == {"LABELMATCH_STATE_URL"} and state["optional"]
        assert not secrets
        [config] = pod["configMapAsEnv"]
        assert _channel(config["configMapNameParameter"]) == "pipeline_config"
        assert {m["envVar"] for m in config["keyToEnv"]} == set(STORE_CONFIG_KEYS)
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["podMetadata"]["labels"]["app.kubernetes.io/part-of"] == "labelmatch"
        # whatever image the step names at run time (InferenceService, RayJob) uses its own registry
        registry = container["image"].rsplit("/", 1)[0]
        assert {"name": "LABELMATCH_IMAGE_REGISTRY", "value": registry} in container["env"], name
        role = "train" if re.sub(r"^exec-|-\d+$", "", name) in ("tune-sft", "grpo", "export-onnx") else "step"
        assert container["image"] == f"{registry}/labelmatch-{role}:{__version__}", name


@pytest.mark.parametrize("path", SHIPPED_IR, ids=lambda p: p.name)
def test_no_dag_reads_an_input_it_does_not_declare(path: Path) -> None:
    """kfp 2.17's compiler leaves a condition's DAG without the inputs that parameterised
    resources read (see pipelines/training.py); such a step fails in kfp.local and in a cluster."""
    ir, _ = load_ir(path)
    dags = {"root": ir["root"], **{n: c for n, c in ir["components"].items() if "dag" in c}}
    dangling = []
    for name, dag in dags.items():
        declared = set(dag.get("inputDefinitions", {}).get("parameters", {}))
        for task_name, task in dag["dag"]["tasks"].items():
            for param, binding in task.get("inputs", {}).get("parameters", {}).items():
                source = binding.get("componentInputParameter")
                if source and source not in declared:
                    dangling.append(f"{name}/{task_name}.{param} <- {source}")
    assert dangling == []


def _tasks(ir: dict) -> dict[str, dict]:
    """Every task of the IR, nested sub-pipelines included, by task name (last one wins)."""
    found = dict(ir["root"]["dag"]["tasks"])
    for component in ir["components"].values():
        found.update(component.get("dag", {}).get("tasks", {}))
    return found


def test_training_ir_gpu_retries_caching_and_rayjob_shape(rayjob_crd) -> None:
    """GRPO asks for the GPU pool; network steps retry; data_prep is never cached; and the RayJob
    the tune step creates with the IR's own defaults is valid against KubeRay's CRD, strictly."""
    from labelmatch.platform.kuberay import build_rayjob
    from labelmatch.stages.tune import TuneStepConfig, rayjob_trial_resources
    from labelmatch.tuning.pbt import TuneConfig
    from labelmatch.tuning.rayjob import cluster_entrypoint

    ir, platform = load_ir(TRAINING_IR)
    grpo = ir["deploymentSpec"]["executors"]["exec-grpo"]["container"]["resources"]["accelerator"]
    assert {k: v.split("'")[1] for k, v in grpo.items()} == {
        "resourceCount": "pipelinechannel--grpo_gpus", "resourceType": "pipelinechannel--gpu_type"}
    pod = platform["deploymentSpec"]["executors"]["exec-grpo"]
    assert _channel(pod["nodeSelector"]["nodeSelectorJson"]) == "gpu_node_selector"
    assert _channel(pod["tolerations"][0]["tolerationJson"]) == "gpu_tolerations"
    tasks = _tasks(ir)
    assert not tasks["data-prep"]["cachingOptions"].get("enableCache"), "a mutable URI must never hit a cache"
    for name in ("data-prep", "evaluate", "deploy"):
        assert tasks[name]["retryPolicy"]["maxRetryCount"] >= 1, name
    assert "retryPolicy" not in tasks["tune-sft"], "a retried tune would start a second RayJob"

    params = ir["root"]["inputDefinitions"]["parameters"]
    bindings = tasks["tune-sft"]["inputs"]["parameters"]
    defaults = {}
    for name, binding in bindings.items():
        if name.startswith("rayjob_") and "componentInputParameter" in binding:
            defaults[name] = params[binding["componentInputParameter"]].get("defaultValue")
    step = TuneStepConfig.from_parameters(backend="rayjob", run_id="run-42", **defaults)
    spec = step.rayjob_spec()
    assert (spec.workers, spec.gpus_per_worker) == (4, 1)
    assert spec.image == f"ghcr.io/labelmatch/labelmatch-train:{__version__}"
    manifest = build_rayjob(spec, cluster_entrypoint(TuneConfig(), "s3://labelmatch/tune/run-42/dataset",
                                                     "s3://labelmatch/tune/run-42/outputs"))
    assert rayjob_crd(manifest) == []
    workers = manifest["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]
    assert workers["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-A10"}
    assert workers["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    env_from = workers["containers"][0]["envFrom"]
    assert env_from == [{"configMapRef": {"name": "labelmatch-pipeline-config"}},
                        {"secretRef": {"name": "labelmatch-s3-credentials"}}]
    head = manifest["spec"]["rayClusterSpec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0" and "nodeSelector" not in head["template"]["spec"]
    assert head["rayStartParams"]["num-cpus"] == "0", "trials cannot land on the head"
    # The IR's defaults leave no GPU idle: gpus_per_trial 0 becomes one worker's GPUs per trial.
    gpus, cpus = (params[bindings[name]["componentInputParameter"]]["defaultValue"]
                  for name in ("gpus_per_trial", "cpus_per_trial"))
    assert gpus == 0
    assert rayjob_trial_resources({"CPU": cpus}, spec) == {"CPU": cpus, "GPU": 1}


def test_training_ir_gives_the_tune_step_its_pod_and_its_deadline() -> None:
    """The tune step knows its pod (the RayJob's ownerReference) and its own deadline (the
    RayJob's activeDeadlineSeconds and the wait end inside it)."""
    from pipelines.training import TUNE_TIMEOUT_S

    ir, platform = load_ir(TRAINING_IR)
    pod = platform["deploymentSpec"]["executors"]["exec-tune-sft"]
    assert {e["name"]: e["fieldPath"] for e in pod["fieldPathAsEnv"]} == {
        "POD_NAME": "metadata.name", "POD_UID": "metadata.uid"}
    assert int(pod["activeDeadlineSeconds"]) == TUNE_TIMEOUT_S
    deadline = _tasks(ir)["tune-sft"]["inputs"]["parameters"]["deadline_s"]
    assert deadline["runtimeValue"]["constant"] == TUNE_TIMEOUT_S


def test_committed_ir_is_current() -> None:
    """CI fails here when a component or pipeline changed without `make compile`."""
    assert stale_files(COMPILED_DIR) == [], "run `make compile` and commit pipelines/compiled/"


# -- the pipeline, run locally --------------------------------------------------------------------
@pytest.fixture(scope="module")
def feedback_export(tmp_path_factory) -> Path:
    from labelmatch.demo import export_sample_feedback

    return export_sample_feedback(tmp_path_factory.mktemp("feedback"))


@pytest.fixture(scope="module")
def ray_tmp():
    """A short Ray session directory: Ray's socket paths must fit in 107 bytes."""
    with tempfile.TemporaryDirectory(prefix="lmray-", dir="/tmp") as path:
        yield path


@pytest.fixture(scope="module")
def s3_data(sample_dir: Path):
    """The sample data in an S3 server on 127.0.0.1; the environment points every step at it."""
    from labelmatch.platform.artifact_store import ArtifactStore, S3Config

    with moto_s3_server() as url, environ(**s3_env(url)):  # kfp.local's step subprocesses inherit it
        store = ArtifactStore(S3Config.from_env(s3_env(url)))
        for name in ("docs.jsonl", "labels.json"):
            store.put_bytes(f"s3://labelmatch/data/tax/{name}", (sample_dir / name).read_bytes())
        yield "s3://labelmatch/data/tax"


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, s3_data: str, feedback_export: Path, ray_tmp: str) -> Path:
    """Nothing serves yet: data from S3 → tune → GRPO → evaluate → gate → export → local deploy."""
    from pipelines.local import run_locally

    return run_locally(
        TRAINING_IR,
        tmp_path_factory.mktemp("root"),
        data_uri=s3_data,
        max_length=48,
        feedback_uri=str(feedback_export),
        ray_temp_dir=ray_tmp,
        **TINY,
    )


@pytest.mark.slow
def test_artifacts_flow_between_stages(first_run: Path, feedback_export: Path) -> None:
    from pipelines.local import run_artifacts, task_names

    assert {"data-prep", "tune-sft", "grpo", "evaluate", "export-onnx", "deploy"} <= task_names(first_run)
    assert "evaluate-2" not in task_names(first_run), "the no-feedback branch must not run"
    kinds = {(a.task, a.output): a.kind for a in run_artifacts(first_run)}
    assert kinds[("data-prep", "dataset")] == "Dataset"
    assert kinds[("tune-sft", "model")] == "Model" and kinds[("grpo", "model")] == "Model"
    assert kinds[("export-onnx", "onnx_model")] == "OnnxModel" and kinds[("deploy", "release")] == "Report"
    dataset, tuned, improved = (
        first_run / "data-prep/dataset",
        first_run / "tune-sft/model",
        first_run / "grpo/model",
    )
    onnx = first_run / "export-onnx/onnx_model"
    assert read_manifest(tuned)["lineage"]["dataset_digest"] == artifact_digest(dataset)
    grpo_lineage = read_manifest(improved)["lineage"]
    assert grpo_lineage["reference_model_digest"] == artifact_digest(tuned)
    assert grpo_lineage["feedback_digest"] == artifact_digest(feedback_export)
    # The gate judged the exported model, the very artifact deployed.
    evaluation = read_manifest(first_run / "evaluate/report")["lineage"]
    assert evaluation["model"] == artifact_digest(onnx) and evaluation["dataset"] == artifact_digest(dataset)
    assert read_manifest(onnx)["lineage"]["model"] == artifact_digest(improved)
    release = json.loads((first_run / "deploy/release/release.json").read_text())
    assert release["model_digest"] == artifact_digest(onnx) and release["target"] == "local"
    assert release["url"].startswith("http://127.0.0.1:") and release["stopped"]
    predictions = json.loads((first_run / "deploy/release/predictions.json").read_text())
    assert len(predictions) == 3 and all(set(p["scores"]) >= {"vat", "transfer_pricing"} for p in predictions)
    decision = json.loads((first_run / "evaluate/report/decision.json").read_text())
    assert decision["deploy"] and decision["serving_macro_f1"] is None
    assert read_manifest(dataset)["summary"]["source"] == "s3://labelmatch/data/tax"


@pytest.mark.slow
def test_a_worse_candidate_is_not_deployed(
    first_run: Path, sample_dir: Path, tmp_path: Path, ray_tmp: str
) -> None:
    """Second run without feedback: the candidate sees 8 tokens per text, the serving model 48.
    The baseline is the OnnxModel the first run deployed, scored as it is served."""
    from pipelines.local import run_artifacts, run_locally, task_names

    serving = first_run / "export-onnx/onnx_model"
    run = run_locally(
        TRAINING_IR,
        tmp_path / "root",
        data_uri=str(sample_dir),
        max_length=8,
        serving_model_uri=str(serving),
        ray_temp_dir=ray_tmp,
        **TINY,
    )
    ran = task_names(run)
    assert {"data-prep", "tune-sft", "export-onnx-2", "evaluate-2"} <= ran
    assert not ran & {"grpo", "deploy", "deploy-2"}, ran
    decision = json.loads((run / "evaluate-2/report/decision.json").read_text())
    assert not decision["deploy"] and decision["serving_macro_f1"] is not None
    assert decision["candidate_macro_f1"] < decision["serving_macro_f1"] + 0.02
    assert "do not deploy" in (run / "evaluate-2/report/report.md").read_text()
    assert {a.kind for a in run_artifacts(run)} == {"Dataset", "Model", "OnnxModel", "Report"}
    baseline = json.loads((run / "evaluate-2/report/decision.json").read_text())["serving_model"]
    assert baseline["uri"] == str(serving) and baseline["digest"] == artifact_digest(serving)


def test_batch_ir_classifies_s3_shards_locally(tmp_path_factory, s3_data: str, onnx_model, sample_dir: Path,
                                                ray_tmp: str) -> None:
    """The committed batch IR under kfp.local: the model imported by path, documents read from and
    results written to the S3 server, the Report naming what was done; re-submitted, it resumes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from labelmatch.platform.artifact_store import ArtifactStore
    from pipelines.local import run_artifacts, run_locally

    batch_ir = COMPILED_DIR / f"labelmatch-batch-{__version__}.yaml"
    model_dir = onnx_model[0]
    arguments = dict(model_uri=str(model_dir), model_digest=artifact_digest(model_dir),
                      input_uri=f"{s3_data}/docs.jsonl", output_uri="s3://labelmatch/batch/run1",
                      batch_size=16, ray_temp_dir=ray_tmp)
    run = run_locally(batch_ir, tmp_path_factory.mktemp("batch"), **arguments)
    [report] = [a for a in run_artifacts(run) if a.kind == "Report"]
    summary = json.loads((report.path / "summary.json").read_text())
    documents = sum(1 for line in (sample_dir / "docs.jsonl").read_text().splitlines() if line.strip())
    assert summary["rows"] == documents and summary["rejects"] == 0
    assert summary["model_digest"] == artifact_digest(model_dir)
    store = ArtifactStore.from_env()
    table = pq.read_table(pa.BufferReader(store.get_bytes("s3://labelmatch/batch/run1/docs.parquet")))
    assert table.num_rows == documents and len(set(table.column("id").to_pylist())) == documents

    again = run_locally(batch_ir, tmp_path_factory.mktemp("batch"), **arguments)
    [report] = [a for a in run_artifacts(again) if a.kind == "Report"]
    resumed = json.loads((report.path / "summary.json").read_text())
    assert resumed["skipped_done"] == 1 and resumed["rows"] == 0
