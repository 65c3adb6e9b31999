"""The SSL training data: the images of the training ids, two augmented views per image.

The CLIP trainer's memory-mapped side table serves here too (workflow_scripts.training.data.SideBatches: rank
0 streams id, image path and tar location into an uncompressed Arrow file that every process and DataLoader
worker maps; the epoch's batches come from `epoch_batches`). The training set is the union of several split
files (train_A = A ∪ shared), each id once, and needs no captions.

Augmentations are lightly's transforms for the method at `image_size`. Each image's two views are drawn from
generators seeded by (seed, epoch, row): the same views whatever the batch, the number of workers or
processes, and after a resume. `preload_images` keeps every decoded image's raw pixels in memory, and the
views are drawn from the same pixels either way.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import torch
from lightly.transforms import (
    BYOLTransform,
    BYOLView1Transform,
    BYOLView2Transform,
    SimCLRTransform,
    VICRegTransform,
)
from PIL import Image
from tqdm import tqdm

from workflow_scripts.contracts import RECORDS, SPLIT_IDS
from workflow_scripts.images import decode_rgb, resolved_image_path
from workflow_scripts.io import DataError, atomic_path, check_unique_ids
from workflow_scripts.training.data import SideBatches

IMAGE_COLUMNS = ("id", "image_path", "image_offset", "image_size")


def view_transform(params):
    """lightly's two-view augmentation of `params.method` (Barlow Twins uses BYOL's asymmetric views, as its paper),
    at `params.image_size`, with the colour jitter, grayscale, blur and crop-scale settings of `params`."""
    views = dict(
        input_size=params.image_size,
        cj_prob=params.colour_jitter_prob,
        random_gray_scale=params.grayscale_prob,
        min_scale=params.min_scale,
    )
    if params.method == "vicreg":
        return VICRegTransform(**views, gaussian_blur=params.blur_prob)
    if params.method == "simclr":
        return SimCLRTransform(**views, gaussian_blur=params.blur_prob)
    if params.method in ("byol", "barlowtwins"):
        # BYOL's views blur asymmetrically (1.0 and 0.1): `blur_prob` is the first view's, scaled for the second.
        return BYOLTransform(
            BYOLView1Transform(**views, gaussian_blur=params.blur_prob),
            BYOLView2Transform(**views, gaussian_blur=params.blur_prob / 10),
        )
    raise ValueError(f"unknown method {params.method!r}")


def training_ids(id_paths: list[str]) -> pl.DataFrame:
    """The ids of the split files, in order; an id in two of them is an error (A, B and shared are disjoint)."""
    if not id_paths:
        raise ValueError("give at least one split file of training ids (--ids)")
    ids = pl.concat([SPLIT_IDS.read(path).with_columns(source=pl.lit(str(path))) for path in id_paths])
    check_unique_ids(ids["id"], " + ".join(map(str, id_paths)))
    return ids


def write_image_table(records_path: str, id_paths: list[str], path: Path) -> int:
    """Stream the training ids' image locations into an uncompressed Arrow file; return its row count."""
    ids = training_ids(id_paths)
    RECORDS.check(records_path, ["id", "image_path"])
    records = pl.scan_parquet(records_path)
    located = "image_offset" in records.collect_schema().names()  # from the shards adapter
    records = records.select(
        "id",
        resolved_image_path(records_path),
        *(
            (pl.col(name).cast(pl.Int64) for name in IMAGE_COLUMNS[2:])
            if located
            else (pl.lit(None, pl.Int64).alias(name) for name in IMAGE_COLUMNS[2:])
        ),
    )
    table = ids.lazy().join(records, on="id", how="left", maintain_order="left")
    missing = table.filter(pl.col("image_path").is_null()).select("id", "source").collect()
    if len(missing):
        raise DataError(
            f"{missing['source'][0]}: {len(missing)} id(s) not in the records {records_path}, "
            f"e.g. {missing['id'].head(5).to_list()}"
        )
    with atomic_path(path) as tmp:
        table.select(IMAGE_COLUMNS).sink_ipc(tmp, compression=None, compat_level=pl.CompatLevel.oldest())
    return len(ids)


def view_seeds(seed: int, epoch: int, row: int) -> tuple[int, int]:
    """(torch seed, numpy seed) of one image's views in one epoch."""
    torch_seed, numpy_seed = np.random.SeedSequence([seed, epoch, row]).generate_state(2, np.uint64)
    return int(torch_seed), int(numpy_seed % 2**32)


class ViewBatches(SideBatches):
    """Training batches: item (epoch, rows) -> (view_a [b, 3, S, S], view_b [b, 3, S, S])."""

    def __init__(self, table_path: Path, transform, seed: int):
        super().__init__(table_path, transform, tokenizer=None, mask_ratio=0.0, seed=seed)
        self.pixels: list[np.ndarray] | None = None  # preloaded images, row order

    def _images(self, rows: pa.Table) -> list[np.ndarray]:
        return [
            np.asarray(decode_rgb(self._read(path, offset, size, record_id), path, record_id))
            for record_id, path, offset, size in zip(*(rows.column(name).to_pylist() for name in IMAGE_COLUMNS))
        ]

    def preload(self, chunk: int = 1024) -> None:
        """Decode every image once; its raw pixels stay in memory (for data that fits)."""
        table = self.table()
        self.pixels = [
            image
            for start in tqdm(range(0, len(self), chunk), desc="decoding images", unit="chunk", mininterval=2)
            for image in self._images(table.slice(start, chunk))
        ]

    def views(self, pixels: np.ndarray, epoch: int, row: int) -> list[torch.Tensor]:
        """The two augmented views of one image, from its own seeds (the global generators are left as they were)."""
        torch_seed, numpy_seed = view_seeds(self.seed, epoch, row)
        numpy_state = np.random.get_state()  # noqa: NPY002 (lightly draws from the global one)
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(torch_seed)
                np.random.seed(numpy_seed)  # noqa: NPY002 (lightly's blur and solarisation draw from it)
                return self.transform(Image.fromarray(pixels))
        finally:
            np.random.set_state(numpy_state)  # noqa: NPY002

    def __getitem__(self, item: tuple[int, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, rows = item
        rows = np.sort(rows)
        images = [self.pixels[row] for row in rows] if self.pixels is not None else self._images(self.rows(rows))
        views = [self.views(image, epoch, int(row)) for image, row in zip(images, rows)]
        view_a, view_b = (torch.stack(list(batch)) for batch in zip(*views))
        return view_a, view_b
