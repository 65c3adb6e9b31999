"""Parameters of the SSL training stage (`python -m workflow_scripts.ssl.train`), each a --flag.

The defaults train the embedded default on a CPU: a small CNN with SimCLR on the synthetic scenes, at 32 pixels.
The paper's models (ResNet-50 with VICReg, Barlow Twins, SimCLR or BYOL at 224 pixels) are the same code
with `backbone: resnet50`, `image_size: 224` and the projector sizes of the method's paper.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from workflow_scripts.training.params import TrainingParams

METHODS = ("vicreg", "barlowtwins", "simclr", "byol")
BACKBONES = ("tiny_cnn", "resnet18", "resnet50")
PRECISIONS = ("fp32", "amp", "amp_bf16")


@dataclass(frozen=True)
class SSLTrainingParams:
    method: str = "simclr"  # vicreg | barlowtwins | simclr | byol
    backbone: str = "tiny_cnn"  # tiny_cnn | resnet18 | resnet50 (torchvision, random init)
    projector_hidden_dim: int = 512
    projector_output_dim: int = 128
    image_size: int = 32  # the views' side in pixels (lightly's input_size)
    # Augmentation strength (lightly's cj_prob, random_gray_scale, gaussian_blur, min_scale; the papers' are
    # 0.8, 0.2, 0.5 (VICReg, SimCLR; BYOL 1.0) and 0.08). The synthetic classes are colour-and-shape names:
    # colour jitter and grayscale would erase half of each.
    colour_jitter_prob: float = 0.0
    grayscale_prob: float = 0.0
    blur_prob: float = 0.5
    min_scale: float = 0.08
    epochs: int = 400
    save_epochs: str = ""  # extra checkpoint epochs, comma-separated (the last is always kept)
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 50
    temperature: float = 0.2  # simclr: NT-Xent temperature
    momentum: float = 0.99  # byol: the target encoder's momentum at step 0 (cosine to 1 at the end)
    seed: int = 0
    precision: str = "amp_bf16"  # on a GPU (fp32 on the CPU): fp32 | amp (fp16 with loss scaling) | amp_bf16
    grad_clip_norm: float | None = None
    device: str = "auto"
    allow_cpu_fallback: bool = True
    threads: int = 1
    num_workers: int = 0
    preload_images: bool = True  # decode every image once (raw pixels in memory): for data that fits

    # No gradient accumulation: VICReg's, Barlow Twins' and the projectors' batch statistics are those of the
    # whole batch. A class constant, not a flag; train.start_processes checks the batch against it.
    accumulation_steps: ClassVar[int] = 1

    def __post_init__(self):
        for name, value, allowed in (
            ("method", self.method, METHODS),
            ("backbone", self.backbone, BACKBONES),
            ("precision", self.precision, PRECISIONS),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, not {value!r}")
        if self.batch_size < 2:
            raise ValueError(f"batch_size must be at least 2 (batch statistics), not {self.batch_size}")
        if not 0 <= self.momentum < 1 or not self.temperature > 0:
            raise ValueError(
                f"momentum must lie in [0, 1) and temperature be positive ({self.momentum}, {self.temperature})"
            )
        self.checkpoint_epochs()

    # The CLIP trainer's: `save_epochs` plus the last; the fields that change the weights (its
    # EXECUTION_SETTINGS left out, so device, threads, loader and checkpoint choices keep a resume file).
    checkpoint_epochs = TrainingParams.checkpoint_epochs
    identity = TrainingParams.identity
