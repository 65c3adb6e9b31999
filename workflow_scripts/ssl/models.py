"""SSL image models: a backbone and lightly's projection head (BYOL: also its predictor and momentum encoder).

Backbones (random initialisation): `tiny_cnn` (four stride-2 convolutions, 256 features: the embedded
default, trains on a CPU), torchvision's `resnet18` (512) and `resnet50` (2048) with the classifier removed.
Heads are lightly's, at `projector_hidden_dim` / `projector_output_dim`: VICReg's and Barlow Twins' three
layers, SimCLR's two, BYOL's projector and predictor.

`encode(images, layer)` gives the projector output (`projector`, the default) or the backbone's features
(`backbone`, "guillotine" regularisation: the layer SSL models are usually evaluated on).

Checkpoint (`model.pt`, `model_epoch{e}.pt`): `{"kind": "ssl", "method", "backbone", "state_dict", "epoch",
"params"}` with `params` the training parameters that shape the weights (SSLTrainingParams.identity: the
projector sizes and image_size among them); `resume.pt` adds the optimizer, loss scaler, RNG states and logs.
Plain types and tensors only: `load_ssl_checkpoint` reads it with `torch.load(weights_only=True)` and loads
the weights strictly.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import torch
import torchvision
from lightly.models.modules.heads import (
    BarlowTwinsProjectionHead,
    BYOLPredictionHead,
    BYOLProjectionHead,
    SimCLRProjectionHead,
    VICRegProjectionHead,
)
from lightly.models.utils import deactivate_requires_grad, update_momentum
from torch import nn

from workflow_scripts.io import atomic_path

LAYERS = ("projector", "backbone")
TINY_CNN_WIDTHS = (32, 64, 128, 256)
HEADS = {
    "vicreg": VICRegProjectionHead,
    "barlowtwins": BarlowTwinsProjectionHead,
    "simclr": SimCLRProjectionHead,
    "byol": BYOLProjectionHead,
}


def tiny_cnn() -> nn.Sequential:
    """Stride-2 3x3 convolutions with batch norm and ReLU, then global average pooling (64 px -> 4x4 -> 1)."""
    layers: list[nn.Module] = []
    for width_in, width_out in zip((3, *TINY_CNN_WIDTHS[:-1]), TINY_CNN_WIDTHS):
        layers += [nn.Conv2d(width_in, width_out, 3, 2, 1, bias=False), nn.BatchNorm2d(width_out), nn.ReLU(True)]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())


def make_backbone(name: str) -> tuple[nn.Module, int]:
    """(backbone, its feature width) for a backbone name of SSLTrainingParams."""
    if name == "tiny_cnn":
        return tiny_cnn(), TINY_CNN_WIDTHS[-1]
    if name in ("resnet18", "resnet50"):
        resnet = getattr(torchvision.models, name)(weights=None)
        width = resnet.fc.in_features
        resnet.fc = nn.Identity()
        return resnet, width
    raise ValueError(f"unknown backbone {name!r}: tiny_cnn, resnet18 or resnet50")


class SSLModel(nn.Module):
    """Backbone + projector; `forward(view_a, view_b)` returns the (prediction, target) pairs the loss compares."""

    def __init__(self, method: str, backbone: str, hidden_dim: int, output_dim: int):
        super().__init__()
        if method not in HEADS:
            raise ValueError(f"unknown method {method!r}: {', '.join(HEADS)}")
        self.method, self.backbone_name = method, backbone
        self.backbone, width = make_backbone(backbone)
        self.projector = HEADS[method](width, hidden_dim, output_dim)
        self.dims = {"backbone": width, "projector": output_dim}
        if method == "byol":
            self.predictor = BYOLPredictionHead(output_dim, hidden_dim, output_dim)
            self.backbone_momentum = copy.deepcopy(self.backbone)
            self.projector_momentum = copy.deepcopy(self.projector)
            deactivate_requires_grad(self.backbone_momentum)
            deactivate_requires_grad(self.projector_momentum)

    def encode(self, images: torch.Tensor, layer: str = "projector") -> torch.Tensor:
        if layer not in LAYERS:
            raise ValueError(f"layer must be one of {LAYERS}, not {layer!r}")
        features = self.backbone(images).flatten(1)
        return features if layer == "backbone" else self.projector(features)

    def forward(self, view_a: torch.Tensor, view_b: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if self.method != "byol":
            return [(self.encode(view_a), self.encode(view_b))]
        online = [self.predictor(self.encode(view)) for view in (view_a, view_b)]
        with torch.no_grad():
            target = [self.projector_momentum(self.backbone_momentum(view).flatten(1)) for view in (view_a, view_b)]
        return [(online[0], target[1]), (online[1], target[0])]  # BYOL's symmetrised loss

    def update_momentum(self, momentum: float) -> None:
        """BYOL: move the target encoder towards the online one (exponential moving average); others: nothing."""
        if self.method == "byol":
            update_momentum(self.backbone, self.backbone_momentum, momentum)
            update_momentum(self.projector, self.projector_momentum, momentum)


def build_model(method: str, backbone: str, params: dict) -> SSLModel:
    """The model that training parameters (SSLTrainingParams.identity, or a checkpoint's `params`) describe."""
    return SSLModel(method, backbone, int(params["projector_hidden_dim"]), int(params["projector_output_dim"]))


def save_ssl_checkpoint(path: str | os.PathLike, model: SSLModel, params: dict, **extra: Any) -> None:
    """Write the checkpoint contract (module docstring) atomically; `extra` holds `epoch` and, for resume.pt, more."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    state = {"kind": "ssl", "method": model.method, "backbone": model.backbone_name, "params": params, **extra}
    with atomic_path(path) as tmp:
        torch.save({**state, "state_dict": model.state_dict()}, tmp)


def load_ssl_checkpoint(path: str | os.PathLike, device: torch.device) -> tuple[SSLModel, dict]:
    """(the model in eval mode on `device`, the checkpoint's other fields); strict: every weight must match."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict) or checkpoint.get("kind") != "ssl":
        kind = checkpoint.get("kind") if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ValueError(f"{path}: not an SSL checkpoint of workflow_scripts.ssl.train (kind {kind!r})")
    model = build_model(checkpoint["method"], checkpoint["backbone"], checkpoint["params"])
    model.load_state_dict(checkpoint["state_dict"], strict=True)
    metadata = {key: value for key, value in checkpoint.items() if key not in ("state_dict", "optimizer")}
    return model.to(device).eval(), metadata
