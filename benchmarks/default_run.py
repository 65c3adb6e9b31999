"""Wall time and per-rule job-seconds of a Snakemake run: where the time of the embedded default goes.

By default it runs `snakemake --cores N` on the embedded default (or `--configfile`, and targets) in a fresh
work directory, so that nothing cached counts, and reads the start and finish time Snakemake logs for every
job. With `--log` it reads a finished run's log instead (`.snakemake/log/*.snakemake.log`, or Snakemake's
captured output). It prints the wall time and, per rule, the jobs, their job-seconds (the sum of their
durations), the shortest and the longest job. Job-seconds over the cores bound the wall time from below; the
difference is waiting (a job that holds both cores counts its seconds once).

Run from the repository root:
    .venv/bin/python benchmarks/default_run.py --cores 2                  # make run's work, from scratch
    .venv/bin/python benchmarks/default_run.py --log .snakemake/log/2026-12-07T231600.snakemake.log
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path

import polars as pl

REPO = Path(__file__).resolve().parents[1]
TIMESTAMP = re.compile(r"^\[(\w{3} \w{3} +\d+ \d\d:\d\d:\d\d \d{4})\]$")
JOB_HEADER = re.compile(r"^(?:local)?(?:rule|checkpoint) (\w+):$")
JOB_ID = re.compile(r"^\s+jobid: (\d+)$")
FINISHED = re.compile(r"^Finished job(?:id)?:? (\d+)")


def job_times(lines: Iterable[str]) -> pl.DataFrame:
    """One row per finished job of a Snakemake log: jobid, rule, start and finish (datetimes). A job's start is
    the timestamp above its `rule NAME:` block, its finish the one above `Finished jobid: N`."""
    stamp, rule, started, finished = None, None, {}, {}
    for line in lines:
        line = line.rstrip("\n")
        if match := TIMESTAMP.match(line):
            stamp = datetime.strptime(match.group(1), "%a %b %d %H:%M:%S %Y")
        elif match := JOB_HEADER.match(line):
            rule = match.group(1)
        elif (match := JOB_ID.match(line)) and rule is not None:
            started[int(match.group(1))] = (rule, stamp)
            rule = None
        elif match := FINISHED.match(line):
            finished[int(match.group(1))] = stamp
    rows = [(job, *started[job], end) for job, end in finished.items() if job in started]
    schema = {"jobid": pl.Int64, "rule": pl.String, "start": pl.Datetime("us"), "finish": pl.Datetime("us")}
    return pl.DataFrame(rows, schema=schema, orient="row")


def rule_table(jobs: pl.DataFrame) -> pl.DataFrame:
    """Per rule: jobs, job_seconds, min_s and max_s of its jobs, the longest total first."""
    seconds = (pl.col("finish") - pl.col("start")).dt.total_seconds()
    return (
        jobs.with_columns(seconds=seconds)
        .group_by("rule")
        .agg(
            jobs=pl.len(),
            job_seconds=pl.col("seconds").sum(),
            min_s=pl.col("seconds").min(),
            max_s=pl.col("seconds").max(),
        )
        .sort(["job_seconds", "rule"], descending=[True, False])
    )


def wall_seconds(jobs: pl.DataFrame) -> float:
    """From the first job's start to the last job's finish."""
    return (jobs["finish"].max() - jobs["start"].min()).total_seconds() if len(jobs) else 0.0


def markdown(table: pl.DataFrame) -> str:
    lines = ["| rule | jobs | job-seconds | per job |", "|---|---|---|---|"]
    for rule, jobs, total, shortest, longest in table.select("rule", "jobs", "job_seconds", "min_s", "max_s").rows():
        per_job = f"{shortest:.0f} s" if shortest == longest else f"{shortest:.0f}–{longest:.0f} s"
        lines.append(f"| {rule} | {jobs} | {total:,.0f} | {per_job} |")
    totals = f"| total | {table['jobs'].sum()} | {table['job_seconds'].sum():,.0f} | |"
    return "\n".join([*lines, totals])


def run_fresh(cores: int, configfile: str | None, targets: list[str]) -> tuple[list[str], float]:
    """Snakemake's output lines of a run from scratch in a temporary work directory, and its wall seconds."""
    with tempfile.TemporaryDirectory(prefix="dejavu-benchmark-") as workdir:
        command = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", workdir]
        command += ["--cores", str(cores), *(["--configfile", str(Path(configfile).resolve())] if configfile else [])]
        started = time.monotonic()
        result = subprocess.run([*command, *targets], cwd=REPO, capture_output=True, text=True)
        wall = time.monotonic() - started
    if result.returncode != 0:
        raise SystemExit(f"snakemake failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result.stderr.splitlines(), wall


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--configfile", help="a config merged over config.yaml (default: the embedded default)")
    parser.add_argument("--log", help="read this finished run's Snakemake log instead of running")
    parser.add_argument("--csv", help="also write the per-rule table here")
    parser.add_argument("targets", nargs="*", help="Snakemake targets (default: all)")
    args = parser.parse_args(argv)
    if args.log:
        lines, wall = Path(args.log).read_text().splitlines(), None
    else:
        lines, wall = run_fresh(args.cores, args.configfile, args.targets)
    jobs = job_times(lines)
    table = rule_table(jobs)
    wall = wall if wall is not None else wall_seconds(jobs)
    print(f"wall {wall:,.0f} s ({wall / 60:.1f} min), {len(jobs)} jobs, {table['job_seconds'].sum():,.0f} job-seconds")
    print(markdown(table))
    if args.csv:
        table.write_csv(args.csv)


if __name__ == "__main__":
    main()
