"""Sweep summary: one row per parameter point with its parameters, memorization gaps and utility.

Reads the cached tables of a split by their contract paths:
`metrics/{split}/{point}/{target,holdout}/population.parquet` and
`utility/{split}/{point}/{A,B}.parquet`. Columns: `split`, `point`, the point's
parameters, then `{metric}_{value,mean,std}` for the target records and
`holdout_{metric}_{value,mean,std}` for the control (label mode `all`),
`{metric}_net` (target value minus holdout value), then
`{side}_{task}_{utility metric}` accuracies (side A is f_A, B is f_B).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import polars as pl

from workflow_scripts.io import atomic_path, read_parquet, write_parquet
from workflow_scripts.paramspace import POINT_KEYS, parse_segment

SUMMARY_METRICS = ("PPG", "PRG", "AUCG")


def point_frame(points: list[str]) -> pl.DataFrame:
    rows = [{"point": segment, **parse_segment(segment)} for segment in points]
    return pl.DataFrame(rows, schema={"point": pl.String, "n_train": pl.Int64, "epochs": pl.Int64,
                                      "temperature": pl.Float64, "weight_decay": pl.Float64,
                                      "mask_ratio": pl.Float64, "seed": pl.Int64})


def gap_columns(results: Path, split: str, points: list[str], label_mode: str = "all") -> pl.DataFrame:
    frames = [read_parquet(results / "metrics" / split / point / queries / "population.parquet")
              .with_columns(point=pl.lit(point), prefix=pl.lit("" if queries == "target" else "holdout_"))
              for point in points for queries in ("target", "holdout")]
    long = pl.concat(frames).filter((pl.col("label_mode") == label_mode) & pl.col("metric").is_in(SUMMARY_METRICS))
    long = long.unpivot(["value", "mean", "std"], index=["point", "prefix", "metric"], variable_name="statistic",
                        value_name="number") \
        .with_columns(column=pl.col("prefix") + pl.col("metric") + "_" + pl.col("statistic"))
    ordered = [f"{prefix}{metric}_{statistic}" for prefix in ("", "holdout_") for metric in SUMMARY_METRICS
               for statistic in ("value", "mean", "std")]
    wide = long.pivot("column", index="point", values="number").select("point", *ordered)
    # The net gap: what the target records show beyond what f_A and f_B differ by on unseen records.
    return wide.with_columns([(pl.col(f"{metric}_value") - pl.col(f"holdout_{metric}_value")).alias(f"{metric}_net")
                              for metric in SUMMARY_METRICS])


def utility_columns(results: Path, split: str, points: list[str]) -> pl.DataFrame:
    frames = [read_parquet(results / "utility" / split / point / f"{side}.parquet")
              .with_columns(point=pl.lit(point), column=pl.lit(f"{side}_") + pl.col("task") + "_" + pl.col("metric"))
              for point in points for side in ("A", "B")]
    return pl.concat(frames).pivot("column", index="point", values="accuracy")


def summarise(results: str | Path, split: str, points: list[str]) -> pl.DataFrame:
    results = Path(results)
    table = point_frame(points).join(gap_columns(results, split, points), on="point", how="left") \
        .join(utility_columns(results, split, points), on="point", how="left")
    return table.with_columns(split=pl.lit(split)).select("split", "point", *POINT_KEYS, pl.exclude(
        "split", "point", *POINT_KEYS)).sort(list(POINT_KEYS), nulls_last=False)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", required=True, help="the results folder")
    parser.add_argument("--split", required=True)
    parser.add_argument("--point", action="append", required=True, help="parameter point segment (repeatable)")
    parser.add_argument("--out", required=True, help="summary Parquet; a CSV copy is written beside it")
    args = parser.parse_args(argv)
    table = summarise(args.results, args.split, args.point)
    write_parquet(table, args.out, stage="summary", params={"split": args.split, "points": args.point})
    csv_path = Path(args.out).with_suffix(".csv")
    with atomic_path(csv_path) as tmp:
        table.write_csv(tmp, float_precision=4)


if __name__ == "__main__":
    main()
