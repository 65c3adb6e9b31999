"""Sweep summary: one row per parameter point with its parameters, memorization gaps and utility.

Reads, per point, the population tables of its target and holdout records and
the utility tables of f_A and f_B, each file given by name. Columns: `split`, `point`, the point's
parameters, then `{metric}_{value,mean,std}` for the target records and
`holdout_{metric}_{value,mean,std}` for the control (label mode `all`),
`{metric}_net` (target value minus holdout value); where B's records were measured with f_B as the target
(metrics.symmetric), `reverse_{metric}_{value,mean,std}` and `{metric}_symmetric` (the mean of both
directions, in which what one model retrieves better than the other everywhere cancels) with its std; then
`{side}_{task}_{utility metric}` accuracies (side A is f_A, B is f_B).
"""

from __future__ import annotations

import argparse

import polars as pl

from workflow_scripts.cli import add_keyed_file_arguments, parsed_keyed_files
from workflow_scripts.contracts import POPULATION, SUMMARY, SUMMARY_METRICS, UTILITY
from workflow_scripts.io import atomic_path, write_parquet
from workflow_scripts.paramspace import POINT_KEYS, parse_segment

GAP_COLUMNS = ["label_mode", "metric", "value", "mean", "std"]  # of a population table
QUERIES = ("target", "holdout", "reverse")
PREFIXES = {"target": "", "holdout": "holdout_", "reverse": "reverse_"}
SIDES = ("A", "B")


def point_frame(points: list[str]) -> pl.DataFrame:
    rows = [{"point": segment, **parse_segment(segment)} for segment in points]
    return pl.DataFrame(rows, schema=SUMMARY.polars(["point", *POINT_KEYS]))


def gap_columns(populations: dict[str, dict[str, str]], label_mode: str = "all") -> pl.DataFrame:
    frames = [
        POPULATION.read(path, GAP_COLUMNS).with_columns(point=pl.lit(point), prefix=pl.lit(PREFIXES[queries]))
        for queries, by_point in populations.items()
        for point, path in by_point.items()
    ]
    long = pl.concat(frames).filter((pl.col("label_mode") == label_mode) & pl.col("metric").is_in(SUMMARY_METRICS))
    long = long.unpivot(
        ["value", "mean", "std"], index=["point", "prefix", "metric"], variable_name="statistic", value_name="number"
    ).with_columns(column=pl.col("prefix") + pl.col("metric") + "_" + pl.col("statistic"))
    ordered = [
        f"{PREFIXES[queries]}{metric}_{statistic}"
        for queries in populations
        for metric in SUMMARY_METRICS
        for statistic in ("value", "mean", "std")
    ]
    wide = long.pivot("column", index="point", values="number").select("point", *ordered)
    # The net gap: what the target records show beyond what f_A and f_B differ by on unseen records.
    wide = wide.with_columns(
        [
            (pl.col(f"{metric}_value") - pl.col(f"holdout_{metric}_value")).alias(f"{metric}_net")
            for metric in SUMMARY_METRICS
        ]
    )
    return wide.with_columns(symmetric_columns()) if "reverse" in populations else wide


def symmetric_columns() -> list[pl.Expr]:
    """The mean of f_A's gap on A and f_B's on B (disjoint record sets, so their bootstrap variances add)."""
    columns = []
    for metric in SUMMARY_METRICS:
        forward, reverse = pl.col(f"{metric}_value"), pl.col(f"reverse_{metric}_value")
        spread = (pl.col(f"{metric}_std") ** 2 + pl.col(f"reverse_{metric}_std") ** 2).sqrt() / 2
        columns += [((forward + reverse) / 2).alias(f"{metric}_symmetric"), spread.alias(f"{metric}_symmetric_std")]
    return columns


def utility_columns(utilities: dict[str, dict[str, str]]) -> pl.DataFrame:
    frames = [
        UTILITY.read(path, ["task", "metric", "accuracy"]).with_columns(
            point=pl.lit(point), column=pl.lit(f"{side}_") + pl.col("task") + "_" + pl.col("metric")
        )
        for side, by_point in utilities.items()
        for point, path in by_point.items()
    ]
    return pl.concat(frames).pivot("column", index="point", values="accuracy")


def summarise(split: str, populations: dict[str, dict[str, str]], utilities: dict[str, dict[str, str]]) -> pl.DataFrame:
    """`populations`: per query set (target, holdout, and reverse if measured), each point's population table;
    `utilities`: per side (A, B), each point's utility table. Every query set and side must name the same
    points."""
    points = list(populations["target"])
    if any(set(by_point) != set(points) for by_point in [*populations.values(), *utilities.values()]):
        raise ValueError("summary: every population and utility table set must cover the same points")
    table = (
        point_frame(points)
        .join(gap_columns(populations), on="point", how="left")
        .join(utility_columns(utilities), on="point", how="left")
    )
    return (
        table.with_columns(split=pl.lit(split))
        .select("split", "point", *POINT_KEYS, pl.exclude("split", "point", *POINT_KEYS))
        .sort(list(POINT_KEYS), nulls_last=False)
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", required=True)
    population_helps = {
        f"{queries}-population": f"a parameter point's population table on the {queries} records (repeatable)"
        for queries in ("target", "holdout")
    }
    utility_helps = {
        f"utility-{side}": f"a parameter point's utility table of side {side} (repeatable)" for side in SIDES
    }
    add_keyed_file_arguments(parser, {**population_helps, **utility_helps}, metavar="POINT=FILE")
    parser.add_argument(
        "--reverse-population",
        action="append",
        default=[],
        metavar="POINT=FILE",
        help="a point's population table on B's records, f_B the target (repeatable; metrics.symmetric)",
    )
    parser.add_argument("--out", required=True, help="summary Parquet")
    parser.add_argument("--out-csv", required=True, help="its CSV copy")
    args = parser.parse_args(argv)
    populations = {queries: parsed_keyed_files(args, f"{queries}-population") for queries in QUERIES}
    if not populations["reverse"]:  # measured one way only
        del populations["reverse"]
    utilities = {side: parsed_keyed_files(args, f"utility-{side}") for side in SIDES}
    table = summarise(args.split, populations, utilities)
    write_parquet(
        table,
        args.out,
        stage="summary",
        contract=SUMMARY,
        params={"split": args.split, "points": list(populations["target"])},
    )
    with atomic_path(args.out_csv) as tmp:
        table.write_csv(tmp, float_precision=4)


if __name__ == "__main__":
    main()
