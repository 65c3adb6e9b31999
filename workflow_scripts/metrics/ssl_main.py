"""`python -m workflow_scripts.metrics.ssl`: the SSL metric stage's command line, its inputs read and checked.

Inputs: the crops table (its kept crops are the queries, their labels the truth), the split files of A, B and the
holdout, the records table whose label column labels the public ids, the target's neighbours files (`--target
MODEL:CROPSET=FILE`: f_A on A and the holdout, f_B on B and the holdout) and the reference's (`--reference
MODEL:CROPSET=FILE`, the reference of MODEL's side on the other side's crops and the holdout): neighbours files
for the two-model test, SSL_PREDICTIONS tables of a reference classifier for a one-model test
(`--reference-kind predictions`). Bad input is a DataError naming the file and example ids.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging

import numpy as np
import polars as pl

from workflow_scripts.cli import LOG_FORMAT, add_keyed_file_arguments, dataclass_from_args, parsed_keyed_files
from workflow_scripts.contracts import (
    CROPS,
    NEIGHBORS,
    RECORDS,
    SPLIT_IDS,
    SSL_POPULATION,
    SSL_PREDICTIONS,
    SSL_RECORDS,
    SSL_SAMPLE_LEVEL,
)
from workflow_scripts.io import DataError, check_unique_ids, write_parquet
from workflow_scripts.metrics.ssl import (
    CROP_SETS,
    REFERENCE_KEYS,
    TABLES,
    TARGET_KEYS,
    SSLMetricParams,
    Votes,
    evaluate,
    records_table,
    sample_level,
    vote,
)

REFERENCE_KINDS = ("knn", "predictions")
CONTRACTS = dict(zip(TABLES, (SSL_RECORDS, SSL_POPULATION, SSL_SAMPLE_LEVEL)))
SHOWN_IDS = 5  # example ids a refusal names


def refuse(path: str, what: str, ids: pl.Series) -> None:
    """DataError naming `path`, how many distinct `ids` are `what`, and the first few, unless there are none."""
    ids = ids.unique().sort()
    if len(ids):
        shown = ", ".join(map(str, ids.head(SHOWN_IDS).to_list()))
        raise DataError(f"{path}: {len(ids)} {what}, e.g. {shown}")


def read_sets(splits: dict[str, str], crops: str) -> dict[str, pl.DataFrame]:
    """Per crop set (A, B, holdout), its kept crops (id, label) in id order. Refuses ids in two split files, split
    ids without a crop row, kept crops without a label; crop rows of no split are left out."""
    members = []
    for crop_set in CROP_SETS:
        ids = SPLIT_IDS.read(splits[crop_set])["id"]
        check_unique_ids(ids, splits[crop_set])
        members.append(pl.DataFrame({"id": ids, "crop_set": crop_set}))
    members = pl.concat(members)
    refuse(", ".join(splits.values()), "id(s) in two split files", members.filter(pl.col("id").is_duplicated())["id"])
    table = CROPS.read(crops, ["id", "label", "drop_reason"])
    check_unique_ids(table["id"], crops)
    joined = members.join(table.with_columns(listed=True), on="id", how="left")
    refuse(crops, "split id(s) without a crop row", joined.filter(pl.col("listed").is_null())["id"])
    kept = joined.filter(pl.col("listed") & pl.col("drop_reason").is_null())
    refuse(crops, "kept crop(s) without a label", kept.filter(pl.col("label").is_null())["id"])
    return {
        crop_set: kept.filter(pl.col("crop_set") == crop_set).select("id", "label").sort("id") for crop_set in CROP_SETS
    }


def read_public(records: str, label_column: str, sets: dict[str, pl.DataFrame]) -> tuple[pl.Series, pl.DataFrame]:
    """The label vocabulary in name order (every label of the records' column and of the kept crops) and the
    records' labelled ids with their codes (id, code)."""
    table = RECORDS.read(records, ["id", label_column])
    if table[label_column].dtype not in (pl.String, pl.Null):
        raise DataError(f"{records}: label column '{label_column}' is {table[label_column].dtype}, not a string")
    check_unique_ids(table["id"], records)
    labelled = table.filter(pl.col(label_column).is_not_null())
    labels = [labelled[label_column].cast(pl.String), *(frame["label"] for frame in sets.values())]
    vocabulary = pl.concat(labels).unique().sort()
    return vocabulary, labelled.select("id", code=codes(labelled[label_column], vocabulary))


def codes(labels: pl.Series, vocabulary: pl.Series) -> pl.Series:
    """Each label's position in `vocabulary` (unique, sorted: a code order is a name order)."""
    return labels.cast(pl.String).cast(pl.Enum(vocabulary)).to_physical().cast(pl.Int32)


def row_flags(k: int) -> dict[str, pl.Expr]:
    """What a neighbours row is refused for: a negative rank, a query not among the set's kept crops, a public id
    without a label in a row of rank < k."""
    return {
        "negative": pl.col("rank") < 0,
        "unknown": pl.col("query").is_null(),
        "unlabelled": pl.col("code").is_null() & (pl.col("rank") < k),
    }


def joined_rows(path: str, ids: pl.Series, public: pl.DataFrame) -> pl.LazyFrame:
    """A neighbours file's rows with `query` (the query's place among `ids`) and `code` (the public id's label)."""
    index = pl.DataFrame({"query_id": ids}).with_columns(query=pl.int_range(pl.len(), dtype=pl.Int32))
    return (
        NEIGHBORS.scan(path, ["query_id", "rank", "public_id"])
        .join(index.lazy(), on="query_id", how="left")
        .join(public.lazy(), left_on="public_id", right_on="id", how="left")
    )


def collected(frame: pl.LazyFrame, path: str) -> pl.DataFrame:
    try:
        return frame.collect(engine="streaming")
    except pl.exceptions.PolarsError as error:  # e.g. an int64 rank out of int16's range
        raise DataError(f"{path}: a neighbors value does not fit its declared type ({error})") from error


def refuse_flagged(rows: pl.DataFrame, joined: pl.LazyFrame, flag: str, k: int, column: str, path: str, what: str):
    """`refuse` the `column` values of the rows `flag`ged, read again (only then) from the file."""
    if rows[flag].any():
        refuse(path, what, collected(joined.filter(row_flags(k)[flag]).select(column), path)[column])


def neighbour_labels(path: str, crop_set: str, ids: pl.Series, public: pl.DataFrame, k: int, where: str) -> np.ndarray:
    """[len(ids), k] label codes of each query's neighbours of rank 0..k−1, queries in the order of `ids` (the kept
    crops of `crop_set`). Refuses negative ranks, queries that are not kept crops of the set, kept crops with fewer
    than k neighbours of rank < k or a rank listed twice, and public ids without a label (`where`: the records).
    One pass over the file holds three numbers and three flags a row (a refusal reads it again for the ids)."""
    joined = joined_rows(path, ids, public)
    rows = collected(joined.select("query", "rank", "code", **row_flags(k)), path)
    refuse_flagged(rows, joined, "negative", k, "query_id", path, "query id(s) with a negative rank")
    refuse_flagged(
        rows, joined, "unknown", k, "query_id", path, f"query id(s) that are not kept crops of set {crop_set}"
    )
    rows = rows.filter(pl.col("rank").is_between(0, k - 1))
    query, rank = rows["query"].to_numpy(), rows["rank"].to_numpy()
    listed = np.zeros((len(ids), k), bool)
    listed[query, rank] = True
    short = ids.filter(pl.Series(listed.sum(axis=1) < k))
    refuse(path, f"kept crop(s) of set {crop_set} with fewer than k={k} neighbours of rank < {k}", short)
    refuse(path, "query id(s) listing a rank twice", ids.filter(pl.Series(np.bincount(query, minlength=len(ids)) > k)))
    refuse_flagged(
        rows, joined, "unlabelled", k, "public_id", where, f"public id(s) without a label (neighbours in {path})"
    )
    labels = np.zeros((len(ids), k), np.int32)
    labels[query, rank] = rows["code"].to_numpy()
    return labels


def prediction_labels(path: str, crop_set: str, ids: pl.Series, vocabulary: pl.Series, k: int) -> np.ndarray:
    """[len(ids), k] label codes of a reference classifier's k votes on each kept crop of `crop_set` (in the order
    of `ids`). Refuses missing or extra ids, an id listed twice, votes of another length than k, unknown labels."""
    table = SSL_PREDICTIONS.read(path, ["id", "votes"])
    check_unique_ids(table["id"], path)
    joined = pl.DataFrame({"id": ids}).join(table, on="id", how="left", maintain_order="left")
    refuse(path, f"kept crop(s) of set {crop_set} without a prediction", joined.filter(pl.col("votes").is_null())["id"])
    refuse(
        path, f"id(s) that are not kept crops of set {crop_set}", table.filter(~pl.col("id").is_in(ids.implode()))["id"]
    )
    refuse(path, f"prediction(s) without exactly k={k} votes", joined.filter(pl.col("votes").list.len() != k)["id"])
    votes = joined.select("id", "votes").explode("votes")
    known = votes["votes"].is_in(vocabulary.implode())
    refuse(path, "prediction(s) voting for a label that is no record's or crop's", votes.filter(~known)["id"])
    return codes(votes["votes"], vocabulary).to_numpy().reshape(len(ids), k)


def read_votes(files: dict[str, str], sets, vocabulary, public, params, records: str, kind: str) -> dict[str, Votes]:
    """The votes of each MODEL:CROPSET file on its crop set's kept crops: neighbours' labels, or predictions."""
    votes = {}
    for key, path in files.items():
        frame = sets[key.split(":")[1]]
        if kind == "knn":
            labels = neighbour_labels(path, key.split(":")[1], frame["id"], public, params.k, records)
        else:
            labels = prediction_labels(path, key.split(":")[1], frame["id"], vocabulary, params.k)
        votes[key] = vote(labels, codes(frame["label"], vocabulary).to_numpy())
        logging.info("voted on the %d kept crops of %s (%s)", len(frame), key, path)
    return votes


def compute(
    crops: str,
    records: str,
    label_column: str,
    splits: dict[str, str],
    target: dict[str, str],
    reference: dict[str, str],
    outputs: dict[str, str],
    params: SSLMetricParams | None = None,
    reference_kind: str = "knn",
) -> None:
    """Write the records, population and sample-level tables (`outputs`: table name -> file)."""
    params = params or SSLMetricParams()
    sets = read_sets(splits, crops)
    vocabulary, public = read_public(records, label_column, sets)
    target_votes = read_votes(target, sets, vocabulary, public, params, records, "knn")
    reference_votes = read_votes(reference, sets, vocabulary, public, params, records, reference_kind)
    pairs, population = evaluate(target_votes, reference_votes, params)
    table = records_table(sets, pairs, vocabulary)
    tables = dict(zip(TABLES, (table, population, sample_level(table))))
    provenance = {
        "crops": crops,
        "records": records,
        "label_column": label_column,
        "splits": splits,
        "target": target,
        "reference": reference,
        "reference_kind": reference_kind,
        **dataclasses.asdict(params),
    }
    for name, frame in tables.items():
        write_parquet(frame, outputs[name], contract=CONTRACTS[name], stage="ssl_metrics", params=provenance)


def build_parser() -> argparse.ArgumentParser:
    """Input and output files, then one flag per SSLMetricParams field with its default."""
    parser = argparse.ArgumentParser(description="SSL déjà vu metrics: kNN label votes of the periphery crops.")
    parser.add_argument("--crops", required=True, help="crops Parquet: its kept crops are the queries")
    parser.add_argument("--records", required=True, help="records Parquet labelling the public ids")
    parser.add_argument("--label-column", required=True, help="the records' label column")
    add_keyed_file_arguments(parser, {"split": "ids of a crop set: A=, B=, holdout=FILE"}, metavar="CROPSET=FILE")
    keyed_help = {
        "target": f"the target's neighbours Parquet per model and crop set: {', '.join(TARGET_KEYS)}",
        "reference": f"the reference's neighbours (or predictions) per side and crop set: {', '.join(REFERENCE_KEYS)}",
    }
    add_keyed_file_arguments(parser, keyed_help, metavar="MODEL:CROPSET=FILE")
    parser.add_argument(
        "--reference-kind",
        choices=REFERENCE_KINDS,
        default="knn",
        help="neighbours files, or a classifier's predictions",
    )
    for table in TABLES:
        parser.add_argument(f"--{table.replace('_', '-')}-out", required=True, help=f"the {table} table's file")
    for field in dataclasses.fields(SSLMetricParams):
        many = field.name == "top_p"
        parser.add_argument(
            f"--{field.name.replace('_', '-')}",
            type=float if many else type(field.default),
            nargs="+" if many else None,
            default=field.default,
            help=f"{field.metadata['help']} (default: {' '.join(map(str, np.atleast_1d(field.default)))})",
        )
    return parser


def keyed(parser: argparse.ArgumentParser, args: argparse.Namespace, flag: str, keys: list[str]) -> dict[str, str]:
    """The files of a keyed flag, exactly one per key of `keys`."""
    files = parsed_keyed_files(args, flag)
    if sorted(files) != sorted(keys):
        parser.error(f"--{flag} takes exactly the keys {', '.join(keys)}; got {', '.join(files)}")
    return files


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        params = dataclass_from_args(SSLMetricParams, args)
    except ValueError as error:
        parser.error(str(error))
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    compute(
        crops=args.crops,
        records=args.records,
        label_column=args.label_column,
        splits=keyed(parser, args, "split", list(CROP_SETS)),
        target=keyed(parser, args, "target", list(TARGET_KEYS)),
        reference=keyed(parser, args, "reference", list(REFERENCE_KEYS)),
        reference_kind=args.reference_kind,
        outputs={table: getattr(args, f"{table}_out") for table in TABLES},
        params=params,
    )


if __name__ == "__main__":
    main()
