"""Exact k-nearest-neighbour search of query embeddings among public embeddings (faiss, inner product).

Embeddings are L2-normalised, so the inner product is the cosine similarity.
faiss runs on the GPU when faiss-gpu is installed and a GPU is visible, else on
the CPU; both use exact flat indexes and give the same neighbours. Queries are
searched in batches so memory stays bounded by the batch size.
"""

from __future__ import annotations

import argparse
import logging

import faiss
import numpy as np
import pyarrow as pa
from tqdm import tqdm

from workflow_scripts.io import DataError, read_embeddings, write_parquet

log = logging.getLogger(__name__)


def build_index(public_embeddings: np.ndarray, use_gpu: str = "auto"):
    index = faiss.IndexFlatIP(public_embeddings.shape[1])
    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if use_gpu == "never" or (use_gpu == "auto" and gpus == 0):
        if use_gpu == "auto":
            log.info("faiss: no GPU available, searching on the CPU")
    elif gpus == 0:
        raise RuntimeError("faiss GPU search requested (use_gpu=always) but faiss sees no GPU "
                           "(install faiss-gpu instead of faiss-cpu and check CUDA_VISIBLE_DEVICES)")
    else:
        index = faiss.index_cpu_to_all_gpus(index)
        log.info("faiss: searching on %d GPU(s)", gpus)
    index.add(public_embeddings)
    return index


def search(query_embeddings: np.ndarray, public_embeddings: np.ndarray, k: int, batch_size: int = 65536,
           use_gpu: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """Return (scores [n, k], public row indices [n, k]), rank 0 nearest."""
    if query_embeddings.shape[1] != public_embeddings.shape[1]:
        raise DataError(f"query dimension {query_embeddings.shape[1]} != public dimension {public_embeddings.shape[1]}")
    k = min(k, len(public_embeddings))
    index = build_index(np.ascontiguousarray(public_embeddings, dtype=np.float32), use_gpu)
    scores = np.empty((len(query_embeddings), k), dtype=np.float32)
    rows = np.empty((len(query_embeddings), k), dtype=np.int64)
    for start in tqdm(range(0, len(query_embeddings), batch_size), desc="kNN search", unit="batch", mininterval=2):
        stop = start + batch_size
        scores[start:stop], rows[start:stop] = index.search(
            np.ascontiguousarray(query_embeddings[start:stop], dtype=np.float32), k)
    return scores, rows


def neighbors_table(query_ids: np.ndarray, public_ids: np.ndarray, scores: np.ndarray, rows: np.ndarray) -> pa.Table:
    """The neighbours contract: query_id, rank (int16, 0 nearest), public_id, score (cosine)."""
    n, k = rows.shape
    return pa.table({
        "query_id": pa.array(np.repeat(query_ids, k), pa.string()),
        "rank": pa.array(np.tile(np.arange(k, dtype=np.int16), n), pa.int16()),
        "public_id": pa.array(public_ids[rows.reshape(-1)], pa.string()),
        "score": pa.array(scores.reshape(-1), pa.float32()),
    })


def knn(queries_path: str, public_path: str, out_path: str, k: int, batch_size: int = 65536,
        use_gpu: str = "auto") -> None:
    query_ids, query_embeddings = read_embeddings(queries_path)
    public_ids, public_embeddings = read_embeddings(public_path)
    scores, rows = search(query_embeddings, public_embeddings, k, batch_size, use_gpu)
    params = {"queries": queries_path, "public": public_path, "k": k}
    write_parquet(neighbors_table(query_ids, public_ids, scores, rows), out_path, stage="knn", params=params)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", required=True, help="embeddings Parquet of the query captions")
    parser.add_argument("--public", required=True, help="embeddings Parquet of the public images")
    parser.add_argument("--out", required=True)
    parser.add_argument("--k", type=int, required=True)
    parser.add_argument("--batch-size", type=int, default=65536)
    parser.add_argument("--use-gpu", choices=("auto", "always", "never"), default="auto")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    knn(args.queries, args.public, args.out, args.k, args.batch_size, args.use_gpu)


if __name__ == "__main__":
    main()
