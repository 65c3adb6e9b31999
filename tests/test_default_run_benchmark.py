"""benchmarks/default_run.py reads job times from a Snakemake log: durations and per-rule sums by hand."""

import importlib.util
from pathlib import Path

import pytest

SPEC = importlib.util.spec_from_file_location(
    "default_run", Path(__file__).resolve().parents[1] / "benchmarks" / "default_run.py"
)
default_run = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(default_run)

# Two train jobs side by side (100 s and 130 s), a local rule, a knn job; job 9 starts and never finishes.
LOG = """\
Building DAG of jobs...
[Mon Dec  7 23:16:28 2026]
rule train:
    input: results/splits/scenes/A.parquet
    jobid: 3
    wildcards: split=scenes, side=A
    resources: tmpdir=/tmp

[Mon Dec  7 23:16:30 2026]
rule train:
    jobid: 4
    wildcards: split=scenes, side=B

[Mon Dec  7 23:18:08 2026]
Finished jobid: 3 (Rule: train)
1 of 5 steps (20%) done
[Mon Dec  7 23:18:08 2026]
localrule model:
    jobid: 5

[Mon Dec  7 23:18:08 2026]
Finished jobid: 5 (Rule: model)
[Mon Dec  7 23:18:40 2026]
Finished jobid: 4 (Rule: train)
[Mon Dec  7 23:18:41 2026]
rule knn:
    jobid: 7
[Mon Dec  7 23:18:42 2026]
rule knn:
    jobid: 9
[Mon Dec  7 23:18:43 2026]
Finished jobid: 7 (Rule: knn)
"""


def test_job_times_and_rule_table_by_hand():
    jobs = default_run.job_times(LOG.splitlines())
    assert sorted(jobs.select("jobid", "rule").rows()) == [(3, "train"), (4, "train"), (5, "model"), (7, "knn")]
    table = default_run.rule_table(jobs)
    assert table.rows() == [("train", 2, 230.0, 100.0, 130.0), ("knn", 1, 2.0, 2.0, 2.0), ("model", 1, 0.0, 0.0, 0.0)]
    assert default_run.wall_seconds(jobs) == pytest.approx(135.0)  # 23:16:28 to 23:18:43
    text = default_run.markdown(table)
    assert "| train | 2 | 230 | 100–130 s |" in text and text.endswith("| total | 4 | 232 | |")


def test_an_empty_log_has_no_jobs():
    jobs = default_run.job_times(["Building DAG of jobs...", "Nothing to be done."])
    assert jobs.is_empty() and default_run.wall_seconds(jobs) == 0.0
