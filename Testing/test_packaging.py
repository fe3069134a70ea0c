"""The wheel a user gets from `pip install .` carries the bundled default models (ddm4d/models)."""
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_wheel_carries_the_bundled_models_where_bundled_model_path_looks(tmp_path):
    pytest.importorskip("setuptools", minversion="68", reason="building a wheel without network needs setuptools>=68 "
                        "in this environment (pip install 'setuptools>=68')")
    src = tmp_path / "src"  # a copy, so the build leaves no build/ or egg-info in the checkout
    shutil.copytree(REPO / "ddm4d", src / "ddm4d", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "Resources" / "models", src / "Resources" / "models")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(src),
                    "-w", str(tmp_path / "wheel")], check=True, capture_output=True, timeout=300)
    names = set(zipfile.ZipFile(next((tmp_path / "wheel").glob("ddm4d-*.whl"))).namelist())
    bundled = {p.name for p in (REPO / "Resources" / "models").glob("*.safetensors")}
    assert bundled == {"ddm_phantom_3d.safetensors", "ddm_phantom_2d.safetensors"}
    for name in bundled:
        assert f"ddm4d/models/{name}" in names and f"ddm4d/models/{name[:-len('.safetensors')]}.md" in names
    assert {"ddm4d/generation.py", "ddm4d/refine.py", "ddm4d/networks/blocks.py", "ddm4d/phantom/__init__.py"} <= names
