"""Importing published SSL models (workflow_scripts.ssl.published): every source rebuilds the published model
exactly (bitwise-equal features on the CPU), records its preprocessing, loads strictly, and says what is missing
when weights or a hub folder are absent; the SSL embedding job embeds with an imported model."""

from __future__ import annotations

import json

import huggingface_hub
import numpy as np
import polars as pl
import pytest
import safetensors.torch
import timm
import torch
import torchvision
from PIL import Image
from torch import nn
from torchvision import transforms

from workflow_scripts.io import read_embeddings, read_metadata
from workflow_scripts.models import PretrainedUnavailableError
from workflow_scripts.ssl import embed as ssl_embed
from workflow_scripts.ssl import published
from workflow_scripts.ssl.models import SSLModel, save_ssl_checkpoint
from workflow_scripts.synthetic import SyntheticConfig, generate

CPU = torch.device("cpu")
IMAGES = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 4 - 2  # normalised-looking input
IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
DEFAULT = {"resize": 256, "crop": 224, **IMAGENET, "interpolation": "bilinear"}
PICTURE = Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 90, 3), dtype=np.uint8))
HUBCONF = '''
from pathlib import Path

import torch
import torchvision

dependencies = ["torch", "torchvision"]


def _resnet(seed):
    torch.manual_seed(seed)
    return torchvision.models.resnet18(weights=None)


def tiny(pretrained=True):
    """The published weights come from the hub cache's checkpoints/, as torch.hub.load_state_dict_from_url's."""
    model = _resnet(1)
    model.fc = torch.nn.Identity()
    if pretrained:
        model.load_state_dict(torch.load(Path(torch.hub.get_dir()) / "checkpoints" / "tiny.pth", weights_only=True))
    return model


def plain():
    """No `pretrained` argument: always the published weights."""
    return tiny()


def with_fc(pretrained=True):
    """As barlowtwins' resnet50: the backbone's weights, a random Linear fc."""
    model = _resnet(2)
    if pretrained:
        model.load_state_dict(torch.load(Path(torch.hub.get_dir()) / "checkpoints" / "tiny.pth", weights_only=True), strict=False)
    return model
'''


def resnet18(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return torchvision.models.resnet18(weights=None).eval()


def backbone(model: nn.Module) -> nn.Module:
    model.fc = nn.Identity()
    return model.eval()


def assert_same_features(model_path, original: nn.Module, layer: str = "backbone") -> dict:
    """The loaded encoder's features on IMAGES are bitwise those of the original model."""
    encode, _, metadata = published.load_ssl_encoder(model_path, CPU)
    with torch.no_grad():
        expected = original.encode(IMAGES, layer) if isinstance(original, SSLModel) else original(IMAGES)
        assert torch.equal(encode(IMAGES, layer), expected)
    return metadata


def same_transform(transform, expected) -> bool:
    return torch.equal(transform(PICTURE), expected(PICTURE))


def drop_a_weight(path, key_of=lambda state: state) -> None:
    """Rewrite a weights file without its first weight (the stem convolution's)."""
    saved = torch.load(path, weights_only=True)
    state = key_of(saved)
    del state[next(iter(state))]
    torch.save(saved, path)


@pytest.fixture
def torchvision_weights(tmp_path):
    """(resnet18, its weights as a training script saves them: under "state_dict", "module."-prefixed, fc included)."""
    model = resnet18(0)
    path = tmp_path / "resnet18.pth"
    torch.save({"epoch": 3, "state_dict": {f"module.{key}": value for key, value in model.state_dict().items()}}, path)
    return model, path


def test_torchvision_import_is_the_published_backbone(torchvision_weights, tmp_path, caplog):
    model, weights = torchvision_weights
    caplog.set_level("INFO")
    published.import_ssl_target(tmp_path / "model.pt", "torchvision:resnet18", str(weights))
    checkpoint = torch.load(tmp_path / "model.pt", weights_only=True)
    assert {key: checkpoint[key] for key in ("kind", "source", "architecture", "hub", "layers", "feature_dim")} == {
        "kind": "ssl_published",
        "source": "torchvision",
        "architecture": "resnet18",
        "hub": None,
        "layers": ["backbone"],
        "feature_dim": 512,
    }
    assert checkpoint["preprocess"] == DEFAULT and not any(key.startswith("fc.") for key in checkpoint["state_dict"])
    assert "['fc.bias', 'fc.weight'] dropped" in caplog.text
    metadata = assert_same_features(tmp_path / "model.pt", backbone(model))
    _, transform, _ = published.load_ssl_encoder(tmp_path / "model.pt", CPU)
    reference = [transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor()]
    assert same_transform(transform, transforms.Compose([*reference, transforms.Normalize(**IMAGENET)]))
    assert metadata["dims"] == {"backbone": 512} and metadata["name"] == "torchvision:resnet18"


def test_strict_loading_refuses_a_missing_weight(torchvision_weights, tmp_path):
    _, weights = torchvision_weights
    published.import_ssl_target(tmp_path / "model.pt", "torchvision:resnet18", str(weights))
    drop_a_weight(tmp_path / "model.pt", lambda checkpoint: checkpoint["state_dict"])
    with pytest.raises(ValueError, match=r"Missing key\(s\) in state_dict: \"conv1.weight\""):
        published.load_ssl_encoder(tmp_path / "model.pt", CPU)
    drop_a_weight(weights, lambda checkpoint: checkpoint["state_dict"])
    with pytest.raises(ValueError, match=r"(?s)resnet18\.pth \(resnet18\): the weights do not fit.*\"conv1.weight\""):
        published.import_ssl_target(tmp_path / "other.pt", "torchvision:resnet18", str(weights))
    assert not (tmp_path / "other.pt").exists()


def test_a_published_model_has_no_projector(torchvision_weights, tmp_path):
    published.import_ssl_target(tmp_path / "model.pt", "torchvision:resnet18", str(torchvision_weights[1]))
    encode, _, _ = published.load_ssl_encoder(tmp_path / "model.pt", CPU)
    with pytest.raises(ValueError, match=r"torchvision:resnet18: no layer 'projector': only `backbone` exists"):
        encode(IMAGES, "projector")


@pytest.fixture
def timm_model(tmp_path):
    """(resnet10t at random initialisation without its classifier, its full weights saved as the overlay file)."""
    torch.manual_seed(0)
    full = timm.create_model("resnet10t", pretrained=False)
    torch.save(full.state_dict(), tmp_path / "resnet10t.pth")
    model = timm.create_model("resnet10t", pretrained=False, num_classes=0)
    model.load_state_dict({key: value for key, value in full.state_dict().items() if not key.startswith("fc.")})
    return model.eval(), tmp_path / "resnet10t.pth"


def test_timm_import_is_the_published_model_with_timms_preprocessing(timm_model, tmp_path):
    model, weights = timm_model
    published.import_ssl_target(tmp_path / "model.pt", "timm:resnet10t", str(weights))
    metadata = assert_same_features(tmp_path / "model.pt", model)
    config = timm.data.resolve_data_config({}, model=model)  # input 176, crop_pct 0.875, bicubic, ImageNet
    assert metadata["preprocess"] == {
        "resize": int(176 / 0.875),  # 201: the shorter side before the crop
        "crop": config["input_size"][1],
        "mean": list(config["mean"]),
        "std": list(config["std"]),
        "interpolation": config["interpolation"],
    }
    assert metadata["feature_dim"] == model.num_features == 512
    _, transform, _ = published.load_ssl_encoder(tmp_path / "model.pt", CPU)
    assert same_transform(transform, timm.data.create_transform(**config))


def test_timm_import_reads_the_hugging_face_cache_and_names_a_missing_file(timm_model, tmp_path, monkeypatch):
    model, weights = timm_model
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(
        PretrainedUnavailableError, match=r"model\.safetensors of timm/resnet10t\.c3_in1k is not in the"
    ):
        published.import_ssl_target(tmp_path / "model.pt", "timm:resnet10t")
    repo = tmp_path / "hf" / "models--timm--resnet10t.c3_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
    safetensors.torch.save_file(torch.load(weights), repo / "snapshots" / ("0" * 40) / "model.safetensors")
    published.import_ssl_target(tmp_path / "model.pt", "timm:resnet10t")
    assert_same_features(tmp_path / "model.pt", model)


def test_timm_import_refuses_weights_with_a_missing_key(timm_model, tmp_path):
    """timm loads non-strictly once it drops the classifier: the import must still refuse a missing weight."""
    drop_a_weight(timm_model[1])
    with pytest.raises(ValueError, match=r"do not fit timm 'resnet10t': Missing keys \(conv1.0.weight\)"):
        published.import_ssl_target(tmp_path / "model.pt", "timm:resnet10t", str(timm_model[1]))


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A torch hub cache (TORCH_HOME) holding the repo owner/tiny at ref main and the published weights of its
    `tiny` entry (resnet18 without fc, seed 0)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    hub_dir = tmp_path / "torch" / "hub"
    assert torch.hub.get_dir() == str(hub_dir)
    (hub_dir / "owner_tiny_main").mkdir(parents=True)
    (hub_dir / "owner_tiny_main" / "hubconf.py").write_text(HUBCONF)
    (hub_dir / "checkpoints").mkdir()
    model = backbone(resnet18(0))
    torch.save(model.state_dict(), hub_dir / "checkpoints" / "tiny.pth")
    return model, hub_dir


@pytest.mark.parametrize("entry", ["tiny", "plain", "with_fc"])
def test_hub_import_is_what_the_entry_returns_without_the_network(hub, entry, tmp_path):
    model, hub_dir = hub
    published.import_ssl_target(tmp_path / "model.pt", f"hub:owner/tiny:main/{entry}")
    metadata = assert_same_features(tmp_path / "model.pt", model)  # with_fc's random fc replaced by Identity
    assert metadata["hub"] == {"repo": "owner/tiny", "ref": "main", "entry": entry, "folder": "owner_tiny_main"}
    assert metadata["preprocess"] == DEFAULT and metadata["feature_dim"] == 512
    if entry == "tiny":  # rebuilt with pretrained=False: the checkpoint alone carries the weights
        (hub_dir / "checkpoints" / "tiny.pth").unlink()
        assert_same_features(tmp_path / "model.pt", model)


def test_hub_weights_file_overrides_the_entrys_strictly(hub, tmp_path):
    other = backbone(resnet18(5))
    torch.save(other.state_dict(), tmp_path / "other.pth")
    published.import_ssl_target(tmp_path / "model.pt", "hub:owner/tiny:main/tiny", str(tmp_path / "other.pth"))
    assert_same_features(tmp_path / "model.pt", other)
    drop_a_weight(tmp_path / "other.pth")
    with pytest.raises(ValueError, match=r"other\.pth \(tiny\): the weights do not fit"):
        published.import_ssl_target(tmp_path / "bad.pt", "hub:owner/tiny:main/tiny", str(tmp_path / "other.pth"))


def test_a_missing_hub_folder_or_entry_weights_say_what_is_missing(hub, tmp_path):
    _, hub_dir = hub
    with pytest.raises(PretrainedUnavailableError, match=r"no hubconf.py in .*owner_absent_v1\.0") as error:
        published.import_ssl_target(tmp_path / "model.pt", "hub:owner/absent:v1.0/resnet50")
    assert "torch.hub.load('owner/absent:v1.0', 'resnet50', trust_repo=True)" in str(error.value)
    (hub_dir / "checkpoints" / "tiny.pth").unlink()
    with pytest.raises(PretrainedUnavailableError, match=r"weights of torch hub owner/tiny:main 'tiny'.*tiny\.pth"):
        published.import_ssl_target(tmp_path / "model.pt", "hub:owner/tiny:main/tiny")
    with pytest.raises(ValueError, match="expected hub:OWNER/REPO:REF/ENTRY"):
        published.import_ssl_target(tmp_path / "model.pt", "hub:owner/tiny/tiny")


def test_local_dir_folder_with_its_preprocessing(torchvision_weights, tmp_path):
    model, weights = torchvision_weights
    folder = tmp_path / "published"
    folder.mkdir()
    weights.rename(folder / "backbone.pth")
    preprocess = {"resize": 146, "crop": 128, "interpolation": "bicubic"}
    config = {"model": "torchvision:resnet18", "weights": "backbone.pth", "preprocess": preprocess}
    (folder / "ssl_model.json").write_text(json.dumps(config))
    published.main(
        ["import", "--model", f"local-dir:{folder}", "--preprocess", '{"crop": 120}', "--out", str(tmp_path / "m.pt")]
    )
    metadata = assert_same_features(tmp_path / "m.pt", backbone(model))
    assert (
        metadata["preprocess"] == {**DEFAULT, **preprocess, "crop": 120} and metadata["model"] == f"local-dir:{folder}"
    )
    assert metadata["weights"] == str(folder / "backbone.pth")


def test_a_trainer_checkpoint_is_copied_unchanged_with_both_layers(tmp_path):
    torch.manual_seed(0)
    model = SSLModel("vicreg", "tiny_cnn", 32, 16).eval()
    params = {"projector_hidden_dim": 32, "projector_output_dim": 16, "image_size": 48}
    save_ssl_checkpoint(tmp_path / "trained.pt", model, params, epoch=2)
    published.import_ssl_target(tmp_path / "model.pt", f"checkpoint:{tmp_path / 'trained.pt'}")
    assert (tmp_path / "model.pt").read_bytes() == (tmp_path / "trained.pt").read_bytes()
    for layer in ("projector", "backbone"):
        metadata = assert_same_features(tmp_path / "model.pt", model, layer)
    assert metadata["kind"] == "ssl" and metadata["dims"] == {"backbone": 256, "projector": 16}
    _, transform, _ = published.load_ssl_encoder(tmp_path / "model.pt", CPU)
    assert same_transform(transform, published.eval_transform(48))
    reference = [transforms.Resize(55), transforms.CenterCrop(48), transforms.ToTensor()]  # 55 = round(48 * 256/224)
    assert same_transform(transform, transforms.Compose([*reference, transforms.Normalize(**IMAGENET)]))


def test_ssl_embed_embeds_with_an_imported_model(torchvision_weights, tmp_path):
    generate("syn", 4, 0, SyntheticConfig(image_size=32), tmp_path / "data")
    ids = pl.read_parquet(tmp_path / "data" / "records.parquet")["id"]
    pl.DataFrame({"id": ids}).write_parquet(tmp_path / "X.parquet")
    preprocess = json.dumps({"resize": 36, "crop": 32})
    weights = ["--weights", str(torchvision_weights[1])]
    published.main(
        [
            "import",
            "--model",
            "torchvision:resnet18",
            *weights,
            "--preprocess",
            preprocess,
            "--out",
            str(tmp_path / "model.pt"),
        ]
    )
    arguments = ["--model", str(tmp_path / "model.pt"), "--records", str(tmp_path / "data" / "records.parquet")]
    arguments += ["--images", f"{tmp_path / 'X.parquet'}={tmp_path / 'X_emb.parquet'}", "--device", "cpu"]
    ssl_embed.main([*arguments, "--layer", "backbone"])
    embedded_ids, rows = read_embeddings(tmp_path / "X_emb.parquet")
    assert embedded_ids.tolist() == ids.to_list() and rows.shape == (4, 512)
    provenance = json.loads(read_metadata(tmp_path / "X_emb.parquet")["dejavu:params"])
    assert provenance["model_kind"] == "ssl_published" and provenance["model_name"] == "torchvision:resnet18"
    with pytest.raises(ValueError, match="only `backbone` exists"):
        ssl_embed.main([*arguments, "--layer", "projector"])
