import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def snakemake_env() -> dict:
    """Environment for a Snakemake subprocess: this interpreter's bin first, so jobs find `python`."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def run_snakemake(workdir: Path, config: dict | None = None, *args: str, check: bool = True):
    """Run the real workflow in `workdir` with `config` merged over config.yaml."""
    command = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(workdir),
               "--cores", "2", *args]
    if config is not None:
        config_path = workdir / "test_config.yaml"
        config_path.write_text(yaml.safe_dump(config))
        command += ["--configfile", str(config_path)]
    result = subprocess.run(command, cwd=workdir, env=snakemake_env(), capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"snakemake failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}")
    return result


@pytest.fixture
def repo() -> Path:
    return REPO
