"""The crop classifier of the one-model SSL test (workflow_scripts.ssl.crop_classifier): it trains on the kept
crops of A and writes its model and log, predicts every kept crop of a set, reproduces with its seed, resumes
to an uninterrupted run's weights, stops on a NaN loss, loads strictly, and learns a planted signal."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import polars as pl
import pytest
import torch
from PIL import Image

from workflow_scripts.contracts import CROP_CLASSIFIER_LOG, CROPS, RECORDS, SSL_PREDICTIONS
from workflow_scripts.io import DataError, read_metadata
from workflow_scripts.launch import launch_command
from workflow_scripts.ssl import crop_classifier as cc
from workflow_scripts.ssl import crops as ssl_crops
from workflow_scripts.ssl.classifier_params import CropClassifierParams
from workflow_scripts.ssl.embed import crop
from workflow_scripts.ssl.published import eval_transform
from workflow_scripts.synthetic import SceneStyle, SyntheticConfig, generate

# Tiny and fast: about 55 kept crops of A at 16 px, 3 steps an epoch, one thread on the CPU (deterministic).
TINY = dict(image_size=16, batch_size=16, epochs=2, warmup_steps=2, lr=1e-3, device="cpu", threads=1)
SETS = ("A", "B", "holdout")


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    """120 synthetic 48-px scenes with a large foreground object; A: 60 ids, B: 40, holdout: 20; their crops
    (min_px 16 drops about one in ten)."""
    root = tmp_path_factory.mktemp("crop_classifier")
    style = SceneStyle(background_marks=12, foreground_radius=0.7)
    generate("syn", 120, 5, SyntheticConfig(image_size=48), root / "data", style)
    ids = pl.read_parquet(root / "data" / "records.parquet")["id"]
    for name, part in zip(SETS, (ids[:60], ids[60:100], ids[100:])):
        pl.DataFrame({"id": part}).write_parquet(root / f"{name}.parquet")
    ssl_crops.make_crops(
        str(root / "data" / "records.parquet"),
        str(root / "data" / "boxes.parquet"),
        "dominant_object",
        [str(root / f"{name}.parquet") for name in SETS],
        16,
        "exclude",
        str(root / "crops.parquet"),
    )
    return root


def paths(data) -> dict[str, str]:
    return {"records": str(data / "data" / "records.parquet"), "crops": str(data / "crops.parquet")}


def run(data, out_dir, val: str | None = "B", **params) -> CropClassifierParams:
    params = CropClassifierParams(**{**TINY, **params})
    files = paths(data)
    val_ids = None if val is None else str(data / f"{val}.parquet")
    cc.train(files["records"], files["crops"], str(data / "A.parquet"), out_dir, params, val_ids=val_ids)
    return params


@pytest.fixture(scope="module")
def trained(scenes, tmp_path_factory):
    """A run through the command line, with TINY's flags."""
    out = tmp_path_factory.mktemp("crop_classifier_run")
    files = paths(scenes)
    args = ["train", "--records", files["records"], "--crops", files["crops"], "--out-dir", str(out)]
    args += ["--train-ids", str(scenes / "A.parquet"), "--val-ids", str(scenes / "B.parquet")]
    args += [arg for name, value in TINY.items() for arg in (f"--{name.replace('_', '-')}", str(value))]
    cc.main(args)
    return out


def kept(data, name: str) -> pl.DataFrame:
    """The crops table's kept rows of a set, in the table's order."""
    ids = pl.read_parquet(data / f"{name}.parquet")["id"]
    return CROPS.read(data / "crops.parquet").filter(pl.col("id").is_in(ids.implode()))


def weights(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def same_weights(a, b) -> bool:
    a, b = weights(a), weights(b)
    return set(a) == set(b) and all(torch.equal(a[name], b[name]) for name in a)


def test_training_writes_the_model_and_the_log(scenes, trained):
    assert {path.name for path in trained.iterdir()} == {"model.pt", "train_log.parquet"}
    log = CROP_CLASSIFIER_LOG.read(trained / "train_log.parquet")
    assert log["epoch"].to_list() == [1, 2] and np.isfinite(log["loss"].to_numpy()).all()
    for column in ("train_accuracy", "val_accuracy"):
        assert log[column].is_between(0, 1).all() and log[column].null_count() == 0
    assert read_metadata(trained / "train_log.parquet")["dejavu:stage"] == "ssl_crop_classifier"
    checkpoint = torch.load(trained / "model.pt", weights_only=True)
    assert set(checkpoint) == {"kind", "backbone", "classes", "params", "epoch", "state_dict"}
    a_kept = kept(scenes, "A").filter(pl.col("drop_reason").is_null())
    assert checkpoint["classes"] == sorted(set(a_kept["label"].to_list()))  # the training crops' labels, in order
    assert (checkpoint["kind"], checkpoint["backbone"], checkpoint["epoch"]) == ("crop_classifier", "tiny_cnn", 2)
    assert checkpoint["params"]["image_size"] == 16 and "threads" not in checkpoint["params"]
    model, metadata = cc.load_classifier(trained / "model.pt", torch.device("cpu"))
    assert not model.training and model.head.out_features == len(metadata["classes"])


def test_predictions_cover_each_sets_kept_crops_in_order(scenes, trained, tmp_path):
    files = paths(scenes)
    args = ["predict", "--model", str(trained / "model.pt"), "--records", files["records"], "--crops", files["crops"]]
    for name in ("A", "holdout"):
        args += ["--predict", f"{scenes / f'{name}.parquet'}={tmp_path / f'{name}.parquet'}"]
    cc.main([*args, "--votes-k", "7", "--device", "cpu", "--batch-size", "8"])
    model, checkpoint = cc.load_classifier(trained / "model.pt", torch.device("cpu"))
    for name in ("A", "holdout"):
        table, crops = SSL_PREDICTIONS.read(tmp_path / f"{name}.parquet"), kept(scenes, name)
        assert crops["drop_reason"].null_count() < len(crops)  # the set has dropped crops: they are left out
        assert table["id"].to_list() == crops.filter(pl.col("drop_reason").is_null())["id"].to_list()
        assert (table["votes"].list.len() == 7).all() and table["predicted"].is_in(checkpoint["classes"]).all()
        assert (table["votes"].list.first() == table["predicted"]).all()  # the most probable has the most votes
        assert table["probability"].is_between(1 / len(model.classes), 1).all()
        assert table["entropy"].is_between(0, math.log(len(model.classes)) + 1e-9).all()
    first = crops.filter(pl.col("drop_reason").is_null()).row(0, named=True)  # the holdout's first kept crop
    image = Image.open(scenes / "data" / "images" / f"{first['id']}.png").convert("RGB")
    pixels = crop(image, tuple(first[name] for name in ("x_min", "y_min", "x_max", "y_max")), first["id"])
    with torch.no_grad():
        direct = torch.softmax(model(eval_transform(16)(pixels)[None]), dim=1)[0].double()
    assert table["probability"][0] == pytest.approx(float(direct.max()), rel=1e-5)  # the softmax, unchanged
    assert table["predicted"][0] == model.classes[int(direct.argmax())]
    assert '"votes_k": 7' in read_metadata(tmp_path / "holdout.parquet")["dejavu:params"]


def test_a_run_reproduces_bitwise_with_its_seed_and_differs_with_another(scenes, trained, tmp_path):
    run(scenes, tmp_path / "again")
    assert same_weights(trained / "model.pt", tmp_path / "again" / "model.pt")
    logs = [
        CROP_CLASSIFIER_LOG.read(path / "train_log.parquet").drop("seconds") for path in (trained, tmp_path / "again")
    ]
    assert logs[0].equals(logs[1])
    run(scenes, tmp_path / "other", seed=1)
    assert not same_weights(trained / "model.pt", tmp_path / "other" / "model.pt")


class Killed(RuntimeError):
    pass


def test_a_killed_run_resumes_to_the_weights_of_an_uninterrupted_one(scenes, tmp_path, monkeypatch):
    run(scenes, tmp_path / "whole", epochs=3, save_epochs="1")
    real = cc.train_one_epoch

    def killed_after_epoch_1(state, *args):
        if state.epoch == 1:
            raise Killed("killed")
        return real(state, *args)

    monkeypatch.setattr(cc, "train_one_epoch", killed_after_epoch_1)
    with pytest.raises(Killed):
        run(scenes, tmp_path / "resumed", epochs=3, save_epochs="1")
    names = {path.name for path in (tmp_path / "resumed").iterdir()}
    assert names == {"resume.pt", "model_epoch1.pt"}  # no model.pt, no log
    monkeypatch.setattr(cc, "train_one_epoch", real)
    # Execution settings are no part of the run's identity: other ones keep the resume file.
    run(scenes, tmp_path / "resumed", epochs=3, save_epochs="1", num_workers=1, preload_images=False)
    for name in ("model.pt", "model_epoch1.pt"):
        assert same_weights(tmp_path / "whole" / name, tmp_path / "resumed" / name)
    logs = [CROP_CLASSIFIER_LOG.read(tmp_path / n / "train_log.parquet").drop("seconds") for n in ("whole", "resumed")]
    assert logs[0].equals(logs[1]) and not (tmp_path / "resumed" / "resume.pt").exists()


def test_a_nan_loss_stops_the_run_naming_epoch_and_step_and_writes_no_model(scenes, tmp_path, monkeypatch):
    monkeypatch.setattr(cc, "make_loss", lambda: lambda logits, codes: (logits * float("nan")).mean())
    with pytest.raises(cc.TrainingDiverged, match=r"epoch 1, step 1: loss is nan at global step 1"):
        run(scenes, tmp_path)
    assert not (tmp_path / "model.pt").exists()


def test_a_strict_load_refuses_a_missing_weight_and_another_kind(trained, tmp_path):
    broken = torch.load(trained / "model.pt", weights_only=True)
    broken["state_dict"].pop(next(iter(broken["state_dict"])))
    torch.save(broken, tmp_path / "broken.pt")
    with pytest.raises(RuntimeError, match="Missing key"):
        cc.load_classifier(tmp_path / "broken.pt", torch.device("cpu"))
    torch.save({"kind": "ssl", "state_dict": {}}, tmp_path / "ssl.pt")
    with pytest.raises(ValueError, match="not a crop classifier checkpoint"):
        cc.load_classifier(tmp_path / "ssl.pt", torch.device("cpu"))


def test_too_few_crops_for_a_batch_is_an_error(scenes, tmp_path):
    with pytest.raises(DataError, match="fewer than one batch of 64"):
        run(scenes, tmp_path, batch_size=64)


def test_two_processes_under_torchrun_train_one_model(scenes, tmp_path):
    """The launch of workflow_scripts.launch for gpus_per_node 2: two CPU processes (gloo) split each batch and
    the validation crops, and rank 0 writes one model."""
    command = launch_command({"gpus_per_node": 2}).replace("python", sys.executable, 1).split()
    files = paths(scenes)
    args = ["train", "--records", files["records"], "--crops", files["crops"], "--out-dir", str(tmp_path / "ddp")]
    args += ["--train-ids", str(scenes / "A.parquet"), "--val-ids", str(scenes / "B.parquet")]
    args += [arg for name, value in TINY.items() for arg in (f"--{name.replace('_', '-')}", str(value))]
    result = subprocess.run([*command, "workflow_scripts.ssl.crop_classifier", *args], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    model, checkpoint = cc.load_classifier(tmp_path / "ddp" / "model.pt", torch.device("cpu"))
    assert checkpoint["epoch"] == 2 and all(torch.isfinite(tensor).all() for tensor in model.state_dict().values())
    log = CROP_CLASSIFIER_LOG.read(tmp_path / "ddp" / "train_log.parquet")
    assert log.height == 2 and log["val_accuracy"].is_between(0, 1).all()
    assert '"world_size": 2' in read_metadata(tmp_path / "ddp" / "train_log.parquet")["dejavu:params"]


PALETTE = {"blue": (50, 70, 210), "green": (40, 180, 60), "red": (200, 40, 40)}


def planted(root, n: int = 96, size: int = 24) -> None:
    """Images whose left half is a noisy field of their label's colour and whose right half is a field of a
    random label's; A: the first two thirds, B: the rest. Two crops tables: the left halves, the right halves."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    ids, labels = [f"p{i:03d}" for i in range(n)], [list(PALETTE)[i % 3] for i in range(n)]
    for record_id, label in zip(ids, labels):
        pixels = np.asarray(PALETTE[label]) + rng.normal(0, 40, (size, size, 3))
        pixels[:, size // 2 :] = np.asarray(list(PALETTE.values())[rng.integers(3)]) + rng.normal(0, 40, (size, 1, 3))
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(root / "images" / f"{record_id}.png")
    paths = [f"images/{record_id}.png" for record_id in ids]
    records = {"id": ids, "image_path": paths, "captions": [[]] * n}
    pl.DataFrame(records, schema=RECORDS.polars()).write_parquet(root / "records.parquet")
    for half, x_min in (("left", 0), ("right", size // 2)):
        box = {"x_min": x_min, "y_min": 0, "x_max": x_min + size // 2, "y_max": size, "drop_reason": None}
        rows = [{"id": i, "label": label, **box} for i, label in zip(ids, labels)]
        pl.DataFrame(rows, schema=CROPS.polars()).write_parquet(root / f"crops_{half}.parquet")
    for name, part in (("A", ids[: 2 * n // 3]), ("B", ids[2 * n // 3 :])):
        pl.DataFrame({"id": part}).write_parquet(root / f"{name}.parquet")


def test_a_planted_colour_in_the_crop_is_learned_well_above_chance(tmp_path):
    """The crop's colour is the label: validation accuracy far above chance (1/3) after a few epochs; the other
    half of the image, a random label's colour, teaches nothing (the classifier sees the crop, not the image)."""
    data = tmp_path / "data"
    planted(data)
    params = CropClassifierParams(**{**TINY, "epochs": 3, "lr": 3e-3})
    accuracy = {}
    for half in ("left", "right"):
        cc.train(
            str(data / "records.parquet"),
            str(data / f"crops_{half}.parquet"),
            str(data / "A.parquet"),
            tmp_path / half,
            params,
            val_ids=str(data / "B.parquet"),
        )
        accuracy[half] = CROP_CLASSIFIER_LOG.read(tmp_path / half / "train_log.parquet")["val_accuracy"][-1]
    assert accuracy["left"] > 0.9 and accuracy["right"] < 0.6, accuracy
