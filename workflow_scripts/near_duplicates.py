"""Near-duplicates between a split's training images and the public set P.

The content hash of `images.content_hash` only catches pixel-identical copies. A picture re-encoded as JPEG or
resized on its way into two data sources has other pixels, yet a model that trained on one has seen the other:
a déjà vu measurement needs such pairs found. Each image is described by its colour thumbnail (`side` x `side`,
box-averaged, mean-centred, unit length), which re-encoding and resizing barely move (cosine similarity of a
copy ≥ 0.978 at side 16, JPEG quality 50 included) while unrelated pictures lie far apart (median 0.72 on the
synthetic scenes). A 64-bit DCT perceptual hash was measured first and rejected: on small images of objects on
flat backgrounds, distinct scenes share whole hashes (docs/DESIGN.md §4). Every pool-public pair at or above
`min_similarity` is found by an exact faiss inner-product range search, the pool queried in batches, so that
memory follows P's descriptors (|P| x 3·side² floats) and the batch, not the pool.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

import faiss
import numpy as np
import polars as pl
from PIL import Image
from tqdm import tqdm

from workflow_scripts.contracts import NEAR_DUPLICATES
from workflow_scripts.images import load_rgb, resolve_image_paths
from workflow_scripts.io import DataError

log = logging.getLogger(__name__)

DEFAULT_SIDE = 16
DEFAULT_MIN_SIMILARITY = 0.97
PAIRS_SCHEMA = NEAR_DUPLICATES.polars()
NEAR_DUPLICATE_ACTIONS = ("refuse", "drop", "report")
SHOWN_PAIRS = 10


class OverlapError(DataError):
    """Training or measured images that the public set shares, or (action refuse) near-duplicates of them."""


def descriptor(image: Image.Image, side: int = DEFAULT_SIDE) -> np.ndarray:
    """The image's colour thumbnail as a unit float32 vector [3·side²], its mean removed (a flat image: zeros,
    similar to nothing)."""
    pixels = np.asarray(image.convert("RGB").resize((side, side), Image.Resampling.BOX), np.float32).ravel()
    centred = pixels - pixels.mean()
    norm = np.linalg.norm(centred)
    return centred / norm if norm > 0 else centred


def record_descriptors(
    records: pl.DataFrame, records_path: str, side: int = DEFAULT_SIDE, threads: int = 1
) -> tuple[pl.Series, np.ndarray]:
    """(ids, descriptors [n, 3·side²]) of every record's image, in record order; an unreadable image is a
    DataError naming the table and the record."""
    ids = records["id"]
    paths = resolve_image_paths(records, records_path).to_list()

    def describe(path: str, record_id: str) -> np.ndarray:
        try:
            return descriptor(load_rgb(path, record_id), side)
        except DataError as error:  # load_rgb names the record and image; add the table it came from
            raise DataError(f"{records_path}: {error}") from error

    with ThreadPoolExecutor(max_workers=threads) as executor:  # PIL decodes and resizes outside the GIL
        described = executor.map(describe, paths, ids.to_list())
        rows = list(tqdm(described, total=len(ids), desc="image thumbnails", unit="img", mininterval=2))
    matrix = np.stack(rows) if rows else np.zeros((0, 3 * side * side), np.float32)
    return ids, np.ascontiguousarray(matrix, dtype=np.float32)


def near_duplicate_pairs(
    pool: tuple[pl.Series, np.ndarray],
    public: tuple[pl.Series, np.ndarray],
    min_similarity: float,
    batch_rows: int = 65536,
) -> pl.DataFrame:
    """Every (pool_id, public_id, similarity) whose descriptors' cosine similarity is at least `min_similarity`
    (`pool`, `public`: ids and descriptors), sorted by pool_id, similarity descending, public_id."""
    if not -1.0 <= min_similarity <= 1.0:
        raise ValueError(f"min_similarity must lie in [-1, 1], not {min_similarity}")
    if batch_rows < 1:
        raise ValueError(f"batch_rows must be positive, not {batch_rows}")
    (pool_ids, pool_matrix), (public_ids, public_matrix) = pool, public
    if not len(pool_ids) or not len(public_ids):
        return pl.DataFrame(schema=PAIRS_SCHEMA)
    index = faiss.IndexFlatIP(public_matrix.shape[1])
    index.add(public_matrix)
    # faiss keeps inner products strictly above the radius: the next float below includes the threshold itself.
    radius = float(np.nextafter(np.float32(min_similarity), np.float32(-2)))
    batches = []
    for start in range(0, len(pool_ids), batch_rows):
        limits, similarities, labels = index.range_search(pool_matrix[start : start + batch_rows], radius)
        counts = np.diff(limits.astype(np.int64))  # faiss gives size_t offsets
        rows = start + np.repeat(np.arange(len(counts)), counts)
        batches.append(
            pl.DataFrame(
                {"pool_id": pool_ids.gather(rows), "public_id": public_ids.gather(labels), "similarity": similarities},
                schema=PAIRS_SCHEMA,
            )
        )
    return pl.concat(batches).sort(["pool_id", "similarity", "public_id"], descending=[False, True, False])


def near_duplicate_problem(pairs: pl.DataFrame, public_records: str, min_similarity: float) -> str:
    shown = [f"{a}~{b} ({similarity:.3f})" for a, b, similarity in pairs.head(SHOWN_PAIRS).iter_rows()]
    return (
        f"{public_records}: {pairs['public_id'].n_unique()} public image(s) at least {min_similarity} alike "
        f"(thumbnail cosine) to a training pool image, e.g. {shown}: re-encoded or resized copies of trained images "
        "inflate a déjà vu measurement. Set near_duplicates.action to drop (leave them out of the public set) or "
        "report (keep them), or clean the public set"
    )


def screen_public(
    pool: tuple[pl.DataFrame, str],
    public: tuple[pl.DataFrame, str],
    action: str = "drop",
    min_similarity: float = DEFAULT_MIN_SIMILARITY,
    side: int = DEFAULT_SIDE,
    threads: int = 1,
) -> pl.DataFrame:
    """The near-duplicate pairs between the pool's and the public set's images (each a records frame with `id`
    and `image_path`, and the table it came from); OverlapError naming them under action refuse, a warning
    otherwise. Which public ids to leave out is `excluded_ids`."""
    if action not in NEAR_DUPLICATE_ACTIONS:
        raise ValueError(f"near-duplicate action {action!r}: expected one of {NEAR_DUPLICATE_ACTIONS}")
    (pool_records, pool_path), (public_records, public_path) = pool, public
    pairs = near_duplicate_pairs(
        record_descriptors(pool_records, pool_path, side, threads),
        record_descriptors(public_records, public_path, side, threads),
        min_similarity,
    )
    if len(pairs) and action == "refuse":
        raise OverlapError(near_duplicate_problem(pairs, public_path, min_similarity))
    if len(pairs):
        log.warning("%s (action %s)", near_duplicate_problem(pairs, public_path, min_similarity), action)
    return pairs


def excluded_ids(pairs: pl.DataFrame, action: str) -> pl.DataFrame:
    """The public ids (`id`) the searches leave out: every flagged one under action drop, none otherwise."""
    flagged = pairs.select(id="public_id").unique(maintain_order=True)
    return flagged if action == "drop" else flagged.clear()
