"""Figures from the cached tables (no model is touched).

Per parameter point (`point` command):
- recall CDFs of f_A and f_B over the target records and the holdout control
  (paper Fig. 7);
- sample-level precision and recall gaps against top-L for each record order
  (paper Fig. 3/4);
- the qualitative view (paper Fig. 1/11): target images with their captions and
  the top public neighbours under f_A and f_B, objects marked as true or false
  positives.
Per split (`sweep` command): memorization gaps and utility against each swept
parameter (paper Fig. 5; training-set size: Fig. 2), from the summary table.
"""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import polars as pl

from workflow_scripts.cli import add_figure_outputs, add_keyed_file_arguments, parsed_keyed_files
from workflow_scripts.contracts import (
    ANNOTATIONS,
    METRIC_RECORDS,
    NEIGHBORS,
    RECORDS,
    SAMPLE_LEVEL,
    SUMMARY,
)
from workflow_scripts.images import load_rgb, resolve_image_paths
from workflow_scripts.io import atomic_path
from workflow_scripts.seeds import aggregate_seeds

MODEL_STYLES = {
    "target": ("f_A (target, trained on A)", "tab:red"),
    "reference": ("f_B (reference, trained on B)", "tab:blue"),
}
QUERY_TITLES = {"target": "target records (in A)", "holdout": "holdout records (control)"}


def save_figure(figure: plt.Figure, paths: list[str | Path]) -> None:
    """Write the figure to each path, in the format its suffix names (.png, .svg)."""
    for path in map(Path, paths):
        with atomic_path(path) as tmp:
            figure.savefig(tmp, format=path.suffix[1:], dpi=150, bbox_inches="tight")
    plt.close(figure)


def recall_cdf_figure(records_by_queries: dict[str, pl.DataFrame], label_mode: str = "all") -> plt.Figure:
    figure, axes = plt.subplots(1, len(records_by_queries), figsize=(5 * len(records_by_queries), 4), sharey=True)
    for axis, (queries, records) in zip(np.atleast_1d(axes), records_by_queries.items()):
        scored = records.filter((pl.col("label_mode") == label_mode) & (pl.col("n_objects") > 0))
        for side, (label, colour) in MODEL_STYLES.items():
            recall = np.sort(scored[f"recall_{side}"].to_numpy())
            cdf = np.arange(1, len(recall) + 1) / max(len(recall), 1)
            axis.step(
                np.concatenate([[0], recall, [1]]),
                np.concatenate([[0], cdf, [1]]),
                where="post",
                label=f"{label}, mean {recall.mean():.3f}" if len(recall) else label,
                color=colour,
            )
        axis.set(
            title=f"{QUERY_TITLES.get(queries, queries)} (n={len(scored)})",
            xlabel="object recall",
            xlim=(0, 1),
            ylim=(0, 1.02),
        )
        axis.grid(alpha=0.3)
        axis.legend(loc="upper left", fontsize=8)
    np.atleast_1d(axes)[0].set_ylabel("fraction of records")
    figure.suptitle("Recall CDFs: a curve further right recovers more objects (the gap is AUCG)")
    return figure


def gap_vs_top_l_figure(sample_level_by_queries: dict[str, pl.DataFrame]) -> plt.Figure:
    metrics = ("precision_gap", "recall_gap")
    figure, axes = plt.subplots(1, len(metrics), figsize=(11, 4))
    order_styles = {"distance": "-", "correct": "--", "gap": ":"}
    colours = {"target": "tab:red", "holdout": "tab:gray"}
    for axis, metric in zip(axes, metrics):
        for queries, table in sample_level_by_queries.items():
            for order, style in order_styles.items():
                rows = table.filter(pl.col("order") == order).sort("top_l")
                if not len(rows):
                    continue
                suffix = " (oracle)" if rows["oracle"][0] else ""
                axis.plot(
                    rows["top_l"],
                    rows[metric],
                    style,
                    marker=".",
                    color=colours.get(queries, "k"),
                    label=f"{queries}, order: {order}{suffix}",
                )
        axis.axhline(0, color="k", linewidth=0.8)
        axis.set(xscale="log", xlabel="top-L records", ylabel=f"mean {metric.replace('_', ' ')} (f_A − f_B)")
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    figure.suptitle("Sample-level gaps over the most suspicious records")
    return figure


def make_point_figures(
    records: dict[str, str], sample_level: dict[str, str], recall_cdf_paths: list[str], gap_vs_top_l_paths: list[str]
) -> None:
    """`records`, `sample_level`: a metrics table per query set (target, holdout); the figures go to the paths."""
    save_figure(recall_cdf_figure({q: METRIC_RECORDS.read(path) for q, path in records.items()}), recall_cdf_paths)
    save_figure(
        gap_vs_top_l_figure({q: SAMPLE_LEVEL.read(path) for q, path in sample_level.items()}), gap_vs_top_l_paths
    )


SWEEP_GAPS = ("PPG", "PRG", "AUCG")
SWEEP_GAP_COLOURS = dict(zip(SWEEP_GAPS, ("tab:red", "tab:blue", "tab:green")))
SWEPT_PARAMETERS = ("n_train", "epochs", "temperature", "weight_decay", "mask_ratio", "seed")


def _plot_sweep_group(
    axes, rows: pl.DataFrame, parameter: str, group: str, line: dict, utility_columns: list[str]
) -> None:
    """One group's curves (the other swept parameters fixed) on the gaps, net gaps and utility axes: each
    statistic's value (rows over several seeds: its mean over them, and their min–max as a band)."""
    gaps_axis, net_axis, utility_axis = axes
    x = rows[parameter].fill_null(-1).to_numpy()  # a null temperature is learned: plotted at −1
    spread = "n_seeds" in rows.columns and rows["n_seeds"].max() > 1

    def band(axis, column: str, colour) -> None:
        if spread:  # the training seeds' min–max (aggregate_seeds)
            low, high = rows[f"{column}_seed_min"].to_numpy(), rows[f"{column}_seed_max"].to_numpy()
            axis.fill_between(x, low, high, color=colour, alpha=0.15, linewidth=0)

    for metric, colour in SWEEP_GAP_COLOURS.items():
        label = f"{metric} {group}".strip()
        gaps_axis.errorbar(
            x,
            rows[f"{metric}_value"],
            yerr=rows[f"{metric}_std"],
            capsize=3,
            elinewidth=0.8,
            color=colour,
            label=label,
            **line,
        )
        band(gaps_axis, f"{metric}_value", colour)
        net_axis.plot(x, rows[f"{metric}_net"], color=colour, label=label, **line)
        band(net_axis, f"{metric}_net", colour)
    for column, colour in zip(utility_columns, plt.get_cmap("tab10").colors):
        utility_axis.plot(x, rows[column], color=colour, label=f"{column.removeprefix('A_')} {group}".strip(), **line)
        band(utility_axis, column, colour)


def _label_sweep_axes(axes, parameter: str, n_seeds: tuple[int, int] = (1, 1)) -> None:
    """`n_seeds`: the fewest and most seeds a plotted row is the mean over (1: the rows are single seeds)."""
    gaps_axis, net_axis, utility_axis = axes
    label = "temperature (−1: learned)" if parameter == "temperature" else parameter
    fewest, most = n_seeds
    seeds = f"{fewest}" if fewest == most else f"{fewest}–{most}"
    band = "; band: seed min–max" if most > 1 else ""
    gaps_title = (
        f"target records: mean over {seeds} seeds;\nbars: bootstrap std, band: seed min–max"
        if most > 1
        else "target records: value ± bootstrap std"
    )
    net_title, utility_title = f"net of the holdout control{band}", f"utility of f_A{band}"
    gaps_axis.set(xlabel=label, ylabel="gap (f_A − f_B)", title=gaps_title)
    net_axis.set(xlabel=label, ylabel="target gap − holdout gap", title=net_title)
    utility_axis.set(xlabel=label, ylabel="accuracy", title=utility_title, ylim=(0, 1.02))
    for axis in axes:
        axis.grid(alpha=0.3)
        axis.legend(fontsize=6)
    for axis in (gaps_axis, net_axis):
        axis.axhline(0, color="k", linewidth=0.8)


def sweep_figure(summary: pl.DataFrame, parameter: str, utility_columns: list[str]) -> plt.Figure:
    """Target gaps (value ± bootstrap std), net gaps (target − holdout) and f_A's utility against one parameter.

    `summary`: the summary, or its rows over the seeds (`seeds.aggregate_seeds`: each row the mean over its
    seeds, their min–max a band). Colour says the metric; line style and marker say the values of the other
    swept parameters.
    """
    varying = [c for c in SWEPT_PARAMETERS if c != parameter and c in summary.columns and summary[c].n_unique() > 1]
    figure, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    groups = list(
        summary.sort(parameter).group_by(varying, maintain_order=True) if varying else [((), summary.sort(parameter))]
    )
    # Points of other one-parameter sweeps (a list of grids) hold this parameter at one value: no curve.
    groups = [(key, rows) for key, rows in groups if rows[parameter].n_unique() > 1] or groups
    for (key, rows), style, marker in zip(groups, ("-", "--", ":", "-."), "osD^v"):
        group = ", ".join(f"{name}={value}" for name, value in zip(varying, key))
        _plot_sweep_group(axes, rows, parameter, group, {"linestyle": style, "marker": marker}, utility_columns)
    n_seeds = (summary["n_seeds"].min(), summary["n_seeds"].max()) if "n_seeds" in summary.columns else (1, 1)
    _label_sweep_axes(axes, parameter, n_seeds)
    figure.tight_layout()
    return figure


def make_sweep_figures(summary_path: str | Path, figures: dict[str, list[str]]) -> None:
    """`figures`: per swept parameter, the paths of its figure. A parameter's figure plots each point's mean over
    its training seeds; the seed's own figure (its x axis the seed) plots the summary's rows themselves."""
    summary = SUMMARY.read(summary_path, extra=True)
    utility_columns = [c for c in summary.columns if c.startswith("A_")]  # before the spread columns join them
    over_seeds = aggregate_seeds(summary, SWEPT_PARAMETERS)
    for parameter, paths in figures.items():
        table = summary if parameter == "seed" else over_seeds
        save_figure(sweep_figure(table, parameter, utility_columns), paths)


def labelled_image(axis, image, title: str, labels: list[str], truth: set[str]) -> None:
    axis.imshow(image)
    axis.set_xticks([])
    axis.set_yticks([])
    axis.set_title(title, fontsize=7)
    for line, label in enumerate(sorted(labels)):
        colour = "green" if label in truth else "red"
        axis.text(
            0.02,
            -0.08 - 0.09 * line,
            ("✓ " if label in truth else "✗ ") + label,
            color=colour,
            fontsize=6,
            transform=axis.transAxes,
            va="top",
        )


def records_target_wins_most(records: pl.DataFrame, n_examples: int) -> list[str]:
    """Ids of the records (top_n mode) where f_A recovers the most objects more than f_B; ties by id."""
    return (
        records.filter(pl.col("label_mode") == "top_n")
        .with_columns(gap=pl.col("n_correct_target") - pl.col("n_correct_reference"))
        .sort(["gap", "id"], descending=[True, False])
        .head(n_examples)["id"]
        .to_list()
    )


def _plot_neighbour_row(row_axes, query: dict, model_name: str, nearest: pl.DataFrame) -> None:
    """The query image with its caption, then its nearest public images under one model."""
    truth = set(query["labels"])
    caption = "\n".join(textwrap.wrap(query["captions"][0] if query["captions"] else "", 28))
    image = load_rgb(query["image_path"], query["id"])
    labelled_image(row_axes[0], image, f"{query['id']}\n{caption}", query["labels"], truth)
    for column, neighbour in enumerate(nearest.iter_rows(named=True), start=1):
        labelled_image(
            row_axes[column],
            load_rgb(neighbour["image_path"], neighbour["public_id"]),
            f"{model_name} #{neighbour['rank'] + 1} ({neighbour['score']:.2f})",
            neighbour["labels"],
            truth,
        )


def qualitative_figure(
    records: pl.DataFrame,
    query_records: pl.DataFrame,
    query_annotations: pl.DataFrame,
    public_records: pl.DataFrame,
    public_annotations: pl.DataFrame,
    neighbors: dict[str, pl.DataFrame],
    n_examples: int = 3,
    n_neighbors: int = 5,
) -> plt.Figure:
    """Records where f_A beats f_B most (top_n mode), their top public neighbours under both models."""
    chosen = records_target_wins_most(records, n_examples)
    public = public_records.join(public_annotations.select("id", "labels"), on="id")
    queries = query_records.join(query_annotations.select("id", "labels"), on="id")
    figure, axes = plt.subplots(
        2 * len(chosen), n_neighbors + 1, figsize=(1.7 * (n_neighbors + 1), 4.8 * len(chosen)), squeeze=False
    )
    for example, record_id in enumerate(chosen):
        query = queries.filter(pl.col("id") == record_id).row(0, named=True)
        for row_offset, (side, model_name) in enumerate((("A", "f_A"), ("B", "f_B"))):
            nearest = (
                neighbors[side]
                .filter(pl.col("query_id") == record_id)
                .sort("rank")
                .head(n_neighbors)
                .join(public, left_on="public_id", right_on="id", how="left", maintain_order="left")
            )
            _plot_neighbour_row(axes[2 * example + row_offset], query, model_name, nearest)
    figure.suptitle(
        "Target images (left) and their nearest public images under f_A (upper) and f_B (lower) rows;\n"
        "green: object really in the target image, red: not",
        fontsize=9,
    )
    figure.subplots_adjust(hspace=1.5)
    return figure


QUALITATIVE_INPUTS = (  # each a required --flag (dashes for underscores)
    "metrics_records",
    "query_records",
    "query_annotations",
    "public_records",
    "public_annotations",
    "target_neighbors",
    "reference_neighbors",
)


def records_with_image_paths(path: str) -> pl.DataFrame:
    frame = RECORDS.read(path, extra=True)
    return frame.with_columns(image_path=resolve_image_paths(frame, path))


def make_qualitative_figure(files: dict[str, str], paths: list[str]) -> None:
    """`files`: the file of each of QUALITATIVE_INPUTS, by name; the figure goes to the paths."""
    figure = qualitative_figure(
        METRIC_RECORDS.read(files["metrics_records"]),
        records_with_image_paths(files["query_records"]),
        ANNOTATIONS.read(files["query_annotations"]),
        records_with_image_paths(files["public_records"]),
        ANNOTATIONS.read(files["public_annotations"]),
        {"A": NEIGHBORS.read(files["target_neighbors"]), "B": NEIGHBORS.read(files["reference_neighbors"])},
    )
    save_figure(figure, paths)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    point = commands.add_parser("point", help="recall CDFs and sample-level gaps of one parameter point")
    table_helps = {
        table: f"{table} metrics table per query set, e.g. target=FILE (repeatable)"
        for table in ("records", "sample-level")
    }
    add_keyed_file_arguments(point, table_helps, metavar="QUERIES=FILE")
    add_figure_outputs(point, "recall-cdf", "gap-vs-top-l")
    sweep = commands.add_parser("sweep", help="gaps and utility against swept parameters")
    sweep.add_argument("--summary", required=True, help="summary Parquet of a split")
    figure_help = "a file of a swept parameter's figure, in the format its suffix names (repeatable)"
    add_keyed_file_arguments(sweep, {"figure": figure_help}, metavar="PARAMETER=FILE")
    qualitative = commands.add_parser("qualitative", help="target images and their neighbours (paper Fig. 1)")
    for name in QUALITATIVE_INPUTS:
        qualitative.add_argument(f"--{name.replace('_', '-')}", required=True)
    add_figure_outputs(qualitative, "out")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.command == "point":
        make_point_figures(
            parsed_keyed_files(args, "records"),
            parsed_keyed_files(args, "sample-level"),
            args.recall_cdf,
            args.gap_vs_top_l,
        )
    elif args.command == "sweep":
        make_sweep_figures(args.summary, parsed_keyed_files(args, "figure", repeatable=True))
    else:
        make_qualitative_figure({name: getattr(args, name) for name in QUALITATIVE_INPUTS}, args.out)


if __name__ == "__main__":
    main()
