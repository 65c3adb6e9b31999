"""OpenCLIP model creation, device choice and checkpoints, shared by training and embedding.

A model is named as open_clip names it: a built-in or registered architecture
(`ViT-B-32`, or `dejavu-vit-tiny` from workflow_scripts/model_configs),
`hf-hub:ORG/REPO` (how most LAION and DataComp models are published) or
`local-dir:PATH` (a folder holding open_clip_config.json and the weights).

Checkpoint contract (`model.pt`, one format for trained and imported models):
`model_name` (the name above), `state_dict`, and `open_clip_config`, open_clip's
own hub/local-dir config `{"model_cfg": ..., "preprocess_cfg": ...}`, so the
exact architecture (QuickGELU included) and the image preprocessing (mean/std,
resize mode, interpolation) come back without the source; plus the writer's
metadata (`epoch`, `params`, ...). `load_checkpoint` is the one reader: it hands
the file to open_clip's own builder and weight loader (with their conversions).
It also reads open_clip_train checkpoints, whose architecture the caller names.

`python -m workflow_scripts.models import` turns a model published or trained
elsewhere into this format, so the one-model test can audit it: an `hf-hub:` or
`local-dir:` name, an architecture with a pretrained tag (downloaded), or an
architecture with a weights file (optionally with the tag those weights belong
to, whose preprocessing and QuickGELU setting then apply).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import open_clip
import torch

from workflow_scripts.cli import LOG_FORMAT
from workflow_scripts.io import atomic_path

log = logging.getLogger(__name__)

# The small architectures the embedded default trains on the CPU live beside
# this file; registering the folder makes them ordinary open_clip model names.
MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
open_clip.add_model_config(MODEL_CONFIG_DIR)
SCHEMAS = ("hf-hub:", "local-dir:")  # open_clip names that carry their own config, weights and preprocessing


class DeviceError(RuntimeError):
    pass


class PretrainedUnavailableError(RuntimeError):
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
            raise DeviceError(
                f"device {device!r} was requested but no GPU is visible "
                f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})"
            )
        log.warning("device %r requested but no GPU is visible: falling back to the CPU", device)
        return torch.device("cpu")
    return torch.device(device)


def unavailable_weights_message(what: str, error: Exception, alternative: str) -> str:
    """Why weights did not load, and what to do: they download on first use, which needs the hub."""
    offline = " HF_HUB_OFFLINE=1 is set." if os.environ.get("HF_HUB_OFFLINE") == "1" else ""
    return (
        f"cannot load {what}: {error}.{offline} Weights are downloaded on first use: run on a machine "
        f"that can reach the hub, or {alternative}."
    )


def model_config(model_name: str) -> dict:
    """open_clip's architecture config for a name (built-in, registered, hf-hub: or local-dir:)."""
    try:
        config = open_clip.get_model_config(model_name)
    except (OSError, RuntimeError, ValueError) as error:  # hub unreachable, folder without open_clip_config.json
        raise PretrainedUnavailableError(
            unavailable_weights_message(
                f"the open_clip config of {model_name!r}", error, "give a local-dir: folder with open_clip_config.json"
            )
        ) from error
    if config is None:
        raise ValueError(
            f"unknown open_clip model {model_name!r}: not a built-in or registered architecture "
            f"(custom configs are read from {MODEL_CONFIG_DIR}), nor an hf-hub: or local-dir: name"
        )
    return config


def create_model(model_name: str, device: torch.device, pretrained: str | None = None, **model_kwargs):
    """Return (model, preprocess_val, tokenizer) for an open_clip model name (weights of schema names included)."""
    model_config(model_name)  # a clear error for unknown names before open_clip's long one
    model, _, preprocess = open_clip.create_model_and_transforms(
        model_name, pretrained=pretrained, device=device, **model_kwargs
    )
    return model, preprocess, open_clip.get_tokenizer(model_name)


def save_checkpoint(
    path: str | os.PathLike, model: torch.nn.Module, model_name: str, model_cfg: dict | None = None, **extra: Any
) -> None:
    """Save the weights with the open_clip config that rebuilds them (see the module docstring); plain types only,
    so the file loads with `torch.load(weights_only=True)`. `model_cfg` defaults to the name's config."""
    open_clip_config = {
        "model_cfg": model_cfg if model_cfg is not None else model_config(model_name),
        "preprocess_cfg": dict(model.visual.preprocess_cfg),
    }
    state = {"model_name": model_name, "open_clip_config": open_clip_config, "state_dict": model.state_dict(), **extra}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: str | os.PathLike, device: torch.device, model_name: str | None = None):
    """Load a checkpoint written by this workflow or by open_clip_train through open_clip's own loader.

    The stored open_clip config and a link to the file form a `local-dir:` folder that
    open_clip builds and loads (its `module.` stripping and state-dict conversions
    included). open_clip_train checkpoints ({'epoch', 'name', 'state_dict', ...}) carry
    no config: `model_name` names the architecture (its default preprocessing applies).
    Returns (model, preprocess_val, tokenizer, checkpoint metadata).
    """
    path = Path(path).resolve()
    # Memory-mapped: only the metadata is read here; open_clip reads the weights below.
    checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    name = model_name or checkpoint.get("model_name")
    if name is None:
        raise ValueError(f"{path}: checkpoint does not name its architecture; pass the open_clip model name")
    config = checkpoint.get("open_clip_config") or {"model_cfg": model_config(name)}
    metadata = {key: value for key, value in checkpoint.items() if key not in ("state_dict", "optimizer")}
    with tempfile.TemporaryDirectory(prefix="open_clip_checkpoint_") as folder:
        (Path(folder) / "open_clip_config.json").write_text(json.dumps(config))
        (Path(folder) / "open_clip_pytorch_model.bin").symlink_to(path)
        model, _, preprocess = open_clip.create_model_and_transforms(
            f"local-dir:{folder}", device=device, require_pretrained=True
        )
        # A tokenizer the config names (hf_tokenizer_name) comes from the source; open_clip's simple one from the config.
        uses_hf_tokenizer = bool(config["model_cfg"].get("text_cfg", {}).get("hf_tokenizer_name"))
        tokenizer = open_clip.get_tokenizer(name if uses_hf_tokenizer else f"local-dir:{folder}")
    model.eval()
    return model, preprocess, tokenizer, metadata


def import_target(
    out_path: str | os.PathLike, model_name: str, pretrained: str | None = None, checkpoint: str | None = None
) -> None:
    """Write an external model as a checkpoint of this workflow, exactly as open_clip builds the published model.

    - `hf-hub:`/`local-dir:` names: config, preprocessing and weights from the source (no tag, no file).
    - an architecture with a pretrained tag: the tag's weights (downloaded), preprocessing and QuickGELU.
    - an architecture with a weights file: the file's weights; with a tag too, the tag's preprocessing and QuickGELU.
    """
    schema_name = model_name.startswith(SCHEMAS)
    if schema_name and (pretrained or checkpoint):
        raise ValueError(f"{model_name!r} carries its own weights: give no pretrained tag or checkpoint")
    if not schema_name and not (pretrained or checkpoint):
        raise ValueError(f"{model_name!r}: give a pretrained tag, a checkpoint file, or both")
    tag = open_clip.get_pretrained_cfg(model_name, pretrained) if pretrained else {}
    if pretrained and not tag:
        raise ValueError(
            f"{model_name!r} has no pretrained tag {pretrained!r}; "
            f"known: {open_clip.list_pretrained_tags_by_model(model_name)}"
        )
    model_cfg = model_config(model_name)
    # open_clip only warns when a tag trained with QuickGELU is built on a GELU config (ViT-B-32 + openai,
    # laion400m_*, metaclip_*): the published model is the QuickGELU one.
    quick_gelu = bool(tag.get("quick_gelu", model_cfg.get("quick_gelu", False)))
    model_cfg["quick_gelu"] = quick_gelu
    preprocess = {key: tag.get(key) for key in ("mean", "std", "interpolation", "resize_mode")}
    try:
        model, _, _ = create_model(
            model_name,
            torch.device("cpu"),
            pretrained=checkpoint or pretrained,
            force_quick_gelu=quick_gelu,
            require_pretrained=True,
            **{f"image_{key}": value for key, value in preprocess.items()},
        )
    except (OSError, RuntimeError, ValueError) as error:
        raise PretrainedUnavailableError(
            unavailable_weights_message(
                f"open_clip {model_name!r}" + (f" with pretrained={pretrained!r}" if pretrained else ""),
                error,
                "download them there and give the file as `checkpoint` (with the tag as `pretrained`), "
                "or give a local-dir: folder",
            )
        ) from error
    source = {key: value for key, value in (("pretrained", pretrained), ("checkpoint", checkpoint)) if value}
    save_checkpoint(out_path, model, model_name, model_cfg=model_cfg, epoch=None, params={"imported": True, **source})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Model utilities.")
    commands = parser.add_subparsers(dest="command", required=True)
    imported = commands.add_parser("import", help="an external model as a checkpoint of this workflow")
    imported.add_argument("--model", required=True, help="open_clip architecture, hf-hub:ORG/REPO or local-dir:PATH")
    imported.add_argument("--pretrained", help="open_clip pretrained tag (downloaded unless --checkpoint is given)")
    imported.add_argument("--checkpoint", help="weights file (open_clip's, open_clip_train's or this workflow's)")
    imported.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    import_target(args.out, args.model, args.pretrained, args.checkpoint)


if __name__ == "__main__":
    main()
