# Stage splits: pool records + annotations, public records -> disjoint A, B, holdout id lists.


rule splits:
    input:
        pool_records=pool_records,
        pool_annotations=pool_annotations,
        public_records=public_records,
    output:
        A=path("split", name="A"),
        B=path("split", name="B"),
        holdout=path("split", name="holdout"),
    log:
        f"{RESULTS}/logs/splits/{{split}}.log",
    conda:
        "../envs/dejavu.yaml"
    params:
        n_target=lambda wc: split_of(wc)["n_target"],
        n_reference=lambda wc: split_of(wc)["n_reference"],
        n_holdout=lambda wc: split_of(wc)["n_holdout"],
        seed=lambda wc: split_of(wc)["seed"],
        out_dir=lambda wc, output: os.path.dirname(output.A),
    shell:
        "python -m workflow_scripts.splits make --pool-records {input.pool_records}"
        " --pool-annotations {input.pool_annotations} --public-records {input.public_records}"
        " --n-target {params.n_target} --n-reference {params.n_reference}"
        " --n-holdout {params.n_holdout} --seed {params.seed}"
        " --out-dir {params.out_dir} > {log} 2>&1"
