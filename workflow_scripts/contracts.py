"""Every Parquet table of the workflow, declared once in Arrow types.

A `Contract` names a table's required columns and their types. Writers conform a table to it before it
reaches disk (missing columns and uncastable types are refused, naming the file); readers scan through it,
so a file from elsewhere (an adapter's input, a benchmark's output, a hand-written annotation table) is
refused with the file, the column and the type found rather than failing deep inside a stage. Readers accept
the physical variants other writers produce: any integer width for an integer column, any float width for
a float column, large or view strings, large lists.

docs/DESIGN.md §4 lists these tables for users; tests/test_contracts.py keeps the two in step.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl
import pyarrow as pa

from workflow_scripts.io import DataError, narrow

EMBEDDING = pa.list_(pa.float32(), 1)  # fixed-size list of float32; the width is the model's, any is accepted
STRINGS = pa.list_(pa.string())
FLOATS = pa.list_(pa.float32())


@dataclass(frozen=True)
class Contract:
    """A Parquet table's required columns (in order) and optional columns, with their Arrow types."""

    name: str
    path: str  # where the workflow writes it, in the grammar of docs/DESIGN.md §3
    columns: tuple[pa.Field, ...]
    optional: tuple[pa.Field, ...] = field(default=())

    @property
    def schema(self) -> pa.Schema:
        return pa.schema(self.columns)

    @property
    def names(self) -> list[str]:
        return [column.name for column in self.columns]

    def declared(self, name: str) -> pa.Field | None:
        return next((column for column in (*self.columns, *self.optional) if column.name == name), None)

    def conform(self, table: pa.Table, path: str | os.PathLike) -> pa.Table:
        """`table` with every declared column cast to its declared type; DataError naming `path` otherwise."""
        missing = [name for name in self.names if name not in table.column_names]
        if missing:
            raise DataError(f"{path}: the {self.name} table lacks column(s) {missing}; has {table.column_names}")
        wrong = [f"'{found.name}' is {found.type}, not {self.declared(found.name).type}" for found in table.schema
                 if self.declared(found.name) is not None
                 and not _compatible(self.declared(found.name).type, _polars_type(found.type))]
        if wrong:
            raise DataError(f"{path}: {self.name} column(s) of the wrong type: {'; '.join(wrong)}")
        fields = [found.with_type(self._write_type(found)) for found in table.schema]
        try:
            return table.cast(pa.schema(fields, metadata=table.schema.metadata))
        except pa.ArrowInvalid as error:  # a value out of the declared type's range
            raise DataError(f"{path}: a {self.name} value does not fit its declared type: {error}") from error

    def _write_type(self, found: pa.Field) -> pa.DataType:
        """The type a column is written with: the declared one (a fixed-size list keeps its width), else narrowed."""
        column = self.declared(found.name)
        if column is None:
            return narrow(found.type)
        if pa.types.is_fixed_size_list(column.type) and pa.types.is_fixed_size_list(found.type):
            return pa.list_(column.type.value_type, found.type.list_size)
        return column.type

    def scan(self, path: str | os.PathLike, columns: list[str] | None = None) -> pl.LazyFrame:
        """A lazy view of `columns` (default: the required ones) of the file at `path`, their types checked."""
        wanted = self.names if columns is None else columns
        schema = _file_schema(path)
        missing = [name for name in wanted if name not in schema]
        if missing:
            raise DataError(f"{path}: not a {self.name} table: missing column(s) {missing}; "
                            f"found {schema.names()}")
        wrong = [f"'{name}' is {schema[name]}, not {self.declared(name).type}" for name in wanted
                 if self.declared(name) is not None and not _compatible(self.declared(name).type, schema[name])]
        if wrong:
            raise DataError(f"{path}: {self.name} column(s) of the wrong type: {'; '.join(wrong)}")
        return pl.scan_parquet(path).select(wanted)

    def read(self, path: str | os.PathLike, columns: list[str] | None = None) -> pl.DataFrame:
        return self.scan(path, columns).collect()


def _file_schema(path: str | os.PathLike) -> pl.Schema:
    if not Path(path).exists():
        raise DataError(f"{path}: file does not exist")
    try:
        return pl.scan_parquet(path).collect_schema()
    except Exception as error:  # polars raises many types for files that are not Parquet
        raise DataError(f"{path}: not a readable Parquet file ({error})") from error


def _compatible(declared: pa.DataType, found: pl.DataType) -> bool:
    """Whether a column polars reads as `found` holds values of the declared Arrow type."""
    if pa.types.is_integer(declared):
        return found.is_integer()
    if pa.types.is_floating(declared):
        return found.is_float()
    if pa.types.is_string(declared):
        return found == pl.String
    if pa.types.is_fixed_size_list(declared):
        return isinstance(found, pl.Array) and _compatible(declared.value_type, found.inner)
    if pa.types.is_list(declared):
        return isinstance(found, pl.List) and _compatible(declared.value_type, found.inner)
    return _polars_type(declared) == found


def _polars_type(data_type: pa.DataType) -> pl.DataType:
    return pl.from_arrow(pa.table({"c": pa.array([], data_type)}))["c"].dtype


def _fields(*pairs: tuple[str, pa.DataType]) -> tuple[pa.Field, ...]:
    return tuple(pa.field(name, data_type) for name, data_type in pairs)


RECORDS = Contract("records", "data/{dataset}/records.parquet",
                   _fields(("id", pa.string()), ("image_path", pa.string()), ("captions", STRINGS)),
                   _fields(("image_sha256", pa.string()), ("scene", pa.string()), ("coco_id", pa.int64()),
                           ("label", pa.string()), ("source_dataset", pa.string()),
                           ("dominant_object", pa.string()), ("image_offset", pa.int64()),
                           ("image_size", pa.int64())))
GROUND_TRUTH = Contract("ground_truth", "data/{dataset}/ground_truth.parquet",
                        _fields(("id", pa.string()), ("labels", STRINGS), ("scores", FLOATS)))
VALIDATION = Contract("validation", "data/{dataset}/validation.parquet",
                      _fields(("id", pa.string()), ("image_path", pa.string()), ("problem", pa.string())))
ANNOTATIONS = Contract("annotations", "data/{dataset}/annotations.parquet",
                       _fields(("id", pa.string()), ("labels", STRINGS), ("scores", FLOATS)))
DETIC_VOCABULARY = Contract("detic vocabulary", "detic/vocabularies/{name}-{hash}.parquet",
                            _fields(("class_name", pa.string()), ("embedding", EMBEDDING)))
SPLIT_IDS = Contract("split ids", "splits/{split}/{A,B,holdout}.parquet", _fields(("id", pa.string())))
EMBEDDINGS = Contract("embeddings", "embeddings/{split}/{point}/{side}/{public,captions,public_captions}.parquet",
                      _fields(("id", pa.string()), ("embedding", EMBEDDING)))
NEIGHBORS = Contract("neighbors", "neighbors/{split}/{point}/{side}.parquet",
                     _fields(("query_id", pa.string()), ("rank", pa.int16()), ("public_id", pa.string()),
                             ("score", pa.float32())))
