"""Scoring each neighbours file: its rows, chunk by chunk, into per-record counts of predicted and correct labels.

Each neighbours file is walked once, in its own order, in chunks of `batch_rows` rows that hold whole runs
(`plan.run_chunks`). A chunk's runs find their records and label codes in the run parts (`RunTruth`, read in
run order), its rows of rank < k are selected (`kernels.select_rows`) and one compiled pass per query scores
them (`kernels.score_queries`). The counts go to the part of their record's id, where the tables are written.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from workflow_scripts.contracts import NEIGHBORS
from workflow_scripts.io import DataError
from workflow_scripts.metrics.encoding import LabelSets, PublicSet, list_label_sets, narrowest
from workflow_scripts.metrics.kernels import score_queries, select_rows
from workflow_scripts.metrics.params import LABEL_MODES
from workflow_scripts.metrics.plan import RunParts, run_chunks
from workflow_scripts.spill import Spill, route


def check_finite_scores(rows: pl.DataFrame, first_row: int, path: str) -> None:
    """Refuse a null, NaN or infinite score: the nearest score and the `distance` order are read from them."""
    bad = np.flatnonzero(~np.isfinite(rows["score"].fill_null(np.nan).to_numpy()))
    if len(bad):
        row = int(bad[0])
        raise DataError(
            f"{path}: {len(bad)} non-finite score(s) among rows {first_row}-{first_row + len(rows) - 1}, first at "
            f"row {first_row + row} (query {rows['query_id'][row]!r}, rank {rows['rank'][row]}): "
            f"{rows['score'][row]}"
        )


COUNT_COLUMNS = [f"{count}_{mode}" for count in ("n_predicted", "n_correct") for mode in LABEL_MODES]


def query_scores(
    bounds: np.ndarray,
    rank: np.ndarray,
    public_row: np.ndarray,
    truth_rows: np.ndarray,
    public: PublicSet,
    truth: LabelSets,
    k: int,
    top_n: int,
) -> np.ndarray:
    """score_queries over queries 0..len(truth_rows)−1, query q's rows bounds[q]:bounds[q + 1]: counts [2, 2,
    queries]."""
    counts = np.zeros((2, 2, len(truth_rows)), np.int32)
    score_queries(
        bounds,
        rank,
        public_row.astype(narrowest(len(public.ids)), copy=False),
        (public.labels.offsets, public.labels.codes),
        (truth_rows, truth.offsets, truth.codes),
        len(public.vocabulary),
        len(public.ids),
        k,
        top_n,
        counts,
    )
    return counts


def score_chunk(
    rows: pl.DataFrame,
    run_start: np.ndarray,
    listed_runs: np.ndarray,
    truth_rows: np.ndarray,
    truth: LabelSets,
    public: PublicSet,
    k: int,
    top_n: int,
    path: str,
) -> tuple[np.ndarray, np.ndarray]:
    """Score the runs `listed_runs` (ascending) of neighbour rows whose runs start at `run_start`, run
    listed_runs[i] against truth row truth_rows[i]: counts [n_predicted, n_correct] × [all, top_n] × listed runs,
    and the score of each one's rank-0 row (NaN where it has none)."""
    listed = np.zeros(len(run_start), bool)
    listed[listed_runs] = True
    rank = rows["rank"].to_numpy()
    public_row = np.empty(len(rows), narrowest(len(public.ids)))
    kept_rank = np.empty(len(rows), rank.dtype)
    row_public = public.ids.positions(rows["public_id"])
    bounds, nearest = select_rows(run_start, listed, rank, k, row_public, public_row, kept_rank)
    public_row, kept_rank = public_row[: bounds[-1]], kept_rank[: bounds[-1]]
    if (public_row < 0).any():
        used = np.repeat(listed, np.diff(run_start, append=len(rows))) & (rank < k)
        unknown = rows["public_id"].filter(used & (row_public < 0)).unique().sort()
        raise DataError(
            f"{path}: {len(unknown)} public id(s) without a public annotation row, e.g. {unknown.head(5).to_list()}"
        )
    nn_score = np.full(len(listed_runs), np.nan, np.float32)
    met = nearest >= 0
    nn_score[met] = rows["score"].gather(nearest[met]).to_numpy()
    return query_scores(bounds, kept_rank, public_row, truth_rows, public, truth, k, top_n), nn_score


class RunTruth:
    """A neighbours file's runs of query records, with their record and label codes, in run order (read from the
    spill one run part at a time)."""

    def __init__(self, spill: Spill, side: str, run_parts: RunParts, schema: dict):
        self.spill, self.side, self.run_parts, self.schema = spill, side, run_parts, schema
        self.loaded = pl.DataFrame(schema=schema)
        self.next_part = 0

    def take(self, stop: int) -> pl.DataFrame:
        """The runs before `stop` not taken before."""
        while self.next_part < len(self.run_parts) and self.next_part * self.run_parts.size < stop:
            part = self.spill.read(f"truth_{self.side}", self.next_part, self.schema).sort("run")
            self.loaded = pl.concat([self.loaded, part]).rechunk()
            self.next_part += 1
        end = int(np.searchsorted(self.loaded["run"].to_numpy(), stop))
        taken, self.loaded = self.loaded.head(end), self.loaded.slice(end)
        return taken


COUNT_COLUMNS = [f"{count}_{mode}" for count in ("n_predicted", "n_correct") for mode in LABEL_MODES]


def score_side(
    path: str,
    side: str,
    public: PublicSet,
    spill: Spill,
    run_parts: RunParts,
    truth_schema: dict,
    starts: np.ndarray,
    k: int,
    top_n: int,
    batch_rows: int,
) -> None:
    """Score a neighbours file's query records, chunk by chunk; spill their counts and nearest score
    ("scores_SIDE": record, COUNT_COLUMNS, nn_score) to the part of their record."""
    truth = RunTruth(spill, side, run_parts, truth_schema)
    counts_type = narrowest(len(public.vocabulary))
    first_row = 0  # chunks hold consecutive rows of the file
    for rows, run_start, first_run in run_chunks(path, NEIGHBORS.names, batch_rows, f"metrics {Path(path).name}"):
        check_finite_scores(rows, first_row, path)
        first_row += len(rows)
        listed = truth.take(first_run + len(run_start))
        if not len(listed):
            continue
        counts, nn_score = score_chunk(
            rows,
            run_start,
            listed["run"].to_numpy() - first_run,
            np.arange(len(listed)),
            list_label_sets(listed["labels"]),
            public,
            k,
            top_n,
            path,
        )
        record = listed["record"].to_numpy()
        scores = pl.DataFrame(
            {
                "record": record,
                **dict(zip(COUNT_COLUMNS, counts.reshape(4, -1).astype(counts_type))),
                "nn_score": nn_score,
            }
        )
        route(spill, f"scores_{side}", scores, np.searchsorted(starts, record, side="right") - 1, len(starts) - 1)


@dataclass
class SideScores:
    """One model's per-record counts, records on the last axis."""

    counts: np.ndarray  # [n_predicted, n_correct] × [all, top_n] × records, at most n_labels: narrowest integers
    nn_score: np.ndarray  # float32: score of the rank-0 neighbour, NaN where a record has none

    @classmethod
    def empty(cls, n_records: int, n_labels: int) -> SideScores:
        return cls(np.zeros((2, 2, n_records), narrowest(n_labels)), np.full(n_records, np.nan, np.float32))
