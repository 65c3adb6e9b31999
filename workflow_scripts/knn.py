"""Exact k-nearest-neighbour search of query embeddings among public embeddings, shard by shard (faiss, inner product).

Embeddings are L2-normalised, so the inner product is the cosine similarity.

Shards. The public set P is split into N contiguous row ranges of nearly equal
size; shard `I-of-N` holds rows [I·|P|//N, (I+1)·|P|//N) (`shard_range`). The
embed stage embeds each shard in its own job; `search` holds one shard and one
batch of queries at a time and writes that shard's top-k list of every query;
`merge` combines the shards' lists into the global top-k, one query batch at a
time. No job holds more than one shard, one query batch and their neighbours.
`gather` streams the embed stage's shard files into P's embeddings file (no
model needed, so it lives here, free of torch).

Exactness. Every neighbour list follows one total order: score descending,
then public id ascending (the tie-break: equal scores, e.g. duplicated images,
keep the smaller id). Under a total order the global top-k is the top-k of the
union of the shards' top-k lists, so the merge is exact. Scores are canonical:
faiss (CPU or GPU, whose float32 sums differ in the last bits with the BLAS
tiling and the device) only proposes k + CANDIDATE_MARGIN candidates, which are
rescored on the CPU in float64 and rounded to float32, the same way for every
shard, batch and device. A query whose candidates cannot prove that no unseen
public row beats its k-th neighbour (a tie or near-tie within faiss's rounding
at the candidate boundary) is searched again by brute force over the shard.
Hence 1 shard or 7, CPU or GPU: the same neighbour table, bit for bit.

faiss runs on the GPU when its build has GPU support and a GPU is visible
(`use_gpu=auto`, else the CPU with a log line saying why); `use_gpu=always`
is an error without one, never a silent CPU run.
"""

from __future__ import annotations

import argparse
import json
import logging
import re

import faiss
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from workflow_scripts.cli import LOG_FORMAT
from workflow_scripts.contracts import EMBEDDINGS, NEIGHBORS
from workflow_scripts.io import (
    DataError,
    damage_named,
    embeddings_from_table,
    open_parquet,
    parquet_stream,
    read_metadata,
)

log = logging.getLogger(__name__)

# faiss's own float32 scores only rank candidates; this many extra per query absorb their rounding.
CANDIDATE_MARGIN = 16
# faiss GPU k-selection handles at most this many results per query.
GPU_MAX_K = 2048
# Rows per Parquet row group in the files this stage and the embed stage stream: the unit a reader loads.
ROW_GROUP_ROWS = 16384
# Canonical rescoring works through this many float64 values (query row × dimension) at a time (32 MiB).
RESCORE_CHUNK_VALUES = 1 << 22


# --- shards and streamed Parquet ---


def parse_shard(spec: str) -> tuple[int, int]:
    """'I-of-N' -> (I, N), 0 <= I < N."""
    match = re.fullmatch(r"(\d+)-of-(\d+)", spec)
    if not match or not int(match[1]) < int(match[2]):
        raise ValueError(f"shard must be spelled 'I-of-N' with 0 <= I < N, not {spec!r}")
    return int(match[1]), int(match[2])


def shard_range(path: str, spec: str) -> tuple[int, int]:
    """Rows [start, stop) of shard `spec` of the Parquet file `path` (P's records or P's embeddings)."""
    shard, n_shards = parse_shard(spec)
    n_rows = open_parquet(path).metadata.num_rows
    if n_shards > n_rows:
        raise DataError(
            f"{path}: {n_rows} row(s) cannot be split into {n_shards} shards; lower embedding.public_shards"
        )
    return shard * n_rows // n_shards, (shard + 1) * n_rows // n_shards


def read_rows(path: str, start: int, stop: int, columns: list[str]) -> pa.Table:
    """Rows [start, stop) of a Parquet file, reading only the row groups that overlap them."""
    file = open_parquet(path)
    sizes = np.array([file.metadata.row_group(group).num_rows for group in range(file.num_row_groups)], np.int64)
    begins = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    groups = np.flatnonzero((begins < stop) & (begins + sizes > start))
    if stop <= start or not len(groups):
        return file.schema_arrow.empty_table().select(columns)
    with damage_named(path):
        table = file.read_row_groups(groups.tolist(), columns=columns)
    return table.slice(start - int(begins[groups[0]]), stop - start)


def read_embedding_rows(path: str, start: int, stop: int) -> tuple[pa.StringArray, np.ndarray]:
    """(ids, float32 matrix [n, d]) of rows [start, stop) of an embeddings Parquet file, all of them finite.

    One inf or NaN component would make its row every query's nearest neighbour (or nobody's) without an error.
    """
    ids, matrix = embeddings_from_table(read_rows(path, start, stop, ["id", "embedding"]), path)
    bad = np.flatnonzero(~np.isfinite(matrix).all(axis=1))
    if len(bad):
        raise DataError(
            f"{path}: {len(bad)} embedding(s) with a non-finite (inf or NaN) component, the first at "
            f"row {start + int(bad[0])} (id {ids[int(bad[0])].as_py()!r}); re-embed with a sound model"
        )
    return ids, matrix


# --- the search ---


def build_index(public_embeddings: np.ndarray, use_gpu: str = "auto"):
    """An exact inner-product index over `public_embeddings`, on the GPU(s) if asked and possible."""
    index = faiss.IndexFlatIP(public_embeddings.shape[1])
    gpu_build = hasattr(faiss, "index_cpu_to_all_gpus") and hasattr(faiss, "StandardGpuResources")
    gpus = faiss.get_num_gpus() if gpu_build else 0
    if use_gpu == "never":
        log.info("faiss: searching on the CPU (use_gpu=never)")
    elif gpus == 0:
        why = "no GPU visible" if gpu_build else "this faiss build has no GPU support (faiss-cpu is installed)"
        if use_gpu == "always":
            raise RuntimeError(
                f"faiss GPU search requested (use_gpu=always) but faiss sees no GPU: {why} "
                "(use envs/dejavu-gpu.yaml, which installs faiss-gpu, and check CUDA_VISIBLE_DEVICES)"
            )
        log.info("faiss: %s, searching on the CPU", why)
    else:
        index = faiss.index_cpu_to_all_gpus(index)
        log.info("faiss: searching on %d GPU(s)", gpus)
    index.add(public_embeddings)
    return index, gpus > 0 and use_gpu != "never"


def canonical_scores(
    queries: np.ndarray, public: np.ndarray, query_rows: np.ndarray, public_rows: np.ndarray
) -> np.ndarray:
    """float32(Σ_d q·p summed in float64) for each (query row, public row) pair.

    Every product of two float32 values is exact in float64 and the row sum has
    one fixed order, so a pair gets the same score whichever shard, batch or
    device proposed it.
    """
    scores = np.empty(len(query_rows), np.float32)
    step = max(1, RESCORE_CHUNK_VALUES // max(1, queries.shape[1]))
    for start in range(0, len(query_rows), step):
        pairs = slice(start, start + step)
        products = queries[query_rows[pairs]].astype(np.float64) * public[public_rows[pairs]].astype(np.float64)
        scores[pairs] = products.sum(axis=1)
    return scores


def top_k(candidates: pl.DataFrame, k: int, tie_break: str = "public_id") -> pl.DataFrame:
    """The k best candidates of each query under (score descending, `tie_break` ascending), `rank` 0 the best.

    `candidates` holds `query_pos` (the query's position; the output keeps this
    order), `score` and the tie-break column. The one ordering of every
    neighbour list: inside a shard and across shards alike.
    """
    return (
        candidates.sort(["query_pos", "score", tie_break], descending=[False, True, False])
        .with_columns(rank=pl.int_range(pl.len()).over("query_pos").cast(pl.Int16))
        .filter(pl.col("rank") < k)
    )


class ShardIndex:
    """Exact top-k search among one shard of public embeddings (the whole of P is one shard)."""

    def __init__(self, public_embeddings: np.ndarray, public_ids: pa.StringArray | None = None, use_gpu: str = "auto"):
        self.public = np.ascontiguousarray(public_embeddings, dtype=np.float32)
        # Without ids (plain arrays) the row number breaks ties: the same order for ids sorted like the rows.
        self.public_ids = None if public_ids is None else pl.Series("public_id", public_ids)
        self.index, self.on_gpu = build_index(self.public, use_gpu)
        self.max_norm = float(np.linalg.norm(self.public, axis=1).max()) if len(self.public) else 0.0

    def search(self, queries: np.ndarray, k: int) -> pl.DataFrame:
        """Columns query_pos (row of `queries`), public_row, score, rank: min(k, |shard|) rows per query."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.shape[1] != self.public.shape[1]:
            raise DataError(f"query dimension {queries.shape[1]} != public dimension {self.public.shape[1]}")
        n_public = len(self.public)
        k = min(k, n_public)
        fetch = min(k + CANDIDATE_MARGIN, n_public)
        if self.on_gpu and fetch > GPU_MAX_K:
            raise ValueError(
                f"faiss on the GPU returns at most {GPU_MAX_K} neighbours; k = {k} is too large "
                f"(k + {CANDIDATE_MARGIN} candidates are fetched); use knn.use_gpu: never"
            )
        faiss_scores, rows = self.index.search(queries, fetch)
        query_rows = np.repeat(np.arange(len(queries)), fetch)
        best = self._rank(queries, query_rows, rows.reshape(-1), k)
        if fetch == n_public or not len(queries):
            return best
        # An unseen row x has faiss score <= the last candidate's, and |faiss - canonical| <= error; it can only
        # enter the top k if last + error >= k-th canonical score. Such queries are searched exhaustively.
        error = (queries.shape[1] + 2) * 2.0**-23 * np.linalg.norm(queries, axis=1) * self.max_norm
        kth = best.filter(pl.col("rank") == k - 1).sort("query_pos")["score"].to_numpy()
        unsure = np.flatnonzero(faiss_scores[:, -1] + error >= kth)
        if not len(unsure):
            return best
        log.info("%d of %d queries tie at the candidate boundary: exhaustive search", len(unsure), len(queries))
        query_rows, public_rows = self._exhaustive_candidates(queries[unsure], kth[unsure] - error[unsure])
        return pl.concat(
            [
                best.filter(~pl.col("query_pos").is_in(pl.Series(unsure).implode())),
                self._rank(queries, unsure[query_rows], public_rows, k),
            ]
        ).sort("query_pos", "rank")

    def _rank(self, queries: np.ndarray, query_rows: np.ndarray, public_rows: np.ndarray, k: int) -> pl.DataFrame:
        candidates = pl.DataFrame(
            {
                "query_pos": query_rows.astype(np.int64),
                "public_row": public_rows.astype(np.int64),
                "score": canonical_scores(queries, self.public, query_rows, public_rows),
            }
        )
        if self.public_ids is None:
            return top_k(candidates, k, tie_break="public_row")
        candidates = candidates.with_columns(public_id=self.public_ids.gather(candidates["public_row"]))
        return top_k(candidates, k).drop("public_id")

    def _exhaustive_candidates(self, queries: np.ndarray, thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(query row, public row) pairs whose float32 score reaches the query's threshold, over the whole shard."""
        step = max(1, RESCORE_CHUNK_VALUES // max(1, len(queries)))
        found = []
        for start in range(0, len(self.public), step):
            query_rows, public_rows = np.nonzero(queries @ self.public[start : start + step].T >= thresholds[:, None])
            found.append((query_rows, public_rows + start))
        return np.concatenate([q for q, _ in found]), np.concatenate([p for _, p in found])


def search(
    query_embeddings: np.ndarray,
    public_embeddings: np.ndarray,
    k: int,
    batch_size: int = ROW_GROUP_ROWS,
    use_gpu: str = "auto",
    public_ids: pa.StringArray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Return (scores [n, k], public row indices [n, k]) of in-memory arrays, rank 0 nearest."""
    if query_embeddings.shape[1] != public_embeddings.shape[1]:
        raise DataError(f"query dimension {query_embeddings.shape[1]} != public dimension {public_embeddings.shape[1]}")
    index = ShardIndex(public_embeddings, public_ids, use_gpu)
    k = min(k, len(public_embeddings))
    scores = np.empty((len(query_embeddings), k), dtype=np.float32)
    rows = np.empty((len(query_embeddings), k), dtype=np.int64)
    for start in tqdm(range(0, len(query_embeddings), batch_size), desc="kNN search", unit="batch", mininterval=2):
        best = index.search(query_embeddings[start : start + batch_size], k)
        scores[start : start + batch_size] = best["score"].to_numpy().reshape(-1, k)
        rows[start : start + batch_size] = best["public_row"].to_numpy().reshape(-1, k)
    return scores, rows


def gather_embeddings(shard_paths: list[str], out_path: str) -> None:
    """Stream embeddings files, in the given (shard) order, into one; memory holds one row group."""
    for path in shard_paths:
        EMBEDDINGS.check(path)
    schema = pq.read_schema(shard_paths[0]).remove_metadata()
    for path in shard_paths[1:]:
        if not pq.read_schema(path).remove_metadata().equals(schema):
            raise DataError(
                f"{path}: schema {pq.read_schema(path).remove_metadata()} differs from {shard_paths[0]}'s "
                f"{schema} (the shards of one public set come from one model)"
            )
    params = {
        **json.loads(read_metadata(shard_paths[0]).get("dejavu:params", "{}")),
        "shard": None,
        "shards": shard_paths,
    }
    with parquet_stream(out_path, schema, "embed", params) as writer:
        for path in tqdm(shard_paths, desc="gathering shards", unit="shard", mininterval=2):
            file = open_parquet(path)
            for group in range(file.num_row_groups):
                with damage_named(path):
                    writer.write_table(file.read_row_group(group), row_group_size=ROW_GROUP_ROWS)


# --- the stage: one job per shard, one merge ---


def search_shard(
    queries_path: str,
    public_path: str,
    out_path: str,
    k: int,
    shard: str = "0-of-1",
    batch_size: int = ROW_GROUP_ROWS,
    use_gpu: str = "auto",
) -> None:
    """Write the top-k public neighbours, within one shard of P, of every query: k rows per query, query order.

    With the single shard '0-of-1' this is the whole search and the output the final neighbours table.
    """
    EMBEDDINGS.check(public_path)
    EMBEDDINGS.check(queries_path)
    n_public = open_parquet(public_path).metadata.num_rows
    if k > n_public:
        raise DataError(
            f"{public_path}: knn.k = {k} neighbours asked for, but the public set has only {n_public} "
            f"embedding(s); lower knn.k (and metrics.k) to at most {n_public}"
        )
    start, stop = shard_range(public_path, shard)
    public_ids, public_embeddings = read_embedding_rows(public_path, start, stop)
    index = ShardIndex(public_embeddings, public_ids, use_gpu)
    k = min(k, stop - start)
    n_queries = open_parquet(queries_path).metadata.num_rows
    # The merge reads `k` and `n_queries` back to address each query batch of this file.
    params = {
        "queries": queries_path,
        "public": public_path,
        "shard": shard,
        "public_rows": [start, stop],
        "k": k,
        "n_queries": n_queries,
    }
    with parquet_stream(out_path, NEIGHBORS.schema, "knn", params) as writer:
        for first in tqdm(range(0, n_queries, batch_size), desc=f"kNN shard {shard}", unit="batch", mininterval=2):
            query_ids, queries = read_embedding_rows(queries_path, first, min(first + batch_size, n_queries))
            best = index.search(queries, k)
            writer.write_table(
                pa.table(
                    {
                        "query_id": query_ids.take(best["query_pos"].to_arrow()),
                        "rank": best["rank"].to_arrow(),
                        "public_id": public_ids.take(best["public_row"].to_arrow()),
                        "score": best["score"].to_arrow(),
                    },
                    schema=NEIGHBORS.schema,
                )
            )


def knn(
    queries_path: str, public_path: str, out_path: str, k: int, batch_size: int = ROW_GROUP_ROWS, use_gpu: str = "auto"
) -> None:
    """Unsharded search: the neighbours table of all queries among all of P."""
    search_shard(queries_path, public_path, out_path, k, "0-of-1", batch_size, use_gpu)


def merge(shard_paths: list[str], out_path: str, k: int, batch_size: int = ROW_GROUP_ROWS) -> None:
    """Merge per-shard top-k lists (written by `search_shard`) into the global top-k, query batch by batch."""
    for path in shard_paths:
        NEIGHBORS.check(path)
    layouts = [json.loads(read_metadata(path).get("dejavu:params", "{}")) for path in shard_paths]
    for path, layout in zip(shard_paths, layouts):
        if "k" not in layout or "n_queries" not in layout:
            raise DataError(f"{path}: not a kNN shard file (no k / n_queries in its dejavu:params metadata)")
    n_queries = layouts[0]["n_queries"]
    differing = [path for path, layout in zip(shard_paths, layouts) if layout["n_queries"] != n_queries]
    if differing:
        raise DataError(f"{differing[0]}: {len(differing)} shard file(s) list another query set than {shard_paths[0]}")
    params = {"shards": shard_paths, "k": k}
    with parquet_stream(out_path, NEIGHBORS.schema, "knn", params) as writer:
        for first in tqdm(range(0, n_queries, batch_size), desc="merging shards", unit="batch", mininterval=2):
            last = min(first + batch_size, n_queries)
            candidates = pl.concat(
                [
                    pl.from_arrow(
                        read_rows(path, first * layout["k"], last * layout["k"], NEIGHBORS.schema.names)
                    ).with_columns(query_pos=pl.int_range(first * layout["k"], last * layout["k"]) // layout["k"])
                    for path, layout in zip(shard_paths, layouts)
                ]
            )
            mismatched = (
                candidates.group_by("query_pos").agg(pl.col("query_id").n_unique()).filter(pl.col("query_id") > 1)
            )
            if len(mismatched):
                raise DataError(
                    f"shard files {shard_paths}: query order differs at query position {mismatched['query_pos'].min()}"
                )
            best = top_k(candidates, k)
            writer.write_table(best.select(NEIGHBORS.schema.names).to_arrow().cast(NEIGHBORS.schema))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    one = commands.add_parser("search", help="top-k neighbours of every query within one shard of P")
    one.add_argument("--queries", required=True, help="embeddings Parquet of the query captions")
    one.add_argument("--public", required=True, help="embeddings Parquet of the public images (all of P)")
    one.add_argument("--shard", default="0-of-1", help="'I-of-N': search only shard I of N (default: all of P)")
    one.add_argument("--use-gpu", choices=("auto", "always", "never"), default="auto")
    merged = commands.add_parser("merge", help="merge per-shard top-k lists into the global top-k")
    merged.add_argument("--shards", nargs="+", required=True, help="outputs of `search`, one per shard")
    for command in (one, merged):
        command.add_argument("--k", type=int, required=True)
        command.add_argument("--batch-size", type=int, default=ROW_GROUP_ROWS, help="queries handled at once")
        command.add_argument("--threads", type=int, default=1, help="faiss / BLAS threads")
    gathered = commands.add_parser("gather", help="join P's shard embeddings files, in shard order, into one")
    gathered.add_argument("--shards", nargs="+", required=True, help="embed --shard outputs, in shard order")
    for command in (one, merged, gathered):
        command.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    if args.command == "gather":
        gather_embeddings(args.shards, args.out)
        return
    faiss.omp_set_num_threads(args.threads)
    if args.command == "search":
        search_shard(args.queries, args.public, args.out, args.k, args.shard, args.batch_size, args.use_gpu)
    else:
        merge(args.shards, args.out, args.k, args.batch_size)


if __name__ == "__main__":
    main()
