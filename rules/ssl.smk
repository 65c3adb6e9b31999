# The SSL test (Meehan et al., NeurIPS 2023): image-only models f_A, f_B train on A ∪ shared and B ∪ shared;
# each measured image's periphery crop retrieves public images whose labels vote for its foreground object.
# splits -> crops -> train -> embed (public X, crops) -> knn (the VLM test's search) -> metrics -> figures, summary.
# The one-model tests (rules/ssl_references.smk) replace f_B by a reference classifier of the crop's label.
# `snakemake ssl` runs these tests alone; docs/DESIGN.md §9 and §10 define their metrics.


include: "helpers/ssl.smk"
include: "ssl_references.smk"


wildcard_constraints:
    ssl_dataset="|".join(map(re.escape, SSL_DATASETS)) or match_nothing(),
    ssl_point=f"{segment_regex(SSL_POINT_KEYS)}|external~[A-Za-z0-9_.-]+",
    layer="projector|backbone",
    crop_set="|".join(SSL_CROP_SETS),
    test="two_model|crop_classifier|naive_bayes",
    reference="crop_classifier|naive_bayes",


rule ssl:
    """Every SSL table and figure of the config."""
    input:
        ssl_targets(),


rule ssl_split:
    input:
        records=ssl_records,
        boxes=ssl_boxes,
        public_records=ssl_public_records,
    output:
        **{name: path("ssl_split", name=name) for name in SSL_SPLIT_NAMES},
    log:
        f"{RESULTS}/logs/ssl/{{ssl_dataset}}/splits.log",
    conda:
        "../envs/dejavu.yaml"
    params:
        label_column=SSL["label_column"],
        split=to_cli_flags(SSL["split"]),
        public=ssl_public_flag,
        out_dir=lambda wc, output: os.path.dirname(output.A),
    shell:
        "python -m workflow_scripts.ssl.splits --records {input.records} --boxes {input.boxes} {params.public}"
        " --label-column {params.label_column} {params.split} --out-dir {params.out_dir} > {log} 2>&1"


rule ssl_overlap:
    """X's near-duplicates of the images A, B, shared and the holdout hold (workflow_scripts.ssl.overlap)."""
    input:
        **{name: path("ssl_split", name=name) for name in SSL_SPLIT_NAMES},
        records=ssl_records,
        public_records=ssl_public_records,
    output:
        near_duplicates=path("ssl_split", name="near_duplicates"),
        public_screened=path("ssl_split", name="public_screened"),
    log:
        f"{RESULTS}/logs/ssl/{{ssl_dataset}}/overlap.log",
    conda:
        "../envs/dejavu.yaml"
    threads: NEAR_DUPLICATES["threads"]
    params:
        sets=lambda wc, input: " ".join(f"--{name} {input[name]}" for name in SSL_SPLIT_NAMES),
        public_records=ssl_public_flag,
        check=to_cli_flags({key: NEAR_DUPLICATES[key] for key in ("action", "min_similarity", "side")}),
        execution=execution_flags(),
    shell:
        "python -m workflow_scripts.ssl.overlap --records {input.records} {params.public_records} {params.sets}"
        " {params.check} {params.execution} --near-duplicates {output.near_duplicates}"
        " --public-screened {output.public_screened} > {log} 2>&1"


rule ssl_crops:
    input:
        records=ssl_records,
        boxes=ssl_boxes,
        ids=[path("ssl_split", name=name) for name in SSL_CROP_SETS],
    output:
        PATHS["ssl_crops"],
    log:
        f"{RESULTS}/logs/ssl/{{ssl_dataset}}/crops.log",
    conda:
        "../envs/dejavu.yaml"
    params:
        label_column=SSL["label_column"],
        crop=to_cli_flags(SSL["crop"]),
        ids=lambda wc, input: " ".join(f"--ids {file}" for file in input.ids),
    shell:
        "python -m workflow_scripts.ssl.crops --records {input.records} --boxes {input.boxes}"
        " --label-column {params.label_column} {params.ids} {params.crop} --out {output} > {log} 2>&1"


rule ssl_train:
    input:
        records=ssl_records,
        side=path("ssl_split", name="{side}"),
        shared=path("ssl_split", name="shared"),
    output:
        model=PATHS["ssl_run_model"],
        log_table=PATHS["ssl_train_log"],
    log:
        f"{RESULTS}/logs/ssl/{{ssl_dataset}}/train/{{ssl_point}}/{{side}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/ssl/{{ssl_dataset}}/train/{{ssl_point}}/{{side}}.tsv"
    conda:
        "../envs/dejavu.yaml"
    threads: SSL["training"]["threads"]
    resources:
        **launch_resources(SSL["training"]),
    params:
        flags=ssl_training_flags,
        out_dir=lambda wc, output: os.path.dirname(output.model),
        # One process per GPU: plain python, torchrun on one node, srun over several (workflow_scripts.launch).
        launcher=lambda wc, threads: launch_command(SSL["training"]),
        execution=execution_flags(**{key: SSL["training"][key] for key in SSL_TRAINING_EXECUTION}),
    shell:
        "{params.launcher} workflow_scripts.ssl.train --records {input.records} --ids {input.side} --ids {input.shared}"
        " --out-dir {params.out_dir} {params.flags} {params.execution} > {log} 2>&1"


rule ssl_model:
    """A point's model.pt: a relative symbolic link to its run's model or checkpoint (as rule `model`)."""
    input:
        ssl_run_model,
    output:
        PATHS["ssl_model"],
    log:
        f"{RESULTS}/logs/ssl/{{ssl_dataset}}/train/{{ssl_point}}/{{side}}.model.log",
    wildcard_constraints:
        ssl_point=segment_regex(SSL_POINT_KEYS),
    localrule: True
    conda:
        "../envs/dejavu.yaml"
    params:
        target=lambda wc, output: os.path.relpath(ssl_model_source(wc), os.path.dirname(output[0])),
    shell:
        "ln -sfn {params.target:q} {output:q} > {log} 2>&1"


rule ssl_embed:
    """X's full images and the kept crops of A, B and the holdout, under one model and layer (loaded once)."""
    input:
        model=PATHS["ssl_model"],
        records=ssl_records,
        public_records=ssl_public_records,
        public=path("ssl_split", name="public_screened"),
        crop_sets=[path("ssl_split", name=name) for name in SSL_CROP_SETS],
        crops=PATHS["ssl_crops"],
    output:
        public=path("ssl_embeddings", collection="public"),
        crop_sets=[path("ssl_embeddings", collection=f"crops_{name}") for name in SSL_CROP_SETS],
    log:
        f"{RESULTS}/logs/ssl/{{ssl_dataset}}/embed/{{ssl_point}}/{{side}}/{{layer}}.log",
    conda:
        "../envs/dejavu.yaml"
    threads: config["embedding"]["threads"]
    resources:
        gpu=EMBED_GPUS,
    params:
        crop_sets=lambda wc, input, output: keyed_flags("crop-images", input.crop_sets, output.crop_sets),
        public_records=ssl_public_flag,
        execution=execution_flags(**SSL_EMBEDDING_EXECUTION),
    shell:
        "python -m workflow_scripts.ssl.embed --model {input.model} --records {input.records} {params.public_records}"
        " --images {input.public}={output.public} {params.crop_sets} --crops {input.crops}"
        " --layer {wildcards.layer} {params.execution} > {log} 2>&1"


rule ssl_knn:
    """The VLM test's exact search (workflow_scripts.knn), P in one shard: X is small next to a caption pool."""
    input:
        queries=path("ssl_embeddings", collection="crops_{crop_set}"),
        public=path("ssl_embeddings", collection="public"),
    output:
        PATHS["ssl_neighbors"],
    log:
        f"{RESULTS}/logs/ssl/{{ssl_dataset}}/knn/{{ssl_point}}/{{side}}/{{layer}}/{{crop_set}}.log",
    conda:
        KNN_ENV
    threads: config["knn"]["threads"]
    resources:
        gpu=KNN_GPUS,
    params:
        k=SSL["knn"]["k"],
        execution=execution_flags(batch_size=config["knn"]["batch_size"], use_gpu=config["knn"]["use_gpu"]),
    shell:
        "python -m workflow_scripts.knn search --queries {input.queries} --public {input.public}"
        " --k {params.k} {params.execution} --out {output} > {log} 2>&1"


rule ssl_metrics:
    """One test's tables at one point and layer: the two-model test (f_B's neighbours as the reference) or a
    one-model test (a reference classifier's predictions)."""
    input:
        unpack(lambda wc: {role: list(files.values()) for role, files in ssl_metric_files(wc).items()}),
        crops=PATHS["ssl_crops"],
        records=ssl_public_records,  # the labels of X's images
        splits=[path("ssl_split", name=name) for name in SSL_CROP_SETS],
    output:
        **{table: path("ssl_metrics", table=table) for table in SSL_TABLES},
    log:
        f"{RESULTS}/logs/ssl/{{ssl_dataset}}/metrics/{{ssl_point}}/{{layer}}/{{test}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/ssl/{{ssl_dataset}}/metrics/{{ssl_point}}/{{layer}}/{{test}}.tsv"
    conda:
        "../envs/dejavu.yaml"
    params:
        label_column=SSL["label_column"],
        metrics=ssl_metric_flags(),
        votes=ssl_metric_flags_of,
        splits=lambda wc, input: keyed_flags("split", SSL_CROP_SETS, input.splits),
    shell:
        "python -m workflow_scripts.metrics.ssl --crops {input.crops} --records {input.records}"
        " --label-column {params.label_column} {params.splits} {params.votes} {params.metrics}"
        " --records-out {output.records} --population-out {output.population}"
        " --sample-level-out {output.sample_level} > {log} 2>&1"


rule ssl_figure_accuracy:
    input:
        path("ssl_metrics", table="population"),
    output:
        report(
            expand(path("ssl_figure", figure="accuracy"), ext=("png", "svg"), allow_missing=True),
            caption="../report/ssl_accuracy.rst",
            category="SSL",
        ),
    log:
        f"{RESULTS}/logs/ssl/{{ssl_dataset}}/figures/{{ssl_point}}/{{layer}}/{{test}}/accuracy.log",
    conda:
        "../envs/dejavu.yaml"
    shell:
        "python -m workflow_scripts.ssl.figures accuracy --population {input} --test {wildcards.test}"
        " --out {output} > {log} 2>&1"


rule ssl_figure_qualitative:
    """The two-model test's most confident memorized crops of A and their neighbours under f_A and f_B."""
    input:
        records=path("ssl_metrics", test="two_model", table="records"),
        crops=PATHS["ssl_crops"],
        images=ssl_records,
        public_records=ssl_public_records,
        target=path("ssl_neighbors", side="A", crop_set="A"),
        reference=path("ssl_neighbors", side="B", crop_set="A"),
    output:
        report(
            expand(path("ssl_figure", test="two_model", figure="qualitative"), ext=("png", "svg"), allow_missing=True),
            caption="../report/ssl_qualitative.rst",
            category="SSL",
        ),
    log:
        f"{RESULTS}/logs/ssl/{{ssl_dataset}}/figures/{{ssl_point}}/{{layer}}/two_model/qualitative.log",
    conda:
        "../envs/dejavu.yaml"
    params:
        label_column=SSL["label_column"],
    shell:
        "python -m workflow_scripts.ssl.figures qualitative --records {input.records} --crops {input.crops}"
        " --images-records {input.images} --neighbors-target {input.target} --neighbors-reference {input.reference}"
        " --public-records {input.public_records} --label-column {params.label_column} --out {output} > {log} 2>&1"


rule ssl_summary:
    """Every point, layer and test's top-1 population rows in one table (`workflow_scripts.ssl.summary`)."""
    input:
        populations=lambda wc: ssl_population_files(wc).values(),
    output:
        table=path("ssl_summary", ext="parquet"),
        csv=report(path("ssl_summary", ext="csv"), caption="../report/ssl_summary.rst", category="SSL"),
    log:
        f"{RESULTS}/logs/ssl/{{ssl_dataset}}/summary.log",
    conda:
        "../envs/dejavu.yaml"
    params:
        populations=lambda wc: keyed_flags("population", *zip(*ssl_population_files(wc).items())),
    shell:
        "python -m workflow_scripts.ssl.summary {params.populations}"
        " --out {output.table} --out-csv {output.csv} > {log} 2>&1"


rule ssl_agreement:
    """The two-model and one-model tests side by side on the same crops: population rows, the pairwise
    sample-level agreement (heat map) and the memorization confidence of the crops each flags (histograms)."""
    input:
        records=lambda wc: ssl_agreement_tables(wc, "records").values(),
        population=lambda wc: ssl_agreement_tables(wc, "population").values(),
        sample_level=lambda wc: ssl_agreement_tables(wc, "sample_level").values(),
    output:
        agreement=path("ssl_agreement", name="agreement.parquet"),
        population=path("ssl_agreement", name="population.parquet"),
        heatmap=report(
            expand(path("ssl_agreement", name="agreement.{ext}"), ext=("png", "svg"), allow_missing=True),
            caption="../report/ssl_agreement.rst",
            category="SSL",
        ),
        confidence=report(
            expand(path("ssl_agreement", name="confidence.{ext}"), ext=("png", "svg"), allow_missing=True),
            caption="../report/ssl_confidence.rst",
            category="SSL",
        ),
    log:
        f"{RESULTS}/logs/ssl/{{ssl_dataset}}/agreement/{{ssl_point}}/{{layer}}.log",
    conda:
        "../envs/dejavu.yaml"
    params:
        tables=lambda wc: " ".join(
            keyed_flags(flag, *zip(*ssl_agreement_tables(wc, table).items()))
            for flag, table in (("records", "records"), ("population", "population"), ("sample-level", "sample_level"))
        ),
    shell:
        "python -m workflow_scripts.ssl.agreement {params.tables} --out-agreement {output.agreement}"
        " --out-population {output.population} --out-heatmap {output.heatmap}"
        " --out-confidence {output.confidence} > {log} 2>&1"
