"""Agreement between memorization tests run on the same target records (two-model vs one-model variants).

A test *flags* a record as memorized when its target model recovers strictly
more of the record's objects than its reference does (`n_correct_target >
n_correct_reference`, label mode `top_n`, the sample-level view). For every
pair of tests: the share of records on which their flags agree, the Jaccard
overlap of the flagged sets, and how many records both flag.

The population metrics of the tests are laid side by side with the *net* gap:
the target records' gap minus the holdout's. A holdout gap is what the target
and the reference differ by on records neither trained on (for the one-model
test, two different kinds of model); the net gap is what is left for
memorization. Its std combines the two bootstrap stds as independent.
"""

from __future__ import annotations

import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import polars as pl

from workflow_scripts.cli import add_figure_outputs, add_keyed_file_arguments, parsed_keyed_files
from workflow_scripts.contracts import AGREEMENT, AGREEMENT_POPULATION, METRIC_RECORDS, POPULATION
from workflow_scripts.figures import save_figure
from workflow_scripts.io import DataError, write_parquet

FLAG_COLUMNS = ["id", "label_mode", "n_objects", "n_correct_target", "n_correct_reference"]  # of a records table
GAP_COLUMNS = ["label_mode", "metric", "value", "std"]  # of a population table


def memorization_flags(records: dict[str, pl.DataFrame], label_mode: str = "top_n") -> pl.DataFrame:
    """Wide table: `id` plus one boolean column per test, over the records every test scored."""
    flags = None
    for test, table in records.items():
        column = table.filter((pl.col("label_mode") == label_mode) & (pl.col("n_objects") > 0)).select(
            "id", (pl.col("n_correct_target") > pl.col("n_correct_reference")).alias(test)
        )
        flags = column if flags is None else flags.join(column, on="id", how="inner")
    if flags is None or flags.is_empty():
        raise DataError(f"no record is scored by all of the tests {list(records)}")
    return flags.sort("id")


def pairwise_agreement(flags: pl.DataFrame) -> pl.DataFrame:
    tests = [c for c in flags.columns if c != "id"]
    matrix = flags.select(tests).to_numpy().astype(np.int64)
    both = matrix.T @ matrix
    neither = (1 - matrix).T @ (1 - matrix)
    flagged = matrix.sum(axis=0)
    either = flagged[:, None] + flagged[None, :] - both
    n = len(matrix)
    rows = [
        {
            "test_a": a,
            "test_b": b,
            "n_records": n,
            "agreement": (both[i, j] + neither[i, j]) / n,
            "jaccard": both[i, j] / either[i, j] if either[i, j] else float("nan"),
            "n_both_flagged": int(both[i, j]),
            "n_flagged_a": int(flagged[i]),
            "n_flagged_b": int(flagged[j]),
        }
        for i, a in enumerate(tests)
        for j, b in enumerate(tests)
    ]
    return pl.DataFrame(rows)


QUERIES = ("target", "holdout")  # the query sets whose populations are laid side by side


def side_by_side(populations: dict[str, dict[str, pl.DataFrame]], label_mode: str = "all") -> pl.DataFrame:
    """Per test and metric: target and holdout value ± std, and the net gap (target − holdout)."""
    frames = []
    for test, by_queries in populations.items():
        sides = [
            by_queries[queries]
            .filter(pl.col("label_mode") == label_mode)
            .select("metric", pl.col("value").alias(f"{queries}_value"), pl.col("std").alias(f"{queries}_std"))
            for queries in QUERIES
        ]
        frames.append(
            sides[0]
            .join(sides[1], on="metric")
            .with_columns(
                pl.lit(test).alias("test"),
                net_value=pl.col("target_value") - pl.col("holdout_value"),
                net_std=(pl.col("target_std") ** 2 + pl.col("holdout_std") ** 2).sqrt(),
            )
        )
    return pl.concat(frames).select(
        "test", "metric", pl.lit(label_mode).alias("label_mode"), pl.exclude("test", "metric")
    )


def heatmap(agreement: pl.DataFrame) -> plt.Figure:
    tests = agreement["test_a"].unique(maintain_order=True).to_list()
    values = agreement.pivot("test_b", index="test_a", values="agreement").select(tests).to_numpy()
    figure, axis = plt.subplots(figsize=(1.6 * len(tests) + 2, 1.3 * len(tests) + 1.5))
    image = axis.imshow(values, vmin=0, vmax=1, cmap="viridis")
    axis.set_xticks(range(len(tests)), tests, rotation=30, ha="right")
    axis.set_yticks(range(len(tests)), tests)
    for i in range(len(tests)):
        for j in range(len(tests)):
            axis.text(
                j, i, f"{values[i, j]:.2f}", ha="center", va="center", color="white" if values[i, j] < 0.6 else "black"
            )
    figure.colorbar(image, ax=axis, label="share of records flagged alike")
    axis.set_title("Sample-level agreement between memorization tests")
    figure.tight_layout()
    return figure


def compare(
    records: dict[str, str],
    populations: dict[str, dict[str, str]],
    out_agreement: str,
    out_population: str,
    out_heatmap: list[str],
) -> None:
    """Per test (same keys in both): `records` its target records table, `populations` its population table per
    query set (target, holdout). Writes the agreement and side-by-side tables and the heatmap's files."""
    agreement = pairwise_agreement(
        memorization_flags({test: METRIC_RECORDS.read(path, FLAG_COLUMNS) for test, path in records.items()})
    )
    population = side_by_side(
        {
            test: {queries: POPULATION.read(path, GAP_COLUMNS) for queries, path in by_queries.items()}
            for test, by_queries in populations.items()
        }
    )
    params = {"records": records, "populations": populations}
    write_parquet(agreement, out_agreement, stage="agreement", params=params, contract=AGREEMENT)
    write_parquet(population, out_population, stage="agreement", params=params, contract=AGREEMENT_POPULATION)
    save_figure(heatmap(agreement), out_heatmap)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    population_helps = {
        f"{queries}-population": f"a test's population table on the {queries} records (repeatable)"
        for queries in QUERIES
    }
    records_help = "a test's records table on the target records (repeatable, at least two tests)"
    add_keyed_file_arguments(parser, {"records": records_help, **population_helps}, metavar="TEST=FILE")
    parser.add_argument("--out-agreement", required=True, help="pairwise agreement Parquet")
    parser.add_argument("--out-population", required=True, help="side-by-side population Parquet")
    add_figure_outputs(parser, "out-heatmap")
    args = parser.parse_args(argv)
    records = parsed_keyed_files(args, "records")
    by_queries = {queries: parsed_keyed_files(args, f"{queries}-population") for queries in QUERIES}
    if len(records) < 2:
        parser.error("give at least two tests")
    if any(files.keys() != records.keys() for files in by_queries.values()):
        parser.error("give each test's --records and its population tables for every query set")
    populations = {test: {queries: by_queries[queries][test] for queries in QUERIES} for test in records}
    compare(records, populations, args.out_agreement, args.out_population, args.out_heatmap)


if __name__ == "__main__":
    main()
