"""How the inputs reach the engine: read, checked, and moved into parts of bounded size.

The inputs come in unrelated orders (the query list, the annotations, each neighbours file's own query order) and
the records table goes out in id order, so nothing is joined whole. Rows move into parts (`workflow_scripts.spill`:
in memory up to a byte budget, in files beyond) and each part is handled alone:

1. The query ids are cut into id ranges of about `part_records` records (`RangeParts`). The query list, the
   annotations (as label codes) and each neighbours file's runs (a run: the neighbouring rows of one query, read
   from its `query_id` and `rank` columns alone) go to the part of their id (`route_*`).
2. Each id part is joined by id (`join_parts`): its records get their rank in id order, their annotation and, per
   neighbours file, the number of their run; their label codes then go to the part of their run (`RunParts`),
   where scoring, which walks the file in run order, finds them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
from tqdm import tqdm

from workflow_scripts.contracts import ANNOTATIONS, SPLIT_IDS
from workflow_scripts.io import DataError
from workflow_scripts.metrics.encoding import PublicSet, StringIndex, label_lists, label_sets, run_starts
from workflow_scripts.metrics.params import SIDES
from workflow_scripts.spill import RangeParts, Spill, route

# Runs per run part of a neighbours file: the label codes a scoring thread holds at a time.
RUN_PART_RUNS = 1 << 18
# What the spill holds in memory before it writes files.
SPILL_BYTES = 1 << 26
# Rows of the query list and the annotations read at a time.
ANNOTATION_BATCH_ROWS = 1 << 18


# --- reading the inputs ---


def count_queries(path: str) -> int:
    n = SPLIT_IDS.scan(path, ["id"]).select(pl.len()).collect().item()
    if not n:
        raise DataError(f"{path}: no query records (an empty split): there is nothing to measure")
    if n >= 1 << 32:  # record numbers share an int64 with an order key (`sample_level.order_key`)
        raise DataError(f"{path}: {n} query records; the metric stage takes fewer than 2^32")
    return n


def query_batches(path: str) -> Iterator[pl.Series]:
    for batch in SPLIT_IDS.scan(path, ["id"]).collect_batches(chunk_size=ANNOTATION_BATCH_ROWS):
        yield batch["id"]


def read_public(path: str) -> PublicSet:
    return PublicSet.from_frame(ANNOTATIONS.read(path, ["id", "labels"]), path)


def run_chunks(
    path: str, columns: list[str], batch_rows: int, desc: str
) -> Iterator[tuple[pl.DataFrame, np.ndarray, int]]:
    """A neighbours file in chunks of about `batch_rows` rows that hold whole runs (a run: neighbouring rows of one
    query id; a run cut by a chunk's end moves to the next): (rows, each run's first row, runs before the chunk).
    Runs are numbered alike whatever the columns or the chunk size."""
    n_rows = pl.scan_parquet(path).select(pl.len()).collect().item()
    carry, first_run = None, 0
    with tqdm(total=n_rows, desc=desc, unit="row", unit_scale=True, mininterval=2) as bar:
        for chunk in pl.scan_parquet(path).select(columns).collect_batches(chunk_size=batch_rows):
            bar.update(len(chunk))
            rows = chunk if carry is None else pl.concat([carry, chunk])
            if not len(rows):
                continue
            run_start = run_starts(rows["query_id"])
            if len(run_start) > 1:
                yield rows.slice(0, run_start[-1]), run_start[:-1], first_run
                first_run += len(run_start) - 1
            carry = rows.slice(run_start[-1])
    if carry is not None and len(carry):
        yield carry, run_starts(carry["query_id"]), first_run


def used_ranks(rows: pl.DataFrame, run_start: np.ndarray, k: int, path: str) -> np.ndarray:
    """The rows of rank < k of each run of a chunk (a query's list must have k: `part_runs` checks); refuses a
    negative rank."""
    rank = rows["rank"].to_numpy()
    if len(rank) and rank.min() < 0:
        raise DataError(f"{path}: negative rank {rank.min()}")
    if not len(run_start):
        return np.zeros(0, np.int32)
    return np.add.reduceat((rank < k).astype(np.int32), run_start)


# --- 1. the inputs into id parts ---


def spill_schemas(codes: type) -> dict[str, dict]:
    """The columns of each spilled table (label codes of type `codes`), for parts that received nothing."""
    labels = pl.List(pl.Series(np.zeros(0, codes)).dtype)
    return {
        "queries": {"id": pl.String},
        "annotations": {"id": pl.String, "n_objects": pl.UInt32, "labels": labels},
        "runs": {"id": pl.String, "run": pl.Int64, "ranks": pl.Int32},
        "records": {"id": pl.String, "n_objects": pl.UInt32},
        "truth": {"run": pl.Int64, "record": pl.Int64, "labels": labels},
    }


def route_queries(path: str, parts: RangeParts, spill: Spill) -> None:
    for ids in query_batches(path):
        route(spill, "queries", ids.to_frame("id"), parts.of(ids), len(parts))


def route_annotations(path: str, public: PublicSet, parts: RangeParts, spill: Spill) -> None:
    """Every annotation row as (id, number of distinct objects, label codes), to the part of its id."""
    for batch in ANNOTATIONS.scan(path, ["id", "labels"]).collect_batches(chunk_size=ANNOTATION_BATCH_ROWS):
        frame = pl.DataFrame(
            {
                "id": batch["id"],
                "n_objects": batch["labels"].list.n_unique(),
                "labels": label_lists(label_sets(batch["labels"], batch["id"], public.label_index, path)),
            }
        )
        route(spill, "annotations", frame, parts.of(batch["id"]), len(parts))


def route_runs(path: str, side: str, parts: RangeParts, spill: Spill, batch_rows: int, k: int) -> int:
    """Every run of a neighbours file as (query id, run number, rows of rank < k), to the part of its id; returns
    the number of runs. Counting the ranks here spares the file a pass of its own."""
    n_runs = 0
    for rows, run_start, first_run in run_chunks(path, ["query_id", "rank"], batch_rows, f"runs of {Path(path).name}"):
        ranks = used_ranks(rows, run_start, k, path)
        ids = rows["query_id"].gather(run_start)
        n_runs = first_run + len(run_start)
        route(
            spill,
            f"runs_{side}",
            pl.DataFrame({"id": ids, "run": np.arange(first_run, n_runs), "ranks": ranks}),
            parts.of(ids),
            len(parts),
        )
    return n_runs


# --- 2. each id part joined ---


class Refusals:
    """Problems of the inputs found part by part, raised once every part is checked: the first kind of `messages`
    found, with its number over all parts and its first examples (the parts come in id order)."""

    def __init__(self, messages: dict[str, Callable[[int, list], str]]):
        self.messages = messages
        self.found: dict[str, tuple[int, list]] = {}

    def add(self, kind: str, ids: pl.Series) -> None:
        if len(ids):
            n, examples = self.found.get(kind, (0, []))
            self.found[kind] = (n + len(ids), examples + ids.head(5 - len(examples)).to_list())

    def raise_first(self) -> None:
        for kind, message in self.messages.items():
            if kind in self.found:
                raise DataError(message(*self.found[kind]))


def join_refusals(paths: dict[str, str], k: int) -> Refusals:
    """What joining can refuse, most basic first: duplicate query ids, query records annotated twice or never, and
    query records whose rows in a neighbours file are apart, missing or fewer than k."""
    queries, annotations = paths["queries"], paths["query_annotations"]
    return Refusals(
        {
            "duplicate": lambda n, ids: f"{queries}: {n} duplicate id(s), e.g. {ids}",
            "annotated_twice": lambda n, ids: (
                f"{annotations}: {n} query record(s) annotated more than once, e.g. {ids}"
            ),
            "not_annotated": lambda n, ids: (
                f"{annotations}: no annotation row for {n} query record(s) of {queries}, e.g. {ids}"
            ),
            **{
                f"apart_{side}": lambda n, ids, path=paths[side]: (
                    f"{path}: the rows of query {ids[0]!r} are not "
                    f"together (the kNN stage writes each query's rows "
                    f"in one run)"
                )
                for side in SIDES
            },
            **{
                f"absent_{side}": lambda n, ids, path=paths[side]: (
                    f"{path}: no neighbours for {n} query record(s), e.g. {ids}"
                )
                for side in SIDES
            },
            **{
                f"short_{side}": lambda n, ids, path=paths[side]: (
                    f"{path}: {n} query record(s) with fewer than k = {k} "
                    f"neighbour ranks, e.g. {ids} (query: ranks): search "
                    f"more neighbours (knn.k) or lower metrics.k"
                )
                for side in SIDES
            },
        }
    )


@dataclass(frozen=True)
class RunParts:
    """How a neighbours file's runs are cut into parts: part p holds runs [p·size, (p + 1)·size)."""

    n_runs: int
    size: int

    def __len__(self) -> int:
        return max(1, -(-self.n_runs // self.size))


def join_parts(
    spill: Spill, n_parts: int, run_parts: dict[str, RunParts], schemas: dict[str, dict], paths: dict[str, str], k: int
) -> np.ndarray:
    """Join each id part's query ids, annotations and runs (`join_part`); returns where each part starts in id
    order. Refuses (`join_refusals`) once every part is checked, naming the file and example ids."""
    refusals = join_refusals(paths, k)
    starts = [0]
    for part in tqdm(range(n_parts), desc="joining id parts", unit="part", mininterval=2):
        n = join_part(spill, part, starts[-1], run_parts, schemas, refusals, paths["queries"], k)
        starts.append(starts[-1] + n)
    refusals.raise_first()
    return np.array(starts)


def join_part(
    spill: Spill,
    part: int,
    first_record: int,
    run_parts: dict[str, RunParts],
    schemas: dict[str, dict],
    refusals: Refusals,
    queries: str,
    k: int,
) -> int:
    """Spill an id part's ids in order and their numbers of objects ("records"), and, per neighbours file, each
    record's run number, rank in id order and label codes to the part of its run ("truth_SIDE"); returns its
    number of records. Once anything is refused it only checks."""
    ids = spill.read("queries", part, schemas["queries"])["id"].sort()
    repeated = ids.filter(ids == ids.shift(1)).unique(maintain_order=True)
    if len(repeated):
        refusals.add("duplicate", repeated)
        return len(ids)
    index = StringIndex(ids, queries, "id")  # looked up once per annotation row and run: the bucket table
    annotated = spill.read("annotations", part, schemas["annotations"])
    position = index.positions(annotated["id"])
    times = np.bincount(position[position >= 0], minlength=len(ids))
    refusals.add("annotated_twice", ids.filter(times > 1))
    refusals.add("not_annotated", ids.filter(times == 0))
    runs = {side: part_runs(spill, part, side, index, ids, schemas["runs"], refusals, k) for side in SIDES}
    if refusals.found:
        return len(ids)  # an error follows: nothing more to prepare
    # Each query record has exactly one annotation row: the rows in id order.
    row_of = np.empty(len(ids), np.int64)
    row_of[position[position >= 0]] = np.flatnonzero(position >= 0)
    truth = annotated[row_of]
    spill.append("records", part, pl.DataFrame({"id": ids, "n_objects": truth["n_objects"]}))
    record = np.arange(first_record, first_record + len(ids))
    for side in SIDES:
        route(
            spill,
            f"truth_{side}",
            pl.DataFrame({"run": runs[side], "record": record, "labels": truth["labels"]}),
            runs[side] // run_parts[side].size,
            len(run_parts[side]),
        )
    return len(ids)


def part_runs(
    spill: Spill, part: int, side: str, index: StringIndex, ids: pl.Series, schema: dict, refusals: Refusals, k: int
) -> np.ndarray:
    """The run number of each of a part's records (in id order) in one neighbours file; refuses records whose run
    is apart, missing or has fewer than k ranks."""
    listed = spill.read(f"runs_{side}", part, schema)
    at = index.positions(listed["id"])
    times = np.bincount(at[at >= 0], minlength=len(ids))
    refusals.add(f"apart_{side}", ids.filter(times > 1))
    refusals.add(f"absent_{side}", ids.filter(times == 0))
    short = listed.filter(pl.Series(at >= 0) & (pl.col("ranks") < k)).sort("id")
    refusals.add(f"short_{side}", short.select(pl.format("{}: {}", "id", "ranks")).to_series())
    runs = np.empty(len(ids), np.int64)
    runs[at[at >= 0]] = listed["run"].to_numpy()[at >= 0]
    return runs
