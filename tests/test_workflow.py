"""The real Snakemake DAG: a tiny config end to end, and the embedded default's scientific claim."""

import polars as pl
import pyarrow.parquet as pq
import yaml

from conftest import POINT, REPO, TINY, run_snakemake

CONTRACTS = {
    "data/scenes_pool/records.parquet": {"id": "string", "image_path": "string", "captions": "list<element: string>"},
    "data/scenes_pool/annotations.parquet": {
        "id": "string",
        "labels": "list<element: string>",
        "scores": "list<element: float>",
    },
    "splits/scenes/A.parquet": {"id": "string"},
    "splits/scenes/B.parquet": {"id": "string"},
    "splits/scenes/holdout.parquet": {"id": "string"},
    f"models/scenes/{POINT}/A/run/train_log.parquet": {"epoch": "int64", "loss": "double", "seconds": "double"},
    f"embeddings/scenes/{POINT}/A/public.parquet": {"id": "string", "embedding": "fixed_size_list<element: float>[64]"},
    f"embeddings/scenes/{POINT}/B/captions.parquet": {
        "id": "string",
        "embedding": "fixed_size_list<element: float>[64]",
    },
    f"neighbors/scenes/{POINT}/A.parquet": {
        "query_id": "string",
        "rank": "int16",
        "public_id": "string",
        "score": "float",
    },
    f"metrics/scenes/{POINT}/target/records.parquet": {
        "id": "string",
        "label_mode": "string",
        "n_objects": "int32",
        "precision_target": "double",
        "recall_reference": "double",
        "f1_target": "double",
        "n_correct_target": "int32",
        "nn_score_target": "float",
    },
    f"metrics/scenes/{POINT}/holdout/population.parquet": {
        "metric": "string",
        "value": "double",
        "mean": "double",
        "std": "double",
        "n_boot": "int64",
        "frac": "double",
        "k": "int32",
        "label_mode": "string",
        "n_records": "int64",
    },
    f"metrics/scenes/{POINT}/target/sample_level.parquet": {
        "order": "string",
        "top_l": "int64",
        "precision_gap": "double",
        "recall_gap": "double",
        "f1_gap": "double",
    },
}


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
    """The embedded default's longest unmasked point, as `make run` computes it.

    Two-model test: every gap positive on A, near zero on the holdout. One-model test (t2i): its reference is
    another kind of model, so the holdout gap is not zero; the memorization signal is the net gap, target
    minus holdout, and it must be positive.
    """
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    epochs = max(config["sweep"]["epochs"])
    point = (
        f"n_train~all/epochs~{epochs}/temperature~learned/weight_decay~{config['training']['weight_decay']}"
        f"/mask_ratio~0.0/seed~{config['training']['seed']}"
    )
    tests = ("", "one_model~t2i/")
    targets = [
        f"results/metrics/scenes/{point}/{test}{queries}/population.parquet"
        for test in tests
        for queries in ("target", "holdout")
    ]
    run_snakemake(tmp_path, None, *targets)

    def population(test, queries, label_mode):
        path = tmp_path / f"results/metrics/scenes/{point}/{test}{queries}/population.parquet"
        table = pl.read_parquet(path).filter(pl.col("label_mode") == label_mode)
        return {row["metric"]: row for row in table.iter_rows(named=True)}

    for label_mode in ("all", "top_n"):
        target, holdout = population("", "target", label_mode), population("", "holdout", label_mode)
        for metric in ("PPG", "PRG", "AUCG"):
            assert target[metric]["value"] > 0, (label_mode, target[metric])
            assert target[metric]["mean"] > 2 * target[metric]["std"], (label_mode, target[metric])
        for metric in ("PPG", "PRG"):
            assert abs(holdout[metric]["value"]) < 3 * holdout[metric]["std"], (label_mode, holdout[metric])
        one_target = population("one_model~t2i/", "target", label_mode)
        one_holdout = population("one_model~t2i/", "holdout", label_mode)
        for metric in ("PPG", "PRG", "AUCG"):
            assert one_target[metric]["value"] - one_holdout[metric]["value"] > 0, (label_mode, metric)


SSL_POINT = "method~simclr/epochs~2/seed~0"
SSL_CONTRACTS = {
    "ssl/scenes_pool/crops.parquet": {"id": "string", "label": "string", "x_min": "int32", "drop_reason": "string"},
    f"ssl/scenes_pool/models/{SSL_POINT}/A/run/train_log.parquet": {"epoch": "int64", "embedding_std": "double"},
    f"ssl/scenes_pool/embeddings/{SSL_POINT}/A/projector/public.parquet": {
        "id": "string",
        "embedding": "fixed_size_list<element: float>[32]",
    },
    f"ssl/scenes_pool/neighbors/{SSL_POINT}/B/projector/A.parquet": {"query_id": "string", "rank": "int16"},
    f"ssl/scenes_pool/metrics/{SSL_POINT}/projector/two_model/records.parquet": {
        "crop_set": "string",
        "target_model": "string",
        "predicted_target": "string",
        "correct_top1_reference": "bool",
    },
    f"ssl/scenes_pool/metrics/{SSL_POINT}/projector/two_model/population.parquet": {
        "statistic": "string",
        "std": "double",
    },
    f"ssl/scenes_pool/metrics/{SSL_POINT}/projector/two_model/sample_level.parquet": {"entropy_gap": "double"},
    f"ssl/scenes_pool/metrics/{SSL_POINT}/projector/naive_bayes/population.parquet": {"statistic": "string"},
    f"ssl/scenes_pool/metrics/{SSL_POINT}/projector/crop_classifier/records.parquet": {"entropy_reference": "double"},
    "ssl/scenes_pool/references/crop_classifier/B/A.parquet": {"votes": "list<element: string>"},
    "ssl/scenes_pool/references/crop_classifier/A/run/train_log.parquet": {"val_accuracy": "double"},
    "ssl/scenes_pool/references/naive_bayes/A/B.parquet": {"predicted": "string", "entropy": "double"},
    "ssl/scenes_pool/crop_tags.parquet": {"id": "string"},
    f"ssl/scenes_pool/agreement/{SSL_POINT}/projector/agreement.parquet": {"test_a": "string", "jaccard": "double"},
    f"ssl/scenes_pool/agreement/{SSL_POINT}/projector/population.parquet": {"test": "string", "value": "double"},
    "ssl/scenes_pool/summary.parquet": {"point": "string", "epochs": "int64", "layer": "string", "test": "string"},
}


def test_tiny_dag_runs_the_ssl_test(tiny_workflow):
    results = tiny_workflow / "results"
    for relative, columns in SSL_CONTRACTS.items():
        found = {field.name: str(field.type) for field in pq.read_schema(results / relative)}
        for name, type_ in columns.items():
            assert found.get(name) == type_, f"{relative}: column {name} is {found.get(name)}, expected {type_}"
    figures = [f"{test}/accuracy" for test in ("two_model", "crop_classifier", "naive_bayes")] + [
        "two_model/qualitative"
    ]
    for figure in figures:
        for ext in ("png", "svg"):
            assert (results / f"ssl/scenes_pool/figures/{SSL_POINT}/projector/{figure}.{ext}").stat().st_size > 1000
    for figure in ("agreement", "confidence"):
        assert (results / f"ssl/scenes_pool/agreement/{SSL_POINT}/projector/{figure}.png").stat().st_size > 1000
    # the shorter point's model is the run's checkpoint, not a second run
    short = results / "ssl/scenes_pool/models/method~simclr/epochs~1/seed~0/A/model.pt"
    assert short.resolve() == (results / f"ssl/scenes_pool/models/{SSL_POINT}/A/run/model_epoch1.pt").resolve()
    summary = pl.read_parquet(results / "ssl/scenes_pool/summary.parquet")
    assert sorted(summary["epochs"].unique()) == [1, 2] and set(summary["statistic"]) >= {"gap", "holdout_gap"}
    crops = pl.read_parquet(results / "ssl/scenes_pool/crops.parquet")
    kept = crops.filter(pl.col("drop_reason").is_null()).height
    for test in ("two_model", "crop_classifier", "naive_bayes"):
        records = pl.read_parquet(results / f"ssl/scenes_pool/metrics/{SSL_POINT}/projector/{test}/records.parquet")
        assert records.height == kept  # one row per kept crop
    assert set(summary["test"]) == {"two_model", "crop_classifier", "naive_bayes"}
