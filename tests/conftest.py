import copy
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]

# The tiny config (a user can run it too: see its header), merged key by key over config.yaml like any
# --configfile; tests pass it, or a variant of it, to run_snakemake. POINT and SHORT_POINT: its two points.
TINY_CONFIG = REPO / ".test" / "config.yaml"
TINY = yaml.safe_load(TINY_CONFIG.read_text())
POINT = "n_train~all/epochs~2/temperature~learned/weight_decay~0.1/mask_ratio~0.0/seed~0"
SHORT_POINT = POINT.replace("epochs~2", "epochs~1")


def merged(base: dict, overlay: dict) -> dict:
    """`overlay` merged key by key over `base` (as Snakemake merges a --configfile), `base` left unchanged."""
    result = copy.deepcopy(base)
    for key, value in overlay.items():
        result[key] = merged(result.get(key, {}), value) if isinstance(value, dict) else value
    return result


def snakemake_env() -> dict:
    """Environment for a Snakemake subprocess: this interpreter's bin first, so jobs find `python`."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def run_snakemake(workdir: Path, config: dict | None = None, *args: str, check: bool = True):
    """Run the real workflow in `workdir` with `config` merged over config.yaml."""
    command = [
        sys.executable,
        "-m",
        "snakemake",
        "-s",
        str(REPO / "Snakefile"),
        "--directory",
        str(workdir),
        "--cores",
        "2",
        *args,
    ]
    if config is not None:
        config_path = workdir / "test_config.yaml"
        config_path.write_text(yaml.safe_dump(config))
        command += ["--configfile", str(config_path)]
    result = subprocess.run(command, cwd=workdir, env=snakemake_env(), capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(
            f"snakemake failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}"
        )
    return result


def planned_jobs(output: str) -> list[tuple[str, dict]]:
    """(rule, wildcards) for every job of a `snakemake --dry-run` listing."""
    jobs = []
    for line in output.splitlines():
        rule = re.match(r"^(?:local)?rule (\w+):$", line)
        if rule:
            jobs.append((rule.group(1), {}))
        wildcards = re.match(r"^\s+wildcards: (.*)$", line)
        if wildcards and jobs:
            jobs[-1][1].update(item.split("=", 1) for item in wildcards.group(1).split(", "))
    return jobs


@pytest.fixture
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def tiny_workflow(tmp_path_factory) -> Path:
    """The real DAG run once on the tiny config; tests read its results (and must not change them)."""
    workdir = tmp_path_factory.mktemp("tiny_workflow")
    run_snakemake(workdir, TINY)
    return workdir
