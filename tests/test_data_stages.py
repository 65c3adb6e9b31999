"""Synthetic generation, annotation and splits: determinism, contracts and refusal of overlap."""

import polars as pl
import pytest
from PIL import Image

from workflow_scripts import annotate, splits, synthetic
from workflow_scripts.io import DataError, read_metadata
from workflow_scripts.near_duplicates import DEFAULT_MIN_SIMILARITY

CONFIG = synthetic.SyntheticConfig(image_size=32)
THUMBNAIL = 8  # near-duplicate thumbnails of a quarter of the image side, as the default's 16 of 64


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    root = tmp_path_factory.mktemp("scenes")
    synthetic.generate("pool", 60, seed=1, config=CONFIG, out_dir=root / "pool")
    synthetic.generate("public", 30, seed=2, config=CONFIG, out_dir=root / "public")
    return root


def test_vocabulary_and_records_contract(scenes):
    assert len(synthetic.class_names()) >= 40
    records = pl.read_parquet(scenes / "pool" / "records.parquet")
    assert records.schema["captions"] == pl.List(pl.String)
    assert records["id"].n_unique() == 60 and records["id"].str.starts_with("pool-").all()
    image = Image.open(scenes / "pool" / records["image_path"][0])
    assert image.size == (32, 32)
    meta = read_metadata(scenes / "pool" / "records.parquet")
    assert meta["dejavu:stage"] == "datasets" and "polars" in meta["dejavu:versions"]


def test_captions_name_the_scene_and_only_some_objects(scenes):
    records = pl.read_parquet(scenes / "pool" / "records.parquet")
    truth = pl.read_parquet(scenes / "pool" / "ground_truth.parquet")
    joined = records.join(truth, on="id")
    named_fraction = []
    for caption, scene, labels in joined.select(pl.col("captions").list.first(), "scene", "labels").iter_rows():
        assert scene in caption
        named = [label for label in labels if label in caption]
        assert 1 <= len(named) <= 2
        named_fraction.append(len(named) / len(labels))
    assert sum(named_fraction) / len(named_fraction) < 0.6  # most objects are not in the caption


def test_generation_is_seeded(tmp_path):
    synthetic.generate("x", 5, seed=7, config=CONFIG, out_dir=tmp_path / "a")
    synthetic.generate("x", 5, seed=7, config=CONFIG, out_dir=tmp_path / "b")
    synthetic.generate("x", 5, seed=8, config=CONFIG, out_dir=tmp_path / "c")
    a, b, c = (pl.read_parquet(tmp_path / d / "records.parquet") for d in "abc")
    assert a.equals(b) and not a["image_sha256"].equals(c["image_sha256"])


def test_scenes_make_objects_co_occur(tmp_path):
    synthetic.generate("x", 400, seed=3, config=CONFIG, out_dir=tmp_path)
    joined = pl.read_parquet(tmp_path / "records.parquet").join(
        pl.read_parquet(tmp_path / "ground_truth.parquet"), on="id"
    )
    world = synthetic.SceneWorld(CONFIG)
    preferred = {
        synthetic.SCENES[s]: {world.classes[i] for i in world.preferred[s]} for s in range(len(synthetic.SCENES))
    }
    exploded = joined.select("scene", "labels").explode("labels")
    in_preferred = sum(label in preferred[scene] for scene, label in exploded.iter_rows()) / exploded.height
    assert in_preferred > 0.7  # vs 10/48 if objects ignored the scene


def test_annotate_ground_truth_fills_missing_and_rejects_unknown(scenes, tmp_path):
    records = pl.read_parquet(scenes / "pool" / "records.parquet")
    truth = pl.read_parquet(scenes / "pool" / "ground_truth.parquet")
    partial = truth.slice(1)  # first record has no row: it must get empty lists
    partial.write_parquet(tmp_path / "gt.parquet")
    annotate.annotate_ground_truth(
        str(scenes / "pool" / "records.parquet"), str(tmp_path / "gt.parquet"), str(tmp_path / "annotations.parquet")
    )
    out = pl.read_parquet(tmp_path / "annotations.parquet")
    assert out.height == records.height and out["labels"][0].to_list() == []
    assert out.schema["scores"] == pl.List(pl.Float32)
    pl.concat(
        [truth, pl.DataFrame({"id": ["ghost"], "labels": [["red circle"]], "scores": [[1.0]]}, schema=truth.schema)]
    ).write_parquet(tmp_path / "bad.parquet")
    with pytest.raises(DataError, match="ghost"):
        annotate.annotate_ground_truth(
            str(scenes / "pool" / "records.parquet"), str(tmp_path / "bad.parquet"), str(tmp_path / "x.parquet")
        )


def make_splits(scenes, out, pool_dir=None, **sizes):
    pool_dir = pool_dir or scenes / "pool"
    annotations = pool_dir / "annotations.parquet"
    if not annotations.exists():
        annotate.annotate_ground_truth(
            str(pool_dir / "records.parquet"), str(pool_dir / "ground_truth.parquet"), str(annotations)
        )
    splits.make_splits(
        str(pool_dir / "records.parquet"),
        str(annotations),
        out,
        **{"n_target": 20, "n_reference": 20, "n_holdout": 10, "seed": 0, **sizes},
    )


def check_overlap(scenes, split_dir, pool_dir=None, public_dir=None, **options):
    """The overlap job on split_dir's A, B and holdout against P; returns (near-duplicate pairs, excluded ids)."""
    pool_dir, public_dir = pool_dir or scenes / "pool", public_dir or scenes / "public"
    outputs = {"near_duplicates": split_dir / "near_duplicates.parquet", "excluded": split_dir / "excluded.parquet"}
    splits.check_overlap(
        {name: str(split_dir / f"{name}.parquet") for name in ("A", "B", "holdout")},
        str(pool_dir / "records.parquet"),
        str(public_dir / "records.parquet"),
        {key: str(path) for key, path in outputs.items()},
        **options,
    )
    return pl.read_parquet(outputs["near_duplicates"]), pl.read_parquet(outputs["excluded"])["id"].to_list()


def test_splits_are_disjoint_sized_and_seeded(scenes, tmp_path):
    make_splits(scenes, tmp_path / "s1")
    make_splits(scenes, tmp_path / "s2")
    make_splits(scenes, tmp_path / "s3", seed=1)
    sides = {name: pl.read_parquet(tmp_path / "s1" / f"{name}.parquet")["id"] for name in ("A", "B", "holdout")}
    assert [len(s) for s in sides.values()] == [20, 20, 10]
    assert len(set().union(*map(set, sides.values()))) == 50
    assert sides["A"].equals(pl.read_parquet(tmp_path / "s2" / "A.parquet")["id"])
    assert not sides["A"].equals(pl.read_parquet(tmp_path / "s3" / "A.parquet")["id"])


def test_splits_refuse_a_pool_too_small(scenes, tmp_path):
    with pytest.raises(DataError, match="pool has 60"):
        make_splits(scenes, tmp_path, n_target=50)


def test_overlap_with_public_by_content_hash_is_refused(scenes, tmp_path):
    # A pool that smuggles in a public image under a new id and a new file name.
    pool_dir = tmp_path / "leaky"
    pool_dir.mkdir()
    records = pl.read_parquet(scenes / "pool" / "records.parquet").with_columns(
        image_path=str(scenes / "pool") + "/" + pl.col("image_path")
    )
    public = pl.read_parquet(scenes / "public" / "records.parquet")
    leaked_path = pool_dir / "copy.png"
    Image.open(scenes / "public" / public["image_path"][0]).save(leaked_path)
    leaked = public.head(1).with_columns(
        id=pl.lit("pool-leaked"), image_path=pl.lit(str(leaked_path)), image_sha256=pl.lit(None, pl.String)
    )
    pool = pl.concat([records.drop("image_sha256"), leaked.drop("image_sha256")])
    pool.write_parquet(pool_dir / "records.parquet")
    pl.DataFrame({"id": pool["id"], "labels": [["red circle"]] * pool.height}).write_parquet(
        pool_dir / "ground_truth.parquet"
    )
    make_splits(scenes, tmp_path / "out", pool_dir=pool_dir, n_target=58, n_reference=1, n_holdout=2)
    with pytest.raises(splits.OverlapError, match=r"pool-leaked=public-0000000"):
        check_overlap(scenes, tmp_path / "out", pool_dir=pool_dir)


def public_with_copies(scenes, tmp_path, split_dir):
    """P plus a JPEG re-encoding of A's first image and a resized copy of the holdout's first: (folder, ids)."""
    public_dir = tmp_path / "public_with_copies"
    public_dir.mkdir()
    public = pl.read_parquet(scenes / "public" / "records.parquet").with_columns(
        image_path=str(scenes / "public") + "/" + pl.col("image_path")
    )
    pool = pl.read_parquet(scenes / "pool" / "records.parquet")
    copied = []
    for name, save in (
        ("A", lambda im, p: im.save(p, quality=60)),
        ("holdout", lambda im, p: im.resize((96, 96)).save(p)),
    ):
        source = pool.join(pl.read_parquet(split_dir / f"{name}.parquet").head(1), on="id", how="semi")
        target = public_dir / f"copy_of_{name}.jpg"
        save(Image.open(scenes / "pool" / source["image_path"][0]).convert("RGB"), target)
        copied.append((source["id"][0], f"public-copy-{name}"))
        public = pl.concat(
            [
                public,
                source.with_columns(
                    id=pl.lit(f"public-copy-{name}"),
                    image_path=pl.lit(str(target)),
                    image_sha256=pl.lit(None, pl.String),
                ),
            ],
            how="diagonal_relaxed",
        )
    public.write_parquet(public_dir / "records.parquet")
    return public_dir, copied


@pytest.mark.parametrize("action", ["refuse", "drop", "report"])
def test_re_encoded_and_resized_copies_in_public_are_found(scenes, tmp_path, action):
    make_splits(scenes, tmp_path / "s")
    public_dir, copied = public_with_copies(scenes, tmp_path, tmp_path / "s")
    found = rf"2 public image\(s\) at least {DEFAULT_MIN_SIMILARITY} alike.*public-copy-A"
    if action == "refuse":
        with pytest.raises(splits.OverlapError, match=found):
            check_overlap(scenes, tmp_path / "s", public_dir=public_dir, action="refuse", side=THUMBNAIL)
        return
    pairs, excluded = check_overlap(scenes, tmp_path / "s", public_dir=public_dir, action=action, side=THUMBNAIL)
    assert sorted(pairs.select("pool_id", "public_id").iter_rows()) == sorted(copied)
    assert sorted(excluded) == (sorted(public for _, public in copied) if action == "drop" else [])


def test_a_clean_public_set_has_no_near_duplicates(scenes, tmp_path):
    make_splits(scenes, tmp_path / "s")
    pairs, excluded = check_overlap(scenes, tmp_path / "s")
    assert pairs.height == 0 and excluded == []


def test_overlap_by_id_is_refused():
    a = pl.DataFrame({"id": ["x", "y"], "image_sha256": ["1", "2"]})
    b = pl.DataFrame({"id": ["y", "z"], "image_sha256": ["3", "4"]})
    with pytest.raises(splits.OverlapError, match=r"A and public share 1 id\(s\): \['y'\]"):
        splits.check_disjoint({"A": a, "public": b})


def test_duplicate_images_in_pool_are_refused(tmp_path):
    frame = pl.DataFrame({"id": ["a", "b", "c"], "image_sha256": ["h1", "h1", "h2"]})
    with pytest.raises(splits.OverlapError, match=r"\['a', 'b'\]"):
        splits.check_no_duplicate_images(frame, "pool.parquet")


def test_unhashed_records_are_hashed_and_unreadable_images_named(scenes, tmp_path):
    records = pl.read_parquet(scenes / "pool" / "records.parquet").head(3)
    path = str(scenes / "pool" / "records.parquet")
    rehashed = splits.with_hashes(
        records.with_columns(
            image_sha256=pl.when(pl.col("id") == records["id"][1]).then(None).otherwise(pl.col("image_sha256"))
        ),
        path,
    )
    assert rehashed["image_sha256"].equals(records["image_sha256"])
    broken = records.drop("image_sha256").with_columns(
        image_path=pl.when(pl.col("id") == records["id"][2]).then(pl.lit("images/gone.png")).otherwise("image_path")
    )
    with pytest.raises(DataError, match=f"record '{records['id'][2]}'.*not found"):
        splits.with_hashes(broken, path)
