# Shared setup: config validation, parameter points, path helpers, wildcard constraints.

import glob
import os
import re
import shlex
import sys

from snakemake.utils import validate

# The stage logic lives in the importable package workflow_scripts/ next to this Snakefile;
# jobs run `python -m workflow_scripts.<stage>`, locally, in conda envs or on cluster nodes.
shell.prefix(f"set -euo pipefail; export PYTHONPATH='{workflow.basedir}'${{{{PYTHONPATH:+:$PYTHONPATH}}}}; ")
sys.path.insert(0, workflow.basedir)

from workflow_scripts.cli import to_cli_flags
from workflow_scripts.launch import LAUNCH_SETTINGS, launch_command, launch_resources
from workflow_scripts.paramspace import alternation, expand_points, save_epochs, segment_regex, training_runs


validate(config, "../config/schema.yaml")

RESULTS = "results"
POINTS = expand_points(config["training"], config.get("sweep", {}))
# Points differing only in epochs share one training run (the longest); the others take its checkpoints.
PLAN = training_runs(POINTS)
RUNS = {entry["run"] for entry in PLAN.values()}
SWEPT = [key for key, values in config.get("sweep", {}).items() if len(values) > 1]
QUERY_SETS = {"target": "A", "holdout": "holdout"}  # metrics query set -> split file
SIDES = ("A", "B")  # A trains f_A (target), B trains f_B (reference)


def _check_config():
    for name, split in config["splits"].items():
        for role in ("pool", "public"):
            if split[role] not in config["datasets"]:
                raise ValueError(f"config splits.{name}.{role}: unknown dataset {split[role]!r}")
        if split["pool"] == split["public"]:
            raise ValueError(f"config splits.{name}: pool and public must be different data sets")
    if config["metrics"]["k"] > config["knn"]["k"]:
        raise ValueError("config metrics.k must not exceed knn.k (neighbours are searched once, at knn.k)")


_check_config()


# A trained parameter point, or an external target of the one-model test (models.import, rules/one_model.smk).
POINT_PATTERN = f"{segment_regex()}|external~[A-Za-z0-9_.-]+"


wildcard_constraints:
    dataset="|".join(map(re.escape, config["datasets"])),
    split="|".join(map(re.escape, config["splits"])),
    point=POINT_PATTERN,
    side="A|B",
    queries="|".join(QUERY_SETS),


def dataset_dir(name):
    return f"{RESULTS}/data/{name}"


def split_of(wildcards):
    return config["splits"][wildcards.split]


def pool_records(wildcards):
    return f"{dataset_dir(split_of(wildcards)['pool'])}/records.parquet"


def pool_annotations(wildcards):
    return f"{dataset_dir(split_of(wildcards)['pool'])}/annotations.parquet"


def public_records(wildcards):
    return f"{dataset_dir(split_of(wildcards)['public'])}/records.parquet"


def public_annotations(wildcards):
    return f"{dataset_dir(split_of(wildcards)['public'])}/annotations.parquet"


def training_flags(wildcards):
    """CLI flags of the training stage: the run's values over the `training` block (n_train picks the split file)."""
    settings = {**config["training"], **POINTS[wildcards.point]}
    for launcher_setting in ("n_train", "threads", *LAUNCH_SETTINGS):
        settings.pop(launcher_setting)
    settings["save_epochs"] = ",".join(map(str, save_epochs(PLAN, wildcards.point)))
    return to_cli_flags(settings)


def side_split(wildcards, side=None):
    """The ids a side trains on: the split file, or its first n_train ids when the point sets n_train."""
    side = side or wildcards.side
    n_train = POINTS.get(wildcards.point, {}).get("n_train")  # external targets: the whole side
    subset = "" if n_train is None else f"n_train~{n_train}/"
    return f"{RESULTS}/splits/{wildcards.split}/{subset}{side}.parquet"


def query_split(wildcards):
    """Metrics queries: the records f_A trained on (target) or the holdout."""
    if wildcards.queries == "target":
        return side_split(wildcards, "A")
    return f"{RESULTS}/splits/{wildcards.split}/holdout.parquet"


def run_checkpoint(wildcards):
    """The file of the run's checkpoint a shorter-epoch point takes its model from."""
    entry = PLAN[wildcards.point]
    return f"{RESULTS}/models/{wildcards.split}/{entry['run']}/{wildcards.side}/model_epoch{entry['epoch']}.pt"


def summary_inputs(wildcards):
    return {
        "population": expand(f"{RESULTS}/metrics/{wildcards.split}/{{point}}/{{queries}}/population.parquet",
                             point=POINTS, queries=QUERY_SETS),
        "utility": expand(f"{RESULTS}/utility/{wildcards.split}/{{point}}/{{side}}.parquet", point=POINTS, side=SIDES),
    }


def figure_targets():
    """Every figure, all of them regenerated from cached tables."""
    targets = []
    for split in config["splits"]:
        targets += expand(f"{RESULTS}/figures/{split}/{{point}}/{{figure}}.{{ext}}", point=POINTS,
                          figure=("recall_cdf", "gap_vs_top_l", "qualitative"), ext=("png", "svg"))
        targets += expand(f"{RESULTS}/figures/sweep/{split}/{{parameter}}.{{ext}}", parameter=SWEPT,
                          ext=("png", "svg"))
    return targets


def all_targets():
    targets = figure_targets()
    for split in config["splits"]:
        targets.append(f"{RESULTS}/summary/{split}.parquet")
        for point in POINTS:
            for queries in QUERY_SETS:
                targets += expand(
                    "{results}/metrics/{split}/{point}/{queries}/{table}.parquet",
                    results=RESULTS, split=split, point=point, queries=queries,
                    table=("records", "population", "sample_level"),
                )
            if ONE_MODEL_MODES:
                targets += expand(
                    "{results}/metrics/{split}/{point}/one_model~{mode}/{queries}/population.parquet",
                    results=RESULTS, split=split, point=point, mode=ONE_MODEL_MODES, queries=QUERY_SETS,
                )
                targets.append(f"{RESULTS}/agreement/{split}/{point}/agreement.parquet")
        targets += expand(
            "{results}/metrics/{split}/external~{target}/one_model~{mode}/{queries}/population.parquet",
            results=RESULTS, split=split, target=ONE_MODEL["external_targets"], mode=ONE_MODEL_MODES,
            queries=QUERY_SETS,
        )
    return targets


# --- datasets (rules/datasets.smk) ---


def datasets_where(key, values):
    """Wildcard regex of the configured data sets whose `key` is in `values`; matches nothing if there are none."""
    names = [name for name, spec in config["datasets"].items() if spec[key] in values]
    return "|".join(map(re.escape, names)) or "(?!)"


def dataset_spec(wildcards):
    return config["datasets"][wildcards.dataset]


# A split's pool is trained on: its records need captions, and no image may appear twice.
TRAINING_POOLS = {split["pool"] for split in config["splits"].values()}


def _check_dataset_config():
    for name, spec in config["datasets"].items():
        where = f"config datasets.{name}"
        if spec["annotator"] == "parts" and spec["source"] != "mix":
            raise ValueError(f"{where}: annotator 'parts' takes the annotations of a mix's parts; source is {spec['source']!r}")
        if spec["annotator"] == "ground_truth" and spec["source"] == "shards":
            raise ValueError(f"{where}: image-caption shards carry no object lists; use annotator detic or precomputed")
        parts = [part["dataset"] for part in spec.get("parts", [])]
        for part in parts:
            if part not in config["datasets"] or part == name:
                raise ValueError(f"{where}.parts: {part!r} is not another configured data set")
        if len(set(parts)) != len(parts):
            raise ValueError(f"{where}.parts: a data set is listed twice")


_check_dataset_config()


def validation_flags(wildcards):
    spec = dataset_spec(wildcards)
    return to_cli_flags({"on_invalid": spec["on_invalid"], "threads": spec["threads"],
                         "training_pool": wildcards.dataset in TRAINING_POOLS})


def shard_files(wildcards):
    """The tar shards the `shards` glob patterns name (raw data: they must exist)."""
    spec = dataset_spec(wildcards)
    files = []
    for pattern in spec.get("shards", []):
        matched = sorted(glob.glob(os.path.expanduser(pattern)))
        if not matched:
            raise ValueError(f"config datasets.{wildcards.dataset}.shards: {pattern!r} matches no file")
        files += matched
    return files


def optional_input(key):
    return lambda wildcards: [dataset_spec(wildcards)[key]] if key in dataset_spec(wildcards) else []


def optional_flag(flag, files):
    return f"--{flag} {shlex.quote(files[0])}" if files else ""


def mix_part_records(wildcards):
    return [f"{dataset_dir(part['dataset'])}/records.parquet" for part in dataset_spec(wildcards)["parts"]]


def mix_part_flags(wildcards):
    parts = dataset_spec(wildcards)["parts"]
    return " ".join(shlex.quote(f"{part['dataset']}={dataset_dir(part['dataset'])}/records.parquet"
                                f"={part.get('n_records', 'all')}") for part in parts)


DATASET_OUTPUTS = {
    "records": f"{RESULTS}/data/{{dataset}}/records.parquet",
    "ground_truth": f"{RESULTS}/data/{{dataset}}/ground_truth.parquet",
    "validation": f"{RESULTS}/data/{{dataset}}/validation.parquet",
}


# --- annotate (rules/annotate.smk) ---

ANNOTATIONS = f"{RESULTS}/data/{{dataset}}/annotations.parquet"


def detic_spec(wildcards):
    return dataset_spec(wildcards)["detic"]


def precomputed_flags(wildcards):
    """A data set that skips invalid records may have annotation rows for records it dropped, and lack none it keeps."""
    return "--allow-missing --drop-unknown" if dataset_spec(wildcards)["on_invalid"] == "skip" else ""


# --- embed (rules/embed.smk) ---

PUBLIC_SHARDS = [f"{i}-of-{config['embedding']['public_shards']}" for i in range(config["embedding"]["public_shards"])]
# Embedding jobs hold a GPU unless the config pins them to the CPU (`--resources gpu=1` runs them one at a time).
EMBED_GPUS = 0 if config["embedding"]["device"] == "cpu" else 1


def embed_device_flags():
    emb = config["embedding"]
    return f"--device {emb['device']} --allow-cpu-fallback {str(emb['allow_cpu_fallback']).lower()}"


# --- knn (rules/knn.smk) ---

# knn.use_gpu=always searches in the faiss-gpu environment and holds a GPU; auto holds one too (it takes the GPU
# when its faiss can), in the faiss-cpu environment under --use-conda: faiss-gpu fails to load on a machine
# without a CUDA driver. never keeps the search on the CPU.
KNN_GPUS = 0 if config["knn"]["use_gpu"] == "never" else 1
KNN_ENV = "../envs/dejavu-gpu.yaml" if config["knn"]["use_gpu"] == "always" else "../envs/dejavu.yaml"


# --- figures (rules/figures.smk) ---

def _figure(path, caption, category):
    return report(path, caption=f"../report/{caption}.rst", category=category, subcategory="{split}")


# --- one_model (rules/one_model.smk) ---

ONE_MODEL = config["one_model"]
REFERENCE = f"reference~{re.sub(r'[^A-Za-z0-9_.-]+', '_', ONE_MODEL['reference_model'])}"
ONE_MODEL_MODES = ONE_MODEL["modes"] if ONE_MODEL["enabled"] else []
