"""The SSL test's two-model and one-model variants side by side on the same crops (the image counterpart of
`workflow_scripts.agreement`, whose pairwise agreement and heat map it reuses).

A test flags a crop of A or B as memorized when its target's top-1 label is right and its reference's wrong (the
*memorized* quadrant). Per pair of tests: the share of crops flagged alike, the Jaccard overlap of the flagged
sets (contract AGREEMENT). Per test: its population rows of the top-1 prediction (gap at each top p %, holdout gap,
quadrants; contract SSL_AGREEMENT_POPULATION). The memorization confidence of a flagged crop, H_reference −
H_target (Kokhlikyan et al. 2024; both entropies over k votes on the same labels, docs/DESIGN.md §10), is drawn
as one histogram per test.

`python -m workflow_scripts.ssl.agreement --records TEST=FILE ... --population TEST=FILE ...
--sample-level TEST=FILE ... --out-agreement A --out-population P --out-heatmap F.png F.svg
--out-confidence C.png C.svg`
"""

from __future__ import annotations

import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import polars as pl

from workflow_scripts.agreement import heatmap, pairwise_agreement
from workflow_scripts.cli import add_figure_outputs, add_keyed_file_arguments, parsed_keyed_files
from workflow_scripts.contracts import (
    AGREEMENT,
    SSL_AGREEMENT_POPULATION,
    SSL_POPULATION,
    SSL_RECORDS,
    SSL_SAMPLE_LEVEL,
)
from workflow_scripts.figures import save_figure
from workflow_scripts.io import DataError, write_parquet

FLAG_COLUMNS = ["id", "crop_set", "correct_top1_target", "correct_top1_reference"]
STATISTICS = ("gap", "holdout_gap", "memorized", "correlated", "forgotten")
BINS = 20


def memorization_flags(records: dict[str, pl.DataFrame]) -> pl.DataFrame:
    """Wide table: `id` and one boolean column per test (memorized: target right, reference wrong), over the crops
    of A and B that every test scored."""
    flags = None
    for test, table in records.items():
        column = table.filter(pl.col("crop_set").is_in(["A", "B"])).select(
            "id", (pl.col("correct_top1_target") & ~pl.col("correct_top1_reference")).alias(test)
        )
        flags = column if flags is None else flags.join(column, on="id", how="inner")
    if flags is None or flags.is_empty():
        raise DataError(f"no crop of A or B is scored by all of the tests {list(records)}")
    return flags.sort("id")


def side_by_side(populations: dict[str, pl.DataFrame]) -> pl.DataFrame:
    """Each test's top-1 rows of STATISTICS, tests in the given order."""
    return pl.concat(
        [
            table.filter((pl.col("prediction") == "top1") & pl.col("statistic").is_in(STATISTICS)).select(
                pl.lit(test).alias("test"), "statistic", "top_p", "value", "mean", "std", "n_records"
            )
            for test, table in populations.items()
        ]
    )


def confidence_figure(sample_levels: dict[str, pl.DataFrame]) -> plt.Figure:
    """One histogram per test of its memorized crops' confidence H_reference − H_target, on shared bins."""
    gaps = {test: table["entropy_gap"].to_numpy() for test, table in sample_levels.items()}
    values = np.concatenate([*gaps.values(), np.zeros(1)])
    edges = np.linspace(min(values.min(), 0.0), max(values.max(), 1e-9), BINS + 1)
    figure, axes = plt.subplots(1, len(gaps), figsize=(4.2 * len(gaps), 3.6), sharex=True, squeeze=False)
    for axis, (test, gap) in zip(axes[0], gaps.items()):
        axis.hist(gap, bins=edges, color="tab:red", alpha=0.8)
        axis.axvline(0, color="black", linewidth=0.8)
        axis.set(title=f"{test} ({len(gap)} memorized crops)", xlabel="H_reference − H_target (nats)", ylabel="crops")
    figure.suptitle("Memorization confidence of the crops each test flags (target right, reference wrong)")
    figure.tight_layout()
    return figure


def compare(records: dict, populations: dict, sample_levels: dict, outputs: dict) -> None:
    """Read each test's tables (same keys everywhere), write the agreement and side-by-side tables and figures."""
    agreement = pairwise_agreement(
        memorization_flags({test: SSL_RECORDS.read(path, FLAG_COLUMNS) for test, path in records.items()})
    )
    population = side_by_side({test: SSL_POPULATION.read(path) for test, path in populations.items()})
    params = {"records": records, "populations": populations, "sample_levels": sample_levels}
    write_parquet(agreement, outputs["agreement"], stage="ssl_agreement", params=params, contract=AGREEMENT)
    write_parquet(
        population, outputs["population"], stage="ssl_agreement", params=params, contract=SSL_AGREEMENT_POPULATION
    )
    save_figure(heatmap(agreement), outputs["heatmap"])
    levels = {test: SSL_SAMPLE_LEVEL.read(path, ["entropy_gap"]) for test, path in sample_levels.items()}
    save_figure(confidence_figure(levels), outputs["confidence"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    helps = {
        "records": "a test's SSL records table (repeatable)",
        "population": "its population table",
        "sample-level": "its sample-level table",
    }
    add_keyed_file_arguments(parser, helps, metavar="TEST=FILE")
    parser.add_argument("--out-agreement", required=True, help="pairwise agreement Parquet")
    parser.add_argument("--out-population", required=True, help="side-by-side population Parquet")
    add_figure_outputs(parser, "out-heatmap", "out-confidence")
    args = parser.parse_args(argv)
    files = {flag: parsed_keyed_files(args, flag) for flag in helps}
    if len({tuple(by_test) for by_test in files.values()}) != 1:
        parser.error("give every test's --records, --population and --sample-level, in the same order")
    outputs = {name: getattr(args, f"out_{name}") for name in ("agreement", "population", "heatmap", "confidence")}
    compare(files["records"], files["population"], files["sample-level"], outputs)


if __name__ == "__main__":
    main()
