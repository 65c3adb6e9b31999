"""ImageNet's bounding boxes as the BOXES table, keyed by the records' ids (the SSL test's foreground boxes).

Sources: ILSVRC's ``LOC_train_solution.csv`` (``ImageId``, ``PredictionString``: repeated
``synset x_min y_min x_max y_max``) and/or a folder of per-image PASCAL-VOC XML files
(``annotation/size/{width,height}``, ``annotation/object/{name,bndbox/{xmin,ymin,xmax,ymax}}``), found
recursively. An ImageId (the CSV's column, an XML file's name without ``.xml``, e.g. ``n01440764_10026``)
names the record whose image file has that name without its suffix: the image_folder adapter keeps the file
name in ``image_path`` (``ROOT/CLASS/n01440764_10026.JPEG``, id ``DATASET-CLASS/n01440764_10026.JPEG``).

Decisions:

- Only boxes of the record's own class are kept: a box whose synset differs from the record's label
  (``--label-column``) is dropped and counted. The SSL test crops around the labelled object; DejaVu reads
  every object of the XML (its training XMLs name the image's class only, so the two agree there).
- Coordinates are kept as the files give them and read as pixel edges (``x_max`` exclusive), as DejaVu
  slices the image with them; against VOC's 1-based inclusive reading that is at most a pixel.
- Image sizes come from the XML's ``size``, or for the CSV from the image header (PIL reads only that).
- With both sources, a record the XML folder covers takes the XML's boxes; the CSV fills in the rest.
- ImageIds that name no record are counted and logged, not refused (DejaVu counts them too: images an
  adapter dropped). Malformed CSV rows and XML files are a DataError naming the file and the row.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import xml.etree.ElementTree as ElementTree
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import polars as pl
from PIL import Image
from tqdm import tqdm

from workflow_scripts.cli import LOG_FORMAT
from workflow_scripts.contracts import BOXES, RECORDS
from workflow_scripts.images import TAR_MEMBER_SEPARATOR, read_image_bytes, resolved_image_path
from workflow_scripts.io import DataError, write_parquet

log = logging.getLogger(__name__)

COORDINATES = ("x_min", "y_min", "x_max", "y_max")
_RAW = {"image_id": pl.String, "synset": pl.String, **dict.fromkeys(COORDINATES, pl.Float32)}


# --- sources ---------------------------------------------------------------------------------------------


def read_loc_csv(path: str | os.PathLike) -> pl.DataFrame:
    """One row per box of ILSVRC's LOC CSV: image_id, synset, x_min, y_min, x_max, y_max."""
    try:
        frame = pl.read_csv(path, infer_schema=False)
    except (OSError, pl.exceptions.PolarsError) as error:
        raise DataError(f"{path}: not a readable CSV file ({error})") from error
    missing = [name for name in ("ImageId", "PredictionString") if name not in frame.columns]
    if missing:
        raise DataError(f"{path}: not a LOC solution file: missing column(s) {missing}; found {frame.columns}")
    # line: the file's line number (header is line 1), for messages.
    tokens = frame.with_row_index("line", offset=2).select(
        "line", image_id="ImageId", tokens=pl.col("PredictionString").fill_null("").str.extract_all(r"\S+")
    )
    _refuse_rows(tokens, pl.col("image_id").is_null(), path, "an empty ImageId")
    _refuse_rows(tokens, pl.col("tokens").list.len() % 5 != 0, path, "a PredictionString not in groups of 5")
    fields = {
        name: pl.col("tokens").list.gather_every(5, offset) for offset, name in enumerate(("synset", *COORDINATES))
    }
    boxes = tokens.select("line", "image_id", **fields).explode(["synset", *COORDINATES])
    boxes = boxes.drop_nulls("synset")  # rows without boxes explode to one null row
    numbers = boxes.with_columns(pl.col(COORDINATES).cast(pl.Float32, strict=False))
    _refuse_rows(numbers, pl.any_horizontal(pl.col(COORDINATES).is_null()), path, "a coordinate that is no number")
    _refuse_rows(numbers, _inverted(), path, "a box with x_max < x_min or y_max < y_min")
    return numbers.drop("line")


def _inverted() -> pl.Expr:
    return (pl.col("x_max") < pl.col("x_min")) | (pl.col("y_max") < pl.col("y_min"))


def _refuse_rows(frame: pl.DataFrame, bad: pl.Expr, path, what: str) -> None:
    offending = frame.filter(bad)
    if len(offending):
        first = offending.row(0, named=True)
        raise DataError(
            f"{path}: line {first['line']} (ImageId {first['image_id']!r}) has {what}; "
            f"{len(offending)} such box(es) or row(s) in all"
        )


def parse_xml(path: str | os.PathLike) -> list[tuple]:
    """(image_id, synset, width, height, x_min, y_min, x_max, y_max) of every object of one VOC XML file."""
    try:
        root = ElementTree.parse(path).getroot()
        width, height = (int(float(root.findtext(f"size/{name}"))) for name in ("width", "height"))
        rows = []
        for element in root.iterfind("object"):
            box = [float(element.findtext(f"bndbox/{name}")) for name in ("xmin", "ymin", "xmax", "ymax")]
            rows.append((Path(path).stem, element.findtext("name"), width, height, *box))
    except (ElementTree.ParseError, OSError) as error:
        raise DataError(f"{path}: not a readable XML file ({error})") from error
    except (TypeError, ValueError) as error:  # findtext gave None, or a value that is no number
        raise DataError(f"{path}: missing or non-numeric size/width, size/height or bndbox value ({error})") from error
    if width <= 0 or height <= 0:
        raise DataError(f"{path}: image size {width}x{height} is not positive")
    for row in rows:
        if row[1] is None or row[6] < row[4] or row[7] < row[5]:
            raise DataError(f"{path}: an object without a name, or a box with x_max < x_min or y_max < y_min")
    return rows


def read_xml_dir(folder: str | os.PathLike) -> pl.DataFrame:
    """One row per box of every ``*.xml`` under `folder` (sorted walk): image_id, synset, sizes, coordinates."""
    if not Path(folder).is_dir():
        raise DataError(f"{folder}: XML folder does not exist")
    files = sorted(str(path) for path in Path(folder).rglob("*.xml"))
    if not files:
        raise DataError(f"{folder}: no *.xml files")
    rows = [
        row for file in tqdm(files, desc="reading XML boxes", unit="file", mininterval=2) for row in parse_xml(file)
    ]
    schema = {**_RAW, "image_width": pl.Int32, "image_height": pl.Int32}
    order = ["image_id", "synset", "image_width", "image_height", *COORDINATES]
    return pl.DataFrame(rows, schema={name: schema[name] for name in order}, orient="row")


# --- records ---------------------------------------------------------------------------------------------


def _records(records_path: str, label_column: str) -> pl.DataFrame:
    """The records' id, label, resolved image path and image_id (the file name without its suffix)."""
    records = RECORDS.read(records_path, ["id", "image_path", label_column]).select(
        "id", resolved_image_path(records_path), label=pl.col(label_column).cast(pl.String)
    )
    name = pl.col("image_path").str.split(TAR_MEMBER_SEPARATOR).list.last().str.split("/").list.last()
    return records.with_columns(image_id=name.str.replace(r"\.[^.]*$", ""))


def match_records(raw: pl.DataFrame, records: pl.DataFrame, records_path: str, origin: str) -> pl.DataFrame:
    """`raw` boxes joined to the record of their image_id, boxes of another class than its label dropped."""
    matched_ids = raw.select("image_id").unique()
    ambiguous = records.join(matched_ids, on="image_id", how="semi").filter(pl.col("image_id").is_duplicated())
    if len(ambiguous):
        raise DataError(
            f"{records_path}: {len(ambiguous)} records share an image file name that {origin} names, "
            f"e.g. {ambiguous.sort('image_id')['id'].head(4).to_list()}: ImageIds would be ambiguous"
        )
    unlabelled = records.join(matched_ids, on="image_id", how="semi").filter(pl.col("label").is_null())
    if len(unlabelled):
        raise DataError(f"{records_path}: records with boxes but no label, e.g. {unlabelled['id'].head(5).to_list()}")
    joined = raw.join(records.select("id", "image_id", "label"), on="image_id", how="left", maintain_order="left")
    orphan = joined.filter(pl.col("id").is_null())["image_id"].n_unique()
    other_class = joined.filter(pl.col("id").is_not_null() & (pl.col("synset") != pl.col("label")))
    log.info(
        "%s: %d box(es) of %d ImageId(s); %d ImageId(s) name no record; %d box(es) of another class dropped",
        origin,
        len(raw),
        raw["image_id"].n_unique(),
        orphan,
        len(other_class),
    )
    return joined.filter(pl.col("id").is_not_null() & (pl.col("synset") == pl.col("label")))


def image_size(path: str) -> tuple[int, int]:
    """(width, height) from the image's header (a file, or an ``ARCHIVE.tar::MEMBER``)."""
    source = io.BytesIO(read_image_bytes(path)) if TAR_MEMBER_SEPARATOR in path else path
    with Image.open(source) as image:
        return image.size


def _read_size(record: tuple[str, str]) -> tuple[str, int, int]:
    record_id, path = record
    try:
        return (record_id, *image_size(path))
    except (OSError, ValueError, SyntaxError) as error:
        raise DataError(f"record {record_id!r}: image {path}: cannot read its size ({error})") from error


def with_image_sizes(boxes: pl.DataFrame, records: pl.DataFrame, threads: int) -> pl.DataFrame:
    """`boxes` with image_width/image_height read from the headers of their records' images."""
    wanted = records.join(boxes.select("id").unique(), on="id", how="semi").sort("id")
    pairs = list(wanted.select("id", "image_path").iter_rows())
    with ThreadPoolExecutor(max(1, threads)) as pool:
        sizes = list(tqdm(pool.map(_read_size, pairs), total=len(pairs), desc="image sizes", mininterval=2))
    frame = pl.DataFrame(
        sizes, schema={"id": pl.String, "image_width": pl.Int32, "image_height": pl.Int32}, orient="row"
    )
    return boxes.join(frame, on="id", how="left", maintain_order="left")


# --- the stage -------------------------------------------------------------------------------------------


def imagenet_boxes(
    records: str, loc_csv: str | None, xml_dir: str | None, label_column: str, out: str, threads: int
) -> None:
    """Write the BOXES table of the records from the LOC CSV and/or the XML folder."""
    if not loc_csv and not xml_dir:
        raise DataError("give --loc-csv and/or --xml-dir")
    table = _records(records, label_column)
    parts = []
    if xml_dir:
        parts.append(match_records(read_xml_dir(xml_dir), table, records, xml_dir))
    if loc_csv:
        from_csv = match_records(read_loc_csv(loc_csv), table, records, loc_csv)
        if parts:  # the XML folder's records keep its boxes
            from_csv = from_csv.join(parts[0].select("id").unique(), on="id", how="anti")
        parts.append(with_image_sizes(from_csv, table, threads))
    boxes = pl.concat([part.select(BOXES.names) for part in parts]).sort("id", maintain_order=True)
    log.info("%d box(es) for %d of %d records", len(boxes), boxes["id"].n_unique(), len(table))
    params = {"records": records, "loc_csv": loc_csv, "xml_dir": xml_dir, "label_column": label_column}
    write_parquet(boxes, out, stage="boxes", params=params, contract=BOXES)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sources = parser.add_subparsers(dest="source", required=True)
    imagenet = sources.add_parser("imagenet", help="ILSVRC LOC_train_solution.csv and/or per-image VOC XML files")
    imagenet.add_argument("--records", required=True, help="the data set's records.parquet (image_folder adapter)")
    imagenet.add_argument("--loc-csv", help="LOC_train_solution.csv (ImageId, PredictionString)")
    imagenet.add_argument("--xml-dir", help="folder of per-image XML files (searched recursively)")
    imagenet.add_argument("--label-column", default="label", help="the records' class column (default: label)")
    imagenet.add_argument("--threads", type=int, default=1, help="threads reading image headers (CSV sizes)")
    imagenet.add_argument("--out", required=True, help="boxes.parquet")
    args = parser.parse_args(argv)
    if not args.loc_csv and not args.xml_dir:
        parser.error("give --loc-csv and/or --xml-dir")
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    imagenet_boxes(args.records, args.loc_csv, args.xml_dir, args.label_column, args.out, args.threads)


if __name__ == "__main__":
    main()
