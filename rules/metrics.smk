# Stage metrics: neighbours of both models + annotations -> per-record, population and sample-level tables.


rule metrics:
    input:
        target=f"{RESULTS}/neighbors/{{split}}/{{point}}/A.parquet",
        reference=f"{RESULTS}/neighbors/{{split}}/{{point}}/B.parquet",
        query_annotations=pool_annotations,
        public_annotations=public_annotations,
        queries=query_split,
    output:
        records=f"{RESULTS}/metrics/{{split}}/{{point}}/{{queries}}/records.parquet",
        population=f"{RESULTS}/metrics/{{split}}/{{point}}/{{queries}}/population.parquet",
        sample_level=f"{RESULTS}/metrics/{{split}}/{{point}}/{{queries}}/sample_level.parquet",
    params:
        metrics=config["metrics"],
        top_l=",".join(map(str, config["metrics"]["top_l"])),
        out_dir=lambda wc, output: os.path.dirname(output.records),
    log:
        f"{RESULTS}/logs/metrics/{{split}}/{{point}}/{{queries}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/metrics/{{split}}/{{point}}/{{queries}}.tsv"
    conda:
        "../envs/dejavu.yaml"
    shell:
        "python -m workflow_scripts.metrics --target-neighbors {input.target}"
        " --reference-neighbors {input.reference} --query-annotations {input.query_annotations}"
        " --public-annotations {input.public_annotations} --queries {input.queries}"
        " --k {params.metrics[k]} --top-n {params.metrics[top_n]} --top-l {params.top_l}"
        " --n-boot {params.metrics[bootstrap][n_boot]} --frac {params.metrics[bootstrap][frac]}"
        " --seed {params.metrics[bootstrap][seed]} --batch-rows {params.metrics[batch_rows]}"
        " --out-dir {params.out_dir} > {log} 2>&1"
