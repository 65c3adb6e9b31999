"""The periphery crop: the largest rectangle of an image free of its foreground boxes (the SSL test's query).

The rule (`periphery_crop`), as DejaVu's ``aux_dataset.get_crop`` (dejavu_utils/utils.py) computes it:
cut the x axis at every box's left and right edge and at 0 and the width; in each strip between two
consecutive cuts, merge the y-ranges of the boxes that overlap the strip with positive width; every gap of
the merged ranges in [0, height] is a candidate rectangle (strip × gap). Candidates never span strips. The
candidate with the largest minimum side wins (among ties the last, strips left to right and gaps top to
bottom, as DejaVu's stable sort takes its last); it is kept if that side is strictly greater than
``min_px`` (DejaVu: ``> self.min_px``, default 100), else the image is dropped as ``too_small``.

Differences, on purpose: box edges are rounded outward to whole pixels (DejaVu truncates the XML's integer
values with ``int``), so a crop never cuts into a box with fractional edges; a box is checked against the
whole image, [0, width] x [0, height] within ``tolerance_px`` (clipped to it when inside the tolerance),
where DejaVu refuses only an x edge beyond the width; an id without boxes is ``no_box`` (DejaVu assumes
every id has an XML file); a dropped image is a row with a reason, where DejaVu returns the uncropped image
flagged ``good = -1``.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import math
from collections import Counter
from pathlib import Path

import numpy as np
import polars as pl
from tqdm import tqdm

from workflow_scripts.cli import run_stage
from workflow_scripts.contracts import BOXES, CROPS, SPLIT_IDS
from workflow_scripts.io import DataError, check_unique_ids, write_parquet
from workflow_scripts.ssl.splits import labelled_records

log = logging.getLogger(__name__)

NO_BOX, OUTSIDE, TOO_SMALL = "no_box", "box_outside_image", "too_small"
DROP_REASONS = (NO_BOX, OUTSIDE, TOO_SMALL)
Crop = tuple[int, int, int, int]  # x_min, y_min, x_max, y_max; max exclusive


def boxes_inside(boxes: np.ndarray, width: int, height: int, tolerance_px: float) -> bool:
    """Whether every box is finite, not inverted and within the image up to `tolerance_px` on each side."""
    x_min, y_min, x_max, y_max = boxes.T
    return bool(
        np.isfinite(boxes).all()
        and (x_max >= x_min).all()
        and (y_max >= y_min).all()
        and (boxes[:, [0, 1]] >= -tolerance_px).all()
        and (x_max <= width + tolerance_px).all()
        and (y_max <= height + tolerance_px).all()
    )


def _free_gaps(ranges: list[tuple[int, int]], height: int) -> list[tuple[int, int]]:
    """The gaps (start, end) of [0, height] outside the union of the y-ranges."""
    gaps, covered = [], 0
    for start, end in sorted(ranges):
        if start > covered:
            gaps.append((covered, start))
        covered = max(covered, end)
    if height > covered:
        gaps.append((covered, height))
    return gaps


def periphery_crop(
    boxes: np.ndarray, width: int, height: int, min_px: float, tolerance_px: float = 1.0
) -> tuple[Crop | None, str | None]:
    """(crop, None) for the largest box-free rectangle by minimum side, or (None, reason): see the module."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if not len(boxes):
        return None, NO_BOX
    if not boxes_inside(boxes, width, height, tolerance_px):
        return None, OUTSIDE
    # Outward to whole pixels, then into the image: the crop's edges are pixel edges.
    lows = np.clip(np.floor(boxes[:, :2]), 0, None).astype(np.int64)
    highs = np.minimum(np.ceil(boxes[:, 2:]), [width, height]).astype(np.int64)
    edges = sorted({0, int(width), *lows[:, 0].tolist(), *highs[:, 0].tolist()})
    best, best_side = None, -math.inf
    for left, right in itertools.pairwise(edges):
        overlapping = (np.minimum(highs[:, 0], right) - np.maximum(lows[:, 0], left)) > 0
        ranges = list(zip(lows[overlapping, 1].tolist(), highs[overlapping, 1].tolist()))
        for top, bottom in _free_gaps(ranges, int(height)):
            side = min(right - left, bottom - top)
            if side >= best_side:  # >=: the last of equal candidates, as DejaVu's sort-then-take-last
                best, best_side = (left, top, right, bottom), side
    if best is None or not best_side > min_px:
        return None, TOO_SMALL
    return best, None


def _boxes_by_id(boxes_path: str, ids: pl.Series) -> pl.DataFrame:
    """One row per wanted id that has boxes: id, width, height, boxes (list of [x_min, y_min, x_max, y_max])."""
    boxes = BOXES.read(boxes_path).filter(pl.col("id").is_in(ids.implode()))
    grouped = boxes.group_by("id").agg(
        width=pl.col("image_width").first(),
        height=pl.col("image_height").first(),
        sizes=pl.struct("image_width", "image_height").n_unique(),
        boxes=pl.concat_list("x_min", "y_min", "x_max", "y_max"),
    )
    bad = grouped.filter((pl.col("sizes") > 1) | (pl.col("width") <= 0) | (pl.col("height") <= 0))
    if len(bad):
        raise DataError(
            f"{boxes_path}: id {bad['id'].sort()[0]!r} has no single positive image size over its boxes "
            f"({len(bad)} id(s) in all)"
        )
    return grouped.drop("sizes")


def crops_table(
    wanted: pl.DataFrame, boxes_path: str, min_px: float, invalid_boxes: str, tolerance_px: float
) -> pl.DataFrame:
    """The CROPS table of `wanted` (id, label), in its order; DataError for an invalid box with 'error'."""
    grouped = _boxes_by_id(boxes_path, wanted["id"])
    rows = wanted.join(grouped, on="id", how="left", maintain_order="left")
    results = []
    for record_id, width, height, boxes in tqdm(
        rows.select("id", "width", "height", "boxes").iter_rows(), total=len(rows), desc="crops", mininterval=2
    ):
        crop, reason = periphery_crop(np.asarray(boxes or [], dtype=np.float64), width, height, min_px, tolerance_px)
        if reason == OUTSIDE and invalid_boxes == "error":
            raise DataError(
                f"{boxes_path}: id {record_id!r} has a box outside its {width}x{height} image "
                f"(tolerance {tolerance_px} px) or an inverted or non-finite one"
            )
        results.append((*(crop or (None,) * 4), reason))
    columns = ["x_min", "y_min", "x_max", "y_max", "drop_reason"]
    crops = pl.DataFrame(results, schema=CROPS.polars(columns), orient="row") if results else CROPS.empty()
    return pl.concat([rows.select("id", "label"), crops.select(columns)], how="horizontal")


def make_crops(
    records: str,
    boxes: str,
    label_column: str,
    ids: list[str],
    min_px: float,
    invalid_boxes: str,
    out: str,
    tolerance_px: float = 1.0,
) -> None:
    """Write the CROPS table for every id of the `ids` files, in their order."""
    if invalid_boxes not in ("exclude", "error"):
        raise ValueError(f"invalid_boxes must be 'exclude' or 'error', not {invalid_boxes!r}")
    wanted = pl.concat([SPLIT_IDS.read(path) for path in ids])
    check_unique_ids(wanted["id"], " + ".join(ids))
    labelled = labelled_records(records, label_column)
    wanted = wanted.join(labelled, on="id", how="left", maintain_order="left")
    unknown = wanted.filter(pl.col("label").is_null())["id"]
    if len(unknown):
        raise DataError(
            f"{' + '.join(ids)}: {len(unknown)} id(s) are no record of {records}: {unknown.head(5).to_list()}"
        )
    crops = crops_table(wanted, boxes, min_px, invalid_boxes, tolerance_px)
    counts = Counter(crops["drop_reason"].to_list())
    log.info(
        "%d ids: %d kept; dropped %s", len(crops), counts.pop(None, 0), {r: counts.get(r, 0) for r in DROP_REASONS}
    )
    params = {
        "records": records,
        "boxes": boxes,
        "label_column": label_column,
        "ids": ids,
        "min_px": min_px,
        "invalid_boxes": invalid_boxes,
        "tolerance_px": tolerance_px,
    }
    write_parquet(crops, Path(out), stage="ssl_crops", params=params, contract=CROPS)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", required=True, help="records.parquet (for the labels)")
    parser.add_argument("--boxes", required=True, help="boxes.parquet (BOXES)")
    parser.add_argument("--label-column", required=True, help="the records' class column")
    parser.add_argument("--ids", action="append", required=True, help="an ids file (A, B, holdout); repeatable")
    parser.add_argument("--min-px", type=float, required=True, help="keep a crop whose shorter side is > this")
    parser.add_argument("--invalid-boxes", choices=("exclude", "error"), required=True)
    parser.add_argument("--tolerance-px", type=float, default=1.0, help="how far a box may overshoot the image")
    parser.add_argument("--out", required=True, help="crops.parquet")
    run_stage(parser, argv, make_crops)


if __name__ == "__main__":
    main()
