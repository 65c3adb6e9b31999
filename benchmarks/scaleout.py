"""Throughput and peak memory of the scaled-out stages: embed, kNN (sharded search + exact merge) and metrics.

Every stage runs as the workflow runs it, `python -m workflow_scripts.<stage>` in its own process, and is
timed with its peak resident memory (the child's ru_maxrss). The public set is synthetic: |P| random unit
vectors (default 1,000,000 × 64), written as `--shards` shard files like the embed stage writes them.

- embed: the image tower of an untrained dejavu-vit-tiny over `--images` generated scenes, one shard job
  (images/s; 1M images are not generated here), then the streaming gather of the |P|-row shard files
  into public.parquet (rows/s);
- knn: one search job per shard (`--queries` caption embeddings against |P| / shards rows each), then
  the merge into the global top-k (queries/s; each job's memory is what bounds a cluster job);
- metrics: both models' neighbour tables against |P| public annotations, at `--queries` and at
  `--metrics-queries` query records, to show how memory grows with |A| (Arrow columns, not Python objects).

Run from the repository root:  .venv/bin/python benchmarks/scaleout.py  (about 3 minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from workflow_scripts.contracts import ANNOTATIONS, EMBEDDINGS, NEIGHBORS, SPLIT_IDS  # noqa: E402
from workflow_scripts.io import embeddings_table, write_parquet  # noqa: E402

N_CLASSES = 48


# Runs a module as `python -m` would and prints its peak RSS at exit. VmHWM belongs to the process's own
# address space, unlike ru_maxrss, which Linux carries over from the forking parent through exec.
PEAK_REPORTER = (
    "import atexit, runpy, sys\n"
    "status = lambda: open('/proc/self/status').read().split('VmHWM:')[1].split()[0]\n"
    "atexit.register(lambda: print('PEAK_KB', status(), file=sys.__stderr__, flush=True))\n"
    "sys.argv = sys.argv[1:]\n"
    "runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)\n"
)


def run_stage(*args: str) -> tuple[float, float]:
    """Run `python -m workflow_scripts.<args>`; return (seconds, peak RSS in MiB) of that process."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with tempfile.TemporaryFile("w+") as log:
        start = time.perf_counter()
        result = subprocess.run([sys.executable, "-c", PEAK_REPORTER, *args], env=env, stdout=log, stderr=log)
        seconds = time.perf_counter() - start
        log.seek(0)
        output = log.read()
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:2])} failed:\n{output[-3000:]}")
    return seconds, int(output.rsplit("PEAK_KB", 1)[1].split()[0]) / 1024


def unit_rows(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    rows = rng.standard_normal((n, dim), dtype=np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def label_lists(rng: np.random.Generator, n: int) -> pa.ListArray:
    """2-6 distinct-ish class names per record, as an Arrow list column."""
    counts = rng.integers(2, 7, size=n)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    names = pa.array([f"class{i:02d}" for i in range(N_CLASSES)])
    flat = names.take(pa.array(rng.integers(0, N_CLASSES, size=int(offsets[-1]))))
    return pa.ListArray.from_arrays(pa.array(offsets), flat)


def annotations(ids: np.ndarray, rng: np.random.Generator) -> pa.Table:
    labels = label_lists(rng, len(ids))
    scores = pa.ListArray.from_arrays(labels.offsets, pa.array(np.ones(len(labels.values), np.float32)))
    return pa.table({"id": pa.array(ids, pa.string()), "labels": labels, "scores": scores})


def bench_embed(root: Path, n_images: int, rows: list) -> None:
    import torch

    from workflow_scripts import models, synthetic

    synthetic.generate(
        "bench", n_images, seed=0, config=synthetic.SyntheticConfig(image_size=64), out_dir=root / "images"
    )
    model, _, _ = models.create_model("dejavu-vit-tiny", torch.device("cpu"))
    models.save_checkpoint(root / "model.pt", model, "dejavu-vit-tiny", epoch=0)
    seconds, peak = run_stage(
        "workflow_scripts.embed",
        "--model",
        str(root / "model.pt"),
        "--records",
        str(root / "images" / "records.parquet"),
        "--modality",
        "image",
        "--shard",
        "0-of-1",
        "--batch-size",
        "512",
        "--threads",
        "2",
        "--out",
        str(root / "image_shard.parquet"),
    )
    rows.append(
        (
            "embed: one image shard job (incl. ~5-10 s start-up)",
            f"{n_images:,} images",
            seconds,
            n_images / seconds,
            "images/s",
            peak,
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--public", type=int, default=1_000_000, help="|P|: public embeddings")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--queries", type=int, default=20_000, help="caption embeddings searched")
    parser.add_argument("--metrics-queries", type=int, default=200_000, help="|A| of the larger metrics run")
    parser.add_argument("--images", type=int, default=4096, help="images through the image tower")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    rows = []
    with tempfile.TemporaryDirectory(prefix="dejavu-bench-") as tmp:
        root = Path(tmp)
        bench_embed(root, args.images, rows)

        public_ids = np.char.add("p", np.arange(args.public).astype(str))
        shard_paths = []
        for shard in range(args.shards):
            start, stop = shard * args.public // args.shards, (shard + 1) * args.public // args.shards
            path = root / f"public_shard{shard}.parquet"
            write_parquet(
                embeddings_table(public_ids[start:stop], unit_rows(rng, stop - start, args.dim)),
                path,
                stage="embed",
                contract=EMBEDDINGS,
            )
            shard_paths.append(str(path))
        seconds, peak = run_stage(
            "workflow_scripts.knn", "gather", "--shards", *shard_paths, "--out", str(root / "public.parquet")
        )
        rows.append(
            (
                "embed: gather shards -> public.parquet",
                f"{args.public:,} rows",
                seconds,
                args.public / seconds,
                "rows/s",
                peak,
            )
        )

        query_ids = np.char.add("q", np.arange(args.queries).astype(str))
        write_parquet(
            embeddings_table(query_ids, unit_rows(rng, args.queries, args.dim)),
            root / "captions.parquet",
            stage="embed",
            contract=EMBEDDINGS,
        )
        neighbour_shards = []
        for shard in range(args.shards):
            out = root / f"neighbors_shard{shard}.parquet"
            seconds, peak = run_stage(
                "workflow_scripts.knn",
                "search",
                "--queries",
                str(root / "captions.parquet"),
                "--public",
                str(root / "public.parquet"),
                "--shard",
                f"{shard}-of-{args.shards}",
                "--k",
                str(args.k),
                "--threads",
                str(args.threads),
                "--out",
                str(out),
            )
            rows.append(
                (
                    f"knn: search shard {shard}-of-{args.shards}",
                    f"{args.queries:,} q × {args.public // args.shards:,} p",
                    seconds,
                    args.queries / seconds,
                    "queries/s",
                    peak,
                )
            )
            neighbour_shards.append(str(out))
        seconds, peak = run_stage(
            "workflow_scripts.knn",
            "merge",
            "--shards",
            *neighbour_shards,
            "--k",
            str(args.k),
            "--out",
            str(root / "A.parquet"),
        )
        rows.append(
            (
                f"knn: merge {args.shards} shards",
                f"{args.queries:,} q × {args.shards * args.k} cand.",
                seconds,
                args.queries / seconds,
                "queries/s",
                peak,
            )
        )

        write_parquet(
            annotations(public_ids, rng), root / "public_annotations.parquet", stage="annotate", contract=ANNOTATIONS
        )
        for n_queries in (args.queries, args.metrics_queries):
            bench_metrics(root, rng, public_ids, n_queries, args.k, rows)

    print(f"|P| = {args.public:,} × {args.dim}-d, {args.shards} shards, k = {args.k}, {os.cpu_count()} CPU cores\n")
    print("| stage | size | seconds | throughput | peak RSS (MiB) |\n|---|---|---|---|---|")
    for stage, size, seconds, rate, unit, peak in rows:
        print(f"| {stage} | {size} | {seconds:.1f} | {rate:,.0f} {unit} | {peak:,.0f} |")


def bench_metrics(
    root: Path, rng: np.random.Generator, public_ids: np.ndarray, n_queries: int, k: int, rows: list
) -> None:
    """Both models' neighbour tables (random public neighbours) for n_queries records, through the metrics CLI."""
    query_ids = np.char.add("q", np.arange(n_queries).astype(str))
    for side in ("A", "B"):
        picks = rng.integers(0, len(public_ids), size=n_queries * k)
        write_parquet(
            pa.table(
                {
                    "query_id": pa.array(np.repeat(query_ids, k), pa.string()),
                    "rank": pa.array(np.tile(np.arange(k, dtype=np.int16), n_queries)),
                    "public_id": pa.array(public_ids[picks], pa.string()),
                    "score": pa.array(np.sort(rng.random(n_queries * k, dtype=np.float32))[::-1]),
                }
            ),
            root / f"metrics_{side}.parquet",
            stage="knn",
            contract=NEIGHBORS,
        )
    write_parquet(
        annotations(query_ids, rng), root / "query_annotations.parquet", stage="annotate", contract=ANNOTATIONS
    )
    write_parquet(
        pa.table({"id": pa.array(query_ids, pa.string())}), root / "queries.parquet", stage="splits", contract=SPLIT_IDS
    )
    seconds, peak = run_stage(
        "workflow_scripts.metrics",
        "--target-neighbors",
        str(root / "metrics_A.parquet"),
        "--reference-neighbors",
        str(root / "metrics_B.parquet"),
        "--query-annotations",
        str(root / "query_annotations.parquet"),
        "--public-annotations",
        str(root / "public_annotations.parquet"),
        "--queries",
        str(root / "queries.parquet"),
        "--k",
        str(k),
        "--top-n",
        "10",
        "--out-dir",
        str(root / f"metrics_{n_queries}"),
    )
    rows.append(
        (
            "metrics: records, population, sample level",
            f"{n_queries:,} q × k {k}, |P| annotations",
            seconds,
            n_queries / seconds,
            "queries/s",
            peak,
        )
    )


if __name__ == "__main__":
    main()
