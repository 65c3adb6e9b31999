"""Bad inputs a new user can hand the workflow stop at the first stage that can tell, naming the file and record."""

import re
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from conftest import TINY, merged, run_snakemake
from workflow_scripts import knn, splits
from workflow_scripts.contracts import EMBEDDINGS, RECORDS, SPLIT_IDS
from workflow_scripts.io import DataError, embeddings_table, write_parquet


def write_embeddings(path, prefix: str, matrix: np.ndarray) -> str:
    write_parquet(
        embeddings_table([f"{prefix}{i:03d}" for i in range(len(matrix))], matrix),
        path,
        stage="test",
        contract=EMBEDDINGS,
    )
    return str(path)


def unit_rows(n: int, seed: int) -> np.ndarray:
    rows = np.random.default_rng(seed).normal(size=(n, 8)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
@pytest.mark.parametrize("which", ["public", "queries"])
def test_a_non_finite_embedding_stops_the_search_naming_file_and_row(tmp_path, bad, which):
    matrices = {"public": unit_rows(16, 0), "queries": unit_rows(5, 1)}
    matrices[which][3, 2] = bad  # one component: an inf would make row 3 every query's nearest neighbour
    public = write_embeddings(tmp_path / "public.parquet", "p", matrices["public"])
    queries = write_embeddings(tmp_path / "queries.parquet", "q", matrices["queries"])
    with pytest.raises(DataError, match=rf"{which}\.parquet: 1 embedding\(s\) with a non-finite .* row 3 "):
        knn.search_shard(queries, public, str(tmp_path / "neighbors.parquet"), k=4, use_gpu="never")
    assert not (tmp_path / "neighbors.parquet").exists()


def test_a_non_finite_embedding_in_a_later_shard_is_named_by_its_row_in_the_file(tmp_path):
    matrix = unit_rows(16, 0)
    matrix[11, 0] = np.nan
    public = write_embeddings(tmp_path / "public.parquet", "p", matrix)
    queries = write_embeddings(tmp_path / "queries.parquet", "q", unit_rows(5, 1))
    knn.search_shard(queries, public, str(tmp_path / "first.parquet"), k=4, shard="0-of-2", use_gpu="never")
    with pytest.raises(DataError, match=r"row 11 \(id 'p011'\)"):
        knn.search_shard(queries, public, str(tmp_path / "second.parquet"), k=4, shard="1-of-2", use_gpu="never")


def test_k_larger_than_the_public_set_is_an_error(tmp_path):
    public = write_embeddings(tmp_path / "public.parquet", "p", unit_rows(16, 0))
    queries = write_embeddings(tmp_path / "queries.parquet", "q", unit_rows(5, 1))
    with pytest.raises(DataError, match=r"knn.k = 50 .* only 16 embedding"):
        knn.search_shard(queries, public, str(tmp_path / "out.parquet"), k=50, shard="0-of-2", use_gpu="never")
    knn.search_shard(queries, public, str(tmp_path / "out.parquet"), k=16, use_gpu="never")  # all of P is fine
    assert pl.read_parquet(tmp_path / "out.parquet").height == 5 * 16


def test_an_empty_public_set_stops_at_the_overlap_stage(tmp_path):
    records = {"id": pl.String, "image_path": pl.String, "captions": pl.List(pl.String), "image_sha256": pl.String}
    pool = pl.DataFrame(
        {
            "id": [f"pool{i}" for i in range(10)],
            "image_path": [f"{i}.jpg" for i in range(10)],
            "captions": [["a cat"]] * 10,
            "image_sha256": [f"{i:064x}" for i in range(10)],
        },
        schema=records,
    )
    write_parquet(pool, tmp_path / "pool.parquet", stage="test", contract=RECORDS)
    write_parquet(pl.DataFrame(schema=records), tmp_path / "public.parquet", stage="test", contract=RECORDS)
    for name in ("A", "B", "holdout"):
        write_parquet(pool.select("id").head(2), tmp_path / f"{name}.parquet", stage="test", contract=SPLIT_IDS)
    outputs = {"near_duplicates": str(tmp_path / "pairs.parquet"), "excluded": str(tmp_path / "excluded.parquet")}
    with pytest.raises(DataError, match=r"public\.parquet: the public set has no records"):
        splits.check_overlap(
            {name: str(tmp_path / f"{name}.parquet") for name in ("A", "B", "holdout")},
            str(tmp_path / "pool.parquet"),
            str(tmp_path / "public.parquet"),
            outputs,
        )
    assert not any(Path(path).exists() for path in outputs.values())


@pytest.mark.parametrize(
    "overlay, message",
    [
        (
            {"splits": {"scenes": {"n_target": 200}}},
            r"n_target \+ n_reference \+ n_holdout = 344 records, but the pool 'scenes_pool' makes 300",
        ),
        ({"sweep": {"n_train": [50, 120]}}, r"n_train \[120\] exceeds the 96 records of a side of split 'scenes'"),
    ],
)
def test_split_sizes_the_config_cannot_meet_stop_the_dry_run(tmp_path, overlay, message):
    result = run_snakemake(tmp_path, merged(TINY, overlay), "--dry-run", check=False)
    assert result.returncode != 0
    assert re.search(message, result.stdout + result.stderr), result.stderr[-2000:]
