"""The SSL test's public set X against the images the models train on and are measured with.

The split draws X by id, from the pool or from another data set (ssl.public_dataset), so a picture that reached
both sides re-encoded or resized is still in X. A copy of an A image in X lets A's crop retrieve its own full
image, whose label is the answer, and f_A, which trained on that image, finds it more easily than f_B: the gap
would count the copy as déjà vu. The images of A, B, shared and the holdout are compared with X's by colour
thumbnail (`workflow_scripts.near_duplicates`, the VLM test's check of P); the pairs are listed, and X's images
among them dropped, refused or kept as `near_duplicates.action` says. A job of its own after the split, so that
a change to the check re-embeds X and never redraws the sets or retrains the models.
"""

from __future__ import annotations

import argparse
import logging

import polars as pl

from workflow_scripts.cli import run_stage
from workflow_scripts.contracts import NEAR_DUPLICATES, RECORDS, SPLIT_IDS
from workflow_scripts.io import DataError, write_parquet
from workflow_scripts.near_duplicates import (
    DEFAULT_MIN_SIMILARITY,
    DEFAULT_SIDE,
    NEAR_DUPLICATE_ACTIONS,
    excluded_ids,
    screen_public,
)

log = logging.getLogger(__name__)

POOL_SETS = ("A", "B", "shared", "holdout")


def images_of(ids_paths: list[str], records_path: str) -> pl.DataFrame:
    """`id`, `image_path` of the ids in the `ids_paths` files (SPLIT_IDS), the records read once; an id
    `records_path` lacks is a DataError naming its file."""
    records = RECORDS.read(records_path, ["id", "image_path"])
    chosen = []
    for ids_path in ids_paths:
        ids = SPLIT_IDS.read(ids_path)
        missing = ids.filter(~pl.col("id").is_in(records["id"].implode()))["id"]
        if len(missing):
            raise DataError(f"{ids_path}: {len(missing)} id(s) not in {records_path}, e.g. {missing.head(5).to_list()}")
        chosen.append(ids)
    return records.filter(pl.col("id").is_in(pl.concat(chosen)["id"].implode()))


def screen_ssl_public(
    records: str,
    A: str,
    B: str,
    shared: str,
    holdout: str,
    public: str,
    near_duplicates: str,
    public_screened: str,
    public_records: str | None = None,
    action: str = "drop",
    min_similarity: float = DEFAULT_MIN_SIMILARITY,
    side: int = DEFAULT_SIDE,
    threads: int = 1,
) -> None:
    """Write the near-duplicate pairs (pool id, X id) and X's ids the searches use (all but the dropped)."""
    split_paths = {"A": A, "B": B, "shared": shared, "holdout": holdout}
    pool = images_of([split_paths[name] for name in POOL_SETS], records)
    public_path = public_records or records
    candidates = images_of([public], public_path)
    pairs = screen_public((pool, records), (candidates, public_path), action, min_similarity, side, threads)
    dropped = excluded_ids(pairs, action)
    kept = candidates.select("id").filter(~pl.col("id").is_in(dropped["id"].implode())).sort("id")
    log.info("X: %d images, %d near-duplicate pair(s), %d dropped", len(candidates), len(pairs), len(dropped))
    params = {"splits": {**split_paths, "public": public}, "public_records": public_path, "action": action}
    params |= {"min_similarity": min_similarity, "side": side}
    write_parquet(pairs, near_duplicates, stage="ssl_overlap", params=params, contract=NEAR_DUPLICATES)
    write_parquet(kept, public_screened, stage="ssl_overlap", params=params, contract=SPLIT_IDS)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", required=True, help="records.parquet of the SSL data set (the split's pool)")
    for name in (*POOL_SETS, "public"):
        parser.add_argument(f"--{name}", required=True, help=f"the split's {name}.parquet")
    parser.add_argument("--public-records", help="records.parquet X's images come from (default: --records)")
    parser.add_argument("--action", choices=NEAR_DUPLICATE_ACTIONS, default="drop")
    parser.add_argument("--min-similarity", type=float, default=DEFAULT_MIN_SIMILARITY)
    parser.add_argument("--side", type=int, default=DEFAULT_SIDE, help="thumbnail side in pixels")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--near-duplicates", required=True, help="out: the near-duplicate pairs")
    parser.add_argument("--public-screened", required=True, help="out: X's ids after the check")
    run_stage(parser, argv, screen_ssl_public)


if __name__ == "__main__":
    main()
