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

How it runs. Ids and labels become integers once: each string list is indexed by
64-bit hash (`StringIndex`, looked up by a compiled probe), the labels are coded in
name order, and every record's label set is a CSR row of distinct codes (`LabelSets`,
in the narrowest integer types). Each neighbours file is then walked once, in its own
order, in chunks of ``batch_rows`` rows; a query's rows must lie together (the kNN
stage writes them so). The complete queries of a chunk are scored by one compiled
(numba) pass per query over its neighbours' label codes (`score_queries`): counts and
nearest ranks in small per-label arrays, the ``top_n`` cut from a histogram of counts
and a sorted list of ``top_n`` keys. numba rather than numpy: the numpy version needed
a dozen passes over (query × label) cells per chunk and was 3–5× slower. Memory follows
the chunk, not the number of records × k; per record only its index entry, label codes
and counts are held. The population metrics, on all records and on each bootstrap
resample, count the recall keys instead of sorting them (`resample_gaps`), with the very
floats `win_gap` and `aucg` compute.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from threading import Thread

import numba
import numpy as np
import polars as pl
from tqdm import tqdm

from workflow_scripts.io import DataError, contract_table, parquet_stream, write_parquet

LABEL_MODES = ("all", "top_n")
SIDES = ("target", "reference")
ORDERS = {
    # order name: (sort key expression on the records table, is an oracle view)
    "distance": (pl.col("nn_score_target"), False),
    "correct": (pl.col("n_correct_target"), False),
    "gap": (pl.col("n_correct_target") - pl.col("n_correct_reference"), True),
}
# Resampled values scored at once by the bootstrap (per column): bounds its memory.
BOOTSTRAP_VALUES = 1 << 21
# Rows of the query annotations read at a time, and records written at a time (one row group each).
ANNOTATION_BATCH_ROWS = 1 << 20
RECORDS_BATCH_ROWS = 1 << 20


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


# --- reading the inputs ---

COLUMN_TYPES = {"str": lambda dtype: dtype == pl.String, "list<str>": lambda dtype: dtype == pl.List(pl.String),
                "integer": lambda dtype: dtype.is_integer(), "float": lambda dtype: dtype.is_float()}
NEIGHBOR_COLUMNS = {"query_id": "str", "rank": "integer", "public_id": "str", "score": "float"}


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


def read_queries(path: str) -> pl.Series:
    ids = scan_checked(path, {"id": "str"}).collect()["id"]
    if not len(ids):
        raise DataError(f"{path}: no query records (an empty split): there is nothing to measure")
    return ids


def read_public(path: str) -> PublicSet:
    return PublicSet.from_frame(scan_checked(path, {"id": "str", "labels": "list<str>"}).collect(), path)


def read_truth(path: str, query_index: StringIndex, public: PublicSet, queries_path: str) -> tuple[np.ndarray, LabelSets]:
    """n_objects and label sets (public label codes) of the query records (of `queries_path`, indexed by
    `query_index`), in query-list order.

    The annotations are read ANNOTATION_BATCH_ROWS rows at a time; only the query records' label codes are kept.
    """
    n = len(query_index)
    n_objects = np.zeros(n, np.int32)
    times_annotated = np.zeros(n, np.int32)
    sizes = np.zeros(n, narrowest(len(public.vocabulary)))  # label codes per record
    batches = []  # (query positions, label sets) of each batch's query records, in the narrowest types
    columns = {"id": "str", "labels": "list<str>"}
    for batch in scan_checked(path, columns).collect_batches(chunk_size=ANNOTATION_BATCH_ROWS):
        position = query_index.positions(batch["id"])
        batch, position = batch.filter(position >= 0), position[position >= 0]
        np.add.at(times_annotated, position, 1)
        n_objects[position] = batch["labels"].list.n_unique().to_numpy()
        sets = label_sets(batch["labels"], batch["id"], public.label_index, path)
        sizes[position] = np.diff(sets.offsets)
        batches.append((position.astype(narrowest(n)), sets))
    # The ids are read again only to name records in an error.
    if times_annotated.max() > 1:
        duplicated = read_queries(queries_path).filter(times_annotated > 1).sort()
        raise DataError(f"{path}: {len(duplicated)} query record(s) annotated more than once, "
                        f"e.g. {duplicated.head(5).to_list()}")
    if times_annotated.min() == 0:
        missing = read_queries(queries_path).filter(times_annotated == 0)
        raise DataError(f"{path}: no annotation row for {len(missing)} query record(s) of {queries_path}, "
                        f"e.g. {missing.head(5).to_list()}")
    # Query-list order by counting: each record's codes go to its CSR row, no sort of all codes.
    offsets = np.zeros(n + 1, narrowest(int(sizes.sum(dtype=np.int64))))
    np.cumsum(sizes, dtype=offsets.dtype, out=offsets[1:])
    codes = np.empty(offsets[-1], public.labels.codes.dtype)
    for position, sets in batches:
        codes[np.repeat(offsets[position] - sets.offsets[:-1], sizes[position]) + np.arange(len(sets.codes))] = sets.codes
    return n_objects, LabelSets(offsets, codes)


def check_ranks(path: str, k: int) -> None:
    """The neighbour lists reach rank k − 1 and no rank is negative."""
    low, high = pl.scan_parquet(path).select(low=pl.col("rank").min(), high=pl.col("rank").max()).collect().row(0)
    if high is None or high + 1 < k:
        raise DataError(f"{path}: neighbour lists stop at {0 if high is None else high + 1} rank(s), fewer than "
                        f"k = {k}: search more neighbours (knn.k) or lower metrics.k")
    if low < 0:
        raise DataError(f"{path}: negative rank {low}")


# --- one model's scores, streamed over its neighbours table ---

def run_starts(query_ids: pl.Series) -> np.ndarray:
    """The first row of each run of equal query ids, comparing neighbouring rows' 64-bit hashes.

    Two different neighbouring ids that shared a hash would make one run: the second query would then read
    as having no neighbours, an error, never a silent number.
    """
    hashes = query_ids.hash(0).to_numpy()
    return np.flatnonzero(np.concatenate([[True], hashes[1:] != hashes[:-1]])) if len(hashes) else np.zeros(0, int)


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


@dataclass
class SideScores:
    """One model's per-record counts, in the order of the query list."""

    counts: np.ndarray  # [n_predicted, n_correct] × [all, top_n] × records, at most n_labels: narrowest integers
    nn_score: np.ndarray  # float32: score of the rank-0 neighbour, NaN where a record has none
    seen: np.ndarray  # bool: the record's rows were read

    @classmethod
    def empty(cls, n_records: int, n_labels: int) -> SideScores:
        return cls(np.zeros((2, 2, n_records), narrowest(n_labels)), np.full(n_records, np.nan, np.float32),
                   np.zeros(n_records, bool))


@dataclass(frozen=True)
class ScoringInputs:
    """What scoring a neighbours file needs besides the file: the query index, the public set, the queries' labels."""

    query_index: StringIndex
    public: PublicSet
    truth: LabelSets


def score_chunk(rows: pl.DataFrame, run_start: np.ndarray, scores: SideScores, inputs: ScoringInputs, k: int,
                top_n: int, path: str) -> None:
    """Score the queries of neighbour rows that hold all rows of each of their queries; their runs start at
    `run_start`."""
    query_index, public = inputs.query_index, inputs.public
    run_ids = rows["query_id"].gather(run_start)
    position = query_index.positions(run_ids)  # −1: a query of another split
    listed = position[position >= 0]
    ordered = np.sort(listed)
    again = np.concatenate([listed[scores.seen[listed]], ordered[1:][ordered[1:] == ordered[:-1]]])
    if len(again):
        raise DataError(f"{path}: the rows of query {run_ids.filter(position == again[0])[0]!r} are not together "
                        f"(the kNN stage writes each query's rows in one run)")
    scores.seen[listed] = True
    rank = rows["rank"].to_numpy()
    public_row = np.empty(len(rows), narrowest(len(public.ids)))
    kept_rank = np.empty(len(rows), rank.dtype)
    row_public = public.ids.positions(rows["public_id"])
    bounds, nearest = select_rows(run_start, position >= 0, rank, k, row_public, public_row, kept_rank)
    public_row, kept_rank = public_row[:bounds[-1]], kept_rank[:bounds[-1]]
    if (public_row < 0).any():
        used = np.repeat(position >= 0, np.diff(run_start, append=len(rows))) & (rank < k)
        unknown = rows["public_id"].filter(used & (row_public < 0)).unique().sort()
        raise DataError(f"{path}: {len(unknown)} public id(s) without a public annotation row, "
                        f"e.g. {unknown.head(5).to_list()}")
    met = nearest >= 0
    scores.nn_score[listed[met]] = rows["score"].gather(nearest[met]).to_numpy()
    scores.counts[:, :, listed] = query_scores(bounds, kept_rank, public_row, listed, public, inputs.truth, k,
                                               top_n)[0]


def side_scores(path: str, inputs: ScoringInputs, k: int, top_n: int, batch_rows: int) -> SideScores:
    """Stream a neighbours file in chunks of `batch_rows` rows; a query cut by a chunk's end moves to the next."""
    scores = SideScores.empty(len(inputs.query_index), len(inputs.public.vocabulary))
    scan = scan_checked(path, NEIGHBOR_COLUMNS)
    n_rows = scan.select(pl.len()).collect().item()
    carry = None
    with tqdm(total=n_rows, desc=f"metrics {Path(path).name}", unit="row", unit_scale=True, mininterval=2) as bar:
        for chunk in scan.collect_batches(chunk_size=batch_rows):
            bar.update(len(chunk))
            rows = chunk if carry is None else pl.concat([carry, chunk])
            if not len(rows):
                continue
            run_start = run_starts(rows["query_id"])
            if len(run_start) > 1:
                score_chunk(rows.slice(0, run_start[-1]), run_start[:-1], scores, inputs, k, top_n, path)
            carry = rows.slice(run_start[-1])
    if carry is not None and len(carry):
        score_chunk(carry, run_starts(carry["query_id"]), scores, inputs, k, top_n, path)
    return scores


# --- tables ---

def scores_frame(ids: pl.Series, n_objects: np.ndarray, scores: SideScores, mode: int, rows: np.ndarray,
                 suffix: str = "") -> pl.LazyFrame:
    """n_predicted, n_correct, precision, recall, f1, nn_score of one model and label mode for the records `rows`
    (positions in the query list), in that order; `ids` names them."""
    frame = pl.DataFrame({"n_objects": n_objects[rows], "n_predicted": scores.counts[0, mode, rows],
                          "n_correct": scores.counts[1, mode, rows], "nn_score": scores.nn_score[rows]},
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


def records_frame(ids: pl.Series, n_objects: np.ndarray, sides: dict[str, SideScores], mode: int,
                  rows: np.ndarray) -> pl.LazyFrame:
    """Both models' scores side by side (suffixes _target, _reference) of one label mode's records `rows`; lazy, so
    a reader computes only the columns it selects."""
    target, reference = (scores_frame(ids, n_objects, sides[side], mode, rows, f"_{side}") for side in SIDES)
    return pl.concat([target, reference.drop("id", "label_mode", "n_objects")], how="horizontal")


def frame_scores(neighbors: pl.DataFrame, public: PublicSet, query_ids: pl.Series, truth: LabelSets, k: int,
                 top_n: int) -> SideScores:
    """Scores of an in-memory neighbours frame (any row order)."""
    scores = SideScores.empty(len(query_ids), len(public.vocabulary))
    rows = neighbors.filter(pl.col("query_id").is_in(query_ids.implode())).sort("query_id", "rank")
    score_chunk(rows, run_starts(rows["query_id"]), scores,
                ScoringInputs(StringIndex(query_ids, "queries", "id", buckets=False), public, truth), k, top_n,
                "neighbors")
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
    every = np.arange(len(truth))
    return pl.concat([scores_frame(truth["id"], n_objects, scores, mode, every) for mode in range(len(LABEL_MODES))])


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


@numba.njit(nogil=True, cache=True)
def resample_gaps(resample, signs, key_target, key_reference, distinct, win_sums,
                  areas):  # pragma: no cover - compiled
    """The bootstrap's arithmetic, resample by resample, as `win_gap` and `aucg` do it (so their floats agree).

    For resample b (records resample[b]): win_sums[b, m] = Σ signs[m] (the win gaps' numerators) and
    areas[b] = the terms of aucg's final sum in aucg's order. aucg stably sorts the pooled recall keys (target
    first): key by key, ascending, the target's records then the reference's, which counting the keys gives
    without a sort. Inside a key the width to the next value is 0; the last of a key reaches the next key met.
    """
    size = resample.shape[1]
    n_target = np.zeros(len(distinct), np.int64)
    n_reference = np.zeros(len(distinct), np.int64)
    target_jump, reference_jump = -1.0 / size, 1.0 / size
    for b in range(resample.shape[0]):
        for i in range(size):
            record = resample[b, i]
            for m in range(signs.shape[0]):
                win_sums[b, m] += signs[m, record]
            n_target[key_target[record]] += 1
            n_reference[key_reference[record]] += 1
        cdf_gap, at, key = 0.0, 0, 0
        while n_target[key] + n_reference[key] == 0:
            key += 1
        while key < len(distinct):
            following = key + 1
            while following < len(distinct) and n_target[following] + n_reference[following] == 0:
                following += 1
            next_value = distinct[following] if following < len(distinct) else 1.0
            for side in range(2):
                jump = target_jump if side == 0 else reference_jump
                n = n_target[key] if side == 0 else n_reference[key]
                for _ in range(n):
                    cdf_gap += jump
                    areas[b, at] = cdf_gap * (distinct[key] - distinct[key])
                    at += 1
            areas[b, at - 1] = cdf_gap * (next_value - distinct[key])
            n_target[key] = 0
            n_reference[key] = 0
            key = following


@dataclass(frozen=True)
class ResampleInputs:
    """What the population metrics read of each record with objects: the signs of the three win gaps' differences
    (int8, [3, records]) and the recalls' keys, their ranks among the distinct recalls (`distinct`, ascending). A few
    bytes per record instead of six float columns."""

    signs: np.ndarray
    key_target: np.ndarray
    key_reference: np.ndarray
    distinct: np.ndarray

    @classmethod
    def from_records(cls, mode_records: pl.DataFrame | pl.LazyFrame) -> ResampleInputs:
        """Of one label mode's records (the records table's columns), those with objects."""
        scored = mode_records.lazy().filter(pl.col("n_objects") > 0).select(
            *[(pl.col(f"{score}_target") - pl.col(f"{score}_reference")).sign().cast(pl.Int8).alias(score)
              for score in WIN_GAPS.values()],
            *[f"recall_{side}" for side in SIDES]).collect()
        recalls = [scored[f"recall_{side}"].to_numpy() for side in SIDES]
        distinct = np.unique(np.concatenate([np.unique(recall) for recall in recalls]))
        key_target, key_reference = (np.searchsorted(distinct, recall).astype(narrowest(len(distinct)))
                                     for recall in recalls)
        return cls(np.stack([scored[score].to_numpy() for score in WIN_GAPS.values()]), key_target, key_reference,
                   distinct)

    def __len__(self) -> int:
        return len(self.key_target)


def n_excluded(mode_records: pl.DataFrame | pl.LazyFrame) -> int:
    """Records without objects: they have no recall."""
    return mode_records.lazy().select((pl.col("n_objects") == 0).sum()).collect().item()


def resampled_metrics(inputs: ResampleInputs, resample: np.ndarray) -> dict[str, np.ndarray]:
    """The population metrics of each resample (a row of record indices), equal to the last bit to `win_gap` and
    `aucg` of the resampled score columns, without gathering any column (`resample_gaps`)."""
    win_sums = np.zeros((len(resample), len(WIN_GAPS)), np.int64)
    areas = np.empty((len(resample), 2 * resample.shape[1]))
    resample_gaps(resample, inputs.signs, inputs.key_target, inputs.key_reference, inputs.distinct, win_sums, areas)
    # The win gaps' sums are exact integers, so dividing them equals numpy's mean of the signs.
    return {**{metric: win_sums[:, column] / resample.shape[1] for column, metric in enumerate(WIN_GAPS)},
            "AUCG": areas.sum(axis=-1)}


def population_metrics(records: pl.DataFrame, n_boot: int, frac: float, seed: int) -> pl.DataFrame:
    """Rows (label_mode, metric, value, mean, std, n_boot, frac, n_records, n_excluded)."""
    rng = np.random.default_rng(seed)
    rows = []
    for label_mode in LABEL_MODES:
        mode_records = records.filter(pl.col("label_mode") == label_mode)
        rows += population_rows(ResampleInputs.from_records(mode_records), n_excluded(mode_records), label_mode,
                                n_boot, frac, rng)
    return pl.DataFrame(rows)


def population_rows(inputs: ResampleInputs, excluded: int, label_mode: str, n_boot: int, frac: float,
                    rng: np.random.Generator) -> list[dict]:
    """population_metrics' rows of one label mode: each metric on all records (NaN without records; the all-records
    "resample" in record order) and over `n_boot` resamples drawn with `rng` (the draws of all modes are one stream).

    Resamples are drawn and scored a few at a time (BOOTSTRAP_VALUES values), so memory stays bounded;
    the draws are the same for any grouping.
    """
    n = len(inputs)
    values = resampled_metrics(inputs, np.arange(n)[None]) if n else {}
    size = max(1, round(frac * n))
    step = max(1, BOOTSTRAP_VALUES // size)
    boot = {metric: [] for metric in POPULATION_METRICS}
    for first in range(0, n_boot if n else 0, step):
        resample = rng.integers(0, n, size=(min(step, n_boot - first), size))
        for metric, resampled in resampled_metrics(inputs, resample).items():
            boot[metric].append(resampled)
    rows = []
    for metric in POPULATION_METRICS:
        resampled = np.concatenate(boot[metric]) if boot[metric] else None
        rows.append({
            "label_mode": label_mode, "metric": metric,
            "value": float(values[metric][0]) if n else float("nan"),
            "mean": float(resampled.mean()) if resampled is not None else float("nan"),
            "std": float(resampled.std(ddof=1)) if resampled is not None and n_boot > 1 else float("nan"),
            "n_boot": n_boot, "frac": frac, "n_records": n, "n_excluded": excluded,
        })
    return rows


def sample_level(records: pl.DataFrame | pl.LazyFrame, top_l: list[int], label_mode: str = "top_n") -> pl.DataFrame:
    """Mean precision/recall/F1 gaps (target − reference) over the top-L records of each order.

    Orders put the most suspicious records first: ``distance`` by the target
    model's nearest-neighbour similarity, ``correct`` by the objects the target
    model got right, ``gap`` (an oracle view that peeks at the reference model)
    by correct-under-target minus correct-under-reference. Ties break by id.
    """
    # Only what the orders sort by and the gaps they average: the ids, each order's key, the three gaps.
    scored = records.lazy().filter((pl.col("label_mode") == label_mode) & (pl.col("n_objects") > 0)).select(
        "id", **{f"{order}_key": key for order, (key, _) in ORDERS.items()},
        **{f"{metric}_gap": pl.col(f"{metric}_target") - pl.col(f"{metric}_reference")
           for metric in WIN_GAPS.values()}).collect()
    n = len(scored)
    cutoffs = sorted({l for l in top_l if 0 < l < n} | ({n} if n else set()))
    frames = []
    # Ties break by id; the rank of string ids sorts faster than the strings, integer ids sort as they are (in one
    # chunk: polars sorts by a secondary key in many chunks some 20× slower).
    id_rank = scored["id"].rechunk() if scored["id"].dtype.is_integer() else scored["id"].rank("ordinal")
    index = pl.Series(cutoffs, dtype=pl.Int64) - 1
    for order, (_, oracle) in ORDERS.items():
        ranked = scored.select(pl.arg_sort_by(f"{order}_key", id_rank, descending=[True, False])).to_series()
        frames.append(pl.DataFrame({
            "order": [order] * len(cutoffs),
            "oracle": [oracle] * len(cutoffs),
            "top_l": cutoffs,
            # One gap at a time in that order: its running sum (sequential, as numpy's cumsum) at each cutoff.
            **{f"{metric}_gap": scored[f"{metric}_gap"].gather(ranked).cum_sum().gather(index) / (index + 1)
               for metric in WIN_GAPS.values()},
        }, schema_overrides={"top_l": pl.Int64}))
    return pl.concat(frames)


TABLES = ("records", "population", "sample_level")


def compute(target_neighbors: str, reference_neighbors: str, query_annotations: str, public_annotations: str,
            queries: str, out_dir: str | Path | None, k: int, top_n: int, top_l: list[int], n_boot: int, frac: float,
            seed: int, batch_rows: int = 1_000_000, outputs: dict[str, str] | None = None) -> None:
    """Write the three tables: to `outputs` (table name -> file), or as TABLE.parquet into `out_dir`."""
    outputs = outputs or {table: Path(out_dir) / f"{table}.parquet" for table in TABLES}
    # Numba's first compiled call sets up its compiler (~0.5 s): done on a thread while polars reads the inputs.
    warm_up = Thread(target=lambda: StringIndex(pl.Series(["label"]), "warm-up", "label").positions(pl.Series(["x"])))
    warm_up.start()
    # Reading and scoring find the records by their index; the ids (16 bytes or more each) are read again for the
    # tables.
    query_index = StringIndex(read_queries(queries), queries, "id", buckets=False)  # looked up once per query
    public = read_public(public_annotations)
    n_objects, truth = read_truth(query_annotations, query_index, public, queries)
    warm_up.join()
    inputs = ScoringInputs(query_index, public, truth)
    neighbor_paths = dict(zip(SIDES, (target_neighbors, reference_neighbors)))
    for path in neighbor_paths.values():
        scan_checked(path, NEIGHBOR_COLUMNS)
        check_ranks(path, k)
    # The two models' tables are independent: one thread each (numba, numpy and polars release the GIL).
    with ThreadPoolExecutor(len(SIDES)) as pool:
        futures = {side: pool.submit(side_scores, path, inputs, k, top_n, batch_rows)
                   for side, path in neighbor_paths.items()}
        sides = {side: future.result() for side, future in futures.items()}
    del inputs, query_index, public, truth  # what scoring needed: the tables need only the ids and the counts
    query_ids = read_queries(queries)
    for side, path in neighbor_paths.items():
        absent = query_ids.filter(~sides[side].seen)
        if len(absent):
            raise DataError(f"{path}: no neighbours for {len(absent)} query record(s), e.g. {absent.head(5).to_list()}")
    params = {"target_neighbors": target_neighbors, "reference_neighbors": reference_neighbors, "queries": queries,
              "k": k, "top_n": top_n, "top_l": top_l, "n_boot": n_boot, "frac": frac, "seed": seed}
    # The records table lists the records by label mode, then id. It is written RECORDS_BATCH_ROWS at a time; the
    # population and sample-level tables read each mode's numbers with the ids replaced by their rank (only their
    # order matters there), so no table of all records and their ids is ever held.
    order = query_ids.arg_sort().to_numpy()
    id_rank = pl.Series("id", np.arange(len(order), dtype=narrowest(len(order))))
    schema = contract_table(records_frame(query_ids.gather(order[:1]), n_objects, sides, 0, order[:1]).collect()).schema
    # The sample-level table first, while no population metrics run beside it: the two never share memory.
    samples = sample_level(records_frame(id_rank, n_objects, sides, LABEL_MODES.index("top_n"), order), top_l)
    rng = np.random.default_rng(seed)
    with parquet_stream(outputs["records"], schema, "metrics", params) as writer, ThreadPoolExecutor(1) as pool:
        populations = []
        for mode, label_mode in enumerate(LABEL_MODES):
            mode_records = records_frame(id_rank, n_objects, sides, mode, order)
            resample_inputs, excluded = ResampleInputs.from_records(mode_records), n_excluded(mode_records)
            del mode_records
            # The population metrics (compiled, GIL released) run beside writing the records; one worker keeps the
            # modes' draws in order.
            populations.append(pool.submit(population_rows, resample_inputs, excluded, label_mode, n_boot, frac, rng))
            for first in range(0, len(order), RECORDS_BATCH_ROWS):
                rows = order[first:first + RECORDS_BATCH_ROWS]
                batch = records_frame(query_ids.gather(rows), n_objects, sides, mode, rows).collect()
                writer.write_table(contract_table(batch))
        population = pl.DataFrame([row for future in populations for row in future.result()])
    write_parquet(population.with_columns(k=pl.lit(k), top_n=pl.lit(top_n)), outputs["population"], stage="metrics",
                  params=params)
    write_parquet(samples, outputs["sample_level"], stage="metrics", params=params)


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
    args = parser.parse_args(argv)
    outputs = {table: getattr(args, table) for table in TABLES}
    if (args.out_dir is None) != all(outputs.values()) or (args.out_dir is not None and any(outputs.values())):
        parser.error("give either --out-dir or all of --records, --population, --sample-level")
    compute(args.target_neighbors, args.reference_neighbors, args.query_annotations, args.public_annotations,
            args.queries, args.out_dir, args.k, args.top_n, [int(v) for v in args.top_l.split(",") if v],
            args.n_boot, args.frac, args.seed, args.batch_rows, outputs=outputs if args.out_dir is None else None)


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
