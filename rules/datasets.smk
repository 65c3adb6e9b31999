# Stage datasets: raw data (here: the synthetic scene generator) -> records.parquet (+ ground_truth.parquet).


rule synthetic_dataset:
    output:
        records=f"{RESULTS}/data/{{dataset}}/records.parquet",
        ground_truth=f"{RESULTS}/data/{{dataset}}/ground_truth.parquet",
        images=directory(f"{RESULTS}/data/{{dataset}}/images"),
    params:
        spec=lambda wc: config["datasets"][wc.dataset],
        generator=lambda wc: to_cli_flags(config.get("synthetic", {})),
        out_dir=lambda wc, output: os.path.dirname(output.records),
    log:
        f"{RESULTS}/logs/datasets/{{dataset}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/datasets/{{dataset}}.tsv"
    conda:
        "../envs/dejavu.yaml"
    shell:
        "python -m workflow_scripts.synthetic --dataset {wildcards.dataset}"
        " --n-records {params.spec[n_records]} --seed {params.spec[seed]} {params.generator}"
        " --out-dir {params.out_dir} > {log} 2>&1"
