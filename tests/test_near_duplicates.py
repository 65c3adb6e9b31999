"""Near-duplicates: the thumbnail descriptor, the exact similarity search, planted copies, unreadable images,
and the SSL test's screening of its public set X."""

import io

import numpy as np
import polars as pl
import pytest
from PIL import Image

from workflow_scripts import synthetic
from workflow_scripts.contracts import RECORDS, SPLIT_IDS
from workflow_scripts.io import DataError, write_parquet
from workflow_scripts.near_duplicates import (
    DEFAULT_MIN_SIMILARITY,
    PAIRS_SCHEMA,
    OverlapError,
    descriptor,
    near_duplicate_pairs,
    record_descriptors,
)
from workflow_scripts.ssl.overlap import screen_ssl_public


def smooth_image(seed: int, size: int = 64) -> Image.Image:
    """Random colours on a 6x6 grid, upsampled."""
    grid = np.random.default_rng(seed).integers(0, 256, size=(6, 6, 3), dtype=np.uint8)
    return Image.fromarray(grid).resize((size, size), Image.Resampling.BICUBIC)


def jpeg(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue()))


COPIES = {
    "jpeg50": lambda image: jpeg(image, 50),
    "jpeg75": lambda image: jpeg(image, 75),
    "resized48": lambda image: image.resize((48, 48), Image.Resampling.BICUBIC),
    "resized128": lambda image: image.resize((128, 128), Image.Resampling.BICUBIC),
    "resized96_jpeg50": lambda image: jpeg(image.resize((96, 96), Image.Resampling.BICUBIC), 50),
}


def save_records(folder, images: dict[str, Image.Image]) -> str:
    """Save `images` (id: image) as PNG files under folder; the records path their image_path is relative to."""
    (folder / "images").mkdir(parents=True)
    for record_id, image in images.items():
        image.save(folder / "images" / f"{record_id}.png")
    return str(folder / "records.parquet")


def records_of(ids) -> pl.DataFrame:
    return pl.DataFrame({"id": list(ids), "image_path": [f"images/{record_id}.png" for record_id in ids]})


def vectors(**rows: list[float]) -> tuple[pl.Series, np.ndarray]:
    matrix = np.array(list(rows.values()), np.float32).reshape(len(rows), -1)
    return pl.Series("id", list(rows), pl.String), matrix


def test_descriptor_by_hand():
    # A 2x2 image, half black half white, at side 2: pixels 0 and 255 (each repeated over RGB) minus their mean
    # 127.5 are ±127.5, of unit length ±1/√12.
    pixels = np.array([[[0] * 3, [255] * 3], [[255] * 3, [0] * 3]], np.uint8)
    vector = descriptor(Image.fromarray(pixels), side=2)
    assert vector == pytest.approx(np.repeat([-1, 1, 1, -1], 3) / np.sqrt(12))
    assert not descriptor(Image.new("RGB", (8, 8), (90, 90, 90)), side=2).any()  # a flat image: zeros
    inverted = descriptor(Image.fromarray(255 - pixels), side=2)
    assert float(vector @ inverted) == pytest.approx(-1.0)


def test_pairs_are_the_hand_computed_ones():
    pool = vectors(p_x=[1, 0], p_y=[0, 1])
    public = vectors(q_x=[1, 0], q_diag=[0.6, 0.8], q_minus=[-1, 0])
    expected = [("p_x", "q_x", 1.0), ("p_x", "q_diag", 0.6), ("p_y", "q_diag", 0.8)]
    pairs = near_duplicate_pairs(pool, public, min_similarity=0.6)
    assert pairs.schema == pl.Schema(PAIRS_SCHEMA)
    assert [r[:2] for r in pairs.rows()] == [r[:2] for r in expected]
    assert pairs["similarity"].to_list() == pytest.approx([1.0, 0.6, 0.8])
    # the threshold itself is included, a hair above it is not; batches change nothing
    assert [r[:2] for r in near_duplicate_pairs(pool, public, 0.8).rows()] == [("p_x", "q_x"), ("p_y", "q_diag")]
    assert len(near_duplicate_pairs(pool, public, 0.8000001)) == 1
    assert near_duplicate_pairs(pool, public, 0.6, batch_rows=1).rows() == pairs.rows()
    assert len(near_duplicate_pairs(pool, public, -1.0)) == 6


def test_empty_inputs_and_bad_thresholds():
    empty = (pl.Series("id", [], pl.String), np.zeros((0, 2), np.float32))
    for pool, public in ((empty, vectors(a=[1, 0])), (vectors(a=[1, 0]), empty)):
        assert near_duplicate_pairs(pool, public, 0.9).schema == pl.Schema(PAIRS_SCHEMA)
    for threshold in (-1.5, 1.5):
        with pytest.raises(ValueError, match="min_similarity"):
            near_duplicate_pairs(vectors(a=[1, 0]), vectors(b=[1, 0]), threshold)


def test_planted_copies_are_found_and_distinct_images_are_not(tmp_path):
    pool_images = {f"pool-{seed}": smooth_image(seed) for seed in range(24)}
    public_images = {f"other-{seed}": smooth_image(seed) for seed in range(100, 124)}
    planted = {}
    for seed in range(12):
        for name, copy in COPIES.items():
            planted[f"copy-{seed}-{name}"] = f"pool-{seed}"
            public_images[f"copy-{seed}-{name}"] = copy(pool_images[f"pool-{seed}"])
    pool = record_descriptors(records_of(pool_images), save_records(tmp_path / "pool", pool_images), threads=2)
    public = record_descriptors(records_of(public_images), save_records(tmp_path / "public", public_images))
    assert pool[0].to_list() == [*pool_images] and pool[1].shape == (24, 3 * 16 * 16)
    pairs = near_duplicate_pairs(pool, public, DEFAULT_MIN_SIMILARITY)
    assert sorted(pairs.select("public_id", "pool_id").rows()) == sorted(planted.items())


def test_copies_of_synthetic_scenes_are_found_and_other_scenes_are_not(tmp_path):
    synthetic.generate("pool", 40, seed=1, config=synthetic.SyntheticConfig(), out_dir=tmp_path / "pool")
    records = pl.read_parquet(tmp_path / "pool" / "records.parquet")
    scenes = {
        record_id: Image.open(tmp_path / "pool" / path).convert("RGB")
        for record_id, path in records.select("id", "image_path").rows()
    }
    copied = dict(list(scenes.items())[:20])
    copies = {
        f"{record_id}-{name}": copy(image) for record_id, image in copied.items() for name, copy in COPIES.items()
    }
    public_path = save_records(tmp_path / "public", copies)
    pool = record_descriptors(records, str(tmp_path / "pool" / "records.parquet"))
    pairs = near_duplicate_pairs(pool, record_descriptors(records_of(copies), public_path), DEFAULT_MIN_SIMILARITY)
    assert set(pairs.select("pool_id", "public_id").rows()) == {(name.rsplit("-", 1)[0], name) for name in copies}


def test_unreadable_image_names_the_table_and_record(tmp_path):
    records_path = save_records(tmp_path, {"fine": smooth_image(0)})
    (tmp_path / "images" / "broken.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"records\.parquet: record 'broken' image .*broken\.png: unreadable"):
        record_descriptors(records_of(["fine", "broken"]), records_path)


def write_ssl_case(folder, public_folder=None):
    """A pool of 6 images split A, B, shared, holdout, X (public) with X's x_copy_a a JPEG copy of A's a0 and
    x_copy_s a resized copy of shared's s0; X's images under `public_folder` (another data set) when given."""
    pool = {name: smooth_image(seed) for seed, name in enumerate(["a0", "a1", "b0", "s0", "h0"])}
    public = {"x_copy_a": jpeg(pool["a0"], 50), "x_copy_s": COPIES["resized48"](pool["s0"]), "x_other": smooth_image(9)}
    sets = {"A": ["a0", "a1"], "B": ["b0"], "shared": ["s0"], "holdout": ["h0"], "public": sorted(public)}
    tables = {folder: pool | public} if public_folder is None else {folder: pool, public_folder: public}
    for table_folder, images in tables.items():
        records = records_of(images).with_columns(captions=pl.lit([], pl.List(pl.String)))
        write_parquet(records, save_records(table_folder, images), stage="test", contract=RECORDS)
    paths = {name: str(folder / f"{name}.parquet") for name in sets}
    for name, ids in sets.items():
        write_parquet(pl.DataFrame({"id": ids}), paths[name], stage="test", contract=SPLIT_IDS)
    other = None if public_folder is None else str(public_folder / "records.parquet")
    return str(folder / "records.parquet"), other, paths


@pytest.mark.parametrize("other_data_set", [False, True])
@pytest.mark.parametrize("action", ["drop", "report"])
def test_ssl_public_set_loses_the_copies_of_training_images(tmp_path, action, other_data_set):
    records, public_records, sets = write_ssl_case(tmp_path, tmp_path / "other" if other_data_set else None)
    out = {"near_duplicates": str(tmp_path / "pairs.parquet"), "public_screened": str(tmp_path / "screened.parquet")}
    screen_ssl_public(records, **sets, **out, public_records=public_records, action=action)
    pairs = pl.read_parquet(out["near_duplicates"])
    assert sorted(pairs.select("pool_id", "public_id").rows()) == [("a0", "x_copy_a"), ("s0", "x_copy_s")]
    kept = pl.read_parquet(out["public_screened"])["id"].to_list()
    assert kept == (["x_other"] if action == "drop" else ["x_copy_a", "x_copy_s", "x_other"])


def test_ssl_public_set_with_a_copy_is_refused_naming_it(tmp_path):
    records, _, sets = write_ssl_case(tmp_path)
    out = {"near_duplicates": str(tmp_path / "pairs.parquet"), "public_screened": str(tmp_path / "screened.parquet")}
    with pytest.raises(OverlapError, match=r"2 public image\(s\) .*\['a0~x_copy_a"):
        screen_ssl_public(records, **sets, **out, action="refuse")
    sets["public"] = str(tmp_path / "unknown.parquet")
    write_parquet(pl.DataFrame({"id": ["x_other", "nowhere"]}), sets["public"], stage="test", contract=SPLIT_IDS)
    with pytest.raises(DataError, match=r"unknown\.parquet: 1 id\(s\) not in .*records\.parquet, e\.g\. \['nowhere'\]"):
        screen_ssl_public(records, **sets, **out)
