# Stage metrics: neighbours of both models + annotations -> per-record, population and sample-level tables.
# Queries target and holdout: f_A the target, f_B the reference; queries reverse (metrics.symmetric): B's records,
# f_B the target and f_A the reference.


rule metrics:
    input:
        target=lambda wc: metric_neighbors(wc, "target"),
        reference=lambda wc: metric_neighbors(wc, "reference"),
        query_annotations=pool_annotations,
        public_annotations=public_annotations,
        queries=query_split,
    output:
        records=path("metrics", table="records"),
        population=path("metrics", table="population"),
        sample_level=path("metrics", table="sample_level"),
    log:
        f"{RESULTS}/logs/metrics/{{split}}/{{point}}/{{queries}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/metrics/{{split}}/{{point}}/{{queries}}.tsv"
    conda:
        "../envs/dejavu.yaml"
    params:
        k=config["metrics"]["k"],
        top_n=config["metrics"]["top_n"],
        top_l=",".join(map(str, config["metrics"]["top_l"])),
        n_boot=config["metrics"]["bootstrap"]["n_boot"],
        frac=config["metrics"]["bootstrap"]["frac"],
        seed=config["metrics"]["bootstrap"]["seed"],
        execution=execution_flags(
            pass_threads=False,
            batch_rows=config["metrics"]["batch_rows"],
            part_records=config["metrics"]["part_records"],
        ),
    shell:
        "python -m workflow_scripts.metrics --target-neighbors {input.target}"
        " --reference-neighbors {input.reference} --query-annotations {input.query_annotations}"
        " --public-annotations {input.public_annotations} --queries {input.queries}"
        " --k {params.k} --top-n {params.top_n} --top-l {params.top_l}"
        " --n-boot {params.n_boot} --frac {params.frac} --seed {params.seed} {params.execution}"
        " --records {output.records} --population {output.population} --sample-level {output.sample_level}"
        " > {log} 2>&1"
