"""The metrics as plain definitions: polars and numpy on in-memory frames, written to be read, not to scale.

This is what the engine (the rest of the package) is tested against, table for table and float for float; the
engine never calls it. A record's k nearest public neighbours predict the labels they carry (a public record
listed twice counts once, at its nearest rank): mode `all` keeps every label, mode `top_n` the `top_n` labels
carried by most neighbours (ties: nearest carrier's rank, then name). See docs/DESIGN.md §5 for the formulas.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from workflow_scripts.metrics.params import sample_cutoffs

LABEL_MODES = ("all", "top_n")
WIN_GAPS = {"PPG": "precision", "PRG": "recall", "PFG": "f1"}  # win-gap metric: the score it compares
POPULATION_METRICS = (*WIN_GAPS, "AUCG")
ORDERS = {  # sample-level order: (key, sorted descending, ties by id; is an oracle view)
    "distance": (pl.col("nn_score_target"), False),
    "correct": (pl.col("n_correct_target"), False),
    "gap": (pl.col("n_correct_target") - pl.col("n_correct_reference"), True),
}


def predicted(neighbors: pl.LazyFrame, public_annotations: pl.LazyFrame, k: int, top_n: int) -> pl.LazyFrame:
    """(query_id, label, count, best_rank, top) for each label of a query's first k neighbours, in ranking order:
    count (neighbours carrying it) descending, best rank ascending, label."""
    carried = (
        neighbors.filter(pl.col("rank") < k)
        .group_by("query_id", "public_id")
        .agg(rank=pl.col("rank").min())
        .join(public_annotations.select("id", "labels"), left_on="public_id", right_on="id")
        .explode("labels")
        .drop_nulls("labels")
        .unique(["query_id", "public_id", "labels"])
    )
    return (
        carried.group_by("query_id", label="labels")
        .agg(count=pl.len(), best_rank=pl.col("rank").min())
        .sort("query_id", "count", "best_rank", "label", descending=[False, True, False, False])
        .with_columns(top=pl.int_range(pl.len()).over("query_id") < top_n)
    )


def predicted_labels(neighbors: pl.LazyFrame, public_annotations: pl.LazyFrame, k: int, top_n: int) -> pl.LazyFrame:
    """(query_id, label, label_mode) rows: the objects each query's k neighbours predict, in both modes."""
    labels = predicted(neighbors, public_annotations, k, top_n)
    return pl.concat(
        [
            labels.select("query_id", "label", label_mode=pl.lit("all")),
            labels.filter("top").select("query_id", "label", label_mode=pl.lit("top_n")),
        ]
    )


def record_scores(
    neighbors: pl.LazyFrame, public_annotations: pl.LazyFrame, truth: pl.LazyFrame, k: int, top_n: int
) -> pl.LazyFrame:
    """One row per (query id, label mode): n_objects, n_predicted, n_correct, precision, recall, f1, nn_score.
    `truth` holds (id, labels) for exactly the query records."""
    objects = truth.select("id", "labels").explode("labels").drop_nulls("labels").unique().with_columns(hit=True)
    labels = predicted(neighbors, public_annotations, k, top_n).join(
        objects, left_on=["query_id", "label"], right_on=["id", "labels"], how="left"
    )
    nearest = (
        neighbors.filter(pl.col("rank") == 0)
        .group_by("query_id", maintain_order=True)
        .agg(nn_score=pl.col("score").last())
    )
    records = truth.select("id", n_objects=pl.col("labels").list.n_unique().cast(pl.Int32)).join(
        nearest, left_on="id", right_on="query_id", how="left"
    )
    frames = []
    for label_mode in LABEL_MODES:
        mode_labels = labels if label_mode == "all" else labels.filter("top")
        counts = mode_labels.group_by("query_id").agg(n_predicted=pl.len(), n_correct=pl.col("hit").sum())
        frames.append(
            records.join(counts, left_on="id", right_on="query_id", how="left", maintain_order="left").select(
                "id",
                label_mode=pl.lit(label_mode),
                n_objects="n_objects",
                **{name: pl.col(name).fill_null(0).cast(pl.Int32) for name in ("n_predicted", "n_correct")},
                nn_score=pl.col("nn_score").cast(pl.Float32),
            )
        )
    return with_scores(pl.concat(frames))


def with_scores(counts: pl.LazyFrame) -> pl.LazyFrame:
    """precision, recall and F1 from the counts; 0/0 is 0, and a record without objects has no recall or F1."""
    precision = pl.when(pl.col("n_predicted") > 0).then(pl.col("n_correct") / pl.col("n_predicted")).otherwise(0.0)
    recall = pl.when(pl.col("n_objects") > 0).then(pl.col("n_correct") / pl.col("n_objects"))
    f1 = (
        pl.when(pl.col("precision") + pl.col("recall") > 0)
        .then(2 * pl.col("precision") * pl.col("recall") / (pl.col("precision") + pl.col("recall")))
        .otherwise(0.0)
    )
    return (
        counts.with_columns(precision=precision, recall=recall)
        .with_columns(f1=pl.when(pl.col("recall").is_not_null()).then(f1))
        .select("id", "label_mode", "n_objects", "n_predicted", "n_correct", "precision", "recall", "f1", "nn_score")
    )


# --- population gaps: arrays with records on the last axis, any leading batch axes (bootstrap) ---


def win_gap(target: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """(#{target > reference} − #{target < reference}) / n: PPG for precisions, PRG for recalls, PFG for F1."""
    return np.sign(target - reference).mean(axis=-1)


def aucg(recall_target: np.ndarray, recall_reference: np.ndarray) -> np.ndarray:
    """Exact signed area ∫₀¹ (F_reference − F_target) between the empirical recall CDFs."""
    target, reference = np.asarray(recall_target, float), np.asarray(recall_reference, float)
    values = np.concatenate([target, reference], axis=-1)
    # Walking the pooled values upwards, F_target jumps by 1/n_t, F_reference by 1/n_r.
    jumps = np.concatenate(
        [np.full(target.shape, -1.0 / target.shape[-1]), np.full(reference.shape, 1.0 / reference.shape[-1])], axis=-1
    )
    order = np.argsort(values, axis=-1, kind="stable")
    values = np.take_along_axis(values, order, axis=-1)
    cdf_gap = np.cumsum(np.take_along_axis(jumps, order, axis=-1), axis=-1)
    widths = np.diff(values, axis=-1, append=np.ones((*values.shape[:-1], 1)))
    return (cdf_gap * widths).sum(axis=-1)


def gaps(columns: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every population metric of score columns (`SCORE_SIDE` names), records on the last axis."""
    return {
        **{
            metric: win_gap(columns[f"{score}_target"], columns[f"{score}_reference"])
            for metric, score in WIN_GAPS.items()
        },
        "AUCG": aucg(columns["recall_target"], columns["recall_reference"]),
    }


def population_metrics(records: pl.DataFrame, n_boot: int, frac: float, seed: int) -> pl.DataFrame:
    """Rows (label_mode, metric, value, mean, std, n_boot, frac, n_records, n_excluded) of a records table: each
    metric on the records with objects (in id order) and over `n_boot` resamples of round(frac · n) of them drawn
    with replacement; one random stream, seeded, serves both label modes in turn."""
    rng = np.random.default_rng(seed)
    rows = []
    for label_mode in LABEL_MODES:
        mode_records = records.filter(pl.col("label_mode") == label_mode).sort("id")
        scored = mode_records.filter(pl.col("n_objects") > 0)
        n, size = len(scored), max(1, round(frac * len(scored)))
        columns = {name: scored[name].to_numpy() for name in scored.columns if name.endswith(("_target", "_reference"))}
        values = gaps(columns) if n else {}
        resample = rng.integers(0, n, size=(n_boot, size)) if n and n_boot else None
        boot = gaps({name: column[resample] for name, column in columns.items()}) if resample is not None else {}
        rows += [
            {
                "label_mode": label_mode,
                "metric": metric,
                "value": float(values[metric]) if n else float("nan"),
                "mean": float(boot[metric].mean()) if boot else float("nan"),
                "std": float(boot[metric].std(ddof=1)) if boot and n_boot > 1 else float("nan"),
                "n_boot": n_boot,
                "frac": frac,
                "n_records": n,
                "n_excluded": int((mode_records["n_objects"] == 0).sum()),
            }
            for metric in POPULATION_METRICS
        ]
    return pl.DataFrame(rows)


def sample_level(records: pl.DataFrame | pl.LazyFrame, top_l: list[int], label_mode: str = "top_n") -> pl.DataFrame:
    """Mean precision/recall/F1 gaps (target − reference) over the top-L records of each order, for each L of
    `top_l` below the number of records and for all of them. An order sorts by its key descending (a missing
    key first), ties by id."""
    scored = records.lazy().filter((pl.col("label_mode") == label_mode) & (pl.col("n_objects") > 0)).collect()
    cutoffs = sample_cutoffs(top_l, len(scored))
    rank = pl.int_range(1, pl.len() + 1, dtype=pl.Int64)  # L of the top-L records that end at a row
    frames = []
    for order, (key, oracle) in ORDERS.items():
        ranked = scored.with_columns(_key=key).sort("_key", "id", descending=[True, False], nulls_last=False)
        means = ranked.select(
            order=pl.lit(order),
            oracle=pl.lit(oracle),
            top_l=rank,
            **{
                f"{score}_gap": (pl.col(f"{score}_target") - pl.col(f"{score}_reference")).cum_sum() / rank
                for score in WIN_GAPS.values()
            },
        )
        frames.append(means.filter(pl.col("top_l").is_in(cutoffs)))
    return pl.concat(frames)
