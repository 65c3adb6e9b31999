"""Parameters of the crop classifier (`python -m workflow_scripts.ssl.crop_classifier train|predict`), each a --flag.

The defaults train the embedded default on a CPU: the small CNN at 32 pixels. The paper's reference
(Kokhlikyan et al., NeurIPS 2024, DejaVuOSS: a ResNet-50 that predicts the foreground label from the
periphery crop) is the same code with `backbone: resnet50` and `image_size: 224`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from workflow_scripts.ssl.params import BACKBONES, PRECISIONS
from workflow_scripts.training.params import TrainingParams


@dataclass(frozen=True)
class CropClassifierParams:
    backbone: str = "tiny_cnn"  # tiny_cnn | resnet18 | resnet50 (torchvision, random init)
    image_size: int = 32  # the training views' and the evaluation transform's side in pixels
    epochs: int = 30
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 20
    min_scale: float = 0.5  # RandomResizedCrop's smallest area share of the crop
    seed: int = 0
    precision: str = "amp_bf16"  # on a GPU (fp32 on the CPU): fp32 | amp (fp16 with loss scaling) | amp_bf16
    grad_clip_norm: float | None = None
    save_epochs: str = ""  # extra checkpoint epochs, comma-separated (the last is always kept)
    device: str = "auto"
    allow_cpu_fallback: bool = True
    threads: int = 1
    num_workers: int = 0
    preload_images: bool = True  # decode every crop once (raw pixels in memory): crops are small

    # No gradient accumulation (the batch norms see the whole batch); train.start_processes checks the batch.
    accumulation_steps: ClassVar[int] = 1

    def __post_init__(self):
        for name, value, allowed in (("backbone", self.backbone, BACKBONES), ("precision", self.precision, PRECISIONS)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, not {value!r}")
        if self.batch_size < 2 or self.epochs < 1 or self.image_size < 1:
            raise ValueError(
                f"batch_size must be at least 2 (batch norms), epochs and image_size at least 1 "
                f"({self.batch_size}, {self.epochs}, {self.image_size})"
            )
        if not 0 < self.min_scale <= 1:
            raise ValueError(f"min_scale must lie in (0, 1], not {self.min_scale}")
        self.checkpoint_epochs()

    # The CLIP trainer's: `save_epochs` plus the last; the fields that change the weights (its
    # EXECUTION_SETTINGS left out, so device, threads, loader and checkpoint choices keep a resume file).
    checkpoint_epochs = TrainingParams.checkpoint_epochs
    identity = TrainingParams.identity
