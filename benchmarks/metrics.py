"""Wall time, CPU time, neighbour rows per second, peak memory and peak spill of the metric stage's CLI.

The input follows the project's contracts at the issue's scale: |P| = 200,000 public ids with 1-8 labels
each (drawn with replacement, so some repeat) from a vocabulary of 1,000; every target record has 1-8
labels too; both models' neighbour tables list k = 100 random public ids per record, written like the kNN
stage writes them (query batches of 16,384, each query's rows together, ranks ascending). The CLI runs as
the workflow runs it, `python -m workflow_scripts.metrics`, with n_boot 100 and frac 0.1, under
`/usr/bin/time` (wall, user + system CPU, peak RSS of that process alone), its $TMPDIR a folder of its own
whose size is polled (the spill: what the stage moves out of memory).

Run from the repository root:

    .venv/bin/python benchmarks/metrics.py                      # 100k and 1M records (inputs ~2.5 GB)
    .venv/bin/python benchmarks/metrics.py --records 10000000   # the paper's scale (inputs ~25 GB)
    .venv/bin/python benchmarks/metrics.py --baseline /tmp/old  # and another checkout, in turns, same inputs

`--work DIR` keeps the inputs (reused by later runs with the same sizes) and the outputs there.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from workflow_scripts.contracts import ANNOTATIONS, NEIGHBORS, SPLIT_IDS  # noqa: E402
from workflow_scripts.io import parquet_stream, write_parquet  # noqa: E402
from workflow_scripts.knn import ROW_GROUP_ROWS  # noqa: E402

N_PUBLIC = 200_000
VOCABULARY = 1_000
MAX_LABELS = 8


def annotations(ids: pa.Array, rng: np.random.Generator) -> pa.Table:
    """The annotations contract: id, labels (1-8 of the vocabulary), scores."""
    counts = rng.integers(1, MAX_LABELS + 1, size=len(ids))
    offsets = pa.array(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32))
    names = pa.array([f"label{i:04d}" for i in range(VOCABULARY)])
    labels = pa.ListArray.from_arrays(offsets, names.take(pa.array(rng.integers(0, VOCABULARY, int(counts.sum())))))
    scores = pa.ListArray.from_arrays(offsets, pa.array(np.ones(int(counts.sum()), np.float32)))
    return pa.table({"id": ids, "labels": labels, "scores": scores})


def string_ids(prefix: str, n: int) -> pa.Array:
    return pa.array(np.char.add(prefix, np.char.zfill(np.arange(n).astype(str), 8)), pa.string())


def distinct_rows(rng: np.random.Generator, n: int, k: int, high: int) -> np.ndarray:
    """n rows of k distinct integers in [0, high), like a query's neighbours (no public record twice)."""
    rows = rng.integers(0, high, (n, k))
    while True:
        ordered = np.sort(rows, axis=1)
        repeated = (ordered[:, 1:] == ordered[:, :-1]).any(axis=1)
        if not repeated.any():
            return rows
        rows[repeated] = rng.integers(0, high, (int(repeated.sum()), k))


def write_neighbors(path: Path, query_ids: pa.Array, public_ids: pa.Array, k: int, rng: np.random.Generator) -> None:
    """k random distinct public neighbours per query (scores descending), one query batch at a time."""
    with parquet_stream(str(path), NEIGHBORS.schema, "knn", {"k": k, "n_queries": len(query_ids)}) as writer:
        for first in range(0, len(query_ids), ROW_GROUP_ROWS):
            n = min(ROW_GROUP_ROWS, len(query_ids) - first)
            scores = -np.sort(-rng.random((n, k), dtype=np.float32), axis=1)
            writer.write_table(
                pa.table(
                    {
                        "query_id": query_ids.slice(first, n).take(pa.array(np.repeat(np.arange(n), k))),
                        "rank": pa.array(np.tile(np.arange(k, dtype=np.int16), n)),
                        "public_id": public_ids.take(pa.array(distinct_rows(rng, n, k, len(public_ids)).reshape(-1))),
                        "score": pa.array(scores.reshape(-1)),
                    },
                    schema=NEIGHBORS.schema,
                )
            )


def make_inputs(folder: Path, n_records: int, k: int) -> dict[str, Path]:
    """The metric stage's five inputs for n_records target records (reused when already there)."""
    paths = {
        name: folder / f"{name}.parquet"
        for name in ("public_annotations", "query_annotations", "queries", "target_neighbors", "reference_neighbors")
    }
    if all(path.exists() for path in paths.values()):
        return paths
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(n_records)
    public_ids, query_ids = string_ids("pub", N_PUBLIC), string_ids("rec", n_records)
    write_parquet(annotations(public_ids, rng), paths["public_annotations"], stage="annotate", contract=ANNOTATIONS)
    write_parquet(annotations(query_ids, rng), paths["query_annotations"], stage="annotate", contract=ANNOTATIONS)
    write_parquet(pa.table({"id": query_ids}), paths["queries"], stage="splits", contract=SPLIT_IDS)
    for side in ("target_neighbors", "reference_neighbors"):
        write_neighbors(paths[side], query_ids, public_ids, k, rng)
    return paths


def run_cli(repo: Path, paths: dict[str, Path], out_dir: Path, k: int, extra: list[str]) -> dict[str, float]:
    """Run the metrics CLI of `repo` under /usr/bin/time; return wall and CPU seconds, peak RSS and the spill
    folder's peak size in MiB."""
    command = [
        sys.executable,
        "-m",
        "workflow_scripts.metrics",
        *[part for name, path in paths.items() for part in (f"--{name.replace('_', '-')}", str(path))],
        "--k",
        str(k),
        "--top-n",
        "10",
        "--n-boot",
        "100",
        "--frac",
        "0.1",
        "--seed",
        "0",
        "--out-dir",
        str(out_dir),
        *extra,
    ]
    with tempfile.NamedTemporaryFile("r") as timing, tempfile.TemporaryDirectory(dir=out_dir.parent) as spill:
        process = subprocess.Popen(
            ["/usr/bin/time", "-o", timing.name, "-f", "%e %U %S %M", *command],
            env={**os.environ, "PYTHONPATH": str(repo), "TMPDIR": spill},
            cwd=repo,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        spill_peak = [0]
        watcher = threading.Thread(target=watch_size, args=(Path(spill), process, spill_peak))
        watcher.start()
        _, stderr = process.communicate()
        watcher.join()
        if process.returncode != 0:
            raise RuntimeError(f"metrics CLI failed ({process.returncode}):\n{stderr[-3000:]}")
        wall, user, system, peak_kb = map(float, timing.read().split()[-4:])
    return {"wall": wall, "cpu": user + system, "peak_mib": peak_kb / 1024, "spill_mib": spill_peak[0] / 2**20}


def watch_size(folder: Path, process: subprocess.Popen, peak: list[int]) -> None:
    """The largest total size of the files under `folder` while `process` runs (polled every 0.2 s)."""
    while process.poll() is None:
        size = 0
        for file in folder.rglob("*"):
            with contextlib.suppress(FileNotFoundError):  # deleted while listed
                size += file.stat().st_size
        peak[0] = max(peak[0], size)
        time.sleep(0.2)


def same_tables(first: Path, second: Path) -> bool:
    return all(
        (first / f"{table}.parquet").read_bytes() == (second / f"{table}.parquet").read_bytes()
        for table in ("records", "population", "sample_level")
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, nargs="+", default=[100_000, 1_000_000], help="target records |A|")
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="runs per size; the median run is printed, and the best wall time (on a shared machine "
        "the CPU's speed varies between runs)",
    )
    parser.add_argument("--repo", type=Path, default=REPO, help="checkout whose workflow_scripts.metrics runs")
    parser.add_argument(
        "--baseline",
        type=Path,
        help="another checkout, run in turns with --repo on the same inputs; its tables are compared",
    )
    parser.add_argument("--work", type=Path, help="keep inputs and outputs here (default: a temporary folder)")
    parser.add_argument("--cli-args", default="", help="extra CLI arguments, e.g. '--batch-rows 1000000'")
    args = parser.parse_args()
    repos = {"baseline": args.baseline, "repo": args.repo} if args.baseline else {"repo": args.repo}
    with tempfile.TemporaryDirectory(prefix="dejavu-bench-metrics-") as tmp:
        work = args.work or Path(tmp)
        print(
            f"{'code':>8} {'records':>10} {'k':>4} {'wall s':>8} {'CPU s':>8} {'neighbour rows/s':>17} "
            f"{'peak RSS MiB':>13} {'spill MiB':>10} {'best wall s':>12}"
        )
        for n_records in args.records:
            paths = make_inputs(work / f"inputs_{n_records}_k{args.k}", n_records, args.k)
            outputs = {name: work / f"out_{n_records}_k{args.k}_{name}" for name in repos}
            runs = {name: [] for name in repos}
            for _ in range(args.repeat):
                for name, repo in repos.items():  # in turns: both see the machine's slow and fast minutes
                    outputs[name].mkdir(parents=True, exist_ok=True)
                    runs[name].append(run_cli(repo, paths, outputs[name], args.k, args.cli_args.split()))
            for name, measured in runs.items():
                measured.sort(key=lambda run: run["wall"])
                median = measured[len(measured) // 2]
                rows_per_second = 2 * n_records * args.k / median["wall"]  # both models' neighbour tables
                print(
                    f"{name:>8} {n_records:>10,} {args.k:>4} {median['wall']:>8.1f} {median['cpu']:>8.1f} "
                    f"{rows_per_second:>17,.0f} {median['peak_mib']:>13,.0f} {median['spill_mib']:>10,.0f} "
                    f"{measured[0]['wall']:>12.1f}",
                    flush=True,
                )
            if args.baseline:
                print(f"{'':>8} tables byte-identical: {same_tables(*outputs.values())}", flush=True)


if __name__ == "__main__":
    main()
