"""Parquet and file I/O shared by every stage.

Every output is written to a temporary name beside its target and renamed into
place, so a killed job never leaves a file that looks finished. Every Parquet
file carries provenance metadata: the producing stage, the parameters that
shaped it (and their hash) and the versions of the packages that matter, and a
CRC checksum on every page, which readers verify (`verify_checksums`,
`open_parquet`): a file damaged on disk is refused instead of read as data.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterator, Mapping
from importlib import metadata as importlib_metadata
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

METADATA_PREFIX = "dejavu:"
_VERSIONED_PACKAGES = (
    "dejavu-workflow",
    "torch",
    "open-clip-torch",
    "faiss-cpu",
    "faiss-gpu",
    "polars",
    "pyarrow",
    "numpy",
)


class DataError(ValueError):
    """Bad input data: the message names the file, the record and what is wrong."""


def package_versions() -> dict[str, str]:
    versions = {}
    for name in _VERSIONED_PACKAGES:
        try:
            versions[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            continue
    return versions


def params_hash(params: Mapping) -> str:
    """Stable short hash of a JSON-serialisable parameter mapping."""
    canonical = json.dumps(params, sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def provenance(stage: str, params: Mapping) -> dict[str, str]:
    return {
        f"{METADATA_PREFIX}stage": stage,
        f"{METADATA_PREFIX}params": json.dumps(params, sort_keys=True, default=str),
        f"{METADATA_PREFIX}params_hash": params_hash(params),
        f"{METADATA_PREFIX}versions": json.dumps(package_versions(), sort_keys=True),
    }


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it into place on success.

    Works for files and directories. On error the temporary is removed and the
    target is left untouched.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    _remove(tmp)
    try:
        yield tmp
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        _remove(tmp)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _arrow(table: pa.Table | pl.DataFrame) -> pa.Table:
    return table.to_arrow() if isinstance(table, pl.DataFrame) else table


def write_parquet(
    table: pa.Table | pl.DataFrame,
    path: str | os.PathLike,
    *,
    contract,
    stage: str,
    params: Mapping | None = None,
) -> None:
    """Write `table` atomically with provenance, conformed to its `workflow_scripts.contracts.Contract` first."""
    table = contract.conform(_arrow(table), path)
    metadata = dict(table.schema.metadata or {})
    metadata.update({k.encode(): v.encode() for k, v in provenance(stage, params or {}).items()})
    table = table.replace_schema_metadata(metadata)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, write_page_checksum=True)


@contextlib.contextmanager
def parquet_stream(
    path: str | os.PathLike, schema: pa.Schema, stage: str, params: Mapping
) -> Iterator[pq.ParquetWriter]:
    """A ParquetWriter to a temporary name, renamed into place on success, with the provenance metadata.

    Memory stays bounded by what the caller writes at once, not by the file.
    """
    metadata = {
        **(schema.metadata or {}),
        **{key.encode(): value.encode() for key, value in provenance(stage, params).items()},
    }
    with (
        atomic_path(path) as tmp,
        pq.ParquetWriter(tmp, schema.with_metadata(metadata), write_page_checksum=True) as writer,
    ):
        yield writer


def open_parquet(path: str | os.PathLike) -> pq.ParquetFile:
    """A pyarrow reader of `path` that verifies every page's checksum as it reads (pages written without one,
    e.g. by another tool, are read unverified)."""
    return pq.ParquetFile(path, page_checksum_verification=True)


@contextlib.contextmanager
def damage_named(path: str | os.PathLike) -> Iterator[None]:
    """Reads inside it that meet a page failing its checksum raise a DataError naming `path`."""
    try:
        yield
    except OSError as error:
        if "checksum" not in str(error).lower():
            raise
        raise DataError(f"{path}: the file is damaged: its pages fail verification ({error})") from error


# (path, size, mtime) -> the columns this process verified in that file (None: all of them)
_VERIFIED: dict[tuple, frozenset[str] | None] = {}
VERIFY_BATCH_ROWS = 1 << 16


def verify_checksums(path: str | os.PathLike, columns: list[str] | None = None) -> None:
    """Read `columns` (default: all) of `path` page by page, checking each page's CRC (memory: one batch); a file
    changed since it was written is a DataError naming it. Readers that do not verify (polars) call this first;
    columns already verified by this process in the file, unchanged since, are not read again."""
    stat = os.stat(path)
    key = (os.fspath(path), stat.st_size, stat.st_mtime_ns)
    done, wanted = _VERIFIED.get(key, frozenset()), None if columns is None else frozenset(columns)
    if done is None or (wanted is not None and wanted <= done):
        return
    with damage_named(path):
        for _ in open_parquet(path).iter_batches(batch_size=VERIFY_BATCH_ROWS, columns=columns):
            pass
    _VERIFIED[key] = None if wanted is None else done | wanted


def narrow(data_type: pa.DataType) -> pa.DataType:
    """large_string -> string and large_list -> list, recursively (polars writes the large variants)."""
    if pa.types.is_large_string(data_type):
        return pa.string()
    if pa.types.is_large_list(data_type) or pa.types.is_list(data_type):
        return pa.list_(narrow(data_type.value_type))
    if pa.types.is_fixed_size_list(data_type):
        return pa.list_(narrow(data_type.value_type), data_type.list_size)
    return data_type


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    raw = pq.read_schema(path).metadata or {}
    return {k.decode(): v.decode() for k, v in raw.items() if k.decode().startswith(METADATA_PREFIX)}


def check_unique_ids(ids: pl.Series, path: str | os.PathLike, column: str = "id") -> None:
    duplicated = ids.filter(ids.is_duplicated()).unique().sort()
    if len(duplicated):
        shown = ", ".join(duplicated.head(10).to_list())
        raise DataError(f"{path}: {len(duplicated)} duplicate {column}(s), e.g. {shown}")


def embeddings_table(ids: list[str] | np.ndarray, embeddings: np.ndarray) -> pa.Table:
    """Build the embeddings contract table: id, fixed_size_list<float32>[d]."""
    embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
    values = pa.array(embeddings.reshape(-1), type=pa.float32())
    column = pa.FixedSizeListArray.from_arrays(values, embeddings.shape[1])
    return pa.table({"id": pa.array(list(ids), type=pa.string()), "embedding": column})


def embeddings_from_table(table: pa.Table, path: str | os.PathLike) -> tuple[pa.StringArray, np.ndarray]:
    """(ids, float32 matrix [n, d]) of a table of the embeddings contract read from `path`."""
    column = table.column("embedding").combine_chunks()
    if not pa.types.is_fixed_size_list(column.type):
        raise DataError(f"{path}: column 'embedding' must be fixed_size_list<float32>, found {column.type}")
    matrix = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    return table.column("id").combine_chunks(), matrix.reshape(-1, column.type.list_size)


def read_embeddings(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Return (ids as an object array, float32 matrix [n, d]) from an embeddings Parquet file."""
    with damage_named(path):
        table = open_parquet(path).read(columns=["id", "embedding"])
    ids, matrix = embeddings_from_table(table, path)
    return np.asarray(ids.to_pylist(), dtype=object), matrix
