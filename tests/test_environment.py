"""The conda environment lists the same packages, at the same minimum versions, as pyproject.toml."""
import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
CONDA_NAMES = {"pytorch": "torch"}  # conda-forge name -> PyPI name


def _split(spec: str):
    name, version = re.match(r"^\s*([A-Za-z0-9_.\-]+)\s*(.*)$", spec).groups()
    name = CONDA_NAMES.get(name.lower(), name.lower()).replace("_", "-")
    return name, version.replace(" ", "")


def pyproject_specs(extras=("course", "dev", "serve")):
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = list(project["dependencies"])
    for extra in extras:
        specs += project["optional-dependencies"][extra]
    return dict(_split(s) for s in specs)


def conda_specs():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    specs = []
    for dep in env["dependencies"]:
        if isinstance(dep, dict):
            specs += dep["pip"]
        elif not dep.startswith(("python", "pip")):
            specs.append(dep)
    return dict(_split(s) for s in specs)


def test_environment_yml_matches_pyproject():
    assert conda_specs() == pyproject_specs()


def test_gpu_extras_bring_cupy_nvrtc_and_the_headers_for_cuda_12_and_13():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert [_split(s)[0] for s in extras["gpu"]] == ["cupy-cuda12x", "nvidia-cuda-nvrtc-cu12", "nvidia-cuda-runtime-cu12"]
    assert [_split(s)[0] for s in extras["gpu13"]] == ["cupy-cuda13x", "nvidia-cuda-nvrtc", "nvidia-cuda-runtime"]

