"""OpenCLIP model creation, device choice and checkpoints, shared by training and embedding.

`python -m workflow_scripts.models import` turns a model trained elsewhere into
this workflow's checkpoint format, so the one-model test can audit it without
retraining: an open_clip architecture with a `pretrained` tag (downloaded on a
machine that can), or a checkpoint file (ours, or open_clip_train's).
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any

import open_clip
import torch

from workflow_scripts.io import atomic_path

log = logging.getLogger(__name__)

# The small architectures the embedded default trains on the CPU live beside
# this file; registering the folder makes them ordinary open_clip model names.
MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
open_clip.add_model_config(MODEL_CONFIG_DIR)


class DeviceError(RuntimeError):
    pass


def select_device(device: str = "auto", allow_cpu_fallback: bool = True) -> torch.device:
    """Pick the device: 'auto' takes a visible GPU, else the CPU (with a log line).

    Asking for 'cuda' when none is visible is an error unless fallback is allowed.
    """
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        log.info("no GPU visible: running on the CPU")
        return torch.device("cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        if not allow_cpu_fallback:
            raise DeviceError(f"device {device!r} was requested but no GPU is visible "
                              f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})")
        log.warning("device %r requested but no GPU is visible: falling back to the CPU", device)
        return torch.device("cpu")
    return torch.device(device)


def create_model(model_name: str, device: torch.device, pretrained: str | None = None, **model_kwargs):
    """Return (model, preprocess_val, tokenizer) for an open_clip architecture name."""
    if model_name not in open_clip.list_models():
        raise ValueError(
            f"unknown open_clip model {model_name!r}; known: {', '.join(sorted(open_clip.list_models())[:8])}, ... "
            f"(custom configs are read from {MODEL_CONFIG_DIR})"
        )
    model, _, preprocess = open_clip.create_model_and_transforms(
        model_name, pretrained=pretrained, device=device, **model_kwargs
    )
    tokenizer = open_clip.get_tokenizer(model_name)
    return model, preprocess, tokenizer


def save_checkpoint(path: str | os.PathLike, model: torch.nn.Module, model_name: str, **extra: Any) -> None:
    """Save a state dict with plain metadata, loadable with `torch.load(weights_only=True)`."""
    state = {"model_name": model_name, "state_dict": model.state_dict(), **extra}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: str | os.PathLike, device: torch.device, model_name: str | None = None):
    """Load a checkpoint written by this workflow or by open_clip_train.

    open_clip_train stores {'epoch', 'name', 'state_dict', 'optimizer'} with a
    'module.' prefix when trained with DDP; the architecture then has to be
    named by the caller. Returns (model, preprocess_val, tokenizer, checkpoint).
    """
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    state_dict = checkpoint.get("state_dict", checkpoint)
    name = model_name or checkpoint.get("model_name")
    if name is None:
        raise ValueError(f"{path}: checkpoint does not name its architecture; pass the open_clip model name")
    if all(key.startswith("module.") for key in state_dict):
        state_dict = {key[len("module."):]: value for key, value in state_dict.items()}
    model, preprocess, tokenizer = create_model(name, device)
    model.load_state_dict(state_dict)
    model.eval()
    return model, preprocess, tokenizer, checkpoint


class PretrainedUnavailableError(RuntimeError):
    pass


def unavailable_weights_message(what: str, error: Exception, alternative: str) -> str:
    """Why weights did not load, and what to do: they download on first use, which needs the hub."""
    offline = " HF_HUB_OFFLINE=1 is set." if os.environ.get("HF_HUB_OFFLINE") == "1" else ""
    return (f"cannot load {what}: {error}.{offline} Weights are downloaded on first use: run on a machine "
            f"that can reach the hub, or {alternative}.")


def import_target(out_path: str | os.PathLike, model_name: str, pretrained: str | None = None,
                  checkpoint: str | None = None) -> None:
    """Write an external model (pretrained tag or checkpoint file) as a checkpoint of this workflow."""
    if (pretrained is None) == (checkpoint is None):
        raise ValueError("give exactly one of a pretrained tag or a checkpoint path")
    device = torch.device("cpu")
    if checkpoint is not None:
        model, _, _, _ = load_checkpoint(checkpoint, device, model_name)
        source = {"checkpoint": str(checkpoint)}
    else:
        try:
            model, _, _ = create_model(model_name, device, pretrained=pretrained)
        except (OSError, RuntimeError, ValueError) as error:
            raise PretrainedUnavailableError(unavailable_weights_message(
                f"open_clip {model_name!r} with pretrained={pretrained!r}", error,
                "download them there and give the file as `checkpoint`")) from error
        source = {"pretrained": pretrained}
    save_checkpoint(out_path, model, model_name, epoch=None, params={"imported": True, **source})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Model utilities.")
    commands = parser.add_subparsers(dest="command", required=True)
    imported = commands.add_parser("import", help="an external model as a checkpoint of this workflow")
    imported.add_argument("--model", required=True, help="open_clip architecture name")
    source = imported.add_mutually_exclusive_group(required=True)
    source.add_argument("--pretrained", help="open_clip pretrained tag (downloaded)")
    source.add_argument("--checkpoint", help="checkpoint file (this workflow's or open_clip_train's)")
    imported.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import_target(args.out, args.model, args.pretrained, args.checkpoint)


if __name__ == "__main__":
    main()
