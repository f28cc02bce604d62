"""The package layout: every package's public names resolve, lazily, and serving stays torch-free."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGES = ["core", "data", "model", "training", "tuning", "feedback", "evaluation", "export", "serving",
            "runtime", "platform", "stages", "state", "batch", "delivery"]


@pytest.mark.parametrize("name", PACKAGES)
def test_every_public_name_of_a_package_resolves(name):
    package = importlib.import_module(f"labelmatch.{name}")
    assert package.__all__, f"labelmatch.{name} exports nothing"
    modules = {p.stem for p in Path(package.__file__).parent.glob("*.py")}
    assert not modules & set(package.__all__), "a public name would shadow a module of the package"
    for public in package.__all__:
        assert getattr(package, public).__name__ == public
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        package.nope  # noqa: B018


def test_the_serving_package_and_the_shared_prediction_core_never_import_torch():
    code = (
        "import sys\n"
        "from labelmatch.runtime import OnnxClassifier\nfrom labelmatch.serving import LabelmatchModel\n"
        "from labelmatch.model.matching import LabelMatcher\n"
        "assert issubclass(OnnxClassifier, LabelMatcher)\n"
        "print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_importing_a_package_imports_none_of_its_modules():
    code = "import sys, labelmatch.model; print('labelmatch.model.classifier' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
