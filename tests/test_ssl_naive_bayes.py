"""The one-model SSL test's naive Bayes reference: the generator's object boxes, crop tags (ground truth,
precomputed, Detic on crops) and the multinomial naive Bayes, against hand-computed numbers."""

import hashlib
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import polars as pl
import pytest
import torch
from PIL import Image

from workflow_scripts import detic, synthetic
from workflow_scripts.contracts import BOXES, CROP_TAGS, CROPS, OBJECTS, SPLIT_IDS, SSL_PREDICTIONS
from workflow_scripts.images import content_hash
from workflow_scripts.io import DataError, write_parquet
from workflow_scripts.ssl import crop_tags, naive_bayes

torch.set_num_threads(1)


def crops_file(path: Path, rows: list[tuple]) -> str:
    """A CROPS table of (id, label, x_min, y_min, x_max, y_max, drop_reason) rows."""
    write_parquet(pl.DataFrame(rows, schema=CROPS.polars(), orient="row"), path, contract=CROPS, stage="test")
    return str(path)


def ids_file(path: Path, ids: list[str]) -> str:
    write_parquet(pl.DataFrame({"id": ids}), path, contract=SPLIT_IDS, stage="test")
    return str(path)


def tags_file(path: Path, rows: dict[str, list[str]]) -> str:
    """A CROP_TAGS table: each crop's tags with descending scores."""
    table = pl.DataFrame(
        {
            "id": list(rows),
            "labels": list(rows.values()),
            "scores": [[1.0 - 0.1 * i for i in range(len(tags))] for tags in rows.values()],
        },
        schema=CROP_TAGS.polars(),
    )
    write_parquet(table, path, contract=CROP_TAGS, stage="test")
    return str(path)


# --- the generator's objects ---------------------------------------------------------------------------------------

TINY = synthetic.SyntheticConfig(image_size=48)
TINY_STYLE = synthetic.SceneStyle(background_marks=3, foreground_radius=0.7)
# sha256 of the 4 images' content hashes (workflow_scripts.images.content_hash, one a line) of
# generate("tiny", 4, 5, TINY, ..., TINY_STYLE), computed before objects.parquet was added: the drawing is unchanged.
TINY_IMAGES_SHA256 = "55ee62195fb9257b9cb9618fca9760f3edca9b9c206af613338c8c8e6580e2a2"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    synthetic.generate("tiny", 4, 5, TINY, root, TINY_STYLE)
    return root


def test_the_generator_draws_the_same_images_as_before_the_objects_table(tiny):
    hashes = [content_hash(Image.open(path)) for path in sorted((tiny / "images").glob("*.png"))]
    assert len(hashes) == 4
    assert hashlib.sha256("\n".join(hashes).encode()).hexdigest() == TINY_IMAGES_SHA256


def test_the_objects_table_holds_every_drawn_object_and_the_foreground_box_first(tiny):
    objects = OBJECTS.read(tiny / "objects.parquet")
    boxes = BOXES.read(tiny / "boxes.parquet")
    truth = pl.read_parquet(tiny / "ground_truth.parquet")
    assert objects.schema["x_min"] == pl.Int32
    by_id = objects.group_by("id", maintain_order=True).agg(pl.col("label"), box=pl.concat_list(crop_tags.BOX))
    assert by_id["id"].to_list() == truth["id"].to_list()
    assert [sorted(labels) for labels in by_id["label"].to_list()] == truth["labels"].to_list()
    foreground = [box[0] for box in by_id["box"].to_list()]  # objects[0]: the foreground, first
    assert foreground == [[int(value) for value in row] for row in boxes.select(crop_tags.BOX).rows()]
    records = pl.read_parquet(tiny / "records.parquet")
    assert [labels[0] for labels in by_id["label"].to_list()] == records["dominant_object"].to_list()
    assert (objects["x_max"] > objects["x_min"]).all() and (objects["x_max"] <= 48).all()


# --- crop tags -----------------------------------------------------------------------------------------------------


@pytest.fixture
def planted(tmp_path):
    """Crop a (cat) is x 0..10, y 0..20; b (dog) has only objects outside it; c is dropped."""
    crops = crops_file(
        tmp_path / "crops.parquet",
        [
            ("a", "cat", 0, 0, 10, 20, None),
            ("b", "dog", 30, 30, 40, 40, None),
            ("c", "cat", None, None, None, None, "too_small"),
        ],
    )
    objects = pl.DataFrame(
        [
            ("a", "cat", 12, 0, 30, 30),  # the foreground, outside the crop: share 0
            ("a", "sofa", 5, 0, 15, 10),  # 5 x 10 of 10 x 10 inside: 1/2
            ("a", "tree", 8, 10, 18, 30),  # 2 x 10 of 10 x 20 inside: 1/10
            ("a", "grass", 0, 15, 10, 25),  # 10 x 5 of 10 x 10 inside: 1/2
            ("a", "lamp", 2, 2, 6, 6),  # inside: 1
            ("a", "sofa", 0, 0, 4, 4),  # a second sofa, inside: 1 (its best share counts)
            ("a", "cat", 0, 0, 2, 2),  # another cat inside: the crop's own label, never a tag
            ("b", "dog", 0, 0, 20, 20),
            ("b", "tree", 0, 30, 29, 40),  # touches x 29, the crop starts at 30: no overlap
            ("c", "lamp", 0, 0, 5, 5),
        ],
        schema=OBJECTS.polars(),
        orient="row",
    )
    write_parquet(objects, tmp_path / "objects.parquet", contract=OBJECTS, stage="test")
    return SimpleNamespace(crops=crops, objects=str(tmp_path / "objects.parquet"), root=tmp_path)


def test_ground_truth_tags_are_the_visible_objects_by_share_without_the_crops_own_label(planted, caplog):
    out = planted.root / "tags.parquet"
    crop_tags.main(["ground-truth", "--crops", planted.crops, "--objects", planted.objects, "--out", str(out)])
    table = CROP_TAGS.read(out)
    assert table["id"].to_list() == ["a", "b"]  # the kept crops, in order
    assert table["labels"].to_list() == [["lamp", "sofa", "grass"], []]  # ties by label; tree 1/10 < 1/4
    assert table["scores"].to_list() == [[1.0, 1.0, 0.5], []]
    assert "1 visible object(s) of the crop's own class" in caplog.text
    crop_tags.main(
        [
            "ground-truth",
            "--crops",
            planted.crops,
            "--objects",
            planted.objects,
            "--min-visible",
            "0.1",
            "--out",
            str(out),
        ]
    )
    assert CROP_TAGS.read(out)["labels"].to_list()[0] == ["lamp", "sofa", "grass", "tree"]  # 1/10 >= 0.1


def test_ground_truth_tags_refuse_a_kept_crop_whose_image_has_no_object(planted):
    objects = OBJECTS.read(planted.objects).filter(pl.col("id") != "b")
    write_parquet(objects, planted.objects, contract=OBJECTS, stage="test")
    with pytest.raises(DataError, match=r"objects\.parquet: no object row for 1 kept crop.*\['b'\]"):
        crop_tags.make_ground_truth(planted.crops, planted.objects, str(planted.root / "tags.parquet"))


def test_precomputed_tags_cover_every_kept_crop_sorted_by_score(planted):
    table = planted.root / "ram.parquet"
    pl.DataFrame(
        {
            "id": ["b", "a", "z"],
            "labels": [["dog", "tree"], ["cat", "sofa"], ["x"]],
            "scores": [[0.2, 0.9], [0.5, 0.7], [1.0]],
        }
    ).write_parquet(table)
    out = planted.root / "tags.parquet"
    crop_tags.main(["precomputed", "--crops", planted.crops, "--table", str(table), "--out", str(out)])
    tags = CROP_TAGS.read(out)
    assert tags["id"].to_list() == ["a", "b"]  # z (no kept crop) dropped
    assert tags["labels"].to_list() == [["sofa", "cat"], ["tree", "dog"]]  # highest first; the annotator's own
    unscored = planted.root / "unscored.parquet"
    pl.DataFrame({"id": ["a"], "labels": [["sofa", "cat"]]}).write_parquet(unscored)
    with pytest.raises(DataError, match=r"unscored\.parquet: no row for 1 kept crop\(s\) of .*crops\.parquet.*\['b'\]"):
        crop_tags.make_precomputed(planted.crops, [str(unscored)], str(out))


# --- Detic on the crops --------------------------------------------------------------------------------------------


class FakeDetector:
    """A detectron2 model: each input's dominant channel (R, G, B) at score 0.9; records the sizes it sees."""

    def __init__(self):
        self.seen = []

    def __call__(self, inputs):
        outputs = []
        for item in inputs:
            self.seen.append((tuple(item["image"].shape), item["height"], item["width"]))
            dominant = int(item["image"].mean(dim=(1, 2)).argmax())
            outputs.append(
                {"instances": SimpleNamespace(pred_classes=torch.tensor([dominant]), scores=torch.tensor([0.9]))}
            )
        return outputs


def test_detic_detects_in_each_kept_crop_only_and_its_chunks_merge_into_crop_tags(tmp_path):
    (tmp_path / "images").mkdir()
    for name in ("p", "q", "s", "t"):  # left 30 px red, right 10 px blue
        image = Image.new("RGB", (40, 20), (220, 10, 10))
        image.paste((10, 10, 220), (30, 0, 40, 20))
        image.save(tmp_path / "images" / f"{name}.png")
    pl.DataFrame({"id": list("pqst"), "image_path": [f"images/{name}.png" for name in "pqst"]}).write_parquet(
        tmp_path / "records.parquet"
    )
    crops = crops_file(
        tmp_path / "crops.parquet",
        [
            ("q", "cat", 30, 0, 40, 20, None),
            ("p", "dog", 0, 0, 30, 20, None),
            ("s", "dog", None, None, None, None, "no_box"),
        ],
    )  # t: no crop row
    names = ["red thing", "green thing", "blue thing"]
    identity = SimpleNamespace(get_transform=lambda image: SimpleNamespace(apply_image=lambda array: array))
    model = FakeDetector()
    chunks = [str(tmp_path / f"chunk-{chunk}.parquet") for chunk in range(2)]
    for chunk, path in enumerate(chunks):
        detic.detect(
            str(tmp_path / "records.parquet"),
            chunk,
            2,
            detic.Detector(model, identity, "RGB"),
            names,
            path,
            detic.DetectParams(batch_size=2, workers=0),
            crops_path=crops,
        )
    # Records order (p, q), one a chunk: p's crop is 30 x 20 (red), q's 10 x 20 (blue); s dropped, t has no crop.
    assert model.seen == [((3, 20, 30), 20, 30), ((3, 20, 10), 20, 10)]
    out = tmp_path / "tags.parquet"
    crop_tags.main(["detic", "--crops", crops, "--chunks", *chunks, "--out", str(out)])
    tags = CROP_TAGS.read(out)
    assert tags["id"].to_list() == ["q", "p"]  # the crops table's order
    assert tags["labels"].to_list() == [["blue thing"], ["red thing"]]
    with pytest.raises(DataError, match=r"no row for 1 kept crop"):
        crop_tags.make_detic(crops, chunks[:1], str(out))
    whole = str(tmp_path / "whole.parquet")  # a chunk of full images (no --crops) is refused
    params = detic.DetectParams(workers=0)
    detic.detect(
        str(tmp_path / "records.parquet"), 0, 1, detic.Detector(FakeDetector(), identity, "RGB"), names, whole, params
    )
    with pytest.raises(DataError, match=r"whole\.parquet: not a Detic chunk of crops"):
        crop_tags.make_detic(crops, [whole], str(out))


# --- the naive Bayes -----------------------------------------------------------------------------------------------

# Training: 3 cats, 1 dog; tags grass, sofa, tree (V = 3), alpha 1.
#   c1 cat [sofa, grass]   c2 cat [sofa]   c3 cat [tree]   c4 dog [grass, tree]
# Prior: P(cat) = (3 + 1) / (4 + 2) = 2/3, P(dog) = (1 + 1) / 6 = 1/3.
# cat's tags: sofa 2, grass 1, tree 1 (4 in all): P(sofa|cat) = 3/7, P(grass|cat) = 2/7, P(tree|cat) = 2/7.
# dog's tags: grass 1, tree 1 (2 in all): P(grass|dog) = 2/5, P(tree|dog) = 2/5, P(sofa|dog) = 1/5.
# [grass]:       cat 2/3 * 2/7 = 4/21, dog 1/3 * 2/5 = 2/15;  4/21 : 2/15 = 20 : 14  -> 10/17, 7/17.
# [sofa, tree]:  cat 2/3 * 3/7 * 2/7 = 4/49, dog 1/3 * 1/5 * 2/5 = 2/75;  = 300 : 98  -> 150/199, 49/199.
# []:            the prior, 2/3, 1/3.
TRAIN_LABELS = ["cat", "cat", "cat", "dog"]
TRAIN_TAGS = [["sofa", "grass"], ["sofa"], ["tree"], ["grass", "tree"]]


def posterior(tags: list[list[str]], k: int = 3) -> np.ndarray:
    model = naive_bayes.fit(TRAIN_LABELS, pl.Series(TRAIN_TAGS), k, alpha=1.0)
    assert model.classes == ["cat", "dog"] and model.vocabulary == ["grass", "sofa", "tree"]
    return naive_bayes.posteriors(model, pl.Series(tags, dtype=pl.List(pl.String)), k)


def fractions(*values: Fraction) -> list[float]:
    return [float(value) for value in values]


def test_the_posterior_is_the_hand_computed_naive_bayes():
    got = posterior([["grass"], ["sofa", "tree"]])
    np.testing.assert_allclose(got[0], fractions(Fraction(10, 17), Fraction(7, 17)), rtol=1e-12)
    np.testing.assert_allclose(got[1], fractions(Fraction(150, 199), Fraction(49, 199)), rtol=1e-12)


def test_a_crop_without_tags_gets_the_prior_and_unseen_tags_are_ignored():
    got = posterior([[], ["unicorn"], ["unicorn", "grass"], ["grass"]])
    np.testing.assert_allclose(got[:2], [fractions(Fraction(2, 3), Fraction(1, 3))] * 2, rtol=1e-12)
    np.testing.assert_allclose(got[2], got[3], rtol=1e-12)
    np.testing.assert_allclose(got[2], fractions(Fraction(10, 17), Fraction(7, 17)), rtol=1e-12)


def test_only_the_top_tags_k_tags_count_in_fitting_and_predicting():
    # k = 1: training sees c1 [sofa], c2 [sofa], c3 [tree], c4 [grass]. cat: sofa 2, tree 1 (3 in all) ->
    # P(grass|cat) = 1/6; dog: grass 1 (1 in all) -> P(grass|dog) = 2/4. [grass, sofa] is [grass]:
    # cat 2/3 * 1/6 = 1/9, dog 1/3 * 1/2 = 1/6 -> 2/5, 3/5.
    got = posterior([["grass", "sofa"], ["grass"]], k=1)
    np.testing.assert_allclose(got, [fractions(Fraction(2, 5), Fraction(3, 5))] * 2, rtol=1e-12)


def test_the_cli_fits_on_one_split_and_writes_ssl_predictions_of_each_crop_set(tmp_path):
    rows = [(f"c{i + 1}", label, 0, 0, 5, 5, None) for i, label in enumerate(TRAIN_LABELS)]
    rows += [
        ("q1", "dog", 0, 0, 5, 5, None),
        ("q2", "cat", 0, 0, 5, 5, None),
        ("q3", "cat", None, None, None, None, "too_small"),
    ]
    crops = crops_file(tmp_path / "crops.parquet", rows)
    tags = tags_file(
        tmp_path / "tags.parquet",
        dict(zip(["c1", "c2", "c3", "c4"], TRAIN_TAGS)) | {"q1": ["grass", "unicorn"], "q2": []},
    )
    train = ids_file(tmp_path / "A.parquet", ["c1", "c2", "c3", "c4"])
    queries = ids_file(tmp_path / "B.parquet", ["q2", "q3", "q1"])
    outs = [tmp_path / "B_out.parquet", tmp_path / "A_out.parquet"]
    predict = ["--predict", f"{queries}={outs[0]}", "--predict", f"{train}={outs[1]}"]
    naive_bayes.main(["--crops", crops, "--tags", tags, "--train-ids", train, "--votes-k", "17", *predict])
    table = SSL_PREDICTIONS.read(outs[0])
    assert table["id"].to_list() == ["q2", "q1"]  # the split's order; q3 has no kept crop
    assert table["predicted"].to_list() == ["cat", "cat"]
    np.testing.assert_allclose(table["probability"].to_numpy(), fractions(Fraction(2, 3), Fraction(10, 17)))
    p = np.array(fractions(Fraction(10, 17), Fraction(7, 17)))
    assert table["entropy"][1] == pytest.approx(-(p * np.log(p)).sum())
    assert table["votes"][1].to_list() == ["cat"] * 10 + ["dog"] * 7  # 17 votes: 10/17 and 7/17 exactly
    assert SSL_PREDICTIONS.read(outs[1])["id"].to_list() == ["c1", "c2", "c3", "c4"]


def test_the_cli_refuses_a_kept_crop_without_tags_and_split_ids_without_a_crop(tmp_path):
    crops = crops_file(tmp_path / "crops.parquet", [("c1", "cat", 0, 0, 5, 5, None), ("c2", "dog", 0, 0, 5, 5, None)])
    tags = tags_file(tmp_path / "tags.parquet", {"c1": ["sofa"]})
    out = str(tmp_path / "out.parquet")
    train = ids_file(tmp_path / "A.parquet", ["c1", "c2"])
    with pytest.raises(DataError, match=r"tags\.parquet: no row for 1 kept crop\(s\) of .*A\.parquet.*\['c2'\]"):
        naive_bayes.naive_bayes_reference(crops, tags, train, {train: out}, votes_k=5)
    stray = ids_file(tmp_path / "stray.parquet", ["c1", "x9"])
    with pytest.raises(DataError, match=r"stray\.parquet: 1 id\(s\) without a row in .*crops\.parquet.*\['x9'\]"):
        naive_bayes.naive_bayes_reference(crops, tags, stray, {stray: out}, votes_k=5)


def test_blocks_bound_the_work_and_give_the_same_posteriors(monkeypatch):
    rng = np.random.default_rng(0)
    vocabulary = [f"t{i}" for i in range(30)]
    tags = pl.Series([list(rng.choice(vocabulary, size=rng.integers(0, 5), replace=False)) for _ in range(200)])
    labels = [f"c{i}" for i in rng.integers(0, 7, 200)]
    model = naive_bayes.fit(labels, tags, 3, 0.5)
    whole = naive_bayes.posteriors(model, tags, 3)
    monkeypatch.setattr(naive_bayes, "BLOCK", 3 * 7 * 16)  # 16 rows a block
    blocks = list(naive_bayes.posterior_blocks(model, tags, 3))
    assert [first for first, _ in blocks] == list(range(0, 200, 16))
    np.testing.assert_allclose(np.concatenate([block for _, block in blocks]), whole, rtol=1e-12)
    np.testing.assert_allclose(whole.sum(axis=1), 1.0)
