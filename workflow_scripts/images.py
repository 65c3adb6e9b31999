"""Image loading and content hashing shared by dataset adapters, splits, training and embedding.

An image path is a file, or a member of an uncompressed tar archive (webdataset
shards) written `ARCHIVE.tar::MEMBER` (e.g. `shards/00000.tar::000042.jpg`), so
that millions of shard members are read in place instead of extracted.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import tarfile
import threading
from pathlib import Path

import polars as pl
from PIL import Image, UnidentifiedImageError

from workflow_scripts.io import DataError

TAR_MEMBER_SEPARATOR = "::"


def tar_member_path(archive: str | os.PathLike, member: str) -> str:
    return f"{archive}{TAR_MEMBER_SEPARATOR}{member}"


@functools.lru_cache(maxsize=32)
def _open_archive(archive: str, owner: tuple[int, int]) -> tarfile.TarFile:
    # One handle per (process, thread): a shared file position would interleave reads.
    return tarfile.open(archive, "r:")


def _open_image(path: str) -> Image.Image:
    if TAR_MEMBER_SEPARATOR not in path:
        return Image.open(path)
    archive, member = path.split(TAR_MEMBER_SEPARATOR, 1)
    handle = _open_archive(archive, (os.getpid(), threading.get_ident()))
    try:
        data = handle.extractfile(member)
    except KeyError as error:
        raise FileNotFoundError(f"no member {member!r} in {archive}") from error
    if data is None:
        raise FileNotFoundError(f"member {member!r} of {archive} is not a regular file")
    return Image.open(io.BytesIO(data.read()))


def load_rgb(path: str | os.PathLike, record_id: str | None = None) -> Image.Image:
    """Open an image (a file or `ARCHIVE.tar::MEMBER`) as RGB; every failure is a DataError naming the record."""
    label = f"record {record_id!r} " if record_id is not None else ""
    try:
        with _open_image(str(path)) as image:
            return image.convert("RGB")
    except FileNotFoundError as error:
        raise DataError(f"{label}image {path}: file not found") from error
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, tarfile.TarError) as error:
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
    """`image_path` is absolute or relative to the folder holding the records file (a tar member's archive too)."""
    base = str(Path(records_path).resolve().parent)
    path = pl.col("image_path")
    return records.select(
        pl.when(path.str.starts_with(os.sep)).then(path).otherwise(pl.lit(base + os.sep) + path)
    ).to_series()
