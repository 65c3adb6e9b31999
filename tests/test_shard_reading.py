"""Tar shard members read by offset (pread): the shards adapter's offsets, reads in any order, training on shards."""

import tarfile

import numpy as np
import polars as pl
import pytest

from real_data import build_shards
from workflow_scripts import adapters, images, train
from workflow_scripts.io import DataError


@pytest.fixture(scope="module")
def shard_records(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    shards = build_shards(root / "laion", 3, 16)
    adapted = adapters.shards("laion", [str(s) for s in shards])
    adapters.write_dataset(adapted, root / "out", adapters.Validation(training_pool=True), {})
    return root, shards


def test_adapter_records_member_offsets_that_read_the_member(shard_records):
    root, shards = shard_records
    records = pl.read_parquet(root / "out" / "records.parquet")
    assert records.schema["image_offset"] == pl.Int64 and records["image_offset"].null_count() == 0
    with tarfile.open(shards[1]) as tar:
        expected = {
            f"{shards[1].resolve()}::{m.name}": tar.extractfile(m).read() for m in tar if m.name.endswith(".jpg")
        }
    rows = records.filter(pl.col("image_path").is_in(list(expected)))
    assert len(rows) == 16
    for row in rows.sample(fraction=1.0, shuffle=True, seed=1).iter_rows(named=True):  # any order
        assert (
            images.read_image_bytes(row["image_path"], row["image_offset"], row["image_size"])
            == expected[row["image_path"]]
        )
        assert images.read_image_bytes(row["image_path"]) == expected[row["image_path"]]  # located by its header


def test_a_truncated_read_and_a_missing_member_are_errors(shard_records):
    _, shards = shard_records
    size = shards[0].stat().st_size
    with pytest.raises(OSError, match="truncated shard"):
        images.read_tar_member(str(shards[0]), size - 10, 100)
    with pytest.raises(DataError, match="file not found"):
        images.load_rgb(images.tar_member_path(shards[0], "nope.jpg"), "r1")


def test_training_reads_shards_in_workers(tmp_path, shard_records):
    root, _ = shard_records
    ids = pl.read_parquet(root / "out" / "records.parquet")["id"]
    pl.DataFrame({"id": ids[:32]}).write_parquet(tmp_path / "A.parquet")
    params = train.TrainingParams(
        epochs=1, batch_size=16, warmup_steps=1, num_workers=2, preload_images=False, mask_ratio=0.5, log_every_steps=1
    )
    train.train(str(root / "out" / "records.parquet"), str(tmp_path / "A.parquet"), tmp_path / "model", params)
    assert pl.read_parquet(tmp_path / "model" / "train_steps.parquet")["step"].to_list() == [1, 2]
    assert (tmp_path / "model" / "model.pt").exists()


def test_a_split_id_missing_from_the_records_is_named(tmp_path, shard_records):
    root, _ = shard_records
    pl.DataFrame({"id": ["laion-nope/1"]}).write_parquet(tmp_path / "A.parquet")
    with pytest.raises(DataError, match="laion-nope/1"):
        train.write_side_table(
            str(root / "out" / "records.parquet"), str(tmp_path / "A.parquet"), tmp_path / "side.arrow"
        )


def test_batch_rows_come_from_every_record_batch_of_the_side_table(tmp_path, shard_records):
    """Rows are taken record batch by record batch (no whole-table concatenation), in sorted order."""
    import pyarrow as pa

    root, _ = shard_records
    records = pl.read_parquet(root / "out" / "records.parquet")
    table = pa.Table.from_batches(records.select("id").to_arrow().to_batches(max_chunksize=7))
    with pa.OSFile(str(tmp_path / "side.arrow"), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=7)
    data = train.SideBatches(tmp_path / "side.arrow", None, None, 0.0, 0)
    assert data.table().num_columns == 1 and len(data._map()[2]) > 5
    rows = np.array([0, 6, 7, 20, 41, 47])
    assert data.rows(rows).column("id").to_pylist() == records["id"].gather(rows).to_list()
