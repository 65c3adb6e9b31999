"""Train one OpenCLIP model on one side (A or B) of a split.

Reuses open_clip for the model, tokenizer and transforms, `open_clip.ClipLoss`
for the contrastive loss, and open_clip_train's cosine schedule with warmup,
autocast helper, weight-decay grouping rule and distributed set-up. What is
ours: the data pipeline (one caption drawn per record per epoch, text masking,
every record once per epoch), the temperature option, checkpoints at chosen
epochs, and resumption after a kill.

Data path (memory flat in the number of records): rank 0 streams the side's
records (id, image path, tar offset and size, captions) into an uncompressed
Arrow file beside the outputs, which every process and DataLoader worker
memory-maps. Each step's batch is a list of row numbers; the worker reads those
rows, reads each image (one `pread` for a shard member), draws and tokenises one
caption per record and masks it. What stays in memory per record is the
epoch's permutation (8 bytes), unless `preload_images` decodes every image
up front (small data only).

Randomness: the epoch's order comes from `default_rng([seed, epoch])`; a
record's caption draw and mask come from a counter-based hash of (seed, epoch,
row), so they do not depend on the batch, the worker or the number of processes.

Multi-GPU: launched by workflow_scripts.launch (torchrun on one node, srun over
several), one process per GPU trains with DistributedDataParallel; the global
batch is split across the processes, ClipLoss gathers features from all of
them, and only rank 0 writes files.

Temperature: `temperature=None` keeps open_clip's learned logit scale
(initialised to 1/0.07 and clamped to at most 100 after every step, as
open_clip_train does). A number fixes the softmax temperature: the logit scale
is set to 1/temperature and frozen (never clamped, so 0.005 means 200).

Text masking: with mask ratio r, round(r * n) of a caption's n content tokens
(everything between the start and end-of-text tokens) are replaced by the
tokenizer's padding id each time the caption is drawn; the start and
end-of-text tokens are kept, so the text tower still pools at the end of text.

Stability: `precision: amp` (fp16) scales the loss with a GradScaler;
`accumulation_steps` splits each process's batch into micro-batches with the
same contrastive loss as the whole batch (features of the other micro-batches
are cached, as open_clip_train's accum_freq does); `grad_clip_norm` clips the
gradient norm. A NaN or infinite loss stops the job naming the epoch and step;
no model file is written.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import torch
from open_clip import ClipLoss
from open_clip_train.distributed import init_distributed_device_so
from open_clip_train.precision import get_autocast
from open_clip_train.scheduler import cosine_lr
from tqdm import tqdm

from workflow_scripts.cli import add_dataclass_arguments, dataclass_from_args
from workflow_scripts.images import decode_rgb, read_image_bytes, resolved_image_path
from workflow_scripts.io import DataError, atomic_path, params_hash, write_parquet
from workflow_scripts.launch import slurm_rendezvous
from workflow_scripts.models import create_model, save_checkpoint, select_device

log = logging.getLogger(__name__)

SIDE_TABLE = "side_records.arrow"   # the memory-mapped side, removed when training ends
STEPS_TABLE = "train_steps.parquet"  # step-level log beside train_log.parquet


class TrainingDiverged(FloatingPointError):
    pass


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
    grad_clip_norm: float | None = None
    accumulation_steps: int = 1
    grad_checkpointing: bool = False
    log_every_steps: int = 50
    device: str = "auto"
    allow_cpu_fallback: bool = True
    threads: int = 1
    num_workers: int = 0
    preload_images: bool = True

    def __post_init__(self):
        if self.temperature is not None and not self.temperature > 0:
            raise ValueError(f"temperature must be positive (or None for a learned one), not {self.temperature}")
        if self.accumulation_steps < 1 or self.log_every_steps < 1:
            raise ValueError("accumulation_steps and log_every_steps must be at least 1")

    def checkpoint_epochs(self) -> list[int]:
        """Epochs whose weights are kept: `save_epochs` (comma-separated) plus the last."""
        extra = {int(e) for e in self.save_epochs.split(",") if e.strip()}
        bad = [e for e in extra if not 1 <= e <= self.epochs]
        if bad:
            raise ValueError(f"save_epochs {sorted(bad)} outside 1..{self.epochs}")
        return sorted(extra | {self.epochs})

    def identity(self) -> dict:
        """The parameters that change the trained weights (not device, memory or loader settings)."""
        skip = {"device", "allow_cpu_fallback", "threads", "num_workers", "preload_images", "save_epochs",
                "accumulation_steps", "grad_checkpointing", "log_every_steps"}
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}


# --- randomness and text ---------------------------------------------------------------------------

def _splitmix64(values: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        values = values + np.uint64(0x9E3779B97F4A7C15)
        values = (values ^ (values >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        values = (values ^ (values >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return values ^ (values >> np.uint64(31))


def record_uniforms(seed: int, epoch: int, rows: np.ndarray, width: int) -> np.ndarray:
    """Uniform [0, 1) numbers [len(rows), width], a pure function of (seed, epoch, row, column)."""
    stream = _splitmix64(_splitmix64(np.array([seed], np.uint64)) + np.uint64(epoch))
    counters = np.asarray(rows, np.uint64)[:, None] * np.uint64(width) + np.arange(width, dtype=np.uint64)
    return (_splitmix64(counters ^ stream) >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


def draw_captions(counts: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
    """Index of one caption per record, uniform among its `counts` captions."""
    return np.minimum((uniforms * counts).astype(np.int64), counts - 1)


def special_token_ids(tokenizer) -> tuple[int, int]:
    """(end-of-text id, padding id) of an open_clip tokenizer, which masking needs."""
    if hasattr(tokenizer, "eot_token_id"):  # open_clip's SimpleTokenizer pads with 0
        return int(tokenizer.eot_token_id), 0
    inner = getattr(tokenizer, "tokenizer", None)
    eot = getattr(inner, "eos_token_id", None)
    eot = getattr(inner, "sep_token_id", None) if eot is None else eot
    pad = getattr(inner, "pad_token_id", None)
    if eot is None or pad is None:
        raise ValueError(f"text masking needs the tokenizer's end-of-text and padding ids; "
                         f"{type(tokenizer).__name__} does not give them (set mask_ratio: 0)")
    return int(eot), int(pad)


def mask_tokens(tokens: torch.Tensor, ratio: float, eot_token_id: int, scores: torch.Tensor,
                pad_token_id: int = 0) -> torch.Tensor:
    """Replace round(ratio * n) content tokens of each row by the pad id: those with the lowest `scores`."""
    if ratio <= 0:
        return tokens
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    eot_position = (tokens == eot_token_id).int().argmax(dim=1, keepdim=True)
    content = (positions > 0) & (positions < eot_position)
    n_masked = torch.round(content.sum(dim=1, keepdim=True) * ratio).long()
    order = scores.masked_fill(~content, float("inf")).argsort(dim=1).argsort(dim=1)  # rank of each score
    return tokens.masked_fill(content & (order < n_masked), pad_token_id)


# --- data ------------------------------------------------------------------------------------------

def write_side_table(records_path: str, split_path: str, path: Path) -> int:
    """Stream the side's records, in split order, into an uncompressed Arrow file; return its row count."""
    for source in (records_path, split_path):
        if not Path(source).exists():
            raise DataError(f"{source}: file does not exist")
    records = pl.scan_parquet(records_path)
    columns = records.collect_schema().names()
    missing = [c for c in ("id", "image_path", "captions") if c not in columns]
    if missing:
        raise DataError(f"{records_path}: missing column(s) {missing}; found {columns}")
    if "image_offset" not in columns:  # not from the shards adapter: members are located by their headers
        records = records.with_columns(image_offset=pl.lit(None, pl.Int64), image_size=pl.lit(None, pl.Int64))
    records = records.select("id", resolved_image_path(records_path), "image_offset", "image_size",
                             pl.col("captions").cast(pl.List(pl.String)))
    side = pl.scan_parquet(split_path).select("id").join(records, on="id", how="left", maintain_order="left")
    with atomic_path(path) as tmp:
        side.sink_ipc(tmp, compression=None, compat_level=pl.CompatLevel.oldest())  # plain strings: pyarrow takes them
    checked = pl.scan_ipc(path)
    for problem, condition, origin in (
        ("id(s) not in the records", pl.col("image_path").is_null(), f"{split_path} (records {records_path})"),
        ("record(s) without a caption cannot be trained on", pl.col("captions").list.len() == 0, records_path),
    ):
        bad = checked.filter(condition).select("id").collect()["id"]
        if len(bad):
            raise DataError(f"{origin}: {len(bad)} {problem}, e.g. {bad.head(5).to_list()}")
    return checked.select(pl.len()).collect().item()


class SideBatches(torch.utils.data.Dataset):
    """Training batches of one side: item (epoch, rows) -> (images [b, 3, H, W], masked tokens [b, ctx]).

    The side table is memory-mapped once per process, so forked workers hold no per-record objects.
    """

    def __init__(self, table_path: Path, transform, tokenizer, mask_ratio: float, seed: int):
        self.table_path, self.transform, self.tokenizer = table_path, transform, tokenizer
        self.mask_ratio, self.seed = mask_ratio, seed
        self.eot_token_id, self.pad_token_id = special_token_ids(tokenizer) if mask_ratio > 0 else (None, 0)
        self.images: torch.Tensor | None = None  # preloaded decoded images, row order
        self._mapped: tuple[int, pa.Table, list[pa.RecordBatch], np.ndarray] | None = None

    def table(self) -> pa.Table:
        return self._map()[1]

    def _map(self) -> tuple[int, pa.Table, list[pa.RecordBatch], np.ndarray]:
        """(pid, the mapped table, its record batches, first row of each), opened once per process."""
        if self._mapped is None or self._mapped[0] != os.getpid():
            table = pa.ipc.open_file(pa.memory_map(str(self.table_path))).read_all()
            batches = table.to_batches()
            starts = np.cumsum([0] + [batch.num_rows for batch in batches])[:-1]
            self._mapped = (os.getpid(), table, batches, starts)
        return self._mapped

    def rows(self, rows: np.ndarray) -> pa.Table:
        """The given (sorted) rows, taken batch by batch: a take over the whole table would first
        concatenate its chunks, copying every record into this process."""
        _, table, batches, starts = self._map()
        chunk = np.searchsorted(starts, rows, side="right") - 1
        return pa.Table.from_batches(
            [batches[c].take(pa.array(rows[chunk == c] - starts[c])) for c in np.unique(chunk)], table.schema)

    def __len__(self) -> int:
        return self.table().num_rows

    def _decoded(self, rows: pa.Table) -> torch.Tensor:
        ids, paths = rows.column("id").to_pylist(), rows.column("image_path").to_pylist()
        offsets, sizes = rows.column("image_offset").to_pylist(), rows.column("image_size").to_pylist()
        return torch.stack([
            self.transform(decode_rgb(self._read(path, offset, size, record_id), path, record_id))
            for record_id, path, offset, size in zip(ids, paths, offsets, sizes)])

    @staticmethod
    def _read(path: str, offset: int | None, size: int | None, record_id: str) -> bytes:
        try:
            return read_image_bytes(path, offset, size)
        except OSError as error:
            raise DataError(f"record {record_id!r} image {path}: cannot be read ({error})") from error

    def preload(self, chunk: int = 1024) -> None:
        """Decode every image once (memory grows with the side: for data that fits)."""
        n = len(self)
        self.images = torch.cat([self._decoded(self.table().slice(start, chunk))
                                 for start in tqdm(range(0, n, chunk), desc="decoding images", unit="chunk",
                                                   mininterval=2)])

    def tokens(self, epoch: int, rows: np.ndarray, captions: list[list[str]]) -> torch.Tensor:
        context_length = self.tokenizer.context_length
        uniforms = record_uniforms(self.seed, epoch, rows, 1 + context_length)
        chosen = draw_captions(np.array([len(c) for c in captions]), uniforms[:, 0])
        tokens = self.tokenizer([record[i] for record, i in zip(captions, chosen)])
        return mask_tokens(tokens, self.mask_ratio, self.eot_token_id, torch.from_numpy(uniforms[:, 1:]),
                           self.pad_token_id)

    def __getitem__(self, item: tuple[int, np.ndarray]):
        epoch, rows = item
        rows = np.sort(rows)  # the batch's order does not change its loss; sorted rows read sequentially
        batch = self.rows(rows)
        images = self.images[torch.from_numpy(rows)] if self.images is not None else self._decoded(batch)
        return images, self.tokens(epoch, rows, batch.column("captions").to_pylist())


def epoch_batches(n_records: int, batch_size: int, epoch: int, seed: int, rank: int, world_size: int):
    """(epoch, this process's rows) per step: consecutive global batches of one seeded permutation.

    Every record is in exactly one batch per epoch, but for the n % batch_size left over.
    """
    order = np.random.default_rng([seed, epoch]).permutation(n_records)
    return [(epoch, order[start:start + batch_size][rank::world_size])
            for start in range(0, n_records - batch_size + 1, batch_size)]


# --- optimisation ----------------------------------------------------------------------------------

def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    # open_clip_train's rule: no decay on gains, biases, norms and the logit scale.
    def exclude(name, param):
        return param.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [
        {"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
        {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": weight_decay},
    ]


def contrastive_backward(forward, loss_fn, images, tokens, accumulation: int, autocast, scaler) -> torch.Tensor:
    """Backpropagate the batch's contrastive loss in `accumulation` micro-batches; return the loss.

    Each micro-batch is recomputed with gradients while the others' features come from a no-grad pass,
    so the loss (and its negatives) is that of the whole batch. The logit scale takes its gradient from
    the last micro-batch only, which keeps it the whole batch's gradient (and under DDP every parameter
    is used in the backward pass that all-reduces).
    """
    if accumulation == 1:
        with autocast():
            loss = loss_fn(*forward(images, tokens)[:3])
        scaler.scale(loss).backward()
        return loss.detach()
    image_parts, token_parts = images.chunk(accumulation), tokens.chunk(accumulation)
    with torch.no_grad(), autocast():
        cached = [forward(i, t)[:2] for i, t in zip(image_parts, token_parts)]
    for part in range(accumulation):
        last = part == accumulation - 1
        no_sync = getattr(forward, "no_sync", None)  # DDP: all-reduce once, after the last micro-batch
        with (no_sync() if no_sync is not None and not last else contextlib.nullcontext()), autocast():
            image_part, text_part, scale = forward(image_parts[part], token_parts[part])[:3]
            features = [torch.cat([c[k] for c in cached[:part]] + [fresh] + [c[k] for c in cached[part + 1:]])
                        for k, fresh in enumerate((image_part, text_part))]
            loss = loss_fn(*features, scale if last else scale.detach())
            scaler.scale(loss).backward()
    return loss.detach()


def _global_mean(value: torch.Tensor, distributed: bool, world_size: int) -> float:
    if distributed:
        value = value.float().clone()
        torch.distributed.all_reduce(value)
        value /= world_size
    return float(value)


# --- checkpoints -----------------------------------------------------------------------------------

def _checkpoint_name(epoch: int, final_epoch: int) -> str:
    return "model.pt" if epoch == final_epoch else f"model_epoch{epoch}.pt"


def _resume_state(resume_path: Path, identity_hash: str, params: TrainingParams) -> dict | None:
    """The resume state to continue from, or None to train from scratch.

    A state past a checkpoint epoch whose file is missing (e.g. epoch 20 added to the sweep after a kill
    at epoch 25) is discarded: those weights exist only on the run's own trajectory, and a resume state
    is kept only for the last finished epoch, so the run is retrained from the start.
    """
    if not resume_path.exists():
        return None
    state = torch.load(resume_path, map_location="cpu", weights_only=True)
    if state.get("identity_hash") != identity_hash:
        log.info("%s was written with other parameters: training from scratch", resume_path)
        return None
    epoch = int(state["epoch"])
    missing = [e for e in params.checkpoint_epochs()
               if e < params.epochs and e <= epoch and not (resume_path.parent / _checkpoint_name(e, params.epochs)).exists()]
    if missing:
        log.warning("%s is at epoch %d but the checkpoint(s) of epoch(s) %s are missing: retraining from scratch",
                    resume_path, epoch, missing)
        return None
    return state


def train(records_path: str, split_path: str, out_dir: str | Path, params: TrainingParams) -> None:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(params.seed)
    torch.set_num_threads(params.threads)
    os.environ.update(slurm_rendezvous())
    distributed = init_distributed_device_so(device=select_device(params.device, params.allow_cpu_fallback).type)
    device, rank, world_size = torch.device(distributed["device"]), distributed["global_rank"], distributed["world_size"]
    is_master, is_distributed = rank == 0, distributed["distributed"]
    if params.batch_size % (world_size * params.accumulation_steps):
        raise ValueError(f"batch_size {params.batch_size} is not divisible by the {world_size} training processes "
                         f"x {params.accumulation_steps} accumulation steps")
    side_table = out_dir / SIDE_TABLE
    if is_master:
        write_side_table(records_path, split_path, side_table)
    if is_distributed:
        torch.distributed.barrier()

    model, preprocess, tokenizer = create_model(params.model, device)
    if params.grad_checkpointing:
        model.set_grad_checkpointing(True)
    if params.temperature is not None:
        model.logit_scale.data.fill_(math.log(1.0 / params.temperature))
        model.logit_scale.requires_grad_(False)
    data = SideBatches(side_table, preprocess, tokenizer, params.mask_ratio, params.seed)
    n_records = len(data)
    if n_records < params.batch_size:
        raise DataError(f"{split_path}: {n_records} records, fewer than one batch of {params.batch_size}")
    optimizer = torch.optim.AdamW(_param_groups(model, params.weight_decay), lr=params.lr, betas=(0.9, 0.98), eps=1e-6)
    steps_per_epoch = n_records // params.batch_size
    scheduler = cosine_lr(optimizer, params.lr, params.warmup_steps, steps_per_epoch * params.epochs)
    autocast = get_autocast(params.precision if device.type == "cuda" else "fp32", device_type=device.type)
    scaler = torch.amp.GradScaler(device.type, enabled=params.precision == "amp" and device.type == "cuda")
    loss_fn = ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world_size)
    forward = model
    if is_distributed:
        forward = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device] if device.type == "cuda" else None)

    resume_path = out_dir / "resume.pt"
    identity_hash = params_hash(params.identity())
    start_epoch, log_rows, step_rows = 0, [], []
    state = _resume_state(resume_path, identity_hash, params)
    if state is not None:
        model.load_state_dict(state["state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        start_epoch, log_rows, step_rows = int(state["epoch"]), list(state["log_rows"]), list(state["step_rows"])
        log.info("resuming %s after epoch %d", out_dir, start_epoch)
    if params.preload_images and start_epoch < params.epochs:
        data.preload()

    checkpoint_epochs = params.checkpoint_epochs()
    progress = tqdm(range(start_epoch, params.epochs), desc=f"training {out_dir}", unit="epoch", mininterval=2,
                    disable=not is_master)
    run_started = time.perf_counter()
    for epoch in progress:
        model.train()
        loader = torch.utils.data.DataLoader(
            data, batch_size=None, num_workers=params.num_workers, pin_memory=device.type == "cuda",
            sampler=epoch_batches(n_records, params.batch_size, epoch, params.seed, rank, world_size))
        started, losses = time.perf_counter(), []
        for step_in_epoch, (batch_images, batch_tokens) in enumerate(loader):
            step = epoch * steps_per_epoch + step_in_epoch
            lr = scheduler(step)
            optimizer.zero_grad(set_to_none=True)
            loss = contrastive_backward(forward, loss_fn, batch_images.to(device, non_blocking=True),
                                        batch_tokens.to(device, non_blocking=True), params.accumulation_steps,
                                        autocast, scaler)
            loss = _global_mean(loss, is_distributed, world_size)
            if not math.isfinite(loss):
                raise TrainingDiverged(f"{out_dir}: loss is {loss} at epoch {epoch + 1}, step {step_in_epoch + 1} "
                                       f"(global step {step + 1}): training diverged, no model written "
                                       f"(lower lr, or clip with grad_clip_norm)")
            if params.grad_clip_norm is not None:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), params.grad_clip_norm)
            scaler.step(optimizer)
            scaler.update()
            if params.temperature is None:
                with torch.no_grad():
                    model.logit_scale.clamp_(0, math.log(100))
            losses.append(loss)
            if (step + 1) % params.log_every_steps == 0:
                step_rows.append({"step": step + 1, "epoch": epoch + 1, "loss": loss, "lr": float(lr),
                                  "logit_scale": model.logit_scale.detach().exp().item(),
                                  "seconds": time.perf_counter() - run_started})
        row = {"epoch": epoch + 1, "loss": float(np.mean(losses)), "lr": float(lr),
               "logit_scale": float(model.logit_scale.exp().item()), "seconds": time.perf_counter() - started}
        log_rows.append(row)
        progress.set_postfix(loss=f"{row['loss']:.3f}", scale=f"{row['logit_scale']:.1f}")
        if not is_master:
            continue
        log.info("epoch %(epoch)d loss %(loss).4f lr %(lr).2e logit_scale %(logit_scale).1f %(seconds).1fs", row)
        if epoch + 1 in checkpoint_epochs and epoch + 1 < params.epochs:
            save_checkpoint(out_dir / _checkpoint_name(epoch + 1, params.epochs), model, params.model,
                            epoch=epoch + 1, params=params.identity())
        save_checkpoint(resume_path, model, params.model, epoch=epoch + 1, optimizer=optimizer.state_dict(),
                        scaler=scaler.state_dict(), log_rows=log_rows, step_rows=step_rows,
                        identity_hash=identity_hash)
    if is_distributed:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    if is_master:
        # Written after the loop, also when a rerun resumes at the last epoch (killed before model.pt).
        save_checkpoint(out_dir / "model.pt", model, params.model, epoch=params.epochs, params=params.identity())
        provenance = {**params.identity(), "world_size": world_size}
        step_schema = {"step": pl.Int64, "epoch": pl.Int64, "loss": pl.Float64, "lr": pl.Float64,
                       "logit_scale": pl.Float64, "seconds": pl.Float64}
        write_parquet(pl.DataFrame(step_rows, schema=step_schema), out_dir / STEPS_TABLE, stage="train",
                      params={**provenance, "log_every_steps": params.log_every_steps})
        write_parquet(pl.DataFrame(log_rows), out_dir / "train_log.parquet", stage="train", params=provenance)
        resume_path.unlink(missing_ok=True)
        side_table.unlink(missing_ok=True)


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
