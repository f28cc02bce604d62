"""Cache policy: the shipped IR never caches a step whose input is a mutable URI; `pipeline run
--no-cache` / `--no-cache-step` land in the created run as the KFP 2.17.0 backend and its v2
driver read them (tests/kfp_stub.py); and under kfp.local 2.17.0, whose local cache honours each
task's cachingOptions (kfp/local/orchestrator/task_executor.py), the shipped data-prep step
reads an overwritten file afresh while a cached copy of it would serve the old Dataset."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import pytest
import yaml
from conftest import run_cli as _cli
from kfp_stub import run_caching, shipped_ir

from labelmatch import __version__
from labelmatch.core.errors import ConfigError
from labelmatch.platform.kfp import PipelineRegistry
from labelmatch.platform.kfp_cache import CachePolicy, apply_cache_policy, step_caching
from pipelines.registry import COMPILED_DIR

TRAINING = "labelmatch-training"
TRAINING_IR = COMPILED_DIR / f"{TRAINING}-{__version__}.yaml"
#: Steps whose input can change behind the same URI or parameters, and why (docs/pipelines.md).
NEVER_CACHED = {
    # data_uri; feedback_uri (the importer reuses the artifact); the model serving now; a side effect
    TRAINING: {"data-prep", "grpo", "evaluate", "deploy"},
    "labelmatch-deploy": {"deploy"},  # a side effect
    "labelmatch-monitor": {"monitor-drift"},  # a window of live traffic
    "labelmatch-batch": {"batch-classify"},  # writes outside KFP's artifacts
}


def _spec(name: str) -> dict:
    return next(yaml.safe_load_all((COMPILED_DIR / f"{name}-{__version__}.yaml").read_text()))


@pytest.mark.parametrize("name", sorted(NEVER_CACHED))
def test_shipped_ir_never_caches_a_step_with_a_mutable_input(name: str) -> None:
    caching = step_caching(_spec(name))
    assert {step for step in NEVER_CACHED[name] if caching[step]} == set()
    if name == TRAINING:  # their inputs are artifacts of the same run: KFP keys them by artifact id
        assert caching["tune-sft"] and caching["export-onnx"]


def test_policy_rewrites_every_dag_and_refuses_unknown_steps() -> None:
    spec = _spec(TRAINING)
    before = copy.deepcopy(spec)
    assert apply_cache_policy(spec, CachePolicy()) == spec
    off = step_caching(apply_cache_policy(spec, CachePolicy.from_options(True, ["tune_sft", "export-onnx"])))
    assert not off["tune-sft"] and not off["export-onnx"]  # export-onnx of both nested release DAGs
    assert {k for k, v in off.items() if v} == {k for k, v in step_caching(spec).items() if v} - {
        "tune-sft", "export-onnx"}
    assert not any(step_caching(apply_cache_policy(spec, CachePolicy(enabled=False))).values())
    assert spec == before  # a copy is rewritten
    with pytest.raises(ConfigError, match=r"--no-cache-step tune: no step of that name in "
                                          r"labelmatch-training \(steps: .*data-prep.*tune-sft"):
        apply_cache_policy(spec, CachePolicy.from_options(True, ["tune"]))
    assert CachePolicy.from_options(True, ["grpo", "grpo"]).describe() == "off for grpo"


def test_cache_flags_land_in_the_run_as_the_backend_reads_them(kfp, tmp_path) -> None:
    """As compiled: the run references the version (its stored caching applies). --no-cache-step
    and --no-cache: the version's stored spec inline (platform spec kept), the named tasks' (every
    task's) enableCache false in every DAG; the run reads back with its pipeline and version."""
    url, state = kfp
    registry = PipelineRegistry(url)
    version = registry.upload(shipped_ir(tmp_path, TRAINING, "0.1.0"), "0.1.0")
    stored = state.versions[version.pipeline_id][0]["pipeline_spec"]
    params = ["--param", "data_uri=s3://labelmatch/data/tax", "--param", "trials=2"]

    result = _cli("pipeline", "run", "--host", url, *params)
    assert result.exit_code == 0 and "cache as compiled" in result.output, result.output
    plain = list(state.runs.values())[-1]
    assert "pipeline_spec" not in plain and plain["pipeline_version_reference"]["pipeline_version_id"]
    compiled = run_caching(state, plain["run_id"])
    assert not compiled["root/data-prep"] and compiled["root/tune-sft"]
    assert not compiled["comp-labelmatch-improve/grpo"]

    result = _cli("pipeline", "run", "--host", url, *params, "--no-cache-step", "tune_sft",
                  "--no-cache-step", "export-onnx")
    assert result.exit_code == 0, result.output
    assert "cache off for tune-sft, export-onnx" in result.output
    run = list(state.runs.values())[-1]
    assert "pipeline_version_reference" not in run  # the oneof: the spec inline instead
    assert run["pipeline_spec"]["platform_spec"] == stored["platform_spec"]
    assert run["runtime_config"]["parameters"] == {"data_uri": "s3://labelmatch/data/tax", "trials": 2}
    caching = run_caching(state, run["run_id"])
    changed = {task for task in caching if caching[task] != compiled[task]}
    assert changed == {"root/tune-sft", "comp-labelmatch-release/export-onnx",
                       "comp-labelmatch-release-2/export-onnx"}
    found = registry.find_run(run["run_id"])
    assert (found.pipeline, found.version) == (TRAINING, "0.1.0")
    assert found.parameters == {"data_uri": "s3://labelmatch/data/tax", "trials": 2}

    result = _cli("pipeline", "run", "--host", url, *params, "--no-cache")
    assert result.exit_code == 0 and "cache off)" in result.output, result.output
    assert not any(run_caching(state, list(state.runs)[-1]).values())

    runs = len(state.runs)
    result = _cli("pipeline", "run", "--host", url, *params, "--no-cache-step", "train")
    assert result.exit_code != 0 and "--no-cache-step train: no step of that name" in str(result.exception)
    assert len(state.runs) == runs


# -- kfp.local ------------------------------------------------------------------------------------


def _data_prep_only(enable_cache: bool | None = None) -> dict:
    """The shipped training IR cut down to its data-prep task (component, executor, settings as
    shipped), the Dataset as the pipeline's output; ``enable_cache`` overrides its cachingOptions."""
    spec = _spec(TRAINING)
    task = copy.deepcopy(spec["root"]["dag"]["tasks"]["data-prep"])
    if enable_cache is not None:
        task["cachingOptions"] = {"enableCache": enable_cache}
    component = spec["components"][task["componentRef"]["name"]]
    executor = component["executorLabel"]
    dataset = component["outputDefinitions"]["artifacts"]["dataset"]
    return {
        "pipelineInfo": {"name": "data-prep-only"},
        "schemaVersion": spec["schemaVersion"],
        "sdkVersion": spec["sdkVersion"],
        "components": {task["componentRef"]["name"]: component},
        "deploymentSpec": {"executors": {executor: spec["deploymentSpec"]["executors"][executor]}},
        "root": {
            "inputDefinitions": spec["root"]["inputDefinitions"],
            "outputDefinitions": {"artifacts": {"dataset": dataset}},
            "dag": {
                "tasks": {"data-prep": task},
                "outputs": {"artifacts": {"dataset": {"artifactSelectors": [
                    {"outputArtifactKey": "dataset", "producerSubtask": "data-prep"}]}}},
            },
        },
    }


def _documents(spec: dict, out: Path, data: Path) -> list[str]:
    """Run ``spec`` under kfp.local (its local cache on) and return the ids in its Dataset."""
    from kfp.components import load_component_from_file

    path = out / f"ir-{len(list(out.glob('ir-*')))}.yaml"
    path.write_text(yaml.safe_dump(spec))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="You may be attemping to run a task",
                                category=RuntimeWarning)
        dataset = load_component_from_file(str(path))(data_uri=str(data)).output
    return [json.loads(line)["id"] for line in (Path(dataset.path) / "docs.jsonl").read_text().splitlines()]


def test_kfp_local_cache_honours_the_shipped_policy(tmp_path, sample_dir: Path) -> None:
    """kfp.local with its cache on (kfp 2.17.0: local.init(enable_caching=True)). A data-prep
    compiled with caching on serves the first Dataset after docs.jsonl is overwritten (stale);
    the shipped data-prep (caching off) and one whose caching a run's --no-cache-step turns off
    read the new file."""
    from kfp import local

    data = tmp_path / "data"
    data.mkdir()
    (data / "labels.json").write_text((sample_dir / "labels.json").read_text())
    lines = (sample_dir / "docs.jsonl").read_text().splitlines()
    (data / "docs.jsonl").write_text("\n".join(lines[:60]) + "\n")
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "root"),
               raise_on_error=True, enable_caching=True, cache_root=str(tmp_path / "cache"))
    try:
        cached = _data_prep_only(enable_cache=True)
        first = _documents(cached, tmp_path, data)
        assert len(first) > 40
        (data / "docs.jsonl").write_text("\n".join(lines[60:100]) + "\n")  # same URI, new content
        assert _documents(cached, tmp_path, data) == first, "kfp.local served the cached Dataset"
        fresh = _documents(_data_prep_only(), tmp_path, data)  # as shipped: caching off
        assert set(fresh).isdisjoint(first) and len(fresh) <= 40
        policy = CachePolicy.from_options(True, ["data_prep"])
        assert _documents(apply_cache_policy(cached, policy), tmp_path, data) == fresh
    finally:
        local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "root"))
