# Shared setup: config validation, parameter points, path helpers, wildcard constraints.

import functools
import glob
import hashlib
import json
import os
import re
import shlex
import sys
from pathlib import Path

from snakemake.settings.types import DeploymentMethod
from snakemake.utils import validate


# The stage logic lives in the importable package workflow_scripts/ next to this Snakefile;
# jobs run `python -m workflow_scripts.<stage>`, locally, in conda envs or on cluster nodes.
def _shell_quoted(text):
    """`text` shell-quoted (a path may hold ' or spaces), its braces doubled for Snakemake's formatting."""
    return shlex.quote(text).replace("{", "{{").replace("}", "}}")


# Jobs run the interpreter that runs Snakemake (`.venv/bin/snakemake` works without activating the venv), unless
# a rule's conda env provides its own. The venv's bin folder is kept as is: resolving its python's symlink would
# leave the venv.
_JOB_PATH = (
    ""
    if DeploymentMethod.CONDA in workflow.deployment_settings.deployment_method
    else f"export PATH={_shell_quoted(os.path.dirname(sys.executable))}:$PATH; "
)
shell.prefix(
    f"set -euo pipefail; {_JOB_PATH}export PYTHONPATH={_shell_quoted(workflow.basedir)}${{{{PYTHONPATH:+:$PYTHONPATH}}}}; "
)
sys.path.insert(0, workflow.basedir)

from workflow_scripts.cli import to_cli_flags
from workflow_scripts.launch import LAUNCH_SETTINGS, gpus_for, launch_command, launch_resources
from workflow_scripts.paramspace import expand_points, save_epochs, segment_regex, swept_keys, training_runs

validate(config, "../config/schema.yaml")

RESULTS = "results"
POINTS = expand_points(config["training"], config.get("sweep", {}))
# Points differing only in epochs share one training run (the longest); the others take its checkpoints.
PLAN = training_runs(POINTS)
# A sweep figure per parameter that takes several values; the training seed is aggregated over, not drawn
# against, unless nothing else varies.
SWEPT = [key for key in swept_keys(POINTS) if key != "seed"] or swept_keys(POINTS)
QUERY_SETS = {"target": "A", "holdout": "holdout"}  # metrics query set -> split file
# The two-model test's query sets: with metrics.symmetric also `reverse`, B's records with f_B as the target.
TWO_MODEL_QUERIES = QUERY_SETS | ({"reverse": "B"} if config["metrics"]["symmetric"] else {})
SIDES = ("A", "B")  # A trains f_A (target), B trains f_B (reference)
# training.enabled false (config/audit_pretrained.yaml): nothing is trained, only external targets are audited.
TRAINED_POINTS = POINTS if config["training"]["enabled"] else {}
NEAR_DUPLICATES = config["near_duplicates"]  # the overlap check of every split against its public set


# The path registry: every output pattern of the workflow, written once (grammar: docs/DESIGN.md §3). Rules take
# their inputs and outputs from it and hand scripts these files, never a folder to build names in.
PATHS = {
    # datasets, annotate
    "records": f"{RESULTS}/data/{{dataset}}/records.parquet",
    "ground_truth": f"{RESULTS}/data/{{dataset}}/ground_truth.parquet",
    "validation": f"{RESULTS}/data/{{dataset}}/validation.parquet",
    "synthetic_images": f"{RESULTS}/data/{{dataset}}/images",
    "annotations": f"{RESULTS}/data/{{dataset}}/annotations.parquet",
    "detic_chunk": f"{RESULTS}/data/{{dataset}}/detic/chunk-{{chunk}}.parquet",
    "detic_vocabulary": f"{RESULTS}/detic/vocabularies/{{vocabulary}}.parquet",
    # splits: {name} is A, B or holdout
    "split": f"{RESULTS}/splits/{{split}}/{{name}}.parquet",
    "split_subset": f"{RESULTS}/splits/{{split}}/n_train~{{n_train}}/{{side}}.parquet",
    "near_duplicates": f"{RESULTS}/splits/{{split}}/near_duplicates.parquet",
    "public_excluded": f"{RESULTS}/splits/{{split}}/public_excluded.parquet",
    # train
    # train: a run's folder (run/) holds what the training job writes; every point's model.pt, whatever made it
    # (a run, a run's checkpoint at a shorter epoch, an import), is the one file later stages read
    "model": f"{RESULTS}/models/{{split}}/{{point}}/{{side}}/model.pt",
    "run_model": f"{RESULTS}/models/{{split}}/{{point}}/{{side}}/run/model.pt",
    "train_log": f"{RESULTS}/models/{{split}}/{{point}}/{{side}}/run/train_log.parquet",
    "checkpoint": f"{RESULTS}/models/{{split}}/{{point}}/{{side}}/run/model_epoch{{epoch}}.pt",
    "imported_model": f"{RESULTS}/models/{{split}}/{{point}}/{{side}}/imported.pt",
    # embed: {collection} is public, captions or public_captions; {searcher} is {point}/{side} or the reference
    "public_shard_embeddings": f"{RESULTS}/embeddings/{{split}}/{{point}}/{{side}}/public_shards/{{shard}}.parquet",
    "embeddings": f"{RESULTS}/embeddings/{{split}}/{{searcher}}/{{collection}}.parquet",
    # knn
    "neighbor_shard": f"{RESULTS}/neighbors/{{split}}/{{point}}/{{side}}/shards/{{shard}}.parquet",
    "neighbors": f"{RESULTS}/neighbors/{{split}}/{{point}}/{{side}}.parquet",
    "t2t_neighbors": f"{RESULTS}/neighbors/{{split}}/{{searcher}}/t2t.parquet",
    # metrics: {table} is records, population or sample_level
    "metrics": f"{RESULTS}/metrics/{{split}}/{{point}}/{{queries}}/{{table}}.parquet",
    "metrics_one_model": f"{RESULTS}/metrics/{{split}}/{{point}}/one_model~{{mode}}/{{queries}}/{{table}}.parquet",
    "utility": f"{RESULTS}/utility/{{split}}/{{point}}/{{side}}.parquet",
    # agreement: {name} is agreement.parquet, population.parquet, agreement.png or agreement.svg
    "agreement": f"{RESULTS}/agreement/{{split}}/{{point}}/{{name}}",
    "summary": f"{RESULTS}/summary/{{split}}.{{ext}}",
    # over the training seeds: {name} is seeds (a row per point less its seed) or comparisons (paired, adjacent)
    "seed_table": f"{RESULTS}/seeds/{{split}}/{{name}}.{{ext}}",
    "figure": f"{RESULTS}/figures/{{split}}/{{point}}/{{figure}}.{{ext}}",
    "sweep_figure": f"{RESULTS}/figures/sweep/{{split}}/{{parameter}}.{{ext}}",
    # the SSL test (rules/ssl.smk), under ssl/{ssl_dataset}/: {name} is A, B, shared, holdout or public;
    # {collection} public or crops_{crop_set}; {crop_set} A, B or holdout; {layer} projector or backbone
    "boxes": f"{RESULTS}/data/{{dataset}}/boxes.parquet",
    "objects": f"{RESULTS}/data/{{dataset}}/objects.parquet",
    "ssl_split": f"{RESULTS}/ssl/{{ssl_dataset}}/splits/{{name}}.parquet",
    "ssl_crops": f"{RESULTS}/ssl/{{ssl_dataset}}/crops.parquet",
    "ssl_model": f"{RESULTS}/ssl/{{ssl_dataset}}/models/{{ssl_point}}/{{side}}/model.pt",
    "ssl_run_model": f"{RESULTS}/ssl/{{ssl_dataset}}/models/{{ssl_point}}/{{side}}/run/model.pt",
    "ssl_train_log": f"{RESULTS}/ssl/{{ssl_dataset}}/models/{{ssl_point}}/{{side}}/run/train_log.parquet",
    "ssl_checkpoint": f"{RESULTS}/ssl/{{ssl_dataset}}/models/{{ssl_point}}/{{side}}/run/model_epoch{{epoch}}.pt",
    "ssl_embeddings": f"{RESULTS}/ssl/{{ssl_dataset}}/embeddings/{{ssl_point}}/{{side}}/{{layer}}/{{collection}}.parquet",
    "ssl_neighbors": f"{RESULTS}/ssl/{{ssl_dataset}}/neighbors/{{ssl_point}}/{{side}}/{{layer}}/{{crop_set}}.parquet",
    "ssl_metrics": f"{RESULTS}/ssl/{{ssl_dataset}}/metrics/{{ssl_point}}/{{layer}}/{{test}}/{{table}}.parquet",
    "ssl_figure": f"{RESULTS}/ssl/{{ssl_dataset}}/figures/{{ssl_point}}/{{layer}}/{{test}}/{{figure}}.{{ext}}",
    "ssl_agreement": f"{RESULTS}/ssl/{{ssl_dataset}}/agreement/{{ssl_point}}/{{layer}}/{{name}}",
    "ssl_crop_tags": f"{RESULTS}/ssl/{{ssl_dataset}}/crop_tags.parquet",
    "ssl_detic_chunk": f"{RESULTS}/ssl/{{ssl_dataset}}/detic/chunk-{{chunk}}.parquet",
    "ssl_classifier_run": f"{RESULTS}/ssl/{{ssl_dataset}}/references/crop_classifier/{{side}}/run/{{name}}",
    "ssl_predictions": f"{RESULTS}/ssl/{{ssl_dataset}}/references/{{reference}}/{{side}}/{{crop_set}}.parquet",
    "ssl_summary": f"{RESULTS}/ssl/{{ssl_dataset}}/summary.{{ext}}",
}
METRIC_TABLES = ("records", "population", "sample_level")


def path(entry, /, **wildcards):
    """PATHS[entry] with the given wildcards filled in; the others stay `{wildcard}` patterns for Snakemake."""
    return re.sub(r"\{(\w+)\}", lambda m: str(wildcards.get(m[1], m[0])), PATHS[entry])


def keyed_flags(flag, keys, files):
    """`--flag key=file` for each key and its file, in order: how rules name every file they hand a script
    (parsed by workflow_scripts.cli.keyed_files)."""
    keys, files = list(keys), list(files)
    if len(keys) != len(files):
        raise ValueError(f"--{flag}: {len(keys)} keys for {len(files)} files")
    return " ".join(f"--{flag} {key}={file}" for key, file in zip(keys, files))


def execution_flags(pass_threads=True, **settings):
    """A params function rendering execution settings (and the job's threads, unless not `pass_threads`) as flags.

    Execution settings (threads, devices, batch sizes, row budgets) change how a job runs, never what it writes.
    Snakemake records a rule's params and reruns a job when they change, except params computed from the job's
    input, output, threads or resources (persistence: `non_derived_params`): taking `threads` puts these flags
    among the latter, so editing them schedules nothing. Result-shaping values go into ordinary params.
    """

    def flags(wildcards, threads):
        return to_cli_flags({**settings, "threads": threads} if pass_threads else settings)

    return flags


# GPU requests (every rule's `resources: gpu=`) come from the config's device choices through `gpus_for`
# (workflow_scripts/launch.py, which also sizes the train rule): a CPU-only config requests no GPU anywhere.
EMBED_GPUS = gpus_for(config["embedding"]["device"])  # embed_*, utility, embed_reference
KNN_GPUS = gpus_for("cpu" if config["knn"]["use_gpu"] == "never" else "cuda")


def local_model_files(model, *files):
    """The local files a model is read from, so that replacing one reruns its job and downstream: the given files
    (weights, checkpoints), a `checkpoint:` path, or every file of a `local-dir:` folder (hub caches are not
    tracked)."""
    found = [file for file in files if file]
    kind, _, location = model.partition(":")
    if kind == "checkpoint":
        found.append(location)
    if kind == "local-dir":
        found += sorted(str(file) for file in Path(location).rglob("*") if file.is_file())
    return found


def match_nothing():
    """A wildcard regex no value matches: for rules whose alternatives the config leaves empty."""
    return "(?!)"


def _check_split_sizes(name, split):
    """What the config alone shows cannot be drawn: more records than a synthetic pool makes, a larger n_train
    than a side has."""
    needed = split["n_target"] + split["n_reference"] + split["n_holdout"]
    pool = config["datasets"][split["pool"]]
    if pool["source"] == "synthetic" and needed > pool["n_records"]:
        raise ValueError(
            f"config splits.{name}: n_target + n_reference + n_holdout = {needed} records, but the pool "
            f"{split['pool']!r} makes {pool['n_records']} (datasets.{split['pool']}.n_records)"
        )
    side = min(split["n_target"], split["n_reference"])
    too_large = sorted({p["n_train"] for p in POINTS.values() if p["n_train"] is not None and p["n_train"] > side})
    if too_large:
        raise ValueError(
            f"config n_train {too_large} exceeds the {side} records of a side of split {name!r} (n_target, n_reference)"
        )


def _check_config():
    for name, split in config["splits"].items():
        for role in ("pool", "public"):
            if split[role] not in config["datasets"]:
                raise ValueError(f"config splits.{name}.{role}: unknown dataset {split[role]!r}")
        if split["pool"] == split["public"]:
            raise ValueError(f"config splits.{name}: pool and public must be different data sets")
        _check_split_sizes(name, split)
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
    queries="|".join(TWO_MODEL_QUERIES),


def split_of(wildcards):
    return config["splits"][wildcards.split]


def pool_records(wildcards):
    return path("records", dataset=split_of(wildcards)["pool"])


def pool_annotations(wildcards):
    return path("annotations", dataset=split_of(wildcards)["pool"])


def public_records(wildcards):
    return path("records", dataset=split_of(wildcards)["public"])


def public_annotations(wildcards):
    return path("annotations", dataset=split_of(wildcards)["public"])


def side_split(wildcards, side=None):
    """The ids a side trains on: the split file, or its first n_train ids when the point sets n_train."""
    side = side or wildcards.side
    n_train = POINTS.get(wildcards.point, {}).get("n_train")  # external targets: the whole side
    if n_train is None:
        return path("split", split=wildcards.split, name=side)
    return path("split_subset", split=wildcards.split, n_train=n_train, side=side)


def query_split(wildcards):
    """Metrics queries: the records f_A trained on (target), those f_B trained on (reverse), or the holdout."""
    if wildcards.queries == "holdout":
        return path("split", split=wildcards.split, name="holdout")
    return side_split(wildcards, TWO_MODEL_QUERIES[wildcards.queries])


def metric_neighbors(wildcards, role):
    """The neighbours file of a two-model metrics job's `role` (target or reference): f_A is the target, except on
    B's own records (reverse), where f_B is."""
    target, reference = ("B", "A") if wildcards.queries == "reverse" else ("A", "B")
    side = target if role == "target" else reference
    return path("neighbors", split=wildcards.split, point=wildcards.point, side=side)


def caption_query_splits(wildcards):
    """The split files whose captions a model embeds as queries: B's too where the point is measured both ways."""
    names = (TWO_MODEL_QUERIES if wildcards.point in TRAINED_POINTS else QUERY_SETS).values()
    return expand(path("split", split=wildcards.split), name=names)


def all_targets():
    targets = figure_targets()
    for split in config["splits"]:
        if TRAINED_POINTS:
            targets.append(path("summary", split=split, ext="parquet"))
            targets += expand(path("seed_table", split=split, ext="parquet"), name=("seeds", "comparisons"))
        for point in TRAINED_POINTS:
            for queries in TWO_MODEL_QUERIES:
                targets += expand(PATHS["metrics"], split=split, point=point, queries=queries, table=METRIC_TABLES)
            if ONE_MODEL_MODES:
                targets += expand(
                    path("metrics_one_model", split=split, point=point, table="population"),
                    mode=ONE_MODEL_MODES,
                    queries=QUERY_SETS,
                )
                targets.append(path("agreement", split=split, point=point, name="agreement.parquet"))
        targets += expand(
            path("metrics_one_model", split=split, point="external~{target}", table="population"),
            target=ONE_MODEL["external_targets"],
            mode=ONE_MODEL_MODES,
            queries=QUERY_SETS,
        )
        targets += expand(
            path("utility", split=split, point="external~{target}", side="A"),
            target=ONE_MODEL["external_targets"] if ONE_MODEL_MODES else [],
        )
    return targets + ssl_targets()


def datasets_where(key, values):
    """Wildcard regex of the configured data sets whose `key` is in `values`; matches nothing if there are none."""
    names = [name for name, spec in config["datasets"].items() if spec[key] in values]
    return "|".join(map(re.escape, names)) or match_nothing()


def dataset_spec(wildcards):
    return config["datasets"][wildcards.dataset]
