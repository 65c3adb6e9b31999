"""The SSL test's data stages: boxes (synthetic and ImageNet), the per-class split and the periphery crop."""

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageDraw

from workflow_scripts import adapters, boxes, synthetic
from workflow_scripts.contracts import BOXES, CROPS, RECORDS, SPLIT_IDS
from workflow_scripts.io import DataError
from workflow_scripts.ssl import crops as ssl_crops
from workflow_scripts.ssl import splits as ssl_splits
from workflow_scripts.ssl.crops import periphery_crop

CONFIG = synthetic.SyntheticConfig(image_size=48)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    root = tmp_path_factory.mktemp("ssl_synthetic")
    synthetic.generate("pool", 120, seed=4, config=CONFIG, out_dir=root)
    return root


# --- synthetic boxes ---


def test_background_marks_are_drawn_only_when_asked():
    world = synthetic.SceneWorld(CONFIG)
    objects = np.array([0, 5])
    plain, dominant, box = world.render(2, objects, np.random.default_rng(1))
    again = world.render(2, objects, np.random.default_rng(1), synthetic.SceneStyle(background_marks=0))
    assert again[0].tobytes() == plain.tobytes() and again[1:] == (dominant, box)  # no draw spent: VLM data unchanged
    marked = world.render(2, objects, np.random.default_rng(1), synthetic.SceneStyle(background_marks=12))[0]
    differs = np.any(np.asarray(marked) != np.asarray(plain), axis=-1)
    assert differs.mean() > 0.02  # a visible share of the pixels


def test_a_foreground_object_is_drawn_large_on_top_and_is_the_label():
    world = synthetic.SceneWorld(CONFIG)
    objects = np.array([7, 0, 5])
    style = synthetic.SceneStyle(background_marks=4, foreground_radius=0.7)
    image, dominant, box = world.render(1, objects, np.random.default_rng(2), style)
    assert dominant == 7  # objects[0], though not in a grid cell
    side = 2 * 0.7 * CONFIG.image_size / 3
    assert box[2] - box[0] >= side - 2 or box[3] - box[1] >= side - 2  # its drawn extent: the radius asked
    colour = synthetic.COLOURS[world.classes[7].split(" ")[0]]
    inside = np.asarray(image)[box[1] : box[3], box[0] : box[2]]
    assert np.all(inside == colour, axis=-1).mean() > 0.2  # drawn over the other objects


def test_synthetic_boxes_hold_the_dominant_object(scenes):
    table = BOXES.read(scenes / "boxes.parquet")
    records = RECORDS.read(scenes / "records.parquet", ["id", "image_path", "dominant_object"])
    assert table["id"].to_list() == records["id"].to_list()  # one box per record, in record order
    assert (table["image_width"] == 48).all() and (table["image_height"] == 48).all()
    for box, record in zip(table.iter_rows(named=True), records.iter_rows(named=True)):
        x_min, y_min, x_max, y_max = (int(box[name]) for name in ("x_min", "y_min", "x_max", "y_max"))
        assert 0 <= x_min < x_max <= 48 and 0 <= y_min < y_max <= 48
        pixels = np.asarray(Image.open(scenes / record["image_path"]))[y_min:y_max, x_min:x_max]
        colour = synthetic.COLOURS[record["dominant_object"].split(" ")[0]]
        assert (pixels == colour).all(axis=-1).any(), record["id"]


@pytest.mark.parametrize("shape", synthetic.SHAPES)
def test_drawn_box_is_the_box_of_the_drawn_pixels(shape):
    image = Image.new("RGB", (40, 40))
    synthetic._draw_shape(ImageDraw.Draw(image), shape, 17.3, 21.6, 9.1, (200, 10, 10))
    assert synthetic.drawn_box(40, shape, 17.3, 21.6, 9.1) == image.getbbox()


def test_synthetic_boxes_are_seeded(tmp_path):
    for name in ("a", "b"):
        synthetic.generate("x", 6, seed=9, config=CONFIG, out_dir=tmp_path / name)
    assert BOXES.read(tmp_path / "a" / "boxes.parquet").equals(BOXES.read(tmp_path / "b" / "boxes.parquet"))


# --- ImageNet boxes ---

XML = """<annotation><filename>{stem}</filename><size><width>{w}</width><height>{h}</height><depth>3</depth></size>
{objects}</annotation>"""
OBJECT = "<object><name>{name}</name><bndbox><xmin>{0}</xmin><ymin>{1}</ymin><xmax>{2}</xmax><ymax>{3}</ymax></bndbox></object>"


def _xml(path, stem, size, *objects):
    body = "".join(OBJECT.format(*box, name=name) for name, box in objects)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(XML.format(stem=stem, w=size[0], h=size[1], objects=body))


@pytest.fixture
def imagenet(tmp_path):
    """A two-class image folder (image sizes differ) as the image_folder adapter writes it."""
    sizes = {"n01/n01_1": (40, 30), "n01/n01_2": (20, 24), "n02/n02_5": (32, 32)}
    for index, (name, size) in enumerate(sizes.items()):
        path = tmp_path / "train" / f"{name}.JPEG"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size, (index * 60, 90, 30)).save(path, format="JPEG")
    adapted = adapters.image_folder("imnet", str(tmp_path / "train"))
    adapters.write_dataset(adapted, tmp_path / "data", adapters.Validation(), {})
    return tmp_path


def test_loc_csv_boxes_keyed_by_record_ids_of_the_label_class(imagenet):
    csv = imagenet / "LOC.csv"
    csv.write_text(
        "ImageId,PredictionString\n"
        "n01_1,n01 2 3 20 25 n02 0 0 5 5 n01 1 1 4 4 \n"
        "n02_5,n02 0 0 31 32\n"
        "n77_9,n77 0 0 1 1\n"  # no record: counted, not refused
    )
    out = imagenet / "boxes.parquet"
    boxes.main(
        ["imagenet", "--records", str(imagenet / "data/records.parquet"), "--loc-csv", str(csv), "--out", str(out)]
    )
    table = BOXES.read(out)
    assert table["id"].to_list() == ["imnet-n01/n01_1.JPEG", "imnet-n01/n01_1.JPEG", "imnet-n02/n02_5.JPEG"]
    assert table.row(0) == ("imnet-n01/n01_1.JPEG", 40, 30, 2.0, 3.0, 20.0, 25.0)  # size from the image header
    assert table.row(1)[3:] == (1.0, 1.0, 4.0, 4.0)  # the n02 box of an n01 image is dropped
    assert table.row(2)[1:3] == (32, 32)


def test_xml_boxes_take_their_size_and_win_over_the_csv(imagenet):
    _xml(imagenet / "xml/n01/n01_1.xml", "n01_1", (40, 30), ("n01", (5, 6, 7, 8)), ("n02", (0, 0, 3, 3)))
    _xml(imagenet / "xml/n01/n01_2.xml", "n01_2", (20, 24), ("n01", (1, 2, 19, 23)))
    csv = imagenet / "LOC.csv"
    csv.write_text("ImageId,PredictionString\nn01_1,n01 0 0 9 9\nn02_5,n02 1 1 2 2\n")
    out = imagenet / "boxes.parquet"
    records = str(imagenet / "data/records.parquet")
    boxes.imagenet_boxes(records, str(csv), str(imagenet / "xml"), "label", str(out), threads=2)
    table = BOXES.read(out)
    assert table.rows() == [
        ("imnet-n01/n01_1.JPEG", 40, 30, 5.0, 6.0, 7.0, 8.0),
        ("imnet-n01/n01_2.JPEG", 20, 24, 1.0, 2.0, 19.0, 23.0),
        ("imnet-n02/n02_5.JPEG", 32, 32, 1.0, 1.0, 2.0, 2.0),
    ]


@pytest.mark.parametrize(
    "line, message",
    [
        ("n01_1,n01 2 3 20", r"line 3 \(ImageId 'n01_1'\) has a PredictionString not in groups of 5"),
        ("n01_1,n01 2 3 20 x", r"line 3 \(ImageId 'n01_1'\) has a coordinate that is no number"),
        ("n01_1,n01 20 3 2 25", r"line 3 \(ImageId 'n01_1'\) has a box with x_max < x_min"),
    ],
)
def test_malformed_csv_lines_are_refused_naming_file_and_line(imagenet, line, message):
    csv = imagenet / "LOC.csv"
    csv.write_text(f"ImageId,PredictionString\nn01_2,n01 1 1 2 2\n{line}\n")
    with pytest.raises(DataError, match=rf"LOC\.csv: {message}"):
        boxes.imagenet_boxes(str(imagenet / "data/records.parquet"), str(csv), None, "label", "b.parquet", 1)


def test_malformed_xml_and_records_without_labels_are_refused(imagenet, tmp_path):
    path = imagenet / "xml/n01/n01_1.xml"
    _xml(path, "n01_1", (40, 30), ("n01", (5, 6, 7, 8)))
    path.write_text(path.read_text().replace("<xmax>7</xmax>", ""))
    with pytest.raises(DataError, match=r"n01_1\.xml: missing or non-numeric"):
        boxes.read_xml_dir(imagenet / "xml")
    _xml(path, "n01_1", (0, 30), ("n01", (5, 6, 7, 8)))
    with pytest.raises(DataError, match=r"n01_1\.xml: image size 0x30 is not positive"):
        boxes.read_xml_dir(imagenet / "xml")
    path.write_text("<annotation>")
    with pytest.raises(DataError, match=r"n01_1\.xml: not a readable XML file"):
        boxes.read_xml_dir(imagenet / "xml")
    unlabelled = tmp_path / "records.parquet"
    pl.read_parquet(imagenet / "data/records.parquet").drop("label").write_parquet(unlabelled)
    with pytest.raises(DataError, match=r"records\.parquet: not a records table: missing column\(s\) \['label'\]"):
        boxes.imagenet_boxes(str(unlabelled), None, str(imagenet / "xml"), "label", "b.parquet", 1)


# --- the SSL split ---


def _pool(tmp_path, n_per_class=(30, 12), boxed_every=2):
    ids = [f"{label}-{i:03d}" for label, n in zip("pq", n_per_class) for i in range(n)]
    records = pl.DataFrame({"id": ids, "image_path": ids, "captions": [[]] * len(ids), "label": [i[0] for i in ids]})
    records.sample(fraction=1.0, shuffle=True, seed=3).write_parquet(tmp_path / "records.parquet")  # file order: any
    boxed = [record_id for index, record_id in enumerate(ids) if index % boxed_every == 0]
    frame = pl.DataFrame({"id": boxed, "image_width": 10, "image_height": 10, "x_min": 1.0, "y_min": 1.0})
    frame.with_columns(x_max=pl.lit(5.0), y_max=pl.lit(5.0)).write_parquet(tmp_path / "boxes.parquet")
    return set(boxed)


def _split(tmp_path, out="split", **flags):
    flags = {"per_class": 4, "holdout_per_class": 2, "public_per_class": 5, "seed": 0, **flags}
    argv = [f"--{key.replace('_', '-')}={value}" for key, value in flags.items()]
    records, boxes_file = str(tmp_path / "records.parquet"), str(tmp_path / "boxes.parquet")
    ssl_splits.main(
        [
            "--records",
            records,
            "--boxes",
            boxes_file,
            "--label-column",
            "label",
            "--out-dir",
            str(tmp_path / out),
            *argv,
        ]
    )
    return {name: SPLIT_IDS.read(tmp_path / out / f"{name}.parquet")["id"].to_list() for name in ssl_splits.SETS}


def _per_class(ids):
    return {label: sum(record_id[0] == label for record_id in ids) for label in "pq"}


def test_ssl_split_sizes_per_class_and_disjoint(tmp_path):
    boxed = _pool(tmp_path)  # p: 30 images, 15 with a box; q: 12 images, 6 with a box
    sets = _split(tmp_path)
    assert _per_class(sets["holdout"]) == {"p": 2, "q": 2}
    assert _per_class(sets["A"]) == _per_class(sets["B"]) == {"p": 4, "q": 2}  # m = min((6 - 2) // 2, 4) for q
    assert _per_class(sets["public"]) == {"p": 5, "q": 5}
    assert _per_class(sets["shared"]) == {"p": 15, "q": 1}  # everything left
    assert all(set(sets[name]) <= boxed for name in ("A", "B", "holdout"))
    everything = [record_id for ids in sets.values() for record_id in ids]
    assert len(everything) == len(set(everything)) == 42
    assert all(ids == sorted(ids) for ids in sets.values())
    capped = _split(tmp_path, out="capped", shared_per_class=3)
    assert _per_class(capped["shared"]) == {"p": 3, "q": 1}
    assert {name: capped[name] for name in ("A", "B", "holdout", "public")} == {
        name: sets[name] for name in ("A", "B", "holdout", "public")
    }


def test_ssl_split_is_seeded_and_ignores_the_records_file_order(tmp_path):
    _pool(tmp_path)
    first = _split(tmp_path)
    pl.read_parquet(tmp_path / "records.parquet").reverse().write_parquet(tmp_path / "records.parquet")
    assert _split(tmp_path, out="again") == first
    assert _split(tmp_path, out="other", seed=1) != first


def test_ssl_split_refuses_records_without_labels(tmp_path):
    _pool(tmp_path)
    records = pl.read_parquet(tmp_path / "records.parquet")
    records.drop("label").write_parquet(tmp_path / "records.parquet")
    with pytest.raises(DataError, match=r"records\.parquet: no label column 'label'"):
        _split(tmp_path)
    records.with_columns(label=pl.when(pl.col("id") == "p-003").then(None).otherwise("label")).write_parquet(
        tmp_path / "records.parquet"
    )
    with pytest.raises(DataError, match=r"records\.parquet: 1 record\(s\) without a 'label', e\.g\. \['p-003'\]"):
        _split(tmp_path)


# --- the periphery crop ---


def test_periphery_crop_by_hand():
    assert periphery_crop(np.array([[40, 0, 60, 100]]), 100, 100, 10) == ((60, 0, 100, 100), None)  # a 40x100 side
    assert periphery_crop(np.array([[40, 0, 60, 100]]), 100, 100, 40) == (None, "too_small")  # side must be > min_px
    assert periphery_crop(np.array([[40, 0, 60, 100]]), 100, 100, 39)[0] == (60, 0, 100, 100)
    # Two boxes: strips 0|10|30|50|90|100; the strip 50-90 above the second box (40 x 60) wins.
    two = np.array([[10, 10, 30, 30], [50, 60, 90, 95]])
    assert periphery_crop(two, 100, 100, 10) == ((50, 0, 90, 60), None)
    assert periphery_crop(np.array([[0, 0, 100, 100]]), 100, 100, 0) == (None, "too_small")  # no free space
    assert periphery_crop(np.array([[0, 0, 100, 30]]), 100, 80, 10) == ((0, 30, 100, 80), None)  # touches 3 edges
    assert periphery_crop(np.array([[0, 0, 50, 100]]), 100, 100, 10) == ((50, 0, 100, 100), None)


def test_periphery_crop_reasons_and_pixel_rounding():
    assert periphery_crop(np.zeros((0, 4)), 100, 100, 10) == (None, "no_box")
    assert periphery_crop(np.array([[0, 0, 102, 50]]), 100, 100, 10) == (None, "box_outside_image")
    assert periphery_crop(np.array([[-1.5, 0, 10, 50]]), 100, 100, 10) == (None, "box_outside_image")
    assert periphery_crop(np.array([[50, 60, 40, 70]]), 100, 100, 10) == (None, "box_outside_image")  # inverted
    assert periphery_crop(np.array([[0, 0, 100.5, 50]]), 100, 100, 10) == ((0, 50, 100, 100), None)  # clipped
    assert periphery_crop(np.array([[40.5, 0, 59.2, 100]]), 100, 100, 10) == ((60, 0, 100, 100), None)  # outward
    assert periphery_crop(np.array([[40.5, 0, 59.2, 100]]), 100, 100, 10)[0][0] == 60


def _interiors_meet(crop, box) -> bool:
    return min(crop[2], box[2]) > max(crop[0], box[0]) and min(crop[3], box[3]) > max(crop[1], box[1])


@settings(max_examples=300, deadline=None)
@given(
    st.integers(1, 120),
    st.integers(1, 120),
    st.lists(st.tuples(*[st.floats(0, 1, allow_nan=False)] * 4), min_size=1, max_size=6),
    st.integers(0, 30),
)
def test_periphery_crop_never_meets_a_box_and_stays_inside(width, height, fractions, min_px):
    found = np.array(
        [[min(a, c) * width, min(b, d) * height, max(a, c) * width, max(b, d) * height] for a, b, c, d in fractions]
    )
    crop, reason = periphery_crop(found, width, height, min_px)
    if crop is None:
        assert reason == "too_small"
        return
    assert reason is None and 0 <= crop[0] < crop[2] <= width and 0 <= crop[1] < crop[3] <= height
    assert min(crop[2] - crop[0], crop[3] - crop[1]) > min_px
    assert not any(_interiors_meet(crop, box) for box in found)


def test_crops_stage_writes_every_id_with_its_label_and_reason(scenes, tmp_path):
    table = pl.read_parquet(scenes / "boxes.parquet")
    bad = table.with_columns(x_max=pl.when(pl.col("id") == "pool-0000003").then(99.0).otherwise("x_max"))
    bad.filter(pl.col("id") != "pool-0000004").write_parquet(tmp_path / "boxes.parquet")
    pl.DataFrame({"id": [f"pool-{i:07d}" for i in range(6)]}).write_parquet(tmp_path / "A.parquet")
    pl.DataFrame({"id": ["pool-0000010"]}).write_parquet(tmp_path / "B.parquet")
    argv = ["--records", str(scenes / "records.parquet"), "--boxes", str(tmp_path / "boxes.parquet")]
    argv += [
        "--label-column",
        "dominant_object",
        "--ids",
        str(tmp_path / "A.parquet"),
        "--ids",
        str(tmp_path / "B.parquet"),
    ]
    ssl_crops.main([*argv, "--min-px", "8", "--invalid-boxes", "exclude", "--out", str(tmp_path / "crops.parquet")])
    crops = CROPS.read(tmp_path / "crops.parquet")
    records = pl.read_parquet(scenes / "records.parquet")
    assert crops["id"].to_list() == [*(f"pool-{i:07d}" for i in range(6)), "pool-0000010"]
    expected = crops.join(records, on="id").select(pl.col("label") == pl.col("dominant_object"))
    assert expected.to_series().all()
    reasons = dict(crops.select("id", "drop_reason").iter_rows())
    assert reasons["pool-0000003"] == "box_outside_image" and reasons["pool-0000004"] == "no_box"
    kept = crops.filter(pl.col("drop_reason").is_null())
    assert len(kept) >= 3 and kept.select((pl.col("x_max") - pl.col("x_min")).min()).item() > 8
    with pytest.raises(DataError, match=r"boxes\.parquet: id 'pool-0000003' has a box outside its 48x48 image"):
        ssl_crops.main([*argv, "--min-px", "8", "--invalid-boxes", "error", "--out", str(tmp_path / "c.parquet")])


def test_ssl_split_draws_x_from_another_data_set_when_asked(tmp_path):
    # The pool as above; another data set of 7 p's and 3 q's. X: min(5, n) per class of it; the pool's images
    # left by the box sets all go to shared (p: 30 - 10 = 20, q: 12 - 6 = 6).
    _pool(tmp_path)
    other = [f"x{label}-{i:03d}" for label, n in (("p", 7), ("q", 3)) for i in range(n)]
    public = pl.DataFrame({"id": other, "image_path": other, "captions": [[]] * 10, "label": [i[1] for i in other]})
    public.write_parquet(tmp_path / "public_records.parquet")
    sets = _split(tmp_path, public_records=tmp_path / "public_records.parquet")
    assert {label: sum(i[1] == label for i in sets["public"]) for label in "pq"} == {"p": 5, "q": 3}
    assert set(sets["public"]) <= set(other) and _per_class(sets["shared"]) == {"p": 20, "q": 6}
    assert {name: sets[name] for name in ("A", "B", "holdout")} == {
        name: _split(tmp_path, out="own")[name] for name in ("A", "B", "holdout")
    }
    pl.concat([public, pl.read_parquet(tmp_path / "records.parquet").head(1)], how="diagonal").write_parquet(
        tmp_path / "public_records.parquet"
    )
    with pytest.raises(DataError, match=r"public_records\.parquet: 1 id\(s\) also in the pool"):
        _split(tmp_path, out="overlap", public_records=tmp_path / "public_records.parquet")
