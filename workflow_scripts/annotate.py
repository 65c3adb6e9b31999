"""Annotation stage: produce the annotations contract (id, labels, scores) for every record of a dataset.

Annotator ``ground_truth`` takes the object lists a dataset adapter wrote
(`ground_truth.parquet`: synthetic scene objects, COCO instance categories) and
checks them against the records: every record gets exactly one row (a record
with no objects gets empty lists, never a missing row), labels and scores have
equal lengths, and no row names an unknown record.

Annotator ``precomputed`` takes user-supplied annotation tables (one, or the
parts' annotations of a mixed data set), conformed the same way; a record
without a row is an error unless missing records are allowed (they then get
empty lists and are excluded from the metrics' gaps), and a row for an unknown
id is an error unless unknown ids are dropped (a mix draws a subset of its
parts; an adapter may have skipped invalid records).
"""

from __future__ import annotations

import argparse
import logging

import polars as pl

from workflow_scripts.cli import LOG_FORMAT
from workflow_scripts.contracts import ANNOTATION_TABLE, ANNOTATIONS, RECORDS
from workflow_scripts.io import DataError, check_unique_ids, write_parquet

log = logging.getLogger(__name__)


def with_unit_scores(table: pl.DataFrame) -> pl.DataFrame:
    """`table` with scores: a label list without confidences gets score 1 for every label (each is certain)."""
    if "scores" in table.columns:
        return table
    return table.with_columns(scores=pl.col("labels").list.eval(pl.lit(1.0, pl.Float32)))


def conform_annotations(
    records: pl.DataFrame, annotations: pl.DataFrame, annotations_path: str, records_path: str
) -> pl.DataFrame:
    """Validate annotations against records and return one row per record, in record order."""
    check_unique_ids(annotations["id"], annotations_path)
    annotations = with_unit_scores(annotations).select(ANNOTATIONS.names).cast(ANNOTATIONS.polars())
    unknown = annotations.join(records, on="id", how="anti")["id"]
    if len(unknown):
        raise DataError(
            f"{annotations_path}: {len(unknown)} annotation row(s) for ids not in {records_path}, "
            f"e.g. {unknown.head(5).to_list()}"
        )
    mismatched = annotations.filter(pl.col("labels").list.len() != pl.col("scores").list.len())["id"]
    if len(mismatched):
        raise DataError(
            f"{annotations_path}: labels and scores differ in length for record(s) {mismatched.head(5).to_list()}"
        )
    null_labels = annotations.filter(pl.col("labels").list.eval(pl.element().is_null()).list.any())["id"]
    if len(null_labels):
        raise DataError(f"{annotations_path}: null label(s) in record(s) {null_labels.head(5).to_list()}")
    conformed = records.select("id").join(annotations, on="id", how="left", maintain_order="left")
    missing = conformed["labels"].null_count()
    if missing:
        log.info("%s: %d record(s) have no annotation row; stored with empty label lists", annotations_path, missing)
    return conformed.with_columns(
        pl.col("labels").fill_null(pl.lit([], pl.List(pl.String))),
        pl.col("scores").fill_null(pl.lit([], pl.List(pl.Float32))),
    )


def check_complete(records: pl.DataFrame, annotations: pl.DataFrame, annotations_path: str, records_path: str) -> None:
    missing = records.join(annotations, on="id", how="anti")["id"]
    if len(missing):
        raise DataError(
            f"{annotations_path}: no annotation row for {len(missing)} record(s) of {records_path}, "
            f"e.g. {missing.head(5).to_list()}"
        )


def read_annotation_table(path: str) -> pl.DataFrame:
    """A table of id, labels[, scores] (the annotation table contract) as the annotations contract's columns."""
    table = with_unit_scores(ANNOTATION_TABLE.read(path, extra=True))
    return table.select(ANNOTATIONS.names).cast(ANNOTATIONS.polars())


def read_record_ids(records_path: str, columns: tuple[str, ...] = ("id",)) -> pl.DataFrame:
    """The records' `columns` (id first), their ids checked unique: annotations are matched to records by id."""
    records = RECORDS.read(records_path, list(columns))
    check_unique_ids(records["id"], records_path)
    return records


def write_annotations(table: pl.DataFrame, out_path: str, params: dict) -> None:
    write_parquet(table, out_path, stage="annotate", contract=ANNOTATIONS, params=params)


def write_conformed(
    records: pl.DataFrame, annotations: pl.DataFrame, source: str, records_path: str, out_path: str, params: dict
) -> None:
    """Write `annotations` (from `source`) as the records' annotations.parquet, one row per record."""
    write_annotations(conform_annotations(records, annotations, source, records_path), out_path, params)


def annotate_precomputed(
    records_path: str,
    annotation_paths: list[str],
    out_path: str,
    allow_missing: bool = False,
    drop_unknown: bool = False,
) -> None:
    records = read_record_ids(records_path)
    annotations = pl.concat([read_annotation_table(path) for path in annotation_paths])
    source = " + ".join(annotation_paths)
    if drop_unknown:
        annotations = annotations.join(records.select("id"), on="id", how="semi")
    if not allow_missing:
        check_complete(records, annotations, source, records_path)
    params = {
        "annotator": "precomputed",
        "records": records_path,
        "sources": annotation_paths,
        "allow_missing": allow_missing,
        "drop_unknown": drop_unknown,
    }
    write_conformed(records, annotations, source, records_path, out_path, params)


def annotate_ground_truth(records_path: str, ground_truth_path: str, out_path: str) -> None:
    params = {"annotator": "ground_truth", "records": records_path, "source": ground_truth_path}
    ground_truth = read_annotation_table(ground_truth_path)
    write_conformed(read_record_ids(records_path), ground_truth, ground_truth_path, records_path, out_path, params)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--annotator", choices=("ground_truth", "precomputed"), default="ground_truth")
    parser.add_argument("--records", required=True)
    parser.add_argument("--ground-truth", help="ground_truth: Parquet with id, labels[, scores] from the adapter")
    parser.add_argument("--annotations", nargs="+", help="precomputed: Parquet table(s) with id, labels[, scores]")
    parser.add_argument(
        "--allow-missing",
        action="store_true",
        help="precomputed: records without a row get empty lists instead of an error",
    )
    parser.add_argument(
        "--drop-unknown",
        action="store_true",
        help="precomputed: rows for ids not in the records are dropped instead of an error",
    )
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    if args.annotator == "ground_truth":
        if not args.ground_truth:
            parser.error("--annotator ground_truth needs --ground-truth")
        annotate_ground_truth(args.records, args.ground_truth, args.out)
    else:
        if not args.annotations:
            parser.error("--annotator precomputed needs --annotations")
        annotate_precomputed(args.records, args.annotations, args.out, args.allow_missing, args.drop_unknown)


if __name__ == "__main__":
    main()
