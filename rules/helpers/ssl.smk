# Helpers of rules/ssl.smk (Snakemake's linter wants functions and rules in separate files).

from workflow_scripts.paramspace import SSL_POINT_KEYS

SSL = config["ssl"]
SSL_DATASETS = [SSL["dataset"]] if SSL["enabled"] else []
SSL_TRAINS = bool(SSL_DATASETS) and SSL["training"]["enabled"]
SSL_POINTS = expand_points(SSL["training"], SSL.get("sweep", {}), SSL_POINT_KEYS) if SSL_TRAINS else {}
SSL_PLAN = training_runs(SSL_POINTS, SSL_POINT_KEYS)
# Published models audited with the one-model tests: each a point `external~NAME` whose one model sits at side A.
SSL_EXTERNAL = {f"external~{name}": spec for name, spec in SSL["one_model"]["external_targets"].items()}
SSL_EXTERNAL = SSL_EXTERNAL if SSL_DATASETS else {}
SSL_REFERENCES = tuple(SSL["one_model"]["references"])
SSL_TESTS = ("two_model", *SSL_REFERENCES)
SSL_SPLIT_NAMES = ("A", "B", "shared", "holdout", "public")
SSL_CROP_SETS = ("A", "B", "holdout")
SSL_TABLES = ("records", "population", "sample_level")
# Settings that choose where and how fast a model trains, not what it learns (execution flags: no rerun).
SSL_TRAINING_EXECUTION = ("device", "allow_cpu_fallback", "num_workers", "preload_images")
# How the job starts its processes (workflow_scripts.launch), as for the CLIP trainer: never a flag.
SSL_TRAINING_LAUNCH = ("nodes", "gpus_per_node", "use_srun")
# The embedding block's execution settings serve the SSL embedding jobs too.
SSL_EMBEDDING_EXECUTION = {key: config["embedding"][key] for key in ("batch_size", "device", "allow_cpu_fallback")}
CLASSIFIER = SSL["one_model"]["crop_classifier"]
NAIVE_BAYES = SSL["one_model"]["naive_bayes"]


def _check_ssl_config():
    if SSL_DATASETS and SSL["dataset"] not in config["datasets"]:
        raise ValueError(f"config ssl.dataset: unknown dataset {SSL['dataset']!r}")
    if SSL_DATASETS and SSL.get("public_dataset") not in (None, *config["datasets"]):
        raise ValueError(f"config ssl.public_dataset: unknown dataset {SSL['public_dataset']!r}")
    if SSL_DATASETS and SSL.get("public_dataset") == SSL["dataset"]:
        raise ValueError("config ssl.public_dataset: name another data set than ssl.dataset (or null for its own)")
    if SSL_DATASETS and SSL["metrics"]["k"] > SSL["knn"]["k"]:
        raise ValueError("config ssl.metrics.k must not exceed ssl.knn.k (neighbours are searched once)")


_check_ssl_config()


def ssl_records(wildcards):
    return path("records", dataset=wildcards.ssl_dataset)


def ssl_public_records(wildcards):
    """The records of X: another data set's (ssl.public_dataset) or the SSL data set's own."""
    return path("records", dataset=SSL.get("public_dataset") or wildcards.ssl_dataset)


def ssl_public_flag(wildcards, input):
    """--public-records when X is another data set's (the splits and the embedding take X's images from it)."""
    return f"--public-records {input.public_records}" if SSL.get("public_dataset") else ""


def ssl_boxes(wildcards):
    return path("boxes", dataset=wildcards.ssl_dataset)


def ssl_training_flags(wildcards):
    """CLI flags of the SSL trainer: the run's point over `ssl.training`, and the checkpoints shorter points take."""
    settings = {**SSL["training"], **SSL_POINTS[wildcards.ssl_point]}
    for setting in ("enabled", "threads", *SSL_TRAINING_EXECUTION, *SSL_TRAINING_LAUNCH):
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


def ssl_layers(point):
    """The layers a point is measured at: the config's, or an external target's own (a backbone by default)."""
    if point in SSL_EXTERNAL:
        return SSL_EXTERNAL[point].get("layers", ["backbone"])
    return SSL["layers"]


def ssl_tests(point):
    """The tests of a point: the two-model test where f_B exists, and every one-model reference."""
    return SSL_REFERENCES if point in SSL_EXTERNAL else SSL_TESTS


def model_side(point, side):
    """The side whose model gives `side`'s target votes: an external target is one model, kept at side A."""
    return "A" if point in SSL_EXTERNAL else side


def ssl_metric_files(wildcards):
    """{"target": {MODEL:CROPSET: neighbours}, "reference": {MODEL:CROPSET: neighbours or predictions}} of one
    point, layer and test (workflow_scripts.metrics.ssl_main's --target and --reference)."""
    point = dict(ssl_dataset=wildcards.ssl_dataset, ssl_point=wildcards.ssl_point, layer=wildcards.layer)
    files = {"target": {}, "reference": {}}
    for model, crop_set in (("A", "A"), ("B", "B"), ("A", "holdout"), ("B", "holdout")):
        side = model_side(wildcards.ssl_point, model)
        files["target"][f"{model}:{crop_set}"] = path("ssl_neighbors", **point, side=side, crop_set=crop_set)
    for model, crop_set in (("B", "A"), ("A", "B"), ("B", "holdout"), ("A", "holdout")):
        if wildcards.test == "two_model":
            reference = path("ssl_neighbors", **point, side=model, crop_set=crop_set)
        else:
            reference = path(
                "ssl_predictions",
                ssl_dataset=wildcards.ssl_dataset,
                reference=wildcards.test,
                side=model,
                crop_set=crop_set,
            )
        files["reference"][f"{model}:{crop_set}"] = reference
    return files


def ssl_metric_flags_of(wildcards):
    """--target and --reference flags of one metric job, and the kind of its references."""
    files = ssl_metric_files(wildcards)
    kind = "knn" if wildcards.test == "two_model" else "predictions"
    flags = [keyed_flags(role, *zip(*files[role].items())) for role in ("target", "reference")]
    return " ".join(flags) + f" --reference-kind {kind}"


def ssl_points():
    return [*SSL_POINTS, *SSL_EXTERNAL]


def ssl_targets():
    """The SSL tests' tables and figures for every point, layer and test (nothing when ssl.enabled is false)."""
    tables = [
        path("ssl_metrics", ssl_dataset=dataset, ssl_point=point, layer=layer, test=test, table=table)
        for dataset in SSL_DATASETS
        for point in ssl_points()
        for layer in ssl_layers(point)
        for test in ssl_tests(point)
        for table in SSL_TABLES
    ]
    return tables + ssl_figure_targets()


def ssl_figure_targets():
    """The SSL tests' figures, agreement and summary: what `make figures` rebuilds from their cached tables."""
    targets = []
    for dataset, point in ((dataset, point) for dataset in SSL_DATASETS for point in ssl_points()):
        for layer in ssl_layers(point):
            where = dict(ssl_dataset=dataset, ssl_point=point, layer=layer)
            figures = [(test, "accuracy") for test in ssl_tests(point)]
            figures += [("two_model", "qualitative")] if point in SSL_POINTS else []
            targets += [
                path("ssl_figure", **where, test=test, figure=figure, ext=ext)
                for test, figure in figures
                for ext in ("png", "svg")
            ]
            if len(ssl_tests(point)) > 1:
                targets += [path("ssl_agreement", **where, name=name) for name in SSL_AGREEMENT_FILES]
    return targets + expand(PATHS["ssl_summary"], ssl_dataset=SSL_DATASETS, ext=("parquet", "csv"))


SSL_AGREEMENT_FILES = (
    "agreement.parquet",
    "population.parquet",
    "agreement.png",
    "agreement.svg",
    "confidence.png",
    "confidence.svg",
)


def ssl_metric_flags():
    """The SSL metric stage's result settings as flags (`--top-p` takes its percentages as separate words)."""
    metrics = SSL["metrics"]
    top_p = " ".join(map(str, metrics["top_p"]))
    return f"{to_cli_flags({'k': metrics['k'], **metrics['bootstrap']})} --top-p {top_p}"


def ssl_population_files(wildcards):
    """{POINT/LAYER/TEST: population table} of every point, layer and test, in config order."""
    return {
        f"{point}/{layer}/{test}": path(
            "ssl_metrics",
            ssl_dataset=wildcards.ssl_dataset,
            ssl_point=point,
            layer=layer,
            test=test,
            table="population",
        )
        for point in ssl_points()
        for layer in ssl_layers(point)
        for test in ssl_tests(point)
    }


def ssl_agreement_tables(wildcards, table):
    """{TEST: its `table`} of one point and layer, tests in config order."""
    return {test: path("ssl_metrics", **wildcards, test=test, table=table) for test in ssl_tests(wildcards.ssl_point)}


def classifier_flags():
    """The crop classifier's training flags: its block less what only chooses where and how a job runs."""
    settings = {
        key: value
        for key, value in CLASSIFIER.items()
        if key not in ("threads", *SSL_TRAINING_EXECUTION, *SSL_TRAINING_LAUNCH)
    }
    return to_cli_flags(settings)


def other_side(side):
    return SIDES[1 - SIDES.index(side)]


def crop_tags_input(wildcards):
    """What the crop tags are made from: the generator's objects, a user's table, or (detic) the images."""
    source = NAIVE_BAYES["tags"]
    if source == "ground_truth":
        return {"objects": path("objects", dataset=wildcards.ssl_dataset)}
    if source == "precomputed":
        return {"table": NAIVE_BAYES["table"]}
    chunks = range(config["datasets"][wildcards.ssl_dataset]["detic"]["n_chunks"])
    return {"chunks": expand(path("ssl_detic_chunk", ssl_dataset=wildcards.ssl_dataset), chunk=chunks)}


def crop_tags_command(wildcards, input):
    """The crop tags CLI's subcommand and its input files (workflow_scripts.ssl.crop_tags)."""
    if NAIVE_BAYES["tags"] == "ground_truth":
        return f"ground-truth --objects {input.objects}"
    if NAIVE_BAYES["tags"] == "precomputed":
        return f"precomputed --table {input.table}"
    return f"detic --chunks {input.chunks}"


def crop_tags_settings():
    """The crop tags' result settings: a plain param (a params function of the input is not recorded)."""
    return f"--min-visible {NAIVE_BAYES['min_visible']}" if NAIVE_BAYES["tags"] == "ground_truth" else ""


def ssl_detic_spec(wildcards):
    """The SSL data set's `detic` block: Detic's settings for its crops as for its images."""
    spec = config["datasets"][wildcards.ssl_dataset]
    if "detic" not in spec:
        raise ValueError(f"ssl.one_model.naive_bayes.tags is detic: give datasets.{wildcards.ssl_dataset}.detic")
    return spec["detic"]


def external_flags(spec):
    """The import CLI's flags of an external target (workflow_scripts.ssl.published)."""
    flags = f"--model {shlex.quote(spec['model'])}"
    if spec.get("weights"):
        flags += f" --weights {shlex.quote(spec['weights'])}"
    if spec.get("preprocess"):
        flags += f" --preprocess {shlex.quote(json.dumps(spec['preprocess']))}"
    return flags


def external_files(wildcards):
    """The local files an external target is read from (`local_model_files`; timm caches are not tracked)."""
    spec = SSL_EXTERNAL[wildcards.ssl_point]
    return local_model_files(spec["model"], spec.get("weights"))
