# The one-model SSL tests' references (Kokhlikyan et al., NeurIPS 2024), each trained on one side's crops and
# measured on the other side's and the holdout's, and the published models they audit:
#   crop classifier: a supervised image classifier of the foreground label from the periphery crop;
#   naive Bayes: the tags an annotator finds in the crop -> the label.
# Neither depends on an SSL model: one reference per side serves every point and layer. docs/DESIGN.md §10.


rule ssl_import_external:
    """A published SSL model (ssl.one_model.external_targets) as a checkpoint the SSL embedding job loads."""
    input:
        external_files,
    output:
        PATHS["ssl_model"],
    log:
        f"{RESULTS}/logs/ssl/{{ssl_dataset}}/import/{{ssl_point}}/{{side}}.log",
    wildcard_constraints:
        ssl_point="external~[A-Za-z0-9_.-]+",
        side="A",
    conda:
        "../envs/dejavu.yaml"
    params:
        source=lambda wc: external_flags(SSL_EXTERNAL[wc.ssl_point]),
    shell:
        "python -m workflow_scripts.ssl.published import {params.source} --out {output} > {log} 2>&1"


rule ssl_crop_classifier_train:
    input:
        records=ssl_records,
        crops=PATHS["ssl_crops"],
        train=path("ssl_split", name="{side}"),
        validation=path("ssl_split", name="holdout"),
    output:
        model=path("ssl_classifier_run", name="model.pt"),
        log_table=path("ssl_classifier_run", name="train_log.parquet"),
    log:
        f"{RESULTS}/logs/ssl/{{ssl_dataset}}/references/crop_classifier/{{side}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/ssl/{{ssl_dataset}}/references/crop_classifier/{{side}}.tsv"
    conda:
        "../envs/dejavu.yaml"
    threads: CLASSIFIER["threads"]
    resources:
        **launch_resources(CLASSIFIER),
    params:
        flags=classifier_flags(),
        out_dir=lambda wc, output: os.path.dirname(output.model),
        launcher=lambda wc, threads: launch_command(CLASSIFIER),
        execution=execution_flags(**{key: CLASSIFIER[key] for key in SSL_TRAINING_EXECUTION}),
    shell:
        "{params.launcher} workflow_scripts.ssl.crop_classifier train --records {input.records} --crops {input.crops}"
        " --train-ids {input.train} --val-ids {input.validation} --out-dir {params.out_dir}"
        " {params.flags} {params.execution} > {log} 2>&1"


rule ssl_crop_classifier_predict:
    """A side's classifier on every crop set (its own side's: its training accuracy, in the log)."""
    input:
        model=path("ssl_classifier_run", name="model.pt"),
        records=ssl_records,
        crops=PATHS["ssl_crops"],
        sets=[path("ssl_split", name=name) for name in SSL_CROP_SETS],
    output:
        [path("ssl_predictions", reference="crop_classifier", crop_set=name) for name in SSL_CROP_SETS],
    log:
        f"{RESULTS}/logs/ssl/{{ssl_dataset}}/references/crop_classifier/{{side}}.predict.log",
    conda:
        "../envs/dejavu.yaml"
    threads: config["embedding"]["threads"]
    resources:
        gpu=EMBED_GPUS,
    params:
        predict=lambda wc, input, output: keyed_flags("predict", input.sets, output),
        votes_k=SSL["metrics"]["k"],
        execution=execution_flags(**SSL_EMBEDDING_EXECUTION),
    shell:
        "python -m workflow_scripts.ssl.crop_classifier predict --model {input.model} --records {input.records}"
        " --crops {input.crops} {params.predict} --votes-k {params.votes_k} {params.execution} > {log} 2>&1"


rule ssl_crop_tags:
    """The tags an annotator finds in each kept crop (ssl.one_model.naive_bayes.tags)."""
    input:
        unpack(crop_tags_input),
        crops=PATHS["ssl_crops"],
    output:
        PATHS["ssl_crop_tags"],
    log:
        f"{RESULTS}/logs/ssl/{{ssl_dataset}}/crop_tags.log",
    conda:
        "../envs/dejavu.yaml"
    params:
        source=crop_tags_command,
        settings=crop_tags_settings(),
    shell:
        "python -m workflow_scripts.ssl.crop_tags {params.source} {params.settings} --crops {input.crops}"
        " --out {output} > {log} 2>&1"


rule ssl_detic_chunk:
    """Detic on the kept crops (their pixels only) of one chunk of the SSL data set's records."""
    input:
        records=ssl_records,
        crops=PATHS["ssl_crops"],
        class_embeddings=lambda wc: path("detic_vocabulary", vocabulary=vocabulary_key(ssl_detic_spec(wc))),
        weights=lambda wc: ssl_detic_spec(wc)["weights"],
    output:
        PATHS["ssl_detic_chunk"],
    log:
        f"{RESULTS}/logs/ssl/{{ssl_dataset}}/detic-{{chunk}}.log",
    wildcard_constraints:
        chunk=r"\d+",
    conda:
        "../envs/detic.yaml"
    threads: lambda wc: ssl_detic_spec(wc)["workers"] + 1
    resources:
        gpu=lambda wc: gpus_for(ssl_detic_spec(wc)["device"]),
    params:
        n_chunks=lambda wc: ssl_detic_spec(wc)["n_chunks"],
        score_threshold=lambda wc: ssl_detic_spec(wc)["score_threshold"],
        batch_size=lambda wc: ssl_detic_spec(wc)["batch_size"],
        execution=lambda wc, threads: to_cli_flags(
            {"device": ssl_detic_spec(wc)["device"], "workers": ssl_detic_spec(wc)["workers"]}
        ),
        repo=lambda wc: shlex.quote(ssl_detic_spec(wc)["repo"]),
        config_file=lambda wc: shlex.quote(ssl_detic_spec(wc)["config_file"]),
    shell:
        "python -m workflow_scripts.detic detect --records {input.records} --crops {input.crops}"
        " --chunk {wildcards.chunk} --n-chunks {params.n_chunks} --detic-repo {params.repo}"
        " --config-file {params.config_file} --weights {input.weights:q} --class-embeddings {input.class_embeddings}"
        " --score-threshold {params.score_threshold} --batch-size {params.batch_size}"
        " {params.execution} --out {output} > {log} 2>&1"


rule ssl_naive_bayes:
    """Naive Bayes fitted on a side's crop tags and labels, predicting every crop set."""
    input:
        tags=PATHS["ssl_crop_tags"],
        crops=PATHS["ssl_crops"],
        train=path("ssl_split", name="{side}"),
        sets=[path("ssl_split", name=name) for name in SSL_CROP_SETS],
    output:
        [path("ssl_predictions", reference="naive_bayes", crop_set=name) for name in SSL_CROP_SETS],
    log:
        f"{RESULTS}/logs/ssl/{{ssl_dataset}}/references/naive_bayes/{{side}}.log",
    conda:
        "../envs/dejavu.yaml"
    params:
        predict=lambda wc, input, output: keyed_flags("predict", input.sets, output),
        model=to_cli_flags({key: NAIVE_BAYES[key] for key in ("tags_k", "alpha")}),
        votes_k=SSL["metrics"]["k"],
    shell:
        "python -m workflow_scripts.ssl.naive_bayes --tags {input.tags} --crops {input.crops}"
        " --train-ids {input.train} {params.predict} {params.model} --votes-k {params.votes_k} > {log} 2>&1"
