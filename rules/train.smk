# Stage train: one job per model (side A or B) per training run; shorter-epoch points reuse the run's checkpoints.


rule subset_split:
    """The first n_train ids of a side (a prefix, so smaller training sets nest in larger ones)."""
    input:
        f"{RESULTS}/splits/{{split}}/{{side}}.parquet",
    output:
        f"{RESULTS}/splits/{{split}}/n_train~{{n_train}}/{{side}}.parquet",
    wildcard_constraints:
        n_train=r"\d+",
    log:
        f"{RESULTS}/logs/splits/{{split}}/n_train~{{n_train}}/{{side}}.log",
    conda:
        "../envs/dejavu.yaml"
    shell:
        "python -m workflow_scripts.splits subset --split {input} --n {wildcards.n_train} --out {output} > {log} 2>&1"


rule train:
    input:
        records=pool_records,
        split=side_split,
    output:
        model=f"{RESULTS}/models/{{split}}/{{point}}/{{side}}/model.pt",
        log_table=f"{RESULTS}/models/{{split}}/{{point}}/{{side}}/train_log.parquet",
    wildcard_constraints:
        point=alternation(RUNS),
    params:
        flags=training_flags,
        out_dir=lambda wc, output: os.path.dirname(output.model),
        # One process per GPU: plain python, torchrun on one node, srun over several (workflow_scripts.launch).
        launcher=launch_command(config["training"]),
    threads: config["training"].get("threads", 1)
    resources:
        **launch_resources(config["training"]),
    log:
        f"{RESULTS}/logs/train/{{split}}/{{point}}/{{side}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/train/{{split}}/{{point}}/{{side}}.tsv"
    conda:
        "../envs/dejavu.yaml"
    shell:
        "{params.launcher} workflow_scripts.train --records {input.records} --split {input.split}"
        " --out-dir {params.out_dir} {params.flags} --threads {threads} > {log} 2>&1"


rule early_stopped_model:
    """A shorter-epoch point: the run's checkpoint at that epoch (hard link when possible, else a copy)."""
    input:
        run_model=lambda wc: f"{RESULTS}/models/{wc.split}/{PLAN[wc.point]['run']}/{wc.side}/model.pt",
    output:
        f"{RESULTS}/models/{{split}}/{{point}}/{{side}}/model.pt",
    wildcard_constraints:
        point=alternation(set(POINTS) - RUNS) or "(?!)",
    params:
        checkpoint=run_checkpoint,
    log:
        f"{RESULTS}/logs/train/{{split}}/{{point}}/{{side}}.log",
    conda:
        "../envs/dejavu.yaml"
    shell:
        # touch: the link shares the checkpoint's older mtime, which would look outdated next to the run's model.
        "(ln -f {params.checkpoint} {output} || cp {params.checkpoint} {output}) > {log} 2>&1 && touch {output}"
