"""Model utility: zero-shot and linear-probe classification accuracy on a labelled evaluation set.

- zero-shot: open_clip's `build_zero_shot_classifier` turns class-name prompts
  into a classifier (as open_clip_train's zero-shot evaluation does); accuracy
  of the top-1 class on every evaluation image.
- linear probe: multinomial logistic regression with scikit-learn's default
  objective (L2, C=1, unpenalised bias) on standardised features, minimised
  full-batch by torch's L-BFGS on the job's device (a GPU when there is one),
  trained on a seeded fraction of the evaluation images and scored on the rest,
  on two features: "PJ", the projected image embedding the contrastive loss
  sees, and "BB", the backbone embedding before the final projection.

For the synthetic default the labels are the scene types (`scene` column of the
public set's records); for ImageNet-style folders, the class folder. Folders
named by WordNet id (the 1,000 of ImageNet-1k, `n01440764`, ...) are prompted
with open_clip's IMAGENET_CLASSNAMES (listed in sorted-wnid order) and its
OPENAI_IMAGENET_TEMPLATES, as CLIP's own ImageNet evaluation does.
"""

from __future__ import annotations

import argparse
import logging
import re

import numpy as np
import polars as pl
import torch
from open_clip import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES, build_zero_shot_classifier
from tqdm import tqdm

from workflow_scripts.cli import run_stage
from workflow_scripts.contracts import RECORDS, UTILITY
from workflow_scripts.images import load_rgb, resolve_image_paths
from workflow_scripts.io import DataError, write_parquet
from workflow_scripts.models import load_checkpoint, select_device

log = logging.getLogger(__name__)
WNID = r"^n[0-9]{8}$"


@torch.no_grad()
def image_features(
    model, preprocess, paths: list[str], ids: list[str], batch_size: int, device: torch.device
) -> tuple[np.ndarray, np.ndarray]:
    """(projected, backbone) image features; the backbone is the visual tower with its projection removed."""
    visual = model.visual
    projection = getattr(visual, "proj", None)
    if projection is None:
        raise ValueError(f"{type(visual).__name__} exposes no `proj`: the BB probe needs an open_clip ViT-style tower")
    projected, backbone = [], []
    for start in tqdm(range(0, len(paths), batch_size), desc="utility features", unit="batch", mininterval=2):
        images = torch.stack(
            [
                preprocess(load_rgb(p, i))
                for p, i in zip(paths[start : start + batch_size], ids[start : start + batch_size])
            ]
        ).to(device)
        visual.proj = None  # temporarily: the tower then returns its pooled backbone features
        try:
            pooled = visual(images)
        finally:
            visual.proj = projection
        backbone.append(pooled.float().cpu().numpy())
        projected.append((pooled @ projection).float().cpu().numpy())
    return np.concatenate(projected), np.concatenate(backbone)


def probe_split(n: int, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of the probe's training rows: a seeded `fraction` of n."""
    mask = np.zeros(n, dtype=bool)
    mask[np.random.default_rng(seed).permutation(n)[: round(fraction * n)]] = True
    return mask


def fit_logistic_regression(
    features: torch.Tensor, labels: torch.Tensor, n_classes: int, max_iter: int, c: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) minimising sum of cross-entropies + ‖weight‖² / (2c), scikit-learn's LogisticRegression
    objective; full-batch L-BFGS from zeros, so the result does not depend on a seed."""
    weight = torch.zeros(features.shape[1], n_classes, device=features.device, requires_grad=True)
    bias = torch.zeros(n_classes, device=features.device, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [weight, bias],
        lr=1,
        max_iter=max_iter,
        tolerance_grad=1e-6,
        tolerance_change=1e-9,
        history_size=10,
        line_search_fn="strong_wolfe",
    )
    n = len(labels)

    def closure():
        optimizer.zero_grad()
        # Divided by n: the same minimiser, with gradients whose scale does not grow with the data.
        loss = (
            torch.nn.functional.cross_entropy(features @ weight + bias, labels, reduction="sum")
            + weight.square().sum() / (2 * c)
        ) / n
        loss.backward()
        return loss

    optimizer.step(closure)
    state = optimizer.state[weight]
    converged = state["n_iter"] < max_iter
    log.log(
        logging.INFO if converged else logging.WARNING,
        "linear probe: L-BFGS %s after %d iterations (%d function evaluations)",
        "converged" if converged else "stopped by probe_max_iter, not converged,",
        state["n_iter"],
        state["func_evals"],
    )
    return weight.detach(), bias.detach()


def linear_probe_accuracy(
    features: np.ndarray,
    labels: np.ndarray,
    train_mask: np.ndarray,
    device: torch.device = torch.device("cpu"),
    max_iter: int = 1000,
) -> float:
    """Accuracy on the rows outside `train_mask` of a probe fitted on the rows inside it (standardised features)."""
    x = torch.from_numpy(features).to(device, torch.float32)
    y = torch.from_numpy(labels).to(device, torch.int64)
    train = torch.from_numpy(train_mask).to(device)
    mean, std = x[train].mean(0), x[train].std(0, unbiased=False) + 1e-6
    x = (x - mean) / std
    weight, bias = fit_logistic_regression(x[train], y[train], int(labels.max()) + 1, max_iter)
    predictions = (x[~train] @ weight + bias).argmax(dim=1)
    return float((predictions == y[~train]).float().mean())


def prompt_classes(classnames: list[str], templates: list[str]) -> tuple[list[str], list]:
    """Class names and templates to prompt with: those given, or open_clip's for the ImageNet-1k wnids."""
    wnids = [name for name in classnames if re.match(WNID, name)]
    if not wnids:
        return classnames, templates
    if len(wnids) != len(classnames) or len(classnames) != len(IMAGENET_CLASSNAMES):
        raise DataError(
            f"{len(wnids)} of {len(classnames)} classes are WordNet ids; open_clip names the "
            f"{len(IMAGENET_CLASSNAMES)} ImageNet-1k classes only: give all of them, or name the folders"
        )
    log.info("WordNet-id classes: prompting with open_clip's IMAGENET_CLASSNAMES and OPENAI_IMAGENET_TEMPLATES")
    return list(IMAGENET_CLASSNAMES), list(OPENAI_IMAGENET_TEMPLATES)  # both in sorted-wnid order


def task_accuracies(
    projected: np.ndarray,
    backbone: np.ndarray,
    class_labels: pl.Series,
    model,
    tokenizer,
    templates: list[str],
    train_mask: np.ndarray,
    device: torch.device,
    probe_max_iter: int,
) -> list[dict]:
    """Zero-shot and PJ/BB linear-probe accuracy for one labelling of the evaluation images."""
    classnames = sorted(class_labels.unique().to_list())
    labels = class_labels.replace_strict(classnames, list(range(len(classnames)))).to_numpy()
    prompt_names, prompt_templates = prompt_classes(classnames, templates)
    with torch.no_grad():
        classifier = build_zero_shot_classifier(model, tokenizer, prompt_names, prompt_templates, device=device)
        normalised = torch.nn.functional.normalize(torch.from_numpy(projected).to(device), dim=-1)
        zero_shot_predictions = (normalised @ classifier).argmax(dim=1).cpu().numpy()
    n_probe_eval = int((~train_mask).sum())
    common = {
        "task": class_labels.name,
        "n_classes": len(classnames),
        "chance": float(np.bincount(labels).max() / len(labels)),
    }
    return [
        {
            **common,
            "metric": "zero_shot",
            "accuracy": float((zero_shot_predictions == labels).mean()),
            "n_eval": len(labels),
        },
        {
            **common,
            "metric": "linear_probe_PJ",
            "n_eval": n_probe_eval,
            "accuracy": linear_probe_accuracy(projected, labels, train_mask, device, probe_max_iter),
        },
        {
            **common,
            "metric": "linear_probe_BB",
            "n_eval": n_probe_eval,
            "accuracy": linear_probe_accuracy(backbone, labels, train_mask, device, probe_max_iter),
        },
    ]


def read_labelled_records(records_path: str, label_columns: list[str]) -> pl.DataFrame:
    """The evaluation records with their image paths and labels; every record must have every label."""
    records = RECORDS.read(records_path, ["id", "image_path", *label_columns])
    for column in label_columns:
        unlabelled = records.filter(pl.col(column).is_null())["id"]
        if len(unlabelled):
            raise DataError(f"{records_path}: record(s) without {column!r}: {unlabelled.head(5).to_list()}")
    return records


def evaluate(
    model_path: str,
    records_path: str,
    label_columns: list[str],
    templates: list[str],
    out_path: str,
    probe_fraction: float = 0.5,
    seed: int = 0,
    batch_size: int = 256,
    device: str = "auto",
    threads: int = 1,
    probe_max_iter: int = 1000,
) -> None:
    torch.set_num_threads(threads)
    torch_device = select_device(device)
    model, preprocess, tokenizer, checkpoint = load_checkpoint(model_path, torch_device)
    records = read_labelled_records(records_path, label_columns)
    paths = resolve_image_paths(records, records_path).to_list()
    projected, backbone = image_features(model, preprocess, paths, records["id"].to_list(), batch_size, torch_device)
    train_mask = probe_split(len(records), probe_fraction, seed)
    rows = [
        row
        for column in label_columns
        for row in task_accuracies(
            projected,
            backbone,
            records[column].cast(pl.String),
            model,
            tokenizer,
            templates,
            train_mask,
            torch_device,
            probe_max_iter,
        )
    ]
    table = pl.DataFrame(rows).select(UTILITY.names)
    params = {
        "model": model_path,
        "model_epoch": checkpoint.get("epoch"),
        "records": records_path,
        "label_columns": label_columns,
        "templates": templates,
        "probe_fraction": probe_fraction,
        "seed": seed,
        "probe_max_iter": probe_max_iter,
    }
    write_parquet(table, out_path, stage="utility", params=params, contract=UTILITY)
    log.info("utility of %s:\n%s", model_path, table)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="checkpoint written by the train stage")
    parser.add_argument("--records", required=True, help="records Parquet of the labelled evaluation set")
    parser.add_argument(
        "--label-column",
        action="append",
        required=True,
        help="records column holding a class name; one task per column (repeatable)",
    )
    parser.add_argument(
        "--template", action="append", required=True, help="zero-shot prompt with {} for the class name (repeatable)"
    )
    parser.add_argument("--out", required=True)
    parser.add_argument("--probe-fraction", type=float, default=0.5, help="share of images the probe trains on")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--probe-max-iter", type=int, default=1000, help="L-BFGS iterations of the linear probe")
    run_stage(
        parser,
        argv,
        evaluate,
        model_path="model",
        records_path="records",
        label_columns="label_column",
        templates="template",
        out_path="out",
    )


if __name__ == "__main__":
    main()
