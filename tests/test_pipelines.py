"""Pipelines: compiled IR (components, inputs, types, conditions), committed IR current, and the
training pipeline run locally with kfp.local on tiny settings — artifacts flow between stages
and the gate works both ways.
"""

import json
import tempfile
from pathlib import Path

import pytest
import yaml

from labelmatch import __version__
from labelmatch.artifacts import artifact_digest, read_manifest
from pipelines.registry import COMPILED_DIR, compile_all, registered_pipelines, stale_files

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


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("ir")
    return {path.name: yaml.safe_load(path.read_text()) for path in compile_all(out)}


def _params(ir: dict) -> dict[str, str]:
    return {k: v["parameterType"] for k, v in ir["root"]["inputDefinitions"]["parameters"].items()}


def test_registry_versions_follow_the_package() -> None:
    names = {p.name: p for p in registered_pipelines()}
    assert set(names) == {"labelmatch-training", "labelmatch-deploy"}
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
    images = {e["container"]["image"] for e in ir["deploymentSpec"]["executors"].values() if "container" in e}
    assert images == {f"ghcr.io/labelmatch/labelmatch-train:{__version__}"}


def test_deploy_ir_takes_the_rollback_parameters(compiled: dict) -> None:
    from labelmatch.deploy import DEPLOY_PARAMETERS

    ir = compiled[f"labelmatch-deploy-{__version__}.yaml"]
    assert set(DEPLOY_PARAMETERS) <= set(_params(ir))
    assert "comp-importer" in ir["components"] and "comp-deploy" in ir["components"]
    importer = ir["deploymentSpec"]["executors"]["exec-importer"]["importer"]
    assert importer["typeSchema"]["schemaTitle"] == "system.Model"


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
def first_run(tmp_path_factory, sample_dir: Path, feedback_export: Path, ray_tmp: str) -> Path:
    """Nothing serves yet: tune → GRPO → evaluate → deploy decision → export → local deploy."""
    from pipelines.local import run_locally
    from pipelines.training import training_pipeline

    return run_locally(
        training_pipeline,
        tmp_path_factory.mktemp("root"),
        data_uri=str(sample_dir),
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
    evaluation = read_manifest(first_run / "evaluate/report")["lineage"]
    assert evaluation["model"] == artifact_digest(improved) and evaluation["dataset"] == artifact_digest(
        dataset
    )
    assert read_manifest(onnx)["lineage"]["model"] == artifact_digest(improved)
    release = json.loads((first_run / "deploy/release/release.json").read_text())
    assert release["model_digest"] == artifact_digest(onnx) and release["target"] == "local"
    assert release["url"].startswith("http://127.0.0.1:") and release["stopped"]
    predictions = json.loads((first_run / "deploy/release/predictions.json").read_text())
    assert len(predictions) == 3 and all(set(p["scores"]) >= {"vat", "transfer_pricing"} for p in predictions)
    decision = json.loads((first_run / "evaluate/report/decision.json").read_text())
    assert decision["deploy"] and decision["serving_macro_f1"] is None


@pytest.mark.slow
def test_a_worse_candidate_is_not_exported_or_deployed(
    first_run: Path, sample_dir: Path, tmp_path: Path, ray_tmp: str
) -> None:
    """Second run without feedback: the candidate sees 8 tokens per text, the serving model 48."""
    from pipelines.local import run_artifacts, run_locally, task_names
    from pipelines.training import training_pipeline

    serving = first_run / "grpo/model"
    run = run_locally(
        training_pipeline,
        tmp_path / "root",
        data_uri=str(sample_dir),
        max_length=8,
        serving_model_uri=str(serving),
        ray_temp_dir=ray_tmp,
        **TINY,
    )
    ran = task_names(run)
    assert {"data-prep", "tune-sft", "evaluate-2"} <= ran
    assert not ran & {"grpo", "export-onnx", "export-onnx-2", "deploy", "deploy-2"}, ran
    decision = json.loads((run / "evaluate-2/report/decision.json").read_text())
    assert not decision["deploy"] and decision["serving_macro_f1"] is not None
    assert decision["candidate_macro_f1"] < decision["serving_macro_f1"] + 0.02
    assert "do not deploy" in (run / "evaluate-2/report/report.md").read_text()
    assert {a.kind for a in run_artifacts(run)} == {"Dataset", "Model", "Report"}
