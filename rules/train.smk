# Stage train: one job per model (side A or B) per parameter point.


rule train:
    input:
        records=pool_records,
        split=f"{RESULTS}/splits/{{split}}/{{side}}.parquet",
    output:
        model=f"{RESULTS}/models/{{split}}/{{point}}/{{side}}/model.pt",
        log_table=f"{RESULTS}/models/{{split}}/{{point}}/{{side}}/train_log.parquet",
    params:
        flags=training_flags,
        out_dir=lambda wc, output: os.path.dirname(output.model),
    threads: config["training"].get("threads", 1)
    resources:
        gpu=lambda wc: 0 if config["training"].get("device") == "cpu" else 1,
    log:
        f"{RESULTS}/logs/train/{{split}}/{{point}}/{{side}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/train/{{split}}/{{point}}/{{side}}.tsv"
    conda:
        "../envs/dejavu.yaml"
    shell:
        "python -m workflow_scripts.train --records {input.records} --split {input.split}"
        " --out-dir {params.out_dir} {params.flags} --threads {threads} > {log} 2>&1"
