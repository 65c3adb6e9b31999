"""The training data: one side's records, memory-mapped, read a batch of rows at a time.

Memory stays flat in the number of records: rank 0 streams the side's records (id, image path, tar offset
and size, captions) into an uncompressed Arrow file beside the outputs, which every process and DataLoader
worker memory-maps. Each step's batch is a list of row numbers; the worker reads those rows, reads each
image (one `pread` for a shard member), draws and tokenises one caption per record and masks it. What
stays in memory per record is the epoch's permutation (8 bytes), unless `preload_images` decodes every
image up front (small data only). The epoch's order comes from `default_rng([seed, epoch])`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import torch
from tqdm import tqdm

from workflow_scripts.images import decode_rgb, read_image_bytes, resolved_image_path
from workflow_scripts.io import DataError, atomic_path, verify_checksums
from workflow_scripts.training.text import draw_captions, mask_tokens, record_uniforms, special_token_ids

SIDE_TABLE = "side_records.arrow"  # the memory-mapped side, removed when training ends


def write_side_table(records_path: str, split_path: str, path: Path) -> int:
    """Stream the side's records, in split order, into an uncompressed Arrow file; return its row count."""
    for source in (records_path, split_path):
        if not Path(source).exists():
            raise DataError(f"{source}: file does not exist")
        verify_checksums(source)
    records = pl.scan_parquet(records_path)
    columns = records.collect_schema().names()
    missing = [c for c in ("id", "image_path", "captions") if c not in columns]
    if missing:
        raise DataError(f"{records_path}: missing column(s) {missing}; found {columns}")
    if "image_offset" not in columns:  # not from the shards adapter: members are located by their headers
        records = records.with_columns(image_offset=pl.lit(None, pl.Int64), image_size=pl.lit(None, pl.Int64))
    records = records.select(
        "id",
        resolved_image_path(records_path),
        "image_offset",
        "image_size",
        pl.col("captions").cast(pl.List(pl.String)),
    )
    side = pl.scan_parquet(split_path).select("id").join(records, on="id", how="left", maintain_order="left")
    with atomic_path(path) as tmp:
        side.sink_ipc(tmp, compression=None, compat_level=pl.CompatLevel.oldest())  # plain strings: pyarrow takes them
    checked = pl.scan_ipc(path)
    for problem, condition, origin in (
        ("id(s) not in the records", pl.col("image_path").is_null(), f"{split_path} (records {records_path})"),
        ("record(s) without a caption cannot be trained on", pl.col("captions").list.len() == 0, records_path),
    ):
        bad = checked.filter(condition).select("id").collect()["id"]
        if len(bad):
            raise DataError(f"{origin}: {len(bad)} {problem}, e.g. {bad.head(5).to_list()}")
    return checked.select(pl.len()).collect().item()


class SideBatches(torch.utils.data.Dataset):
    """Training batches of one side: item (epoch, rows) -> (images [b, 3, H, W], masked tokens [b, ctx]).

    The side table is memory-mapped once per process, so forked workers hold no per-record objects.
    """

    def __init__(self, table_path: Path, transform, tokenizer, mask_ratio: float, seed: int):
        self.table_path, self.transform, self.tokenizer = table_path, transform, tokenizer
        self.mask_ratio, self.seed = mask_ratio, seed
        self.eot_token_id, self.pad_token_id = special_token_ids(tokenizer) if mask_ratio > 0 else (None, 0)
        self.images: torch.Tensor | None = None  # preloaded decoded images, row order
        self._mapped: tuple[int, pa.Table, list[pa.RecordBatch], np.ndarray] | None = None

    def table(self) -> pa.Table:
        return self._map()[1]

    def _map(self) -> tuple[int, pa.Table, list[pa.RecordBatch], np.ndarray]:
        """(pid, the mapped table, its record batches, first row of each), opened once per process."""
        if self._mapped is None or self._mapped[0] != os.getpid():
            table = pa.ipc.open_file(pa.memory_map(str(self.table_path))).read_all()
            batches = table.to_batches()
            starts = np.cumsum([0] + [batch.num_rows for batch in batches])[:-1]
            self._mapped = (os.getpid(), table, batches, starts)
        return self._mapped

    def rows(self, rows: np.ndarray) -> pa.Table:
        """The given (sorted) rows, taken batch by batch: a take over the whole table would first
        concatenate its chunks, copying every record into this process."""
        _, table, batches, starts = self._map()
        chunk = np.searchsorted(starts, rows, side="right") - 1
        return pa.Table.from_batches(
            [batches[c].take(pa.array(rows[chunk == c] - starts[c])) for c in np.unique(chunk)], table.schema
        )

    def __len__(self) -> int:
        return self.table().num_rows

    def _decoded(self, rows: pa.Table) -> torch.Tensor:
        ids, paths = rows.column("id").to_pylist(), rows.column("image_path").to_pylist()
        offsets, sizes = rows.column("image_offset").to_pylist(), rows.column("image_size").to_pylist()
        return torch.stack(
            [
                self.transform(decode_rgb(self._read(path, offset, size, record_id), path, record_id))
                for record_id, path, offset, size in zip(ids, paths, offsets, sizes)
            ]
        )

    @staticmethod
    def _read(path: str, offset: int | None, size: int | None, record_id: str) -> bytes:
        try:
            return read_image_bytes(path, offset, size)
        except OSError as error:
            raise DataError(f"record {record_id!r} image {path}: cannot be read ({error})") from error

    def preload(self, chunk: int = 1024) -> None:
        """Decode every image once (memory grows with the side: for data that fits)."""
        n = len(self)
        self.images = torch.cat(
            [
                self._decoded(self.table().slice(start, chunk))
                for start in tqdm(range(0, n, chunk), desc="decoding images", unit="chunk", mininterval=2)
            ]
        )

    def tokens(self, epoch: int, rows: np.ndarray, captions: list[list[str]]) -> torch.Tensor:
        context_length = self.tokenizer.context_length
        uniforms = record_uniforms(self.seed, epoch, rows, 1 + context_length)
        chosen = draw_captions(np.array([len(c) for c in captions]), uniforms[:, 0])
        tokens = self.tokenizer([record[i] for record, i in zip(captions, chosen)])
        return mask_tokens(
            tokens, self.mask_ratio, self.eot_token_id, torch.from_numpy(uniforms[:, 1:]), self.pad_token_id
        )

    def __getitem__(self, item: tuple[int, np.ndarray]):
        epoch, rows = item
        rows = np.sort(rows)  # the batch's order does not change its loss; sorted rows read sequentially
        batch = self.rows(rows)
        images = self.images[torch.from_numpy(rows)] if self.images is not None else self._decoded(batch)
        return images, self.tokens(epoch, rows, batch.column("captions").to_pylist())


def epoch_batches(n_records: int, batch_size: int, epoch: int, seed: int, rank: int, world_size: int):
    """(epoch, this process's rows) per step: consecutive global batches of one seeded permutation.

    Every record is in exactly one batch per epoch, but for the n % batch_size left over.
    """
    order = np.random.default_rng([seed, epoch]).permutation(n_records)
    return [
        (epoch, order[start : start + batch_size][rank::world_size])
        for start in range(0, n_records - batch_size + 1, batch_size)
    ]
