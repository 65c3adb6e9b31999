"""Dataset adapters: real image data -> records.parquet, ground_truth.parquet and validation.parquet.

Sources (one subcommand each):

- ``coco``: ``captions_*.json`` (+ ``instances_*.json``) and the image folder. Every caption of an
  image is kept; instance category names are the ground truth (empty lists for images without one).
- ``image_folder``: ``ROOT/CLASS/IMAGE`` (the ImageNet layout). The class folder is kept as a
  ``label`` column and is the ground truth (one object per image); an optional table of
  ``(path, caption)`` rows, path relative to ROOT, gives captions.
- ``shards``: webdataset ``.tar`` shards (``KEY.jpg`` + ``KEY.txt`` members, as img2dataset writes LAION
  subsets) and/or a Parquet/CSV table of ``(path, caption)``. Shard members are read in place: their
  ``image_path`` is ``SHARD.tar::MEMBER`` (see workflow_scripts.images), and ``image_offset``/``image_size``
  give the member's data bytes in the shard, so training reads it with one ``pread`` (null for table
  rows). No ground truth.
- ``mix``: the records of other data sets, each optionally subsampled with a seed, in one pool
  (the paper's A = 40K COCO + N LAION). Ids keep their source prefix; ``source_dataset`` names the part.

Ids are prefixed with the data set name, so two data sets never share one. Every source builds candidate
rows; `validate` then checks them once for all sources: duplicate ids, images that are missing or do not
decode (each image is decoded once, which also gives its content hash), and for a training pool, records
without a caption and images already held by another record. Each problem either stops the stage with a
message naming the input, the record and the image (``--on-invalid error``) or drops the record and is
listed in validation.parquet (``--on-invalid skip``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import polars as pl
from tqdm import tqdm

from workflow_scripts.annotate import with_unit_scores
from workflow_scripts.cli import LOG_FORMAT, add_dataclass_arguments, dataclass_from_args
from workflow_scripts.contracts import CAPTION_TABLE, GROUND_TRUTH, RECORDS, VALIDATION
from workflow_scripts.images import content_hash, load_rgb, resolve_image_paths, tar_member_path
from workflow_scripts.io import DataError, write_parquet

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
MAX_LISTED_PROBLEMS = 20


@dataclass(frozen=True)
class Validation:
    on_invalid: str = "error"  # error: stop at any problem; skip: drop the record and report it
    training_pool: bool = False  # records need a caption, and no two records may hold one image
    threads: int = 1  # image decoding threads

    def __post_init__(self):
        if self.on_invalid not in ("error", "skip"):
            raise ValueError(f"on_invalid must be 'error' or 'skip', not {self.on_invalid!r}")


@dataclass
class Adapted:
    """What a source produces before validation: candidate records and the ground truth it knows."""

    records: pl.DataFrame
    ground_truth: pl.DataFrame
    origin: str  # the input files, for messages


# --- validation and output, shared by every source -------------------------------------------------


def _problems(frame: pl.DataFrame, condition: pl.Expr, problem: pl.Expr | str) -> pl.DataFrame:
    problem = pl.lit(problem) if isinstance(problem, str) else problem
    # The problem is worded before filtering: it may look at other records (the first holder of an image).
    worded = frame.with_columns(problem.alias("problem"))
    return worded.filter(condition).select(VALIDATION.names).cast(VALIDATION.polars())


def _decode_image(path: str) -> tuple[str | None, str | None]:
    try:
        return content_hash(load_rgb(path)), None
    except DataError as error:  # the report names the record and image itself; keep what went wrong
        return None, str(error).removeprefix(f"image {path}: ")


def hash_images(paths: list[str], threads: int) -> tuple[list[str | None], list[str | None]]:
    """Decode every image once: (content hash or None, error message or None) per image."""
    with ThreadPoolExecutor(max_workers=threads) as pool:  # PIL decodes outside the GIL
        decoded = pool.map(_decode_image, paths, chunksize=64)
        results = list(tqdm(decoded, total=len(paths), desc="decoding images", unit="img", mininterval=2))
    return [h for h, _ in results], [e for _, e in results]


def _hash_undecoded(records: pl.DataFrame, threads: int) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(records whose image decodes, with its content hash; problems of those that do not).

    Only records without an `image_sha256` are decoded: a mix reuses its parts' hashes.
    """
    to_decode = records.filter(pl.col("image_sha256").is_null())
    if not len(to_decode):
        return records, VALIDATION.empty()
    hashes, errors = hash_images(to_decode["image_path"].to_list(), threads)
    decoded = to_decode.select(
        "id", new_hash=pl.Series(hashes, dtype=pl.String), error=pl.Series(errors, dtype=pl.String)
    )
    records = records.join(decoded, on="id", how="left", maintain_order="left").with_columns(
        image_sha256=pl.coalesce("image_sha256", "new_hash")
    )
    problems = _problems(records, pl.col("error").is_not_null(), pl.col("error"))
    return records.filter(pl.col("error").is_null()).drop("new_hash", "error"), problems


def _training_pool_problems(records: pl.DataFrame) -> tuple[pl.DataFrame, list[pl.DataFrame]]:
    """(records fit for training, problems): each needs a caption, and no two may hold the same image."""
    uncaptioned = pl.col("captions").list.len() == 0
    problems = [_problems(records, uncaptioned, "no caption (a training pool needs one)")]
    records = records.filter(~uncaptioned)
    first_holder = pl.col("id").first().over("image_sha256")
    repeated = ~pl.col("image_sha256").is_first_distinct()
    problems.append(_problems(records, repeated, pl.format("same image (content hash) as record '{}'", first_holder)))
    return records.filter(~repeated), problems


def _report(problems: pl.DataFrame, origin: str, on_invalid: str) -> None:
    """Stop at the first problems (`on_invalid` error) or log how many records are skipped."""
    if len(problems) and on_invalid == "error":
        listed = "\n  ".join(
            f"record {row['id']!r} (image {row['image_path']}): {row['problem']}"
            for row in problems.head(MAX_LISTED_PROBLEMS).iter_rows(named=True)
        )
        raise DataError(f"{origin}: {len(problems)} invalid record(s) (set on_invalid: skip to drop them):\n  {listed}")
    if len(problems):
        log.warning("%s: skipped %d invalid record(s), listed in validation.parquet", origin, len(problems))


def validate(candidates: pl.DataFrame, origin: str, options: Validation) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Return (valid records with image_sha256, problems: id, image_path, problem); see the module docstring."""
    if "image_sha256" not in candidates.columns:
        candidates = candidates.with_columns(image_sha256=pl.lit(None, pl.String))
    first_id = pl.col("id").is_first_distinct()
    problems = [
        _problems(candidates, ~first_id, "duplicate id"),
        _problems(candidates, first_id & pl.col("image_path").is_null(), "no image"),
    ]
    records, undecodable = _hash_undecoded(
        candidates.filter(first_id & pl.col("image_path").is_not_null()), options.threads
    )
    problems.append(undecodable)
    if options.training_pool:
        records, pool_problems = _training_pool_problems(records)
        problems.extend(pool_problems)
    problems = pl.concat(problems)
    _report(problems, origin, options.on_invalid)
    return records.select(*RECORDS.names, "image_sha256", pl.exclude(*RECORDS.names, "image_sha256")), problems


def write_dataset(adapted: Adapted, out_dir: str | Path, options: Validation, params: dict) -> None:
    records, problems = validate(adapted.records, adapted.origin, options)
    ground_truth = records.select("id").join(adapted.ground_truth, on="id", how="left", maintain_order="left")
    params = {**params, **options.__dict__}
    for table, contract, name in (
        (problems, VALIDATION, "validation"),
        (ground_truth.drop_nulls("labels"), GROUND_TRUTH, "ground_truth"),
        (records, RECORDS, "records"),
    ):
        write_parquet(table, Path(out_dir) / f"{name}.parquet", stage="datasets", params=params, contract=contract)
    log.info("%s: %d records written to %s (%d skipped)", adapted.origin, len(records), out_dir, len(problems))


def _with_unit_scores(labels: pl.DataFrame) -> pl.DataFrame:
    return with_unit_scores(labels).cast(GROUND_TRUTH.polars())


def read_caption_table(path: str | os.PathLike) -> pl.DataFrame:
    """A Parquet or CSV table of (path, caption) rows -> (path, captions list) in first-seen order."""
    path = Path(path)
    if path.suffix.lower() == ".csv":
        try:
            table = pl.read_csv(path, columns=CAPTION_TABLE.names, schema_overrides=CAPTION_TABLE.polars())
        except (pl.exceptions.PolarsError, OSError) as error:
            raise DataError(f"{path}: not a readable CSV table with columns path, caption ({error})") from error
    else:
        table = CAPTION_TABLE.read(path)
    return (
        table.filter(pl.col("caption").is_not_null())
        .group_by("path", maintain_order=True)
        .agg(captions=pl.col("caption").cast(pl.String))
    )


# --- sources ---------------------------------------------------------------------------------------


def _read_json(path: str | os.PathLike) -> dict:
    try:
        with open(path) as handle:
            return json.load(handle)
    except FileNotFoundError as error:
        raise DataError(f"{path}: file does not exist") from error
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: not valid JSON ({error})") from error


def _json_columns(rows: list[dict], fields: dict[str, pl.DataType], path, what: str) -> pl.DataFrame:
    try:
        return pl.DataFrame({name: [row[name] for row in rows] for name in fields}, schema=fields)
    except (KeyError, TypeError) as error:
        raise DataError(
            f"{path}: every entry of {what!r} needs the fields {list(fields)} ({error!r} missing)"
        ) from error


def _coco_records(dataset: str, captions_path: str, images_dir: str) -> pl.DataFrame:
    """Every image of a COCO captions file with all its captions (an empty list for none), and its COCO id."""
    captions_json = _read_json(captions_path)
    images = _json_columns(
        captions_json.get("images", []), {"id": pl.Int64, "file_name": pl.String}, captions_path, "images"
    )
    captions = (
        _json_columns(
            captions_json.get("annotations", []),
            {"id": pl.Int64, "image_id": pl.Int64, "caption": pl.String},
            captions_path,
            "annotations",
        )
        .sort("id")
        .group_by("image_id", maintain_order=True)
        .agg(captions=pl.col("caption").str.strip_chars())
    )
    image_root = os.path.abspath(images_dir) + os.sep
    records = images.join(captions, left_on="id", right_on="image_id", how="left", maintain_order="left").select(
        id=pl.format("{}-{}", pl.lit(dataset), pl.col("id")),
        image_path=pl.lit(image_root) + pl.col("file_name"),
        captions=pl.col("captions").fill_null(pl.lit([], pl.List(pl.String))),
        coco_id=pl.col("id"),
    )
    return records.cast(RECORDS.polars([*RECORDS.names, "coco_id"]))


def _coco_ground_truth(records: pl.DataFrame, instances_path: str) -> pl.DataFrame:
    """The category names of each record's instances (an empty list for an image without one)."""
    instances_json = _read_json(instances_path)
    categories = _json_columns(
        instances_json.get("categories", []), {"id": pl.Int64, "name": pl.String}, instances_path, "categories"
    )
    instances = _json_columns(
        instances_json.get("annotations", []),
        {"id": pl.Int64, "image_id": pl.Int64, "category_id": pl.Int64},
        instances_path,
        "annotations",
    )
    named = instances.join(categories.rename({"id": "category_id"}), on="category_id", how="left")
    unknown = named.filter(pl.col("name").is_null())
    if len(unknown):
        raise DataError(
            f"{instances_path}: annotation(s) {unknown['id'].head(5).to_list()} name unknown "
            f"category id(s) {unknown['category_id'].unique().head(5).to_list()}"
        )
    labels = named.group_by("image_id").agg(labels=pl.col("name").unique().sort())
    return _with_unit_scores(
        records.select("id", "coco_id")
        .join(labels, left_on="coco_id", right_on="image_id", how="left")
        .select("id", labels=pl.col("labels").fill_null(pl.lit([], pl.List(pl.String))))
    )


def coco(dataset: str, captions_path: str, images_dir: str, instances_path: str | None = None) -> Adapted:
    records = _coco_records(dataset, captions_path, images_dir)
    if not instances_path:
        return Adapted(records, GROUND_TRUTH.empty(), str(captions_path))
    return Adapted(records, _coco_ground_truth(records, instances_path), f"{captions_path} + {instances_path}")


def image_folder(dataset: str, root: str, captions_path: str | None = None) -> Adapted:
    root_path = Path(root)
    if not root_path.is_dir():
        raise DataError(f"{root}: image folder does not exist")
    relative = sorted(
        f"{entry.name}/{image.name}"
        for entry in os.scandir(root_path)
        if entry.is_dir()
        for image in os.scandir(entry.path)
        if Path(image.name).suffix.lower() in IMAGE_SUFFIXES
    )
    if not relative:
        raise DataError(f"{root}: no images in CLASS/IMAGE sub-folders (suffixes {', '.join(IMAGE_SUFFIXES)})")
    root_prefix = os.path.abspath(root_path) + os.sep
    records = pl.DataFrame({"relative": relative}).select(
        id=pl.lit(f"{dataset}-") + pl.col("relative"),
        image_path=pl.lit(root_prefix) + pl.col("relative"),
        label=pl.col("relative").str.split("/").list.first(),
        relative="relative",
    )
    origin = str(root)
    if captions_path:
        captions = read_caption_table(captions_path).with_columns(relative=pl.col("path").str.strip_prefix(root_prefix))
        unmatched = captions.join(records, on="relative", how="anti")["path"]
        if len(unmatched):
            raise DataError(
                f"{captions_path}: {len(unmatched)} caption row path(s) name no image under {root}, "
                f"e.g. {unmatched.head(5).to_list()}"
            )
        records = records.join(
            captions.select("relative", "captions"), on="relative", how="left", maintain_order="left"
        )
        origin = f"{root} + {captions_path}"
    else:
        records = records.with_columns(captions=pl.lit(None, pl.List(pl.String)))
    records = records.with_columns(pl.col("captions").fill_null(pl.lit([], pl.List(pl.String))))
    ground_truth = _with_unit_scores(records.select("id", labels=pl.concat_list("label")))
    return Adapted(records.select("id", "image_path", "captions", "label").cast(RECORDS.polars()), ground_truth, origin)


def _shard_members(shard: str) -> tuple[list[tuple[str, str, int, int]], dict[str, str]]:
    """(key, image member name, data offset, size) and {key: caption} of a webdataset shard: reads headers and
    .txt members only."""
    images, captions = [], {}
    try:
        with tarfile.open(shard, "r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                directory, _, base = member.name.rpartition("/")
                stem, _, extension = base.partition(".")  # webdataset: the key ends at the first dot
                key = f"{directory}/{stem}" if directory else stem
                if f".{extension.lower()}" in IMAGE_SUFFIXES:
                    images.append((key, member.name, member.offset_data, member.size))
                elif extension.lower() == "txt":
                    captions[key] = tar.extractfile(member).read().decode("utf-8", errors="replace").strip()
    except FileNotFoundError as error:
        raise DataError(f"{shard}: shard does not exist") from error
    except (tarfile.TarError, OSError) as error:
        raise DataError(f"{shard}: not a readable (uncompressed) tar shard ({error})") from error
    return images, captions


def shards(dataset: str, shard_paths: list[str], table_path: str | None = None) -> Adapted:
    if not shard_paths and not table_path:
        raise DataError(f"data set {dataset!r}: no shards and no table given")
    frames = []
    for shard in tqdm(sorted(shard_paths), desc="reading shard headers", unit="shard", mininterval=2):
        images, captions = _shard_members(shard)
        archive = os.path.abspath(shard)
        shard_name = Path(shard).name.removesuffix(".tar")
        frames.append(
            pl.DataFrame(
                {
                    "id": [f"{dataset}-{shard_name}/{key}" for key, *_ in images],
                    "image_path": [tar_member_path(archive, name) for _, name, *_ in images],
                    "captions": [[captions[key]] if captions.get(key) else [] for key, *_ in images],
                    "image_offset": [offset for *_, offset, _ in images],
                    "image_size": [size for *_, size in images],
                },
                schema=RECORDS.polars([*RECORDS.names, "image_offset", "image_size"]),
            )
        )  # see workflow_scripts.images
    if table_path:
        table_root = os.path.abspath(Path(table_path).parent) + os.sep
        frames.append(
            read_caption_table(table_path)
            .select(
                id=pl.lit(f"{dataset}-") + pl.col("path"),
                image_path=pl.when(pl.col("path").str.starts_with(os.sep))
                .then(pl.col("path"))
                .otherwise(pl.lit(table_root) + pl.col("path")),
                captions="captions",
            )
            .cast(RECORDS.polars())
        )
    listed = [*map(str, shard_paths[:3]), *(["..."] if len(shard_paths) > 3 else [])]
    origin = ", ".join(listed + ([str(table_path)] if table_path else []))
    return Adapted(pl.concat(frames, how="diagonal"), GROUND_TRUTH.empty(), origin)


def mix(parts: list[tuple[str, str, int | None]], seed: int) -> Adapted:
    """parts: (dataset name, its records.parquet, records to draw or None for all)."""
    records, ground_truths = [], []
    for index, (name, records_path, n_records) in enumerate(parts):
        part = RECORDS.read(records_path, extra=True)
        part = part.with_columns(
            resolve_image_paths(part, records_path).alias("image_path"), source_dataset=pl.lit(name)
        )
        if n_records is not None:
            if n_records > len(part):
                raise DataError(f"{records_path}: mix asks for {n_records} records of {name!r}, which has {len(part)}")
            part = part.sort("id").sample(n_records, shuffle=True, seed=seed + index)
        records.append(part)
        ground_truth_path = Path(records_path).with_name("ground_truth.parquet")
        if ground_truth_path.exists():  # every adapter writes one; a hand-made part may not
            ground_truths.append(GROUND_TRUTH.read(ground_truth_path))
    ground_truth = pl.concat(ground_truths) if ground_truths else GROUND_TRUTH.empty()
    origin = "mix of " + ", ".join(path for _, path, _ in parts)
    return Adapted(pl.concat(records, how="diagonal_relaxed"), ground_truth, origin)


# --- command line ----------------------------------------------------------------------------------


def _parse_part(text: str) -> tuple[str, str, int | None]:
    name, records_path, *count = text.split("=", 2)
    return name, records_path, int(count[0]) if count and count[0] not in ("", "all") else None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--dataset", required=True, help="data set name, the id prefix")
    common.add_argument("--out-dir", required=True, help="folder for records, ground_truth and validation .parquet")
    add_dataclass_arguments(common, Validation)
    sources = parser.add_subparsers(dest="source", required=True)
    coco_parser = sources.add_parser("coco", parents=[common], help="COCO captions (+ instances) JSON and images")
    coco_parser.add_argument("--captions", required=True, help="captions_*.json")
    coco_parser.add_argument("--instances", help="instances_*.json: category names become the ground truth")
    coco_parser.add_argument("--images", required=True, help="folder holding the images' file_name")
    folder_parser = sources.add_parser("image_folder", parents=[common], help="ROOT/CLASS/IMAGE (ImageNet layout)")
    folder_parser.add_argument("--images", required=True, help="ROOT")
    folder_parser.add_argument("--captions", help="Parquet/CSV with path (relative to ROOT), caption")
    shards_parser = sources.add_parser("shards", parents=[common], help="webdataset .tar shards and/or a table")
    shards_parser.add_argument("--shards", nargs="*", default=[], help=".tar shards of KEY.jpg + KEY.txt members")
    shards_parser.add_argument("--table", help="Parquet/CSV with path (relative to the table), caption")
    mix_parser = sources.add_parser("mix", parents=[common], help="records of other data sets in one pool")
    mix_parser.add_argument(
        "--parts",
        nargs="+",
        required=True,
        type=_parse_part,
        help="NAME=RECORDS_PARQUET[=N] (N records drawn with the seed; all if omitted)",
    )
    mix_parser.add_argument("--seed", type=int, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)

    if args.source == "coco":
        adapted = coco(args.dataset, args.captions, args.images, args.instances)
    elif args.source == "image_folder":
        adapted = image_folder(args.dataset, args.images, args.captions)
    elif args.source == "shards":
        adapted = shards(args.dataset, args.shards, args.table)
    else:
        adapted = mix(args.parts, args.seed)
    options = dataclass_from_args(Validation, args)
    params = {key: value for key, value in vars(args).items() if key != "out_dir" and key not in options.__dict__}
    write_dataset(adapted, args.out_dir, options, params)


if __name__ == "__main__":
    main()
