"""The SSL split: per class, box images into holdout, A and B; the rest into the public set X and shared.

Per class (the records' ``--label-column``), ids are sorted and given a seeded random key (a
``numpy.random.default_rng(seed)`` permutation over all sorted ids), then ranked within the class by it:

- images with a box (an id in the BOXES table): the first ``holdout_per_class`` go to the holdout, the next
  m to A and the next m to B, m = min(floor(n_left / 2), ``per_class``), n_left = the box images the
  holdout left;
- the rest (box images left over and images without a box): the first ``public_per_class`` to the public
  set X, the others to shared (all of them, or the first ``shared_per_class``).

train_A = A ∪ shared and train_B = B ∪ shared. DejaVu's ``imagenet_partition.py`` does the same where it is
defined: A and B take the same m = min(floor(n_box / 2), per_class) box images per class, leftover box images
join the public pool. Differences, on purpose:

- The order is seeded and sorted; DejaVu's is ``os.listdir`` order (box files) and set order (the others).
- A holdout of box images neither model trains on (the control); DejaVu has none.
- shared is the rest after X, optionally capped; DejaVu's shared holds per_class − m images without a box
  per class (so each training set has per_class per class) and X everything else. ``--shared-per-class``
  with per_class − m gives its sizes only where every class has the same m.
- X is capped per class (``public_per_class``), where DejaVu keeps all of it; X also depends on m, since
  leftover box images join the rest (DejaVu's public set shrinks as per_class grows, too).

Classes with too few images give smaller sets (logged); the five sets never share an id.

With ``--public-records`` (another data set: for a model that trained on all of the pool, X must be images it
never saw), X is drawn from those records instead, ``public_per_class`` per class by the same seeded rule, and
everything the pool's box sets leave goes to shared.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import polars as pl

from workflow_scripts.cli import run_stage
from workflow_scripts.contracts import BOXES, RECORDS, SPLIT_IDS
from workflow_scripts.io import DataError, check_unique_ids, write_parquet

log = logging.getLogger(__name__)

SETS = ("A", "B", "shared", "holdout", "public")


def labelled_records(records_path: str | Path, label_column: str) -> pl.DataFrame:
    """The records' id and label (as a string); DataError naming the file without the column or with nulls."""
    columns = RECORDS.check(records_path, ["id"], extra=True)
    if label_column not in columns:
        raise DataError(f"{records_path}: no label column {label_column!r}; found {columns}")
    records = RECORDS.read(records_path, ["id", label_column]).select("id", label=pl.col(label_column).cast(pl.String))
    unlabelled = records.filter(pl.col("label").is_null())["id"]
    if len(unlabelled):
        raise DataError(
            f"{records_path}: {len(unlabelled)} record(s) without a {label_column!r}, e.g. {unlabelled.head(5).to_list()}"
        )
    check_unique_ids(records["id"], records_path)
    return records


def assign_sets(
    records: pl.DataFrame,
    box_ids: pl.Series,
    per_class: int,
    holdout_per_class: int,
    public_per_class: int,
    seed: int,
    shared_per_class: int | None = None,
) -> pl.DataFrame:
    """`records` (id, label) with a `set` column: one of SETS, or null for an image no set takes."""
    frame = records.sort("id").with_columns(
        key=pl.Series(np.random.default_rng(seed).permutation(len(records))), box=pl.col("id").is_in(box_ids.implode())
    )
    # Rank (0-based) of the key among the class's box images and among its images without a box.
    rank = (pl.col("key").rank("ordinal").over("label", "box") - 1).cast(pl.Int64)
    n_box = pl.col("box").sum().over("label").cast(pl.Int64)
    holdout = pl.min_horizontal(n_box, holdout_per_class)
    m = pl.min_horizontal((n_box - holdout) // 2, per_class)
    box_set = (
        pl.when(rank < holdout)
        .then(pl.lit("holdout"))
        .when(rank < holdout + m)
        .then(pl.lit("A"))
        .when(rank < holdout + 2 * m)
        .then(pl.lit("B"))
    )
    frame = frame.with_columns(set=pl.when("box").then(box_set))
    rest = pl.col("set").is_null()
    rest_rank = (pl.col("key").rank("ordinal").over("label", rest) - 1).cast(pl.Int64)
    in_shared = pl.lit(True) if shared_per_class is None else rest_rank < public_per_class + shared_per_class
    rest_set = pl.when(rest_rank < public_per_class).then(pl.lit("public")).when(in_shared).then(pl.lit("shared"))
    return frame.with_columns(set=pl.when(rest).then(rest_set).otherwise("set")).select("id", "label", "set")


def _log_sizes(assigned: pl.DataFrame, per_class: int, holdout_per_class: int, public_per_class: int) -> None:
    counts = assigned.group_by("label").agg(**{name: (pl.col("set") == name).sum() for name in SETS})
    totals = {name: int(counts[name].sum()) for name in SETS}
    log.info("%d classes; sizes %s", len(counts), totals)
    short = {
        "A (per_class)": (counts["A"] < per_class).sum(),
        "holdout": (counts["holdout"] < holdout_per_class).sum(),
        "public": (counts["public"] < public_per_class).sum(),
    }
    for name, n_classes in short.items():
        if n_classes:
            log.warning("%d class(es) have fewer images than asked in %s", n_classes, name)


def other_public(path: str, label_column: str, pool: pl.DataFrame, public_per_class: int, seed: int) -> pl.DataFrame:
    """X drawn from another data set's labelled records (id, label, set "public"); an id of the pool is refused."""
    public = labelled_records(path, label_column)
    shared = public.filter(pl.col("id").is_in(pool["id"].implode()))["id"]
    if len(shared):
        raise DataError(f"{path}: {len(shared)} id(s) also in the pool, e.g. {shared.head(5).to_list()}")
    drawn = assign_sets(public, pl.Series([], dtype=pl.String), 0, 0, public_per_class, seed, shared_per_class=0)
    return drawn.filter(pl.col("set") == "public")


def make_ssl_splits(
    records: str,
    boxes: str,
    label_column: str,
    per_class: int,
    holdout_per_class: int,
    public_per_class: int,
    seed: int,
    out_dir: str,
    shared_per_class: int | None = None,
    public_records: str | None = None,
) -> None:
    """Write out_dir/{A,B,shared,holdout,public}.parquet (ids, sorted); X from `public_records` when given."""
    sizes = {"per_class": per_class, "holdout_per_class": holdout_per_class, "public_per_class": public_per_class}
    if shared_per_class is not None:
        sizes["shared_per_class"] = shared_per_class
    negative = [name for name, value in sizes.items() if value < 0]
    if negative:
        raise DataError(f"split sizes must not be negative: {negative}")
    labelled = labelled_records(records, label_column)
    box_ids = BOXES.read(boxes, ["id"])["id"].unique()
    unknown = box_ids.filter(~box_ids.is_in(labelled["id"].implode()))
    if len(unknown):
        log.warning("%s: %d boxed id(s) are no record of %s (ignored)", boxes, len(unknown), records)
    own_public = public_per_class if public_records is None else 0
    assigned = assign_sets(
        labelled, box_ids, per_class, holdout_per_class, own_public, seed, shared_per_class=shared_per_class
    )
    if public_records is not None:
        assigned = pl.concat(
            [
                assigned.filter(pl.col("set") != "public"),
                other_public(public_records, label_column, labelled, public_per_class, seed),
            ]
        )
    _log_sizes(assigned, per_class, holdout_per_class, public_per_class)
    params = {"records": records, "boxes": boxes, "label_column": label_column, "seed": seed, **sizes}
    params |= {"public_records": public_records} if public_records is not None else {}
    for name in SETS:
        ids = assigned.filter(pl.col("set") == name).select("id").sort("id")
        write_parquet(ids, Path(out_dir) / f"{name}.parquet", stage="ssl_splits", params=params, contract=SPLIT_IDS)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", required=True, help="records.parquet of the image pool")
    parser.add_argument("--boxes", required=True, help="boxes.parquet (BOXES) of the same data set")
    parser.add_argument("--label-column", required=True, help="the records' class column (label, dominant_object)")
    parser.add_argument("--per-class", type=int, required=True, help="at most this many box images per class in A, B")
    parser.add_argument("--holdout-per-class", type=int, required=True)
    parser.add_argument("--public-per-class", type=int, required=True)
    parser.add_argument(
        "--shared-per-class", type=lambda text: None if text.lower() in ("none", "null") else int(text), default=None
    )
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument(
        "--public-records", help="records.parquet of another data set to draw X from (default: the pool)"
    )
    parser.add_argument("--out-dir", required=True, help="folder for A, B, shared, holdout, public .parquet")
    run_stage(parser, argv, make_ssl_splits)


if __name__ == "__main__":
    main()
