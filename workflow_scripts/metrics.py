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

How it runs. Ids and labels become integers: the public ids are indexed by 64-bit hash
(`StringIndex`, looked up by a compiled probe), labels are coded in name order, and every
record's label set is a CSR row of distinct codes (`LabelSets`). Nothing is held per query
record for the whole run: the inputs come in unrelated orders (the query list, the
annotations, each neighbours file), so the stage moves their rows into parts and works on
one part at a time (`workflow_scripts.spill`: in memory while it fits a byte budget, in
files beyond):

1. The query ids are cut into id ranges of about ``part_records`` records (`RangeParts`).
   The query list, the annotations (as label codes) and each neighbours file's runs (a
   run: the neighbouring rows of one query; read from its ``query_id`` column alone) go
   to the part of their id.
2. Each part is joined by id (`join_parts`): its records get their rank in id order,
   their annotation and, per neighbours file, the number of their run. Their label codes
   go to the part of their run number.
3. Each neighbours file is walked once, in its own order, in chunks of ``batch_rows``
   rows (`score_side`); a chunk's runs find their records and label codes in the run
   parts, read in run order. One compiled (numba) pass per query scores it
   (`score_queries`: counts and nearest ranks in small per-label arrays, the ``top_n``
   cut from a histogram of counts; numba rather than numpy, which needed a dozen passes
   over (query × label) cells per chunk and was 3–5× slower). The counts go to the
   record's id part.
4. Each id part's records become the records table's rows in id order, their population
   columns and their sample-level keys (`write_tables`). The population metrics count
   each resample's recall keys, part by part, with the resamples' draws moved to the
   parts they fall in (`population_rows`), and give the very floats `win_gap` and `aucg`
   compute; the sample-level table merges the parts' sorted runs (`sample_table`).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from threading import Thread
from typing import Callable, Iterator

import numba
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from workflow_scripts.io import DataError, contract_table, parquet_stream, write_parquet
from workflow_scripts.spill import RangeParts, Spill, route

LABEL_MODES = ("all", "top_n")
SIDES = ("target", "reference")
ORDERS = {
    # order name: (sort key expression on the records table, is an oracle view)
    "distance": (pl.col("nn_score_target"), False),
    "correct": (pl.col("n_correct_target"), False),
    "gap": (pl.col("n_correct_target") - pl.col("n_correct_reference"), True),
}
# Query records per id part: what joining a part and writing its rows hold.
PART_RECORDS = 1 << 20
# Runs per run part of a neighbours file: the label codes a scoring thread holds at a time.
RUN_PART_RUNS = 1 << 18
# What the spill holds in memory before it writes files.
SPILL_BYTES = 1 << 26
# Bootstrap draws made at once.
BOOTSTRAP_VALUES = 1 << 21
# Rows of the query list and the annotations read at a time, and records written at a time (one row group each).
ANNOTATION_BATCH_ROWS = 1 << 18
RECORDS_BATCH_ROWS = 1 << 20
# Rows of all parts' sorted runs that the sample-level merge holds at once.
MERGE_ROWS = 1 << 20


# --- strings as integers ---

class StringIndex:
    """The position of each string in a list of distinct strings, found for a whole Series at once.

    Strings are compared by a 64-bit hash. With `buckets` (for lookups of every neighbour row), buckets (the top
    bits of the hash, about 2 per string) hold the first two hashes that fall in them with their positions, side by
    side in one cache line, and most strings are found with one random read; the rare third of a bucket, and
    every string without `buckets` (a smaller index, for few lookups), by a binary search of the sorted hashes.
    Distinct strings of the list never share a hash (another seed is tried if they do); a string outside the list
    is reported only if its hash differs from every listed one, which fails with probability ~|list| / 2^64.
    """

    def __init__(self, strings: pl.Series, path: str, what: str, buckets: bool = True):
        for seed in range(8):
            hashes = strings.hash(seed).to_numpy()
            order = np.argsort(hashes, kind="stable")
            sorted_hashes = hashes[order]
            clash = np.flatnonzero(sorted_hashes[1:] == sorted_hashes[:-1])
            if not len(clash):
                break
            left, right = strings.gather(order[clash]), strings.gather(order[clash + 1])
            duplicated = left.filter(left == right).unique().sort()
            if len(duplicated):
                raise DataError(f"{path}: {len(duplicated)} duplicate {what}(s), e.g. {duplicated.head(5).to_list()}")
        else:
            raise RuntimeError(f"{path}: distinct {what}s share a 64-bit hash under 8 seeds")
        self.seed, self.hashes = seed, sorted_hashes  # not the strings: an index is a few bytes per string
        self.order = order.astype(narrowest(len(order)))
        bits = max(len(hashes) - 1, 1).bit_length() + 1 if buckets else 0
        self.shift = np.uint64(64 - bits)
        # Row b: (hash, position) of the bucket's first and second string. An empty slot holds a hash of the next
        # bucket, which no string of bucket b has.
        self.slots = np.zeros((2 ** bits if buckets else 0, 4), np.uint64)
        if buckets:
            self.slots[:, 0] = self.slots[:, 2] = np.arange(1, 2 ** bits + 1, dtype=np.uint64) << self.shift
            bucket = (sorted_hashes >> self.shift).astype(np.intp)
            place = np.arange(len(bucket)) - np.searchsorted(bucket, bucket)
            for slot in range(2):
                self.slots[bucket[place == slot], 2 * slot] = sorted_hashes[place == slot]
                self.slots[bucket[place == slot], 2 * slot + 1] = order[place == slot]

    def __len__(self) -> int:
        return len(self.hashes)

    def positions(self, strings: pl.Series) -> np.ndarray:
        """int64 position of each string in the list, −1 where not listed."""
        return probe(strings.hash(self.seed).to_numpy(), self.shift, self.slots, self.hashes, self.order)


@numba.njit(nogil=True, cache=True)
def probe(hashes, shift, slots, sorted_hashes, order):  # pragma: no cover - compiled
    """StringIndex.positions of hashed strings: the bucket's two slots, else a binary search; −1 where not listed."""
    found = np.empty(len(hashes), np.int64)
    for i in range(len(hashes)):
        hash_ = hashes[i]
        bucket = np.intp(hash_ >> shift) if len(slots) else 0
        if len(slots) and slots[bucket, 0] == hash_:
            found[i] = slots[bucket, 1]
        elif len(slots) and slots[bucket, 2] == hash_:
            found[i] = slots[bucket, 3]
        else:
            at = np.searchsorted(sorted_hashes, hash_)
            found[i] = order[at] if at < len(sorted_hashes) and sorted_hashes[at] == hash_ else -1
    return found


@dataclass(frozen=True)
class LabelSets:
    """Label codes of records as CSR rows: record i holds codes[offsets[i]:offsets[i + 1]], distinct, ascending."""

    offsets: np.ndarray  # one more than records
    codes: np.ndarray


def label_values(labels: pl.Series, ids: pl.Series, path: str) -> pl.Series:
    """The labels of every record, flattened; a null list or label is an error naming the record."""
    values = labels.explode(empty_as_null=False, keep_nulls=False)
    if labels.null_count() or values.null_count():
        nulls = labels.is_null() | labels.list.eval(pl.element().is_null()).list.any()
        raise DataError(f"{path}: null labels (use an empty list for no objects) in record(s) "
                        f"{ids.filter(nulls).head(5).to_list()}")
    return values


def label_sets(labels: pl.Series, ids: pl.Series, vocabulary: StringIndex, path: str) -> LabelSets:
    """Each record's distinct label codes (labels outside the vocabulary dropped)."""
    codes = vocabulary.positions(label_values(labels, ids, path))
    record = np.repeat(np.arange(len(labels)), labels.list.len().to_numpy())
    known = codes >= 0
    keys = np.sort(record[known] * len(vocabulary) + codes[known])
    keys = keys[np.diff(keys, prepend=-1) != 0]
    counts = np.bincount(keys // max(len(vocabulary), 1), minlength=len(labels))
    # The narrowest integer types: the scoring kernel's random reads then touch fewer cache lines.
    return LabelSets(np.concatenate([[0], np.cumsum(counts)]).astype(narrowest(len(keys))),
                     (keys % max(len(vocabulary), 1)).astype(narrowest(len(vocabulary))))


def label_lists(sets: LabelSets) -> pl.Series:
    """The CSR rows as a list column (how label sets travel through the spill)."""
    # Arrow arrays by way of polars: pa.array imports pandas, ~0.4 s, to check its argument's type.
    offsets, codes = (pl.Series(array).to_arrow() for array in (sets.offsets.astype(np.int64), sets.codes))
    return pl.from_arrow(pa.LargeListArray.from_arrays(offsets, codes))


def list_label_sets(lists: pl.Series) -> LabelSets:
    """A list column of label codes as CSR rows."""
    offsets = np.zeros(len(lists) + 1, np.int64)
    np.cumsum(lists.list.len().to_numpy(), out=offsets[1:])
    return LabelSets(offsets, lists.explode(empty_as_null=False, keep_nulls=False).to_numpy())


def narrowest(bound: int) -> type:
    """The narrowest of int16, int32, int64 holding 0..bound."""
    return next(dtype for dtype in (np.int16, np.int32, np.int64) if bound <= np.iinfo(dtype).max)


@dataclass(frozen=True)
class PublicSet:
    """The public annotations as integers: ids, the label vocabulary (name order) and each record's label set."""

    ids: StringIndex
    vocabulary: pl.Series
    label_index: StringIndex
    labels: LabelSets

    @classmethod
    def from_frame(cls, frame: pl.DataFrame, path: str) -> PublicSet:
        values = label_values(frame["labels"], frame["id"], path)
        vocabulary = values.unique().sort()
        index = StringIndex(vocabulary, path, "label")
        return cls(StringIndex(frame["id"], path, "id"), vocabulary, index,
                   label_sets(frame["labels"], frame["id"], index, path))


# --- scoring a batch of queries ---

@numba.njit(nogil=True, cache=True)
def score_queries(bounds, rank, public, label_offsets, label_codes, truth_rows, truth_offsets, truth_codes, n_labels,
                  n_public, k, top_n, counts, emitted):  # pragma: no cover - compiled
    """Score queries 0..n−1, whose neighbour rows (rank, public record; ranks < k) are bounds[q]:bounds[q + 1].

    Fills counts[:, :, q] = [n_predicted, n_correct] × [all, top_n] against truth row truth_rows[q]. A public
    record listed twice by one query counts once, at its nearest rank. The top_n labels are the smallest keys (count
    descending, best rank ascending, label ascending), kept in a sorted list of top_n as the labels are met.
    If `emitted` has rows, each predicted (query, label, count, best rank, in top_n) becomes one of them; the
    number written is returned.
    """
    count = np.zeros(n_labels, np.int32)
    best = np.full(n_labels, k, np.int32)  # k: not met (ranks are < k)
    listed_by = np.full(n_public, -1, np.int32)
    touched = np.empty(n_labels + 1, np.int32)  # one spare: every label is written, the new ones kept
    widest = 0
    for q in range(len(bounds) - 1):
        widest = max(widest, bounds[q + 1] - bounds[q])
    with_count = np.zeros(widest + 2, np.int32)  # the query's labels carried by c neighbours
    row_start = np.empty(widest, np.int64)
    row_end = np.empty(widest, np.int64)
    row_again = np.empty(widest, np.bool_)
    top_keys = np.empty(max(top_n, 1), np.int64)
    n_emitted = 0
    for q in range(len(bounds) - 1):
        first = bounds[q]
        # A first pass gathers the rows' label ranges: its loads are independent of one another, so the CPU
        # overlaps their cache misses; the label loop below then finds its data in cache.
        touch = 0
        for row in range(first, bounds[q + 1]):
            p = public[row]
            start, end = label_offsets[p], label_offsets[p + 1]
            row_start[row - first], row_end[row - first] = start, end
            row_again[row - first] = listed_by[p] == q
            listed_by[p] = q
            if start < end:
                touch += label_codes[start]
        touched[n_labels] = touch  # keeps the touching loads
        n_touched = 0
        for i in range(bounds[q + 1] - first):
            r = rank[first + i]
            if not row_again[i]:
                for j in range(row_start[i], row_end[i]):  # branch-free: this loop is the hot one
                    label = label_codes[j]
                    c = count[label]
                    touched[n_touched] = label
                    n_touched += c == 0
                    count[label] = c + 1
                    best[label] = min(best[label], r)
            else:  # listed again: only a nearer rank matters
                for j in range(row_start[i], row_end[i]):
                    best[label_codes[j]] = min(best[label_codes[j]], r)
        # The top_n-th label's count (from a histogram of counts) bounds the candidates for the sorted top_n list.
        for i in range(n_touched):
            with_count[count[touched[i]]] += 1
        cut_count, above = widest + 1, 0
        while cut_count > 1 and above + with_count[cut_count] < top_n:
            above += with_count[cut_count]
            cut_count -= 1
        # Key: smaller is better; counts never exceed the query's rows.
        most = bounds[q + 1] - bounds[q] + 1
        filled = 0
        for i in range(n_touched):
            label = touched[i]
            if count[label] < cut_count:
                continue
            key = ((most - count[label]) * (k + 1) + best[label]) * n_labels + label
            if filled < top_n or key < top_keys[filled - 1]:
                at = min(filled, top_n - 1)
                while at > 0 and top_keys[at - 1] > key:
                    top_keys[at] = top_keys[at - 1]
                    at -= 1
                top_keys[at] = key
                filled = min(filled + 1, top_n)
        cut = top_keys[filled - 1] if filled > 0 else -1
        correct = 0
        correct_top = 0
        for j in range(truth_offsets[truth_rows[q]], truth_offsets[truth_rows[q] + 1]):
            label = truth_codes[j]
            if count[label] > 0:
                correct += 1
                if ((most - count[label]) * (k + 1) + best[label]) * n_labels + label <= cut:
                    correct_top += 1
        counts[0, 0, q] = n_touched
        counts[0, 1, q] = filled
        counts[1, 0, q] = correct
        counts[1, 1, q] = correct_top
        for i in range(n_touched):
            label = touched[i]
            if len(emitted):
                key = ((most - count[label]) * (k + 1) + best[label]) * n_labels + label
                emitted[n_emitted, 0] = q
                emitted[n_emitted, 1] = label
                emitted[n_emitted, 2] = count[label]
                emitted[n_emitted, 3] = best[label]
                emitted[n_emitted, 4] = key <= cut
                n_emitted += 1
            with_count[count[label]] = 0
            count[label] = 0
            best[label] = k
    return n_emitted


def query_scores(bounds: np.ndarray, rank: np.ndarray, public_row: np.ndarray, truth_rows: np.ndarray,
                 public: PublicSet, truth: LabelSets, k: int, top_n: int,
                 emit: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """score_queries over queries 0..len(truth_rows)−1, query q's rows bounds[q]:bounds[q + 1]: counts [2, 2, queries]
    and, if `emit`, the predicted (query, label, count, best rank, in top_n) rows."""
    counts = np.zeros((2, 2, len(truth_rows)), np.int32)
    size = int(np.diff(public.labels.offsets)[public_row].sum()) if emit else 0
    emitted = np.zeros((size, 5), np.int64)
    n = score_queries(bounds, rank, public_row.astype(narrowest(len(public.ids)), copy=False),
                      public.labels.offsets, public.labels.codes, truth_rows, truth.offsets, truth.codes,
                      len(public.vocabulary), len(public.ids), k, top_n, counts, emitted)
    return counts, emitted[:n]


@numba.njit(nogil=True, cache=True)
def select_rows(run_start, listed, rank, k, row_public, public_row, kept_rank):  # pragma: no cover - compiled
    """The rows of rank < k of the listed runs (runs of queries of the query list) in one pass.

    Writes each kept row's public record (row_public: of every row, −1 where not a public id) and rank into
    public_row and kept_rank; returns the kept rows' bounds per listed run and the rank-0 row of each listed run
    (−1 if none; the last if several).
    """
    n_rows = len(rank)
    n_listed = 0
    for j in range(len(run_start)):
        n_listed += listed[j]
    bounds = np.zeros(n_listed + 1, np.int64)
    nearest = np.full(n_listed, -1, np.int64)
    kept, at = 0, 0
    for j in range(len(run_start)):
        if not listed[j]:
            continue
        for row in range(run_start[j], run_start[j + 1] if j + 1 < len(run_start) else n_rows):
            if rank[row] < k:
                public_row[kept] = row_public[row]
                kept_rank[kept] = rank[row]
                if rank[row] == 0:
                    nearest[at] = row
                kept += 1
        at += 1
        bounds[at] = kept
    return bounds, nearest


def score_chunk(rows: pl.DataFrame, run_start: np.ndarray, listed_runs: np.ndarray, truth_rows: np.ndarray,
                truth: LabelSets, public: PublicSet, k: int, top_n: int, path: str) -> tuple[np.ndarray, np.ndarray]:
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
    public_row, kept_rank = public_row[:bounds[-1]], kept_rank[:bounds[-1]]
    if (public_row < 0).any():
        used = np.repeat(listed, np.diff(run_start, append=len(rows))) & (rank < k)
        unknown = rows["public_id"].filter(used & (row_public < 0)).unique().sort()
        raise DataError(f"{path}: {len(unknown)} public id(s) without a public annotation row, "
                        f"e.g. {unknown.head(5).to_list()}")
    nn_score = np.full(len(listed_runs), np.nan, np.float32)
    met = nearest >= 0
    nn_score[met] = rows["score"].gather(nearest[met]).to_numpy()
    return query_scores(bounds, kept_rank, public_row, truth_rows, public, truth, k, top_n)[0], nn_score


# --- reading the inputs ---

COLUMN_TYPES = {"str": lambda dtype: dtype == pl.String, "list<str>": lambda dtype: dtype == pl.List(pl.String),
                "integer": lambda dtype: dtype.is_integer(), "float": lambda dtype: dtype.is_float()}
NEIGHBOR_COLUMNS = {"query_id": "str", "rank": "integer", "public_id": "str", "score": "float"}
ANNOTATION_COLUMNS = {"id": "str", "labels": "list<str>"}


def scan_checked(path: str, columns: dict[str, str]) -> pl.LazyFrame:
    """A lazy view of `columns` of a Parquet file, their presence and types (keys of COLUMN_TYPES) checked."""
    if not Path(path).exists():
        raise DataError(f"{path}: file does not exist")
    try:
        schema = pl.scan_parquet(path).collect_schema()
    except Exception as error:  # polars raises many types for files that are not Parquet
        raise DataError(f"{path}: not a readable Parquet file ({error})") from error
    missing = [name for name in columns if name not in schema]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; found {schema.names()}")
    wrong = [f"'{name}' is {schema[name]}, not {kind}" for name, kind in columns.items()
             if not COLUMN_TYPES[kind](schema[name])]
    if wrong:
        raise DataError(f"{path}: column(s) of the wrong type: {'; '.join(wrong)}")
    return pl.scan_parquet(path).select(list(columns))


def count_queries(path: str) -> int:
    n = scan_checked(path, {"id": "str"}).select(pl.len()).collect().item()
    if not n:
        raise DataError(f"{path}: no query records (an empty split): there is nothing to measure")
    return n


def query_batches(path: str) -> Iterator[pl.Series]:
    for batch in scan_checked(path, {"id": "str"}).collect_batches(chunk_size=ANNOTATION_BATCH_ROWS):
        yield batch["id"]


def read_public(path: str) -> PublicSet:
    return PublicSet.from_frame(scan_checked(path, ANNOTATION_COLUMNS).collect(), path)


def check_ranks(path: str, k: int) -> None:
    """The neighbour lists reach rank k − 1 and no rank is negative."""
    low, high = pl.scan_parquet(path).select(low=pl.col("rank").min(), high=pl.col("rank").max()).collect().row(0)
    if high is None or high + 1 < k:
        raise DataError(f"{path}: neighbour lists stop at {0 if high is None else high + 1} rank(s), fewer than "
                        f"k = {k}: search more neighbours (knn.k) or lower metrics.k")
    if low < 0:
        raise DataError(f"{path}: negative rank {low}")


def run_starts(query_ids: pl.Series) -> np.ndarray:
    """The first row of each run of equal query ids, comparing neighbouring rows' 64-bit hashes.

    Two different neighbouring ids that shared a hash would make one run: the second query would then read
    as having no neighbours, an error, never a silent number.
    """
    hashes = query_ids.hash(0).to_numpy()
    return np.flatnonzero(np.concatenate([[True], hashes[1:] != hashes[:-1]])) if len(hashes) else np.zeros(0, int)


def run_chunks(path: str, columns: list[str], batch_rows: int, desc: str) -> Iterator[tuple[pl.DataFrame, np.ndarray,
                                                                                             int]]:
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


# --- 1. the inputs into id parts ---

def spill_schemas(codes: type) -> dict[str, dict]:
    """The columns of each spilled table (label codes of type `codes`), for parts that received nothing."""
    labels = pl.List(pl.Series(np.zeros(0, codes)).dtype)
    return {"queries": {"id": pl.String},
            "annotations": {"id": pl.String, "n_objects": pl.UInt32, "labels": labels},
            "runs": {"id": pl.String, "run": pl.Int64},
            "records": {"id": pl.String, "n_objects": pl.UInt32},
            "truth": {"run": pl.Int64, "record": pl.Int64, "labels": labels}}


def route_queries(path: str, parts: RangeParts, spill: Spill) -> None:
    for ids in query_batches(path):
        route(spill, "queries", ids.to_frame("id"), parts.of(ids), len(parts))


def route_annotations(path: str, public: PublicSet, parts: RangeParts, spill: Spill) -> None:
    """Every annotation row as (id, number of distinct objects, label codes), to the part of its id."""
    for batch in scan_checked(path, ANNOTATION_COLUMNS).collect_batches(chunk_size=ANNOTATION_BATCH_ROWS):
        frame = pl.DataFrame({"id": batch["id"], "n_objects": batch["labels"].list.n_unique(),
                              "labels": label_lists(label_sets(batch["labels"], batch["id"], public.label_index, path))})
        route(spill, "annotations", frame, parts.of(batch["id"]), len(parts))


def route_runs(path: str, side: str, parts: RangeParts, spill: Spill, batch_rows: int) -> int:
    """Every run of a neighbours file as (query id, run number), to the part of its id; returns the number of runs."""
    n_runs = 0
    for rows, run_start, first_run in run_chunks(path, ["query_id"], batch_rows, f"runs of {Path(path).name}"):
        ids = rows["query_id"].gather(run_start)
        n_runs = first_run + len(run_start)
        route(spill, f"runs_{side}", pl.DataFrame({"id": ids, "run": np.arange(first_run, n_runs)}), parts.of(ids),
              len(parts))
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


@dataclass(frozen=True)
class RunParts:
    """How a neighbours file's runs are cut into parts: part p holds runs [p·size, (p + 1)·size)."""

    n_runs: int
    size: int

    def __len__(self) -> int:
        return max(1, -(-self.n_runs // self.size))


def join_parts(spill: Spill, n_parts: int, run_parts: dict[str, RunParts], schemas: dict[str, dict],
               paths: dict[str, str]) -> np.ndarray:
    """Join each id part's query ids, annotations and runs; returns where each part starts in id order.

    Spills per part its ids in order and their numbers of objects ("records"), and, per neighbours file, each
    record's run number, rank in id order and label codes to the part of its run ("truth_SIDE"). Refuses, naming
    the file and example ids: duplicate query ids, query records annotated twice or never, and query records whose
    rows in a neighbours file are apart or missing.
    """
    queries, annotations = paths["queries"], paths["query_annotations"]
    refusals = Refusals({
        "duplicate": lambda n, ids: f"{queries}: {n} duplicate id(s), e.g. {ids}",
        "annotated_twice": lambda n, ids: f"{annotations}: {n} query record(s) annotated more than once, e.g. {ids}",
        "not_annotated": lambda n, ids: f"{annotations}: no annotation row for {n} query record(s) of {queries}, "
                                        f"e.g. {ids}",
        **{f"apart_{side}": lambda n, ids, path=paths[side]: f"{path}: the rows of query {ids[0]!r} are not "
                                                              f"together (the kNN stage writes each query's rows "
                                                              f"in one run)" for side in SIDES},
        **{f"absent_{side}": lambda n, ids, path=paths[side]: f"{path}: no neighbours for {n} query record(s), "
                                                               f"e.g. {ids}" for side in SIDES}})
    starts = [0]
    for part in tqdm(range(n_parts), desc="joining id parts", unit="part", mininterval=2):
        ids = spill.read("queries", part, schemas["queries"])["id"].sort()
        repeated = ids.filter(ids == ids.shift(1)).unique(maintain_order=True)
        if len(repeated):
            refusals.add("duplicate", repeated)
            continue
        index = StringIndex(ids, queries, "id")  # looked up once per annotation row and run: the bucket table
        annotated = spill.read("annotations", part, schemas["annotations"])
        position = index.positions(annotated["id"])
        times = np.bincount(position[position >= 0], minlength=len(ids))
        refusals.add("annotated_twice", ids.filter(times > 1))
        refusals.add("not_annotated", ids.filter(times == 0))
        runs = {}
        for side in SIDES:
            listed = spill.read(f"runs_{side}", part, schemas["runs"])
            at = index.positions(listed["id"])
            times = np.bincount(at[at >= 0], minlength=len(ids))
            refusals.add(f"apart_{side}", ids.filter(times > 1))
            refusals.add(f"absent_{side}", ids.filter(times == 0))
            runs[side] = np.empty(len(ids), np.int64)
            runs[side][at[at >= 0]] = listed["run"].to_numpy()[at >= 0]
        if refusals.found:
            continue  # an error follows: nothing more to prepare
        # Each query record has exactly one annotation row: the rows in id order.
        row_of = np.empty(len(ids), np.int64)
        row_of[position[position >= 0]] = np.flatnonzero(position >= 0)
        truth = annotated[row_of]
        spill.append("records", part, pl.DataFrame({"id": ids, "n_objects": truth["n_objects"]}))
        record = np.arange(starts[-1], starts[-1] + len(ids))
        for side in SIDES:
            route(spill, f"truth_{side}", pl.DataFrame({"run": runs[side], "record": record, "labels": truth["labels"]}),
                  runs[side] // run_parts[side].size, len(run_parts[side]))
        starts.append(starts[-1] + len(ids))
    refusals.raise_first()
    return np.array(starts)


# --- 3. each neighbours file scored ---

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


def score_side(path: str, side: str, public: PublicSet, spill: Spill, run_parts: RunParts, truth_schema: dict,
               starts: np.ndarray, k: int, top_n: int, batch_rows: int) -> None:
    """Score a neighbours file's query records, chunk by chunk; spill their counts and nearest score
    ("scores_SIDE": record, COUNT_COLUMNS, nn_score) to the part of their record."""
    truth = RunTruth(spill, side, run_parts, truth_schema)
    counts_type = narrowest(len(public.vocabulary))
    for rows, run_start, first_run in run_chunks(path, list(NEIGHBOR_COLUMNS), batch_rows,
                                                 f"metrics {Path(path).name}"):
        listed = truth.take(first_run + len(run_start))
        if not len(listed):
            continue
        counts, nn_score = score_chunk(rows, run_start, listed["run"].to_numpy() - first_run,
                                       np.arange(len(listed)), list_label_sets(listed["labels"]), public, k, top_n,
                                       path)
        record = listed["record"].to_numpy()
        scores = pl.DataFrame({"record": record, **dict(zip(COUNT_COLUMNS, counts.reshape(4, -1).astype(counts_type))),
                               "nn_score": nn_score})
        route(spill, f"scores_{side}", scores, np.searchsorted(starts, record, side="right") - 1, len(starts) - 1)


# --- tables ---

@dataclass
class SideScores:
    """One model's per-record counts, records on the last axis."""

    counts: np.ndarray  # [n_predicted, n_correct] × [all, top_n] × records, at most n_labels: narrowest integers
    nn_score: np.ndarray  # float32: score of the rank-0 neighbour, NaN where a record has none

    @classmethod
    def empty(cls, n_records: int, n_labels: int) -> SideScores:
        return cls(np.zeros((2, 2, n_records), narrowest(n_labels)), np.full(n_records, np.nan, np.float32))


def scores_frame(ids: pl.Series, n_objects: np.ndarray, scores: SideScores, mode: int,
                 suffix: str = "") -> pl.LazyFrame:
    """n_predicted, n_correct, precision, recall, f1, nn_score of one model and label mode for the records `ids`
    (the order of `n_objects` and `scores`)."""
    frame = pl.DataFrame({"n_objects": n_objects, "n_predicted": scores.counts[0, mode],
                          "n_correct": scores.counts[1, mode], "nn_score": scores.nn_score},
                         schema={"n_objects": pl.Int32, "n_predicted": pl.Int32, "n_correct": pl.Int32,
                                 "nn_score": pl.Float32}).lazy().with_columns(pl.col("nn_score").fill_nan(None))
    precision = pl.when(pl.col("n_predicted") > 0).then(pl.col("n_correct") / pl.col("n_predicted")).otherwise(0.0)
    recall = pl.when(pl.col("n_objects") > 0).then(pl.col("n_correct") / pl.col("n_objects"))
    frame = frame.with_columns(precision=precision, recall=recall)
    f1 = pl.when(pl.col("precision") + pl.col("recall") > 0) \
        .then(2 * pl.col("precision") * pl.col("recall") / (pl.col("precision") + pl.col("recall"))).otherwise(0.0)
    frame = frame.with_columns(f1=pl.when(pl.col("recall").is_not_null()).then(f1))
    values = ["n_predicted", "n_correct", "precision", "recall", "f1", "nn_score"]
    return frame.select(id=ids, label_mode=pl.lit(LABEL_MODES[mode]), n_objects="n_objects",
                        **{f"{name}{suffix}": name for name in values})


def records_frame(ids: pl.Series, n_objects: np.ndarray, sides: dict[str, SideScores], mode: int) -> pl.LazyFrame:
    """Both models' scores side by side (suffixes _target, _reference) of one label mode's records `ids`; lazy, so
    a reader computes only the columns it selects."""
    target, reference = (scores_frame(ids, n_objects, sides[side], mode, f"_{side}") for side in SIDES)
    return pl.concat([target, reference.drop("id", "label_mode", "n_objects")], how="horizontal")


def frame_scores(neighbors: pl.DataFrame, public: PublicSet, query_ids: pl.Series, truth: LabelSets, k: int,
                 top_n: int) -> SideScores:
    """Scores of an in-memory neighbours frame (any row order)."""
    scores = SideScores.empty(len(query_ids), len(public.vocabulary))
    rows = neighbors.filter(pl.col("query_id").is_in(query_ids.implode())).sort("query_id", "rank")
    run_start = run_starts(rows["query_id"])
    position = StringIndex(query_ids, "queries", "id", buckets=False).positions(rows["query_id"].gather(run_start))
    scores.counts[:, :, position], scores.nn_score[position] = score_chunk(
        rows, run_start, np.arange(len(run_start)), position, truth, public, k, top_n, "neighbors")
    return scores


def record_scores(neighbors: pl.LazyFrame, public_annotations: pl.LazyFrame, truth: pl.LazyFrame,
                  k: int, top_n: int) -> pl.LazyFrame:
    """One row per (query id, label mode) of in-memory frames: n_objects, n_predicted, n_correct, precision, recall,
    f1, nn_score. `truth` holds (id, labels) for exactly the query records."""
    public = PublicSet.from_frame(public_annotations.collect(), "public annotations")
    truth = truth.collect()
    sets = label_sets(truth["labels"], truth["id"], public.label_index, "truth")
    scores = frame_scores(neighbors.collect(), public, truth["id"], sets, k, top_n)
    n_objects = truth["labels"].list.n_unique().to_numpy().astype(np.int32)
    return pl.concat([scores_frame(truth["id"], n_objects, scores, mode) for mode in range(len(LABEL_MODES))])


def predicted_labels(neighbors: pl.LazyFrame, public_annotations: pl.LazyFrame, k: int, top_n: int) -> pl.LazyFrame:
    """(query_id, label, label_mode) rows: the objects each query's k neighbours predict, in both modes, each
    query's labels in ranking order."""
    public = PublicSet.from_frame(public_annotations.collect(), "public annotations")
    rows = neighbors.filter(pl.col("rank") < k).collect().sort("query_id", "rank")
    query_ids = rows["query_id"].unique(maintain_order=True)
    no_truth = LabelSets(np.zeros(2, np.int64), np.zeros(0, np.int64))  # one empty row for every query
    batch_query = rows["query_id"].rle_id().to_numpy()  # the rows are sorted by query id
    _, emitted = query_scores(np.searchsorted(batch_query, np.arange(len(query_ids) + 1)),
                              rows["rank"].to_numpy(), public.ids.positions(rows["public_id"]),
                              np.zeros(len(query_ids), np.int64), public, no_truth, k, top_n, emit=True)
    query, label, count, best_rank, top = emitted.T
    labels = pl.DataFrame({"query_id": query_ids.gather(query), "label": public.vocabulary.gather(label),
                           "count": count, "best_rank": best_rank, "top": top.astype(bool)}) \
        .sort(["query_id", "count", "best_rank", "label"], descending=[False, True, False, False])
    return pl.concat([labels.select("query_id", "label", label_mode=pl.lit("all")),
                      labels.filter("top").select("query_id", "label", label_mode=pl.lit("top_n"))]).lazy()


# --- population gaps: arrays with records on the last axis, any leading batch axes (bootstrap) ---

def win_gap(target: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """(#{target > reference} − #{target < reference}) / n: PPG for precisions, PRG for recalls."""
    return np.sign(target - reference).mean(axis=-1)


def aucg(recall_target: np.ndarray, recall_reference: np.ndarray) -> np.ndarray:
    """Exact signed area ∫₀¹ (F_reference − F_target) between the empirical recall CDFs: the definition, which
    `resampled_metrics` computes without sorting."""
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


WIN_GAPS = {"PPG": "precision", "PRG": "recall", "PFG": "f1"}  # win-gap metric: the score it compares
POPULATION_METRICS = (*WIN_GAPS, "AUCG")


# A record's population inputs in one int64: its three score differences' signs as a base-3 code (5 bits), then
# each model's recall key (KEY_BITS bits each).
KEY_BITS = 24
SIGNS_OF_CODE = np.array([[code // 3 ** m % 3 - 1 for m in range(len(WIN_GAPS))] for code in range(3 ** len(WIN_GAPS))])


@numba.njit(nogil=True, cache=True)
def count_draws(resample, record, packed, sign_counts, n_target, n_reference):  # pragma: no cover - compiled
    """Add draw i (record[i] of resample resample[i]) to its resample's counts of sign codes and, per model, of
    recall keys; a record's inputs are one int64 of `packed` (one memory read per draw)."""
    key_mask = (1 << KEY_BITS) - 1
    for i in range(len(record)):
        b, inputs = resample[i], packed[record[i]]
        sign_counts[b, inputs & 31] += 1
        n_target[b, (inputs >> 5) & key_mask] += 1
        n_reference[b, inputs >> (5 + KEY_BITS)] += 1


@numba.njit(nogil=True, cache=True)
def block_sum(block):  # pragma: no cover - compiled
    """numpy's sum of at most 128 float64s (pairwise_sum's leaf): eight interleaved accumulators, then the rest."""
    n = len(block)
    if n < 8:
        total = 0.0
        for i in range(n):
            total += block[i]
        return total
    partial = block[:8].copy()
    i = 8
    while i < n - n % 8:
        for j in range(8):
            partial[j] += block[i + j]
        i += 8
    total = ((partial[0] + partial[1]) + (partial[2] + partial[3])) + ((partial[4] + partial[5]) +
                                                                       (partial[6] + partial[7]))
    while i < n:
        total += block[i]
        i += 1
    return total


@numba.njit(nogil=True, cache=True)
def sparse_pairwise_sum(positions, values, n):  # pragma: no cover - compiled
    """numpy's pairwise sum of n terms that are zero but for `values` at `positions` (ascending): the same halving
    into blocks of at most 128, each block summed as numpy does. A zero term changes no partial sum but a zero's
    sign, which the reduction's initial +0.0 clears at the end. Iterative (numba's cache cannot load recursive
    functions): a stack of the halves still to sum, and of the sums of the halves done."""
    first_of = np.empty(128, np.int64)
    n_of = np.empty(128, np.int64)
    stage = np.empty(128, np.int64)  # 0: not started, 1: left half summed, 2: both halves summed
    sums = np.empty(128)
    depth, n_sums = 1, 0
    first_of[0], n_of[0], stage[0] = 0, n, 0
    while depth:
        first, size = first_of[depth - 1], n_of[depth - 1]
        half = size // 2
        half -= half % 8
        if stage[depth - 1] == 0:
            at = np.searchsorted(positions, first)
            if at == len(positions) or positions[at] >= first + size or size <= 128:
                block = np.zeros(size if size <= 128 else 0)
                while size <= 128 and at < len(positions) and positions[at] < first + size:
                    block[positions[at] - first] = values[at]
                    at += 1
                sums[n_sums] = block_sum(block)
                n_sums += 1
                depth -= 1
            else:
                stage[depth - 1] = 1
                first_of[depth], n_of[depth], stage[depth] = first, half, 0
                depth += 1
        elif stage[depth - 1] == 1:
            stage[depth - 1] = 2
            first_of[depth], n_of[depth], stage[depth] = first + half, size - half, 0
            depth += 1
        else:
            sums[n_sums - 2] = sums[n_sums - 2] + sums[n_sums - 1]
            n_sums -= 1
            depth -= 1
    return sums[0]


@numba.njit(nogil=True, cache=True)
def counted_aucg(n_target, n_reference, distinct, size, out):  # pragma: no cover - compiled
    """out[b] = `aucg` of resample b (`size` records), given how many of its records have each recall key per model.

    aucg stably sorts the pooled recalls (target first): key by key, ascending, the target's records, then the
    reference's, each moving the CDF gap by a jump. Its terms are gap × width to the next value: 0 inside a key,
    and for the last record of a key the width to the next key met (1 after the last). So the running gap is
    summed jump by jump as aucg's cumsum does, and numpy's pairwise sum of the 2·size terms taken over the non-zero
    ones (`sparse_pairwise_sum`): the very float, without an array of 2·size terms.
    """
    target_jump, reference_jump = -1.0 / size, 1.0 / size
    positions = np.empty(len(distinct), np.int64)
    values = np.empty(len(distinct))
    for b in range(n_target.shape[0]):
        cdf_gap, at, n_terms, key = 0.0, 0, 0, 0
        while key < len(distinct):
            if n_target[b, key] + n_reference[b, key] == 0:
                key += 1
                continue
            for _ in range(n_target[b, key]):
                cdf_gap += target_jump
            for _ in range(n_reference[b, key]):
                cdf_gap += reference_jump
            at += n_target[b, key] + n_reference[b, key]
            following = key + 1
            while following < len(distinct) and n_target[b, following] + n_reference[b, following] == 0:
                following += 1
            next_value = distinct[following] if following < len(distinct) else 1.0
            positions[n_terms] = at - 1
            values[n_terms] = cdf_gap * (next_value - distinct[key])
            n_terms += 1
            key = following
        out[b] = 0.0 + sparse_pairwise_sum(positions[:n_terms], values[:n_terms], at)


@dataclass
class ResampleCounts:
    """Per resample: how many records have each sign code and, per model, each recall key."""

    sign_counts: np.ndarray  # [resamples, sign codes]
    n_target: np.ndarray  # [resamples, distinct recalls]
    n_reference: np.ndarray

    @classmethod
    def zeros(cls, n_resamples: int, n_distinct: int) -> ResampleCounts:
        return cls(np.zeros((n_resamples, len(SIGNS_OF_CODE)), np.int64), *np.zeros((2, n_resamples, n_distinct),
                                                                                   np.int64))

    def metrics(self, distinct: np.ndarray, size: int) -> dict[str, np.ndarray]:
        """The population metrics of resamples of `size` records; the win gaps' sums of signs are exact integers,
        so dividing them equals numpy's mean of the signs."""
        win_sums = self.sign_counts @ SIGNS_OF_CODE
        aucgs = np.empty(len(win_sums))
        counted_aucg(self.n_target, self.n_reference, distinct, size, aucgs)
        return {**{metric: win_sums[:, column] / size for column, metric in enumerate(WIN_GAPS)}, "AUCG": aucgs}


def population_columns(mode_records: pl.DataFrame | pl.LazyFrame) -> pl.DataFrame:
    """What the population metrics read of one label mode's records with objects (records table columns): the
    signs of the three scores' differences (int8) and both recalls."""
    return mode_records.lazy().filter(pl.col("n_objects") > 0).select(
        *[(pl.col(f"{score}_target") - pl.col(f"{score}_reference")).sign().cast(pl.Int8).alias(score)
          for score in WIN_GAPS.values()],
        *[f"recall_{side}" for side in SIDES]).collect()


def distinct_recalls(columns: pl.DataFrame) -> np.ndarray:
    return np.unique(np.concatenate([np.unique(columns[f"recall_{side}"].to_numpy()) for side in SIDES]))


@dataclass(frozen=True)
class ResampleInputs:
    """What the population metrics read of each record with objects, packed in one int64 (`count_draws`): the
    signs of the three win gaps' differences and the recalls' keys, their ranks among the distinct recalls
    (`distinct`, ascending). Eight bytes per record instead of six float columns."""

    packed: np.ndarray
    distinct: np.ndarray

    @classmethod
    def keyed(cls, columns: pl.DataFrame, distinct: np.ndarray) -> ResampleInputs:
        """Of `population_columns`, the recalls keyed among `distinct` (which holds them all)."""
        if len(distinct) > 1 << KEY_BITS:
            raise ValueError(f"{len(distinct)} distinct recalls: the population metrics key at most 2^{KEY_BITS}")
        packed = sum((columns[score].to_numpy().astype(np.int64) + 1) * 3 ** m
                     for m, score in enumerate(WIN_GAPS.values()))
        for shift, side in zip((5, 5 + KEY_BITS), SIDES):
            packed |= np.searchsorted(distinct, columns[f"recall_{side}"].to_numpy()).astype(np.int64) << shift
        return cls(np.asarray(packed, np.int64), distinct)

    @classmethod
    def from_records(cls, mode_records: pl.DataFrame | pl.LazyFrame) -> ResampleInputs:
        """Of one label mode's records (the records table's columns), those with objects."""
        columns = population_columns(mode_records)
        return cls.keyed(columns, distinct_recalls(columns))

    def __len__(self) -> int:
        return len(self.packed)

    def count(self, counts: ResampleCounts, resample: np.ndarray, record: np.ndarray) -> None:
        count_draws(resample, record, self.packed, counts.sign_counts, counts.n_target, counts.n_reference)


def n_excluded(mode_records: pl.DataFrame | pl.LazyFrame) -> int:
    """Records without objects: they have no recall."""
    return mode_records.lazy().select((pl.col("n_objects") == 0).sum()).collect().item()


def resampled_metrics(inputs: ResampleInputs, resample: np.ndarray) -> dict[str, np.ndarray]:
    """The population metrics of each resample (a row of record indices), equal to the last bit to `win_gap` and
    `aucg` of the resampled score columns, without gathering any column (`count_draws`, `counted_aucg`)."""
    counts = ResampleCounts.zeros(len(resample), len(inputs.distinct))
    inputs.count(counts, np.repeat(np.arange(len(resample)), resample.shape[1]), resample.reshape(-1))
    return counts.metrics(inputs.distinct, resample.shape[1])


def population_metrics(records: pl.DataFrame, n_boot: int, frac: float, seed: int) -> pl.DataFrame:
    """Rows (label_mode, metric, value, mean, std, n_boot, frac, n_records, n_excluded) of an in-memory records
    table."""
    rng = np.random.default_rng(seed)
    spill = Spill(None)
    rows = []
    for label_mode in LABEL_MODES:
        mode_records = records.filter(pl.col("label_mode") == label_mode)
        columns = population_columns(mode_records)
        spill.append(f"population_{label_mode}", 0, columns)
        rows += population_rows(spill, label_mode, np.array([len(columns)]), distinct_recalls(columns),
                                n_excluded(mode_records), n_boot, frac, rng)
    return pl.DataFrame(rows)


def population_rows(spill: Spill, label_mode: str, part_sizes: np.ndarray, distinct: np.ndarray, excluded: int,
                    n_boot: int, frac: float, rng: np.random.Generator) -> list[dict]:
    """population_metrics' rows of one label mode whose `population_columns` lie in the spill part by part
    ("population_MODE", part_sizes[p] records in part p, their recalls among `distinct`): each metric on all records
    (NaN without records) and over `n_boot` resamples drawn with `rng` (the draws of all modes are one stream).

    The resamples' record indices are drawn BOOTSTRAP_VALUES at a time (numpy's integers give the same stream
    whatever the grouping) and each goes to the part it falls in; each part then counts its draws into every
    resample's counts. Memory follows the part and the counts, not the records or the resamples' size.
    """
    n = int(part_sizes.sum())
    starts = np.concatenate([[0], np.cumsum(part_sizes)])
    size = max(1, round(frac * n))
    n_draws = n_boot * size if n else 0
    resample_type, record_type = narrowest(max(n_boot, 1)), narrowest(int(part_sizes.max(initial=0)))
    for first in range(0, n_draws, BOOTSTRAP_VALUES):
        record = rng.integers(0, n, size=min(BOOTSTRAP_VALUES, n_draws - first))
        part = np.zeros(0, np.int64)  # one part: no lookup (route reads no parts), no offset
        if len(part_sizes) > 1:
            part = np.searchsorted(starts, record, side="right") - 1
            record -= starts[part]
        route(spill, f"draws_{label_mode}", pl.DataFrame({
            "resample": ((first + np.arange(len(record))) // size).astype(resample_type),
            "record": record.astype(record_type)}), part, len(part_sizes))
    every, resampled = ResampleCounts.zeros(1, len(distinct)), ResampleCounts.zeros(n_boot, len(distinct))
    columns_schema = {**{score: pl.Int8 for score in WIN_GAPS.values()}, **{f"recall_{side}": pl.Float64
                                                                           for side in SIDES}}
    for part in range(len(part_sizes)):
        inputs = ResampleInputs.keyed(spill.read(f"population_{label_mode}", part, columns_schema), distinct)
        inputs.count(every, np.zeros(len(inputs), np.int8), np.arange(len(inputs)))
        for draws in spill.frames(f"draws_{label_mode}", part):
            inputs.count(resampled, draws["resample"].to_numpy(), draws["record"].to_numpy())
    values = every.metrics(distinct, n) if n else {}
    boot = resampled.metrics(distinct, size) if n and n_boot else {}
    return [{"label_mode": label_mode, "metric": metric,
             "value": float(values[metric][0]) if n else float("nan"),
             "mean": float(boot[metric].mean()) if boot else float("nan"),
             "std": float(boot[metric].std(ddof=1)) if boot and n_boot > 1 else float("nan"),
             "n_boot": n_boot, "frac": frac, "n_records": n, "n_excluded": excluded}
            for metric in POPULATION_METRICS]


# --- sample level ---

GAP_COLUMNS = [f"{metric}_gap" for metric in WIN_GAPS.values()]


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
    scored = mode_records.lazy().filter(pl.col("n_objects") > 0).select(
        record=record, **{f"{order}_key": key for order, (key, _) in ORDERS.items()},
        **{f"{metric}_gap": pl.col(f"{metric}_target") - pl.col(f"{metric}_reference")
           for metric in WIN_GAPS.values()}).collect()
    runs = {}
    for order in ORDERS:
        key = order_key(scored[f"{order}_key"].to_numpy(), scored["record"].to_numpy().astype(np.int64))
        ranked = np.argsort(key)
        runs[order] = scored.select(GAP_COLUMNS)[ranked].with_columns(key=pl.Series(key[ranked]))
    return runs


@numba.njit(nogil=True, cache=True)
def running_sums(gaps, sums, state, cutoffs, at_cutoffs):  # pragma: no cover - compiled
    """Add each row of `gaps` ([rows, 3], in order) to `sums`, one at a time (as a cumulative sum does); after the
    L-th row overall (state: [rows added, next cutoff]) of each L in `cutoffs` (ascending), copy the sums."""
    for i in range(gaps.shape[0]):
        for m in range(gaps.shape[1]):
            sums[m] += gaps[i, m]
        state[0] += 1
        while state[1] < len(cutoffs) and cutoffs[state[1]] == state[0]:
            at_cutoffs[state[1]] = sums
            state[1] += 1


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
    cutoffs = sorted({l for l in top_l if 0 < l < n} | ({n} if n else set()))
    index = pl.Series(cutoffs, dtype=pl.Int64) - 1
    frames = []
    for order, (_, oracle) in ORDERS.items():
        sums = merged_sums(runs[order], np.array(cutoffs, np.int64))
        frames.append(pl.DataFrame({
            "order": [order] * len(cutoffs),
            "oracle": [oracle] * len(cutoffs),
            "top_l": cutoffs,
            **{column: pl.Series(sums[:, m]) / (index + 1) for m, column in enumerate(GAP_COLUMNS)},
        }, schema_overrides={"top_l": pl.Int64}))
    return pl.concat(frames)


def sample_level(records: pl.DataFrame | pl.LazyFrame, top_l: list[int], label_mode: str = "top_n") -> pl.DataFrame:
    """Mean precision/recall/F1 gaps (target − reference) over the top-L records of each order.

    Orders put the most suspicious records first: ``distance`` by the target
    model's nearest-neighbour similarity, ``correct`` by the objects the target
    model got right, ``gap`` (an oracle view that peeks at the reference model)
    by correct-under-target minus correct-under-reference. Ties break by id.
    """
    mode_records = records.lazy().filter((pl.col("label_mode") == label_mode) & (pl.col("n_objects") > 0))
    runs = sample_runs(mode_records, pl.col("id").rank("ordinal") - 1)
    n = len(next(iter(runs.values())))
    return sample_table({order: [iter([run])] for order, run in runs.items()}, n, top_l)


# --- 4. the tables, id part by id part ---

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
        self.writer.write_table(group if all(column.num_chunks == 1 for column in group.columns)
                                else group.combine_chunks())
        self.pending, self.n_pending = [table.slice(n)] if n < len(table) else [], len(table) - n


def part_scores(spill: Spill, part: int, starts: np.ndarray, n_labels: int, schemas: dict[str, dict],
                keep: bool) -> tuple[pl.DataFrame, dict[str, SideScores]]:
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


def write_tables(spill: Spill, starts: np.ndarray, n_labels: int, schemas: dict[str, dict],
                 outputs: dict[str, str | Path], params: dict, k: int, top_n: int, top_l: list[int], n_boot: int,
                 frac: float, seed: int) -> None:
    """The records table (by label mode, then id), its population metrics and its sample-level table."""
    n_parts = len(starts) - 1
    empty = records_frame(pl.Series("id", [], pl.String), np.zeros(0, np.int32),
                          {side: SideScores.empty(0, n_labels) for side in SIDES}, 0)
    rng = np.random.default_rng(seed)
    block_rows = max(1, MERGE_ROWS // n_parts)  # each part's sorted runs go to the spill in blocks the merge holds
    with parquet_stream(outputs["records"], contract_table(empty.collect()).schema, "metrics", params) as writer, \
            ThreadPoolExecutor(1) as pool:
        populations = []
        for mode, label_mode in enumerate(LABEL_MODES):
            groups = RowGroups(writer, RECORDS_BATCH_ROWS)
            part_sizes, distinct, excluded = np.zeros(n_parts, np.int64), [], 0
            for part in tqdm(range(n_parts), desc=f"tables, {label_mode} labels", unit="part", mininterval=2):
                records, sides = part_scores(spill, part, starts, n_labels, schemas, keep=mode < len(LABEL_MODES) - 1)
                frame = records_frame(records["id"], records["n_objects"].to_numpy(), sides, mode).collect()
                groups.write(contract_table(frame))
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
            # The population metrics (compiled, GIL released) run beside writing the next mode's records; one
            # worker keeps the modes' draws in order.
            populations.append(pool.submit(population_rows, spill, label_mode, part_sizes,
                                           np.unique(np.concatenate(distinct)), excluded, n_boot, frac, rng))
        population = pl.DataFrame([row for future in populations for row in future.result()])
    write_parquet(population.with_columns(k=pl.lit(k), top_n=pl.lit(top_n)), outputs["population"], stage="metrics",
                  params=params)
    # The sample-level records are the top_n mode's records with objects, those of its population metrics.
    samples = sample_table({order: [spill.frames(f"sample_{order}", part) for part in range(n_parts)]
                            for order in ORDERS}, int(part_sizes.sum()), top_l)
    write_parquet(samples, outputs["sample_level"], stage="metrics", params=params)


TABLES = ("records", "population", "sample_level")


def compute(target_neighbors: str, reference_neighbors: str, query_annotations: str, public_annotations: str,
            queries: str, out_dir: str | Path | None, k: int, top_n: int, top_l: list[int], n_boot: int, frac: float,
            seed: int, batch_rows: int = 1_000_000, outputs: dict[str, str] | None = None,
            part_records: int = PART_RECORDS, spill_dir: str | None = None) -> None:
    """Write the three tables: to `outputs` (table name -> file), or as TABLE.parquet into `out_dir`.

    `batch_rows` (neighbour rows read at a time), `part_records` (query records per part) and `spill_dir` (where
    parts that do not fit SPILL_BYTES go; default: the system's temporary folder) change no table.
    """
    outputs = outputs or {table: Path(out_dir) / f"{table}.parquet" for table in TABLES}
    # Numba's first compiled call sets up its compiler (~0.5 s): done on a thread while polars reads the inputs.
    warm_up = Thread(target=lambda: StringIndex(pl.Series(["label"]), "warm-up", "label").positions(pl.Series(["x"])))
    warm_up.start()
    paths = {"queries": queries, "query_annotations": query_annotations,
             **dict(zip(SIDES, (target_neighbors, reference_neighbors)))}
    n_queries = count_queries(queries)
    if n_queries >= 1 << 32:
        raise DataError(f"{queries}: {n_queries} query records; the metric stage takes fewer than 2^32")
    scan_checked(query_annotations, ANNOTATION_COLUMNS)
    for side in SIDES:
        scan_checked(paths[side], NEIGHBOR_COLUMNS)
        check_ranks(paths[side], k)
    with tempfile.TemporaryDirectory(prefix="dejavu-metrics-", dir=spill_dir) as folder:
        spill = Spill(folder, SPILL_BYTES)
        parts = RangeParts.sampled(query_batches(queries), n_queries, part_records)
        # The neighbours files' runs (their query ids alone) are read on a thread each, the public set beside them;
        # the query records after them (all at once: 1.4 GB at 10M records, not 1.1 GB).
        with ThreadPoolExecutor(len(SIDES)) as pool:
            runs = {side: pool.submit(route_runs, paths[side], side, parts, spill, batch_rows) for side in SIDES}
            public = read_public(public_annotations)
            run_parts = {side: RunParts(future.result(), RUN_PART_RUNS) for side, future in runs.items()}
        route_queries(queries, parts, spill)
        route_annotations(query_annotations, public, parts, spill)
        warm_up.join()
        schemas = spill_schemas(public.labels.codes.dtype)
        starts = join_parts(spill, len(parts), run_parts, schemas, paths)
        # The two models' files are independent: one thread each (numba, numpy and polars release the GIL).
        with ThreadPoolExecutor(len(SIDES)) as pool:
            for future in [pool.submit(score_side, paths[side], side, public, spill, run_parts[side],
                                       schemas["truth"], starts, k, top_n, batch_rows) for side in SIDES]:
                future.result()
        n_labels = len(public.vocabulary)
        del public
        counts_type = pl.Series(np.zeros(0, narrowest(n_labels))).dtype
        for side in SIDES:
            schemas[f"scores_{side}"] = {"record": pl.Int64, **{column: counts_type for column in COUNT_COLUMNS},
                                         "nn_score": pl.Float32}
        params = {"target_neighbors": target_neighbors, "reference_neighbors": reference_neighbors,
                  "queries": queries, "k": k, "top_n": top_n, "top_l": top_l, "n_boot": n_boot, "frac": frac,
                  "seed": seed}
        write_tables(spill, starts, n_labels, schemas, outputs, params, k, top_n, top_l, n_boot, frac, seed)


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
    parser.add_argument("--batch-rows", type=int, default=1_000_000,
                        help="neighbour rows read at a time from each neighbours file: bounds memory, "
                             "changes no table")
    parser.add_argument("--part-records", type=int, default=PART_RECORDS,
                        help="query records handled at a time: bounds memory, changes no table")
    parser.add_argument("--spill-dir", help="folder for what does not fit in memory (default: $TMPDIR or /tmp)")
    args = parser.parse_args(argv)
    outputs = {table: getattr(args, table) for table in TABLES}
    if (args.out_dir is None) != all(outputs.values()) or (args.out_dir is not None and any(outputs.values())):
        parser.error("give either --out-dir or all of --records, --population, --sample-level")
    compute(args.target_neighbors, args.reference_neighbors, args.query_annotations, args.public_annotations,
            args.queries, args.out_dir, args.k, args.top_n, [int(v) for v in args.top_l.split(",") if v],
            args.n_boot, args.frac, args.seed, args.batch_rows, outputs=outputs if args.out_dir is None else None,
            part_records=args.part_records, spill_dir=args.spill_dir)


if __name__ == "__main__":
    # numba's first compiled call probes for a BLAS by importing scipy.linalg (~0.35 s of CPU at start-up).
    # No kernel here multiplies matrices: in this process the probe finds none.
    sys.modules.setdefault("scipy.linalg.cython_blas", None)
    # Each neighbours file is consumed in order by one thread whose compiled scoring is slower than polars'
    # decoding, so row groups decoded ahead only wait in memory: one ahead gives a peak 200 MiB lower at 1M
    # records, in the same time (read when the first file is scanned; the environment can still override it).
    os.environ.setdefault("POLARS_ROW_GROUP_PREFETCH_SIZE", "1")
    main()
    # Python's last garbage collection at exit walks numba's compiler objects: ~0.3 s. Nothing needs it.
    gc.freeze()
