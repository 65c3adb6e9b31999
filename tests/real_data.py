"""Tiny real-format data sets built on the fly: COCO JSON + images, an ImageNet-style folder, webdataset shards."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

CATEGORIES = ["cat", "dog", "car", "tree", "chair", "cup"]


def jpeg_bytes(seed: int, size: tuple[int, int] = (48, 40)) -> bytes:
    """A distinct small JPEG: coloured blocks drawn from `seed`."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(5, 6, 3), dtype=np.uint8)
    image = Image.fromarray(blocks).resize(size, Image.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def build_coco(root: Path, n_images: int, seed: int = 0) -> dict[str, Path]:
    """captions_train.json (5 captions per image), instances_train.json and images/; every 7th image has no instance."""
    rng = np.random.default_rng(seed)
    images_dir = root / "images"
    images_dir.mkdir(parents=True)
    images, captions, instances = [], [], []
    for index in range(n_images):
        image_id = 1000 + index
        file_name = f"{image_id:012d}.jpg"
        (images_dir / file_name).write_bytes(jpeg_bytes(seed * 100_000 + index))
        images.append({"id": image_id, "file_name": file_name, "width": 48, "height": 40})
        objects = [] if index % 7 == 3 else list(rng.choice(len(CATEGORIES), size=rng.integers(1, 4), replace=False))
        for number in range(5):
            named = CATEGORIES[objects[0]] if objects else "nothing"
            captions.append(
                {"id": len(captions) + 1, "image_id": image_id, "caption": f"caption {number} of a {named}"}
            )
        for category in objects:
            instances.append(
                {
                    "id": len(instances) + 1,
                    "image_id": image_id,
                    "category_id": int(category) + 1,
                    "bbox": [0, 0, 5, 5],
                    "area": 25,
                    "iscrowd": 0,
                }
            )
    categories = [{"id": i + 1, "name": name, "supercategory": "thing"} for i, name in enumerate(CATEGORIES)]
    paths = {"captions": root / "captions_train.json", "instances": root / "instances_train.json", "images": images_dir}
    paths["captions"].write_text(json.dumps({"images": images, "annotations": captions}))
    paths["instances"].write_text(json.dumps({"images": images, "annotations": instances, "categories": categories}))
    return paths


def build_image_folder(root: Path, per_class: int, seed: int = 1, classes=CATEGORIES[:4]) -> Path:
    for class_index, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for index in range(per_class):
            (root / name / f"{name}_{index:04d}.JPEG").write_bytes(
                jpeg_bytes(seed * 100_000 + class_index * 1000 + index)
            )
    return root


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def build_shards(root: Path, n_shards: int, per_shard: int, seed: int = 2) -> list[Path]:
    """Webdataset shards NNNNN.tar of KEY.jpg + KEY.txt members (KEY = shard * 1000 + index, 6 digits)."""
    root.mkdir(parents=True, exist_ok=True)
    shards = []
    for shard in range(n_shards):
        path = root / f"{shard:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for index in range(per_shard):
                key = f"{shard * 1000 + index:06d}"
                add_member(tar, f"{key}.jpg", jpeg_bytes(seed * 100_000 + shard * 1000 + index))
                add_member(tar, f"{key}.txt", f"a web photo number {key} of a {CATEGORIES[index % 6]}".encode())
        shards.append(path)
    return shards


def shard_ids(dataset: str, n_shards: int, per_shard: int) -> list[str]:
    return [
        f"{dataset}-{shard:05d}/{shard * 1000 + index:06d}" for shard in range(n_shards) for index in range(per_shard)
    ]
