"""The sample-level table: mean precision/recall/F1 gaps (target − reference) over the top-L records of each order.

Orders put the most suspicious records first: `distance` by the target model's nearest-neighbour similarity,
`correct` by the objects the target model got right, `gap` (an oracle view that peeks at the reference model) by
correct-under-target minus correct-under-reference. Ties break by id. Only the top_n label mode's records with
objects take part.

No order is sorted whole. Each id part sorts its records per order (`sample_runs`: one int64 `order_key` per
record) and spills them in blocks; the parts' sorted runs are then merged (`merged_sums`), holding about
`MERGE_ROWS` rows at once, and the running sums of the gaps (`kernels.running_sums`, one row at a time as a
cumulative sum adds) are read off at each cutoff L.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import polars as pl

from workflow_scripts.metrics.definitions import ORDERS, WIN_GAPS
from workflow_scripts.metrics.kernels import running_sums
from workflow_scripts.metrics.params import sample_cutoffs

GAP_COLUMNS = [f"{metric}_gap" for metric in WIN_GAPS.values()]
# Rows of all parts' sorted runs that the merge holds at once.
MERGE_ROWS = 1 << 20


def order_key(values: np.ndarray, record: np.ndarray) -> np.ndarray:
    """One int64 per record that sorts ascending as an order does: its key descending (a missing key, NaN, first),
    then the record's rank in id order (< 2^32). A float key becomes an integer that keeps the floats' order
    (−0.0 equal to 0.0, as in polars' sort)."""
    if values.dtype.kind == "f":
        bits = values.astype(np.float32).view(np.int32).astype(np.int64)
        descending = np.where(np.isnan(values), -(1 << 31), -np.where(bits < 0, -(bits & 0x7FFFFFFF), bits))
    else:
        descending = -values.astype(np.int64)
    return (descending << 32) | record


def sample_runs(mode_records: pl.DataFrame | pl.LazyFrame, record: pl.Expr) -> dict[str, pl.DataFrame]:
    """Per order, the top_n-mode records with objects of a records frame in that order: `key` (`order_key`, with
    the id rank `record`) and the three gaps (target − reference)."""
    scored = (
        mode_records.lazy()
        .filter(pl.col("n_objects") > 0)
        .select(
            record=record,
            **{f"{order}_key": key for order, (key, _) in ORDERS.items()},
            **{
                f"{metric}_gap": pl.col(f"{metric}_target") - pl.col(f"{metric}_reference")
                for metric in WIN_GAPS.values()
            },
        )
        .collect()
    )
    runs = {}
    for order in ORDERS:
        key = order_key(scored[f"{order}_key"].to_numpy(), scored["record"].to_numpy().astype(np.int64))
        ranked = np.argsort(key)
        runs[order] = scored.select(GAP_COLUMNS)[ranked].with_columns(key=pl.Series(key[ranked]))
    return runs


def merged_sums(runs: list[Iterator[pl.DataFrame]], cutoffs: np.ndarray) -> np.ndarray:
    """The running sums of the gaps at each cutoff ([cutoffs, 3]) over the records of sorted runs merged by `key`.

    Each step takes, of every run's current frame, the rows up to the smallest of their last keys: all rows that
    come before any row not yet read, which one sort puts in order.
    """
    sums = np.full(len(GAP_COLUMNS), -0.0)  # −0.0 + x is x: the first sum is the first gap, as in a cumulative sum
    state = np.zeros(2, np.int64)
    at_cutoffs = np.zeros((len(cutoffs), len(GAP_COLUMNS)))
    heads = [(frame, run) for run in runs for frame in [next(run, None)] if frame is not None]
    while heads:
        bound = min(frame["key"][-1] for frame, _ in heads)
        taken, following = [], []
        for frame, run in heads:
            end = int(np.searchsorted(frame["key"].to_numpy(), bound, side="right"))
            taken.append(frame.head(end))
            rest = frame.slice(end) if end < len(frame) else next(run, None)
            if rest is not None:
                following.append((rest, run))
        step = pl.concat(taken).sort("key") if len(taken) > 1 else taken[0]
        running_sums(step.select(GAP_COLUMNS).to_numpy(), sums, state, cutoffs, at_cutoffs)
        heads = following
    return at_cutoffs


def sample_table(runs: dict[str, list[Iterator[pl.DataFrame]]], n: int, top_l: list[int]) -> pl.DataFrame:
    """Mean precision/recall/F1 gaps (target − reference) over the top-L records of each order, and over all n,
    from each order's sorted runs (`sample_runs`)."""
    cutoffs = sample_cutoffs(top_l, n)
    index = pl.Series(cutoffs, dtype=pl.Int64) - 1
    frames = []
    for order, (_, oracle) in ORDERS.items():
        sums = merged_sums(runs[order], np.array(cutoffs, np.int64))
        frames.append(
            pl.DataFrame(
                {
                    "order": [order] * len(cutoffs),
                    "oracle": [oracle] * len(cutoffs),
                    "top_l": cutoffs,
                    **{column: pl.Series(sums[:, m]) / (index + 1) for m, column in enumerate(GAP_COLUMNS)},
                },
                schema_overrides={"top_l": pl.Int64},
            )
        )
    return pl.concat(frames)
