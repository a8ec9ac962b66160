"""The architecture holds: layers without upward imports or cycles (import-linter), public
names that resolve, registries filled without import side effects."""

from __future__ import annotations

import importlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[1]
PACKAGES = ["voxplain", "voxplain.data", "voxplain.models", "voxplain.train", "voxplain.explain",
            "voxplain.evaluate", "voxplain.run", "voxplain.report", "voxplain.study",
            "voxplain.steps"]


def test_the_layers_contract_and_the_no_cycle_contract_are_kept():
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert lint is not None, "import-linter is a test dependency (pyproject [test])"
    result = subprocess.run([lint], cwd=REPOSITORY, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout


@pytest.mark.parametrize("package", PACKAGES)
def test_every_public_name_of_a_package_resolves(package):
    module = importlib.import_module(package)
    assert module.__all__, package
    missing = [name for name in module.__all__ if getattr(module, name, None) is None]
    assert not missing, f"{package}: {missing}"


def test_the_method_registry_is_full_on_its_own_import_in_a_fresh_interpreter():
    code = ("from voxplain.explain.methods import METHODS; "
            "print(len(METHODS), sorted(METHODS)[0])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    count, first = result.stdout.split()
    assert int(count) >= 14 and first == "cam"


def test_import_voxplain_is_cheap_and_gives_the_pipeline_in_python():
    code = ("import sys, voxplain; assert 'torch' not in sys.modules; "
            "from voxplain import TrainConfig, run_train, run_pipeline; "
            "assert 'torch' in sys.modules; print(TrainConfig.__module__, run_train.__module__)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.split() == ["voxplain.config", "voxplain.steps.train"]
