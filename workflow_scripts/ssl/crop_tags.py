"""The tags an annotator finds in each kept periphery crop (contract CROP_TAGS): the naive Bayes reference's input.

One row per kept crop of the crops table (drop_reason null), in its order: id, labels, scores, highest score first
(ties by label), each label once at its best score; a crop where nothing is found has empty lists. Sources:

- ``ground-truth`` (the synthetic default's): the objects of the generator's objects table (OBJECTS) whose box
  overlaps the crop; a tag's score is the share of the object's box area inside the crop, and an object is a tag
  when that share is at least ``min_visible`` (and above 0). The crop's own label (the foreground's) is never a
  tag: the crop lies outside the foreground box by construction, so this only happens when another object of
  that class overlaps it; such rows are dropped and counted in the log. A kept crop whose image has no object row
  is refused (the objects table is not this data set's).
- ``precomputed``: a user's table(s) (ANNOTATION_TABLE: id, labels, optional scores; no scores = every tag 1),
  e.g. RAM tags computed elsewhere. Every kept crop needs a row (DataError naming the file and example ids);
  rows of other ids are dropped (a table may cover every image). The tags are kept as the annotator gave them,
  the crop's own label included: it is what the annotator saw in the crop.
- ``detic``: the chunk tables of ``python -m workflow_scripts.detic detect --crops CROPS ...`` (each image cropped
  to its kept crop), merged: every kept crop in exactly one chunk, no other id, each chunk made with ``--crops``.

CLI::

    python -m workflow_scripts.ssl.crop_tags ground-truth --crops C --objects O [--min-visible 0.25] --out OUT
    python -m workflow_scripts.ssl.crop_tags precomputed --crops C --table T [T ...] --out OUT
    python -m workflow_scripts.ssl.crop_tags detic --crops C --chunks CH [CH ...] --out OUT

Deterministic: no seed.
"""

from __future__ import annotations

import argparse
import json
import logging

import polars as pl

from workflow_scripts.annotate import read_annotation_table
from workflow_scripts.cli import LOG_FORMAT
from workflow_scripts.contracts import ANNOTATIONS, CROP_TAGS, CROPS, OBJECTS
from workflow_scripts.io import DataError, check_unique_ids, read_metadata, write_parquet

log = logging.getLogger(__name__)

BOX = ["x_min", "y_min", "x_max", "y_max"]
DEFAULT_MIN_VISIBLE = 0.25


def kept_crops(crops_path: str) -> pl.DataFrame:
    """The kept crops (id, label, box), in the table's order; ids checked unique."""
    crops = CROPS.read(crops_path)
    check_unique_ids(crops["id"], crops_path)
    kept = crops.filter(pl.col("drop_reason").is_null()).drop("drop_reason")
    bad = kept.filter(pl.any_horizontal(pl.col(["label", *BOX]).is_null()))["id"]
    if len(bad):
        raise DataError(f"{crops_path}: kept crop(s) without a label or box, e.g. {bad.head(5).to_list()}")
    return kept


def ranked(tags: pl.DataFrame) -> pl.DataFrame:
    """Long rows (id, label, score) -> one row per id (id, labels, scores): each label once at its best score,
    highest score first, ties by label."""
    best = tags.group_by("id", "label").agg(pl.col("score").max())
    ordered = best.sort(["score", "label"], descending=[True, False])
    return ordered.group_by("id", maintain_order=True).agg(labels=pl.col("label"), scores=pl.col("score"))


def for_every_crop(kept: pl.DataFrame, tags: pl.DataFrame) -> pl.DataFrame:
    """The CROP_TAGS table: a row per kept crop, in its order; a crop without tags gets empty lists."""
    table = kept.select("id").join(tags, on="id", how="left", maintain_order="left")
    return table.with_columns(
        pl.col("labels").fill_null(pl.lit([], pl.List(pl.String))),
        pl.col("scores").fill_null(pl.lit([], pl.List(pl.Float32))),
    ).cast(CROP_TAGS.polars())


def visible_shares(kept: pl.DataFrame, objects: pl.DataFrame) -> pl.DataFrame:
    """(id, crop label, object label, share) for every object of a kept crop's image: the share of the object's
    box area inside the crop (0 for a box without area)."""
    pairs = kept.join(objects.rename({name: f"object_{name}" for name in ["label", *BOX]}), on="id", how="inner")

    def overlap(low: str, high: str) -> pl.Expr:
        inside = pl.min_horizontal(high, f"object_{high}") - pl.max_horizontal(low, f"object_{low}")
        return inside.cast(pl.Float64).clip(lower_bound=0)

    width = (pl.col("object_x_max") - pl.col("object_x_min")).cast(pl.Float64)
    height = (pl.col("object_y_max") - pl.col("object_y_min")).cast(pl.Float64)
    area = width.clip(lower_bound=0) * height.clip(lower_bound=0)
    share = pl.when(area > 0).then(overlap("x_min", "x_max") * overlap("y_min", "y_max") / area).otherwise(0.0)
    return pairs.select("id", "label", pl.col("object_label").alias("tag"), share.alias("share"))


def ground_truth_tags(kept: pl.DataFrame, objects: pl.DataFrame, min_visible: float, objects_path: str):
    """The CROP_TAGS table of the kept crops from the objects' boxes (see the module)."""
    if not 0 <= min_visible <= 1:
        raise ValueError(f"min_visible must be in [0, 1], not {min_visible}")
    without = kept.join(objects.select("id").unique(), on="id", how="anti")["id"]
    if len(without):
        raise DataError(
            f"{objects_path}: no object row for {len(without)} kept crop(s)' image(s), e.g. {without.head(5).to_list()}"
        )
    shares = visible_shares(kept, objects)
    visible = shares.filter((pl.col("share") >= min_visible) & (pl.col("share") > 0))
    own = visible.filter(pl.col("tag") == pl.col("label"))
    if len(own):
        log.warning(
            "%s: %d visible object(s) of the crop's own class (the foreground label is never a tag) dropped, "
            "in %d crop(s), e.g. %s",
            objects_path,
            len(own),
            own["id"].n_unique(),
            own["id"].unique(maintain_order=True).head(5).to_list(),
        )
    tags = visible.filter(pl.col("tag") != pl.col("label")).select("id", label="tag", score="share")
    return for_every_crop(kept, ranked(tags))


def make_ground_truth(crops: str, objects: str, out: str, min_visible: float = DEFAULT_MIN_VISIBLE) -> None:
    kept = kept_crops(crops)
    table = ground_truth_tags(kept, OBJECTS.read(objects), min_visible, objects)
    params = {"source": "ground_truth", "crops": crops, "objects": objects, "min_visible": min_visible}
    write_crop_tags(table, out, params)


def annotated_tags(kept: pl.DataFrame, tables: pl.DataFrame, source: str, crops_path: str, drop_unknown: bool):
    """The CROP_TAGS table of the kept crops from annotation rows (id, labels, scores) read from `source`."""
    unknown = tables.join(kept.select("id"), on="id", how="anti")["id"]
    if len(unknown) and not drop_unknown:
        raise DataError(
            f"{source}: {len(unknown)} row(s) for ids that are no kept crop of {crops_path}, "
            f"e.g. {unknown.head(5).to_list()}"
        )
    if len(unknown):
        log.info("%s: %d row(s) for ids that are no kept crop of %s dropped", source, len(unknown), crops_path)
    rows = tables.join(kept.select("id"), on="id", how="semi")
    check_unique_ids(rows["id"], source)
    missing = kept.join(rows, on="id", how="anti")["id"]
    if len(missing):
        raise DataError(
            f"{source}: no row for {len(missing)} kept crop(s) of {crops_path}, e.g. {missing.head(5).to_list()}"
        )
    mismatched = rows.filter(pl.col("labels").list.len() != pl.col("scores").list.len())["id"]
    if len(mismatched):
        raise DataError(f"{source}: labels and scores differ in length for id(s) {mismatched.head(5).to_list()}")
    long = rows.explode(["labels", "scores"]).filter(pl.col("labels").is_not_null())
    if long["scores"].null_count():
        nulls = long.filter(pl.col("scores").is_null())["id"].unique(maintain_order=True)
        raise DataError(f"{source}: null score(s) for id(s) {nulls.head(5).to_list()}")
    return for_every_crop(kept, ranked(long.select("id", label="labels", score="scores")))


def make_precomputed(crops: str, table: list[str], out: str) -> None:
    kept = kept_crops(crops)
    source = " + ".join(table)
    tags = annotated_tags(kept, pl.concat([read_annotation_table(path) for path in table]), source, crops, True)
    write_crop_tags(tags, out, {"source": "precomputed", "crops": crops, "tables": table})


def make_detic(crops: str, chunks: list[str], out: str) -> None:
    for chunk in chunks:
        params = json.loads(read_metadata(chunk).get("dejavu:params", "{}"))
        if "crops" not in params:
            raise DataError(f"{chunk}: not a Detic chunk of crops (made without `detic detect --crops`)")
    kept = kept_crops(crops)
    source = f"{len(chunks)} Detic chunk(s) ({chunks[0]} ...)"
    tags = annotated_tags(kept, pl.concat([ANNOTATIONS.read(path) for path in chunks]), source, crops, False)
    write_crop_tags(tags, out, {"source": "detic", "crops": crops, "chunks": chunks})


def write_crop_tags(table: pl.DataFrame, out: str, params: dict) -> None:
    counts = table["labels"].list.len()
    log.info("%d kept crop(s): %d without a tag, %.2f tags a crop", len(table), (counts == 0).sum(), counts.mean() or 0)
    write_parquet(table, out, stage="ssl_crop_tags", params=params, contract=CROP_TAGS)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sources = parser.add_subparsers(dest="source", required=True)
    truth = sources.add_parser("ground-truth", help="the generator's objects overlapping each crop")
    truth.add_argument("--objects", required=True, help="objects.parquet (OBJECTS) of the synthetic generator")
    truth.add_argument(
        "--min-visible",
        type=float,
        default=DEFAULT_MIN_VISIBLE,
        help=f"an object is a tag when this share of its box is inside the crop (default: {DEFAULT_MIN_VISIBLE})",
    )
    precomputed = sources.add_parser("precomputed", help="a user's tag table(s): id, labels[, scores]")
    precomputed.add_argument("--table", nargs="+", required=True, help="Parquet table(s) of id, labels[, scores]")
    detic = sources.add_parser("detic", help="merge the chunks of `workflow_scripts.detic detect --crops`")
    detic.add_argument("--chunks", nargs="+", required=True, help="the detect command's chunk tables")
    for command in (truth, precomputed, detic):
        command.add_argument("--crops", required=True, help="crops.parquet (CROPS): the kept crops to tag")
        command.add_argument("--out", required=True, help="crop_tags.parquet (CROP_TAGS)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    if args.source == "ground-truth":
        make_ground_truth(args.crops, args.objects, args.out, args.min_visible)
    elif args.source == "precomputed":
        make_precomputed(args.crops, args.table, args.out)
    else:
        make_detic(args.crops, args.chunks, args.out)


if __name__ == "__main__":
    main()
