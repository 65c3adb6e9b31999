# Stage splits: pool records + annotations -> disjoint A, B, holdout id lists; then, apart, their overlap with P.
# `splits` never reads P, so a change to P redraws nothing and retrains nothing; `overlap` checks A, B and the
# holdout against P, and P's searches (rules/embed.smk, rules/one_model.smk) wait for it.


rule splits:
    input:
        pool_records=pool_records,
        pool_annotations=pool_annotations,
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
        " --pool-annotations {input.pool_annotations}"
        " --n-target {params.n_target} --n-reference {params.n_reference}"
        " --n-holdout {params.n_holdout} --seed {params.seed}"
        " --out-dir {params.out_dir} > {log} 2>&1"


rule overlap:
    """Shared ids or images between A, B, the holdout and P are refused; near-duplicates listed and handled as
    near_duplicates.action says (`public_excluded`: P's ids the searches leave out)."""
    input:
        A=path("split", name="A"),
        B=path("split", name="B"),
        holdout=path("split", name="holdout"),
        pool_records=pool_records,
        public_records=public_records,
    output:
        near_duplicates=PATHS["near_duplicates"],
        excluded=PATHS["public_excluded"],
    log:
        f"{RESULTS}/logs/splits/{{split}}/overlap.log",
    benchmark:
        f"{RESULTS}/benchmarks/splits/{{split}}/overlap.tsv"
    conda:
        "../envs/dejavu.yaml"
    threads: NEAR_DUPLICATES["threads"]
    params:
        action=NEAR_DUPLICATES["action"],
        min_similarity=NEAR_DUPLICATES["min_similarity"],
        side=NEAR_DUPLICATES["side"],
        execution=execution_flags(),
    shell:
        "python -m workflow_scripts.splits overlap --A {input.A} --B {input.B} --holdout {input.holdout}"
        " --pool-records {input.pool_records} --public-records {input.public_records} --action {params.action}"
        " --min-similarity {params.min_similarity} --side {params.side} {params.execution}"
        " --near-duplicates {output.near_duplicates} --excluded {output.excluded} > {log} 2>&1"
