"""Components: typed, documented, one pinned image, and bad input artifacts fail by name.

The failure tests run real components with ``kfp.local`` (subprocesses of this interpreter) on
artifacts imported by path, and read the step's log for the message.
"""

import inspect
import json
import re
from pathlib import Path

import pytest

import components
from components._image import IMAGE_STEP, IMAGE_TRAIN
from labelmatch import __version__
from labelmatch.core.artifacts import write_manifest

STAGES = ("data_prep", "tune_sft", "grpo", "evaluate", "export_onnx", "deploy")
#: Which image each component runs in: torch (train) only where a step trains or exports.
IMAGES = {
    **dict.fromkeys(("data_prep", "evaluate", "deploy", "monitor_drift", "batch_classify"), IMAGE_STEP),
    **dict.fromkeys(("tune_sft", "grpo", "export_onnx"), IMAGE_TRAIN),
}


@pytest.mark.parametrize("name", STAGES)
def test_component_is_typed_documented_and_pinned(name: str) -> None:
    component = getattr(components, name)
    spec = component.component_spec
    container = spec.implementation.container
    assert container.image == IMAGES[name] and container.image.endswith(f":{__version__}")
    command = " ".join(container.command or [])
    assert "pip install" not in command, "components must not install anything at start-up"
    doc = inspect.getdoc(component.python_func)
    names = [*(spec.inputs or {}), *(spec.outputs or {})]
    for io_name in names:
        if io_name != "Output":
            documented = re.search(rf"^\s+{io_name}:", doc, re.M) or f"``{io_name}``" in doc
            assert documented, f"{name}: '{io_name}' is not documented"
    for io_name, io_spec in (spec.inputs or {}).items():
        assert io_spec.type, f"{name}.{io_name} has no type"


def test_artifact_types() -> None:
    def types(component, side):
        return {k: v.type for k, v in (getattr(component.component_spec, side) or {}).items()}

    assert types(components.data_prep, "outputs")["dataset"] == "system.Dataset@0.0.1"
    assert types(components.data_prep, "outputs")["report_page"] == "system.Markdown@0.0.1"
    assert types(components.tune_sft, "inputs")["dataset"] == "system.Dataset@0.0.1"
    assert types(components.tune_sft, "outputs")["model"] == "system.Model@0.0.1"
    assert types(components.evaluate, "outputs")["metrics"] == "system.Metrics@0.0.1"
    assert types(components.evaluate, "outputs")["Output"] == "Boolean"
    assert types(components.evaluate, "inputs")["min_improvement"] == "Float"
    assert types(components.export_onnx, "outputs")["onnx_model"] == "system.Model@0.0.1"
    assert types(components.deploy, "inputs")["onnx_model"] == "system.Model@0.0.1"


def test_image_is_named_in_one_place() -> None:
    root = Path(components.__file__).parent
    for path in root.glob("*.py"):
        assert "ghcr.io" not in path.read_text(), f"{path.name} names an image: labelmatch.platform.images"
    assert set(IMAGES) == set(components.__all__)
    expected = {role: f"ghcr.io/labelmatch/labelmatch-{role}:{__version__}" for role in ("step", "train")}
    assert expected == {"step": IMAGE_STEP, "train": IMAGE_TRAIN}


def test_every_component_takes_its_image_at_compile_time() -> None:
    """Each component's image follows LABELMATCH_IMAGE_REGISTRY when it is compiled (a fresh
    interpreter: the names are fixed when ``components`` is imported)."""
    import os
    import subprocess
    import sys

    code = (
        "import json, components\n"
        "print(json.dumps({n: getattr(components, n).component_spec.implementation.container.image"
        " for n in components.__all__}))\n"
    )
    env = {**os.environ, "LABELMATCH_IMAGE_REGISTRY": "mirror.example:5000/ml/"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env,
                         cwd=Path(components.__file__).parents[1])
    images = json.loads(out.stdout)
    for name, image in IMAGES.items():
        role = image.rsplit("/", 1)[1]
        assert images[name] == f"mirror.example:5000/ml/{role}", name


# -- bad input artifacts -------------------------------------------------------------------------
def _fake_artifact(root: Path, kind: str) -> Path:
    root.mkdir(parents=True)
    (root / "labels.json").write_text(json.dumps({"vat": "Value added tax."}))
    (root / "tokenizer").mkdir()
    (root / "tokenizer" / "tokenizer.json").write_text("{}")
    write_manifest(root, kind)
    return root


def _run_deploy_only(tmp_path: Path, model_uri: str) -> None:
    """The compiled deploy IR that ships, run with kfp.local."""
    from pipelines.local import run_locally
    from pipelines.registry import COMPILED_DIR

    ir = COMPILED_DIR / f"labelmatch-deploy-{__version__}.yaml"
    run_locally(ir, tmp_path / "root", model_uri=model_uri, target="local")


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("delete", r"artifact {art}: file tokenizer/tokenizer.json listed in manifest.json is missing"),
        ("modify", r"artifact {art}: file labels.json is corrupted \(sha256"),
        ("kind", r"artifact {art}: kind is 'Dataset', expected 'OnnxModel'"),
        ("no-manifest", r"artifact {art}: missing manifest.json"),
    ],
)
def test_bad_input_artifact_fails_naming_artifact_and_file(
    tmp_path: Path, capfd, no_retry_wait, damage: str, message: str
) -> None:
    art = _fake_artifact(tmp_path / "onnx", "Dataset" if damage == "kind" else "OnnxModel")
    if damage == "delete":
        (art / "tokenizer" / "tokenizer.json").unlink()
    elif damage == "modify":
        (art / "labels.json").write_text(json.dumps({"vat": "changed"}))
    elif damage == "no-manifest":
        (art / "manifest.json").unlink()
    with pytest.raises(RuntimeError, match="deploy"):
        _run_deploy_only(tmp_path, str(art))
    log = capfd.readouterr().out
    assert re.search(message.format(art=re.escape(str(art))), log), log[-3000:]
    assert "ArtifactError" in log


def test_evaluate_refuses_a_model_that_is_a_dataset(tmp_path: Path, capfd, sample_dir: Path) -> None:
    """A Dataset passed where the candidate Model goes: the evaluate step names it."""
    from kfp import dsl

    from labelmatch.data.prepare import prepare_dataset
    from pipelines.local import run_locally

    prepare_dataset(sample_dir, tmp_path / "ds", tmp_path / "rep")

    @dsl.pipeline(name="evaluate-wrong-kind")
    def wrong_kind(uri: str):
        data = dsl.importer(artifact_uri=uri, artifact_class=dsl.Dataset)
        not_a_model = dsl.importer(artifact_uri=uri, artifact_class=dsl.Model)
        components.evaluate(model=not_a_model.output, dataset=data.output)

    with pytest.raises(RuntimeError, match="evaluate"):
        run_locally(wrong_kind, tmp_path / "root", uri=str(tmp_path / "ds"))
    log = capfd.readouterr().out
    assert f"artifact {tmp_path / 'ds'}: kind is 'Dataset', expected 'Model'" in log


def test_deploy_step_settings_are_checked(monkeypatch) -> None:
    from labelmatch.core.errors import ConfigError
    from labelmatch.platform.artifact_store import as_s3_uri
    from labelmatch.stages.deploy import DeployStepConfig

    monkeypatch.delenv("LABELMATCH_STORE_ROOT", raising=False)
    with pytest.raises(ConfigError, match="'local' or 'kserve'"):
        DeployStepConfig(target="docker")
    with pytest.raises(ConfigError, match="release_root"):
        DeployStepConfig(target="kserve")
    with pytest.raises(ConfigError, match="expected s3://"):
        DeployStepConfig(target="kserve", release_root="/tmp/releases")
    # In a cluster the pipeline ConfigMap names the store root: the default release root.
    monkeypatch.setenv("LABELMATCH_STORE_ROOT", "s3://labelmatch")
    assert DeployStepConfig(target="kserve").release_root == "s3://labelmatch"
    assert as_s3_uri("minio://mlpipeline/v2/artifacts/x") == "s3://mlpipeline/v2/artifacts/x"
    assert as_s3_uri("s3://bucket/key") == "s3://bucket/key"


def _library_defaults() -> dict[str, dict]:
    """Each component's parameters that a library config also has, with the library's default."""
    from labelmatch.data.prepare import PrepConfig
    from labelmatch.evaluation.gate import GateConfig
    from labelmatch.export.onnx import ExportConfig
    from labelmatch.feedback.grpo import GRPOConfig
    from labelmatch.stages.deploy import DeployStepConfig
    from labelmatch.tuning.pbt import TuneConfig

    tune = TuneConfig()
    grpo = GRPOConfig()
    return {
        "data_prep": {k: getattr(PrepConfig(), k) for k in
                      ("val_fraction", "test_fraction", "seed", "redact_pii", "deduplicate")},
        "tune_sft": {
            "trials": tune.trials, "iterations": tune.iterations, "seed": tune.seed,
            **{k: getattr(tune.train_config, k) for k in
               ("base_model", "steps_per_iteration", "batch_size", "max_length")},
        },
        "grpo": {
            **{k: getattr(grpo, k) for k in
               ("epochs", "group_size", "batch_size", "beta", "lr", "max_principal_share",
                "replay_kl_weight", "replay_bce_weight", "seed")},
            "steps": 0,  # 0 = GRPOConfig.steps None (from epochs)
        },
        "evaluate": {
            k: getattr(GateConfig(), k)
            for k in ("min_improvement", "max_label_regression", "max_micro_regression", "split")
        },
        "export_onnx": {k: getattr(ExportConfig(), k) for k in
                        ("agreement_gate", "per_channel", "optimize", "keep_fp32", "max_parity_docs",
                         "fp32_fallback")},
        "deploy": {k: getattr(DeployStepConfig(), k) for k in
                   ("strategy", "canary_rules", "shadow_window_s")},
    }


@pytest.mark.parametrize("name", sorted(_library_defaults()))
def test_component_defaults_are_the_librarys(name: str) -> None:
    """One source of defaults: what a component (hence the compiled IR) runs with unless told
    otherwise is what the library, its CLI and the benchmarks use."""
    inputs = getattr(components, name).component_spec.inputs
    assert {k: inputs[k].default for k in _library_defaults()[name]} == _library_defaults()[name]
    from labelmatch.feedback.grpo import GRPOConfig

    assert GRPOConfig.steps is None


def test_pipeline_defaults_pass_the_component_defaults_through() -> None:
    """A pipeline parameter feeding a component parameter has the component's default."""
    from pipelines.training import training_pipeline

    pipeline = training_pipeline.component_spec.inputs
    feeds = {"trials": "tune_sft", "iterations": "tune_sft", "steps_per_iteration": "tune_sft",
             "batch_size": "tune_sft", "max_length": "tune_sft", "base_model": "tune_sft",
             "grpo_epochs": ("grpo", "epochs"), "grpo_steps": ("grpo", "steps"),
             "grpo_max_principal_share": ("grpo", "max_principal_share"),
             "grpo_replay_kl_weight": ("grpo", "replay_kl_weight"),
             "grpo_replay_bce_weight": ("grpo", "replay_bce_weight"),
             "min_improvement": "evaluate", "max_label_regression": "evaluate",
             "max_micro_regression": "evaluate",
             "deploy_strategy": ("deploy", "strategy"), "canary_rules": "deploy", "shadow_window_s": "deploy",
             "export_agreement_gate": ("export_onnx", "agreement_gate"), "redact_pii": "data_prep"}
    for param, target in feeds.items():
        component, name = target if isinstance(target, tuple) else (target, param)
        component_default = getattr(components, component).component_spec.inputs[name].default
        assert pipeline[param].default == component_default, param
    # Progressive delivery is opt-in: the pipelines deploy by replacing until a platform team says so.
    from pipelines.deploy import deploy_pipeline

    assert pipeline["deploy_strategy"].default == "replace"
    assert deploy_pipeline.component_spec.inputs["strategy"].default == "replace"


# -- the step image's components run without torch ------------------------------------------------
_NO_TORCH = """
import importlib, importlib.abc, json, sys
class _NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.partition(".")[0] in ("torch", "transformers", "peft"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, _NoTorch())
"""


def test_the_step_image_components_need_no_torch(
    tmp_path: Path, sample_dir: Path, trained_model: Path, onnx_model
) -> None:
    """What ``labelmatch-step`` (no torch) must run, run here with torch, transformers and peft made
    unimportable: every module of :data:`~labelmatch.platform.images.STEP_MODULES`, then data_prep,
    the evaluate step's gate on an exported OnnxModel (as the training pipeline runs them) and the
    batch step on a local Ray.
    A torch Model handed to evaluate fails with a message that names the train image."""
    import os
    import shutil
    import subprocess
    import sys
    import tempfile

    model_dir, _ = onnx_model
    # Ray's session directory (and HOME, for its token) short: its socket paths must fit 107 bytes
    ray_dir = Path(tempfile.mkdtemp(prefix="lmstep", dir="/tmp"))
    code = _NO_TORCH + f"""
from labelmatch.platform.images import STEP_MODULES
for module in STEP_MODULES:
    importlib.import_module(module)
from labelmatch.data.prepare import prepare_dataset
from labelmatch.evaluation.gate import evaluate_candidate
from labelmatch.core.errors import ConfigError
tmp = {str(tmp_path)!r}
summary = prepare_dataset({str(sample_dir)!r}, tmp + "/dataset", tmp + "/prep-report")
result = evaluate_candidate({str(model_dir)!r}, tmp + "/dataset", tmp + "/report")
try:
    evaluate_candidate({str(trained_model)!r}, tmp + "/dataset", tmp + "/report-2")
except ConfigError as exc:
    torch_model = str(exc)
from labelmatch.stages.batch import BatchStepConfig, run_batch_step
docs = [json.loads(line) for line in open({str(sample_dir / "docs.jsonl")!r}).read().splitlines()[:12]]
with open(tmp + "/in.jsonl", "w") as f:
    f.writelines(json.dumps({{"id": d["id"], "text": d["text"]}}) + "\\n" for d in docs)
batch = run_batch_step({str(model_dir)!r}, tmp + "/batch-report", BatchStepConfig(
    input_uri=tmp + "/in.jsonl", output_uri=tmp + "/batch-out", ray_temp_dir={str(ray_dir)!r}))
loaded = sorted(m for m in sys.modules if m.partition(".")[0] in ("torch", "transformers", "peft"))
print(json.dumps({{"documents": summary["documents"], "deploy": result["decision"]["deploy"],
                  "rows": batch["rows"], "macro_f1": result["metrics"]["macro_f1"],
                  "torch_model": torch_model, "loaded": loaded}}))
"""
    from labelmatch.core.artifacts import verify_artifact

    env = {**os.environ, "HOME": str(ray_dir), "RAY_TMPDIR": str(ray_dir)}
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                             env=env)
    finally:
        shutil.rmtree(ray_dir, ignore_errors=True)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["loaded"] == []
    assert result["documents"] > 0 and result["deploy"] is True and 0.0 <= result["macro_f1"] <= 1.0
    assert "torch" in result["torch_model"] and "train image" in result["torch_model"]
    assert result["rows"] == 12  # batch_classify: Ray Data over ONNX Runtime
    verify_artifact(tmp_path / "dataset", "Dataset")
    verify_artifact(tmp_path / "report", "Report")
