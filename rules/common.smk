# Shared setup: config validation, parameter points, path helpers, wildcard constraints.

import os
import re
import sys

from snakemake.utils import validate

# The stage logic lives in the importable package workflow_scripts/ next to this Snakefile;
# jobs run `python -m workflow_scripts.<stage>`, locally, in conda envs or on cluster nodes.
shell.prefix(f"set -euo pipefail; export PYTHONPATH='{workflow.basedir}'${{{{PYTHONPATH:+:$PYTHONPATH}}}}; ")
sys.path.insert(0, workflow.basedir)

from workflow_scripts.cli import to_cli_flags
from workflow_scripts.paramspace import expand_points, segment_regex


validate(config, "../config/schema.yaml")

RESULTS = "results"
POINTS = expand_points(config["training"], config.get("sweep", {}))
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


wildcard_constraints:
    dataset="|".join(map(re.escape, config["datasets"])),
    split="|".join(map(re.escape, config["splits"])),
    point=segment_regex(),
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
    """CLI flags of the training stage: the point's values over the `training` block."""
    settings = {**config["training"], **POINTS[wildcards.point]}
    return to_cli_flags(settings)


def all_targets():
    targets = []
    for split in config["splits"]:
        for point in POINTS:
            for queries in QUERY_SETS:
                targets += expand(
                    "{results}/metrics/{split}/{point}/{queries}/{table}.parquet",
                    results=RESULTS, split=split, point=point, queries=queries,
                    table=("records", "population", "sample_level"),
                )
            targets += expand(
                "{results}/figures/{split}/{point}/{figure}.{ext}",
                results=RESULTS, split=split, point=point, figure=("recall_cdf", "gap_vs_top_l"), ext=("png", "svg"),
            )
    return targets
