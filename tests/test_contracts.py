"""Table contracts: conform on write, checked scan on read, and docs/DESIGN.md §4 in step with them."""

import re
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from workflow_scripts import contracts, io
from workflow_scripts.annotate import annotate_precomputed
from workflow_scripts.contracts import ANNOTATIONS, EMBEDDINGS, NEIGHBORS, RECORDS
from workflow_scripts.io import DataError, embeddings_table, write_parquet

DESIGN = Path(__file__).resolve().parents[1] / "docs" / "DESIGN.md"


def neighbors(rank: pa.Array | None = None, **columns) -> pa.Table:
    table = {
        "query_id": pa.array(["q", "q"]),
        "rank": pa.array([0, 1], pa.int64()) if rank is None else rank,
        "public_id": pa.array(["a", "b"]),
        "score": pa.array([0.5, 0.25], pa.float64()),
    }
    return pa.table({**table, **columns})


# --- conform (writers) ---


def test_conform_casts_to_the_declared_types_and_keeps_other_columns():
    table = NEIGHBORS.conform(neighbors(extra=pa.array(["x", "y"], pa.large_string())), "n.parquet")
    assert table.schema.field("rank").type == pa.int16() and table.schema.field("score").type == pa.float32()
    assert table.schema.field("extra").type == pa.string()  # undeclared: narrowed, not dropped


def test_conform_refuses_a_missing_column_naming_file_and_column():
    with pytest.raises(DataError, match=r"n\.parquet: the neighbors table lacks column\(s\) \['score'\]"):
        NEIGHBORS.conform(neighbors().drop(["score"]), "n.parquet")


def test_conform_refuses_a_wrong_type_naming_file_column_and_types():
    with pytest.raises(
        DataError,
        match=r"n\.parquet: neighbors column\(s\) of the wrong type: 'rank' is string, "
        r"not int16",
    ):
        NEIGHBORS.conform(neighbors(rank=pa.array(["0", "1"])), "n.parquet")
    with pytest.raises(DataError, match=r"'labels' is string, not list<item: string>"):
        ANNOTATIONS.conform(pa.table({"id": ["a"], "labels": ["cat"], "scores": [[1.0]]}), "a.parquet")


def test_conform_refuses_a_value_out_of_the_declared_range():
    with pytest.raises(DataError, match=r"n\.parquet: a neighbors value does not fit its declared type"):
        NEIGHBORS.conform(neighbors(rank=pa.array([0, 40_000], pa.int64())), "n.parquet")


def test_conform_keeps_a_fixed_size_list_width():
    table = embeddings_table(["a", "b"], [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    table = table.set_column(1, "embedding", table.column("embedding").cast(pa.list_(pa.float64(), 3)))
    assert EMBEDDINGS.conform(table, "e.parquet").schema.field("embedding").type == pa.list_(pa.float32(), 3)
    with pytest.raises(DataError, match=r"'embedding' is list<item: float>, not fixed_size_list"):
        EMBEDDINGS.conform(pa.table({"id": ["a"], "embedding": pa.array([[1.0]], pa.list_(pa.float32()))}), "e.parquet")


def test_conform_accepts_polars_frames_and_all_null_columns():
    frame = pl.DataFrame({"id": ["a"], "image_path": ["x.png"], "captions": [[]], "coco_id": [None]})
    table = RECORDS.conform(frame, "r.parquet")
    assert table.schema.field("captions").type == pa.list_(pa.string())
    assert table.schema.field("coco_id").type == pa.int64()


def test_write_parquet_with_a_contract_writes_nothing_it_refuses(tmp_path):
    out = tmp_path / "n.parquet"
    with pytest.raises(DataError, match="lacks column"):
        write_parquet(neighbors().drop(["rank"]), out, stage="knn", contract=NEIGHBORS)
    assert not out.exists() and not list(tmp_path.iterdir())
    write_parquet(neighbors(), out, stage="knn", contract=NEIGHBORS)
    assert pq.read_schema(out).remove_metadata().equals(NEIGHBORS.schema)


# --- scan / read (readers) ---


def test_read_accepts_large_and_wide_physical_variants(tmp_path):
    path = tmp_path / "annotations.parquet"
    pq.write_table(
        pa.table(
            {
                "id": pa.array(["a", "b"], pa.large_string()),
                "labels": pa.array([["cat"], []], pa.large_list(pa.large_string())),
                "scores": pa.array([[0.5], []], pa.large_list(pa.float64())),
            }
        ),
        path,
    )
    frame = ANNOTATIONS.read(path)
    assert frame.schema == pl.Schema({"id": pl.String, "labels": pl.List(pl.String), "scores": pl.List(pl.Float32)})
    pq.write_table(neighbors(rank=pa.array([0, 1], pa.uint8())), tmp_path / "n.parquet")
    assert NEIGHBORS.read(tmp_path / "n.parquet")["rank"].dtype == pl.Int16


def test_read_refuses_an_out_of_range_value_naming_the_file(tmp_path):
    pq.write_table(neighbors(rank=pa.array([0, 40_000], pa.int64())), tmp_path / "n.parquet")
    with pytest.raises(DataError, match=r"n\.parquet: a neighbors value does not fit its declared type"):
        NEIGHBORS.read(tmp_path / "n.parquet")


def test_scan_refuses_missing_columns_and_wrong_types_naming_file_column_and_type(tmp_path):
    path = tmp_path / "n.parquet"
    pq.write_table(neighbors().drop(["public_id"]), path)
    with pytest.raises(DataError, match=r"n\.parquet: not a neighbors table: missing column\(s\) \['public_id'\]"):
        NEIGHBORS.scan(path)
    assert NEIGHBORS.read(path, ["query_id", "rank"]).columns == ["query_id", "rank"]  # only what is asked
    pq.write_table(neighbors(score=pa.array(["high", "low"])), path)
    with pytest.raises(
        DataError,
        match=r"n\.parquet: neighbors column\(s\) of the wrong type: 'score' is String, "
        r"not float",
    ):
        NEIGHBORS.scan(path)


def test_scan_extra_keeps_every_column_and_checks_the_declared_optional_ones(tmp_path):
    path = tmp_path / "records.parquet"
    pq.write_table(
        pa.table(
            {"id": ["a"], "image_path": ["x"], "captions": [["c"]], "coco_id": pa.array([7], pa.int32()), "mine": [1.5]}
        ),
        path,
    )
    frame = RECORDS.read(path, extra=True)
    assert frame.columns == ["id", "image_path", "captions", "coco_id", "mine"] and frame["coco_id"].dtype == pl.Int64
    assert RECORDS.read(path).columns == RECORDS.names
    pq.write_table(pa.table({"id": ["a"], "image_path": ["x"], "captions": [["c"]], "coco_id": ["seven"]}), path)
    with pytest.raises(DataError, match=r"'coco_id' is String, not int64"):
        RECORDS.scan(path, extra=True)


def test_scan_keeps_a_fixed_size_list_width(tmp_path):
    path = tmp_path / "e.parquet"
    pq.write_table(embeddings_table(["a"], [[0.6, 0.8]]), path)
    assert EMBEDDINGS.read(path)["embedding"].dtype == pl.Array(pl.Float32, 2)


def test_scan_refuses_a_missing_or_unreadable_file(tmp_path):
    with pytest.raises(DataError, match=r"nowhere\.parquet: file does not exist"):
        NEIGHBORS.scan(tmp_path / "nowhere.parquet")
    (tmp_path / "text.parquet").write_text("not parquet")
    with pytest.raises(DataError, match=r"text\.parquet: not a readable Parquet file"):
        NEIGHBORS.scan(tmp_path / "text.parquet")


def test_a_stage_refuses_a_bad_input_table_naming_file_column_and_type(tmp_path):
    records, annotations = tmp_path / "records.parquet", tmp_path / "mine.parquet"
    pl.DataFrame({"id": ["a"], "image_path": ["x.png"], "captions": [["c"]]}).write_parquet(records)
    pl.DataFrame({"id": ["a"], "labels": ["cat, dog"]}).write_parquet(annotations)
    with pytest.raises(
        DataError,
        match=r"mine\.parquet: annotation table column\(s\) of the wrong type: "
        r"'labels' is String, not list<item: string>",
    ):
        annotate_precomputed(str(records), [str(annotations)], str(tmp_path / "out.parquet"))


# --- docs/DESIGN.md §4 ---


def _expand(text: str) -> list[str]:
    """Shell-style alternatives: `a{b,c}d` -> abd, acd; a brace without a comma (a wildcard) is kept."""
    match = re.search(r"\{([^{}]*,[^{}]*)\}", text)
    if not match:
        return [text]
    return [
        expanded
        for option in match[1].split(",")
        for expanded in _expand(text[: match.start()] + option + text[match.end() :])
    ]


def design_rows() -> list[tuple[list[str], set[str]]]:
    """(file paths, column names in backticks) of each row of the §4 table, `.../x` resolved against the path before."""
    section = DESIGN.read_text().split("\n## 4.", 1)[1].split("\n## ", 1)[0]
    rows, previous = [], None
    for line in section.splitlines():
        if not line.startswith("| ") or line.startswith("| file |"):
            continue
        file_cell, content = line[1:].rstrip().removesuffix("|").split("|", 1)
        paths = []
        for token in re.findall(r"`([^`]+)`", file_cell):
            base = paths[0] if paths else previous  # the row's first path, else the row above's
            if token.startswith(".../") and base is not None:
                token = base.rsplit("/", 1)[0] + token[3:]
            paths.append(token)
        previous = paths[0] if paths else previous
        columns = {
            name for token in re.findall(r"`([^`]+)`", content) for name in _expand(token.split(": ")[0].strip())
        }
        rows.append((paths, columns))
    return rows


def _rows_of(contract: contracts.Contract, rows) -> list[set[str]]:
    """Column sets of the §4 rows that list the contract's path (or its folder, naming the file in the row)."""
    folder, _, name = contract.path.rpartition("/")
    return [
        columns
        for paths, columns in rows
        if contract.path in paths
        or any(contract.path in _expand(path) for path in paths)
        or (f"{folder}/" in paths and name in columns)
    ]


def test_design_table_parses():
    rows = design_rows()
    assert len(rows) > 10
    assert ["data/{dataset}/records.parquet"] in [paths for paths, _ in rows]
    assert "neighbors/{split}/{point}/A/t2t.parquet" in [path for paths, _ in rows for path in paths]


@pytest.mark.parametrize(
    "contract", [c for c in contracts.all_contracts() if c.path is not None], ids=lambda contract: contract.name
)
def test_every_contract_is_a_design_row_naming_its_columns(contract):
    rows = _rows_of(contract, design_rows())
    assert rows, f"docs/DESIGN.md §4 has no row for {contract.path}"
    declared = {column.name for column in (*contract.columns, *contract.optional)}
    unnamed = declared - set().union(*rows)
    assert not unnamed, f"docs/DESIGN.md §4's row for {contract.path} does not name column(s) {sorted(unnamed)}"


def test_every_parquet_design_row_has_a_contract():
    rows = design_rows()
    claimed = {
        id(columns)
        for contract in contracts.all_contracts()
        if contract.path is not None
        for columns in _rows_of(contract, rows)
    }
    orphans = [
        paths
        for paths, columns in rows
        if any(path.endswith(".parquet") for path in paths) and id(columns) not in claimed
    ]
    assert not orphans, f"docs/DESIGN.md §4 lists Parquet tables without a contract: {orphans}"


def damaged_copy(path: Path, column: str, n_bytes: int = 200) -> Path:
    """A copy of `path` with `n_bytes` zeroed in the middle of `column`'s pages (row group 0): data, not framing."""
    chunk = pq.ParquetFile(path).metadata.row_group(0).column(pq.read_schema(path).names.index(column))
    start = chunk.dictionary_page_offset or chunk.data_page_offset
    middle = start + chunk.total_compressed_size // 2
    data = bytearray(path.read_bytes())
    data[middle : middle + n_bytes] = bytes(n_bytes)
    damaged = path.with_name(f"damaged_{path.name}")
    damaged.write_bytes(bytes(data))
    return damaged


def neighbours_table(n_queries: int = 200, k: int = 10) -> pl.DataFrame:
    rng = np.random.default_rng(0)
    return pl.DataFrame(
        {
            "query_id": [f"q{i // k}" for i in range(n_queries * k)],
            "rank": np.tile(np.arange(k), n_queries).astype(np.int16),
            "public_id": [f"p{i}" for i in rng.integers(0, 500, n_queries * k)],
            "score": rng.random(n_queries * k, dtype=np.float32),
        }
    )


def test_a_damaged_file_is_refused_naming_it(tmp_path):
    """Pages carry checksums: 200 bytes overwritten inside the scores are caught, not read as other scores."""
    path = tmp_path / "neighbors.parquet"
    write_parquet(neighbours_table(), path, stage="test", contract=NEIGHBORS)
    damaged = damaged_copy(path, "score")
    with pytest.raises(DataError, match=r"damaged_neighbors\.parquet: the file is damaged"):
        NEIGHBORS.read(damaged)
    # Without the checksum the same damage reads back as data: what the check guards against.
    pq.write_table(pq.read_table(path), tmp_path / "unchecked.parquet")
    unchecked = damaged_copy(tmp_path / "unchecked.parquet", "score")
    changed = NEIGHBORS.read(unchecked)["score"] != NEIGHBORS.read(path)["score"]
    assert changed.sum() > 0


def test_streamed_and_embedding_files_are_verified_too(tmp_path):
    path = tmp_path / "embeddings.parquet"
    rng = np.random.default_rng(1)
    embeddings = rng.normal(size=(500, 16)).astype(np.float32)
    write_parquet(embeddings_table([f"r{i}" for i in range(500)], embeddings), path, stage="test", contract=EMBEDDINGS)
    damaged = damaged_copy(path, "embedding")
    with pytest.raises(DataError, match="the file is damaged"):
        io.verify_checksums(damaged)
    with pytest.raises(DataError, match=r"damaged_embeddings\.parquet: the file is damaged"):
        io.read_embeddings(damaged)
    streamed = tmp_path / "streamed.parquet"
    table = neighbours_table().to_arrow()
    with io.parquet_stream(streamed, table.schema, "test", {}) as writer:
        writer.write_table(table)
    with pytest.raises(DataError, match="the file is damaged"):
        io.verify_checksums(damaged_copy(streamed, "public_id"))
