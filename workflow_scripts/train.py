"""Train one OpenCLIP model on one side (A or B) of a split.

Reuses open_clip for the model, tokenizer and transforms, `open_clip.ClipLoss`
for the contrastive loss, and open_clip_train's cosine schedule with warmup,
autocast helper and weight-decay grouping rule. What is ours: the data
pipeline (one caption drawn per record per epoch, text masking), the
temperature option, checkpoints at chosen epochs, and resumption after a kill.

Multi-GPU: launched under torchrun (or as several SLURM tasks), one process
per GPU trains with DistributedDataParallel through open_clip_train's
distributed helpers; the global batch is split across the processes, ClipLoss
gathers features from all of them, and only rank 0 writes files.

Temperature: `temperature=None` keeps open_clip's learned logit scale
(initialised to 1/0.07 and clamped to at most 100 after every step, as
open_clip_train does). A number fixes the softmax temperature: the logit scale
is set to 1/temperature and frozen.

Text masking: with mask ratio r, round(r * n) of a caption's n content tokens
(everything between the start and end-of-text tokens) are replaced by the
padding id 0 each time the caption is drawn; the start and end-of-text tokens
are kept, so the text tower still pools at the end-of-text position.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch
from open_clip import ClipLoss
from open_clip_train.distributed import init_distributed_device_so
from open_clip_train.precision import get_autocast
from open_clip_train.scheduler import cosine_lr
from tqdm import tqdm

from workflow_scripts.cli import add_dataclass_arguments, dataclass_from_args
from workflow_scripts.images import load_rgb, resolve_image_paths
from workflow_scripts.io import DataError, params_hash, read_parquet, write_parquet
from workflow_scripts.models import create_model, save_checkpoint, select_device

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainingParams:
    model: str = "dejavu-vit-tiny"
    epochs: int = 30
    batch_size: int = 256
    lr: float = 1e-3
    warmup_steps: int = 50
    weight_decay: float = 0.1
    temperature: float | None = None
    mask_ratio: float = 0.0
    seed: int = 0
    save_epochs: str = ""
    precision: str = "amp_bf16"
    device: str = "auto"
    allow_cpu_fallback: bool = True
    threads: int = 1
    num_workers: int = 0
    preload_images: bool = True

    def checkpoint_epochs(self) -> list[int]:
        """Epochs whose weights are kept: `save_epochs` (comma-separated) plus the last."""
        extra = {int(e) for e in self.save_epochs.split(",") if e.strip()}
        bad = [e for e in extra if not 1 <= e <= self.epochs]
        if bad:
            raise ValueError(f"save_epochs {sorted(bad)} outside 1..{self.epochs}")
        return sorted(extra | {self.epochs})

    def identity(self) -> dict:
        """The parameters that change the trained weights (not device or loader settings)."""
        skip = {"device", "allow_cpu_fallback", "threads", "num_workers", "preload_images", "save_epochs"}
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}


class SideImages(torch.utils.data.Dataset):
    """Preprocessed images of one split side, decoded lazily or once up front."""

    def __init__(self, paths: list[str], ids: list[str], transform, preload: bool):
        self.paths, self.ids, self.transform = paths, ids, transform
        self.cache = None
        if preload:
            self.cache = torch.stack([self._load(i) for i in tqdm(range(len(paths)), desc="decoding images",
                                                                  unit="img", mininterval=2)])

    def _load(self, index: int) -> torch.Tensor:
        return self.transform(load_rgb(self.paths[index], self.ids[index]))

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        image = self.cache[index] if self.cache is not None else self._load(index)
        return image, index


def tokenize_captions(tokenizer, captions: list[list[str]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenize every caption once; return (tokens [n_captions, ctx], owner record index)."""
    flat = [caption for record in captions for caption in record]
    owner = torch.repeat_interleave(torch.arange(len(captions)), torch.tensor([len(r) for r in captions]))
    return tokenizer(flat), owner


def draw_captions(owner: torch.Tensor, n_records: int, generator: torch.Generator) -> torch.Tensor:
    """Pick one caption index per record uniformly among that record's captions."""
    counts = torch.bincount(owner, minlength=n_records)
    starts = torch.cumsum(counts, 0) - counts
    offsets = (torch.rand(n_records, generator=generator) * counts).long()
    return starts + offsets


def mask_tokens(tokens: torch.Tensor, ratio: float, eot_token_id: int, generator: torch.Generator) -> torch.Tensor:
    """Replace round(ratio * n) random content tokens of each row by 0 (see module doc)."""
    if ratio <= 0:
        return tokens
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    eot_position = (tokens == eot_token_id).int().argmax(dim=1, keepdim=True)
    content = (positions > 0) & (positions < eot_position)
    n_masked = torch.round(content.sum(dim=1, keepdim=True) * ratio).long()
    scores = torch.rand(tokens.shape, generator=generator).masked_fill(~content, float("inf"))
    order = scores.argsort(dim=1).argsort(dim=1)  # rank of each position among random scores
    masked = content & (order < n_masked)
    return tokens.masked_fill(masked, 0)


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    # open_clip_train's rule: no decay on gains, biases, norms and the logit scale.
    def exclude(name, param):
        return param.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [
        {"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
        {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": weight_decay},
    ]


def load_side(records_path: str, split_path: str) -> pl.DataFrame:
    records = read_parquet(records_path, {"id": "str", "image_path": "str", "captions": "list<str>"})
    side_ids = read_parquet(split_path, {"id": "str"}).select("id")
    side = side_ids.join(records.with_columns(resolve_image_paths(records, records_path).alias("image_path")),
                         on="id", how="left", maintain_order="left")
    missing = side.filter(pl.col("image_path").is_null())["id"]
    if len(missing):
        raise DataError(f"{split_path}: {len(missing)} id(s) not in {records_path}, e.g. {missing.head(5).to_list()}")
    no_caption = side.filter(pl.col("captions").list.len() == 0)["id"]
    if len(no_caption):
        raise DataError(f"{records_path}: record(s) without a caption cannot be trained on: "
                        f"{no_caption.head(5).to_list()}")
    return side


def train(records_path: str, split_path: str, out_dir: str | Path, params: TrainingParams) -> None:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(params.seed)
    torch.set_num_threads(params.threads)
    distributed = init_distributed_device_so(device=select_device(params.device, params.allow_cpu_fallback).type)
    device, rank, world_size = torch.device(distributed["device"]), distributed["global_rank"], distributed["world_size"]
    is_master = rank == 0
    if params.batch_size % world_size:
        raise ValueError(f"batch_size {params.batch_size} is not divisible by the {world_size} training processes")
    side = load_side(records_path, split_path)
    if len(side) < params.batch_size:
        raise DataError(f"{split_path}: {len(side)} records, fewer than one batch of {params.batch_size}")

    model, preprocess, tokenizer = create_model(params.model, device)
    if params.temperature is not None:
        model.logit_scale.data.fill_(math.log(1.0 / params.temperature))
        model.logit_scale.requires_grad_(False)
    optimizer = torch.optim.AdamW(_param_groups(model, params.weight_decay), lr=params.lr, betas=(0.9, 0.98), eps=1e-6)
    steps_per_epoch = len(side) // params.batch_size
    scheduler = cosine_lr(optimizer, params.lr, params.warmup_steps, steps_per_epoch * params.epochs)
    autocast = get_autocast(params.precision if device.type == "cuda" else "fp32", device_type=device.type)
    loss_fn = ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world_size)
    forward = model
    if distributed["distributed"]:
        forward = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device] if device.type == "cuda" else None)

    images = SideImages(side["image_path"].to_list(), side["id"].to_list(), preprocess, params.preload_images)
    tokens, owner = tokenize_captions(tokenizer, side["captions"].to_list())
    eot_token_id = int(tokens.max())  # open_clip's end-of-text id is the largest in the vocabulary

    resume_path = out_dir / "resume.pt"
    identity_hash = params_hash(params.identity())
    start_epoch, log_rows = 0, []
    if resume_path.exists():
        state = torch.load(resume_path, map_location="cpu", weights_only=True)
        if state.get("identity_hash") == identity_hash:
            model.load_state_dict(state["state_dict"])
            optimizer.load_state_dict(state["optimizer"])
            start_epoch, log_rows = int(state["epoch"]), list(state["log_rows"])
            log.info("resuming %s after epoch %d", out_dir, start_epoch)

    checkpoint_epochs = params.checkpoint_epochs()
    progress = tqdm(range(start_epoch, params.epochs), desc=f"training {out_dir}", unit="epoch", mininterval=2,
                    disable=not is_master)
    for epoch in progress:
        model.train()
        generator = torch.Generator().manual_seed(params.seed * 1_000_003 + epoch)
        epoch_tokens = mask_tokens(tokens[draw_captions(owner, len(side), generator)], params.mask_ratio,
                                   eot_token_id, generator)
        order = torch.randperm(len(side), generator=generator)
        # Every process takes an equal slice of the same permutation, so all run the same number of steps.
        order = order[: len(order) - len(order) % world_size][rank::world_size]
        loader = torch.utils.data.DataLoader(
            images, batch_size=params.batch_size // world_size, sampler=order.tolist(), drop_last=True,
            num_workers=params.num_workers,
        )
        started, losses = time.perf_counter(), []
        for step_in_epoch, (batch_images, batch_index) in enumerate(loader):
            lr = scheduler(epoch * steps_per_epoch + step_in_epoch)
            batch_images = batch_images.to(device, non_blocking=True)
            batch_tokens = epoch_tokens[batch_index].to(device, non_blocking=True)
            with autocast():
                image_features, text_features, logit_scale = forward(batch_images, batch_tokens)[:3]
                loss = loss_fn(image_features, text_features, logit_scale)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            losses.append(loss.item())
        row = {"epoch": epoch + 1, "loss": float(np.mean(losses)), "lr": float(lr),
               "logit_scale": float(model.logit_scale.exp().item()), "seconds": time.perf_counter() - started}
        log_rows.append(row)
        progress.set_postfix(loss=f"{row['loss']:.3f}", scale=f"{row['logit_scale']:.1f}")
        if not is_master:
            continue
        log.info("epoch %(epoch)d loss %(loss).4f lr %(lr).2e logit_scale %(logit_scale).1f %(seconds).1fs", row)
        if epoch + 1 in checkpoint_epochs:
            save_checkpoint(out_dir / _checkpoint_name(epoch + 1, params.epochs), model, params.model,
                            epoch=epoch + 1, params=params.identity())
        save_checkpoint(resume_path, model, params.model, epoch=epoch + 1, optimizer=optimizer.state_dict(),
                        log_rows=log_rows, identity_hash=identity_hash)
    if distributed["distributed"]:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    if is_master:
        write_parquet(pl.DataFrame(log_rows), out_dir / "train_log.parquet", stage="train",
                      params={**params.identity(), "world_size": world_size})
        resume_path.unlink(missing_ok=True)


def _checkpoint_name(epoch: int, final_epoch: int) -> str:
    return "model.pt" if epoch == final_epoch else f"model_epoch{epoch}.pt"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train one OpenCLIP model on one split side.")
    parser.add_argument("--records", required=True, help="records Parquet of the training pool")
    parser.add_argument("--split", required=True, help="Parquet with the ids of this side (A or B)")
    parser.add_argument("--out-dir", required=True, help="folder for model.pt and train_log.parquet")
    add_dataclass_arguments(parser, TrainingParams)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    train(args.records, args.split, args.out_dir, dataclass_from_args(TrainingParams, args))


if __name__ == "__main__":
    main()
