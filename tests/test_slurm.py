"""profiles/slurm on a real SLURM cluster: every job runs as a SLURM job and the tables equal a local run's.

Runs when a cluster answers `sinfo` (`.ci/slurm_cluster.sh up`); `.ci/run` starts one around `make test` and sets
DEJAVU_REQUIRE_SLURM=1, which turns the skip into a failure so CI cannot pass without running it.
"""

import json
import os
import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import polars as pl
import pytest
import torch

from conftest import POINT, REPO, TINY, run_snakemake
from workflow_scripts.io import read_metadata

# One point, one public shard, every stage pinned to the CPU: the smallest DAG that reaches the metrics, and a
# config that a cluster without GPUs (like .ci/slurm_cluster.sh's) must run with the profile unedited.
CPU_ONLY = {
    **TINY,
    "training": {**TINY["training"], "device": "cpu"},
    "embedding": {"device": "cpu", "public_shards": 1},
    "knn": {**TINY["knn"], "use_gpu": "never"},
    "sweep": {"epochs": [2], "mask_ratio": [0.0]},
    "one_model": {"enabled": False},
    "ssl": {
        **TINY["ssl"],
        "training": {**TINY["ssl"]["training"], "device": "cpu"},
        "one_model": {"crop_classifier": {**TINY["ssl"]["one_model"]["crop_classifier"], "device": "cpu"}},
        "sweep": {"epochs": [2]},
    },
}
# The plugin's first status check comes 40 s after a submission and the delay grows by 10 s per check while no job
# finishes: on a tiny DAG of short jobs that waiting is most of the run. From 2 s it stays short.
FAST_POLLING = ("--slurm-init-seconds-before-status-checks", "2")
TABLE_DIRS = ("metrics", "utility", "ssl/scenes_pool/metrics")
# Jobs Snakemake runs itself, never submitted: the target `all` (no command), `model` and `ssl_model` (links).
LOCAL_RULES = ("all", "model", "ssl_model")
# Two DDP processes (gloo, CPU) started by srun inside the job, as on several nodes (workflow_scripts.launch).
SRUN_TRAINING = {**CPU_ONLY, "training": {**CPU_ONLY["training"], "gpus_per_node": 2, "use_srun": True}}


def cluster_answers() -> bool:
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return False
    return subprocess.run(["sinfo", "--noheader"], capture_output=True, timeout=60).returncode == 0


@pytest.fixture(scope="module")
def cluster():
    if not cluster_answers():
        if os.environ.get("DEJAVU_REQUIRE_SLURM") == "1":
            pytest.fail("DEJAVU_REQUIRE_SLURM=1 but no SLURM cluster answers sinfo (.ci/slurm_cluster.sh up)")
        pytest.skip("no SLURM cluster answers sinfo (start one: .ci/slurm_cluster.sh up, as root)")


def planned_jobs(output: str) -> Counter:
    """rule -> job count from Snakemake's first 'Job stats' table."""
    table = output.split("Job stats:", 1)[1].split("total", 1)[0]
    return Counter({rule: int(n) for rule, n in re.findall(r"^(\w+)\s+(\d+)\s*$", table, re.MULTILINE)})


def slurm_jobs(run_id: str) -> list[tuple[str, str, str]]:
    """(job id, state, rule) of every job SLURM holds under the run's job name (the plugin names jobs by run)."""
    listing = subprocess.run(
        ["squeue", "--states=all", "--noheader", "--name", run_id, "--format=%i|%T|%k"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    jobs = []
    for line in listing.splitlines():
        job_id, state, comment = line.split("|")  # the plugin's comment: rule_<rule>[_wildcards_<values>]
        jobs.append((job_id, state, comment.removeprefix("rule_").split("_wildcards_")[0]))
    return jobs


def tables(workdir: Path) -> list[Path]:
    return sorted(
        path.relative_to(workdir) for stage in TABLE_DIRS for path in (workdir / "results" / stage).rglob("*.parquet")
    )


@pytest.mark.slurm
@pytest.mark.slow
def test_shipped_profile_runs_every_job_on_slurm_with_the_local_tables(cluster, tmp_path):
    on_slurm, local = tmp_path / "slurm", tmp_path / "local"
    on_slurm.mkdir()
    local.mkdir()
    result = run_snakemake(on_slurm, CPU_ONLY, "--workflow-profile", str(REPO / "profiles" / "slurm"), *FAST_POLLING)
    output = result.stdout + result.stderr
    assert "Using workflow specific profile" in output

    planned = planned_jobs(output)
    for rule in LOCAL_RULES:
        del planned[rule]
    run_id = re.search(r"SLURM run ID: (\S+)", output).group(1)
    jobs = slurm_jobs(run_id)
    assert {job_id for job_id, _, _ in jobs} == set(re.findall(r"submitted with SLURM jobid (\d+)", output))
    assert all(state == "COMPLETED" for _, state, _ in jobs), jobs
    assert Counter(rule for _, _, rule in jobs) == planned  # every job Snakemake ran, rule by rule, SLURM ran

    run_snakemake(local, CPU_ONLY)
    paths = tables(on_slurm)
    assert paths and paths == tables(local)
    for path in paths:
        assert pl.read_parquet(on_slurm / path).equals(pl.read_parquet(local / path)), path
        assert (on_slurm / path).read_bytes() == (local / path).read_bytes(), path  # provenance metadata too


@pytest.mark.slurm
@pytest.mark.slow
def test_training_runs_as_srun_tasks_and_equals_the_torchrun_run(cluster, tmp_path):
    """The multi-node launch path (srun inside the SLURM job) on a real cluster: two gloo tasks on one node.

    The same two-process training under torchrun on this machine must give the same weights: srun changes how the
    processes start, not what they compute.
    """
    model_dir = f"results/models/scenes/{POINT}/A"
    on_slurm, local = tmp_path / "slurm", tmp_path / "local"
    on_slurm.mkdir()
    local.mkdir()
    result = run_snakemake(
        on_slurm,
        SRUN_TRAINING,
        "--workflow-profile",
        str(REPO / "profiles" / "slurm"),
        *FAST_POLLING,
        f"{model_dir}/model.pt",
    )
    output = result.stdout + result.stderr
    run_id = re.search(r"SLURM run ID: (\S+)", output).group(1)
    jobs = slurm_jobs(run_id)
    assert [(state, rule) for _, state, rule in jobs if rule == "train"] == [("COMPLETED", "train")], jobs
    assert "srun --kill-on-bad-exit=1 --nodes=1 --ntasks-per-node=2" in output
    provenance = json.loads(read_metadata(on_slurm / model_dir / "run" / "train_log.parquet")["dejavu:params"])
    assert provenance["world_size"] == 2

    torchrun = {**SRUN_TRAINING, "training": {**SRUN_TRAINING["training"], "use_srun": False}}
    run_snakemake(local, torchrun, f"{model_dir}/model.pt")
    trained = [
        torch.load(workdir / model_dir / "model.pt", weights_only=True)["state_dict"] for workdir in (on_slurm, local)
    ]
    assert trained[0].keys() == trained[1].keys()
    assert all(torch.equal(trained[0][name], trained[1][name]) for name in trained[0])
    logs = [
        pl.read_parquet(workdir / model_dir / "run" / "train_log.parquet").drop("seconds")
        for workdir in (on_slurm, local)
    ]
    assert logs[0].equals(logs[1])
