"""Embed full images, or the periphery crops of the SSL test, with an SSL model (trained or imported).

`python -m workflow_scripts.ssl.embed --model M --records R [--images IDS=OUT ...] [--crop-images IDS=OUT ...
--crops crops.parquet] --layer projector|backbone [--batch-size --device --threads --allow-cpu-fallback]`

One job embeds every collection of a model and layer (the model loads once): `--images` the full images of
the ids in IDS (the public set X, images of `--public-records` when X is another data set's), `--crop-images` the crop of each id in IDS that the crops table keeps (its
`x_min`, `y_min`, `x_max`, `y_max` pixels, max exclusive); dropped ids are left out and counted in the log,
and an id the table lacks is an error. The model is a checkpoint of workflow_scripts.ssl.train or one that
workflow_scripts.ssl.published imported; `load_ssl_encoder` reads either. A trained model's images go through
the evaluation transform of the paper (Resize 256, CenterCrop 224) at the model's `image_size`:
Resize(round(image_size·256/224)) → CenterCrop(image_size) → ToTensor → ImageNet normalisation (the
training views' normalisation); an imported model's through its published preprocessing. `--layer projector`
embeds the projector output, `backbone` the backbone's features (an imported model has only `backbone`). Rows
are L2-normalised float32 (the embeddings contract), in the order of I.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from functools import partial

import numpy as np
import polars as pl
import torch

from workflow_scripts.cli import LOG_FORMAT, add_dataclass_arguments, dataclass_from_args, keyed_files
from workflow_scripts.contracts import CROPS
from workflow_scripts.embed import embed_batches, select_records, write_embeddings
from workflow_scripts.images import crop, load_rgb, resolve_image_paths
from workflow_scripts.io import DataError
from workflow_scripts.models import select_device
from workflow_scripts.ssl.models import LAYERS
from workflow_scripts.ssl.published import check_layer, load_ssl_encoder

log = logging.getLogger(__name__)
BOX = ["x_min", "y_min", "x_max", "y_max"]


@dataclass(frozen=True)
class SSLEmbedParams:
    """Execution settings of the SSL embedding CLI (each a --flag): they change how fast, never what is written."""

    batch_size: int = 512
    device: str = "auto"  # auto | cpu | cuda[:N]
    threads: int = 1  # torch CPU threads
    allow_cpu_fallback: bool = False  # true: --device cuda without a GPU runs on the CPU instead of failing


def kept_crops(records: pl.DataFrame, crops_path: str) -> pl.DataFrame:
    """The records whose crop the table keeps, with its box columns (in the records' order); dropped ids logged."""
    crops = CROPS.read(crops_path, ["id", *BOX, "drop_reason"]).with_columns(in_crops=pl.lit(True))
    joined = records.join(crops, on="id", how="left", maintain_order="left")
    absent = joined.filter(pl.col("in_crops").is_null())["id"]
    if len(absent):
        raise DataError(f"{crops_path}: no row for {len(absent)} requested id(s), e.g. {absent.head(5).to_list()}")
    dropped = joined.filter(pl.col("drop_reason").is_not_null())
    kept = joined.filter(pl.col("drop_reason").is_null())
    empty = (pl.col("x_max") <= pl.col("x_min")) | (pl.col("y_max") <= pl.col("y_min"))
    bad = kept.filter(pl.any_horizontal(pl.col(BOX).is_null()) | empty)
    if len(bad):
        raise DataError(
            f"{crops_path}: kept crop(s) with a missing or empty box, e.g. ids {bad['id'].head(5).to_list()}"
        )
    if len(dropped):
        reasons = dict(dropped.group_by("drop_reason").len().sort("drop_reason").iter_rows())
        log.info("%s: %d of %d id(s) dropped and not embedded %s", crops_path, len(dropped), len(joined), reasons)
    return kept.drop("drop_reason", "in_crops")


@dataclass(frozen=True)
class Collection:
    """One output of an embedding job: the ids of `ids_path`, as full images or (`cropped`) their kept crops; their
    images are those of `records_path` (None: the job's records)."""

    ids_path: str
    out_path: str
    cropped: bool
    records_path: str | None = None


def embed(
    model_path: str,
    records_path: str,
    collections: list[Collection],
    *,
    layer: str = "projector",
    crops_path: str | None = None,
    params: SSLEmbedParams = SSLEmbedParams(),
) -> None:
    """Embed each collection's full images, or kept crops, at `layer` of an SSL model loaded once."""
    if layer not in LAYERS:
        raise ValueError(f"layer must be one of {LAYERS}, not {layer!r}")
    if crops_path is None and any(collection.cropped for collection in collections):
        raise ValueError("cropped collections need the crops table (--crops)")
    torch.set_num_threads(params.threads)
    device = select_device(params.device, params.allow_cpu_fallback)
    encode, transform, checkpoint = load_ssl_encoder(model_path, device)
    check_layer(checkpoint, layer)
    provenance = model_provenance(model_path, checkpoint) | {"layer": layer}
    encode = partial(encode, layer=layer)
    for collection in collections:
        crops = crops_path if collection.cropped else None
        records = collection.records_path or records_path
        ids, embeddings = embed_collection(encode, transform, records, collection.ids_path, crops, params, device)
        if not ids:
            log.warning("%s: nothing to embed: %s is written without rows", model_path, collection.out_path)
            embeddings = np.zeros((0, checkpoint["dims"][layer]), dtype=np.float32)
        write_embeddings(
            ids,
            embeddings,
            collection.out_path,
            {**provenance, "records": records, "ids": [collection.ids_path], "crops": crops},
        )


def model_provenance(model_path: str, checkpoint: dict) -> dict:
    """What the embeddings' metadata says of the model: a trained one's epoch, method, backbone and image size; an
    imported one's source, architecture and preprocessing."""
    provenance = {"model": model_path, "model_kind": checkpoint["kind"], "model_name": checkpoint["name"]}
    if checkpoint["kind"] == "ssl":
        return provenance | {
            "model_epoch": checkpoint.get("epoch"),
            "method": checkpoint["method"],
            "backbone": checkpoint["backbone"],
            "image_size": checkpoint["params"]["image_size"],
        }
    return provenance | {key: checkpoint[key] for key in ("source", "architecture", "weights", "preprocess")}


def embed_collection(encode, transform, records_path: str, ids_path: str, crops_path: str | None, params, device):
    """(ids, L2-normalised rows of `encode`) of the ids' full images, or with `crops_path` their kept crops, in
    ids order (no rows: None)."""
    records = select_records(records_path, [ids_path])
    records = pl.DataFrame({"id": records["id"], "image_path": resolve_image_paths(records, records_path)})
    records = kept_crops(records, crops_path) if crops_path is not None else records
    boxes = records.select(BOX).rows() if crops_path is not None else [None] * len(records)
    items = list(zip(records["image_path"].to_list(), records["id"].to_list(), boxes))

    def prepare(batch):
        return torch.stack(
            [transform(crop(load_rgb(path, record_id), box, record_id)) for path, record_id, box in batch]
        )

    what = f"{'crops' if crops_path is not None else 'images'} of {ids_path}"
    if not items:
        return [], None
    return records["id"].to_list(), embed_batches(
        encode, items, prepare, params.batch_size, device, f"embedding {what}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="model.pt of workflow_scripts.ssl.train or .published")
    parser.add_argument("--records", required=True, help="records Parquet of the dataset")
    parser.add_argument("--public-records", help="records Parquet of the --images ids (default: --records)")
    parser.add_argument("--images", action="append", default=[], metavar="IDS=OUT", help="embed these full images")
    parser.add_argument(
        "--crop-images", action="append", default=[], metavar="IDS=OUT", help="embed these ids' kept crops"
    )
    parser.add_argument("--crops", help="crops Parquet (CROPS): the boxes --crop-images embeds")
    parser.add_argument("--layer", choices=LAYERS, default="projector", help="projector output or backbone features")
    add_dataclass_arguments(parser, SSLEmbedParams)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    collections = [
        Collection(ids, out, cropped, None if cropped else args.public_records)
        for flag, cropped in (("images", False), ("crop-images", True))
        for ids, out in keyed_files(getattr(args, flag.replace("-", "_")), flag).items()
    ]
    if not collections:
        parser.error("nothing to embed: give --images and/or --crop-images")
    params = dataclass_from_args(SSLEmbedParams, args)
    embed(args.model, args.records, collections, layer=args.layer, crops_path=args.crops, params=params)


if __name__ == "__main__":
    main()
