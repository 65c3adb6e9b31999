"""Figures from the cached metric tables (no model is touched).

- recall CDFs of f_A and f_B over the target records and the holdout control
  (paper Fig. 7);
- sample-level precision and recall gaps against top-L for each record order
  (paper Fig. 3/4).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import polars as pl  # noqa: E402

from workflow_scripts.io import atomic_path, read_parquet  # noqa: E402

MODEL_STYLES = {"target": ("f_A (target, trained on A)", "tab:red"),
                "reference": ("f_B (reference, trained on B)", "tab:blue")}
QUERY_TITLES = {"target": "target records (in A)", "holdout": "holdout records (control)"}


def save_figure(figure: plt.Figure, stem: str | Path) -> None:
    for suffix in (".png", ".svg"):
        with atomic_path(Path(f"{stem}{suffix}")) as tmp:
            figure.savefig(tmp, format=suffix[1:], dpi=150, bbox_inches="tight")
    plt.close(figure)


def recall_cdf_figure(records_by_queries: dict[str, pl.DataFrame], label_mode: str = "all") -> plt.Figure:
    figure, axes = plt.subplots(1, len(records_by_queries), figsize=(5 * len(records_by_queries), 4), sharey=True)
    for axis, (queries, records) in zip(np.atleast_1d(axes), records_by_queries.items()):
        scored = records.filter((pl.col("label_mode") == label_mode) & (pl.col("n_objects") > 0))
        for side, (label, colour) in MODEL_STYLES.items():
            recall = np.sort(scored[f"recall_{side}"].to_numpy())
            cdf = np.arange(1, len(recall) + 1) / max(len(recall), 1)
            axis.step(np.concatenate([[0], recall, [1]]), np.concatenate([[0], cdf, [1]]), where="post",
                      label=f"{label}, mean {recall.mean():.3f}" if len(recall) else label, color=colour)
        axis.set(title=f"{QUERY_TITLES.get(queries, queries)} (n={len(scored)})", xlabel="object recall",
                 xlim=(0, 1), ylim=(0, 1.02))
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
                axis.plot(rows["top_l"], rows[metric], style, marker=".", color=colours.get(queries, "k"),
                          label=f"{queries}, order: {order}{suffix}")
        axis.axhline(0, color="k", linewidth=0.8)
        axis.set(xscale="log", xlabel="top-L records", ylabel=f"mean {metric.replace('_', ' ')} (f_A − f_B)")
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    figure.suptitle("Sample-level gaps over the most suspicious records")
    return figure


def make_figures(metrics_dirs: dict[str, str], out_dir: str | Path) -> None:
    out_dir = Path(out_dir)
    records = {q: read_parquet(Path(d) / "records.parquet") for q, d in metrics_dirs.items()}
    sample_level = {q: read_parquet(Path(d) / "sample_level.parquet") for q, d in metrics_dirs.items()}
    save_figure(recall_cdf_figure(records), out_dir / "recall_cdf")
    save_figure(gap_vs_top_l_figure(sample_level), out_dir / "gap_vs_top_l")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--metrics", action="append", required=True, metavar="QUERIES=DIR",
                        help="metrics folder per query set, e.g. target=results/metrics/s/p/target (repeatable)")
    parser.add_argument("--out-dir", required=True)
    args = parser.parse_args(argv)
    make_figures(dict(item.split("=", 1) for item in args.metrics), args.out_dir)


if __name__ == "__main__":
    main()
