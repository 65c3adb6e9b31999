# Stage figures and summary: regenerated from the cached tables alone (no model is loaded).


rule figures_point:
    input:
        **{
            f"{queries}_{table}": f"{RESULTS}/metrics/{{split}}/{{point}}/{queries}/{table}.parquet"
            for queries in QUERY_SETS
            for table in ("records", "sample_level")
        },
    output:
        recall_cdf_png=_figure(f"{RESULTS}/figures/{{split}}/{{point}}/recall_cdf.png", "recall_cdf", "Recall CDFs"),
        recall_cdf_svg=f"{RESULTS}/figures/{{split}}/{{point}}/recall_cdf.svg",
        gap_png=_figure(f"{RESULTS}/figures/{{split}}/{{point}}/gap_vs_top_l.png", "gap_vs_top_l", "Sample level"),
        gap_svg=f"{RESULTS}/figures/{{split}}/{{point}}/gap_vs_top_l.svg",
    log:
        f"{RESULTS}/logs/figures/{{split}}/{{point}}/point.log",
    conda:
        "../envs/dejavu.yaml"
    params:
        metrics=lambda wc: " ".join(f"--metrics {q}={RESULTS}/metrics/{wc.split}/{wc.point}/{q}" for q in QUERY_SETS),
        out_dir=lambda wc, output: os.path.dirname(output.recall_cdf_png),
    shell:
        "python -m workflow_scripts.figures point {params.metrics} --out-dir {params.out_dir} > {log} 2>&1"


rule figures_qualitative:
    input:
        metrics_records=f"{RESULTS}/metrics/{{split}}/{{point}}/target/records.parquet",
        query_records=pool_records,
        query_annotations=pool_annotations,
        public_records=public_records,
        public_annotations=public_annotations,
        target_neighbors=f"{RESULTS}/neighbors/{{split}}/{{point}}/A.parquet",
        reference_neighbors=f"{RESULTS}/neighbors/{{split}}/{{point}}/B.parquet",
    output:
        png=_figure(f"{RESULTS}/figures/{{split}}/{{point}}/qualitative.png", "qualitative", "Qualitative"),
        svg=f"{RESULTS}/figures/{{split}}/{{point}}/qualitative.svg",
    log:
        f"{RESULTS}/logs/figures/{{split}}/{{point}}/qualitative.log",
    conda:
        "../envs/dejavu.yaml"
    shell:
        "python -m workflow_scripts.figures qualitative --metrics-records {input.metrics_records}"
        " --query-records {input.query_records} --query-annotations {input.query_annotations}"
        " --public-records {input.public_records} --public-annotations {input.public_annotations}"
        " --target-neighbors {input.target_neighbors} --reference-neighbors {input.reference_neighbors}"
        " --out {output.png} > {log} 2>&1"


rule summary:
    input:
        unpack(summary_inputs),
    output:
        table=f"{RESULTS}/summary/{{split}}.parquet",
        csv=report(f"{RESULTS}/summary/{{split}}.csv", caption="../report/summary.rst", category="Summary"),
    log:
        f"{RESULTS}/logs/summary/{{split}}.log",
    conda:
        "../envs/dejavu.yaml"
    params:
        points=" ".join(f"--point {point}" for point in POINTS),
        # results/summary/{split}.parquet -> results
        results=lambda wc, output: os.path.dirname(os.path.dirname(output.table)),
    shell:
        "python -m workflow_scripts.summary --results {params.results} --split {wildcards.split} {params.points}"
        " --out {output.table} > {log} 2>&1"


if SWEPT:  # a sweep figure per parameter that takes several values

    rule figures_sweep:
        input:
            f"{RESULTS}/summary/{{split}}.parquet",
        output:
            report(
                expand(f"{RESULTS}/figures/sweep/{{{{split}}}}/{{parameter}}.png", parameter=SWEPT),
                caption="../report/sweep.rst",
                category="Mitigations",
                subcategory="{split}",
            ),
            expand(f"{RESULTS}/figures/sweep/{{{{split}}}}/{{parameter}}.svg", parameter=SWEPT),
        log:
            f"{RESULTS}/logs/figures/sweep/{{split}}.log",
        conda:
            "../envs/dejavu.yaml"
        params:
            parameters=" ".join(f"--parameter {p}" for p in SWEPT),
            out_dir=lambda wc: f"{RESULTS}/figures/sweep/{wc.split}",
        shell:
            "python -m workflow_scripts.figures sweep --summary {input} {params.parameters}"
            " --out-dir {params.out_dir} > {log} 2>&1"


rule figures:
    """Every figure and the summary tables; `make figures` rebuilds them from the cached tables alone."""
    input:
        figure_targets(),
        expand(f"{RESULTS}/summary/{{split}}.parquet", split=config["splits"]),
