"""SSL déjà vu figures, from the SSL metric tables and the inputs they name (no model is touched).

- `accuracy`: label-inference accuracy of the target and the reference (of any test) against the most confident
  top p % of the crops (paper Fig. 3), bootstrap std as error bars, the holdout control beside them, and the
  quadrants.
- `qualitative`: memorized crops (target right, reference wrong; largest H_reference − H_target first): the image
  with its periphery crop's box, and its nearest public images under the target and the reference (paper Fig. 1).
"""

from __future__ import annotations

import argparse

import matplotlib.pyplot as plt
import numpy as np
import polars as pl
from matplotlib.patches import Rectangle

from workflow_scripts.cli import add_figure_outputs
from workflow_scripts.contracts import CROPS, NEIGHBORS, SSL_POPULATION, SSL_RECORDS
from workflow_scripts.figures import labelled_image, records_with_image_paths, save_figure
from workflow_scripts.images import load_rgb
from workflow_scripts.metrics.ssl import MODELS, PREDICTIONS, QUADRANTS, sample_level

COLOURS = {"target": "tab:red", "reference": "tab:blue"}
TESTS = ("two_model", "crop_classifier", "naive_bayes")


def side_labels(test: str) -> tuple[dict[str, str], dict[str, str]]:
    """Legend labels of the target and the reference on A and B, and on the holdout halves, for `test`."""
    reference = "f_{}" if test == "two_model" else f"{test}" + "_{}"
    on_sets = {"target": "target (f_A on A, f_B on B)", "reference": f"reference ({reference.format('B')} on A, "}
    on_sets["reference"] += f"{reference.format('A')} on B)"
    holdout = {"target": "'target' (f_A on H1, f_B on H2)"}
    holdout["reference"] = f"'reference' ({reference.format('B')} on H1, {reference.format('A')} on H2)"
    return on_sets, holdout


QUADRANT_COLOURS = dict(zip(QUADRANTS, ("tab:red", "tab:purple", "tab:orange", "tab:gray")))


def _plot_accuracies(axis, population: pl.DataFrame, prediction: str, test: str) -> None:
    """One prediction's target and reference accuracies against top p %, the holdout control dotted."""
    on_sets, holdout = side_labels(test)
    for prefix, style in (("", "-"), ("holdout_", ":")):
        for side, colour in COLOURS.items():
            rows = population.filter(
                (pl.col("prediction") == prediction) & (pl.col("statistic") == prefix + side)
            ).sort("top_p")
            axis.errorbar(
                rows["top_p"],
                rows["value"],
                yerr=rows["std"].fill_nan(0.0),
                capsize=3,
                marker="o",
                linestyle=style,
                color=colour if not prefix else "gray" if side == "target" else "black",
                label=f"holdout control, {holdout[side]}" if prefix else on_sets[side],
            )
    axis.set(xlabel="most confident p % of the crops", ylabel=f"{prediction} accuracy", ylim=(0, 1.02))
    axis.set_title(f"{prediction} label inference (error bars: bootstrap std)", fontsize=9)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)


def _plot_quadrants(axis, population: pl.DataFrame) -> None:
    """The quadrants' shares of the crops of A and B (averaged), a stacked bar per prediction."""
    bottom = np.zeros(len(PREDICTIONS))
    for quadrant, colour in QUADRANT_COLOURS.items():
        rows = population.filter(pl.col("statistic") == quadrant)
        shares = np.array([rows.filter(pl.col("prediction") == p)["value"].item() for p in PREDICTIONS])
        axis.bar(PREDICTIONS, shares, bottom=bottom, color=colour, label=quadrant)
        bottom += np.nan_to_num(shares)
    axis.set(ylabel="share of the crops", ylim=(0, 1.02), title="quadrants (target, reference right)")
    axis.legend(fontsize=7)


def accuracy_figure(population: pl.DataFrame, test: str = "two_model") -> plt.Figure:
    figure, axes = plt.subplots(1, len(PREDICTIONS) + 1, figsize=(15, 4.5))
    for axis, prediction in zip(axes, PREDICTIONS):
        _plot_accuracies(axis, population, prediction, test)
    _plot_quadrants(axes[-1], population)
    k = population["k"][0] if len(population) else "?"
    figure.suptitle(
        f"SSL déjà vu, {test} test (k={k}): a target above its reference infers labels the crop's context does not give"
    )
    figure.tight_layout()
    return figure


def _plot_crop(axis, image, crop: dict, title: str, label: str) -> None:
    """The full image, its label, and the box of the periphery crop the models saw."""
    labelled_image(axis, image, title, [label], {label})
    width, height = crop["x_max"] - crop["x_min"], crop["y_max"] - crop["y_min"]
    axis.add_patch(Rectangle((crop["x_min"] - 0.5, crop["y_min"] - 0.5), width, height, fill=False, color="yellow"))


def _plot_example_row(row_axes, record: dict, side: str, image, crop: dict, nearest: pl.DataFrame) -> None:
    """A memorized crop's image, then its nearest public images under one model (`side`), labels ✓ or ✗."""
    model = record["crop_set"] if side == "target" else MODELS[1 - MODELS.index(record["crop_set"])]
    title = f"{record['id']} ({record['label']})\nf_{model} ({side}): {record[f'predicted_{side}']}"
    _plot_crop(row_axes[0], image, crop, title, record["label"])
    for axis, neighbour in zip(row_axes[1:], nearest.iter_rows(named=True)):
        labels = [neighbour["label"]] if neighbour["label"] is not None else []
        title = f"f_{model} #{neighbour['rank'] + 1} ({neighbour['score']:.2f})"
        labelled_image(
            axis, load_rgb(neighbour["image_path"], neighbour["public_id"]), title, labels, {record["label"]}
        )
    for axis in row_axes[1 + len(nearest) :]:
        axis.axis("off")


def qualitative_figure(
    records: pl.DataFrame,
    crops: pl.DataFrame,
    images: pl.DataFrame,
    public: pl.DataFrame,
    neighbors: dict[str, pl.DataFrame],
    n_examples: int = 3,
    n_neighbors: int = 5,
) -> plt.Figure:
    """The most confident memorized crops among the queries of `neighbors` (side -> NEIGHBORS frame of one crop
    set: target, reference); `images`, `public`: id, image_path (resolved) and, for `public`, label."""
    queries = neighbors["target"]["query_id"].unique()
    chosen = sample_level(records).filter(pl.col("id").is_in(queries.implode())).head(n_examples)
    figure, axes = plt.subplots(
        2 * max(len(chosen), 1), n_neighbors + 1, figsize=(1.8 * (n_neighbors + 1), 4.4 * max(len(chosen), 1))
    )
    axes = np.atleast_2d(axes)
    for axis in axes.reshape(-1)[: (n_neighbors + 1) * 2 * (not len(chosen))]:
        axis.axis("off")  # no memorized crop: an empty figure, said in its title
    for example, record in enumerate(chosen.iter_rows(named=True)):
        image = load_rgb(images.filter(pl.col("id") == record["id"])["image_path"].item(), record["id"])
        crop = crops.filter(pl.col("id") == record["id"]).row(0, named=True)
        for offset, side in enumerate(("target", "reference")):
            nearest = (
                neighbors[side]
                .filter(pl.col("query_id") == record["id"])
                .sort("rank")
                .head(n_neighbors)
                .join(public, left_on="public_id", right_on="id", how="left", maintain_order="left")
            )
            _plot_example_row(axes[2 * example + offset], record, side, image, crop, nearest)
    figure.suptitle(
        f"Memorized crops ({len(chosen)} shown; yellow: the periphery crop the models saw) and their nearest\n"
        "public images under the target (upper) and the reference (lower) rows; ✓: the crop's label",
        fontsize=9,
    )
    figure.subplots_adjust(hspace=0.7)
    return figure


def make_qualitative_figure(args: argparse.Namespace) -> None:
    public = records_with_image_paths(args.public_records).select("id", "image_path", label=args.label_column)
    figure = qualitative_figure(
        SSL_RECORDS.read(args.records),
        CROPS.read(args.crops),
        records_with_image_paths(args.images_records).select("id", "image_path"),
        public,
        {"target": NEIGHBORS.read(args.neighbors_target), "reference": NEIGHBORS.read(args.neighbors_reference)},
        n_examples=args.n_examples,
        n_neighbors=args.n_neighbors,
    )
    save_figure(figure, args.out)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    accuracy = commands.add_parser("accuracy", help="target and reference accuracy against top p %")
    accuracy.add_argument("--population", required=True, help="the SSL population table")
    accuracy.add_argument("--test", choices=TESTS, default="two_model", help="the test the table is of (its legend)")
    add_figure_outputs(accuracy, "out")
    qualitative = commands.add_parser("qualitative", help="memorized crops and their neighbours (paper Fig. 1)")
    inputs = {
        "records": "the SSL records table",
        "crops": "the crops table (the boxes drawn)",
        "images-records": "records table of the measured images (their image paths)",
        "neighbors-target": "neighbours of one crop set's crops under its target (A:A or B:B)",
        "neighbors-reference": "neighbours of the same crops under the reference (B:A or A:B)",
        "public-records": "records table of the public images (image paths and labels)",
    }
    for flag, help_text in inputs.items():
        qualitative.add_argument(f"--{flag}", required=True, help=help_text)
    qualitative.add_argument("--label-column", default="label", help="the public records' label column")
    qualitative.add_argument("--n-examples", type=int, default=3, help="memorized crops shown (default: 3)")
    qualitative.add_argument("--n-neighbors", type=int, default=5, help="neighbours shown per model (default: 5)")
    add_figure_outputs(qualitative, "out")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.command == "accuracy":
        save_figure(accuracy_figure(SSL_POPULATION.read(args.population), args.test), args.out)
    else:
        make_qualitative_figure(args)


if __name__ == "__main__":
    main()
