"""Detic annotator: the objects Detic detects in each image, stored as class names with their scores.

The paper's setup: Detic_LCOCOI21k_CLIP_SwinB_896b32_4x_ft4x_max-size on detectron2, with the ImageNet-21k
class names as a custom vocabulary (a text file, one name per line) embedded by Detic's CLIP text encoder,
and a score threshold of 0.5. A data set is annotated in chunks, one GPU job each:

- ``detect``: the records whose row number is ``chunk`` modulo ``n_chunks`` -> a chunk table (id, labels, scores)
- ``merge``: every chunk table -> annotations.parquet, one row per record (a record no chunk covers is an error)

detectron2 and Detic are not on PyPI: their conda env is envs/detic.yaml, and Detic itself is a git checkout
(with its CenterNet2 submodule) named by ``--detic-repo``. The model code path is kept to what Detic's own
demo does; `instances_to_annotation` turns a predictor's output into our labels and scores.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from pathlib import Path

import numpy as np
import polars as pl
from tqdm import tqdm

from workflow_scripts.annotate import ANNOTATION_SCHEMA, check_complete, conform_annotations
from workflow_scripts.images import load_rgb, resolve_image_paths
from workflow_scripts.io import DataError, check_unique_ids, read_parquet, write_parquet

log = logging.getLogger(__name__)

PAPER_CONFIG = "configs/Detic_LCOCOI21k_CLIP_SwinB_896b32_4x_ft4x_max-size.yaml"
PAPER_WEIGHTS = "https://dl.fbaipublicfiles.com/detic/Detic_LCOCOI21k_CLIP_SwinB_896b32_4x_ft4x_max-size.pth"
TEXT_BATCH = 1024  # class names embedded per CLIP forward pass (21k at once would exhaust memory)

INSTALL_HINT = (
    "the detic annotator needs detectron2 and Detic, which are not on PyPI and are not importable by {python}. "
    "Run the workflow with `snakemake --use-conda` (the Detic rules use envs/detic.yaml), or create the env by hand: "
    "`conda env create -f envs/detic.yaml -n dejavu-detic`, then `conda activate dejavu-detic` and run "
    "`python -m workflow_scripts.detic ...` there. Detic itself is a git checkout: "
    "`git clone --recursive https://github.com/facebookresearch/Detic.git`, named by datasets.<name>.detic.repo. "
    "({error})"
)


class MissingDependencyError(RuntimeError):
    pass


def _as_numpy(values) -> np.ndarray:
    """Tensors (on any device) or array-likes -> a numpy array."""
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    return np.asarray(values)


def instances_to_annotation(instances, class_names: list[str], threshold: float) -> tuple[list[str], list[float]]:
    """Class names (each once, at its best score) of the instances scoring at least `threshold`, best first."""
    classes = _as_numpy(instances.pred_classes).astype(np.int64)
    scores = _as_numpy(instances.scores).astype(np.float32)
    if classes.size and (classes.min() < 0 or classes.max() >= len(class_names)):
        raise DataError(f"predicted class index {int(classes.max())} outside the vocabulary of {len(class_names)} names")
    best: dict[str, float] = {}
    for class_index, score in zip(classes, scores):
        if score >= threshold:
            name = class_names[class_index]
            best[name] = max(best.get(name, -1.0), float(score))
    ranked = sorted(best.items(), key=lambda item: (-item[1], item[0]))
    return [name for name, _ in ranked], [score for _, score in ranked]


def chunk_of(records: pl.DataFrame, chunk: int, n_chunks: int) -> pl.DataFrame:
    if not 0 <= chunk < n_chunks:
        raise ValueError(f"chunk {chunk} outside 0..{n_chunks - 1}")
    return records.filter(pl.int_range(pl.len()) % n_chunks == chunk)


def detect(records_path: str, chunk: int, n_chunks: int, predictor, class_names: list[str], threshold: float,
           out_path: str) -> None:
    """Run `predictor` (a callable: BGR uint8 array -> {"instances": ...}) on one chunk of the records."""
    records = read_parquet(records_path, {"id": "str", "image_path": "str"})
    check_unique_ids(records["id"], records_path)
    records = chunk_of(records.with_columns(resolve_image_paths(records, records_path).alias("image_path")),
                       chunk, n_chunks)
    ids, labels, scores = [], [], []
    for record_id, path in tqdm(records.select("id", "image_path").iter_rows(), total=len(records),
                                desc=f"detic chunk {chunk}/{n_chunks}", unit="img", mininterval=5):
        bgr = np.ascontiguousarray(np.asarray(load_rgb(path, record_id))[:, :, ::-1])  # detectron2 reads BGR
        image_labels, image_scores = instances_to_annotation(predictor(bgr)["instances"], class_names, threshold)
        ids.append(record_id)
        labels.append(image_labels)
        scores.append(image_scores)
    table = pl.DataFrame({"id": ids, "labels": labels, "scores": scores}, schema=ANNOTATION_SCHEMA)
    write_parquet(table, out_path, stage="annotate", params={
        "annotator": "detic", "records": records_path, "chunk": chunk, "n_chunks": n_chunks,
        "threshold": threshold, "vocabulary_size": len(class_names)})


def merge(records_path: str, chunk_paths: list[str], out_path: str) -> None:
    records = read_parquet(records_path, {"id": "str"})
    chunks = pl.concat([read_parquet(path, {"id": "str", "labels": "list<str>", "scores": "list<float32>"})
                        .select(list(ANNOTATION_SCHEMA)).cast(ANNOTATION_SCHEMA) for path in chunk_paths])
    source = f"{len(chunk_paths)} Detic chunk(s) ({chunk_paths[0]} ...)"
    check_complete(records, chunks, source, records_path)
    annotations = conform_annotations(records, chunks, source, records_path)
    write_parquet(annotations, out_path, stage="annotate",
                  params={"annotator": "detic", "records": records_path, "chunks": chunk_paths})


def read_vocabulary(path: str) -> list[str]:
    try:
        names = [line.strip() for line in Path(path).read_text().splitlines()]
    except FileNotFoundError as error:
        raise DataError(f"{path}: vocabulary file does not exist") from error
    names = [name for name in names if name]
    if not names:
        raise DataError(f"{path}: empty vocabulary (one class name per line)")
    return names


def build_predictor(detic_repo: str, config_file: str, weights: str, class_names: list[str], threshold: float,
                    device: str):
    """detectron2's DefaultPredictor for Detic with `class_names` as its classifier, as Detic's demo sets it up."""
    try:
        import torch
        from detectron2.config import get_cfg
        from detectron2.engine.defaults import DefaultPredictor
    except ImportError as error:
        raise MissingDependencyError(INSTALL_HINT.format(python=sys.executable, error=error)) from error
    repo = Path(detic_repo).resolve()
    if not (repo / "detic").is_dir():
        raise MissingDependencyError(INSTALL_HINT.format(python=sys.executable,
                                                         error=f"{repo} is not a Detic checkout"))
    sys.path[:0] = [str(repo), str(repo / "third_party" / "CenterNet2")]
    from centernet.config import add_centernet_config
    from detic.config import add_detic_config
    from detic.modeling.utils import reset_cls_test
    from detic.predictor import get_clip_embeddings

    cfg = get_cfg()
    add_centernet_config(cfg)
    add_detic_config(cfg)
    cfg.merge_from_file(str(repo / config_file))
    cfg.MODEL.WEIGHTS = weights if "://" in weights else str(Path(weights).resolve())  # before the chdir below
    cfg.MODEL.DEVICE = device
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = threshold
    cfg.MODEL.ROI_BOX_HEAD.ZEROSHOT_WEIGHT_PATH = "rand"  # replaced by the vocabulary's CLIP embeddings below
    cfg.MODEL.ROI_HEADS.ONE_CLASS_PER_PROPOSAL = True
    cfg.freeze()
    with contextlib.chdir(repo):  # Detic's configs name metadata files relative to its checkout
        predictor = DefaultPredictor(cfg)
        with torch.no_grad():
            classifier = torch.cat([get_clip_embeddings(class_names[start:start + TEXT_BATCH])
                                    for start in range(0, len(class_names), TEXT_BATCH)], dim=1)
        reset_cls_test(predictor.model, classifier, len(class_names))
    return predictor


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    detect_parser = commands.add_parser("detect", help="annotate one chunk of the records")
    detect_parser.add_argument("--records", required=True)
    detect_parser.add_argument("--chunk", type=int, required=True)
    detect_parser.add_argument("--n-chunks", type=int, required=True)
    detect_parser.add_argument("--detic-repo", required=True, help="Detic git checkout (with third_party/CenterNet2)")
    detect_parser.add_argument("--config-file", default=PAPER_CONFIG, help="relative to the Detic checkout")
    detect_parser.add_argument("--weights", default=PAPER_WEIGHTS, help="path or URL of the model weights")
    detect_parser.add_argument("--vocabulary", required=True, help="text file, one class name per line")
    detect_parser.add_argument("--score-threshold", type=float, default=0.5)
    detect_parser.add_argument("--device", default="cuda")
    detect_parser.add_argument("--out", required=True)
    merge_parser = commands.add_parser("merge", help="chunk tables -> annotations.parquet")
    merge_parser.add_argument("--records", required=True)
    merge_parser.add_argument("--chunks", nargs="+", required=True)
    merge_parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "merge":
        merge(args.records, args.chunks, args.out)
        return
    class_names = read_vocabulary(args.vocabulary)
    try:
        predictor = build_predictor(args.detic_repo, args.config_file, args.weights, class_names,
                                    args.score_threshold, args.device)
    except MissingDependencyError as error:
        sys.exit(f"error: {error}")
    detect(args.records, args.chunk, args.n_chunks, predictor, class_names, args.score_threshold, args.out)


if __name__ == "__main__":
    main()
