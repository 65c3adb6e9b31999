# Stage annotate: records -> annotations.parquet (id, labels, scores), one row per record.


rule annotate_ground_truth:
    input:
        records=f"{RESULTS}/data/{{dataset}}/records.parquet",
        ground_truth=f"{RESULTS}/data/{{dataset}}/ground_truth.parquet",
    output:
        f"{RESULTS}/data/{{dataset}}/annotations.parquet",
    log:
        f"{RESULTS}/logs/annotate/{{dataset}}.log",
    conda:
        "../envs/dejavu.yaml"
    shell:
        "python -m workflow_scripts.annotate --annotator ground_truth --records {input.records}"
        " --ground-truth {input.ground_truth} --out {output} > {log} 2>&1"
