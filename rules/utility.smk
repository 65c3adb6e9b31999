# Stage utility: zero-shot and linear-probe accuracy of each model on a labelled evaluation set.


rule utility:
    input:
        model=PATHS["model"],
        records=path("records", dataset=config["utility"]["dataset"]),
    output:
        PATHS["utility"],
    log:
        f"{RESULTS}/logs/utility/{{split}}/{{point}}/{{side}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/utility/{{split}}/{{point}}/{{side}}.tsv"
    conda:
        "../envs/dejavu.yaml"
    threads: config["embedding"]["threads"]
    resources:
        gpu=EMBED_GPUS,
    params:
        probe_fraction=config["utility"]["probe_fraction"],
        seed=config["utility"]["seed"],
        probe_max_iter=config["utility"]["probe_max_iter"],
        execution=execution_flags(device=config["embedding"]["device"]),
        labels=" ".join(f"--label-column {c}" for c in config["utility"]["label_columns"]),
        templates=" ".join(f"--template {shlex.quote(t)}" for t in config["utility"]["templates"]),
    shell:
        "python -m workflow_scripts.utility --model {input.model} --records {input.records} {params.labels}"
        " {params.templates} --probe-fraction {params.probe_fraction} --seed {params.seed}"
        " --probe-max-iter {params.probe_max_iter} {params.execution} --out {output} > {log} 2>&1"
