"""The SSL test's DAG on real-data code paths: an ImageNet-style image folder with a LOC_train_solution.csv."""

from collections import Counter

import polars as pl
import pytest
import torch
import torchvision
import yaml

from conftest import REPO, TINY, merged, planned_jobs, run_snakemake
from real_data import CATEGORIES, build_image_folder

CLASSES = CATEGORIES[:4]
PER_CLASS = 12  # images per class; the first BOXED have a LOC row
BOXED = 6
SIZE = (48, 40)


def loc_csv(path, classes=CLASSES):
    """Boxes of the first BOXED images of each class: a left box leaving a 28-px strip, except image 4 (a box
    filling the image: too small a periphery) and image 5 (a box past the right edge: outside the image)."""
    rows = ["ImageId,PredictionString"]
    for name in classes:
        for index in range(BOXED):
            box = {4: (0, 0, 48, 40), 5: (0, 0, 60, 40)}.get(index, (0, 0, 20, 40))
            rows.append(f"{name}_{index:04d},{name} {' '.join(map(str, box))}")
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.fixture(scope="module")
def image_folder_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("ssl_image_folder")
    folder = build_image_folder(root / "raw" / "train", PER_CLASS, seed=7, classes=CLASSES)
    dataset = {"source": "image_folder", "images": str(folder), "annotator": "ground_truth"}
    dataset["boxes"] = {"loc_csv": str(loc_csv(root / "raw" / "LOC_train_solution.csv"))}
    config = merged(
        TINY,
        {
            "datasets": {"inet": dataset},
            "ssl": {
                "dataset": "inet",
                "label_column": "label",
                "split": {"per_class": 2, "holdout_per_class": 2, "public_per_class": 3, "seed": 0},
                "training": {"epochs": 1, "batch_size": 8, "image_size": 32},
                "sweep": {"epochs": [1]},
                "knn": {"k": 2},
                "metrics": {"k": 2},
                "one_model": {"references": []},  # no objects table (image folder); the references: other tests
            },
        },
    )
    workdir = root / "work"
    workdir.mkdir()
    run_snakemake(workdir, config, "ssl")
    return workdir / "results"


def test_boxes_come_from_the_loc_csv(image_folder_run):
    boxes = pl.read_parquet(image_folder_run / "data/inet/boxes.parquet")
    assert boxes.height == len(CLASSES) * BOXED
    assert boxes.filter(pl.col("id") == "inet-cat/cat_0000.JPEG").row(0)[1:] == (48, 40, 0.0, 0.0, 20.0, 40.0)


def test_measured_images_are_boxed_and_bad_boxes_are_counted(image_folder_run):
    crops = pl.read_parquet(image_folder_run / "ssl/inet/crops.parquet")
    boxed = set(pl.read_parquet(image_folder_run / "data/inet/boxes.parquet")["id"])
    assert set(crops["id"]) == boxed  # A, B and the holdout take every box image (2 + 2 + 2 per class)
    reasons = dict(crops.group_by("drop_reason").len().iter_rows())
    assert reasons == {None: 16, "too_small": 4, "box_outside_image": 4}  # images 4 and 5 of each class
    kept = crops.filter(pl.col("drop_reason").is_null())
    assert set(kept.select("x_min", "y_min", "x_max", "y_max").rows()) == {(20, 0, 48, 40)}  # the 28-px strip
    records = pl.read_parquet(next((image_folder_run / "ssl/inet/metrics").rglob("records.parquet")))
    assert records.height == kept.height


def test_the_summary_covers_the_point(image_folder_run):
    summary = pl.read_parquet(image_folder_run / "ssl/inet/summary.parquet")
    assert set(summary["point"]) == {"method~simclr/epochs~1/seed~0"}
    assert set(summary["layer"]) == {"projector"}


def test_the_imagenet_config_plans_the_papers_dag(tmp_path):
    """config/ssl_imagenet.yaml validates and plans one 1000-epoch run per side, its 50 and 250 checkpoints."""
    build_image_folder(tmp_path / "data/imagenet/train", 2, classes=CLASSES)
    loc_csv(tmp_path / "data/imagenet/LOC_train_solution.csv")
    (tmp_path / "data/imagenet/crop_tags_ram.parquet").write_bytes(b"")  # named by the config, read by no dry run
    config = str(REPO / "config" / "ssl_imagenet.yaml")
    result = run_snakemake(tmp_path, None, "ssl", "--dry-run", "--configfile", config)
    jobs = Counter(rule for rule, _ in planned_jobs(result.stdout))
    assert jobs["imagenet_boxes"] == 1 and jobs["ssl_train"] == 2 and jobs["ssl_model"] == 6
    assert jobs["ssl_embed"] == 12 and jobs["ssl_metrics"] == 18  # 3 points x 2 sides (x 2 layers) (x 3 tests)
    assert jobs["ssl_crop_classifier_train"] == 2 and jobs["ssl_naive_bayes"] == 2 and jobs["ssl_crop_tags"] == 1
    trains = [wildcards for rule, wildcards in planned_jobs(result.stdout) if rule == "ssl_train"]
    assert {wildcards["ssl_point"] for wildcards in trains} == {"method~vicreg/epochs~1000/seed~0"}


def test_the_audit_config_runs_on_a_locally_saved_model(tmp_path):
    """config/audit_ssl.yaml over the tiny config: nothing trains an SSL model; a (random) ResNet-18 state dict saved
    where the config names it is imported, embedded, searched and measured by both one-model tests, against a
    public set X of another data set (ssl.public_dataset)."""
    torch.manual_seed(0)
    (tmp_path / "models").mkdir()
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "models" / "resnet18.pth")
    config = merged(TINY, yaml.safe_load((REPO / "config" / "audit_ssl.yaml").read_text()))
    config = merged(config, {"ssl": {"public_dataset": "scenes_public"}})  # X from images the target never saw
    run_snakemake(tmp_path, config, "ssl")
    results = tmp_path / "results" / "ssl" / "scenes_pool"
    assert sorted(path.name for path in (results / "models").iterdir()) == ["external~local_resnet18"]
    point = results / "metrics" / "external~local_resnet18" / "backbone"
    assert sorted(path.name for path in point.iterdir()) == ["crop_classifier", "naive_bayes"]  # no two-model test
    embeddings = pl.read_parquet(results / "embeddings/external~local_resnet18/A/backbone/public.parquet")
    assert len(embeddings["embedding"][0]) == 512  # ResNet-18's pooled features: the published backbone output
    assert embeddings["id"].str.starts_with("scenes_public-").all() and len(embeddings) > 0
    summary = pl.read_parquet(results / "summary.parquet")
    assert set(summary["test"]) == {"crop_classifier", "naive_bayes"} and summary["method"].is_null().all()
    assert (results / "agreement/external~local_resnet18/backbone/confidence.png").stat().st_size > 1000
