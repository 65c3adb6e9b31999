"""What one training run carries from step to step (TrainState), the processes it runs in, and resume.pt.

Multi-GPU: launched by workflow_scripts.launch (torchrun on one node, srun over several), one process per
GPU trains with DistributedDataParallel; the global batch is split across the processes, ClipLoss gathers
features from all of them, and only rank 0 writes files.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from open_clip import ClipLoss
from open_clip_train.precision import get_autocast
from open_clip_train.scheduler import cosine_lr

from workflow_scripts.training.optim import make_optimizer
from workflow_scripts.training.params import TrainingParams

log = logging.getLogger(__name__)

RESUME_FILE = "resume.pt"  # the last finished epoch's full state, removed when training ends


@dataclass(frozen=True)
class Processes:
    """This process's place among the training processes."""

    device: torch.device
    rank: int
    world_size: int
    distributed: bool

    @property
    def is_master(self) -> bool:
        return self.rank == 0


@dataclass
class TrainState:
    """The model, its optimisation and the run's progress, handed to train_one_epoch and kept in resume.pt."""

    model: torch.nn.Module
    forward: Callable  # the model, or its DistributedDataParallel wrapper
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    scheduler: Callable[[int], float]  # global step -> learning rate (it sets the optimizer's)
    autocast: Callable
    loss_fn: torch.nn.Module
    steps_per_epoch: int
    epoch: int = 0  # epochs finished
    step: int = 0  # global step of the latest optimizer step
    log_rows: list[dict] = field(default_factory=list)
    step_rows: list[dict] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)  # the step log's seconds count from here

    @classmethod
    def create(
        cls, model: torch.nn.Module, params: TrainingParams, processes: Processes, steps_per_epoch: int
    ) -> TrainState:
        device = processes.device
        optimizer = make_optimizer(model, params.lr, params.weight_decay)
        scheduler = cosine_lr(optimizer, params.lr, params.warmup_steps, steps_per_epoch * params.epochs)
        autocast = get_autocast(params.precision if device.type == "cuda" else "fp32", device_type=device.type)
        scaler = torch.amp.GradScaler(device.type, enabled=params.precision == "amp" and device.type == "cuda")
        loss_fn = ClipLoss(local_loss=True, gather_with_grad=True, rank=processes.rank, world_size=processes.world_size)
        forward = model
        if processes.distributed:
            forward = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device] if device.type == "cuda" else None
            )
        return cls(model, forward, optimizer, scaler, scheduler, autocast, loss_fn, steps_per_epoch)

    def restore(self, saved: dict) -> None:
        """Continue from a resume.pt state (see `resume_state`)."""
        self.model.load_state_dict(saved["state_dict"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scaler.load_state_dict(saved["scaler"])
        self.epoch = int(saved["epoch"])
        self.step = self.epoch * self.steps_per_epoch
        self.log_rows, self.step_rows = list(saved["log_rows"]), list(saved["step_rows"])

    def resume_fields(self) -> dict:
        """What resume.pt holds beside the weights, as save_checkpoint's keyword arguments."""
        return {
            "epoch": self.epoch,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "log_rows": self.log_rows,
            "step_rows": self.step_rows,
        }


def checkpoint_name(epoch: int, final_epoch: int) -> str:
    return "model.pt" if epoch == final_epoch else f"model_epoch{epoch}.pt"


def resume_state(resume_path: Path, identity_hash: str, params: TrainingParams) -> dict | None:
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
    missing = [
        e
        for e in params.checkpoint_epochs()
        if e < params.epochs and e <= epoch and not (resume_path.parent / checkpoint_name(e, params.epochs)).exists()
    ]
    if missing:
        log.warning(
            "%s is at epoch %d but the checkpoint(s) of epoch(s) %s are missing: retraining from scratch",
            resume_path,
            epoch,
            missing,
        )
        return None
    return state
