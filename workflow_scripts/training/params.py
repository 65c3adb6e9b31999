"""Parameters of the training stage; their defaults are config.yaml's `training` block (tests/test_defaults.py)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

# Settings that choose where and how fast a model trains, not what it learns: left out of the identity, so
# changing them neither retrains a model nor discards a resume file.
EXECUTION_SETTINGS = frozenset(
    {
        "device",
        "allow_cpu_fallback",
        "threads",
        "num_workers",
        "preload_images",
        "save_epochs",
        "accumulation_steps",
        "grad_checkpointing",
        "log_every_steps",
    }
)


@dataclass(frozen=True)
class TrainingParams:
    model: str = "dejavu-vit-tiny"
    epochs: int = 40
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
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in EXECUTION_SETTINGS}
