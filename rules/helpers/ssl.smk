# Helpers of rules/ssl.smk (Snakemake's linter wants functions and rules in separate files).

from workflow_scripts.paramspace import SSL_POINT_KEYS

SSL = config["ssl"]
SSL_DATASETS = [SSL["dataset"]] if SSL["enabled"] else []
SSL_POINTS = expand_points(SSL["training"], SSL.get("sweep", {}), SSL_POINT_KEYS) if SSL_DATASETS else {}
SSL_PLAN = training_runs(SSL_POINTS, SSL_POINT_KEYS)
SSL_SPLIT_NAMES = ("A", "B", "shared", "holdout", "public")
SSL_CROP_SETS = ("A", "B", "holdout")
SSL_TABLES = ("records", "population", "sample_level")
# Settings that choose where and how fast a model trains, not what it learns (execution flags: no rerun).
SSL_TRAINING_EXECUTION = ("device", "allow_cpu_fallback", "num_workers", "preload_images")
# How the job starts its processes (workflow_scripts.launch), as for the CLIP trainer: never a flag.
SSL_TRAINING_LAUNCH = ("nodes", "gpus_per_node", "use_srun")
# The embedding block's execution settings serve the SSL embedding jobs too.
SSL_EMBEDDING_EXECUTION = {key: config["embedding"][key] for key in ("batch_size", "device", "allow_cpu_fallback")}


def _check_ssl_config():
    if SSL_DATASETS and SSL["dataset"] not in config["datasets"]:
        raise ValueError(f"config ssl.dataset: unknown dataset {SSL['dataset']!r}")
    if SSL_DATASETS and SSL["metrics"]["k"] > SSL["knn"]["k"]:
        raise ValueError("config ssl.metrics.k must not exceed ssl.knn.k (neighbours are searched once)")


_check_ssl_config()


def ssl_records(wildcards):
    return path("records", dataset=wildcards.ssl_dataset)


def ssl_boxes(wildcards):
    return path("boxes", dataset=wildcards.ssl_dataset)


def ssl_training_flags(wildcards):
    """CLI flags of the SSL trainer: the run's point over `ssl.training`, and the checkpoints shorter points take."""
    settings = {**SSL["training"], **SSL_POINTS[wildcards.ssl_point]}
    for setting in ("threads", *SSL_TRAINING_EXECUTION, *SSL_TRAINING_LAUNCH):
        settings.pop(setting, None)
    settings["save_epochs"] = ",".join(map(str, save_epochs(SSL_PLAN, wildcards.ssl_point)))
    return to_cli_flags(settings)


def ssl_model_source(wildcards):
    """The file a point's model.pt is: its run's model, or for a shorter point the run's checkpoint at that epoch."""
    entry = SSL_PLAN[wildcards.ssl_point]
    fields = dict(ssl_dataset=wildcards.ssl_dataset, ssl_point=entry["run"], side=wildcards.side)
    if entry["run"] == wildcards.ssl_point:
        return path("ssl_run_model", **fields)
    return path("ssl_checkpoint", **fields, epoch=entry["epoch"])


def ssl_run_model(wildcards):
    return path(
        "ssl_run_model",
        ssl_dataset=wildcards.ssl_dataset,
        ssl_point=SSL_PLAN[wildcards.ssl_point]["run"],
        side=wildcards.side,
    )


def ssl_neighbor_files(wildcards):
    """{MODEL:CROPSET: neighbours file} of one point and layer: every model on every crop set."""
    return {
        f"{side}:{crop_set}": path("ssl_neighbors", **wildcards, side=side, crop_set=crop_set)
        for side in SIDES
        for crop_set in SSL_CROP_SETS
    }


def ssl_targets():
    """The SSL test's tables and figures for every point and layer (nothing when ssl.enabled is false)."""
    tables = expand(
        PATHS["ssl_metrics"], ssl_dataset=SSL_DATASETS, ssl_point=SSL_POINTS, layer=SSL["layers"], table=SSL_TABLES
    )
    return tables + ssl_figure_targets()


def ssl_figure_targets():
    """The SSL test's figures and summary: what `make figures` rebuilds from its cached tables."""
    figures = expand(
        PATHS["ssl_figure"],
        ssl_dataset=SSL_DATASETS,
        ssl_point=SSL_POINTS,
        layer=SSL["layers"],
        figure=("accuracy", "qualitative"),
        ext=("png", "svg"),
    )
    return figures + expand(PATHS["ssl_summary"], ssl_dataset=SSL_DATASETS, ext=("parquet", "csv"))


def ssl_metric_flags():
    """The SSL metric stage's result settings as flags (`--top-p` takes its percentages as separate words)."""
    metrics = SSL["metrics"]
    top_p = " ".join(map(str, metrics["top_p"]))
    return f"{to_cli_flags({'k': metrics['k'], **metrics['bootstrap']})} --top-p {top_p}"


def ssl_population_files(wildcards):
    """{POINT/LAYER: population table} of every point and layer, in config order."""
    return {
        f"{point}/{layer}": path(
            "ssl_metrics", ssl_dataset=wildcards.ssl_dataset, ssl_point=point, layer=layer, table="population"
        )
        for point in SSL_POINTS
        for layer in SSL["layers"]
    }
