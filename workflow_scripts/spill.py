"""Out-of-core shuffles: frames appended to numbered parts, read back one part at a time.

A stage whose inputs arrive in unrelated orders (the metric stage: a query list, annotations, two neighbours
files) and whose outputs go in yet another order (ids) either holds a per-record index of everything or moves
each input's rows into parts, a range of ids or of row numbers each, and then works on one part at a time.
`Spill` is the second way's store: what is appended stays in memory while all of it fits a byte budget, and
moves to Arrow IPC files in a folder beyond that, so memory follows the budget and the part size, never the
number of records. `RangeParts` cuts a set of distinct strings into ranges of about equal size.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import count
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa


class Spill:
    """Frames by (name, part), kept in memory up to `budget` bytes in all and in `folder` beyond (no folder: all in
    memory).

    Appends may come from several threads. Reading a part hands its rows over in the order they were appended, no
    more than one appended frame at a time, and forgets them (memory and files) unless asked to keep them.
    """

    def __init__(self, folder: str | Path | None, budget: int = 0):
        self.folder, self.budget = folder and Path(folder), budget
        self._memory: dict[tuple[str, int], list[pa.Table]] = {}
        self._files: dict[tuple[str, int], list[Path]] = {}
        self._bytes = 0
        self._lock = threading.Lock()
        self._file_number = count()

    def append(self, name: str, part: int, frame: pl.DataFrame) -> None:
        if not len(frame):
            return
        # Held as Arrow with contiguous strings: a string column gathered or sliced by polars keeps its source's
        # buffers alive, which no size estimate sees (a hundred times the gathered strings' size, measured).
        table = frame.to_arrow(compat_level=pl.CompatLevel.oldest())
        with self._lock:
            self._memory.setdefault((name, part), []).append(table)
            self._bytes += table.nbytes
            if self.folder is not None and self._bytes > self.budget:
                self._write_all()

    def _write_all(self) -> None:
        """Every table held in memory to one file per (name, part): a part's files are older than its tables."""
        for key, tables in self._memory.items():
            path = self.folder / f"{key[0]}.{key[1]}.{next(self._file_number)}.arrow"
            # An IPC stream of the tables' record batches: read back one at a time.
            with pa.ipc.new_stream(path, tables[0].schema) as writer:
                for table in tables:
                    writer.write_table(table)
            self._files.setdefault(key, []).append(path)
        self._memory.clear()
        self._bytes = 0

    def frames(self, name: str, part: int, keep: bool = False) -> Iterator[pl.DataFrame]:
        """The rows appended to (name, part), in order, in frames no larger than those appended."""
        with self._lock:
            files = list(self._files.get((name, part), []))
            tables = list(self._memory.get((name, part), []))
            if not keep:
                self._files.pop((name, part), None)
                self._memory.pop((name, part), None)
                self._bytes -= sum(table.nbytes for table in tables)
        for path in files:
            # Read, not memory-mapped (pyarrow maps a path): a mapped file's pages stay resident while it is open.
            with pa.OSFile(str(path)) as file, pa.ipc.open_stream(file) as reader:
                for batch in reader:
                    yield pl.from_arrow(batch)
            if not keep:
                path.unlink()
        for table in tables:
            yield pl.from_arrow(table)

    def read(self, name: str, part: int, schema: dict, keep: bool = False) -> pl.DataFrame:
        """All frames of (name, part) as one (rows in append order), or an empty frame of `schema`."""
        frames = list(self.frames(name, part, keep))
        return pl.concat(frames) if frames else pl.DataFrame(schema=schema)


def group_rows(part_of_row: np.ndarray, n_parts: int) -> tuple[np.ndarray, np.ndarray]:
    """(order, bounds): rows by part, stably (rows order[bounds[j]:bounds[j + 1]] are part j's, in row order)."""
    # A stable sort of 16-bit keys is numpy's radix sort: linear in the rows.
    keys = part_of_row.astype(np.uint16 if n_parts <= 1 << 16 else np.int64, copy=False)
    order = np.argsort(keys, kind="stable")
    bounds = np.zeros(n_parts + 1, np.int64)
    np.cumsum(np.bincount(keys, minlength=n_parts), out=bounds[1:])
    return order, bounds


def route(spill: Spill, name: str, frame: pl.DataFrame, part_of_row: np.ndarray, n_parts: int) -> None:
    """Append each row of `frame` to its part (`part_of_row`, not read for one part) of `name`, keeping the rows'
    order within a part."""
    if n_parts == 1:
        spill.append(name, 0, frame)
        return
    order, bounds = group_rows(part_of_row, n_parts)
    grouped = frame[order]
    for part in np.flatnonzero(np.diff(bounds)):
        spill.append(name, int(part), grouped.slice(bounds[part], bounds[part + 1] - bounds[part]))


@dataclass(frozen=True)
class RangeParts:
    """Ranges of strings: part j holds the strings s with splitters[j − 1] <= s < splitters[j] (polars' order)."""

    splitters: pl.Series  # sorted

    def __len__(self) -> int:
        return len(self.splitters) + 1

    def of(self, strings: pl.Series) -> np.ndarray:
        """The part of each string."""
        if not len(self.splitters):
            return np.zeros(len(strings), np.int64)
        return self.splitters.search_sorted(strings, side="right").to_numpy().astype(np.int64)

    @classmethod
    def sampled(cls, batches: Iterable[pl.Series], n: int, part_size: int) -> RangeParts:
        """Parts of about `part_size` of the n distinct strings in `batches`, cut at quantiles of every m-th string.

        The sample (~4,096 strings per part) holds the parts within a few per cent of their size for any order of
        the strings but an adversarial one.
        """
        n_parts = -(-n // part_size)
        if n_parts <= 1:
            return cls(pl.Series([], dtype=pl.String))
        every = max(1, n // (4096 * n_parts))
        sample, seen = [], 0
        for batch in batches:
            sample.append(batch.gather(np.arange(-seen % every, len(batch), every)))
            seen += len(batch)
        ordered = pl.concat(sample).sort()
        return cls(
            ordered.gather([len(ordered) * part // n_parts for part in range(1, n_parts)]).unique(maintain_order=True)
        )
