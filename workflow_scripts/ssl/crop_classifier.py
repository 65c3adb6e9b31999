"""The crop classifier: the one-model SSL test's reference, a supervised model of the periphery crop's label.

Kokhlikyan et al. ("Measuring Déjà vu Memorization Efficiently", NeurIPS 2024; their DejaVuOSS) replace the second
SSL model by a classifier that predicts the foreground label from the periphery crop alone: trained on A's crops
(validated on B's), it learns what backgrounds say about objects in general, from other images than the target's.

`python -m workflow_scripts.ssl.crop_classifier train --records R --crops C --train-ids A.parquet
[--val-ids B.parquet] --out-dir RUN [flags of CropClassifierParams]` writes RUN/model.pt, RUN/model_epoch{e}.pt
for the `save_epochs` and RUN/train_log.parquet (CROP_CLASSIFIER_LOG: epoch, loss, train_accuracy, val_accuracy,
lr, seconds); RUN/resume.pt while it runs.

`python -m workflow_scripts.ssl.crop_classifier predict --model RUN/model.pt --records R --crops C
--predict IDS=OUT [--predict IDS2=OUT2 ...] --votes-k K [--batch-size --device --threads --allow-cpu-fallback]`
writes, per set, the softmax over the classes on each kept crop of IDS as an SSL_PREDICTIONS table
(workflow_scripts.ssl.predictions: the distribution as K votes), rows in the crops table's order; dropped crops
are left out and counted in the log.

Data: each kept crop (`drop_reason` null; its box in pixels, max exclusive) of the ids, cut from its image
(ssl.embed's `crop`); labels are the crops table's, the classes the training crops' labels in name order (a
validation crop of another label counts as wrong). Training views: RandomResizedCrop(image_size, scale=(min_scale,
1)), horizontal flip, ImageNet normalisation, drawn from a generator seeded by (seed, epoch, row)
(ssl.data.view_seeds): the same views whatever the batch, the workers, the processes or a resume. Validation and
predict take the evaluation transform ssl.embed embeds a trained model's crops with (ssl.published.eval_transform:
Resize 256/224 · size, CenterCrop). `preload_images` keeps every decoded crop in memory (the views come from the
same pixels either way).

Model: an SSL backbone (ssl.models.make_backbone: tiny_cnn, resnet18, resnet50; random init) and a linear head,
trained with cross-entropy. The rest is the CLIP trainer's, as ssl.train uses it: start_processes (one process,
or one per GPU under torchrun or srun through workflow_scripts.launch, with DistributedDataParallel), TrainState
with its AdamW and cosine schedule with warmup, autocast, clipping, the epoch batches, resume.pt and its checks.
A NaN or infinite loss stops the job naming the epoch and step (TrainingDiverged); no model file is written. A
killed run resumes after its last finished epoch and ends with an uninterrupted run's weights.

Checkpoint (model.pt, model_epoch{e}.pt): `{"kind": "crop_classifier", "backbone", "classes", "params", "epoch",
"state_dict"}`, `params` CropClassifierParams.identity; resume.pt adds the optimizer, scaler, RNG states and log.
Plain types and tensors: `load_classifier` reads it with `torch.load(weights_only=True)` and loads it strictly.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch
from lightly.transforms.utils import IMAGENET_NORMALIZE
from PIL import Image
from torch import nn
from torchvision import transforms
from tqdm import tqdm

from workflow_scripts.cli import LOG_FORMAT, add_dataclass_arguments, dataclass_from_args, keyed_files
from workflow_scripts.contracts import CROP_CLASSIFIER_LOG, CROPS, SSL_PREDICTIONS
from workflow_scripts.embed import embed_batches, select_records
from workflow_scripts.images import load_rgb, resolve_image_paths
from workflow_scripts.io import DataError, atomic_path, check_unique_ids, params_hash, write_parquet
from workflow_scripts.models import select_device
from workflow_scripts.ssl.classifier_params import CropClassifierParams
from workflow_scripts.ssl.data import view_seeds
from workflow_scripts.ssl.embed import BOX, SSLEmbedParams, crop, kept_crops
from workflow_scripts.ssl.models import make_backbone
from workflow_scripts.ssl.predictions import predictions_table
from workflow_scripts.ssl.published import eval_transform  # the transform ssl.embed embeds a trained model with
from workflow_scripts.ssl.train import restore_rng, rng_states, step_or_stop, wait_for_all
from workflow_scripts.train import TrainingDiverged, start_processes
from workflow_scripts.training.data import epoch_batches
from workflow_scripts.training.optim import global_mean
from workflow_scripts.training.state import RESUME_FILE, Processes, TrainState, checkpoint_name, resume_state

__all__ = ["CropClassifierParams", "TrainingDiverged", "load_classifier", "main", "predict", "train"]

log = logging.getLogger(__name__)
KIND, STAGE = "crop_classifier", "ssl_crop_classifier"


class CropClassifier(nn.Module):
    """Backbone + linear head: images [b, 3, S, S] -> logits [b, len(classes)]."""

    def __init__(self, backbone: str, classes: list[str]):
        super().__init__()
        self.backbone_name, self.classes = backbone, [str(name) for name in classes]
        self.backbone, width = make_backbone(backbone)
        self.head = nn.Linear(width, len(self.classes))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images).flatten(1))


def save_classifier(path: str | Path, model: nn.Module, params: dict, **extra) -> None:
    """Write the checkpoint (module docstring) atomically; `extra` holds `epoch` and, for resume.pt, more."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    state = {"kind": KIND, "backbone": model.backbone_name, "classes": model.classes, "params": params, **extra}
    with atomic_path(path) as tmp:
        torch.save({**state, "state_dict": model.state_dict()}, tmp)


def load_classifier(path: str | Path, device: torch.device) -> tuple[CropClassifier, dict]:
    """(the model in eval mode on `device`, the checkpoint's other fields); strict: every weight must match."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict) or checkpoint.get("kind") != KIND:
        kind = checkpoint.get("kind") if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ValueError(f"{path}: not a crop classifier checkpoint of {__name__} (kind {kind!r})")
    model = CropClassifier(checkpoint["backbone"], checkpoint["classes"])
    model.load_state_dict(checkpoint["state_dict"], strict=True)
    metadata = {key: value for key, value in checkpoint.items() if key not in ("state_dict", "optimizer")}
    return model.to(device).eval(), metadata


def crop_rows(records_path: str, crops_path: str, ids_path: str) -> pl.DataFrame:
    """The kept crops of the ids of `ids_path` (id, image_path, the box, label), in the crops table's order."""
    records = select_records(records_path, [ids_path])
    check_unique_ids(records["id"], ids_path)
    labels = CROPS.read(crops_path, ["id", "label"]).with_row_index("crop_row")
    check_unique_ids(labels["id"], crops_path)
    records = pl.DataFrame({"id": records["id"], "image_path": resolve_image_paths(records, records_path)})
    records = records.join(labels, on="id", how="left").sort("crop_row", nulls_last=True).drop("crop_row")
    kept = kept_crops(records, crops_path)  # refuses ids the table lacks and kept crops without a box
    unlabelled = kept.filter(pl.col("label").is_null())["id"]
    if len(unlabelled):
        raise DataError(
            f"{crops_path}: {len(unlabelled)} kept crop(s) without a label, e.g. {unlabelled.head(5).to_list()}"
        )
    return kept


def train_transform(params: CropClassifierParams) -> transforms.Compose:
    return transforms.Compose(
        [
            transforms.RandomResizedCrop(params.image_size, scale=(params.min_scale, 1.0)),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_NORMALIZE["mean"], IMAGENET_NORMALIZE["std"]),
        ]
    )


class CropBatches(torch.utils.data.Dataset):
    """Batches of crops: item (epoch, rows) -> (images [b, 3, S, S], label codes [b]; -1: not a class).

    An epoch draws each row's view from its (seed, epoch, row) generator; epoch None applies the transform as is.
    """

    def __init__(self, crops: pl.DataFrame, classes: list[str], transform, seed: int = 0):
        self.ids, self.paths = crops["id"].to_list(), crops["image_path"].to_list()
        self.boxes, self.classes = crops.select(BOX).rows(), list(classes)
        codes = crops["label"].replace_strict(self.classes, list(range(len(self.classes))), default=-1)
        self.codes = torch.from_numpy(codes.cast(pl.Int64).to_numpy().copy())
        self.transform, self.seed = transform, seed
        self.pixels: list[np.ndarray] | None = None  # preloaded crops, row order

    def __len__(self) -> int:
        return len(self.ids)

    def image(self, row: int) -> Image.Image:
        if self.pixels is not None:
            return Image.fromarray(self.pixels[row])
        return crop(load_rgb(self.paths[row], self.ids[row]), self.boxes[row], self.ids[row])

    def preload(self) -> None:
        """Decode every crop once; its raw pixels stay in memory."""
        rows = tqdm(range(len(self)), desc="decoding crops", unit="crop", mininterval=2)
        self.pixels = [np.asarray(self.image(row)) for row in rows]

    def view(self, row: int, epoch: int | None) -> torch.Tensor:
        """One crop through the transform; in an epoch from its own seed (the global generator left as it was)."""
        if epoch is None:
            return self.transform(self.image(row))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(view_seeds(self.seed, epoch, row)[0])
            return self.transform(self.image(row))

    def __getitem__(self, item: tuple[int | None, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, rows = item
        rows = np.sort(rows)
        return torch.stack([self.view(int(row), epoch) for row in rows]), self.codes[torch.from_numpy(rows)]


def make_loss() -> nn.Module:
    return nn.CrossEntropyLoss()


def loader(data: CropBatches, batches: list, params: CropClassifierParams, processes: Processes, seed: int):
    """A DataLoader over given batches; its workers' base seed from `seed`, not the global generator."""
    return torch.utils.data.DataLoader(
        data,
        batch_size=None,
        sampler=batches,
        num_workers=params.num_workers,
        pin_memory=processes.device.type == "cuda",
        generator=torch.Generator().manual_seed(seed),
    )


@torch.no_grad()
def accuracy(state: TrainState, data: CropBatches | None, params, processes: Processes) -> float | None:
    """The share of `data`'s crops whose most probable class is their label, over every process (None: no data)."""
    if data is None or not len(data):
        return None
    state.model.eval()
    rows = np.arange(len(data))[processes.rank :: processes.world_size]  # this process's share
    batches = [(None, rows[start : start + params.batch_size]) for start in range(0, len(rows), params.batch_size)]
    counts = torch.zeros(2, dtype=torch.float64, device=processes.device)  # right, seen
    for images, codes in loader(data, batches, params, processes, params.seed):
        with state.autocast():
            logits = state.model(images.to(processes.device, non_blocking=True))
        right = (logits.argmax(dim=1) == codes.to(processes.device)).sum()
        counts += torch.stack([right.double(), torch.tensor(len(codes), dtype=torch.float64, device=counts.device)])
    if processes.distributed:
        torch.distributed.all_reduce(counts)
    return float(counts[0] / counts[1])


def train_step(state: TrainState, images, codes, params, processes: Processes, where: str) -> list[float]:
    """One optimizer step on a batch; returns [loss, accuracy], each averaged over the processes."""
    state.optimizer.zero_grad(set_to_none=True)
    images, codes = images.to(processes.device, non_blocking=True), codes.to(processes.device, non_blocking=True)
    with state.autocast():
        logits = state.forward(images)
    loss = state.loss_fn(logits.float(), codes)
    state.scaler.scale(loss).backward()
    right = (logits.detach().argmax(dim=1) == codes).float().mean()
    values = [global_mean(value.detach(), processes.distributed, processes.world_size) for value in (loss, right)]
    step_or_stop(state, values[0], params, where)
    return values


def train_one_epoch(
    state: TrainState,
    data: CropBatches,
    params: CropClassifierParams,
    processes: Processes,
    out_dir: Path,
    val: CropBatches | None = None,
) -> dict:
    """Train epoch `state.epoch`, then validate on `val`; append its row to the state's log and return it."""
    epoch = state.epoch
    state.model.train()
    batches = epoch_batches(len(data), params.batch_size, epoch, params.seed, processes.rank, processes.world_size)
    started, values, lr = time.perf_counter(), [], float("nan")
    for step_in_epoch, (images, codes) in enumerate(loader(data, batches, params, processes, params.seed + epoch)):
        state.step = epoch * state.steps_per_epoch + step_in_epoch
        lr = state.scheduler(state.step)
        where = f"{out_dir}: epoch {epoch + 1}, step {step_in_epoch + 1}"
        values.append(train_step(state, images, codes, params, processes, where))
    loss, train_accuracy = np.mean(values, axis=0)
    row = {"epoch": epoch + 1, "loss": float(loss), "train_accuracy": float(train_accuracy)}
    row |= {"val_accuracy": accuracy(state, val, params, processes), "lr": float(lr)}
    state.log_rows.append({**row, "seconds": time.perf_counter() - started})
    state.epoch = epoch + 1
    return state.log_rows[-1]


def save_epoch(state: TrainState, params: CropClassifierParams, out_dir: Path, run_hash: str) -> None:
    """Rank 0 after an epoch: its checkpoint if one is kept (the last is model.pt, in `finish`), and resume.pt."""
    epoch, identity, row = state.epoch, params.identity(), state.log_rows[-1]
    val = "-" if row["val_accuracy"] is None else f"{row['val_accuracy']:.3f}"
    log.info(
        "epoch %d loss %.4f accuracy %.3f val %s lr %.2e %.1fs",
        *(row[name] for name in ("epoch", "loss", "train_accuracy")),
        val,
        row["lr"],
        row["seconds"],
    )
    if epoch in params.checkpoint_epochs() and epoch < params.epochs:
        save_classifier(out_dir / checkpoint_name(epoch, params.epochs), state.model, identity, epoch=epoch)
    fields = {**state.resume_fields(), "rng": rng_states(), "identity_hash": run_hash}
    save_classifier(out_dir / RESUME_FILE, state.model, identity, **fields)


def finish(state: TrainState, params, processes: Processes, out_dir: Path, provenance: dict) -> None:
    """Rank 0 writes model.pt and the log and removes resume.pt; every process leaves the group."""
    if processes.is_master:
        # Written after the loop, also when a rerun resumes at the last epoch (killed before model.pt).
        save_classifier(out_dir / "model.pt", state.model, params.identity(), epoch=params.epochs)
        log_table = pl.DataFrame(state.log_rows, schema=CROP_CLASSIFIER_LOG.polars())
        provenance = {**params.identity(), **provenance, "world_size": processes.world_size}
        write_parquet(
            log_table, out_dir / "train_log.parquet", stage=STAGE, params=provenance, contract=CROP_CLASSIFIER_LOG
        )
        (out_dir / RESUME_FILE).unlink(missing_ok=True)
    wait_for_all(processes)
    if processes.distributed:
        torch.distributed.destroy_process_group()


def crop_sets(records_path, crops_path, train_ids, val_ids, params) -> tuple[CropBatches, CropBatches | None]:
    """The training crops (augmented views) and the validation crops (evaluation transform), coded alike."""
    crops = crop_rows(records_path, crops_path, train_ids)
    classes = sorted(set(crops["label"].to_list()))
    data = CropBatches(crops, classes, train_transform(params), params.seed)
    if len(data) < params.batch_size:
        raise DataError(f"{train_ids}: {len(data)} kept crops, fewer than one batch of {params.batch_size}")
    if val_ids is None:
        return data, None
    val = CropBatches(crop_rows(records_path, crops_path, val_ids), classes, eval_transform(params.image_size))
    unknown = int((val.codes < 0).sum())
    if unknown:
        log.warning("%s: %d of %d validation crop(s) of a label no training crop has", val_ids, unknown, len(val))
    return data, val


def prepare(records_path, crops_path, train_ids, val_ids, out_dir: Path, params: CropClassifierParams):
    """(TrainState, training data, validation data, Processes, the run's hash), continued from resume.pt when it
    holds this run's state (the same identity, classes and number of training crops)."""
    processes = start_processes(params)  # seeds torch, sets the threads, joins the other processes
    data, val = crop_sets(records_path, crops_path, train_ids, val_ids, params)
    model = CropClassifier(params.backbone, data.classes).to(processes.device)
    if processes.distributed and processes.device.type == "cuda":  # torch synchronises batch norms on GPUs only
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    state = TrainState.create(model, params, processes, steps_per_epoch=len(data) // params.batch_size)
    state.loss_fn = make_loss()  # in place of create's ClipLoss
    run_hash = params_hash({**params.identity(), "classes": model.classes, "train_crops": len(data)})
    saved = resume_state(out_dir / RESUME_FILE, run_hash, params)
    if saved is not None:
        state.restore(saved)
        restore_rng(saved["rng"])
        log.info("resuming %s after epoch %d", out_dir, state.epoch)
    return state, data, val, processes, run_hash


def train(
    records_path: str,
    crops_path: str,
    train_ids: str,
    out_dir: str | Path,
    params: CropClassifierParams,
    val_ids: str | None = None,
) -> None:
    """Train on the kept crops of `train_ids`, validating on those of `val_ids` after each epoch (module docstring)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state, data, val, processes, run_hash = prepare(records_path, crops_path, train_ids, val_ids, out_dir, params)
    if params.preload_images and state.epoch < params.epochs:
        for crops in (data, val) if val is not None else (data,):
            crops.preload()
    bar = {"desc": f"training crop classifier {out_dir}", "unit": "epoch", "mininterval": 2}
    with tqdm(total=params.epochs, initial=state.epoch, disable=not processes.is_master, **bar) as progress:
        while state.epoch < params.epochs:
            row = train_one_epoch(state, data, params, processes, out_dir, val)
            if processes.is_master:
                save_epoch(state, params, out_dir, run_hash)
            progress.update()
            score = row["val_accuracy"]
            progress.set_postfix(loss=f"{row['loss']:.3f}", val="-" if score is None else f"{score:.3f}")
    inputs = {"records": records_path, "crops": crops_path, "train_ids": train_ids, "val_ids": val_ids}
    finish(state, params, processes, out_dir, {**inputs, "n_classes": len(data.classes), "train_crops": len(data)})


def probabilities(model: CropClassifier, data: CropBatches, batch_size: int, device: torch.device, desc: str):
    """[len(data), classes] float64 softmax rows, each summing to 1, through embed_batches: the square roots of a
    distribution are a unit vector, which its L2 normalisation leaves as they are."""
    if not len(data):
        return np.zeros((0, len(model.classes)))

    def encode(images: torch.Tensor) -> torch.Tensor:
        return torch.softmax(model(images).float(), dim=1).sqrt()

    def prepare_batch(rows: list[int]) -> torch.Tensor:
        return torch.stack([data.view(row, None) for row in rows])

    roots = embed_batches(encode, list(range(len(data))), prepare_batch, batch_size, device, desc)
    squares = roots.astype(np.float64) ** 2
    return squares / squares.sum(axis=1, keepdims=True)


def predict(
    model_path: str,
    records_path: str,
    crops_path: str,
    sets: dict[str, str],
    votes_k: int,
    params: SSLEmbedParams | None = None,
) -> None:
    """Write each {ids file: output} set's SSL_PREDICTIONS table on its kept crops, the model loaded once."""
    params = params or SSLEmbedParams()
    if votes_k < 1:
        raise ValueError(f"votes_k must be at least 1, not {votes_k}")
    torch.set_num_threads(params.threads)
    device = select_device(params.device, params.allow_cpu_fallback)
    model, checkpoint = load_classifier(model_path, device)
    image_size = int(checkpoint["params"]["image_size"])
    provenance = {"model": model_path, "model_epoch": checkpoint.get("epoch"), "backbone": checkpoint["backbone"]}
    provenance |= {"n_classes": len(model.classes), "image_size": image_size, "votes_k": votes_k}
    provenance |= {"records": records_path, "crops": crops_path}
    for ids_path, out_path in sets.items():
        crops = crop_rows(records_path, crops_path, ids_path)
        data = CropBatches(crops, model.classes, eval_transform(image_size))
        rows = probabilities(model, data, params.batch_size, device, f"classifying the crops of {ids_path}")
        table = predictions_table(data.ids, rows, model.classes, votes_k)
        write_parquet(table, out_path, stage=STAGE, params={**provenance, "ids": ids_path}, contract=SSL_PREDICTIONS)
        log.info("%s: %d kept crop(s) of %s classified", out_path, len(data), ids_path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    training = commands.add_parser("train", help="train on the kept crops of the training ids")
    for flag, text in (
        ("records", "records Parquet of the dataset"),
        ("crops", "crops Parquet (CROPS): the boxes and labels"),
        ("train-ids", "split Parquet of the training ids (A)"),
        ("out-dir", "folder for model.pt, checkpoints and train_log.parquet"),
    ):
        training.add_argument(f"--{flag}", required=True, help=text)
    training.add_argument("--val-ids", help="split Parquet of the validation ids (B), scored after each epoch")
    add_dataclass_arguments(training, CropClassifierParams)
    predicting = commands.add_parser("predict", help="classify the kept crops of id sets")
    predicting.add_argument("--model", required=True, help="model.pt of `train`")
    predicting.add_argument("--records", required=True, help="records Parquet of the dataset")
    predicting.add_argument("--crops", required=True, help="crops Parquet (CROPS)")
    predicting.add_argument("--predict", action="append", required=True, metavar="IDS=OUT", help="a set to classify")
    predicting.add_argument("--votes-k", type=int, required=True, help="votes per crop (the kNN's k)")
    add_dataclass_arguments(predicting, SSLEmbedParams)
    args = vars(parser.parse_args(argv))
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    if args["command"] == "train":
        params = dataclass_from_args(CropClassifierParams, args)
        train(args["records"], args["crops"], args["train_ids"], args["out_dir"], params, val_ids=args["val_ids"])
    else:
        sets = keyed_files(args["predict"], "predict")
        params = dataclass_from_args(SSLEmbedParams, args)
        predict(args["model"], args["records"], args["crops"], sets, args["votes_k"], params)


if __name__ == "__main__":
    main()
