"""Train one OpenCLIP model on one side (A or B) of a split.

Reuses open_clip for the model, tokenizer and transforms, `open_clip.ClipLoss` for the contrastive loss,
and open_clip_train's cosine schedule with warmup, autocast helper, weight-decay grouping rule and
distributed set-up. What is ours: the data pipeline (one caption drawn per record per epoch, text masking,
every record once per epoch: workflow_scripts.training.data and .text), the temperature option,
checkpoints at chosen epochs, and resumption after a kill (workflow_scripts.training.state).

This module runs the stage: it sets up the processes, the model and a TrainState, calls `train_one_epoch`
per epoch and writes the files; the parts live in the workflow_scripts.training package.

Temperature: `temperature=None` keeps open_clip's learned logit scale (initialised to 1/0.07 and clamped
to at most 100 after every step, as open_clip_train does). A number fixes the softmax temperature: the
logit scale is set to 1/temperature and frozen (never clamped, so 0.005 means 200).

A NaN or infinite loss stops the job naming the epoch and step; no model file is written.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch
from open_clip import ClipLoss
from open_clip_train.distributed import init_distributed_device_so
from tqdm import tqdm

from workflow_scripts.cli import LOG_FORMAT, add_dataclass_arguments, dataclass_from_args
from workflow_scripts.contracts import TRAIN_LOG, TRAIN_STEPS
from workflow_scripts.io import DataError, params_hash, write_parquet
from workflow_scripts.launch import slurm_rendezvous
from workflow_scripts.models import create_model, save_checkpoint, select_device
from workflow_scripts.training.data import SIDE_TABLE, SideBatches, epoch_batches, write_side_table
from workflow_scripts.training.optim import apply_gradients, contrastive_backward, global_mean
from workflow_scripts.training.params import TrainingParams
from workflow_scripts.training.state import RESUME_FILE, Processes, TrainState, checkpoint_name, resume_state
from workflow_scripts.training.text import draw_captions, mask_tokens, record_uniforms, special_token_ids

# Names other modules, tests and benchmarks take from here. The loop looks `epoch_batches`,
# `save_checkpoint` and `write_parquet` up in this module, so patching them here reaches it.
__all__ = [
    "SIDE_TABLE",
    "STEPS_TABLE",
    "ClipLoss",
    "SideBatches",
    "TrainState",
    "TrainingDiverged",
    "TrainingParams",
    "contrastive_backward",
    "draw_captions",
    "epoch_batches",
    "main",
    "mask_tokens",
    "record_uniforms",
    "save_checkpoint",
    "special_token_ids",
    "train",
    "train_one_epoch",
    "write_parquet",
    "write_side_table",
]

log = logging.getLogger(__name__)

STEPS_TABLE = "train_steps.parquet"  # step-level log beside train_log.parquet


class TrainingDiverged(FloatingPointError):
    pass


def start_processes(params: TrainingParams) -> Processes:
    """Seed, set threads and join the other training processes (if launched as several)."""
    torch.manual_seed(params.seed)
    torch.set_num_threads(params.threads)
    os.environ.update(slurm_rendezvous())
    distributed = init_distributed_device_so(device=select_device(params.device, params.allow_cpu_fallback).type)
    processes = Processes(
        torch.device(distributed["device"]),
        distributed["global_rank"],
        distributed["world_size"],
        distributed["distributed"],
    )
    if params.batch_size % (processes.world_size * params.accumulation_steps):
        raise ValueError(
            f"batch_size {params.batch_size} is not divisible by the {processes.world_size} training "
            f"processes x {params.accumulation_steps} accumulation steps"
        )
    return processes


def side_data(records_path: str, split_path: str, out_dir: Path, processes: Processes) -> Path:
    """The side table, written by rank 0 while the others wait."""
    side_table = out_dir / SIDE_TABLE
    if processes.is_master:
        write_side_table(records_path, split_path, side_table)
    if processes.distributed:
        torch.distributed.barrier()
    return side_table


def build_model(params: TrainingParams, device: torch.device):
    """(model, preprocess, tokenizer), with gradient checkpointing and a fixed temperature applied."""
    model, preprocess, tokenizer = create_model(params.model, device)
    if params.grad_checkpointing:
        model.set_grad_checkpointing(True)
    if params.temperature is not None:
        model.logit_scale.data.fill_(math.log(1.0 / params.temperature))
        model.logit_scale.requires_grad_(False)
    return model, preprocess, tokenizer


def _batch_loss(state: TrainState, images, tokens, params: TrainingParams, processes: Processes) -> float:
    """Zero the gradients, backpropagate the batch's loss and return its mean over the processes."""
    state.optimizer.zero_grad(set_to_none=True)
    device = processes.device
    loss = contrastive_backward(
        state.forward,
        state.loss_fn,
        images.to(device, non_blocking=True),
        tokens.to(device, non_blocking=True),
        params.accumulation_steps,
        state.autocast,
        state.scaler,
    )
    return global_mean(loss, processes.distributed, processes.world_size)


def train_one_epoch(
    state: TrainState, data: SideBatches, params: TrainingParams, processes: Processes, out_dir: Path
) -> dict:
    """Train epoch `state.epoch` over the side; append its rows to the state's logs and return its log row."""
    epoch, model = state.epoch, state.model
    model.train()
    loader = torch.utils.data.DataLoader(
        data,
        batch_size=None,
        num_workers=params.num_workers,
        pin_memory=processes.device.type == "cuda",
        sampler=epoch_batches(len(data), params.batch_size, epoch, params.seed, processes.rank, processes.world_size),
    )
    started, losses = time.perf_counter(), []
    for step_in_epoch, (batch_images, batch_tokens) in enumerate(loader):
        state.step = step = epoch * state.steps_per_epoch + step_in_epoch
        lr = state.scheduler(step)
        loss = _batch_loss(state, batch_images, batch_tokens, params, processes)
        if not math.isfinite(loss):
            raise TrainingDiverged(
                f"{out_dir}: loss is {loss} at epoch {epoch + 1}, step {step_in_epoch + 1} "
                f"(global step {step + 1}): training diverged, no model written "
                f"(lower lr, or clip with grad_clip_norm)"
            )
        apply_gradients(model, state.optimizer, state.scaler, params.grad_clip_norm, params.temperature is None)
        losses.append(loss)
        if (step + 1) % params.log_every_steps == 0:
            state.step_rows.append(
                {
                    "step": step + 1,
                    "epoch": epoch + 1,
                    "loss": loss,
                    "lr": float(lr),
                    "logit_scale": model.logit_scale.detach().exp().item(),
                    "seconds": time.perf_counter() - state.started,
                }
            )
    row = {
        "epoch": epoch + 1,
        "loss": float(np.mean(losses)),
        "lr": float(lr),
        "logit_scale": float(model.logit_scale.exp().item()),
        "seconds": time.perf_counter() - started,
    }
    state.log_rows.append(row)
    state.epoch = epoch + 1
    return row


def save_epoch(state: TrainState, params: TrainingParams, out_dir: Path, identity_hash: str) -> None:
    """Rank 0 after an epoch: its checkpoint if one is kept (the last is model.pt, below), and resume.pt."""
    epoch = state.epoch
    log.info(
        "epoch %(epoch)d loss %(loss).4f lr %(lr).2e logit_scale %(logit_scale).1f %(seconds).1fs", state.log_rows[-1]
    )
    if epoch in params.checkpoint_epochs() and epoch < params.epochs:
        save_checkpoint(
            out_dir / checkpoint_name(epoch, params.epochs),
            state.model,
            params.model,
            epoch=epoch,
            params=params.identity(),
        )
    save_checkpoint(
        out_dir / RESUME_FILE, state.model, params.model, **state.resume_fields(), identity_hash=identity_hash
    )


def _rows_table(rows: list[dict], contract) -> pl.DataFrame:
    """The log rows in the contract's types (a step log may have no rows)."""
    return pl.DataFrame(rows, schema=pl.from_arrow(contract.schema.empty_table()).schema)


def finish(state: TrainState, params: TrainingParams, processes: Processes, out_dir: Path) -> None:
    """Leave the process group; rank 0 writes model.pt and the logs, and removes the run's scratch files."""
    if processes.distributed:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    if not processes.is_master:
        return
    # Written after the loop, also when a rerun resumes at the last epoch (killed before model.pt).
    save_checkpoint(out_dir / "model.pt", state.model, params.model, epoch=params.epochs, params=params.identity())
    provenance = {**params.identity(), "world_size": processes.world_size}
    write_parquet(
        _rows_table(state.step_rows, TRAIN_STEPS),
        out_dir / STEPS_TABLE,
        stage="train",
        params={**provenance, "log_every_steps": params.log_every_steps},
        contract=TRAIN_STEPS,
    )
    write_parquet(
        _rows_table(state.log_rows, TRAIN_LOG),
        out_dir / "train_log.parquet",
        stage="train",
        params=provenance,
        contract=TRAIN_LOG,
    )
    (out_dir / RESUME_FILE).unlink(missing_ok=True)
    (out_dir / SIDE_TABLE).unlink(missing_ok=True)


def train(records_path: str, split_path: str, out_dir: str | Path, params: TrainingParams) -> None:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    processes = start_processes(params)
    side_table = side_data(records_path, split_path, out_dir, processes)
    model, preprocess, tokenizer = build_model(params, processes.device)
    data = SideBatches(side_table, preprocess, tokenizer, params.mask_ratio, params.seed)
    if len(data) < params.batch_size:
        raise DataError(f"{split_path}: {len(data)} records, fewer than one batch of {params.batch_size}")
    state = TrainState.create(model, params, processes, steps_per_epoch=len(data) // params.batch_size)
    identity_hash = params_hash(params.identity())
    saved = resume_state(out_dir / RESUME_FILE, identity_hash, params)
    if saved is not None:
        state.restore(saved)
        log.info("resuming %s after epoch %d", out_dir, state.epoch)
    if params.preload_images and state.epoch < params.epochs:
        data.preload()
    progress = tqdm(
        range(state.epoch, params.epochs),
        desc=f"training {out_dir}",
        unit="epoch",
        mininterval=2,
        disable=not processes.is_master,
    )
    state.started = time.perf_counter()
    for _ in progress:
        row = train_one_epoch(state, data, params, processes, out_dir)
        progress.set_postfix(loss=f"{row['loss']:.3f}", scale=f"{row['logit_scale']:.1f}")
        if processes.is_master:
            save_epoch(state, params, out_dir, identity_hash)
    finish(state, params, processes, out_dir)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train one OpenCLIP model on one split side.")
    parser.add_argument("--records", required=True, help="records Parquet of the training pool")
    parser.add_argument("--split", required=True, help="Parquet with the ids of this side (A or B)")
    parser.add_argument("--out-dir", required=True, help="folder for model.pt and train_log.parquet")
    add_dataclass_arguments(parser, TrainingParams)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    train(args.records, args.split, args.out_dir, dataclass_from_args(TrainingParams, args))


if __name__ == "__main__":
    main()
