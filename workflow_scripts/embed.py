"""Embed images or captions of a record set with a trained model, into the embeddings contract.

One entry point serves both modalities, both models and every dataset:
`--modality image` embeds each record's image, `--modality text` embeds one
caption per record (`--caption-index`, default the first). Embeddings are
L2-normalised float32, computed in batches without gradients.

Sharded public sets: `--shard I-of-N` embeds only rows [I·n//N, (I+1)·n//N) of
the records file (`knn.shard_range`), so a job holds one shard; `python -m
workflow_scripts.knn gather` joins the shard files.

Device: `--device auto` takes a visible GPU, else the CPU with a log line;
`--device cuda` without a GPU is an error unless `--allow-cpu-fallback true`.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass

import numpy as np
import polars as pl
import torch
from tqdm import tqdm

from workflow_scripts.cli import LOG_FORMAT, add_dataclass_arguments, dataclass_from_args
from workflow_scripts.contracts import EMBEDDINGS, RECORDS, SPLIT_IDS
from workflow_scripts.images import load_rgb, resolve_image_paths
from workflow_scripts.io import DataError, embeddings_table, write_parquet
from workflow_scripts.knn import shard_range
from workflow_scripts.models import load_checkpoint, select_device

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbeddingParams:
    """Settings every embedding CLI takes from the config's `embedding` block, each a --flag."""

    caption_index: int = 0  # which caption of a record text is embedded
    device: str = "auto"  # auto | cpu | cuda[:N]
    threads: int = 1  # torch CPU threads


@dataclass(frozen=True)
class EmbedParams(EmbeddingParams):
    batch_size: int = 512
    allow_cpu_fallback: bool = False  # true: --device cuda without a GPU runs on the CPU instead of failing


def select_records(
    records_path: str, id_paths: list[str], shard: str | None = None, exclude_paths: list[str] = ()
) -> pl.DataFrame:
    """All records of a dataset, those listed in the given split files (in split order), or one shard's rows;
    less the ids listed in `exclude_paths` (P's near-duplicates of training images, when they are dropped)."""
    return without_excluded(chosen_records(records_path, id_paths, shard), exclude_paths, records_path)


def chosen_records(records_path: str, id_paths: list[str], shard: str | None) -> pl.DataFrame:
    if shard is not None:
        if id_paths:
            raise ValueError("--shard splits a whole record set; it cannot be combined with --ids")
        records = RECORDS.scan(records_path)
        start, stop = shard_range(records_path, shard)
        # Only the shard's rows are read: the job's memory follows the shard, not the record set.
        return records.slice(start, stop - start).collect()
    records = RECORDS.read(records_path)
    if not id_paths:
        return records
    wanted = pl.concat([SPLIT_IDS.read(path) for path in id_paths])
    selected = wanted.join(records, on="id", how="left", maintain_order="left")
    missing = selected.filter(pl.col("image_path").is_null())["id"]
    if len(missing):
        raise DataError(f"{records_path}: {len(missing)} requested id(s) missing, e.g. {missing.head(5).to_list()}")
    return selected


def without_excluded(records: pl.DataFrame, exclude_paths: list[str], records_path: str) -> pl.DataFrame:
    if not exclude_paths:
        return records
    excluded = pl.concat([SPLIT_IDS.read(path) for path in exclude_paths])
    kept = records.join(excluded, on="id", how="anti", maintain_order="left")
    if len(kept) < len(records):
        log.info("%s: %d record(s) left out as listed in %s", records_path, len(records) - len(kept), exclude_paths)
    return kept


def select_captions(
    records: pl.DataFrame, records_path: str, caption_index: int, skip_uncaptioned: bool
) -> pl.DataFrame:
    """Records with their `caption` #caption_index; records lacking it are an error, or left out (logged)."""
    records = records.with_columns(caption=pl.col("captions").list.get(caption_index, null_on_oob=True))
    missing = records.filter(pl.col("caption").is_null())["id"]
    if len(missing) and not skip_uncaptioned:
        raise DataError(f"{records_path}: record(s) without caption #{caption_index}: {missing.head(5).to_list()}")
    if len(missing):
        log.info(
            "%s: %d record(s) without caption #%d left out, e.g. %s",
            records_path,
            len(missing),
            caption_index,
            missing.head(3).to_list(),
        )
    return records.filter(pl.col("caption").is_not_null())


@torch.no_grad()
def embed_batches(encode, items: list, prepare, batch_size: int, device: torch.device, desc: str) -> np.ndarray:
    """Run `encode(prepare(batch))` over items in batches; return L2-normalised float32 rows."""
    chunks = []
    for start in tqdm(range(0, len(items), batch_size), desc=desc, unit="batch", mininterval=2):
        features = encode(prepare(items[start : start + batch_size]).to(device))
        chunks.append(torch.nn.functional.normalize(features.float(), dim=-1).cpu().numpy())
    if not chunks:
        return np.zeros((0, 0), dtype=np.float32)
    return np.concatenate(chunks).astype(np.float32, copy=False)


def write_embeddings(ids: list[str], embeddings: np.ndarray, out_path: str, params: dict) -> None:
    write_parquet(embeddings_table(ids, embeddings), out_path, stage="embed", params=params, contract=EMBEDDINGS)


def embed(
    model_path: str,
    records_path: str,
    id_paths: list[str],
    modality: str,
    out_path: str,
    params: EmbedParams = EmbedParams(),
    *,
    shard: str | None = None,
    skip_uncaptioned: bool = False,
    exclude_paths: list[str] = (),
) -> None:
    """Embed the selected records' images or captions (#`params.caption_index`) with a trained checkpoint."""
    if modality not in ("image", "text"):
        raise ValueError(f"modality must be 'image' or 'text', not {modality!r}")
    torch.set_num_threads(params.threads)
    device = select_device(params.device, params.allow_cpu_fallback)
    log.info("embedding on %s", device)
    model, preprocess, tokenizer, checkpoint = load_checkpoint(model_path, device)
    records = select_records(records_path, id_paths, shard, exclude_paths)
    if modality == "image":
        items = list(zip(resolve_image_paths(records, records_path).to_list(), records["id"].to_list()))

        def prepare(batch):
            return torch.stack([preprocess(load_rgb(path, record_id)) for path, record_id in batch])

        encode = model.encode_image
    else:
        records = select_captions(records, records_path, params.caption_index, skip_uncaptioned)
        items, prepare, encode = records["caption"].to_list(), tokenizer, model.encode_text
    embeddings = embed_batches(encode, items, prepare, params.batch_size, device, f"embedding {modality}s")
    provenance = {
        "model": model_path,
        "model_epoch": checkpoint.get("epoch"),
        "records": records_path,
        "modality": modality,
        "caption_index": params.caption_index,
        "shard": shard,
    }
    write_embeddings(records["id"].to_list(), embeddings, out_path, provenance)


def embedding_parser(description: str, model_help: str, params: type[EmbeddingParams]) -> argparse.ArgumentParser:
    """The arguments of every embedding CLI: a model, the records (all, or those of split files), the output
    file, and a flag for each field of `params`."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", required=True, help=model_help)
    parser.add_argument("--records", required=True, help="records Parquet of the dataset")
    parser.add_argument("--ids", action="append", default=[], help="split Parquet(s) selecting records (repeatable)")
    parser.add_argument(
        "--exclude", action="append", default=[], help="id Parquet(s) of records to leave out (repeatable)"
    )
    parser.add_argument("--out", required=True)
    add_dataclass_arguments(parser, params)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = embedding_parser(__doc__.splitlines()[0], "checkpoint written by the train stage", EmbedParams)
    parser.add_argument("--modality", choices=("image", "text"), required=True)
    parser.add_argument("--shard", help="'I-of-N': embed only shard I of N of the records (contiguous rows)")
    parser.add_argument(
        "--skip-uncaptioned",
        action="store_true",
        help="text: leave out records without the caption instead of failing (public sets)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    params = dataclass_from_args(EmbedParams, args)
    embed(
        args.model,
        args.records,
        args.ids,
        args.modality,
        args.out,
        params,
        shard=args.shard,
        skip_uncaptioned=args.skip_uncaptioned,
        exclude_paths=args.exclude,
    )


if __name__ == "__main__":
    main()
