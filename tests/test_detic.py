"""Detic annotator: vocabularies, their CLIP text embeddings, the predictor wiring (against stand-in detectron2,
Detic and CenterNet modules that record every config key and call), batched chunks, the merge and the rules."""

import os
import re
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from PIL import Image

from conftest import run_snakemake
from real_data import build_image_folder
from workflow_scripts import adapters, detic
from workflow_scripts.io import DataError, embeddings_table

torch.set_num_threads(1)


def write_class_embeddings_table(path: Path, names: list[str], embeddings: np.ndarray) -> None:
    pq.write_table(embeddings_table(names, embeddings).rename_columns(["class_name", "embedding"]), path)


# --- vocabularies ----------------------------------------------------------------------------------------------


def fake_detic_clone(root: Path) -> Path:
    (root / "detic/data/datasets").mkdir(parents=True)
    (root / "datasets/metadata").mkdir(parents=True)
    (root / "third_party/CenterNet2").mkdir(parents=True)
    (root / "detic/data/datasets/lvis_22k_categories.py").write_text(
        "CATEGORIES = [{'name': 'air_conditioner', 'id': 2, 'synset': 'x.n.01'}, {'name': 'aerosol_can', 'id': 1}, "
        "{'id': 3, 'synset': 'vitamin_p.n.01', 'name': 'vitamin_P'}]  # noqa\n"
    )
    (root / "datasets/metadata/lvis_v1_train_cat_info.json").write_text(
        '[{"name": "zebra", "id": 2, "image_count": 5}, {"name": "aerosol_can", "id": 1, "image_count": 64}]'
    )
    return root


def test_vocabularies_come_from_the_detic_clone_or_a_file_with_underscores_as_spaces(tmp_path):
    repo = fake_detic_clone(tmp_path / "Detic")
    assert detic.read_vocabulary("lvis-22k", str(repo)) == ["aerosol can", "air conditioner", "vitamin P"]
    assert detic.read_vocabulary("lvis", str(repo)) == ["aerosol can", "zebra"]
    names = tmp_path / "names.txt"
    names.write_text("hot_dog\n\n  cat \n")
    assert detic.read_vocabulary(str(names), str(repo)) == ["hot dog", "cat"]


def test_a_vocabulary_file_that_is_not_a_literal_or_misses_ids_is_refused(tmp_path):
    repo = fake_detic_clone(tmp_path / "Detic")
    source = repo / "detic/data/datasets/lvis_22k_categories.py"
    source.write_text("import os\nCATEGORIES = [dict(name=os.getcwd(), id=1)]\n")
    with pytest.raises(DataError, match="not a literal list"):
        detic.read_vocabulary("lvis-22k", str(repo))
    source.write_text("CATEGORIES = [{'name': 'a', 'id': 1}, {'name': 'b', 'id': 3}]\n")
    with pytest.raises(DataError, match=r"ids are not 1\.\.2"):
        detic.read_vocabulary("lvis-22k", str(repo))
    with pytest.raises(DataError, match=r"lvis_v1_train_cat_info\.json: file does not exist"):
        detic.read_vocabulary("lvis", str(tmp_path))
    with pytest.raises(DataError, match=r"missing\.txt: vocabulary file does not exist"):
        detic.read_vocabulary(str(tmp_path / "missing.txt"), str(repo))


def test_the_vocabulary_key_is_shared_by_equal_specs_and_changes_with_the_prompt():
    spec = {"repo": "external/Detic", "vocabulary": "lvis-22k", "prompt": "a {}", "clip_weights": "clip.pt"}
    assert detic.vocabulary_key(spec) == detic.vocabulary_key(dict(spec))
    assert detic.vocabulary_key(spec).startswith("lvis-22k-")
    assert detic.vocabulary_key(spec) != detic.vocabulary_key({**spec, "prompt": "a photo of a {}"})
    assert detic.vocabulary_key({**spec, "vocabulary": "my names.txt"}).startswith("my_names-")


# --- CLIP text embeddings --------------------------------------------------------------------------------------


def tiny_clip(quick_gelu: bool):
    """A CLIP with OpenAI's layout at toy size (widths are multiples of 64: OpenAI's loader infers heads = width/64)."""
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    return open_clip.CLIP(
        embed_dim=32,
        vision_cfg=CLIPVisionCfg(layers=1, width=64, patch_size=16, image_size=32),
        text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=64, heads=1, layers=1),
        quick_gelu=quick_gelu,
    ).eval()


@pytest.fixture(scope="module")
def clip_weights(tmp_path_factory):
    """A random OpenAI-format CLIP state dict; fp16-exact values, as OpenAI ships them (its loader rounds to fp16)."""
    torch.manual_seed(0)
    model = tiny_clip(quick_gelu=True).half().float()
    path = tmp_path_factory.mktemp("clip") / "ViT-tiny.pt"
    torch.save(model.state_dict(), path)
    return SimpleNamespace(path=path, model=model)


def test_class_embeddings_are_openai_clip_text_features_of_the_prompt_normalised(clip_weights, tmp_path):
    import open_clip

    names = tmp_path / "names.txt"
    names.write_text("hot_dog\ncat\n")
    out = tmp_path / "vocabulary.parquet"
    detic.main(
        [
            "vocabulary",
            "--vocabulary",
            str(names),
            "--detic-repo",
            str(tmp_path),
            "--clip-weights",
            str(clip_weights.path),
            "--out",
            str(out),
        ]
    )
    class_names, embeddings = detic.read_class_embeddings(str(out))
    assert class_names == ["hot dog", "cat"] and embeddings.shape == (2, 32) and embeddings.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, rtol=1e-6)
    tokens = open_clip.tokenize(["a hot dog", "a cat"])
    with torch.no_grad():
        expected = clip_weights.model.encode_text(tokens, normalize=True).numpy()
        gelu = tiny_clip(quick_gelu=False)
        gelu.load_state_dict(clip_weights.model.state_dict())
        plain_gelu = gelu.encode_text(tokens, normalize=True).numpy()
    np.testing.assert_allclose(embeddings, expected, atol=1e-6)
    assert np.abs(embeddings - plain_gelu).max() > 1e-3  # OpenAI's CLIP uses QuickGELU; plain GELU would differ


def test_missing_clip_weights_name_the_path(tmp_path):
    with pytest.raises(DataError, match=r"nowhere/ViT-B-32\.pt: CLIP weights file does not exist"):
        detic.load_clip(str(tmp_path / "nowhere/ViT-B-32.pt"))


# --- the predictor and one chunk against stand-in detectron2 / Detic / CenterNet ---------------------------------


class StandInCfg:
    """detectron2's CfgNode as far as we use it: attribute access, merge_from_file (known keys only), freeze.
    Every assignment after construction is recorded under its dotted key."""

    def __init__(self, values: dict, record: dict, prefix: str = ""):
        object.__setattr__(
            self,
            "_values",
            {
                key: StandInCfg(value, record, f"{prefix}{key}.") if isinstance(value, dict) else value
                for key, value in values.items()
            },
        )
        object.__setattr__(self, "_record", record)
        object.__setattr__(self, "_prefix", prefix)
        object.__setattr__(self, "_frozen", False)

    def __getattr__(self, key):
        try:
            return self._values[key]
        except KeyError:
            raise AttributeError(f"stand-in config has no key {self._prefix}{key}") from None

    def __setattr__(self, key, value):
        if self._frozen:
            raise AttributeError(f"config is frozen: cannot set {self._prefix}{key}")
        if key not in self._values:
            raise KeyError(f"Non-existent config key: {self._prefix}{key}")
        self._values[key] = value
        self._record[f"{self._prefix}{key}"] = value

    def add(self, values: dict) -> None:
        for key, value in values.items():
            if isinstance(value, dict):
                self._values.setdefault(key, StandInCfg({}, self._record, f"{self._prefix}{key}."))
                self._values[key].add(value)
            else:
                self._values[key] = value

    def merge(self, values: dict) -> None:
        for key, value in values.items():
            if key not in self._values:
                raise KeyError(f"Non-existent config key: {self._prefix}{key}")
            if isinstance(value, dict):
                self._values[key].merge(value)
            else:
                self._values[key] = value

    def merge_from_file(self, path: str) -> None:
        calls.append(("merge_from_file", path))
        self.merge(yaml.safe_load(Path(path).read_text()))

    def freeze(self) -> None:
        calls.append(("freeze",))
        self._freeze_tree()

    def _freeze_tree(self) -> None:
        object.__setattr__(self, "_frozen", True)
        for value in self._values.values():
            if isinstance(value, StandInCfg):
                value._freeze_tree()


calls: list[tuple] = []

# The keys detectron2's get_cfg() defines that we touch (with their defaults), and those Detic / CenterNet2 add.
DETECTRON2_DEFAULTS = {
    "MODEL": {
        "WEIGHTS": "",
        "DEVICE": "cuda",
        "MASK_ON": False,
        "ROI_HEADS": {"SCORE_THRESH_TEST": 0.05, "NUM_CLASSES": 80},
        "ROI_BOX_HEAD": {"NAME": ""},
    },
    "INPUT": {"MIN_SIZE_TEST": 800, "MAX_SIZE_TEST": 1333, "FORMAT": "BGR"},
    "DATASETS": {"TEST": ()},
}
CENTERNET_KEYS = {"MODEL": {"CENTERNET": {"NUM_CLASSES": 80}}}
DETIC_KEYS = {
    "MODEL": {
        "ROI_BOX_HEAD": {
            "ZEROSHOT_WEIGHT_PATH": "datasets/metadata/lvis_v1_clip_a+cname.npy",
            "USE_ZEROSHOT_CLS": False,
        },
        "ROI_HEADS": {"ONE_CLASS_PER_PROPOSAL": False},
    },
    "INPUT": {"TEST_SIZE": 640},
}


class StandInModel:
    """A detectron2 meta-architecture: list of {image CHW float tensor, height, width} -> list of {"instances"}.
    Predicts the image's dominant channel (in the order it receives) at 0.9, and class 0 at 0.1."""

    def __init__(self):
        self.batches = []

    def eval(self):
        calls.append(("model.eval",))
        return self

    def __call__(self, inputs):
        assert not torch.is_grad_enabled()
        self.batches.append([(tuple(item["image"].shape), item["height"], item["width"]) for item in inputs])
        outputs = []
        for item in inputs:
            dominant = int(item["image"].mean(dim=(1, 2)).argmax())
            outputs.append(
                {
                    "instances": SimpleNamespace(
                        pred_classes=torch.tensor([dominant, 0]), scores=torch.tensor([0.9, 0.1])
                    )
                }
            )
        return outputs


class StandInResize:
    """detectron2.data.transforms.ResizeShortestEdge(short_edge_length, max_size): shortest edge to the length,
    longest edge capped at max_size."""

    def __init__(self, short_edge_length, max_size):
        calls.append(("ResizeShortestEdge", list(short_edge_length), max_size))
        self.short, self.max_size = short_edge_length[0], max_size

    def get_transform(self, image):
        height, width = image.shape[:2]
        scale = min(self.short / min(height, width), self.max_size / max(height, width))
        size = (int(width * scale + 0.5), int(height * scale + 0.5))
        return SimpleNamespace(apply_image=lambda array: np.asarray(Image.fromarray(array).resize(size)))


def module(name: str, **attributes) -> types.ModuleType:
    created = types.ModuleType(name)
    created.__dict__.update(attributes)
    return created


@pytest.fixture
def stand_ins(monkeypatch):
    """detectron2, centernet and detic as the code under test imports them, recording what it does."""
    calls.clear()
    record: dict = {}
    state = SimpleNamespace(record=record, model=StandInModel(), cwd=None, classifier=None)

    def get_cfg():
        calls.append(("get_cfg",))
        state.cfg = StandInCfg(DETECTRON2_DEFAULTS, record)
        return state.cfg

    def add_centernet_config(cfg):
        calls.append(("add_centernet_config",))
        cfg.add(CENTERNET_KEYS)

    def add_detic_config(cfg):
        calls.append(("add_detic_config",))
        cfg.add(DETIC_KEYS)

    def build_model(cfg):
        calls.append(("build_model",))
        state.cwd = os.getcwd()
        return state.model

    class DetectionCheckpointer:
        def __init__(self, model):
            calls.append(("DetectionCheckpointer", model is state.model))

        def load(self, path):
            calls.append(("DetectionCheckpointer.load", path))

    def reset_cls_test(model, cls_path, num_classes):
        calls.append(("reset_cls_test", model is state.model, tuple(cls_path.shape), num_classes))
        state.classifier = cls_path

    transforms = module("detectron2.data.transforms", ResizeShortestEdge=StandInResize)
    modules = {
        "detectron2": module("detectron2"),
        "detectron2.config": module("detectron2.config", get_cfg=get_cfg),
        "detectron2.modeling": module("detectron2.modeling", build_model=build_model),
        "detectron2.checkpoint": module("detectron2.checkpoint", DetectionCheckpointer=DetectionCheckpointer),
        "detectron2.data": module("detectron2.data", transforms=transforms),
        "detectron2.data.transforms": transforms,
        "centernet": module("centernet"),
        "centernet.config": module("centernet.config", add_centernet_config=add_centernet_config),
        "detic": module("detic"),
        "detic.config": module("detic.config", add_detic_config=add_detic_config),
        "detic.modeling": module("detic.modeling"),
        "detic.modeling.utils": module("detic.modeling.utils", reset_cls_test=reset_cls_test),
    }
    for name, stand_in in modules.items():
        monkeypatch.setitem(sys.modules, name, stand_in)
    monkeypatch.setattr(sys, "path", list(sys.path))
    return state


def solid_jpeg(path: Path, color: tuple[int, int, int], orientation: int | None = None) -> None:
    image = Image.new("RGB", (48, 40), color)
    exif = image.getexif()
    if orientation is not None:
        exif[0x0112] = orientation
    image.save(path, "JPEG", exif=exif.tobytes(), quality=95)


def test_build_predictor_and_one_chunk_end_to_end(stand_ins, tmp_path):
    repo = fake_detic_clone(tmp_path / "Detic")
    config_file = "configs/Detic_test.yaml"
    (repo / "configs").mkdir()
    (repo / config_file).write_text(
        yaml.safe_dump({"INPUT": {"FORMAT": "RGB", "MIN_SIZE_TEST": 32, "MAX_SIZE_TEST": 64}})
    )
    weights = tmp_path / "detic.pth"
    weights.write_bytes(b"stand-in")
    names = ["red thing", "green thing", "blue thing"]
    embeddings = np.eye(3, 4, dtype=np.float32)
    write_class_embeddings_table(tmp_path / "classes.parquet", names, embeddings)
    images = tmp_path / "images"
    images.mkdir()
    colors = {"r": (200, 10, 10), "g": (10, 200, 10), "rot": (10, 200, 10), "b": (10, 10, 200)}
    for key, color in colors.items():
        solid_jpeg(images / f"{key}.jpg", color, orientation=6 if key == "rot" else None)  # 6: rotate 90 degrees
    records = tmp_path / "records.parquet"
    pl.DataFrame(
        {
            "id": [f"d-{key}" for key in colors] + ["d-other"],
            "image_path": [f"images/{key}.jpg" for key in colors] + ["images/r.jpg"],
        }
    ).write_parquet(records)
    out = tmp_path / "chunk-0.parquet"

    detic.main(
        [
            "detect",
            "--records",
            str(records),
            "--chunk",
            "0",
            "--n-chunks",
            "2",
            "--detic-repo",
            str(repo),
            "--config-file",
            config_file,
            "--weights",
            str(weights),
            "--class-embeddings",
            str(tmp_path / "classes.parquet"),
            "--score-threshold",
            "0.5",
            "--device",
            "cpu",
            "--batch-size",
            "2",
            "--workers",
            "1",
            "--out",
            str(out),
        ]
    )

    assert calls == [
        ("get_cfg",),
        ("add_centernet_config",),
        ("add_detic_config",),
        ("merge_from_file", str(repo.resolve() / config_file)),
        ("freeze",),
        ("build_model",),
        ("model.eval",),
        ("DetectionCheckpointer", True),
        ("DetectionCheckpointer.load", str(weights.resolve())),
        ("reset_cls_test", True, (4, 3), 3),
        ("ResizeShortestEdge", [32, 32], 64),
    ]
    assert stand_ins.record == {
        "MODEL.WEIGHTS": str(weights.resolve()),
        "MODEL.DEVICE": "cpu",
        "MODEL.MASK_ON": False,
        "MODEL.ROI_HEADS.SCORE_THRESH_TEST": 0.5,
        "MODEL.ROI_BOX_HEAD.ZEROSHOT_WEIGHT_PATH": "rand",
        "MODEL.ROI_HEADS.ONE_CLASS_PER_PROPOSAL": True,
    }
    assert stand_ins.cwd == str(repo.resolve())  # Detic's configs name files relative to its checkout
    np.testing.assert_array_equal(stand_ins.classifier.numpy(), embeddings.T)  # [dim, classes], as Detic takes it
    # Chunk 0 of 2: rows 0, 2, 4 (r, rot, other), two per batch. 48x40 images: short edge 40 -> 32. The rotated
    # one is 40 wide and 48 high once EXIF-transposed: 32 x 38, its original size 48 x 40.
    assert stand_ins.model.batches == [[((3, 32, 38), 40, 48), ((3, 38, 32), 48, 40)], [((3, 32, 38), 40, 48)]]
    table = pl.read_parquet(out)
    assert table["id"].to_list() == ["d-r", "d-rot", "d-other"]
    assert table["labels"].to_list() == [["red thing"], ["green thing"], ["red thing"]]  # RGB order kept
    assert table["scores"].to_list() == [[pytest.approx(0.9)]] * 3


def test_images_are_exif_transposed_and_converted_to_the_model_format(tmp_path):
    solid_jpeg(tmp_path / "rot.jpg", (200, 10, 10), orientation=6)
    resize = SimpleNamespace(get_transform=lambda image: SimpleNamespace(apply_image=lambda array: array))
    record_id, item = detic.ModelInputs(["d-rot"], [str(tmp_path / "rot.jpg")], resize, "BGR")[0]
    assert record_id == "d-rot" and (item["height"], item["width"]) == (48, 40)
    assert tuple(item["image"].shape) == (3, 48, 40) and item["image"].dtype == torch.float32
    assert int(item["image"].mean(dim=(1, 2)).argmax()) == 2  # red lands in the last channel in BGR


def test_a_missing_detic_weights_file_is_named(stand_ins, tmp_path):
    repo = fake_detic_clone(tmp_path / "Detic")
    with pytest.raises(DataError, match=r"detic\.pth: Detic weights file does not exist"):
        detic.build_predictor(
            str(repo),
            str(tmp_path / "detic.pth"),
            np.eye(2, dtype=np.float32),
            detic.DetectParams(config_file="configs/x.yaml", device="cpu"),
        )


def test_detic_without_detectron2_says_how_to_create_its_env(tmp_path):
    try:
        import detectron2  # noqa: F401

        pytest.skip("detectron2 is installed here")
    except ImportError:
        pass
    write_class_embeddings_table(tmp_path / "classes.parquet", ["cat", "dog"], np.eye(2, dtype=np.float32))
    pl.DataFrame({"id": ["d-0"], "image_path": ["a"]}).write_parquet(tmp_path / "records.parquet")
    with pytest.raises(SystemExit, match=r"detectron2 and Detic.*envs/detic\.yaml.*git clone --recursive"):
        detic.main(
            [
                "detect",
                "--records",
                str(tmp_path / "records.parquet"),
                "--chunk",
                "0",
                "--n-chunks",
                "1",
                "--detic-repo",
                str(tmp_path),
                "--weights",
                "w.pth",
                "--class-embeddings",
                str(tmp_path / "classes.parquet"),
                "--out",
                str(tmp_path / "chunk.parquet"),
            ]
        )


# --- outputs and merge -----------------------------------------------------------------------------------------


def test_detic_outputs_become_class_names_with_scores():
    instances = SimpleNamespace(pred_classes=torch.tensor([3, 0, 3, 1]), scores=torch.tensor([0.6, 0.4, 0.8, 0.5]))
    labels, scores = detic.instances_to_annotation(instances, ["cat", "dog", "car", "tree"], threshold=0.5)
    assert labels == ["tree", "dog"] and scores == pytest.approx([0.8, 0.5])
    empty = SimpleNamespace(pred_classes=torch.zeros(0, dtype=torch.long), scores=torch.zeros(0))
    assert detic.instances_to_annotation(empty, ["cat"], 0.5) == ([], [])
    with pytest.raises(DataError, match="outside the vocabulary of 2"):
        detic.instances_to_annotation(instances, ["cat", "dog"], 0.5)


def test_detic_chunks_cover_every_record_and_merge_into_annotations(tmp_path):
    folder = build_image_folder(tmp_path / "raw" / "inet", 3)
    adapters.write_dataset(adapters.image_folder("inet", str(folder)), tmp_path, adapters.Validation(), params={})
    records = tmp_path / "records.parquet"
    names = ["red thing", "green thing", "blue thing"]
    resize = SimpleNamespace(get_transform=lambda image: SimpleNamespace(apply_image=lambda array: array))
    chunks = []
    for chunk in range(3):
        model = StandInModel()
        chunks.append(str(tmp_path / f"chunk-{chunk}.parquet"))
        detic.detect(
            str(records),
            chunk,
            3,
            detic.Detector(model, resize, "RGB"),
            names,
            chunks[-1],
            detic.DetectParams(score_threshold=0.5, batch_size=3, workers=0),
        )
        assert [len(batch) for batch in model.batches] == [3, 1]
    detic.main(
        ["merge", "--records", str(records), "--chunks", *chunks, "--out", str(tmp_path / "annotations.parquet")]
    )
    out = pl.read_parquet(tmp_path / "annotations.parquet")
    assert out["id"].to_list() == pl.read_parquet(records)["id"].to_list()
    assert out.schema["scores"] == pl.List(pl.Float32)
    assert all(len(labels) == 1 and labels[0] in names for labels in out["labels"].to_list())
    with pytest.raises(DataError, match=r"no annotation row for 4 record"):
        detic.merge(str(records), chunks[:2], str(tmp_path / "partial.parquet"))


# --- rules -----------------------------------------------------------------------------------------------------


def test_the_vocabulary_is_embedded_once_for_every_data_set_and_chunks_stop_with_the_install_hint(
    clip_weights, tmp_path
):
    names = tmp_path / "vocabulary.txt"
    names.write_text("cat\nhot_dog\n")
    (tmp_path / "detic.pth").write_bytes(b"stand-in")
    spec = {
        "repo": str(tmp_path / "Detic"),
        "vocabulary": str(names),
        "clip_weights": str(clip_weights.path),
        "weights": str(tmp_path / "detic.pth"),
        "n_chunks": 3,
        "device": "cpu",
    }
    datasets = {
        name: {
            "source": "image_folder",
            "images": str(build_image_folder(tmp_path / "raw" / name, 2)),
            "annotator": "detic",
            "detic": spec,
        }
        for name in ("inet", "other")
    }
    config = {"datasets": datasets}
    targets = ["results/data/inet/annotations.parquet", "results/data/other/annotations.parquet"]
    dry = run_snakemake(tmp_path, config, *targets, "--dry-run")
    assert re.search(r"detic_vocabulary\s+1\b", dry.stdout) and re.search(r"detic_chunk\s+6\b", dry.stdout)
    result = run_snakemake(tmp_path, config, "results/data/inet/detic/chunk-0.parquet", check=False)
    assert result.returncode != 0
    [embeddings_file] = (tmp_path / "results/detic/vocabularies").glob("vocabulary-*.parquet")
    class_names, embeddings = detic.read_class_embeddings(str(embeddings_file))
    assert class_names == ["cat", "hot dog"] and embeddings.shape == (2, 32)
    try:
        import detectron2  # noqa: F401
    except ImportError:
        log = (tmp_path / "results/logs/annotate/inet/detic-0.log").read_text()
        assert "detectron2 and Detic" in log and "envs/detic.yaml" in log
