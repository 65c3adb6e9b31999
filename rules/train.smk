# Stage train: one job per model (side A or B) per training run, into the run's folder; rule `model` then gives
# every point its model.pt (the run's model, the run's checkpoint for a shorter-epoch point, or an import).


include: "helpers/train.smk"


rule subset_split:
    """The first n_train ids of a side (a prefix, so smaller training sets nest in larger ones)."""
    input:
        path("split", name="{side}"),
    output:
        PATHS["split_subset"],
    log:
        f"{RESULTS}/logs/splits/{{split}}/n_train~{{n_train}}/{{side}}.log",
    wildcard_constraints:
        n_train=r"\d+",
    conda:
        "../envs/dejavu.yaml"
    shell:
        "python -m workflow_scripts.splits subset --split {input} --n {wildcards.n_train} --out {output} > {log} 2>&1"


rule train:
    input:
        records=pool_records,
        split=side_split,
        start=local_model_files(config["training"]["model"]),  # a local-dir: model's published weights
    output:
        model=PATHS["run_model"],
        log_table=PATHS["train_log"],
    log:
        f"{RESULTS}/logs/train/{{split}}/{{point}}/{{side}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/train/{{split}}/{{point}}/{{side}}.tsv"
    conda:
        "../envs/dejavu.yaml"
    threads: config["training"].get("threads", 1)
    resources:
        **launch_resources(config["training"]),
    params:
        flags=training_flags,
        out_dir=lambda wc, output: os.path.dirname(output.model),
        # One process per GPU: plain python, torchrun on one node, srun over several (workflow_scripts.launch).
        # Derived from threads, so Snakemake does not record it: how a model trains, not what it learns.
        launcher=lambda wc, threads: launch_command(config["training"]),
        execution=execution_flags(**{key: config["training"][key] for key in TRAINING_EXECUTION}),
    shell:
        "{params.launcher} workflow_scripts.train --records {input.records} --split {input.split}"
        " --out-dir {params.out_dir} {params.flags} {params.execution} > {log} 2>&1"


rule model:
    """A point's model.pt: a relative symbolic link to the file that holds it (`model_source`).

    A symbolic link, not a hard link: Snakemake touches every output after its job, and touching a hard link would
    touch the run's own model.pt, which would then look newer than the links of the run's shorter points.
    """
    input:
        model_producer,
    output:
        PATHS["model"],
    log:
        f"{RESULTS}/logs/train/{{split}}/{{point}}/{{side}}.model.log",
    localrule: True
    conda:
        "../envs/dejavu.yaml"
    params:
        target=lambda wc, output: os.path.relpath(model_source(wc), os.path.dirname(output[0])),
    shell:
        "ln -sfn {params.target:q} {output:q} > {log} 2>&1"
