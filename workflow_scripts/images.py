"""Image loading and content hashing shared by dataset adapters, splits, training and embedding."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import polars as pl
from PIL import Image, UnidentifiedImageError

from workflow_scripts.io import DataError


def load_rgb(path: str | os.PathLike, record_id: str | None = None) -> Image.Image:
    """Open an image as RGB, turning every failure into a DataError naming the record."""
    label = f"record {record_id!r} " if record_id is not None else ""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except FileNotFoundError as error:
        raise DataError(f"{label}image {path}: file not found") from error
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise DataError(f"{label}image {path}: unreadable or corrupt ({error})") from error


def content_hash(image: Image.Image) -> str:
    """SHA-256 of the decoded RGB pixels and size.

    Hashing pixels rather than file bytes catches the same picture stored under
    two names, or re-saved losslessly, by two data sources.
    """
    rgb = image.convert("RGB")
    digest = hashlib.sha256(f"{rgb.width}x{rgb.height}:".encode())
    digest.update(rgb.tobytes())
    return digest.hexdigest()


def resolve_image_paths(records: pl.DataFrame, records_path: str | os.PathLike) -> pl.Series:
    """`image_path` is absolute or relative to the folder holding the records file."""
    base = str(Path(records_path).resolve().parent)
    path = pl.col("image_path")
    return records.select(
        pl.when(path.str.starts_with(os.sep)).then(path).otherwise(pl.lit(base + os.sep) + path)
    ).to_series()
