"""Detic annotator: the objects Detic detects in each image, stored as class names with their scores.

The paper's setup: Detic_LCOCOI21k_CLIP_SwinB_896b32_4x_ft4x_max-size on detectron2, over the ~21K ImageNet
classes, score threshold 0.5. Three steps, each a CLI command:

- ``vocabulary``: class names (``lvis``, ``lvis-22k`` from the Detic clone, or a text file) -> their CLIP ViT-B/32
  text embeddings, prompt ``a {}``, L2-normalised, as Detic's classifier expects: a Parquet of (class_name,
  embedding) in class order, computed once per vocabulary from a local OpenAI CLIP weights file
- ``detect``: the records whose row number is ``chunk`` modulo ``n_chunks`` -> a chunk table (id, labels, scores),
  images decoded by DataLoader workers and run through the model in batches. With ``--crops`` (the SSL test's
  crops) the records with a kept crop, cropped to it as the SSL models see it (stored orientation, no EXIF
  transpose); ``workflow_scripts.ssl.crop_tags detic`` merges such chunks
- ``merge``: every chunk table -> annotations.parquet, one row per record (a record no chunk covers is an error)

detectron2 and Detic are not on PyPI: their conda env is envs/detic.yaml, and Detic itself is a git checkout
(with its CenterNet2 submodule) named by ``--detic-repo``. The model is set up as Detic's demo sets it up
(demo.py setup_cfg, VisualizationDemo), with detectron2's DefaultPredictor steps (build_model, checkpoint, test-time
resize, input format) done here so that images go to the model in batches.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import json
import logging
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow.parquet as pq
from PIL import ImageOps
from tqdm import tqdm

from workflow_scripts.annotate import check_complete, read_record_ids, write_annotations, write_conformed
from workflow_scripts.cli import LOG_FORMAT, add_dataclass_arguments, dataclass_from_args
from workflow_scripts.contracts import ANNOTATIONS, CROPS, DETIC_VOCABULARY
from workflow_scripts.images import crop, load_rgb, resolve_image_paths
from workflow_scripts.io import DataError, embeddings_from_table, embeddings_table, params_hash, write_parquet

log = logging.getLogger(__name__)

PAPER_CONFIG = "configs/Detic_LCOCOI21k_CLIP_SwinB_896b32_4x_ft4x_max-size.yaml"
# Detic's own prompt: get_clip_embeddings(prompt='a ') and tools/dump_clip_features.py --prompt a.
DEFAULT_PROMPT = "a {}"
# Vocabularies read from the user's Detic clone, relative to it.
BUILTIN_VOCABULARIES = {
    "lvis": "datasets/metadata/lvis_v1_train_cat_info.json",  # LVIS v1's 1,203 categories
    "lvis-22k": "detic/data/datasets/lvis_22k_categories.py",  # LVIS + ImageNet-21k: the LCOCOI21k models' 22,047
}
TEXT_BATCH = 256  # class names per CLIP text forward pass

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


# --- vocabulary: class names -> CLIP text embeddings -------------------------------------------------------------


def vocabulary_source(vocabulary: str, detic_repo: str) -> Path:
    """The file holding the class names: a builtin vocabulary's file in the Detic clone, else `vocabulary` itself."""
    if vocabulary in BUILTIN_VOCABULARIES:
        return Path(detic_repo) / BUILTIN_VOCABULARIES[vocabulary]
    return Path(vocabulary)


def vocabulary_key(spec: dict) -> str:
    """File name stem of a detic spec's class embeddings: the same for every data set with the same vocabulary,
    prompt and CLIP weights, so they are computed once."""
    source = str(vocabulary_source(spec["vocabulary"], spec["repo"]))
    label = spec["vocabulary"] if spec["vocabulary"] in BUILTIN_VOCABULARIES else Path(source).stem
    digest = params_hash({"source": source, "prompt": spec["prompt"], "clip_weights": spec["clip_weights"]})[:10]
    return f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', label)}-{digest}"


def _categories_assignment(path: Path, variable: str) -> list[dict]:
    """The literal list assigned to `variable` in a Python file, read without importing (or running) it."""
    try:
        tree = ast.parse(path.read_text(), filename=str(path))
    except FileNotFoundError as error:
        raise DataError(f"{path}: file does not exist (is the Detic clone complete?)") from error
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(target, "id", None) == variable for target in node.targets):
            try:
                return ast.literal_eval(node.value)
            except ValueError as error:
                raise DataError(f"{path}: {variable} is not a literal list of categories") from error
    raise DataError(f"{path}: no `{variable} = [...]` assignment")


def _names_by_id(categories: list[dict], path: Path) -> list[str]:
    """Category names in id order; ids must be 1..n, as Detic's metadata (get_lvis_22k_meta) requires."""
    ids = sorted(category["id"] for category in categories)
    if ids != list(range(1, len(ids) + 1)):
        raise DataError(f"{path}: category ids are not 1..{len(ids)}")
    return [category["name"] for category in sorted(categories, key=lambda category: category["id"])]


def read_vocabulary(vocabulary: str, detic_repo: str) -> list[str]:
    """Class names in class order, underscores as spaces (Detic's dump_clip_features.py --fix_space)."""
    path = vocabulary_source(vocabulary, detic_repo)
    if vocabulary == "lvis":
        try:
            names = _names_by_id(json.loads(path.read_text()), path)
        except FileNotFoundError as error:
            raise DataError(f"{path}: file does not exist (is the Detic clone complete?)") from error
    elif vocabulary == "lvis-22k":
        names = _names_by_id(_categories_assignment(path, "CATEGORIES"), path)
    else:
        try:
            names = [line for line in path.read_text().splitlines() if line.strip()]
        except FileNotFoundError as error:
            raise DataError(f"{path}: vocabulary file does not exist") from error
    names = [name.replace("_", " ").strip() for name in names]
    if not names or not all(names):
        raise DataError(f"{path}: empty vocabulary or an empty class name (one class name per line)")
    return names


def load_clip(weights: str):
    """OpenAI's CLIP from its own weights file (ViT-B-32.pt), built as OpenAI builds it: QuickGELU, fp16-stored
    weights run in fp32. Nothing is downloaded: `weights` must be a local file."""
    if not Path(weights).is_file():
        raise DataError(f'{weights}: CLIP weights file does not exist (OpenAI\'s ViT-B-32.pt; README "Real data")')
    import open_clip

    # load_openai_model infers the architecture from the state dict and uses QuickGELU; create_model("ViT-B-32",
    # pretrained=PATH) would build plain GELU for a file path and refuse OpenAI's TorchScript archive.
    return open_clip.load_openai_model(weights, precision="fp32", device="cpu").eval()


def embed_class_names(model, names: list[str], prompt: str) -> np.ndarray:
    """[classes, dim] float32 L2-normalised text embeddings of `prompt` filled with each name."""
    import open_clip
    import torch

    parts = []
    with torch.no_grad():
        for start in tqdm(range(0, len(names), TEXT_BATCH), desc="CLIP text", unit="batch", mininterval=5):
            tokens = open_clip.tokenize([prompt.format(name) for name in names[start : start + TEXT_BATCH]])
            parts.append(model.encode_text(tokens, normalize=True).float().numpy())
    return np.concatenate(parts)


def write_class_embeddings(vocabulary: str, detic_repo: str, clip_weights: str, prompt: str, out_path: str) -> None:
    names = read_vocabulary(vocabulary, detic_repo)
    embeddings = embed_class_names(load_clip(clip_weights), names, prompt)
    table = embeddings_table(names, embeddings).rename_columns(["class_name", "embedding"])
    write_parquet(
        table,
        out_path,
        stage="annotate",
        contract=DETIC_VOCABULARY,
        params={
            "annotator": "detic",
            "vocabulary": vocabulary,
            "source": str(vocabulary_source(vocabulary, detic_repo)),
            "prompt": prompt,
            "clip_weights": clip_weights,
            "n_classes": len(names),
        },
    )
    log.info("%s: %d class embeddings of dimension %d", out_path, *embeddings.shape)


def read_class_embeddings(path: str) -> tuple[list[str], np.ndarray]:
    """(class names, [classes, dim] float32 embeddings) written by `write_class_embeddings`."""
    if not Path(path).is_file():
        raise DataError(f"{path}: class embeddings file does not exist (the detic_vocabulary rule writes it)")
    table = pq.read_table(path, columns=DETIC_VOCABULARY.check(path))
    names, embeddings = embeddings_from_table(table.rename_columns(["id", "embedding"]), path)
    return names.to_pylist(), embeddings


# --- detect: one chunk of the records through the model ----------------------------------------------------------


@dataclass(frozen=True)
class DetectParams:
    """The detect command's model settings, each a --flag; defaults are config/schema.yaml's datasets.*.detic."""

    config_file: str = PAPER_CONFIG  # relative to the Detic checkout
    score_threshold: float = 0.5
    device: str = "cuda"
    batch_size: int = 8  # images per forward pass
    workers: int = 4  # image decoding processes


@dataclass
class Detector:
    """What detectron2's DefaultPredictor holds, for batches: the model and its test-time input conventions."""

    model: Callable[[list[dict]], list[dict]]  # detectron2 meta-architecture in eval mode
    resize: Any  # detectron2 ResizeShortestEdge(MIN_SIZE_TEST, MAX_SIZE_TEST)
    input_format: str  # cfg.INPUT.FORMAT: "RGB" or "BGR"


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
        raise DataError(
            f"predicted class index {int(classes.max())} outside the vocabulary of {len(class_names)} names"
        )
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


class ModelInputs:
    """Dataset of (record id, detectron2 model input) pairs: the image EXIF-transposed (as detectron2's read_image
    does), or with `boxes` its box's pixels (x_min, y_min, x_max, y_max, max exclusive, in the stored orientation),
    in the model's channel order, resized for test, with its (cropped) height and width."""

    def __init__(self, ids: list[str], paths: list[str], resize, input_format: str, boxes: list | None = None):
        self.ids, self.paths, self.resize, self.input_format = ids, paths, resize, input_format
        self.boxes = boxes

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[str, dict]:
        import torch

        image = load_rgb(self.paths[index], self.ids[index])
        image = np.asarray(
            ImageOps.exif_transpose(image) if self.boxes is None else crop(image, self.boxes[index], self.ids[index])
        )
        if self.input_format == "BGR":
            image = image[:, :, ::-1]
        height, width = image.shape[:2]
        resized = self.resize.get_transform(image).apply_image(image)
        tensor = torch.as_tensor(np.ascontiguousarray(resized).astype("float32").transpose(2, 0, 1))
        return self.ids[index], {"image": tensor, "height": height, "width": width}


def kept_crop_records(records: pl.DataFrame, crops_path: str) -> pl.DataFrame:
    """The records with a kept crop (drop_reason null), in the records' order, with the crop's box as `box`; a
    kept crop without a record is a DataError."""
    box = ["x_min", "y_min", "x_max", "y_max"]
    crops = CROPS.read(crops_path, ["id", *box, "drop_reason"]).filter(pl.col("drop_reason").is_null())
    unknown = crops.join(records, on="id", how="anti")["id"]
    if len(unknown):
        raise DataError(f"{crops_path}: {len(unknown)} kept crop(s) of no record, e.g. {unknown.head(5).to_list()}")
    crops = crops.select("id", box=pl.concat_list(box))
    return records.join(crops, on="id", how="inner", maintain_order="left")


def _detect_all(dataset: ModelInputs, detector: Detector, class_names: list[str], params: DetectParams, desc: str):
    """(id, labels, scores) rows of every image of `dataset`, `params.batch_size` images per forward pass."""
    import torch
    from torch.utils.data import DataLoader

    loader = DataLoader(dataset, batch_size=params.batch_size, num_workers=params.workers, collate_fn=list)
    rows = []
    with tqdm(total=len(dataset), desc=desc, unit="img", mininterval=5) as progress:
        for batch in loader:
            batch_ids, inputs = zip(*batch)
            with torch.no_grad():
                outputs = detector.model(list(inputs))
            for record_id, output in zip(batch_ids, outputs):
                annotation = instances_to_annotation(output["instances"], class_names, params.score_threshold)
                rows.append((record_id, *annotation))
            progress.update(len(batch))
    return rows


def detect(
    records_path: str,
    chunk: int,
    n_chunks: int,
    detector: Detector,
    class_names: list[str],
    out_path: str,
    params: DetectParams = DetectParams(),
    crops_path: str | None = None,
) -> None:
    """Run `detector` on one chunk of the records (with `crops_path`: of the records with a kept crop, each cropped
    to it) into a chunk table of the annotations contract."""
    records = read_record_ids(records_path, ("id", "image_path"))
    records = records.with_columns(resolve_image_paths(records, records_path).alias("image_path"))
    if crops_path is not None:
        records = kept_crop_records(records, crops_path)
    records = chunk_of(records, chunk, n_chunks)
    boxes = [tuple(box) for box in records["box"].to_list()] if crops_path is not None else None
    dataset = ModelInputs(
        records["id"].to_list(), records["image_path"].to_list(), detector.resize, detector.input_format, boxes
    )
    rows = _detect_all(dataset, detector, class_names, params, desc=f"detic chunk {chunk}/{n_chunks}")
    write_annotations(
        pl.DataFrame(rows, schema=ANNOTATIONS.polars(), orient="row"),
        out_path,
        params={
            "annotator": "detic",
            "records": records_path,
            "chunk": chunk,
            "n_chunks": n_chunks,
            "threshold": params.score_threshold,
            "vocabulary_size": len(class_names),
        }
        | ({"crops": crops_path} if crops_path is not None else {}),
    )


def merge(records_path: str, chunk_paths: list[str], out_path: str) -> None:
    records = read_record_ids(records_path)
    chunks = pl.concat([ANNOTATIONS.read(path) for path in chunk_paths])
    source = f"{len(chunk_paths)} Detic chunk(s) ({chunk_paths[0]} ...)"
    check_complete(records, chunks, source, records_path)
    params = {"annotator": "detic", "records": records_path, "chunks": chunk_paths}
    write_conformed(records, chunks, source, records_path, out_path, params)


def build_predictor(detic_repo: str, weights: str, class_embeddings: np.ndarray, params: DetectParams) -> Detector:
    """Detic with `class_embeddings` ([classes, dim]) as its classifier, configured as Detic's demo configures it
    (masks off), loaded as detectron2's DefaultPredictor loads it."""
    try:
        import torch
        from detectron2.checkpoint import DetectionCheckpointer
        from detectron2.config import get_cfg
        from detectron2.data import transforms
        from detectron2.modeling import build_model
    except ImportError as error:
        raise MissingDependencyError(INSTALL_HINT.format(python=sys.executable, error=error)) from error
    repo = Path(detic_repo).resolve()
    if not (repo / "detic").is_dir():
        raise MissingDependencyError(
            INSTALL_HINT.format(python=sys.executable, error=f"{repo} is not a Detic checkout")
        )
    if not Path(weights).is_file():
        raise DataError(f'{weights}: Detic weights file does not exist (README "Real data" says where to get it)')
    sys.path[:0] = [str(repo), str(repo / "third_party" / "CenterNet2")]
    from centernet.config import add_centernet_config
    from detic.config import add_detic_config
    from detic.modeling.utils import reset_cls_test

    cfg = get_cfg()
    add_centernet_config(cfg)
    add_detic_config(cfg)
    cfg.merge_from_file(str(repo / params.config_file))
    cfg.MODEL.WEIGHTS = str(Path(weights).resolve())  # before the chdir below
    cfg.MODEL.DEVICE = params.device
    cfg.MODEL.MASK_ON = False  # labels need boxes' classes only
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = params.score_threshold
    cfg.MODEL.ROI_BOX_HEAD.ZEROSHOT_WEIGHT_PATH = "rand"  # replaced by the vocabulary's embeddings below
    cfg.MODEL.ROI_HEADS.ONE_CLASS_PER_PROPOSAL = True
    cfg.freeze()
    with contextlib.chdir(repo):  # Detic's configs name metadata files relative to its checkout
        model = build_model(cfg)
        model.eval()
        DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    # reset_cls_test takes the classifier as [dim, classes]
    reset_cls_test(model, torch.from_numpy(np.ascontiguousarray(class_embeddings.T)), len(class_embeddings))
    resize = transforms.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MIN_SIZE_TEST], cfg.INPUT.MAX_SIZE_TEST)
    if cfg.INPUT.FORMAT not in ("RGB", "BGR"):
        raise ValueError(f"{params.config_file}: INPUT.FORMAT {cfg.INPUT.FORMAT!r} is neither RGB nor BGR")
    return Detector(model=model, resize=resize, input_format=cfg.INPUT.FORMAT)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    vocabulary_parser = commands.add_parser("vocabulary", help="class names -> their CLIP text embeddings")
    vocabulary_parser.add_argument(
        "--vocabulary",
        required=True,
        help=f"{' or '.join(BUILTIN_VOCABULARIES)} (from the Detic clone) or a text file, one class name per line",
    )
    vocabulary_parser.add_argument("--detic-repo", required=True, help="Detic git checkout")
    vocabulary_parser.add_argument("--clip-weights", required=True, help="OpenAI CLIP ViT-B/32 weights file")
    vocabulary_parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="'{}' stands for the class name")
    vocabulary_parser.add_argument("--out", required=True)
    detect_parser = commands.add_parser("detect", help="annotate one chunk of the records")
    detect_parser.add_argument("--records", required=True)
    detect_parser.add_argument("--chunk", type=int, required=True)
    detect_parser.add_argument("--n-chunks", type=int, required=True)
    detect_parser.add_argument("--detic-repo", required=True, help="Detic git checkout (with third_party/CenterNet2)")
    detect_parser.add_argument("--weights", required=True, help="Detic model weights file")
    detect_parser.add_argument("--class-embeddings", required=True, help="Parquet written by the vocabulary command")
    detect_parser.add_argument("--crops", help="the SSL test's crops table: detect in each kept crop only")
    add_dataclass_arguments(detect_parser, DetectParams)
    detect_parser.add_argument("--out", required=True)
    merge_parser = commands.add_parser("merge", help="chunk tables -> annotations.parquet")
    merge_parser.add_argument("--records", required=True)
    merge_parser.add_argument("--chunks", nargs="+", required=True)
    merge_parser.add_argument("--out", required=True)
    return parser


def _detect_command(args: argparse.Namespace) -> None:
    params = dataclass_from_args(DetectParams, args)
    class_names, class_embeddings = read_class_embeddings(args.class_embeddings)
    try:
        detector = build_predictor(args.detic_repo, args.weights, class_embeddings, params)
    except MissingDependencyError as error:
        sys.exit(f"error: {error}")
    detect(args.records, args.chunk, args.n_chunks, detector, class_names, args.out, params, args.crops)


def main(argv: list[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    if args.command == "merge":
        merge(args.records, args.chunks, args.out)
    elif args.command == "vocabulary":
        if "{}" not in args.prompt:
            parser.error(f"--prompt {args.prompt!r} has no '{{}}' for the class name")
        write_class_embeddings(args.vocabulary, args.detic_repo, args.clip_weights, args.prompt, args.out)
    else:
        _detect_command(args)


if __name__ == "__main__":
    main()
