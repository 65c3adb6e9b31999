"""Published SSL image models as checkpoints the SSL test embeds with, offline; one loader for them and the trainer's.

Model names (`--model`, with an optional `--weights` file):

- `torchvision:ARCH` with `--weights` a state-dict file (.pth/.pt): a bare state dict or one wrapped under
  `state_dict` or `model`; a `module.` prefix (DataParallel/DDP) is stripped, no other. The classifier `fc` becomes
  Identity (its weights in the file are dropped, logged): the backbone gives the pooled features.
- `timm:NAME` (`vit_base_patch16_224.dino`): `timm.create_model(NAME, pretrained=True, num_classes=0)`, the
  weights from `--weights` or else from the Hugging Face cache (never the network); timm's pooled features.
- `hub:OWNER/REPO:REF/ENTRY` (`hub:facebookresearch/dino:main/dino_vitb16`): `torch.hub.load` of the folder
  torch caches the repo in (`OWNER_REPO_REF` under `torch.hub.get_dir()`), with the entry's own weights (its
  cache) or `--weights` loaded strictly. The backbone gives what the entry returns, but a Linear `fc` becomes
  Identity: barlowtwins' `resnet50` returns torchvision's ResNet with a random 1000-way `fc`.
- `checkpoint:PATH`: a checkpoint of workflow_scripts.ssl.train, copied unchanged (projector and backbone).
- `local-dir:PATH`: a folder with `ssl_model.json`, `{"model": <a name above>, "weights": <file in the folder>,
  "preprocess": {...}}`, and the weights.

Preprocessing, `{"resize", "crop", "mean", "std", "interpolation"}`: Resize (an int: the shorter side; [h, w]:
both) → CenterCrop → ToTensor → Normalize. torchvision and hub default to Resize 256, CenterCrop 224, ImageNet
mean/std, bilinear; timm's is its `resolve_data_config`'s (resize = floor(crop / crop_pct)); a `preprocess` dict
(the folder's, then `--preprocess`) overrides any key.

Checkpoint (`kind` "ssl_published"), plain types and tensors for `torch.load(weights_only=True)`: `{"kind",
"model", "weights", "source": torchvision|timm|hub, "architecture", "hub": {"repo", "ref", "entry", "folder"} or
None, "preprocess", "layers": ["backbone"], "feature_dim", "state_dict"}`. `load_ssl_encoder` rebuilds the
architecture at random initialisation (no download) and loads `state_dict` strictly.

`python -m workflow_scripts.ssl.published import --model NAME [--weights FILE] [--preprocess JSON] --out model.pt`
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import inspect
import json
import logging
import math
import os
import shutil
import sys
from pathlib import Path

import huggingface_hub
import timm
import torch
import torchvision
from lightly.transforms.utils import IMAGENET_NORMALIZE
from torch import nn
from torchvision import transforms

from workflow_scripts.cli import LOG_FORMAT
from workflow_scripts.io import atomic_path
from workflow_scripts.models import PretrainedUnavailableError, unavailable_weights_message
from workflow_scripts.ssl.models import LAYERS, load_ssl_checkpoint

log = logging.getLogger(__name__)
KIND = "ssl_published"
SOURCES = ("torchvision", "timm", "hub", "checkpoint", "local-dir")
PREPROCESS_KEYS = ("resize", "crop", "mean", "std", "interpolation")
IMAGENET = {key: list(IMAGENET_NORMALIZE[key]) for key in ("mean", "std")}
DEFAULT_PREPROCESS = {"resize": 256, "crop": 224, **IMAGENET, "interpolation": "bilinear"}
LOCAL_DIR_CONFIG = "ssl_model.json"


def preprocess_transform(preprocess: dict) -> transforms.Compose:
    """Resize → CenterCrop → ToTensor → Normalize, as the published evaluation transforms (and timm's) do."""
    resize, mode = preprocess["resize"], transforms.InterpolationMode(preprocess["interpolation"])
    return transforms.Compose(
        [
            transforms.Resize(resize if isinstance(resize, int) else list(resize), interpolation=mode),
            transforms.CenterCrop(preprocess["crop"]),
            transforms.ToTensor(),
            transforms.Normalize(preprocess["mean"], preprocess["std"]),
        ]
    )


def ssl_preprocess(image_size: int) -> dict:
    """The paper's evaluation transform (Resize 256, CenterCrop 224) scaled to the trainer's `image_size`."""
    return {**DEFAULT_PREPROCESS, "resize": round(image_size * 256 / 224), "crop": image_size}


def eval_transform(image_size: int) -> transforms.Compose:
    """The transform the SSL test embeds a trainer's model with (the training views' ImageNet normalisation)."""
    return preprocess_transform(ssl_preprocess(image_size))


def resolve_preprocess(published: dict, overrides: dict | None) -> dict:
    """`published` with `overrides` on top, checked here so a typo fails the import, not the embedding job."""
    unknown = sorted(set(overrides or {}) - set(PREPROCESS_KEYS))
    if unknown:
        raise ValueError(f"unknown preprocess key(s) {unknown}: known {list(PREPROCESS_KEYS)}")
    merged = {**published, **(overrides or {})}
    for key in ("resize", "crop"):
        value = merged[key]
        if not (isinstance(value, int) or (isinstance(value, (list, tuple)) and len(value) == 2)):
            raise ValueError(f"preprocess {key!r} must be an int or [height, width], not {value!r}")
        merged[key] = value if isinstance(value, int) else [int(side) for side in value]
    for key in ("mean", "std"):
        if len(merged[key]) != 3:
            raise ValueError(f"preprocess {key!r} needs 3 values (RGB), not {merged[key]!r}")
        merged[key] = [float(value) for value in merged[key]]
    transforms.InterpolationMode(merged["interpolation"])  # an unknown name fails here
    return merged


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The weights of a state-dict file: bare, or under "state_dict" or "model" (training scripts' checkpoints),
    with the "module." prefix DataParallel/DDP adds stripped."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise ValueError(f"{path}: not a state dict (name -> tensor), nor one under 'state_dict' or 'model'")
    return {key.removeprefix("module."): value for key, value in state.items()}


def load_strict(model: nn.Module, state_dict: dict, what: str) -> None:
    """load_state_dict(strict=True): a missing or extra weight means a different model than the one published."""
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as error:
        raise ValueError(f"{what}: the weights do not fit the architecture: {error}") from error


def torchvision_backbone(arch: str) -> nn.Module:
    """torchvision's ARCH at random initialisation with its classifier `fc` replaced by Identity."""
    if arch not in torchvision.models.list_models(module=torchvision.models):
        raise ValueError(f"unknown torchvision classification model {arch!r}")
    model = torchvision.models.get_model(arch, weights=None)
    if not isinstance(getattr(model, "fc", None), nn.Linear):
        raise ValueError(f"torchvision {arch!r} has no `fc` classifier to remove: use a ResNet/ResNeXt/RegNet")
    model.fc = nn.Identity()
    return model


def _import_torchvision(arch: str, weights: str | None) -> tuple[nn.Module, dict, dict]:
    if weights is None:
        raise ValueError(f"torchvision:{arch} needs a weights file (a state dict of the published model)")
    model, state = torchvision_backbone(arch), read_state_dict(weights)
    dropped = sorted(key for key in state if key.startswith("fc."))
    if dropped:
        log.info("%s: classifier weights %s dropped (the backbone ends at the pooled features)", weights, dropped)
    load_strict(model, {key: value for key, value in state.items() if key not in dropped}, f"{weights} ({arch})")
    return model, {"source": "torchvision", "architecture": arch, "hub": None}, DEFAULT_PREPROCESS


def timm_cfg(name: str) -> timm.models.PretrainedCfg:
    """timm's record of NAME's published weights (the default tag's when NAME has none)."""
    if not timm.is_model(name):
        raise ValueError(f"unknown timm model {name!r} (timm.list_models(pretrained=True) lists them)")
    cfg = timm.models.get_pretrained_cfg(name, allow_unregistered=False)
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        raise ValueError(f"timm {name!r} has no published weights: name a tag (timm.list_pretrained({name!r}))")
    return cfg


def _timm_cached_weights(name: str) -> str:
    """The file of NAME's published weights in the Hugging Face cache (or torch's, for URL-only weights)."""
    cfg = timm_cfg(name)
    repo, _, revision = (cfg.hf_hub_id or "").partition("@")
    filenames = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
    for filename in filenames if repo else []:
        path = huggingface_hub.try_to_load_from_cache(repo, filename, revision=revision or None)
        if isinstance(path, str):
            return path
    url_cache = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(cfg.url or "")
    if cfg.url and url_cache.is_file():
        return str(url_cache)
    cache = huggingface_hub.constants.HF_HUB_CACHE
    missing = f"{filenames[0]} of {repo} is not in the Hugging Face cache {cache}" if repo else f"no {url_cache}"
    command = f"python -c \"import timm; timm.create_model('{name}', pretrained=True)\""
    raise PretrainedUnavailableError(
        unavailable_weights_message(
            f"the weights of timm {name!r}",
            FileNotFoundError(missing),
            f"fill the cache on one (`{command}`) and copy its models--{repo.replace('/', '--')} folder into "
            f"{cache}, or give the weights file as `weights`",
        )
    )


@contextlib.contextmanager
def _timm_key_report():
    """timm loads non-strictly once it drops the classifier (num_classes=0 differs from the tag's) and only logs
    the weights it did not fill or use; collect those lines so the import can refuse them."""
    lines: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("timm.models._builder")
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _import_timm(name: str, weights: str | None) -> tuple[nn.Module, dict, dict]:
    cfg = timm_cfg(name)
    if weights is not None and not Path(weights).is_file():
        raise FileNotFoundError(f"weights file {weights} does not exist")
    file = weights or _timm_cached_weights(name)
    # A custom loader (ViT's .npz) reads only the published .npz; a cached or converted file is a state dict.
    overlay = {"file": file, "custom_load": bool(cfg.custom_load) and file.endswith(".npz")}
    with _timm_key_report() as lines:
        try:
            model = timm.create_model(name, pretrained=True, num_classes=0, pretrained_cfg_overlay=overlay)
        except RuntimeError as error:
            raise ValueError(f"{file}: the weights do not fit timm {name!r}: {error}") from error
    mismatched = [line for line in lines if line.startswith(("Missing keys", "Unexpected keys"))]
    if mismatched:
        raise ValueError(f"{file}: the weights do not fit timm {name!r}: {' '.join(mismatched)}")
    return model, {"source": "timm", "architecture": name, "hub": None}, timm_preprocess(model)


def timm_preprocess(model: nn.Module) -> dict:
    """timm's evaluation transform (transforms_imagenet_eval) from `resolve_data_config`, in this module's terms."""
    config = timm.data.resolve_data_config({}, model=model)
    _, height, width = config["input_size"]
    scale = [math.floor(side / config["crop_pct"]) for side in (height, width)]
    if config["crop_mode"] == "squash":
        resize = scale
    elif config["crop_mode"] == "center" and height == width:
        resize = scale[0]
    else:
        raise ValueError(f"timm preprocessing {config} (crop_mode {config['crop_mode']!r}) is not supported")
    crop = height if height == width else [height, width]
    mean_std = {key: list(config[key]) for key in ("mean", "std")}
    return {"resize": resize, "crop": crop, **mean_std, "interpolation": config["interpolation"]}


def parse_hub(name: str) -> dict:
    """OWNER/REPO:REF/ENTRY → its parts and the cache folder torch.hub names after them (a "/" of REF as "_")."""
    repo, _, ref_entry = name.partition(":")
    ref, _, entry = ref_entry.rpartition("/")
    owner, _, repo_name = repo.partition("/")
    if not (owner and repo_name and ref and entry) or "/" in repo_name:
        raise ValueError(f"hub:{name}: expected hub:OWNER/REPO:REF/ENTRY (hub:facebookresearch/dino:main/dino_vitb16)")
    return {"repo": repo, "ref": ref, "entry": entry, "folder": f"{owner}_{repo_name}_{ref.replace('/', '_')}"}


def hub_repo_dir(hub: dict) -> Path:
    """The repo's folder in this machine's torch hub cache; absent: how to fill it where the network is."""
    folder = Path(torch.hub.get_dir()) / hub["folder"]
    if not (folder / "hubconf.py").is_file():
        command = f"python -c \"import torch; torch.hub.load('{hub['repo']}:{hub['ref']}', '{hub['entry']}', trust_repo=True)\""
        raise PretrainedUnavailableError(
            unavailable_weights_message(
                f"torch hub {hub['repo']}:{hub['ref']}",
                FileNotFoundError(f"no hubconf.py in {folder}"),
                f"fill it on one with `{command}` and copy that machine's hub folder {hub['folder']} (and "
                f"checkpoints/, the entry's weights) into {folder.parent}",
            )
        )
    return folder


def _accepts_pretrained(repo_dir: Path, entry: str) -> bool:
    """Whether the entry takes `pretrained` (read from hubconf.py, imported as torch.hub imports it)."""
    sys.path.insert(0, str(repo_dir))
    try:
        spec = importlib.util.spec_from_file_location("hubconf", repo_dir / "hubconf.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(repo_dir))
    function = getattr(module, entry, None)
    if not callable(function):
        raise ValueError(f"{repo_dir / 'hubconf.py'} has no entry {entry!r}")
    return "pretrained" in inspect.signature(function).parameters


def hub_model(hub: dict, pretrained: bool) -> nn.Module:
    """The entry's model, with its published weights or (`pretrained` False, where the entry takes the argument)
    at random initialisation; a Linear `fc` replaced by Identity."""
    repo_dir = hub_repo_dir(hub)
    kwargs = {} if pretrained or not _accepts_pretrained(repo_dir, hub["entry"]) else {"pretrained": False}
    try:
        model = torch.hub.load(str(repo_dir), hub["entry"], source="local", **kwargs)
    except OSError as error:  # the entry's own download: URLError, HTTPError, a missing cache file
        what = f"the weights of torch hub {hub['repo']}:{hub['ref']} {hub['entry']!r}"
        raise PretrainedUnavailableError(
            unavailable_weights_message(what, error, f"copy its checkpoints/ into {torch.hub.get_dir()}")
        ) from error
    if isinstance(getattr(model, "fc", None), nn.Linear):
        log.info("torch hub %s: its Linear fc replaced by Identity (the pooled features)", hub["entry"])
        model.fc = nn.Identity()
    return model


def _import_hub(name: str, weights: str | None) -> tuple[nn.Module, dict, dict]:
    hub = parse_hub(name)
    model = hub_model(hub, pretrained=weights is None)
    if weights is not None:
        load_strict(model, read_state_dict(weights), f"{weights} ({hub['entry']})")
    return model, {"source": "hub", "architecture": hub["entry"], "hub": hub}, DEFAULT_PREPROCESS


IMPORTERS = {"torchvision": _import_torchvision, "timm": _import_timm, "hub": _import_hub}


def published_backbone(record: dict) -> nn.Module:
    """The recorded architecture at random initialisation (nothing downloaded), for its state_dict to fill."""
    if record["source"] == "torchvision":
        return torchvision_backbone(record["architecture"])
    if record["source"] == "timm":
        return timm.create_model(record["architecture"], pretrained=False, num_classes=0)
    return hub_model(record["hub"], pretrained=False)


def split_name(model: str) -> tuple[str, str]:
    source, sep, rest = model.partition(":")
    if not sep or source not in SOURCES or not rest:
        raise ValueError(f"model {model!r}: expected one of {', '.join(f'{source}:...' for source in SOURCES)}")
    return source, rest


def read_local_dir(folder: str, weights: str | None, preprocess: dict | None) -> tuple[str, str | None, dict]:
    """(model name, weights path, preprocess overrides) of a local-dir folder; `preprocess` overrides the folder's."""
    if weights:
        raise ValueError(f"local-dir:{folder} names its weights in {LOCAL_DIR_CONFIG}: give no weights file")
    config_path = Path(folder) / LOCAL_DIR_CONFIG
    if not config_path.is_file():
        raise FileNotFoundError(f"local-dir:{folder}: no {LOCAL_DIR_CONFIG} in the folder")
    config = json.loads(config_path.read_text())
    unknown = sorted(set(config) - {"model", "weights", "preprocess"})
    if unknown or "model" not in config:
        raise ValueError(f"{config_path}: needs 'model' (and optionally 'weights', 'preprocess'); unknown {unknown}")
    model = config["model"]
    source, rest = split_name(model)
    if source == "local-dir":
        raise ValueError(f"{config_path}: a local-dir folder cannot name another ({model!r})")
    if source == "checkpoint":
        model = f"checkpoint:{Path(folder) / rest}"  # relative to the folder, as the weights are
    weights = str(Path(folder) / config["weights"]) if config.get("weights") else None
    return model, weights, {**config.get("preprocess", {}), **(preprocess or {})}


def feature_dim(model: nn.Module, preprocess: dict, what: str) -> int:
    """The backbone's output width, from one forward pass: it must give pooled features, one row an image."""
    crop = preprocess["crop"]
    height, width = (crop, crop) if isinstance(crop, int) else crop
    with torch.no_grad():
        out = model.eval()(torch.zeros(2, 3, height, width))
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"{what}: the backbone returns {shape}, not a (batch, features) matrix of pooled features")
    return int(out.shape[1])


def import_ssl_target(
    out_path: str | os.PathLike, model: str, weights: str | None = None, preprocess: dict | None = None
) -> None:
    """Write a published SSL model as ONE checkpoint the SSL test can embed with offline (module docstring)."""
    name = model
    if model.startswith("local-dir:"):
        model, weights, preprocess = read_local_dir(split_name(model)[1], weights, preprocess)
    source, rest = split_name(model)
    if source == "checkpoint":
        if weights or preprocess:
            raise ValueError(f"{name!r} is copied unchanged: its weights and evaluation transform are the trainer's")
        load_ssl_checkpoint(rest, torch.device("cpu"))  # only a checkpoint its loader accepts is copied
        with atomic_path(out_path) as tmp:
            shutil.copyfile(rest, tmp)
        return
    backbone, spec, published = IMPORTERS[source](rest, weights)
    preprocess = resolve_preprocess(published, preprocess)
    record = {"kind": KIND, "model": name, "weights": weights, **spec, "preprocess": preprocess}
    record |= {"layers": ["backbone"], "feature_dim": feature_dim(backbone, preprocess, name)}
    record["state_dict"] = backbone.state_dict()
    load_strict(published_backbone(record), record["state_dict"], f"{name}: rebuilt at random initialisation")
    with atomic_path(out_path) as tmp:
        torch.save(record, tmp)
    what = f"{source} {spec['architecture']}, {record['feature_dim']} features"
    log.info("%s (%s), preprocess %s -> %s", name, what, preprocess, out_path)


def check_layer(metadata: dict, layer: str) -> None:
    """A published model is its backbone only: asking it for the projector is an error, not a silent backbone."""
    if layer in metadata["layers"]:
        return
    if metadata["kind"] == KIND:
        raise ValueError(f"{metadata['name']}: no layer {layer!r}: only `backbone` exists (imported without one)")
    raise ValueError(f"{metadata['name']}: no layer {layer!r}: its layers are {', '.join(metadata['layers'])}")


def load_ssl_encoder(path: str | os.PathLike, device: torch.device):
    """(encode(images, layer), the image transform, metadata) of a trainer's (kind "ssl") or an imported
    (kind "ssl_published") checkpoint, in eval mode on `device`; weights loaded strictly."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    kind = checkpoint.get("kind") if isinstance(checkpoint, dict) else type(checkpoint).__name__
    if kind == "ssl":
        model, metadata = load_ssl_checkpoint(path, device)
        image_size = int(metadata["params"]["image_size"])
        metadata |= {"name": f"checkpoint:{path}", "layers": list(LAYERS), "dims": dict(model.dims)}
        metadata["preprocess"] = ssl_preprocess(image_size)
        return model.encode, eval_transform(image_size), metadata
    if kind != KIND:
        raise ValueError(f"{path}: not an SSL checkpoint (kind {kind!r}: expected 'ssl' or {KIND!r})")
    model = published_backbone(checkpoint)
    load_strict(model, checkpoint["state_dict"], str(path))
    model = model.to(device).eval()
    metadata = {key: value for key, value in checkpoint.items() if key != "state_dict"}
    metadata |= {"name": checkpoint["model"], "dims": {"backbone": checkpoint["feature_dim"]}}

    def encode(images: torch.Tensor, layer: str) -> torch.Tensor:
        check_layer(metadata, layer)
        return model(images)

    return encode, preprocess_transform(checkpoint["preprocess"]), metadata


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    imported = commands.add_parser("import", help="a published SSL model as a checkpoint of the SSL test")
    names = "torchvision:ARCH, timm:NAME, hub:OWNER/REPO:REF/ENTRY, checkpoint:PATH or local-dir:PATH"
    imported.add_argument("--model", required=True, help=names)
    imported.add_argument("--weights", help="weights file (torchvision: required; timm, hub: instead of the cache's)")
    imported.add_argument("--preprocess", type=json.loads, help='JSON overrides, e.g. \'{"interpolation": "bicubic"}\'')
    imported.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    if args.preprocess is not None and not isinstance(args.preprocess, dict):
        parser.error("--preprocess must be a JSON object")
    import_ssl_target(args.out, args.model, args.weights, args.preprocess)


if __name__ == "__main__":
    main()
