"""Strings as integers: ids found through a hash index, labels as codes, label sets as CSR rows.

Every id and label of the inputs is a string; the engine works on integers. Public ids and label names are
looked up by 64-bit hash (`StringIndex`), labels are coded in name order, and a record's distinct label codes
are one row of a CSR array (`LabelSets`), in the narrowest integer type that holds them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl
import pyarrow as pa

from workflow_scripts.io import DataError
from workflow_scripts.metrics.kernels import probe


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
        self.slots = np.zeros((2**bits if buckets else 0, 4), np.uint64)
        if buckets:
            self.slots[:, 0] = self.slots[:, 2] = np.arange(1, 2**bits + 1, dtype=np.uint64) << self.shift
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
        raise DataError(
            f"{path}: null labels (use an empty list for no objects) in record(s) {ids.filter(nulls).head(5).to_list()}"
        )
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
    return LabelSets(
        np.concatenate([[0], np.cumsum(counts)]).astype(narrowest(len(keys))),
        (keys % max(len(vocabulary), 1)).astype(narrowest(len(vocabulary))),
    )


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
        return cls(
            StringIndex(frame["id"], path, "id"),
            vocabulary,
            index,
            label_sets(frame["labels"], frame["id"], index, path),
        )


def run_starts(query_ids: pl.Series) -> np.ndarray:
    """The first row of each run of equal query ids, comparing neighbouring rows' 64-bit hashes.

    Two different neighbouring ids that shared a hash would make one run: the second query would then read
    as having no neighbours, an error, never a silent number.
    """
    hashes = query_ids.hash(0).to_numpy()
    return np.flatnonzero(np.concatenate([[True], hashes[1:] != hashes[:-1]])) if len(hashes) else np.zeros(0, int)
