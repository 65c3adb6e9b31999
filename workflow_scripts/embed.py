"""Embed images or captions of a record set with a trained model, into the embeddings contract.

One entry point serves both modalities, both models and every dataset:
`--modality image` embeds each record's image, `--modality text` embeds one
caption per record (`--caption-index`, default the first). Embeddings are
L2-normalised float32, computed in batches without gradients.
"""

from __future__ import annotations

import argparse
import logging

import numpy as np
import polars as pl
import torch
from tqdm import tqdm

from workflow_scripts.images import load_rgb, resolve_image_paths
from workflow_scripts.io import DataError, embeddings_table, read_parquet, write_parquet
from workflow_scripts.models import load_checkpoint, select_device

log = logging.getLogger(__name__)


def select_records(records_path: str, id_paths: list[str]) -> pl.DataFrame:
    """All records of a dataset, or those listed in the given split files, in split order."""
    records = read_parquet(records_path, {"id": "str", "image_path": "str", "captions": "list<str>"})
    if not id_paths:
        return records
    wanted = pl.concat([read_parquet(path, {"id": "str"}).select("id") for path in id_paths])
    selected = wanted.join(records, on="id", how="left", maintain_order="left")
    missing = selected.filter(pl.col("image_path").is_null())["id"]
    if len(missing):
        raise DataError(f"{records_path}: {len(missing)} requested id(s) missing, e.g. {missing.head(5).to_list()}")
    return selected


@torch.no_grad()
def embed_batches(encode, items: list, prepare, batch_size: int, device: torch.device, desc: str) -> np.ndarray:
    """Run `encode(prepare(batch))` over items in batches; return L2-normalised float32 rows."""
    chunks = []
    for start in tqdm(range(0, len(items), batch_size), desc=desc, unit="batch", mininterval=2):
        features = encode(prepare(items[start:start + batch_size]).to(device))
        chunks.append(torch.nn.functional.normalize(features.float(), dim=-1).cpu().numpy())
    if not chunks:
        return np.zeros((0, 0), dtype=np.float32)
    return np.concatenate(chunks).astype(np.float32, copy=False)


def embed(model_path: str, records_path: str, id_paths: list[str], modality: str, out_path: str,
          batch_size: int = 512, caption_index: int = 0, device: str = "auto", threads: int = 1) -> None:
    torch.set_num_threads(threads)
    torch_device = select_device(device)
    model, preprocess, tokenizer, checkpoint = load_checkpoint(model_path, torch_device)
    records = select_records(records_path, id_paths)
    ids = records["id"].to_list()
    if modality == "image":
        paths = resolve_image_paths(records, records_path).to_list()
        items = list(zip(paths, ids))

        def prepare(batch):
            return torch.stack([preprocess(load_rgb(path, record_id)) for path, record_id in batch])

        encode = model.encode_image
    elif modality == "text":
        captions = records["captions"].list.get(caption_index, null_on_oob=True)
        missing = records.filter(captions.is_null())["id"]
        if len(missing):
            raise DataError(f"{records_path}: record(s) without caption #{caption_index}: {missing.head(5).to_list()}")
        items = captions.to_list()
        prepare = tokenizer
        encode = model.encode_text
    else:
        raise ValueError(f"modality must be 'image' or 'text', not {modality!r}")
    embeddings = embed_batches(encode, items, prepare, batch_size, torch_device, f"embedding {modality}s")
    params = {"model": model_path, "model_epoch": checkpoint.get("epoch"), "records": records_path,
              "modality": modality, "caption_index": caption_index}
    write_parquet(embeddings_table(ids, embeddings), out_path, stage="embed", params=params)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="checkpoint written by the train stage")
    parser.add_argument("--records", required=True, help="records Parquet of the dataset")
    parser.add_argument("--ids", action="append", default=[], help="split Parquet(s) selecting records (repeatable)")
    parser.add_argument("--modality", choices=("image", "text"), required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--caption-index", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    embed(args.model, args.records, args.ids, args.modality, args.out, args.batch_size, args.caption_index,
          args.device, args.threads)


if __name__ == "__main__":
    main()
