"""SSL training and embedding (workflow_scripts.ssl.train, .embed): every method trains, checkpoints load
strictly, shorter points get their checkpoints, a killed run resumes to the same weights, a NaN loss stops
the run, and full images and kept crops embed into L2-normalised rows."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import polars as pl
import pytest
import torch

from workflow_scripts.contracts import CROPS, SSL_TRAIN_LOG
from workflow_scripts.io import DataError, read_embeddings, read_metadata
from workflow_scripts.launch import launch_command
from workflow_scripts.ssl import embed as ssl_embed
from workflow_scripts.ssl import train as ssl_train
from workflow_scripts.ssl.models import load_ssl_checkpoint, save_ssl_checkpoint
from workflow_scripts.ssl.params import SSLTrainingParams
from workflow_scripts.synthetic import SyntheticConfig, generate

N_RECORDS, IMAGE_SIZE = 24, 32
# Tiny and fast: 3 steps an epoch on 24 images of 32 px, one thread (deterministic).
TINY = dict(image_size=IMAGE_SIZE, projector_hidden_dim=32, projector_output_dim=16, batch_size=8, warmup_steps=2)
TINY |= dict(threads=1, device="cpu", lr=1e-3)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """records.parquet with 24 synthetic 32-px images, and two split files (A: 16 ids, shared: 8)."""
    root = tmp_path_factory.mktemp("ssl_data")
    generate("syn", N_RECORDS, 0, SyntheticConfig(image_size=IMAGE_SIZE), root / "data")
    ids = pl.read_parquet(root / "data" / "records.parquet")["id"]
    pl.DataFrame({"id": ids[:16]}).write_parquet(root / "A.parquet")
    pl.DataFrame({"id": ids[16:]}).write_parquet(root / "shared.parquet")
    return root


def run(data, out_dir, **params) -> SSLTrainingParams:
    params = SSLTrainingParams(**{**TINY, "epochs": 1, **params})
    ssl_train.train(
        str(data / "data" / "records.parquet"), [str(data / "A.parquet"), str(data / "shared.parquet")], out_dir, params
    )
    return params


@pytest.fixture(scope="module")
def model_path(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("ssl_run")
    run(data, out)
    return out / "model.pt"


def weights(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


@pytest.mark.parametrize("method", ["vicreg", "barlowtwins", "simclr", "byol"])
def test_every_method_trains_with_a_finite_loss(data, tmp_path, method):
    run(data, tmp_path, method=method)
    log = SSL_TRAIN_LOG.read(tmp_path / "train_log.parquet")
    assert log["epoch"].to_list() == [1] and np.isfinite(log["loss"].to_numpy()).all()
    assert (log["embedding_std"] > 0).all()
    model, checkpoint = load_ssl_checkpoint(tmp_path / "model.pt", torch.device("cpu"))
    assert checkpoint["method"] == method and checkpoint["epoch"] == 1 and not model.training
    assert hasattr(model, "backbone_momentum") == (method == "byol")


def test_the_cli_trains_on_the_union_of_the_split_files(data, tmp_path):
    files = ["--records", str(data / "data" / "records.parquet"), "--out-dir", str(tmp_path / "tiny")]
    files += [arg for name in ("A", "shared") for arg in ("--ids", str(data / f"{name}.parquet"))]
    flags = ["--image-size", "32", "--projector-hidden-dim", "32", "--projector-output-dim", "16", "--batch-size", "24"]
    ssl_train.main([*files, *flags, "--epochs", "1", "--method", "simclr", "--threads", "1"])
    params = load_ssl_checkpoint(tmp_path / "tiny" / "model.pt", torch.device("cpu"))[1]["params"]
    assert params["method"] == "simclr" and params["image_size"] == 32 and "threads" not in params


def test_checkpoint_round_trip_is_strict(model_path, tmp_path):
    model, checkpoint = load_ssl_checkpoint(model_path, torch.device("cpu"))
    stored = weights(model_path)
    assert set(stored) == set(model.state_dict())
    assert all(torch.equal(stored[name], value) for name, value in model.state_dict().items())
    assert {"kind", "method", "backbone", "epoch", "params"} <= set(checkpoint) and checkpoint["kind"] == "ssl"
    save_ssl_checkpoint(tmp_path / "resaved.pt", model, checkpoint["params"], epoch=checkpoint["epoch"])
    assert all(torch.equal(stored[name], value) for name, value in weights(tmp_path / "resaved.pt").items())
    broken = torch.load(model_path, weights_only=True)
    broken["state_dict"].pop(next(iter(broken["state_dict"])))
    torch.save(broken, tmp_path / "broken.pt")
    with pytest.raises(RuntimeError, match="Missing key"):
        load_ssl_checkpoint(tmp_path / "broken.pt", torch.device("cpu"))
    torch.save({"model_name": "dejavu-vit-tiny", "state_dict": {}}, tmp_path / "clip.pt")
    with pytest.raises(ValueError, match="not an SSL checkpoint"):
        load_ssl_checkpoint(tmp_path / "clip.pt", torch.device("cpu"))


def test_save_epochs_keep_checkpoints_and_scratch_files_go(data, tmp_path):
    run(data, tmp_path, epochs=3, save_epochs="1,2")
    names = {path.name for path in tmp_path.iterdir()}
    assert names == {"model.pt", "model_epoch1.pt", "model_epoch2.pt", "train_log.parquet"}
    for epoch, name in ((1, "model_epoch1.pt"), (2, "model_epoch2.pt"), (3, "model.pt")):
        assert load_ssl_checkpoint(tmp_path / name, torch.device("cpu"))[1]["epoch"] == epoch
    assert SSL_TRAIN_LOG.read(tmp_path / "train_log.parquet")["epoch"].to_list() == [1, 2, 3]


class Killed(RuntimeError):
    pass


@pytest.mark.parametrize("method", ["vicreg", "byol"])
def test_a_killed_run_resumes_to_the_weights_of_an_uninterrupted_one(data, tmp_path, monkeypatch, method):
    run(data, tmp_path / "whole", method=method, epochs=3, save_epochs="1")
    real = ssl_train.train_one_epoch

    def killed_in_epoch_3(state, *args):
        if state.epoch == 2:
            raise Killed("killed")
        return real(state, *args)

    monkeypatch.setattr(ssl_train, "train_one_epoch", killed_in_epoch_3)
    with pytest.raises(Killed):
        run(data, tmp_path / "resumed", method=method, epochs=3, save_epochs="1")
    assert (tmp_path / "resumed" / "resume.pt").exists() and not (tmp_path / "resumed" / "model.pt").exists()
    monkeypatch.setattr(ssl_train, "train_one_epoch", real)
    run(data, tmp_path / "resumed", method=method, epochs=3, save_epochs="1", num_workers=0, preload_images=False)
    whole, resumed = weights(tmp_path / "whole" / "model.pt"), weights(tmp_path / "resumed" / "model.pt")
    assert set(whole) == set(resumed) and all(torch.equal(whole[name], resumed[name]) for name in whole)
    logs = [SSL_TRAIN_LOG.read(tmp_path / name / "train_log.parquet").drop("seconds") for name in ("whole", "resumed")]
    assert logs[0].equals(logs[1])


def test_a_nan_loss_stops_the_run_and_writes_no_model(data, tmp_path, monkeypatch):
    monkeypatch.setattr(ssl_train, "make_loss", lambda params, distributed: lambda a, b: (a * float("nan")).mean())
    with pytest.raises(ssl_train.TrainingDiverged, match=r"loss is nan at global step 1"):
        run(data, tmp_path)
    assert not (tmp_path / "model.pt").exists()


def test_too_few_images_for_a_batch_and_unknown_ids_are_errors(data, tmp_path):
    with pytest.raises(DataError, match="fewer than one batch"):
        run(data, tmp_path, batch_size=32)
    pl.DataFrame({"id": ["nobody"]}).write_parquet(tmp_path / "ghost.parquet")
    with pytest.raises(DataError, match=r"ghost\.parquet: 1 id\(s\) not in the records"):
        ssl_train.train(
            str(data / "data" / "records.parquet"), [str(tmp_path / "ghost.parquet")], tmp_path, SSLTrainingParams()
        )
    with pytest.raises(DataError, match="duplicate id"):
        ssl_train.train(
            str(data / "data" / "records.parquet"), [str(data / "A.parquet")] * 2, tmp_path, SSLTrainingParams()
        )


def crops_table(ids: list[str], dropped: set[str], box=(2, 3, 20, 30)) -> pl.DataFrame:
    rows = [
        {"id": i, "label": "x", **dict(zip(ssl_embed.BOX, [None] * 4 if i in dropped else box))}
        | {"drop_reason": "too_small" if i in dropped else None}
        for i in ids
    ]
    return pl.DataFrame(rows, schema=CROPS.polars())


def embed(data, model_path, out, layer="projector", crops=None, ids="A"):
    ssl_embed.main(
        ["--model", str(model_path), "--records", str(data / "data" / "records.parquet")]
        + ["--crop-images" if crops else "--images", f"{data / f'{ids}.parquet'}={out}"]
        + ["--layer", layer, "--device", "cpu"]
        + (["--crops", str(crops)] if crops else [])
    )
    return read_embeddings(out)


def test_embed_full_images_and_kept_crops(data, model_path, tmp_path):
    a_ids = pl.read_parquet(data / "A.parquet")["id"].to_list()
    ids, full = embed(data, model_path, tmp_path / "public.parquet")
    assert ids.tolist() == a_ids and full.shape == (16, 16)
    crops_table([*a_ids[::-1], "other"], dropped=set(a_ids[:5])).write_parquet(tmp_path / "crops.parquet")
    ids, cropped = embed(data, model_path, tmp_path / "crops_A.parquet", crops=tmp_path / "crops.parquet")
    assert ids.tolist() == a_ids[5:]  # the split's order, dropped crops left out
    for matrix in (full, cropped):
        np.testing.assert_allclose(np.linalg.norm(matrix, axis=1), 1.0, rtol=1e-5)
    assert not np.allclose(cropped, full[5:])  # the crop, not the image, was embedded
    provenance = read_metadata(tmp_path / "crops_A.parquet")["dejavu:params"]
    assert '"layer": "projector"' in provenance and "crops.parquet" in provenance and '"model_epoch": 1' in provenance


def test_projector_and_backbone_widths_are_the_configured_ones(data, model_path, tmp_path):
    _, projector = embed(data, model_path, tmp_path / "p.parquet", ids="shared")
    _, backbone = embed(data, model_path, tmp_path / "b.parquet", layer="backbone", ids="shared")
    assert projector.shape == (8, TINY["projector_output_dim"]) and backbone.shape == (8, 256)  # tiny_cnn: 256


def test_embed_refuses_missing_crop_rows_and_boxes_outside_the_image(data, model_path, tmp_path):
    a_ids = pl.read_parquet(data / "A.parquet")["id"].to_list()
    crops_table(a_ids[1:], dropped=set()).write_parquet(tmp_path / "short.parquet")
    with pytest.raises(DataError, match=r"short\.parquet: no row for 1 requested id"):
        embed(data, model_path, tmp_path / "e.parquet", crops=tmp_path / "short.parquet")
    crops_table(a_ids, dropped=set(), box=(0, 0, IMAGE_SIZE + 1, 8)).write_parquet(tmp_path / "wide.parquet")
    with pytest.raises(DataError, match="outside its 32x32 image"):
        embed(data, model_path, tmp_path / "e.parquet", crops=tmp_path / "wide.parquet")
    assert not (tmp_path / "e.parquet").exists()


def test_two_processes_under_torchrun_train_one_model(data, tmp_path):
    """The launch the rule uses for ssl.training.gpus_per_node 2 (workflow_scripts.launch): two CPU processes
    (gloo) split each batch and write one model, as the CLIP trainer does."""
    command = launch_command({"gpus_per_node": 2}).replace("python", sys.executable, 1).split()
    files = ["--records", str(data / "data" / "records.parquet"), "--out-dir", str(tmp_path / "ddp")]
    files += [arg for name in ("A", "shared") for arg in ("--ids", str(data / f"{name}.parquet"))]
    flags = ["--image-size", "32", "--projector-hidden-dim", "32", "--projector-output-dim", "16"]
    flags += ["--batch-size", "8", "--epochs", "1", "--device", "cpu", "--threads", "1"]
    result = subprocess.run([*command, "workflow_scripts.ssl.train", *files, *flags], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    model, checkpoint = load_ssl_checkpoint(tmp_path / "ddp" / "model.pt", torch.device("cpu"))
    assert checkpoint["epoch"] == 1 and SSL_TRAIN_LOG.read(tmp_path / "ddp" / "train_log.parquet").height == 1
    assert all(torch.isfinite(tensor).all() for tensor in model.state_dict().values())
