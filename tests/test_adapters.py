"""Real-data adapters (COCO, ImageNet-style folders, webdataset shards, mixes), their validation, the
precomputed annotator, and a real-format DAG run from raw files to metrics."""

import json
import re
import shutil
import tarfile
from pathlib import Path
from types import SimpleNamespace

import polars as pl
import pytest
import yaml

from conftest import REPO, run_snakemake
from real_data import CATEGORIES, add_member, build_coco, build_image_folder, build_shards, jpeg_bytes, shard_ids
from workflow_scripts import adapters, annotate, splits
from workflow_scripts.images import load_rgb, resolve_image_paths
from workflow_scripts.io import DataError, read_metadata

POOL = adapters.Validation(training_pool=True)


def adapt(adapted: adapters.Adapted, out_dir: Path, options=adapters.Validation()) -> dict[str, pl.DataFrame]:
    adapters.write_dataset(adapted, out_dir, options, params={})
    return {name: pl.read_parquet(out_dir / f"{name}.parquet") for name in ("records", "ground_truth", "validation")}


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    root = tmp_path_factory.mktemp("raw")
    return SimpleNamespace(
        root=root,
        coco=build_coco(root / "coco", 14),
        folder=build_image_folder(root / "inet", 3),
        shards=build_shards(root / "laion", 2, 5),
    )


# --- adapters --------------------------------------------------------------------------------------


def test_coco_keeps_every_caption_and_names_instance_categories(raw, tmp_path):
    out = adapt(
        adapters.coco("coco", str(raw.coco["captions"]), str(raw.coco["images"]), str(raw.coco["instances"])),
        tmp_path,
        POOL,
    )
    records, truth = out["records"], out["ground_truth"]
    assert records.columns[:4] == ["id", "image_path", "captions", "image_sha256"]
    assert records.height == 14 and records["id"].n_unique() == 14 and records["id"].str.starts_with("coco-").all()
    assert (records["captions"].list.len() == 5).all()
    assert records["image_sha256"].null_count() == 0
    assert truth.schema["scores"] == pl.List(pl.Float32) and truth.height == 14
    without = truth.filter(pl.col("id") == "coco-1003").row(0, named=True)  # every 7th image, from 3, has none
    assert without["labels"] == [] and without["scores"] == []
    assert set(truth["labels"].explode().drop_nulls()) <= set(CATEGORIES)
    assert (truth["scores"].explode().drop_nulls() == 1.0).all()
    assert read_metadata(tmp_path / "records.parquet")["dejavu:stage"] == "datasets"


def test_image_folder_keeps_the_class_as_label_and_reads_a_captions_table(raw, tmp_path):
    captions = tmp_path / "captions.csv"
    pl.DataFrame(
        {
            "path": ["cat/cat_0000.JPEG", "cat/cat_0000.JPEG", "dog/dog_0002.JPEG"],
            "caption": ["a cat", "a cat again", "a dog"],
        }
    ).write_csv(captions)
    out = adapt(adapters.image_folder("inet", str(raw.folder), str(captions)), tmp_path / "out")
    records = out["records"]
    assert records.height == 12 and set(records["label"]) == set(CATEGORIES[:4])
    row = records.filter(pl.col("id") == "inet-cat/cat_0000.JPEG").row(0, named=True)
    assert row["label"] == "cat" and row["captions"] == ["a cat", "a cat again"]
    assert records.filter(pl.col("id") == "inet-car/car_0000.JPEG")["captions"].to_list() == [[]]
    assert out["ground_truth"].filter(pl.col("id") == row["id"])["labels"].to_list() == [["cat"]]


def test_image_folder_refuses_captions_for_unknown_images(raw, tmp_path):
    captions = tmp_path / "captions.csv"
    pl.DataFrame({"path": ["cat/ghost.JPEG"], "caption": ["boo"]}).write_csv(captions)
    with pytest.raises(DataError, match=r"captions\.csv.*cat/ghost\.JPEG"):
        adapters.image_folder("inet", str(raw.folder), str(captions))


def test_shard_members_are_read_in_place(raw, tmp_path):
    out = adapt(adapters.shards("laion", [str(p) for p in raw.shards]), tmp_path, POOL)
    records = out["records"]
    assert records["id"].to_list() == shard_ids("laion", 2, 5)
    assert records["image_path"].str.contains(".tar::", literal=True).all()
    assert records["captions"][0].to_list() == ["a web photo number 000000 of a cat"]
    assert out["ground_truth"].height == 0
    assert not list((raw.root / "laion").glob("*.jpg"))  # nothing extracted
    assert load_rgb(records["image_path"][3], records["id"][3]).size == (48, 40)


def test_tar_member_paths_resolve_relative_to_the_records_file(raw, tmp_path):
    shutil.copy(raw.shards[0], tmp_path / "00000.tar")
    records = pl.DataFrame({"id": ["x"], "image_path": ["00000.tar::000001.jpg"]})
    path = resolve_image_paths(records, tmp_path / "records.parquet")[0]
    assert path == f"{tmp_path.resolve()}/00000.tar::000001.jpg"
    assert load_rgb(path).size == (48, 40)
    with pytest.raises(DataError, match=r"record 'x' image .*::nope\.jpg: file not found"):
        load_rgb(path.replace("000001.jpg", "nope.jpg"), "x")


def test_shards_from_a_caption_table(tmp_path):
    (tmp_path / "img").mkdir()
    for index in range(3):
        (tmp_path / "img" / f"{index}.jpg").write_bytes(jpeg_bytes(500 + index))
    pl.DataFrame(
        {"path": ["img/0.jpg", "img/1.jpg", "img/2.jpg", "img/0.jpg"], "caption": ["zero", "one", "two", "zero again"]}
    ).write_parquet(tmp_path / "table.parquet")
    records = adapt(adapters.shards("web", [], str(tmp_path / "table.parquet")), tmp_path / "out", POOL)["records"]
    assert records["id"].to_list() == ["web-img/0.jpg", "web-img/1.jpg", "web-img/2.jpg"]
    assert records["captions"][0].to_list() == ["zero", "zero again"]


def test_mix_draws_seeded_parts_and_keeps_their_ground_truth(raw, tmp_path):
    coco_dir, laion_dir = tmp_path / "coco", tmp_path / "laion"
    adapt(
        adapters.coco("coco", str(raw.coco["captions"]), str(raw.coco["images"]), str(raw.coco["instances"])), coco_dir
    )
    adapt(adapters.shards("laion", [str(p) for p in raw.shards]), laion_dir)
    parts = [("coco", str(coco_dir / "records.parquet"), 6), ("laion", str(laion_dir / "records.parquet"), None)]
    first = adapt(adapters.mix(parts, seed=0), tmp_path / "mix1", POOL)
    again = adapt(adapters.mix(parts, seed=0), tmp_path / "mix2", POOL)["records"]
    other = adapt(adapters.mix(parts, seed=1), tmp_path / "mix3", POOL)["records"]
    records = first["records"]
    assert records.height == 16 and records["id"].n_unique() == 16
    assert records.group_by("source_dataset").len().sort("source_dataset")["len"].to_list() == [6, 10]
    assert records["id"].equals(again["id"]) and not records["id"].equals(other["id"])
    assert records["image_path"].str.starts_with("/").all()
    assert set(first["ground_truth"]["id"]) == set(records.filter(pl.col("source_dataset") == "coco")["id"])
    with pytest.raises(DataError, match="asks for 99 records of 'coco'"):
        adapters.mix([("coco", str(coco_dir / "records.parquet"), 99)], seed=0)


# --- validation ------------------------------------------------------------------------------------


def coco_copy(raw, tmp_path) -> dict[str, Path]:
    shutil.copytree(raw.coco["images"].parent, tmp_path / "coco")
    return {key: tmp_path / "coco" / path.relative_to(raw.coco["images"].parent) for key, path in raw.coco.items()}


def test_corrupt_jpeg_is_an_error_naming_the_record_or_is_skipped_and_reported(raw, tmp_path):
    coco = coco_copy(raw, tmp_path)
    corrupt = coco["images"] / "000000001005.jpg"
    corrupt.write_bytes(corrupt.read_bytes()[:40])
    adapted = adapters.coco("coco", str(coco["captions"]), str(coco["images"]), str(coco["instances"]))
    with pytest.raises(
        DataError,
        match=r"(?s)1 invalid record.*record 'coco-1005' \(image .*000000001005\.jpg\): "
        r".*unreadable or corrupt",
    ):
        adapters.validate(adapted.records, adapted.origin, POOL)
    out = adapt(adapted, tmp_path / "out", adapters.Validation(on_invalid="skip", training_pool=True))
    assert out["records"].height == 13 and "coco-1005" not in out["records"]["id"]
    assert out["validation"]["id"].to_list() == ["coco-1005"]
    assert "unreadable or corrupt" in out["validation"]["problem"][0]
    assert "coco-1005" not in out["ground_truth"]["id"]


def test_missing_image_file_is_an_error_naming_the_record(raw, tmp_path):
    coco = coco_copy(raw, tmp_path)
    (coco["images"] / "000000001002.jpg").unlink()
    adapted = adapters.coco("coco", str(coco["captions"]), str(coco["images"]))
    with pytest.raises(
        DataError,
        match=r"(?s)captions_train\.json: 1 invalid record.*record 'coco-1002' "
        r"\(image .*000000001002\.jpg\): .*file not found",
    ):
        adapters.validate(adapted.records, adapted.origin, adapters.Validation())


def test_duplicate_id_is_an_error_naming_the_record(raw, tmp_path):
    coco = coco_copy(raw, tmp_path)
    captions = json.loads(coco["captions"].read_text())
    captions["images"].append({**captions["images"][4], "file_name": "000000001006.jpg"})  # id 1004 again
    coco["captions"].write_text(json.dumps(captions))
    adapted = adapters.coco("coco", str(coco["captions"]), str(coco["images"]))
    with pytest.raises(DataError, match=r"(?s)captions_train\.json: 1 invalid.*record 'coco-1004' .*: duplicate id"):
        adapters.validate(adapted.records, adapted.origin, adapters.Validation())


def test_training_pool_records_need_a_caption(tmp_path):
    shard = tmp_path / "00000.tar"
    with tarfile.open(shard, "w") as tar:
        add_member(tar, "a.jpg", jpeg_bytes(1))
        add_member(tar, "a.txt", b"a caption")
        add_member(tar, "b.jpg", jpeg_bytes(2))  # no b.txt
    adapted = adapters.shards("web", [str(shard)])
    with pytest.raises(DataError, match=r"(?s)record 'web-00000/b' \(image .*00000\.tar::b\.jpg\): no caption"):
        adapters.validate(adapted.records, adapted.origin, POOL)
    records, problems = adapters.validate(adapted.records, adapted.origin, adapters.Validation())  # a public set
    assert records.height == 2 and problems.height == 0


def test_same_image_from_two_sources_in_one_pool_is_refused(raw, tmp_path):
    coco = coco_copy(raw, tmp_path)
    shard = tmp_path / "00000.tar"
    with tarfile.open(shard, "w") as tar:
        add_member(tar, "k.jpg", (coco["images"] / "000000001001.jpg").read_bytes())
        add_member(tar, "k.txt", b"a web caption")
    adapt(adapters.coco("coco", str(coco["captions"]), str(coco["images"])), tmp_path / "coco_out")
    adapt(adapters.shards("laion", [str(shard)]), tmp_path / "laion_out")
    mixed = adapters.mix(
        [
            ("coco", str(tmp_path / "coco_out/records.parquet"), None),
            ("laion", str(tmp_path / "laion_out/records.parquet"), None),
        ],
        seed=0,
    )
    with pytest.raises(
        DataError, match=r"(?s)record 'laion-00000/k' .*same image \(content hash\) as record 'coco-1001'"
    ):
        adapters.validate(mixed.records, mixed.origin, POOL)


def test_same_image_in_the_pool_and_the_public_set_through_two_sources_is_refused(raw, tmp_path):
    """A LAION shard member of the training pool is byte-identical to an ImageNet-folder image of P."""
    folder = tmp_path / "inet"
    shutil.copytree(raw.folder, folder)
    leaked = (folder / "dog" / "dog_0001.JPEG").read_bytes()
    shard = tmp_path / "00000.tar"
    with tarfile.open(shard, "w") as tar:
        for index in range(5):
            add_member(tar, f"{index:03d}.jpg", leaked if index == 2 else jpeg_bytes(900 + index))
            add_member(tar, f"{index:03d}.txt", f"web caption {index}".encode())
    adapt(
        adapters.coco("coco", str(raw.coco["captions"]), str(raw.coco["images"]), str(raw.coco["instances"])),
        tmp_path / "coco",
    )
    adapt(adapters.shards("laion", [str(shard)]), tmp_path / "laion")
    pool = tmp_path / "pool"
    adapt(
        adapters.mix(
            [
                ("coco", str(tmp_path / "coco/records.parquet"), None),
                ("laion", str(tmp_path / "laion/records.parquet"), None),
            ],
            seed=0,
        ),
        pool,
        POOL,
    )
    adapt(adapters.image_folder("inet", str(folder)), tmp_path / "public")
    pl.DataFrame({"id": pl.read_parquet(pool / "records.parquet")["id"], "labels": [["cat"]] * 19}).write_parquet(
        pool / "annotations.parquet"
    )
    splits.make_splits(
        str(pool / "records.parquet"),
        str(pool / "annotations.parquet"),
        tmp_path / "splits",
        n_target=8,
        n_reference=8,
        n_holdout=3,
        seed=0,
    )
    with pytest.raises(
        splits.OverlapError,
        match=r"share 1 image\(s\) by content hash: "
        r"\['(laion-00000/002=inet-dog/dog_0001\.JPEG|inet-dog/dog_0001\.JPEG=laion-00000/002)'\]",
    ):
        splits.check_overlap(
            {name: str(tmp_path / "splits" / f"{name}.parquet") for name in ("A", "B", "holdout")},
            str(pool / "records.parquet"),
            str(tmp_path / "public/records.parquet"),
            {"near_duplicates": str(tmp_path / "pairs.parquet"), "excluded": str(tmp_path / "excluded.parquet")},
        )


# --- annotators ------------------------------------------------------------------------------------


@pytest.fixture
def small_records(tmp_path):
    path = tmp_path / "records.parquet"
    pl.DataFrame({"id": ["d-0", "d-1", "d-2"], "image_path": ["a", "b", "c"]}).write_parquet(path)
    return path


def test_precomputed_annotations_are_conformed_and_checked(small_records, tmp_path):
    table = tmp_path / "mine.parquet"
    pl.DataFrame({"id": ["d-0", "d-2"], "labels": [["cat", "dog"], []]}).write_parquet(table)
    with pytest.raises(DataError, match=r"(?s)no annotation row for 1 record.*\['d-1'\]"):
        annotate.annotate_precomputed(str(small_records), [str(table)], str(tmp_path / "out.parquet"))
    annotate.main(
        [
            "--annotator",
            "precomputed",
            "--records",
            str(small_records),
            "--annotations",
            str(table),
            "--allow-missing",
            "--out",
            str(tmp_path / "out.parquet"),
        ]
    )
    out = pl.read_parquet(tmp_path / "out.parquet")
    assert out["id"].to_list() == ["d-0", "d-1", "d-2"] and out["labels"].to_list() == [["cat", "dog"], [], []]
    assert out["scores"].to_list() == [[1.0, 1.0], [], []] and out.schema["scores"] == pl.List(pl.Float32)
    pl.DataFrame({"id": ["d-0", "d-1", "d-2", "other-9"], "labels": [["x"]] * 4}).write_parquet(table)
    with pytest.raises(DataError, match="other-9"):
        annotate.annotate_precomputed(str(small_records), [str(table)], str(tmp_path / "out.parquet"))
    annotate.annotate_precomputed(str(small_records), [str(table)], str(tmp_path / "out.parquet"), drop_unknown=True)
    assert pl.read_parquet(tmp_path / "out.parquet").height == 3


# --- the real DAG ----------------------------------------------------------------------------------


def single_point_config(raw_root: Path, datasets: dict, split: dict) -> dict:
    """Tiny training over config.yaml, every sweep list cut to one value; the split is named `scenes` so it
    replaces the default's (a --configfile merges into config.yaml)."""
    base = yaml.safe_load((REPO / "config.yaml").read_text())
    sweep = {key: values[:1] for key, values in base.get("sweep", {}).items()}
    sweep["epochs"] = [1]
    return {
        "datasets": datasets,
        "splits": {"scenes": split},
        "training": {"epochs": 1, "batch_size": 16, "warmup_steps": 1},
        "sweep": sweep,
        "knn": {"k": 5},
        "metrics": {"k": 5, "top_n": 5, "bootstrap": {"n_boot": 5, "frac": 0.5, "seed": 0}},
    }


def test_real_formats_run_through_the_dag_to_metrics(tmp_path):
    raw_root = tmp_path / "raw"
    coco = build_coco(raw_root / "coco", 56, seed=3)
    build_shards(raw_root / "laion", 2, 20, seed=4)  # the config globs them
    folder = build_image_folder(raw_root / "inet", 10, seed=5)
    laion_annotations = raw_root / "laion_annotations.parquet"
    ids = shard_ids("laion", 2, 20)
    pl.DataFrame(
        {
            "id": ids,
            "labels": [[CATEGORIES[i % 6], CATEGORIES[(i + 1) % 6]] for i in range(len(ids))],
            "scores": [[0.9, 0.6]] * len(ids),
        },
        schema={"id": pl.String, "labels": pl.List(pl.String), "scores": pl.List(pl.Float32)},
    ).write_parquet(laion_annotations)
    datasets = {
        "coco": {
            "source": "coco",
            "captions": str(coco["captions"]),
            "instances": str(coco["instances"]),
            "images": str(coco["images"]),
            "annotator": "ground_truth",
        },
        "laion": {
            "source": "shards",
            "shards": [str(raw_root / "laion" / "*.tar")],
            "annotator": "precomputed",
            "annotations": str(laion_annotations),
        },
        "pool": {
            "source": "mix",
            "parts": [{"dataset": "coco", "n_records": 48}, {"dataset": "laion"}],
            "seed": 0,
            "annotator": "parts",
            "threads": 2,
        },
        "inet": {"source": "image_folder", "images": str(folder), "annotator": "ground_truth"},
    }
    split = {"pool": "pool", "public": "inet", "n_target": 32, "n_reference": 32, "n_holdout": 16, "seed": 0}
    run_snakemake(tmp_path, single_point_config(raw_root, datasets, split), "--until", "metrics")
    results = tmp_path / "results"
    pool = pl.read_parquet(results / "data/pool/records.parquet")
    assert pool.height == 88 and set(pool["source_dataset"]) == {"coco", "laion"}
    annotations = pl.read_parquet(results / "data/pool/annotations.parquet")
    assert annotations["id"].to_list() == pool["id"].to_list()
    assert annotations.filter(pl.col("id") == ids[0])["scores"].to_list() == [pytest.approx([0.9, 0.6])]
    assert pl.read_parquet(results / "data/inet/validation.parquet").height == 0
    populations = list((results / "metrics" / "scenes").rglob("population.parquet"))
    assert {path.parent.name for path in populations} == {"target", "holdout", "reverse"}
    for path in populations:
        table = pl.read_parquet(path)
        assert set(table["metric"]) >= {"PPG", "PRG", "AUCG"} and table["value"].is_not_null().all()
    second = run_snakemake(tmp_path, single_point_config(raw_root, datasets, split), "--until", "metrics", "--dry-run")
    assert re.search(r"Nothing to be done|total\s+0\n", second.stdout + second.stderr)  # --until words it so
