"""Train one self-supervised image model (VICReg, Barlow Twins, SimCLR or BYOL) on a set of training ids.

`python -m workflow_scripts.ssl.train --records R --ids A.parquet --ids shared.parquet --out-dir RUN [flags]`
writes RUN/model.pt, RUN/model_epoch{e}.pt for the `save_epochs` (so shorter parameter points reuse the run)
and RUN/train_log.parquet; RUN/resume.pt and the memory-mapped image table while it runs.

lightly gives the heads (workflow_scripts.ssl.models), the augmentations (workflow_scripts.ssl.data) and the
losses: VICRegLoss, BarlowTwinsLoss, NTXentLoss (SimCLR) and NegativeCosineSimilarity (BYOL, whose target
encoder follows the online one with a momentum that rises from `momentum` to 1 on a cosine). The rest is the
CLIP trainer's (workflow_scripts.train and workflow_scripts.training): its process set-up (one process, or
one per GPU under torchrun or srun with DistributedDataParallel; the losses then gather the batch across
the processes and, on GPUs, the batch norms synchronise), TrainState with its AdamW (open_clip_train's weight-decay
rule), open_clip_train's cosine schedule with warmup and autocast, the gradient step with optional
clipping, the epoch batches, resume.pt and its checks.

A NaN or infinite loss stops the job naming the epoch and step; no model file is written. A killed run
resumes from resume.pt after its last finished epoch and ends with the weights an uninterrupted run has
(the batches and the views are functions of the seed, the epoch and the row).
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch
from lightly.loss import BarlowTwinsLoss, NegativeCosineSimilarity, NTXentLoss, VICRegLoss
from lightly.utils.scheduler import cosine_schedule
from tqdm import tqdm

from workflow_scripts.cli import LOG_FORMAT, add_dataclass_arguments, dataclass_from_args
from workflow_scripts.contracts import SSL_TRAIN_LOG
from workflow_scripts.io import DataError, params_hash, write_parquet
from workflow_scripts.ssl.data import ViewBatches, view_transform, write_image_table
from workflow_scripts.ssl.models import SSLModel, build_model, save_ssl_checkpoint
from workflow_scripts.ssl.params import SSLTrainingParams
from workflow_scripts.train import TrainingDiverged, start_processes
from workflow_scripts.training.data import SIDE_TABLE, epoch_batches
from workflow_scripts.training.optim import apply_gradients, global_mean
from workflow_scripts.training.state import RESUME_FILE, Processes, TrainState, checkpoint_name, resume_state

__all__ = ["SSLTrainingParams", "TrainingDiverged", "main", "train", "train_one_epoch"]

log = logging.getLogger(__name__)


def make_loss(params: SSLTrainingParams, distributed: bool) -> torch.nn.Module:
    """lightly's loss of the method; under several processes it gathers the batch from all of them."""
    if params.method == "vicreg":
        return VICRegLoss(gather_distributed=distributed)
    if params.method == "barlowtwins":
        return BarlowTwinsLoss(gather_distributed=distributed)
    if params.method == "simclr":
        return NTXentLoss(temperature=params.temperature, gather_distributed=distributed)
    return NegativeCosineSimilarity()  # byol: each process's predictions against its own targets


def wait_for_all(processes: Processes) -> None:
    """Under several processes, wait until every one gets here."""
    if processes.distributed:
        torch.distributed.barrier()


def image_data(records_path: str, id_paths: list[str], out_dir: Path, processes: Processes) -> Path:
    """The training ids' image table, written by rank 0 while the others wait."""
    table = out_dir / SIDE_TABLE
    if processes.is_master:
        write_image_table(records_path, id_paths, table)
    wait_for_all(processes)
    return table


def rng_states() -> dict:
    """torch's global generators' states. The views draw from their own seeded generators (ssl.data) and
    numpy's global one serves nothing else, so these are all the randomness a resumed run continues."""
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def pair_loss(state: TrainState, view_a: torch.Tensor, view_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the loss, averaged over the model's pairs; the spread of the first embeddings: their per-dimension
    standard deviation after L2 normalisation, averaged, which falls to 0 when the model collapses)."""
    with state.autocast():
        pairs = state.forward(view_a, view_b)
    loss = torch.stack([state.loss_fn(a.float(), b.float()) for a, b in pairs]).mean()
    spread = torch.nn.functional.normalize(pairs[0][0].detach().float(), dim=1).std(dim=0).mean()
    return loss, spread


def step_or_stop(state: TrainState, loss: float, params, where: str) -> None:
    """The optimizer step of a finite loss (its gradients computed); a NaN or infinite one stops the run."""
    if not math.isfinite(loss):
        raise TrainingDiverged(
            f"{where}: loss is {loss} at global step {state.step + 1}: training diverged, no model written "
            f"(lower lr, or clip with grad_clip_norm)"
        )
    apply_gradients(state.model, state.optimizer, state.scaler, params.grad_clip_norm, learned_temperature=False)


def train_step(state: TrainState, views, params: SSLTrainingParams, processes: Processes, where: str) -> list[float]:
    """One optimizer step on a batch of view pairs; returns [loss, spread], each averaged over the processes."""
    state.optimizer.zero_grad(set_to_none=True)
    loss, spread = pair_loss(state, *(view.to(processes.device, non_blocking=True) for view in views))
    state.scaler.scale(loss).backward()
    values = [global_mean(value.detach(), processes.distributed, processes.world_size) for value in (loss, spread)]
    step_or_stop(state, values[0], params, where)
    total_steps = state.steps_per_epoch * params.epochs
    state.model.update_momentum(cosine_schedule(state.step, total_steps, params.momentum, 1.0))
    return values


def train_one_epoch(
    state: TrainState, data: ViewBatches, params: SSLTrainingParams, processes: Processes, out_dir: Path
) -> dict:
    """Train epoch `state.epoch`; append its row to the state's log and return it."""
    epoch = state.epoch
    state.model.train()
    batches = epoch_batches(len(data), params.batch_size, epoch, params.seed, processes.rank, processes.world_size)
    loader_options = {"num_workers": params.num_workers, "pin_memory": processes.device.type == "cuda"}
    generator = torch.Generator().manual_seed(params.seed + epoch)  # the workers' base seed
    loader = torch.utils.data.DataLoader(data, batch_size=None, sampler=batches, generator=generator, **loader_options)
    started, values, lr = time.perf_counter(), [], float("nan")
    for step_in_epoch, views in enumerate(loader):
        state.step = epoch * state.steps_per_epoch + step_in_epoch
        lr = state.scheduler(state.step)
        values.append(
            train_step(state, views, params, processes, f"{out_dir}: epoch {epoch + 1}, step {step_in_epoch + 1}")
        )
    loss, spread = np.mean(values, axis=0)
    row = {"epoch": epoch + 1, "loss": float(loss), "lr": float(lr), "embedding_std": float(spread)}
    state.log_rows.append({**row, "seconds": time.perf_counter() - started})
    state.epoch = epoch + 1
    return state.log_rows[-1]


def save_epoch(state: TrainState, params: SSLTrainingParams, out_dir: Path, identity_hash: str) -> None:
    """Rank 0 after an epoch: its checkpoint if one is kept (the last is model.pt, in `finish`), and resume.pt."""
    epoch, identity = state.epoch, params.identity()
    log.info("epoch %(epoch)d loss %(loss).4f lr %(lr).2e std %(embedding_std).4f %(seconds).1fs", state.log_rows[-1])
    if epoch in params.checkpoint_epochs() and epoch < params.epochs:
        save_ssl_checkpoint(out_dir / checkpoint_name(epoch, params.epochs), state.model, identity, epoch=epoch)
    fields = {**state.resume_fields(), "rng": rng_states(), "identity_hash": identity_hash}
    save_ssl_checkpoint(out_dir / RESUME_FILE, state.model, identity, **fields)


def finish(state: TrainState, params: SSLTrainingParams, processes: Processes, out_dir: Path) -> None:
    """Rank 0 writes model.pt and the log and removes the run's scratch files; every process leaves the group."""
    if processes.is_master:
        # Written after the loop, also when a rerun resumes at the last epoch (killed before model.pt).
        save_ssl_checkpoint(out_dir / "model.pt", state.model, params.identity(), epoch=params.epochs)
        log_table = pl.DataFrame(state.log_rows, schema=SSL_TRAIN_LOG.polars())
        provenance = {**params.identity(), "world_size": processes.world_size}
        write_parquet(
            log_table, out_dir / "train_log.parquet", stage="ssl_train", params=provenance, contract=SSL_TRAIN_LOG
        )
        for scratch in (RESUME_FILE, SIDE_TABLE):
            (out_dir / scratch).unlink(missing_ok=True)
    wait_for_all(processes)
    if processes.distributed:
        torch.distributed.destroy_process_group()


def prepare(
    records_path: str, id_paths: list[str], out_dir: Path, params: SSLTrainingParams
) -> tuple[TrainState, ViewBatches, Processes]:
    """Processes, data, model and TrainState, continued from resume.pt when it holds this run's state."""
    processes = start_processes(params)  # seeds torch, sets the threads, joins the other processes
    data = ViewBatches(
        image_data(records_path, id_paths, out_dir, processes),
        view_transform(params),
        params.seed,
    )
    if len(data) < params.batch_size:
        raise DataError(f"{id_paths}: {len(data)} images, fewer than one batch of {params.batch_size}")
    model: SSLModel = build_model(params.method, params.backbone, params.identity()).to(processes.device)
    if processes.distributed and processes.device.type == "cuda":  # torch synchronises batch norms on GPUs only
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    state = TrainState.create(model, params, processes, steps_per_epoch=len(data) // params.batch_size)
    state.loss_fn = make_loss(params, processes.distributed)  # in place of create's ClipLoss
    saved = resume_state(out_dir / RESUME_FILE, params_hash(params.identity()), params)
    if saved is not None:
        state.restore(saved)
        restore_rng(saved["rng"])
        log.info("resuming %s after epoch %d", out_dir, state.epoch)
    return state, data, processes


def train(records_path: str, id_paths: list[str], out_dir: str | Path, params: SSLTrainingParams) -> None:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state, data, processes = prepare(records_path, id_paths, out_dir, params)
    if params.preload_images and state.epoch < params.epochs:
        data.preload()
    identity_hash = params_hash(params.identity())
    bar = {"desc": f"training {params.method} {out_dir}", "unit": "epoch", "mininterval": 2}
    with tqdm(total=params.epochs, initial=state.epoch, disable=not processes.is_master, **bar) as progress:
        while state.epoch < params.epochs:
            row = train_one_epoch(state, data, params, processes, out_dir)
            if processes.is_master:
                save_epoch(state, params, out_dir, identity_hash)
            progress.update()
            progress.set_postfix(loss=f"{row['loss']:.3f}", std=f"{row['embedding_std']:.3f}")
    finish(state, params, processes, out_dir)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", required=True, help="records Parquet holding the training images")
    parser.add_argument("--ids", action="append", required=True, help="split Parquet of training ids (repeatable)")
    parser.add_argument("--out-dir", required=True, help="folder for model.pt, checkpoints and train_log.parquet")
    add_dataclass_arguments(parser, SSLTrainingParams)
    args = vars(parser.parse_args(argv))
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    train(args["records"], args["ids"], args["out_dir"], dataclass_from_args(SSLTrainingParams, args))


if __name__ == "__main__":
    main()
