"""Déjà vu metrics (paper section 3.2): per-record scores, population gaps, sample-level gaps.

For a query record z with ground-truth objects O(z) and a model f, the k public
neighbours of f's embedding of z's caption predict objects:

- label mode ``all``: every label of the k neighbours (the population view);
- label mode ``top_n``: the ``top_n`` labels carried by the most neighbours
  (the sample-level view; the paper uses 10). Ties are broken by the rank of
  the nearest neighbour carrying the label, then by label name.

precision = |pred ∩ O| / |pred|, recall = |pred ∩ O| / |O|, F1 their harmonic
mean. 0/0 is defined as 0: an empty prediction has precision 0, and F1 is 0
when precision and recall are both 0. Records with no ground-truth objects have
no recall; they are excluded from every metric and counted (``n_excluded``).

Population gaps, f_A ("target") against f_B ("reference"):

- PPG = (#{prec_A > prec_B} − #{prec_A < prec_B}) / n; PRG the same with recall;
- AUCG = ∫₀¹ (F_B(x) − F_A(x)) dx, the signed area between the empirical recall
  CDFs, computed exactly from the step functions (it equals the mean recall
  difference, which the tests check). Positive when f_A recovers more.

Each is reported on all records and as mean ± std over bootstrap resamples.
Everything is vectorised: polars for the label joins, numpy for the gaps.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import polars as pl

from workflow_scripts.io import DataError, read_parquet, write_parquet

LABEL_MODES = ("all", "top_n")
SIDES = ("target", "reference")
ORDERS = {
    # order name: (sort key expression on the records table, is an oracle view)
    "distance": (pl.col("nn_score_target"), False),
    "correct": (pl.col("n_correct_target"), False),
    "gap": (pl.col("n_correct_target") - pl.col("n_correct_reference"), True),
}


def predicted_labels(neighbors: pl.LazyFrame, public_annotations: pl.LazyFrame, k: int, top_n: int) -> pl.LazyFrame:
    """(query_id, label, label_mode) rows: the objects each query's k neighbours predict, in both modes."""
    labelled = (
        neighbors.filter(pl.col("rank") < k)
        .join(public_annotations.select(pl.col("id").alias("public_id"), pl.col("labels").alias("label")),
              on="public_id", how="inner")
        .explode("label")
        .drop_nulls("label")
        .unique(["query_id", "public_id", "label"])
    )
    counted = labelled.group_by("query_id", "label").agg(count=pl.len(), best_rank=pl.col("rank").min())
    ranked = counted.sort(["query_id", "count", "best_rank", "label"], descending=[False, True, False, False]) \
        .with_columns(position=pl.int_range(pl.len()).over("query_id"))
    return pl.concat([
        ranked.select("query_id", "label", label_mode=pl.lit("all")),
        ranked.filter(pl.col("position") < top_n).select("query_id", "label", label_mode=pl.lit("top_n")),
    ])


def record_scores(neighbors: pl.LazyFrame, public_annotations: pl.LazyFrame, truth: pl.LazyFrame,
                  k: int, top_n: int) -> pl.LazyFrame:
    """One row per (query id, label mode): n_objects, n_predicted, n_correct, precision, recall, f1, nn_score.

    `truth` holds (id, labels) for exactly the query records.
    """
    truth_labels = truth.select(pl.col("id").alias("query_id"), pl.col("labels").alias("label")) \
        .explode("label").drop_nulls("label").unique()
    predicted = predicted_labels(neighbors, public_annotations, k, top_n) \
        .join(truth_labels.with_columns(is_true=pl.lit(True)), on=["query_id", "label"], how="left")
    counts = predicted.group_by("query_id", "label_mode").agg(
        n_predicted=pl.len(), n_correct=pl.col("is_true").fill_null(False).sum())
    nearest = neighbors.filter(pl.col("rank") == 0).select(pl.col("query_id"), pl.col("score").alias("nn_score"))
    modes = pl.LazyFrame({"label_mode": list(LABEL_MODES)})
    base = truth.select(pl.col("id").alias("query_id"), n_objects=pl.col("labels").list.unique().list.len().cast(pl.Int32)) \
        .join(modes, how="cross")
    scored = base.join(counts, on=["query_id", "label_mode"], how="left") \
        .join(nearest, on="query_id", how="left") \
        .with_columns(pl.col("n_predicted", "n_correct").fill_null(0).cast(pl.Int32))
    precision = pl.when(pl.col("n_predicted") > 0).then(pl.col("n_correct") / pl.col("n_predicted")).otherwise(0.0)
    recall = pl.when(pl.col("n_objects") > 0).then(pl.col("n_correct") / pl.col("n_objects"))
    scored = scored.with_columns(precision=precision, recall=recall)
    f1 = pl.when(pl.col("precision") + pl.col("recall") > 0) \
        .then(2 * pl.col("precision") * pl.col("recall") / (pl.col("precision") + pl.col("recall"))).otherwise(0.0)
    return scored.with_columns(f1=pl.when(pl.col("recall").is_not_null()).then(f1)).rename({"query_id": "id"})


def paired_records(target: pl.LazyFrame, reference: pl.LazyFrame) -> pl.DataFrame:
    """Join the two models' record scores side by side, suffixed _target and _reference."""
    value_columns = ["n_predicted", "n_correct", "precision", "recall", "f1", "nn_score"]
    sides = [
        frame.select("id", "label_mode", "n_objects", *[pl.col(c).alias(f"{c}_{side}") for c in value_columns])
        for frame, side in ((target, "target"), (reference, "reference"))
    ]
    return sides[0].join(sides[1].drop("n_objects"), on=["id", "label_mode"], how="inner") \
        .collect(engine="streaming")


# --- population gaps: arrays with records on the last axis, any leading batch axes (bootstrap) ---

def win_gap(target: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """(#{target > reference} − #{target < reference}) / n: PPG for precisions, PRG for recalls."""
    return np.sign(target - reference).mean(axis=-1)


def aucg(recall_target: np.ndarray, recall_reference: np.ndarray) -> np.ndarray:
    """Exact signed area ∫₀¹ (F_reference − F_target) between the empirical recall CDFs."""
    target, reference = np.asarray(recall_target, float), np.asarray(recall_reference, float)
    values = np.concatenate([target, reference], axis=-1)
    # Walking the pooled values upwards, F_target jumps by 1/n_t, F_reference by 1/n_r.
    jumps = np.concatenate([np.full(target.shape, -1.0 / target.shape[-1]),
                            np.full(reference.shape, 1.0 / reference.shape[-1])], axis=-1)
    order = np.argsort(values, axis=-1, kind="stable")
    values = np.take_along_axis(values, order, axis=-1)
    cdf_gap = np.cumsum(np.take_along_axis(jumps, order, axis=-1), axis=-1)
    widths = np.diff(values, axis=-1, append=np.ones(values.shape[:-1] + (1,)))
    return (cdf_gap * widths).sum(axis=-1)


POPULATION_METRICS = {
    "PPG": lambda columns: win_gap(columns["precision_target"], columns["precision_reference"]),
    "PRG": lambda columns: win_gap(columns["recall_target"], columns["recall_reference"]),
    "PFG": lambda columns: win_gap(columns["f1_target"], columns["f1_reference"]),
    "AUCG": lambda columns: aucg(columns["recall_target"], columns["recall_reference"]),
}


def population_metrics(records: pl.DataFrame, n_boot: int, frac: float, seed: int) -> pl.DataFrame:
    """Rows (label_mode, metric, value, mean, std, n_boot, frac, n_records, n_excluded)."""
    rows = []
    rng = np.random.default_rng(seed)
    for label_mode in LABEL_MODES:
        mode_records = records.filter(pl.col("label_mode") == label_mode)
        scored = mode_records.filter(pl.col("n_objects") > 0)
        n = len(scored)
        columns = {name: scored[name].to_numpy().astype(float)
                   for name in ("precision_target", "precision_reference", "recall_target",
                                "recall_reference", "f1_target", "f1_reference")}
        resample = rng.integers(0, n, size=(n_boot, max(1, round(frac * n)))) if n else None
        for metric, compute in POPULATION_METRICS.items():
            value = float(compute(columns)) if n else float("nan")
            boot = compute({name: array[resample] for name, array in columns.items()}) if n and n_boot else None
            rows.append({
                "label_mode": label_mode, "metric": metric, "value": value,
                "mean": float(boot.mean()) if boot is not None else float("nan"),
                "std": float(boot.std(ddof=1)) if boot is not None and n_boot > 1 else float("nan"),
                "n_boot": n_boot, "frac": frac, "n_records": n, "n_excluded": len(mode_records) - n,
            })
    return pl.DataFrame(rows)


def sample_level(records: pl.DataFrame, top_l: list[int], label_mode: str = "top_n") -> pl.DataFrame:
    """Mean precision/recall/F1 gaps (target − reference) over the top-L records of each order.

    Orders put the most suspicious records first: ``distance`` by the target
    model's nearest-neighbour similarity, ``correct`` by the objects the target
    model got right, ``gap`` (an oracle view that peeks at the reference model)
    by correct-under-target minus correct-under-reference. Ties break by id.
    """
    scored = records.filter((pl.col("label_mode") == label_mode) & (pl.col("n_objects") > 0))
    n = len(scored)
    cutoffs = sorted({l for l in top_l if 0 < l < n} | ({n} if n else set()))
    frames = []
    for order, (key, oracle) in ORDERS.items():
        ranked = scored.with_columns(_key=key).sort(["_key", "id"], descending=[True, False])
        gaps = {metric: (ranked[f"{metric}_target"] - ranked[f"{metric}_reference"]).to_numpy()
                for metric in ("precision", "recall", "f1")}
        index = np.asarray(cutoffs, dtype=np.int64) - 1
        frames.append(pl.DataFrame({
            "order": [order] * len(cutoffs),
            "oracle": [oracle] * len(cutoffs),
            "top_l": cutoffs,
            **{f"{metric}_gap": (np.cumsum(gap)[index] / (index + 1)) if n else [] for metric, gap in gaps.items()},
        }, schema_overrides={"top_l": pl.Int64}))
    return pl.concat(frames)


def scan_annotations(path: str) -> pl.LazyFrame:
    """A lazy (id, labels) view of an annotations file, its columns checked up front."""
    if not Path(path).exists():
        raise DataError(f"{path}: file does not exist")
    names = pl.scan_parquet(path).collect_schema().names()
    missing = [name for name in ("id", "labels") if name not in names]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; found {names}")
    return pl.scan_parquet(path).select("id", "labels")


def load_truth(annotations_path: str, queries_path: str) -> pl.LazyFrame:
    """(id, labels) of the query records, read from the annotations by a streamed semi-join."""
    queries = read_parquet(queries_path, {"id": "str"}).select("id")
    annotated = scan_annotations(annotations_path).join(queries.lazy(), on="id", how="semi")
    truth = queries.join(annotated.collect(engine="streaming"), on="id", how="left")
    missing = truth.filter(pl.col("labels").is_null())["id"]
    if len(missing):
        raise DataError(f"{annotations_path}: no annotation row for {len(missing)} query record(s) of "
                        f"{queries_path}, e.g. {missing.head(5).to_list()}")
    return truth.lazy()


def check_neighbors(path: str, query_ids: pl.Series, public: pl.LazyFrame) -> None:
    """Every query has neighbours, and every neighbour has an annotation row (streamed over the file)."""
    neighbors = pl.scan_parquet(path)
    found = neighbors.select(pl.col("query_id").unique()).collect(engine="streaming")["query_id"]
    absent = query_ids.filter(~query_ids.is_in(found.implode()))
    if len(absent):
        raise DataError(f"{path}: no neighbours for {len(absent)} query record(s), e.g. {absent.head(5).to_list()}")
    unknown = neighbors.select(pl.col("public_id").unique()).join(public.select(public_id="id"), on="public_id",
                                                                   how="anti").head(5).collect(engine="streaming")
    if len(unknown):
        raise DataError(f"{path}: public id(s) without annotations, e.g. {unknown['public_id'].to_list()}")


def batched_records(neighbor_paths: dict[str, str], public: pl.LazyFrame, truth: pl.LazyFrame, k: int, top_n: int,
                    batch_rows: int) -> pl.DataFrame:
    """Paired record scores, computed over query batches so memory follows `batch_rows` neighbour rows, not |A|·k.

    A query belongs to batch hash(id) mod n_batches in every file alike; each batch streams through the
    neighbour files and joins only the public annotations its neighbours name. More batches trade a pass
    over the neighbour files each for less memory.
    """
    n_rows = max(pl.scan_parquet(path).select(pl.len()).collect().item() for path in neighbor_paths.values())
    n_batches = max(1, -(-n_rows // batch_rows))
    frames = []
    for batch in range(n_batches):
        def in_batch(column: str) -> pl.Expr:
            return pl.col(column).hash(seed=0) % n_batches == batch

        batch_truth = truth.filter(in_batch("id"))
        scores = {}
        for side, path in neighbor_paths.items():
            neighbors = pl.scan_parquet(path).filter(in_batch("query_id")) \
                .join(batch_truth.select(query_id="id"), on="query_id", how="semi")
            named = public.join(neighbors.select(id="public_id").unique(), on="id", how="semi")
            scores[side] = record_scores(neighbors, named, batch_truth, k, top_n)
        frames.append(paired_records(scores["target"], scores["reference"]))
    return pl.concat(frames).sort("label_mode", "id")


TABLES = ("records", "population", "sample_level")


def compute(target_neighbors: str, reference_neighbors: str, query_annotations: str, public_annotations: str,
            queries: str, out_dir: str | Path | None, k: int, top_n: int, top_l: list[int], n_boot: int, frac: float,
            seed: int, batch_rows: int = 5_000_000, outputs: dict[str, str] | None = None) -> None:
    """Write the three tables: to `outputs` (table name -> file), or as TABLE.parquet into `out_dir`."""
    outputs = outputs or {table: Path(out_dir) / f"{table}.parquet" for table in TABLES}
    truth = load_truth(query_annotations, queries)
    public = scan_annotations(public_annotations)
    query_ids = truth.select("id").collect()["id"]
    neighbor_paths = dict(zip(SIDES, (target_neighbors, reference_neighbors)))
    for path in neighbor_paths.values():
        check_neighbors(path, query_ids, public)
    records = batched_records(neighbor_paths, public, truth, k, top_n, batch_rows)
    params = {"target_neighbors": target_neighbors, "reference_neighbors": reference_neighbors, "queries": queries,
              "k": k, "top_n": top_n, "top_l": top_l, "n_boot": n_boot, "frac": frac, "seed": seed}
    population = population_metrics(records, n_boot, frac, seed).with_columns(
        k=pl.lit(k), top_n=pl.lit(top_n))
    write_parquet(records, outputs["records"], stage="metrics", params=params)
    write_parquet(population, outputs["population"], stage="metrics", params=params)
    write_parquet(sample_level(records, top_l), outputs["sample_level"], stage="metrics", params=params)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target-neighbors", required=True, help="neighbours Parquet of f_A (the target model)")
    parser.add_argument("--reference-neighbors", required=True, help="neighbours Parquet of f_B (the reference)")
    parser.add_argument("--query-annotations", required=True, help="annotations Parquet covering the query records")
    parser.add_argument("--public-annotations", required=True, help="annotations Parquet of the public set")
    parser.add_argument("--queries", required=True, help="split Parquet listing the query record ids")
    parser.add_argument("--out-dir", help="folder for records, population and sample_level Parquet (or the three below)")
    for table in TABLES:
        parser.add_argument(f"--{table.replace('_', '-')}", help=f"the {table} table's file (instead of --out-dir)")
    parser.add_argument("--k", type=int, default=100, help="neighbours used per query")
    parser.add_argument("--top-n", type=int, default=10, help="labels kept in the top_n label mode")
    parser.add_argument("--top-l", default="10,20,50,100,200,500,1000",
                        help="comma-separated L values for the sample-level table (all records are always added)")
    parser.add_argument("--n-boot", type=int, default=100)
    parser.add_argument("--frac", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-rows", type=int, default=5_000_000,
                        help="neighbour rows per query batch: bounds memory; each batch is one pass over the files")
    args = parser.parse_args(argv)
    outputs = {table: getattr(args, table) for table in TABLES}
    if not all(outputs.values()) if args.out_dir is None else any(outputs.values()):
        parser.error("give either --out-dir or all of --records, --population, --sample-level")
    compute(args.target_neighbors, args.reference_neighbors, args.query_annotations, args.public_annotations,
            args.queries, args.out_dir, args.k, args.top_n, [int(v) for v in args.top_l.split(",") if v],
            args.n_boot, args.frac, args.seed, args.batch_rows, outputs=outputs if args.out_dir is None else None)


if __name__ == "__main__":
    main()
