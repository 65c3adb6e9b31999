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
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import polars as pl  # noqa: E402

from workflow_scripts.figures import save_figure  # noqa: E402
from workflow_scripts.io import DataError, read_parquet, write_parquet  # noqa: E402


def memorization_flags(records: dict[str, pl.DataFrame], label_mode: str = "top_n") -> pl.DataFrame:
    """Wide table: `id` plus one boolean column per test, over the records every test scored."""
    flags = None
    for test, table in records.items():
        column = table.filter((pl.col("label_mode") == label_mode) & (pl.col("n_objects") > 0)).select(
            "id", (pl.col("n_correct_target") > pl.col("n_correct_reference")).alias(test))
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
    rows = [{"test_a": a, "test_b": b, "n_records": n, "agreement": (both[i, j] + neither[i, j]) / n,
             "jaccard": both[i, j] / either[i, j] if either[i, j] else float("nan"),
             "n_both_flagged": int(both[i, j]), "n_flagged_a": int(flagged[i]), "n_flagged_b": int(flagged[j])}
            for i, a in enumerate(tests) for j, b in enumerate(tests)]
    return pl.DataFrame(rows)


def side_by_side(populations: dict[str, dict[str, pl.DataFrame]], label_mode: str = "all") -> pl.DataFrame:
    """Per test and metric: target and holdout value ± std, and the net gap (target − holdout)."""
    frames = []
    for test, by_queries in populations.items():
        sides = [by_queries[queries].filter(pl.col("label_mode") == label_mode).select(
            "metric", pl.col("value").alias(f"{queries}_value"), pl.col("std").alias(f"{queries}_std"))
            for queries in ("target", "holdout")]
        frames.append(sides[0].join(sides[1], on="metric").with_columns(
            pl.lit(test).alias("test"),
            net_value=pl.col("target_value") - pl.col("holdout_value"),
            net_std=(pl.col("target_std") ** 2 + pl.col("holdout_std") ** 2).sqrt()))
    return pl.concat(frames).select("test", "metric", pl.lit(label_mode).alias("label_mode"), pl.exclude("test", "metric"))


def heatmap(agreement: pl.DataFrame) -> plt.Figure:
    tests = agreement["test_a"].unique(maintain_order=True).to_list()
    values = agreement.pivot("test_b", index="test_a", values="agreement").select(tests).to_numpy()
    figure, axis = plt.subplots(figsize=(1.6 * len(tests) + 2, 1.3 * len(tests) + 1.5))
    image = axis.imshow(values, vmin=0, vmax=1, cmap="viridis")
    axis.set_xticks(range(len(tests)), tests, rotation=30, ha="right")
    axis.set_yticks(range(len(tests)), tests)
    for i in range(len(tests)):
        for j in range(len(tests)):
            axis.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center",
                      color="white" if values[i, j] < 0.6 else "black")
    figure.colorbar(image, ax=axis, label="share of records flagged alike")
    axis.set_title("Sample-level agreement between memorization tests")
    figure.tight_layout()
    return figure


def compare(test_dirs: dict[str, str], out_dir: str | Path) -> None:
    """`test_dirs`: each test's metrics folder holding `target/` and `holdout/` tables."""
    out_dir = Path(out_dir)
    records = {test: read_parquet(Path(d) / "target" / "records.parquet") for test, d in test_dirs.items()}
    populations = {test: {queries: read_parquet(Path(d) / queries / "population.parquet")
                          for queries in ("target", "holdout")} for test, d in test_dirs.items()}
    agreement = pairwise_agreement(memorization_flags(records))
    params = {"tests": test_dirs}
    write_parquet(agreement, out_dir / "agreement.parquet", stage="agreement", params=params)
    write_parquet(side_by_side(populations), out_dir / "population.parquet", stage="agreement", params=params)
    save_figure(heatmap(agreement), out_dir / "agreement")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--test", action="append", required=True, metavar="NAME=METRICS_DIR",
                        help="a test's metrics folder, holding target/ and holdout/ (repeatable, at least two)")
    parser.add_argument("--out-dir", required=True)
    args = parser.parse_args(argv)
    tests = dict(item.split("=", 1) for item in args.test)
    if len(tests) < 2:
        parser.error("give at least two --test")
    compare(tests, args.out_dir)


if __name__ == "__main__":
    main()
