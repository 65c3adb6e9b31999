"""The metric stage end to end (`compute`) and its three tables, written id part by id part.

Module map: `params` (MetricParams), `encoding` (strings as integers), `plan` (reading, checking and moving the
inputs into parts), `scoring` (neighbours files into counts), `kernels` (every compiled loop), `population`
(PPG, PRG, PFG, AUCG and the bootstrap), `sample_level` (the top-L gaps), this module (the records table and the
run), `definitions` (a plain reference of the metrics the tests check the engine against; the engine never
calls it). docs/metrics-engine.md tells the whole story.
"""

from __future__ import annotations

import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from threading import Thread

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from workflow_scripts.contracts import ANNOTATIONS, METRIC_RECORDS, NEIGHBORS, POPULATION, SAMPLE_LEVEL
from workflow_scripts.io import parquet_stream, write_parquet
from workflow_scripts.metrics import plan
from workflow_scripts.metrics.encoding import PublicSet, StringIndex, narrowest
from workflow_scripts.metrics.params import LABEL_MODES, SIDES, TABLES, MetricParams
from workflow_scripts.metrics.plan import (
    RunParts,
    count_queries,
    join_parts,
    query_batches,
    read_public,
    route_annotations,
    route_queries,
    route_runs,
    spill_schemas,
)
from workflow_scripts.metrics.population import distinct_recalls, n_excluded, population_columns, population_rows
from workflow_scripts.metrics.sample_level import MERGE_ROWS, ORDERS, sample_runs, sample_table
from workflow_scripts.metrics.scoring import COUNT_COLUMNS, SideScores, score_side
from workflow_scripts.spill import RangeParts, Spill

# Records written at a time: one row group each.
RECORDS_BATCH_ROWS = 1 << 20


# --- the run ---


def compute(
    target_neighbors: str,
    reference_neighbors: str,
    query_annotations: str,
    public_annotations: str,
    queries: str,
    params: MetricParams = MetricParams(),
    *,
    out_dir: str | Path | None = None,
    outputs: dict[str, str | Path] | None = None,
) -> None:
    """Write the three tables: to `outputs` (table name -> file), or as TABLE.parquet into `out_dir`."""
    outputs = outputs or {table: Path(out_dir) / f"{table}.parquet" for table in TABLES}
    # Numba's first compiled call sets up its compiler (~0.5 s): done on a thread while polars reads the inputs.
    warm_up = Thread(target=lambda: StringIndex(pl.Series(["label"]), "warm-up", "label").positions(pl.Series(["x"])))
    warm_up.start()
    paths = {
        "queries": queries,
        "query_annotations": query_annotations,
        "public": public_annotations,
        **dict(zip(SIDES, (target_neighbors, reference_neighbors))),
    }
    n_queries = check_inputs(paths)
    with tempfile.TemporaryDirectory(prefix="dejavu-metrics-", dir=params.spill_dir) as folder:
        spill = Spill(folder, plan.SPILL_BYTES)
        parts = RangeParts.sampled(query_batches(queries), n_queries, params.part_records)
        public, run_parts = route_inputs(paths, parts, spill, params)
        warm_up.join()
        schemas = spill_schemas(public.labels.codes.dtype)
        starts = join_parts(spill, len(parts), run_parts, schemas, paths, params.k)
        score_sides(paths, public, spill, run_parts, schemas["truth"], starts, params)
        n_labels = len(public.vocabulary)
        del public  # the public set's labels are no longer needed: freed before the tables are written
        schemas.update(scores_schemas(n_labels))
        write_tables(spill, starts, n_labels, schemas, outputs, params, paths)


def check_inputs(paths: dict[str, str]) -> int:
    """The number of query records; refuses (DataError) a query, annotations or neighbours file that is not one."""
    n_queries = count_queries(paths["queries"])
    ANNOTATIONS.scan(paths["query_annotations"], ["id", "labels"])
    for side in SIDES:
        NEIGHBORS.scan(paths[side])
    return n_queries


def route_inputs(
    paths: dict[str, str], parts: RangeParts, spill: Spill, params: MetricParams
) -> tuple[PublicSet, dict[str, RunParts]]:
    """Every input into its id parts; returns the public set and how each neighbours file's runs are cut."""
    # The neighbours files' runs (query ids and ranks alone) are read on a thread each, the public set beside
    # them; the query records after them. A neighbours file's refusal comes before the public set's.
    with ThreadPoolExecutor(len(SIDES) + 1) as pool:
        runs = {
            side: pool.submit(route_runs, paths[side], side, parts, spill, params.batch_rows, params.k)
            for side in SIDES
        }
        public = pool.submit(read_public, paths["public"])
        run_parts = {side: RunParts(future.result(), plan.RUN_PART_RUNS) for side, future in runs.items()}
        public = public.result()
    route_queries(paths["queries"], parts, spill)
    route_annotations(paths["query_annotations"], public, parts, spill)
    return public, run_parts


def score_sides(
    paths: dict[str, str],
    public: PublicSet,
    spill: Spill,
    run_parts: dict[str, RunParts],
    truth_schema: dict,
    starts: np.ndarray,
    params: MetricParams,
) -> None:
    """Both neighbours files scored (`score_side`) into the spill, part by part."""
    # The two models' files are independent: one thread each (numba, numpy and polars release the GIL).
    with ThreadPoolExecutor(len(SIDES)) as pool:
        scored = [
            pool.submit(
                score_side,
                paths[side],
                side,
                public,
                spill,
                run_parts[side],
                truth_schema,
                starts,
                params.k,
                params.top_n,
                params.batch_rows,
            )
            for side in SIDES
        ]
        for future in scored:
            future.result()


def scores_schemas(n_labels: int) -> dict[str, dict]:
    """The spilled scores' schemas (scores_target, scores_reference): counts in the narrowest type n_labels fits."""
    counts_type = pl.Series(np.zeros(0, narrowest(n_labels))).dtype
    return {
        f"scores_{side}": {"record": pl.Int64, **dict.fromkeys(COUNT_COLUMNS, counts_type), "nn_score": pl.Float32}
        for side in SIDES
    }


# --- the records table ---


def scores_frame(
    ids: pl.Series, n_objects: np.ndarray, scores: SideScores, mode: int, suffix: str = ""
) -> pl.LazyFrame:
    """n_predicted, n_correct, precision, recall, f1, nn_score of one model and label mode for the records `ids`
    (the order of `n_objects` and `scores`)."""
    frame = (
        pl.DataFrame(
            {
                "n_objects": n_objects,
                "n_predicted": scores.counts[0, mode],
                "n_correct": scores.counts[1, mode],
                "nn_score": scores.nn_score,
            },
            schema={"n_objects": pl.Int32, "n_predicted": pl.Int32, "n_correct": pl.Int32, "nn_score": pl.Float32},
        )
        .lazy()
        .with_columns(pl.col("nn_score").fill_nan(None))
    )
    precision = pl.when(pl.col("n_predicted") > 0).then(pl.col("n_correct") / pl.col("n_predicted")).otherwise(0.0)
    recall = pl.when(pl.col("n_objects") > 0).then(pl.col("n_correct") / pl.col("n_objects"))
    frame = frame.with_columns(precision=precision, recall=recall)
    f1 = (
        pl.when(pl.col("precision") + pl.col("recall") > 0)
        .then(2 * pl.col("precision") * pl.col("recall") / (pl.col("precision") + pl.col("recall")))
        .otherwise(0.0)
    )
    frame = frame.with_columns(f1=pl.when(pl.col("recall").is_not_null()).then(f1))
    values = ["n_predicted", "n_correct", "precision", "recall", "f1", "nn_score"]
    return frame.select(
        id=ids,
        label_mode=pl.lit(LABEL_MODES[mode]),
        n_objects="n_objects",
        **{f"{name}{suffix}": name for name in values},
    )


def records_frame(ids: pl.Series, n_objects: np.ndarray, sides: dict[str, SideScores], mode: int) -> pl.LazyFrame:
    """Both models' scores side by side (suffixes _target, _reference) of one label mode's records `ids`; lazy, so
    a reader computes only the columns it selects."""
    target, reference = (scores_frame(ids, n_objects, sides[side], mode, f"_{side}") for side in SIDES)
    return pl.concat([target, reference.drop("id", "label_mode", "n_objects")], how="horizontal")


class RowGroups:
    """Writes a Parquet file's rows in row groups of exactly `rows` rows (a label mode's last one fewer), whatever
    the sizes of the tables given."""

    def __init__(self, writer: pq.ParquetWriter, rows: int):
        self.writer, self.rows = writer, rows
        self.pending: list[pa.Table] = []
        self.n_pending = 0

    def write(self, table: pa.Table) -> None:
        self.pending.append(table)
        self.n_pending += len(table)
        while self.n_pending >= self.rows:
            self._write(self.rows)

    def flush(self) -> None:
        if self.n_pending:
            self._write(self.n_pending)

    def _write(self, n: int) -> None:
        table = pa.concat_tables(self.pending)
        group = table.slice(0, n)
        # One contiguous group: the writer gives up a column's dictionary at a point that depends on the chunks.
        self.writer.write_table(
            group if all(column.num_chunks == 1 for column in group.columns) else group.combine_chunks()
        )
        self.pending, self.n_pending = [table.slice(n)] if n < len(table) else [], len(table) - n


def part_scores(
    spill: Spill, part: int, starts: np.ndarray, n_labels: int, schemas: dict[str, dict], keep: bool
) -> tuple[pl.DataFrame, dict[str, SideScores]]:
    """An id part's records (id, n_objects, in id order) and both models' scores of them."""
    records = spill.read("records", part, schemas["records"], keep=keep)
    sides = {}
    for side in SIDES:
        scored = spill.read(f"scores_{side}", part, schemas[f"scores_{side}"], keep=keep)
        at = scored["record"].to_numpy() - starts[part]
        sides[side] = SideScores.empty(len(records), n_labels)
        sides[side].counts[:, :, at] = scored.select(COUNT_COLUMNS).to_numpy().T.reshape(2, 2, -1)
        sides[side].nn_score[at] = scored["nn_score"].to_numpy()
    return records, sides


def write_tables(
    spill: Spill,
    starts: np.ndarray,
    n_labels: int,
    schemas: dict[str, dict],
    outputs: dict[str, str | Path],
    params: MetricParams,
    paths: dict[str, str],
) -> None:
    """The records table (by label mode, then id), its population metrics and its sample-level table."""
    provenance = {
        "target_neighbors": paths["target"],
        "reference_neighbors": paths["reference"],
        "queries": paths["queries"],
        "k": params.k,
        "top_n": params.top_n,
        "top_l": list(params.top_l),
        "n_boot": params.n_boot,
        "frac": params.frac,
        "seed": params.seed,
    }
    population, n_scored = write_records(spill, starts, n_labels, schemas, outputs["records"], params, provenance)
    write_parquet(
        population.with_columns(k=pl.lit(params.k), top_n=pl.lit(params.top_n)),
        outputs["population"],
        stage="metrics",
        params=provenance,
        contract=POPULATION,
    )
    # The sample-level records are the top_n mode's records with objects, those of its population metrics.
    samples = sample_table(
        {order: [spill.frames(f"sample_{order}", part) for part in range(len(starts) - 1)] for order in ORDERS},
        n_scored,
        list(params.top_l),
    )
    write_parquet(samples, outputs["sample_level"], stage="metrics", params=provenance, contract=SAMPLE_LEVEL)


def write_records(
    spill: Spill,
    starts: np.ndarray,
    n_labels: int,
    schemas: dict[str, dict],
    path: str | Path,
    params: MetricParams,
    provenance: dict,
) -> tuple[pl.DataFrame, int]:
    """The records table, label mode by label mode (`write_mode`). Returns the population metrics' rows and the
    number of top_n-mode records with objects."""
    rng = np.random.default_rng(params.seed)
    with (
        parquet_stream(path, METRIC_RECORDS.schema, "metrics", provenance) as writer,
        ThreadPoolExecutor(1) as pool,
    ):
        populations = []
        for mode, label_mode in enumerate(LABEL_MODES):
            part_sizes, distinct, excluded = write_mode(spill, starts, n_labels, schemas, writer, mode, str(path))
            # The population metrics (compiled, GIL released) run beside writing the next mode's records; one
            # worker keeps the modes' draws in order.
            populations.append(
                pool.submit(
                    population_rows, spill, label_mode, part_sizes, distinct, excluded, params.n_boot, params.frac, rng
                )
            )
        population = pl.DataFrame([row for future in populations for row in future.result()])
    return population, int(part_sizes.sum())  # the last mode's sizes: top_n's


def write_mode(
    spill: Spill,
    starts: np.ndarray,
    n_labels: int,
    schemas: dict[str, dict],
    writer: pq.ParquetWriter,
    mode: int,
    path: str,
) -> tuple[np.ndarray, np.ndarray, int]:
    """One label mode's records, part by part, to the records file; spills each part's population columns and,
    in mode top_n, its sorted sample-level runs. Returns the parts' sizes, the distinct recalls and the records
    excluded (without objects)."""
    n_parts, label_mode = len(starts) - 1, LABEL_MODES[mode]
    block_rows = max(1, MERGE_ROWS // n_parts)  # each part's sorted runs go to the spill in blocks the merge holds
    groups = RowGroups(writer, RECORDS_BATCH_ROWS)
    part_sizes, distinct, excluded = np.zeros(n_parts, np.int64), [], 0
    for part in tqdm(range(n_parts), desc=f"tables, {label_mode} labels", unit="part", mininterval=2):
        records, sides = part_scores(spill, part, starts, n_labels, schemas, keep=mode < len(LABEL_MODES) - 1)
        frame = records_frame(records["id"], records["n_objects"].to_numpy(), sides, mode).collect()
        groups.write(METRIC_RECORDS.conform(frame.to_arrow(), path))
        columns = population_columns(frame)
        spill.append(f"population_{label_mode}", part, columns)
        part_sizes[part], excluded = len(columns), excluded + n_excluded(frame)
        distinct.append(distinct_recalls(columns))
        if label_mode == "top_n":
            record = pl.int_range(starts[part], starts[part + 1], dtype=pl.Int64)
            for order, run in sample_runs(frame.with_columns(record=record), pl.col("record")).items():
                for first in range(0, len(run), block_rows):
                    spill.append(f"sample_{order}", part, run.slice(first, block_rows))
    groups.flush()
    return part_sizes, np.unique(np.concatenate(distinct)), excluded
