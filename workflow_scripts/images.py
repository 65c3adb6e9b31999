"""Image loading and content hashing shared by dataset adapters, splits, training and embedding.

An image path is a file, or a member of an uncompressed tar archive (webdataset
shards) written `ARCHIVE.tar::MEMBER` (e.g. `shards/00000.tar::000042.jpg`), so
that millions of shard members are read in place instead of extracted.

A member is read with one `os.pread` at its byte offset. The shards adapter
records every member's offset and size (`image_offset`, `image_size`), so
training reads members in any order at the cost of a file read; without them
the archive's headers are scanned once per process (`member_locations`, cached)
to find the member. `tarfile.extractfile` on a fresh handle reads every header
first, which made random order 400x slower than shard order.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import io
import os
import resource
import tarfile
import threading
from pathlib import Path

import polars as pl
from PIL import Image, UnidentifiedImageError

from workflow_scripts.io import DataError

TAR_MEMBER_SEPARATOR = "::"


def tar_member_path(archive: str | os.PathLike, member: str) -> str:
    return f"{archive}{TAR_MEMBER_SEPARATOR}{member}"


class _OpenArchives:
    """Read-only descriptors of the most recently used archives (pread needs no shared file position).

    Up to a quarter of the process's descriptor limit stay open (at most 4,096): reopening a shard per
    image costs as much as reading it, so a side spread over 1,000 shards keeps them all open.
    """

    def __init__(self):
        soft_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self.capacity = max(16, min(4096, soft_limit // 4 if soft_limit > 0 else 4096))
        self.lock = threading.Lock()
        self.descriptors: collections.OrderedDict[str, int] = collections.OrderedDict()
        self.pid = os.getpid()

    def read(self, archive: str, offset: int, size: int) -> bytes:
        with self.lock:
            if self.pid != os.getpid():  # a forked worker: its own descriptors, the parent's stay open
                self.descriptors, self.pid = collections.OrderedDict(), os.getpid()
            descriptor = self.descriptors.pop(archive, None)
            if descriptor is None:
                descriptor = os.open(archive, os.O_RDONLY)
                if len(self.descriptors) >= self.capacity:
                    os.close(self.descriptors.popitem(last=False)[1])
            self.descriptors[archive] = descriptor
        data = os.pread(descriptor, size, offset)
        if len(data) != size:
            raise OSError(f"{archive}: {size} bytes expected at offset {offset}, {len(data)} read (truncated shard?)")
        return data


_ARCHIVES = _OpenArchives()


def read_tar_member(archive: str, offset: int, size: int) -> bytes:
    """The bytes of a tar member at a known data offset (see `member_locations`)."""
    return _ARCHIVES.read(archive, offset, size)


def scan_members(archive: str | os.PathLike) -> list[tarfile.TarInfo]:
    """Every regular member's header (name, offset_data, size); reads headers only."""
    with tarfile.open(archive, "r:") as tar:
        return [member for member in tar if member.isfile()]


@functools.lru_cache(maxsize=64)
def member_locations(archive: str) -> dict[str, tuple[int, int]]:
    """{member name: (data offset, size)} of an archive, scanned once per process."""
    return {member.name: (member.offset_data, member.size) for member in scan_members(archive)}


def read_image_bytes(path: str, offset: int | None = None, size: int | None = None) -> bytes:
    """A file's bytes, or a tar member's (at `offset`/`size` when known, else located by its header)."""
    if TAR_MEMBER_SEPARATOR not in path:
        with open(path, "rb") as handle:
            return handle.read()
    archive, member = path.split(TAR_MEMBER_SEPARATOR, 1)
    if offset is None or offset < 0:
        try:
            offset, size = member_locations(archive)[member]
        except KeyError as error:
            raise FileNotFoundError(f"no member {member!r} in {archive}") from error
    return read_tar_member(archive, offset, size)


def _open_image(path: str) -> Image.Image:
    if TAR_MEMBER_SEPARATOR not in path:
        return Image.open(path)
    return Image.open(io.BytesIO(read_image_bytes(path)))


def decode_rgb(data: bytes, path: str, record_id: str | None = None) -> Image.Image:
    """Decode image bytes read from `path` as RGB; a failure is a DataError naming the record."""
    return _as_rgb(lambda: Image.open(io.BytesIO(data)), path, record_id)


def load_rgb(path: str | os.PathLike, record_id: str | None = None) -> Image.Image:
    """Open an image (a file or `ARCHIVE.tar::MEMBER`) as RGB; every failure is a DataError naming the record."""
    return _as_rgb(lambda: _open_image(str(path)), path, record_id)


def _as_rgb(open_image, path, record_id: str | None) -> Image.Image:
    label = f"record {record_id!r} " if record_id is not None else ""
    try:
        with open_image() as image:
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


def resolved_image_path(records_path: str | os.PathLike) -> pl.Expr:
    """`image_path` is absolute or relative to the folder holding the records file (a tar member's archive too)."""
    base = str(Path(records_path).resolve().parent)
    path = pl.col("image_path")
    return pl.when(path.str.starts_with(os.sep)).then(path).otherwise(pl.lit(base + os.sep) + path).alias("image_path")


def resolve_image_paths(records: pl.DataFrame, records_path: str | os.PathLike) -> pl.Series:
    return records.select(resolved_image_path(records_path)).to_series()


def crop(image: Image.Image, box: tuple[int, int, int, int] | None, record_id: str) -> Image.Image:
    """The box's pixels (max exclusive, as PIL crops); the whole image when `box` is None."""
    if box is None:
        return image
    if box[2] > image.width or box[3] > image.height or min(box[:2]) < 0 or box[2] <= box[0] or box[3] <= box[1]:
        raise DataError(f"record {record_id!r}: crop {box} empty or outside its {image.width}x{image.height} image")
    return image.crop(box)
