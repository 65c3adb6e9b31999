"""Over the training seeds: each point's statistics across its seeds, and paired comparisons of adjacent points.

Why: a point's bootstrap std measures the sampling of the records for one pair of models f_A, f_B; a second
training seed gives another pair, and the gap moves by more than that std. This module shows that spread and
says with an interval whether two points differ ("mask 0.3 memorizes less than mask 0.5").

- `aggregate_seeds`: one row per point less its seed (a null key, e.g. a learned temperature, is a value). Of
  every numeric column that is not a key, by its name: `..._std` (a bootstrap std): its mean over the seeds, same
  name; `..._mean` (a bootstrap mean): dropped, the all-record `..._value` is the estimate the seed spread and the
  comparisons are about; any other (`_value`, `_net`, `_symmetric`, utility accuracies, counts): the mean over
  the seeds, with `{col}_seed_std` (ddof 1; null with one seed), `{col}_seed_min`, `{col}_seed_max`. A text column
  that is not a key is kept where it is one value per row (`split`), else dropped; `point` (it names the
  seed) always is. Then `n_seeds` and `seeds` (sorted). Generic: the SSL summary aggregates with its own keys.
- `paired_difference`: of two points X and Y on the records all their tables hold, per seed s and record r, the win
  signs w = sign(score_target − score_reference) of the metric's score and d[s, r] = w_X[s, r] − w_Y[s, r]; the
  difference is the mean of d (gap_X − gap_Y, averaged over the seeds) and its interval the percentiles of a
  two-level bootstrap: the seeds resampled with replacement, and the records, one draw shared by every seed and
  both points (the pairing: a record hard for X is hard for Y too, and that cancels).
- `comparisons`: those differences for each pair of adjacent values of each swept parameter, the others fixed.

Run as `python -m workflow_scripts.seeds`.
"""

from __future__ import annotations

import argparse
import itertools
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import polars as pl

from workflow_scripts.cli import keyed_files, run_stage
from workflow_scripts.contracts import COMPARISONS, METRIC_RECORDS, SEED_SUMMARY, SUMMARY
from workflow_scripts.io import atomic_path, write_parquet
from workflow_scripts.metrics.definitions import WIN_GAPS
from workflow_scripts.paramspace import POINT_KEYS, format_value

QUERIES = ("target", "holdout")
SPREADS = ("seed_std", "seed_min", "seed_max")
BLOCK_BYTES = 32 * 2**20  # per array of a block of record resamples (two such arrays live at once)
RecordsSource = str | os.PathLike | pl.DataFrame  # a records file, or its table already in memory


# --- aggregation over the seeds ---


def _column_roles(summary: pl.DataFrame, group: list[str], seed_key: str) -> tuple[list[str], list[str], list[str]]:
    """(text columns kept, bootstrap-std columns averaged, columns given a seed spread), in the table's order."""
    rest = [name for name in summary.columns if name not in (*group, seed_key, "point")]  # a point names its seed
    numeric = [name for name in rest if summary[name].dtype.is_numeric()]
    texts = [name for name in rest if name not in numeric]
    if texts and len(summary):
        distinct = summary.group_by(group).agg(pl.col(texts).n_unique()).select(pl.col(texts).max()).row(0, named=True)
        texts = [name for name in texts if distinct[name] <= 1]
    averaged = [name for name in numeric if name == "std" or name.endswith("_std")]
    spread = [name for name in numeric if name not in averaged and not (name == "mean" or name.endswith("_mean"))]
    return texts, averaged, spread


def aggregate_seeds(summary: pl.DataFrame, keys: tuple[str, ...], seed_key: str = "seed") -> pl.DataFrame:
    """One row per value of the `keys` other than `seed_key`, over the seeds (the module docstring says how)."""
    group = [key for key in keys if key != seed_key]
    texts, averaged, spread = _column_roles(summary, group, seed_key)
    table = (
        summary.group_by(group)
        .agg(
            pl.col(texts).first(),
            n_seeds=pl.col(seed_key).n_unique(),
            n_rows=pl.len(),
            seeds=pl.col(seed_key).sort(),
            **{name: pl.col(name).mean() for name in (*averaged, *spread)},
            **{f"{name}_seed_std": pl.col(name).std(ddof=1) for name in spread},
            **{f"{name}_seed_min": pl.col(name).min() for name in spread},
            **{f"{name}_seed_max": pl.col(name).max() for name in spread},
        )
        .sort(group, nulls_last=False)
    )
    repeated = table.filter(pl.col("n_rows") != pl.col("n_seeds"))
    if len(repeated):  # two rows of one seed: the keys do not tell the rows apart (e.g. an SSL layer left out)
        raise ValueError(f"aggregate_seeds: a seed appears twice for {repeated.select(group).row(0, named=True)}")
    statistics = [
        column
        for name in summary.columns
        if name in averaged or name in spread
        for column in (name, *([f"{name}_{kind}" for kind in SPREADS] if name in spread else []))
    ]
    return table.select(*texts, *group, pl.col("n_seeds").cast(pl.Int64), "seeds", *statistics)


# --- paired difference of two points ---


def _win_signs(records: pl.DataFrame, score: str, label_mode: str) -> tuple[pl.Series, np.ndarray]:
    """(ids sorted, win signs) of the records with objects, those a population gap is over."""
    scored = records.filter((pl.col("label_mode") == label_mode) & (pl.col("n_objects") > 0)).sort("id")
    signs = np.sign(scored[f"{score}_target"].to_numpy() - scored[f"{score}_reference"].to_numpy())
    return scored["id"], signs.astype(np.int8)


def _aligned(tables: list[tuple[str, pl.Series, np.ndarray]]) -> np.ndarray:
    """The sign rows of the records every table holds, stacked (a smaller n_train measures fewer records: the
    comparison is over those both points trained on); no id in common, or an id listed twice, is refused."""
    common = tables[0][1]
    for name, ids, _ in tables:
        if ids.is_duplicated().any():
            raise ValueError(f"paired_difference: the records of {name} list an id twice")
        common = common.filter(common.is_in(ids.implode()))
    if not len(common):
        raise ValueError(f"paired_difference: the records of {', '.join(name for name, _, _ in tables)} share no id")
    return np.stack([signs[ids.is_in(common.implode()).to_numpy()] for _, ids, signs in tables])


def _bootstrap(differences: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """`n_boot` means of `differences` [seeds, records] over seeds and records resampled with replacement.

    A resample of the records is its counts per record (bincount), so a block of resamples costs
    block × records integers; the block keeps that under BLOCK_BYTES whatever the number of records.
    """
    n_seeds, n_records = differences.shape
    rng = np.random.default_rng(seed)
    block = max(1, BLOCK_BYTES // (8 * n_records))
    by_record = differences.T.astype(np.int64)  # [records, seeds]: integer sums stay exact
    means = np.empty(n_boot)
    for start in range(0, n_boot, block):
        size = min(block, n_boot - start)
        seed_counts = rng.multinomial(n_seeds, np.full(n_seeds, 1 / n_seeds), size=size)
        draws = rng.integers(0, n_records, size=(size, n_records)) + np.arange(size)[:, None] * n_records
        record_counts = np.bincount(draws.ravel(), minlength=size * n_records).reshape(size, n_records)
        del draws
        per_seed = record_counts @ by_record  # [block, seeds]: each seed's sum of d over the shared draw
        means[start : start + size] = (per_seed * seed_counts).sum(axis=1) / (n_seeds * n_records)
    return means


def paired_difference(
    records_x: list[pl.DataFrame],
    records_y: list[pl.DataFrame],
    metric: str,
    label_mode: str,
    n_boot: int,
    seed: int,
    level: float = 0.95,
    *,
    names: tuple[str, str] = ("X", "Y"),
    seeds: Sequence[Any] | None = None,
) -> dict[str, Any]:
    """gap_X − gap_Y of a win-gap `metric` (PPG, PRG, PFG), records_x[s] and records_y[s] the records tables of
    points X and Y at training seed s; {difference, ci_low, ci_high, n_seeds, n_records, n_boot}. `names` and
    `seeds` only spell the points and seeds in a refusal (ValueError: ids differing between tables)."""
    if metric not in WIN_GAPS:
        raise ValueError(f"paired_difference: {metric!r} is not a win gap ({list(WIN_GAPS)})")
    if not records_x or len(records_x) != len(records_y):
        raise ValueError("paired_difference: X and Y need the same seeds, at least one")
    if n_boot < 1 or not 0 < level < 1:
        raise ValueError(f"paired_difference: n_boot {n_boot} must be ≥ 1 and level {level} in (0, 1)")
    seeds = list(range(len(records_x))) if seeds is None else list(seeds)
    tables = [
        (f"{name} seed {seed_value}", *_win_signs(records, WIN_GAPS[metric], label_mode))
        for name, side in zip(names, (records_x, records_y))
        for seed_value, records in zip(seeds, side)
    ]
    signs = _aligned(tables)
    differences = signs[: len(records_x)].astype(np.int64) - signs[len(records_x) :]
    n_seeds, n_records = differences.shape  # _aligned refuses tables without a record in common
    low, high = np.quantile(_bootstrap(differences, n_boot, seed), [(1 - level) / 2, (1 + level) / 2])
    return {
        "difference": float(differences.mean()),
        "ci_low": float(low),
        "ci_high": float(high),
        "n_seeds": n_seeds,
        "n_records": n_records,
        "n_boot": n_boot,
    }


# --- comparisons along the swept parameters ---


def _spelled(point: Mapping[str, Any]) -> str:
    return "/".join(f"{key}~{format_value(key, value)}" for key, value in point.items())


def _matching(points: pl.DataFrame, where: Mapping[str, Any]) -> pl.DataFrame:
    """The points with the `where` values (a null matches a null)."""
    return points.filter(*[pl.col(key).eq_missing(pl.lit(value, points[key].dtype)) for key, value in where.items()])


def _seed_points(points: pl.DataFrame, where: Mapping[str, Any], seed_key: str) -> dict[Any, str]:
    """{seed: point segment} of the points with the `where` values."""
    rows = _matching(points, where)
    return dict(zip(rows[seed_key].to_list(), rows["point"].to_list()))


def _null_first(values) -> list:
    return sorted(values, key=lambda value: (value is not None, value))


def adjacent_pairs(points: pl.DataFrame, keys: tuple[str, ...] = POINT_KEYS, seed_key: str = "seed") -> list[dict]:
    """Per key other than the seed, each two consecutive values (sorted, null first) among the points with the
    same other keys: {parameter, x, y, fixed: {key: value}, x_points, y_points: {seed: point}}."""
    group = [key for key in keys if key != seed_key]
    pairs = []
    for parameter in group:
        others = [key for key in group if key != parameter]
        contexts = (
            points.select(others).unique().sort(others, nulls_last=False).iter_rows(named=True) if others else [{}]
        )
        for fixed in contexts:
            present = _null_first(_matching(points, fixed)[parameter].unique().to_list())
            pairs += [
                {
                    "parameter": parameter,
                    "x": x,
                    "y": y,
                    "fixed": fixed,
                    "x_points": _seed_points(points, {**fixed, parameter: x}, seed_key),
                    "y_points": _seed_points(points, {**fixed, parameter: y}, seed_key),
                }
                for x, y in itertools.pairwise(present)
            ]
    return pairs


def _load(source: RecordsSource, metrics: Sequence[str]) -> pl.DataFrame:
    """Only the columns the win signs need."""
    columns = ["id", "label_mode", "n_objects"]
    columns += [f"{WIN_GAPS[metric]}_{side}" for metric in metrics for side in ("target", "reference")]
    return source.select(columns) if isinstance(source, pl.DataFrame) else METRIC_RECORDS.read(source, columns)


def comparisons(
    points: pl.DataFrame,
    records: Mapping[str, Mapping[str, RecordsSource]],
    n_boot: int,
    seed: int,
    level: float = 0.95,
    *,
    keys: tuple[str, ...] = POINT_KEYS,
    seed_key: str = "seed",
    metrics: Sequence[str] = tuple(WIN_GAPS),
    label_mode: str = "all",
) -> pl.DataFrame:
    """COMPARISONS rows of every `adjacent_pairs` pair, over the seeds both points have (a pair without a common
    seed is left out), for each query set of `records` ({queries: {point: records file or table}}) and metric.
    `points`: one row per point, `point` and the `keys` (a summary table). Every comparison draws with `seed`."""
    rows, loaded = [], {}  # a point takes part in several pairs: each records table is read once

    def table(queries: str, point: str) -> pl.DataFrame:
        if (queries, point) not in loaded:
            loaded[queries, point] = _load(records[queries][point], metrics)
        return loaded[queries, point]

    for pair in adjacent_pairs(points, keys, seed_key):
        common = _null_first(set(pair["x_points"]) & set(pair["y_points"]))
        point_x, point_y = ({**pair["fixed"], pair["parameter"]: pair[side]} for side in ("x", "y"))
        if not common:
            continue
        for queries in records:
            tables_x = [table(queries, pair["x_points"][s]) for s in common]
            tables_y = [table(queries, pair["y_points"][s]) for s in common]
            for metric in metrics:
                names = (f"{_spelled(point_x)} ({queries})", f"{_spelled(point_y)} ({queries})")
                result = paired_difference(
                    tables_x, tables_y, metric, label_mode, n_boot, seed, level, names=names, seeds=common
                )
                rows.append(
                    {
                        "parameter": pair["parameter"],
                        "value_x": format_value(pair["parameter"], pair["x"]),
                        "value_y": format_value(pair["parameter"], pair["y"]),
                        "fixed": _spelled(pair["fixed"]),
                        "queries": queries,
                        "metric": metric,
                        "label_mode": label_mode,
                        "separated": result["ci_low"] > 0 or result["ci_high"] < 0,  # the interval excludes 0
                        "level": level,
                        **result,
                    }
                )
    return pl.DataFrame(rows, schema=COMPARISONS.polars()).select(COMPARISONS.names)


# --- command line ---


def seeds_stage(
    summary: str,
    target_records: list[str],
    holdout_records: list[str],
    n_boot: int,
    seed: int,
    level: float,
    out_seeds: str,
    out_seeds_csv: str,
    out_comparisons: str,
    out_comparisons_csv: str,
) -> None:
    table = SUMMARY.read(summary, extra=True)
    records = {
        "target": keyed_files(target_records, "target-records"),
        "holdout": keyed_files(holdout_records, "holdout-records"),
    }
    for queries, by_point in records.items():
        missing = sorted(set(table["point"]) - set(by_point))
        if missing:
            raise ValueError(f"seeds: no --{queries}-records for point(s) {missing[:5]} of {summary}")
    over_seeds = aggregate_seeds(table, POINT_KEYS)
    compared = comparisons(table, records, n_boot, seed, level)
    params = {"n_boot": n_boot, "seed": seed, "level": level, "points": table["point"].to_list()}
    write_parquet(over_seeds, out_seeds, contract=SEED_SUMMARY, stage="seeds", params=params)
    write_parquet(compared, out_comparisons, contract=COMPARISONS, stage="seeds", params=params)
    with atomic_path(out_seeds_csv) as tmp:  # CSV holds no lists: the seeds as "0,1,2"
        over_seeds.with_columns(pl.col("seeds").cast(pl.List(pl.String)).list.join(",")).write_csv(
            tmp, float_precision=4
        )
    with atomic_path(out_comparisons_csv) as tmp:
        compared.write_csv(tmp, float_precision=4)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--summary", required=True, help="summary Parquet of a split")
    for queries in QUERIES:
        parser.add_argument(
            f"--{queries}-records",
            action="append",
            required=True,
            metavar="POINT=FILE",
            help=f"a point's metric records table on the {queries} records (repeatable)",
        )
    parser.add_argument("--n-boot", type=int, required=True, help="bootstrap resamples per comparison")
    parser.add_argument("--seed", type=int, required=True, help="the bootstrap's generator seed")
    parser.add_argument("--level", type=float, default=0.95, help="the intervals' level (default: 0.95)")
    for name, what in (("seeds", "per point over its seeds"), ("comparisons", "adjacent points compared")):
        parser.add_argument(f"--out-{name}", required=True, help=f"Parquet: {what}")
        parser.add_argument(f"--out-{name}-csv", required=True, help="its CSV copy")
    run_stage(parser, argv, seeds_stage)


if __name__ == "__main__":
    main()
