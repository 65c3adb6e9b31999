"""The real Snakemake DAG: a tiny config end to end, and the embedded default's scientific claim."""

import pyarrow.parquet as pq
import polars as pl
import pytest
import yaml

from conftest import REPO, run_snakemake

TINY = {
    "datasets": {
        "scenes_pool": {"source": "synthetic", "n_records": 300, "seed": 1, "annotator": "ground_truth"},
        "scenes_public": {"source": "synthetic", "n_records": 150, "seed": 2, "annotator": "ground_truth"},
    },
    "splits": {"scenes": {"pool": "scenes_pool", "public": "scenes_public", "n_target": 96,
                          "n_reference": 96, "n_holdout": 48, "seed": 0}},
    "training": {"epochs": 2, "batch_size": 32, "warmup_steps": 2},
    "sweep": {"epochs": [2]},
    "knn": {"k": 5},
    "metrics": {"k": 5, "top_n": 5, "bootstrap": {"n_boot": 10, "frac": 0.5, "seed": 0}},
}
POINT = "epochs~2/temperature~learned/weight_decay~0.1/mask_ratio~0.0/seed~0"

CONTRACTS = {
    "data/scenes_pool/records.parquet": {"id": "string", "image_path": "string", "captions": "list<element: string>"},
    "data/scenes_pool/annotations.parquet": {"id": "string", "labels": "list<element: string>",
                                             "scores": "list<element: float>"},
    "splits/scenes/A.parquet": {"id": "string"},
    "splits/scenes/B.parquet": {"id": "string"},
    "splits/scenes/holdout.parquet": {"id": "string"},
    f"models/scenes/{POINT}/A/train_log.parquet": {"epoch": "int64", "loss": "double", "seconds": "double"},
    f"embeddings/scenes/{POINT}/A/public.parquet": {"id": "string", "embedding": "fixed_size_list<element: float>[64]"},
    f"embeddings/scenes/{POINT}/B/captions.parquet": {"id": "string",
                                                       "embedding": "fixed_size_list<element: float>[64]"},
    f"neighbors/scenes/{POINT}/A.parquet": {"query_id": "string", "rank": "int16", "public_id": "string",
                                            "score": "float"},
    f"metrics/scenes/{POINT}/target/records.parquet": {
        "id": "string", "label_mode": "string", "n_objects": "int32", "precision_target": "double",
        "recall_reference": "double", "f1_target": "double", "n_correct_target": "int32", "nn_score_target": "float"},
    f"metrics/scenes/{POINT}/holdout/population.parquet": {
        "metric": "string", "value": "double", "mean": "double", "std": "double", "n_boot": "int64",
        "frac": "double", "k": "int32", "label_mode": "string", "n_records": "int64"},
    f"metrics/scenes/{POINT}/target/sample_level.parquet": {
        "order": "string", "top_l": "int64", "precision_gap": "double", "recall_gap": "double", "f1_gap": "double"},
}


@pytest.fixture(scope="module")
def tiny_workflow(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("tiny_workflow")
    run_snakemake(workdir, TINY)
    return workdir


def test_tiny_dag_writes_every_contract_table(tiny_workflow):
    results = tiny_workflow / "results"
    for relative, columns in CONTRACTS.items():
        schema = pq.read_schema(results / relative)
        found = {field.name: str(field.type) for field in schema}
        for name, type_ in columns.items():
            assert found.get(name) == type_, f"{relative}: column {name} is {found.get(name)}, expected {type_}"
        assert schema.metadata[b"dejavu:stage"], relative
    for figure in ("recall_cdf", "gap_vs_top_l"):
        for ext in ("png", "svg"):
            assert (results / f"figures/scenes/{POINT}/{figure}.{ext}").stat().st_size > 1000
    assert list((results / "benchmarks" / "train").rglob("*.tsv"))
    assert (results / "logs" / "train").exists()


def test_second_run_has_nothing_to_do(tiny_workflow):
    result = run_snakemake(tiny_workflow, TINY, "--dry-run")
    assert "Nothing to be done" in result.stdout + result.stderr


def test_invalid_config_is_refused_with_the_key(tmp_path):
    bad = {**TINY, "knn": {"k": 0}}
    result = run_snakemake(tmp_path, bad, "--dry-run", check=False)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "instance['knn']['k']" in output and "minimum" in output


def test_default_config_finds_memorization_and_a_clean_control(tmp_path):
    """The embedded default, exactly as `make run` runs it: gaps positive on A, near zero on the holdout."""
    run_snakemake(tmp_path, None)
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    point = next(iter((tmp_path / "results" / "metrics" / "scenes").glob("epochs~*")))
    assert config["sweep"]["epochs"] == [int(point.name.split("~")[1])]
    metrics_dir = next((tmp_path / "results" / "metrics" / "scenes").rglob("target")).parent
    for label_mode in ("all", "top_n"):
        target = pl.read_parquet(metrics_dir / "target" / "population.parquet").filter(
            pl.col("label_mode") == label_mode)
        holdout = pl.read_parquet(metrics_dir / "holdout" / "population.parquet").filter(
            pl.col("label_mode") == label_mode)
        for metric in ("PPG", "PRG", "AUCG"):
            row = target.filter(pl.col("metric") == metric).row(0, named=True)
            assert row["value"] > 0 and row["mean"] > 2 * row["std"], (label_mode, row)
        for metric in ("PPG", "PRG"):
            row = holdout.filter(pl.col("metric") == metric).row(0, named=True)
            assert abs(row["value"]) < 3 * row["std"], (label_mode, row)
