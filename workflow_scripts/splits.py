"""Sample disjoint A (target), B (reference) and holdout sets from a training pool; check them against P.

`make`: the three sets are drawn without replacement from the pool's records
that have at least one caption and an annotation row, in an order fixed by the
seed. It reads the pool alone, so a change to the public set P never redraws
them (nor retrains the models).
`overlap`: A, B and the holdout against P, in a job the searches depend on and
the trainings do not. A shared id or image content hash is always an error: it
would make the measurement meaningless. Near-duplicates (colour thumbnails at
least `min_similarity` alike: re-encoded or resized copies) are listed in a
table and, as the config says, refused, dropped from P, or only reported.
"""

from __future__ import annotations

import argparse
import logging
from itertools import combinations
from pathlib import Path

import polars as pl

from workflow_scripts.adapters import hash_images
from workflow_scripts.cli import LOG_FORMAT
from workflow_scripts.contracts import ANNOTATIONS, NEAR_DUPLICATES, RECORDS, SPLIT_IDS
from workflow_scripts.images import resolve_image_paths
from workflow_scripts.io import DataError, check_unique_ids, write_parquet
from workflow_scripts.near_duplicates import (
    DEFAULT_MIN_SIMILARITY,
    DEFAULT_SIDE,
    NEAR_DUPLICATE_ACTIONS,
    OverlapError,
    excluded_ids,
    screen_public,
)

log = logging.getLogger(__name__)

SIDE_FILES = {"target": "A", "reference": "B", "holdout": "holdout"}


def with_hashes(records: pl.DataFrame, records_path: str) -> pl.DataFrame:
    """Records with an `image_sha256` for every row, decoding the images an adapter left unhashed."""
    if "image_sha256" not in records.columns:
        records = records.with_columns(image_sha256=pl.lit(None, pl.String))
    unhashed = records.filter(pl.col("image_sha256").is_null())
    if not len(unhashed):
        return records
    hashes, errors = hash_images(resolve_image_paths(unhashed, records_path).to_list(), threads=1)
    failed = [(record_id, error) for record_id, error in zip(unhashed["id"], errors) if error is not None]
    if failed:
        raise DataError(
            f"{records_path}: {len(failed)} image(s) cannot be read, e.g. record {failed[0][0]!r}: {failed[0][1]}"
        )
    computed = unhashed.select("id", computed=pl.Series(hashes, dtype=pl.String))
    return (
        records.join(computed, on="id", how="left", maintain_order="left")
        .with_columns(image_sha256=pl.coalesce("image_sha256", "computed"))
        .drop("computed")
    )


def check_disjoint(sets: dict[str, pl.DataFrame]) -> None:
    """Refuse any shared id or image hash between named sets of (id, image_sha256) rows."""
    problems = []
    for (name_a, a), (name_b, b) in combinations(sets.items(), 2):
        shared_ids = a.join(b, on="id", how="inner")["id"].sort()
        if len(shared_ids):
            problems.append(f"{name_a} and {name_b} share {len(shared_ids)} id(s): {shared_ids.head(10).to_list()}")
        shared_images = (
            a.join(b, on="image_sha256", how="inner", suffix="_other")
            .filter(pl.col("id") != pl.col("id_other"))
            .sort("id")
        )
        if len(shared_images):
            pairs = [f"{x}={y}" for x, y in shared_images.select("id", "id_other").head(10).iter_rows()]
            problems.append(f"{name_a} and {name_b} share {len(shared_images)} image(s) by content hash: {pairs}")
    if problems:
        raise OverlapError("overlapping sets would make the memorization test meaningless:\n  " + "\n  ".join(problems))


def check_no_duplicate_images(records: pl.DataFrame, path: str) -> None:
    duplicated = records.filter(pl.col("image_sha256").is_duplicated()).sort("image_sha256", "id")
    if len(duplicated):
        groups = duplicated.group_by("image_sha256", maintain_order=True).agg("id")["id"].head(5).to_list()
        raise OverlapError(
            f"{path}: {len(duplicated)} records share an image with another record "
            f"(same content hash), e.g. {groups}; deduplicate the pool first"
        )


def sample_splits(pool: pl.DataFrame, sizes: dict[str, int], seed: int) -> dict[str, pl.DataFrame]:
    """Draw the sides in SIDE_FILES order from a seeded permutation of the eligible pool ids."""
    needed = sum(sizes.values())
    if needed > len(pool):
        raise DataError(f"splits need {needed} records ({sizes}) but the pool has {len(pool)} eligible")
    shuffled = pool.sort("id").sample(fraction=1.0, shuffle=True, seed=seed)
    sides, start = {}, 0
    for side in SIDE_FILES:
        sides[side] = shuffled.slice(start, sizes[side])
        start += sizes[side]
    return sides


def make_splits(
    pool_records: str,
    pool_annotations: str,
    out_dir: str | Path,
    n_target: int,
    n_reference: int,
    n_holdout: int,
    seed: int,
) -> None:
    pool = RECORDS.read(pool_records, extra=True)
    annotated = ANNOTATIONS.read(pool_annotations, ["id", "labels"]).select("id")
    check_unique_ids(pool["id"], pool_records)
    pool = with_hashes(pool, pool_records)
    check_no_duplicate_images(pool, pool_records)

    eligible = pool.filter(pl.col("captions").list.len() > 0).join(annotated, on="id", how="semi")
    log.info("pool %s: %d records, %d eligible (captioned and annotated)", pool_records, len(pool), len(eligible))
    sides = sample_splits(
        eligible.select("id", "image_sha256"),
        {"target": n_target, "reference": n_reference, "holdout": n_holdout},
        seed,
    )
    params = {
        "pool": pool_records,
        "n_target": n_target,
        "n_reference": n_reference,
        "n_holdout": n_holdout,
        "seed": seed,
    }
    for side, frame in sides.items():
        write_parquet(
            frame.select("id"),
            Path(out_dir) / f"{SIDE_FILES[side]}.parquet",
            stage="splits",
            params=params,
            contract=SPLIT_IDS,
        )


def read_public(public_records: str) -> pl.DataFrame:
    public = RECORDS.read(public_records, extra=True)
    if not len(public):
        raise DataError(
            f"{public_records}: the public set has no records; every query would have no neighbour. "
            "Check the public data set's source (its images and captions) in the config"
        )
    check_unique_ids(public["id"], public_records)
    return public


def split_records(split_paths: dict[str, str], pool: pl.DataFrame, pool_records: str) -> dict[str, pl.DataFrame]:
    """Each split file's pool records (all columns), in the file's order; an id missing from the pool is an error."""
    sides = {}
    for name, split_path in split_paths.items():
        ids = SPLIT_IDS.read(split_path)
        records = ids.join(pool, on="id", how="left", maintain_order="left")
        missing = records.filter(pl.col("image_path").is_null())["id"]
        if len(missing):
            raise DataError(
                f"{split_path}: {len(missing)} id(s) not in {pool_records}, e.g. {missing.head(5).to_list()}"
            )
        sides[name] = records
    return sides


def check_overlap(
    split_paths: dict[str, str],
    pool_records: str,
    public_records: str,
    outputs: dict[str, str],
    action: str = "drop",
    min_similarity: float = DEFAULT_MIN_SIMILARITY,
    side: int = DEFAULT_SIDE,
    threads: int = 1,
) -> None:
    """Refuse ids or images A, B or the holdout share with P; list P's near-duplicates of them in
    outputs["near_duplicates"] and, with action drop, their public ids in outputs["excluded"] (else empty)."""
    public = with_hashes(read_public(public_records), public_records)
    sides = split_records(split_paths, RECORDS.read(pool_records, extra=True), pool_records)
    sides = {name: with_hashes(frame, pool_records) for name, frame in sides.items()}
    check_disjoint({**{name: frame.select("id", "image_sha256") for name, frame in sides.items()}, "public": public})
    trained = pl.concat([frame.select("id", "image_path") for frame in sides.values()])
    pairs = screen_public((trained, pool_records), (public, public_records), action, min_similarity, side, threads)
    params = {"splits": split_paths, "public": public_records, "action": action}
    params |= {"min_similarity": min_similarity, "side": side}
    write_parquet(pairs, outputs["near_duplicates"], stage="overlap", params=params, contract=NEAR_DUPLICATES)
    write_parquet(excluded_ids(pairs, action), outputs["excluded"], stage="overlap", params=params, contract=SPLIT_IDS)


def subset_side(split_path: str, n: int, out_path: str) -> None:
    """Write the first n ids of a side: smaller training sets nest inside larger ones."""
    side = SPLIT_IDS.read(split_path)
    if n > len(side):
        raise DataError(f"{split_path}: n_train={n} exceeds the {len(side)} ids of this side")
    write_parquet(
        side.head(n), out_path, stage="splits", params={"split": split_path, "n_train": n}, contract=SPLIT_IDS
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("make", help="draw A, B and the holdout from a pool")
    make.add_argument("--pool-records", required=True)
    make.add_argument("--pool-annotations", required=True)
    make.add_argument("--out-dir", required=True, help="folder for A.parquet, B.parquet, holdout.parquet")
    make.add_argument("--n-target", type=int, required=True)
    make.add_argument("--n-reference", type=int, required=True)
    make.add_argument("--n-holdout", type=int, required=True)
    make.add_argument("--seed", type=int, required=True)
    overlap = commands.add_parser("overlap", help="check A, B and the holdout against the public set")
    for name in SIDE_FILES.values():
        overlap.add_argument(f"--{name}", required=True, help=f"split file {name}.parquet")
    overlap.add_argument("--pool-records", required=True)
    overlap.add_argument("--public-records", required=True)
    overlap.add_argument("--action", choices=NEAR_DUPLICATE_ACTIONS, default="drop")
    overlap.add_argument(
        "--min-similarity", type=float, default=DEFAULT_MIN_SIMILARITY, help="thumbnail cosine of a near-duplicate"
    )
    overlap.add_argument("--side", type=int, default=DEFAULT_SIDE, help="thumbnail side in pixels")
    overlap.add_argument("--threads", type=int, default=1)
    overlap.add_argument("--near-duplicates", required=True, help="out: the near-duplicate pairs")
    overlap.add_argument("--excluded", required=True, help="out: P's ids left out of the searches (action drop)")
    subset = commands.add_parser("subset", help="the first n ids of one side (training-set size sweeps)")
    subset.add_argument("--split", required=True)
    subset.add_argument("--n", type=int, required=True)
    subset.add_argument("--out", required=True)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    if args.command == "subset":
        subset_side(args.split, args.n, args.out)
    elif args.command == "overlap":
        check_overlap(
            {name: getattr(args, name) for name in SIDE_FILES.values()},
            args.pool_records,
            args.public_records,
            {"near_duplicates": args.near_duplicates, "excluded": args.excluded},
            args.action,
            args.min_similarity,
            args.side,
            args.threads,
        )
    else:
        make_splits(
            args.pool_records,
            args.pool_annotations,
            args.out_dir,
            args.n_target,
            args.n_reference,
            args.n_holdout,
            args.seed,
        )


if __name__ == "__main__":
    main()
