"""Exact caching: execution settings schedule nothing, result settings exactly their downstream, raw images tracked.

The rule (README, docs/DESIGN.md): a job reruns when a value that shapes its output changes (its params, its
inputs, its shell command) and so does everything downstream; threads, devices, batch sizes, row budgets and
key order never do.
"""

import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import polars as pl
import pytest
import yaml

from conftest import REPO, TINY, merged, planned_jobs, run_snakemake, snakemake_env
from real_data import build_coco, build_image_folder, jpeg_bytes


def scheduled(workdir: Path, config: dict, *targets: str) -> Counter:
    """Rule -> number of jobs a dry run of `config` schedules on the finished run in `workdir`."""
    return Counter(rule for rule, _ in planned_jobs(run_snakemake(workdir, config, *targets, "--dry-run").stdout))


# Execution settings of the default config, grouped by block: a dry run with all of a block's values changed
# schedules nothing only if none of them would schedule a job on its own (changes to params only add up).
# Both trainers (CLIP and SSL) take the same execution settings.
TRAINING_EXECUTION = {"threads": 2, "device": "cpu", "allow_cpu_fallback": False, "preload_images": False}
TRAINING_EXECUTION |= {"num_workers": 1}
EXECUTION_SETTINGS = {
    "datasets": {"datasets": {"scenes_pool": {"threads": 2}, "scenes_public": {"threads": 3}}},
    "training": {"training": TRAINING_EXECUTION},
    "embedding": {"embedding": {"threads": 3, "batch_size": 7, "device": "cpu", "allow_cpu_fallback": True}},
    "knn": {"knn": {"threads": 2, "batch_size": 3, "use_gpu": "never"}},
    "metrics": {"metrics": {"batch_rows": 17, "part_records": 5}},
    "one_model": {"one_model": {"batch_size": 5}},
    "ssl": {"ssl": {"training": TRAINING_EXECUTION, "one_model": {"crop_classifier": TRAINING_EXECUTION}}},
}


@pytest.mark.parametrize("block", EXECUTION_SETTINGS)
def test_execution_settings_schedule_nothing(tiny_workflow, block):
    assert scheduled(tiny_workflow, merged(TINY, EXECUTION_SETTINGS[block])) == Counter()


# Jobs per finished tiny run: 1 split, 2 points (epochs 1 and 2; one training run), P in 2 shards, sides A and B,
# query sets target, holdout and reverse (two-model; one-model: target and holdout), one-model modes t2i and t2t.
FIGURES = {"figures_point": 2, "figures_qualitative": 2, "summary": 1, "seeds": 1, "figures_sweep": 1, "all": 1}
METRICS = {"metrics": 6, "metrics_one_model": 8, "agreement": 2, **FIGURES}
SEARCH = {"knn_shard": 8, "knn": 4, **METRICS}
MODELS_DOWN = {
    "embed_public_shard": 8,
    "embed_public": 4,
    "embed_captions": 4,
    "embed_public_captions": 2,
    "knn_captions": 2,
    "utility": 4,
    **SEARCH,
}
TRAINING_DOWN = {"train": 2, "model": 4, **MODELS_DOWN}
# New splits: g re-embeds the query captions, and P's captions after the overlap check rewrites its exclusions.
SPLITS_DOWN = {"splits": 1, "overlap": 1, "embed_reference": 2, **TRAINING_DOWN, "knn_captions": 3}
# A new P: its data set, the overlap check and everything searched in P, never the splits or a training job.
PUBLIC_DOWN = {"synthetic_dataset": 1, "annotate_ground_truth": 1, "overlap": 1, "embed_reference": 1}
PUBLIC_DOWN |= {rule: n for rule, n in MODELS_DOWN.items() if rule != "embed_captions"} | {"knn_captions": 3}
# The overlap check's settings: the check and P's searches (whose excluded ids it writes); utility reads P itself.
NEAR_DUPLICATES_VLM_DOWN = {
    rule: n for rule, n in PUBLIC_DOWN.items() if rule not in ("synthetic_dataset", "annotate_ground_truth", "utility")
}

# The SSL tests' (tiny: 2 points, one training run, one layer, sides A and B, crop sets A, B and holdout; the
# two-model test and the one-model tests of two references, each reference trained once per side).
SSL_FIGURES = {"ssl_figure_accuracy": 6, "ssl_figure_qualitative": 2, "ssl_agreement": 2, "ssl_summary": 1, "all": 1}
SSL_METRICS = {"ssl_metrics": 6, **SSL_FIGURES}
SSL_SEARCH = {**SSL_METRICS, "ssl_knn": 12}
SSL_EMBEDDING_DOWN = {"ssl_embed": 4, **SSL_SEARCH}
SSL_TRAINING_DOWN = {"ssl_train": 2, "ssl_model": 4, **SSL_EMBEDDING_DOWN}
SSL_ONE_REFERENCE = {"ssl_metrics": 2, "ssl_figure_accuracy": 2, "ssl_agreement": 2, "ssl_summary": 1, "all": 1}
SSL_REFERENCES = {"ssl_crop_classifier_predict": 2, "ssl_naive_bayes": 2}
SSL_CROPS_DOWN = {**SSL_EMBEDDING_DOWN, "ssl_crop_tags": 1, "ssl_crop_classifier_train": 2, **SSL_REFERENCES}
# ...and the SSL test's screening of X, which re-embeds X (with the crops: one job per model), never a training.
NEAR_DUPLICATES_DOWN = {**NEAR_DUPLICATES_VLM_DOWN, "ssl_overlap": 1, **SSL_EMBEDDING_DOWN}

RESULT_SETTINGS = [
    ({"ssl": {"metrics": {"bootstrap": {"seed": 1}}}}, SSL_METRICS),
    ({"ssl": {"metrics": {"k": 4}}}, {**SSL_METRICS, **SSL_REFERENCES}),
    ({"ssl": {"knn": {"k": 6}}}, SSL_SEARCH),  # every test's target votes
    ({"ssl": {"one_model": {"naive_bayes": {"tags_k": 2}}}}, {"ssl_naive_bayes": 2, **SSL_ONE_REFERENCE}),
    (
        {"ssl": {"one_model": {"naive_bayes": {"min_visible": 0.5}}}},
        {"ssl_crop_tags": 1, "ssl_naive_bayes": 2, **SSL_ONE_REFERENCE},
    ),
    (
        {"ssl": {"one_model": {"crop_classifier": {"lr": 2.0e-3}}}},
        {"ssl_crop_classifier_train": 2, "ssl_crop_classifier_predict": 2, **SSL_ONE_REFERENCE},
    ),
    ({"ssl": {"crop": {"min_px": 4}}}, {"ssl_crops": 1, **SSL_CROPS_DOWN}),
    ({"ssl": {"training": {"lr": 2.0e-3}}}, SSL_TRAINING_DOWN),
    ({"ssl": {"training": {"method": "barlowtwins"}}}, SSL_TRAINING_DOWN),
    (
        {"ssl": {"split": {"seed": 1}}},
        {"ssl_split": 1, "ssl_overlap": 1, "ssl_crops": 1, **SSL_CROPS_DOWN, **SSL_TRAINING_DOWN},
    ),
    ({"metrics": {"bootstrap": {"seed": 1}}}, METRICS),
    ({"metrics": {"top_l": [10, 20]}}, METRICS),
    ({"knn": {"k": 6}}, {**SEARCH, "knn_captions": 3}),
    ({"utility": {"seed": 1}}, {"utility": 4, "summary": 1, "seeds": 1, "figures_sweep": 1, "all": 1}),
    ({"seeds": {"n_boot": 50}}, {"seeds": 1, "all": 1}),
    ({"training": {"lr": 2.0e-3}}, TRAINING_DOWN),
    ({"splits": {"scenes": {"seed": 1}}}, SPLITS_DOWN),
    ({"datasets": {"scenes_public": {"seed": 3}}}, PUBLIC_DOWN),
    ({"near_duplicates": {"min_similarity": 0.9}}, NEAR_DUPLICATES_DOWN),
]


@pytest.mark.parametrize("change, expected", RESULT_SETTINGS, ids=[str(change) for change, _ in RESULT_SETTINGS])
def test_result_settings_schedule_exactly_their_downstream(tiny_workflow, change, expected):
    assert scheduled(tiny_workflow, merged(TINY, change)) == Counter(expected)


def reordered(value):
    """The same mapping with the keys of every level in reverse order."""
    if isinstance(value, dict):
        return {key: reordered(value[key]) for key in reversed(list(value))}
    return value


def repository_copy(destination: Path) -> Path:
    """A copy of the repository's tracked files (not results/, .snakemake/ or the venv)."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True, check=True)
    for name in filter(None, files.stdout.split("\0")):
        (destination / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, destination / name)
    return destination


def test_yaml_key_order_is_irrelevant(tiny_workflow, tmp_path):
    # The embedded config.yaml itself in another key order (an overlay would keep the base file's order).
    copy_of_repo = repository_copy(tmp_path / "repo")
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    (copy_of_repo / "config.yaml").write_text(yaml.safe_dump(reordered(config), sort_keys=False))
    command = [
        sys.executable,
        "-m",
        "snakemake",
        "-s",
        str(copy_of_repo / "Snakefile"),
        "--directory",
        str(tiny_workflow),
        "--cores",
        "1",
        "--dry-run",
        "--configfile",
        str(tiny_workflow / "reordered.yaml"),
    ]
    (tiny_workflow / "reordered.yaml").write_text(yaml.safe_dump(reordered(TINY), sort_keys=False))
    result = subprocess.run(command, cwd=tiny_workflow, env=snakemake_env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert planned_jobs(result.stdout) == []


def test_a_project_path_with_a_quote_runs(tmp_path):
    """The shell prefix quotes the workflow directory: jobs of a copy under /it's here/ run."""
    copy_of_repo = repository_copy(tmp_path / "it's a project")
    workdir = tmp_path / "work"
    workdir.mkdir()
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(TINY))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "snakemake",
            "results/data/scenes_public/annotations.parquet",
            "-s",
            str(copy_of_repo / "Snakefile"),
            "--directory",
            str(workdir),
            "--cores",
            "2",
            "--configfile",
            str(config),
        ],
        cwd=workdir,
        env=snakemake_env(),
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert pl.read_parquet(workdir / "results/data/scenes_public/annotations.parquet").height == 150


def test_jobs_run_the_interpreter_that_runs_snakemake(tmp_path):
    """`.venv/bin/snakemake` works without the venv on PATH: jobs do not pick up another `python`."""
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(TINY))
    bare_path = {**os.environ, "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [
            str(Path(sys.executable).parent / "snakemake"),
            "results/data/scenes_public/annotations.parquet",
            "-s",
            str(REPO / "Snakefile"),
            "--cores",
            "2",
            "--configfile",
            str(config),
        ],
        cwd=tmp_path,
        env=bare_path,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert pl.read_parquet(tmp_path / "results/data/scenes_public/annotations.parquet").height == 150


@pytest.fixture
def raw_image_sets(tmp_path):
    """A COCO and an image-folder data set, adapted once: (workdir, config, folder, coco paths)."""
    raw = tmp_path / "raw"
    coco = build_coco(raw / "coco", 8, seed=3)
    folder = build_image_folder(raw / "inet", 3, seed=5)
    datasets = {
        "coco": {
            "source": "coco",
            "captions": str(coco["captions"]),
            "images": str(coco["images"]),
            "annotator": "ground_truth",
            "instances": str(coco["instances"]),
        },
        "inet": {"source": "image_folder", "images": str(folder), "annotator": "ground_truth"},
    }
    config = merged(TINY, {"datasets": datasets})
    workdir = tmp_path / "work"
    workdir.mkdir()
    run_snakemake(workdir, config, *TARGETS)
    assert scheduled(workdir, config, *TARGETS) == Counter()
    return workdir, config, folder, coco


TARGETS = ("results/data/coco/annotations.parquet", "results/data/inet/annotations.parquet")


def test_adding_an_image_reruns_its_data_set(raw_image_sets):
    workdir, config, folder, coco = raw_image_sets
    (folder / "cat" / "cat_9999.JPEG").write_bytes(jpeg_bytes(424242))
    assert scheduled(workdir, config, *TARGETS) == Counter({"image_folder_dataset": 1, "annotate_ground_truth": 1})
    (coco["images"] / "000000009999.jpg").write_bytes(jpeg_bytes(434343))
    assert scheduled(workdir, config, *TARGETS) == Counter(
        {"image_folder_dataset": 1, "coco_dataset": 1, "annotate_ground_truth": 2}
    )


def test_deleting_or_replacing_an_image_reruns_its_data_set(raw_image_sets):
    workdir, config, folder, coco = raw_image_sets
    next(iter(sorted((folder / "cat").iterdir()))).unlink()
    assert scheduled(workdir, config, *TARGETS) == Counter({"image_folder_dataset": 1, "annotate_ground_truth": 1})
    run_snakemake(workdir, config, *TARGETS)
    replaced = sorted(coco["images"].iterdir())[0]
    replaced.write_bytes(jpeg_bytes(515151))
    assert scheduled(workdir, config, *TARGETS) == Counter({"coco_dataset": 1, "annotate_ground_truth": 1})
